"""The one place where dataset rows become canonical records, validated before anything is tokenised.

A row's format is recognised by the keys it has (the first match wins):

==================  ==========================================  =========================================
keys                format                                      record
==================  ==========================================  =========================================
``messages``        chat: ``[{role, content}, ...]``, the       :class:`Demonstration` rendered with the
                    last message the assistant's                chat template (see :func:`make_chat_renderer`);
                                                                every assistant turn trained (see below)
``responses``,      k-wise ranking (``ranks``: ints, 0 = best,  one :class:`Comparison` per strictly
``ranks``           equal = tie, partial orders allowed)        ordered pair (:func:`ranking_to_pairs`)
``chosen``,         preference, with ``prompt``; without it     :class:`Comparison` (optional numeric
``rejected``        the hh-rlhf style of two whole dialogues    ``margin``)
``label``           ``prompt``/``completion``/``label``         :class:`Unpaired`
``completion``      ``prompt``/``completion``                   :class:`Demonstration`
``text``            plain text                                  ``Demonstration(prompt="", completion=text)``
``prompt``          prompt only                                 :class:`PromptRecord`
==================  ==========================================  =========================================

hh-rlhf's text dialogues (``\n\nHuman: …\n\nAssistant: …``) are read as messages and rendered with the chat
template, as every chat is, so that every phase and the evaluation see them alike; other pairs of texts are split
at the prefix they share.

A prompt may be a string or a list of messages (rendered with ``add_generation_prompt=True``); a response
(``completion``, ``chosen``, ``rejected``, an item of ``responses``) is a string or, after a message-list
prompt, a list holding exactly one assistant message. String prompts and responses are concatenated as they
are: the data owns its separators. Prompts, completions and message contents must be non-empty (a prompt-less
demonstration is a ``text`` row), except a system message, which templates render empty too, and a sampled answer
in a comparison or ranking; with ``on_bad_row="skip"`` another empty message is dropped where the conversation stays
valid without it. ``label`` is a bool; the integers 0 and 1 are accepted too, as many datasets
store booleans that way.

Which formats each kind takes: ``demonstration`` chat, prompt/completion and text; ``comparison`` preference
and ranking; ``unpaired`` unpaired rows, and preference rows, each of which becomes a desirable (chosen) and an
undesirable (rejected) record (KTO on paired data); ``prompt`` any row with a prompt (its prompt is taken, the
rest ignored; a chat conversation loses its final assistant message).

A ``messages`` demonstration trains on every assistant turn by default (``assistant_turns="all"``, TRL's
``assistant_only_loss``): its prompt is the conversation before the last assistant turn, its completion that turn,
and :attr:`Demonstration.prompt_segments` marks the earlier assistant turns inside the prompt. The segments are cut
where the chat template's own renderings end (messages before a turn with the generation prompt, then through the
turn), so together they are exactly the template's rendering; a template that renders an earlier turn differently
once later messages follow (one that drops earlier reasoning, say) cannot be cut so, and the row is a bad row
("chat template mismatch") whose message points at ``assistant_turns="last"``, which trains on the last turn only
and leaves the earlier ones as context. A ``prompt``/``completion`` row trains on its completion only, whatever
its prompt holds.

Every bad row gets one reason on one line: ``{source}:{row}: field '{field}': {what is wrong}``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from os.path import commonprefix
from typing import Any, Literal, get_args

import jinja2
import jinja2.sandbox

from lit_rlhf.errors import DataError

Kind = Literal["demonstration", "comparison", "prompt", "unpaired"]
OnBadRow = Literal["error", "skip"]
AssistantTurns = Literal["all", "last"]
"""Which assistant turns of a ``messages`` demonstration the loss covers: all of them, or the last only."""
ChatRenderer = Callable[[list[dict[str, str]], bool], str]
"""``render(messages, add_generation_prompt) -> text``; build one with :func:`make_chat_renderer`."""

ROLES = ("system", "user", "assistant")

TEXT_FIELDS = ("text", "prompt", "completion", "chosen", "rejected")
"""Fields that hold text; readers of untyped files (CSV) keep these as strings."""

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""The chat template of tokenizers that have none: ``Role: content`` lines, the generation prompt
``Assistant:``. Plain words, so even the world's word-level tokenizer can read it. ``[user "hi", assistant
"hello"]`` becomes the prompt ``"User: hi\\nAssistant:"`` and the completion ``" hello\\n"``."""

_ASSISTANT_MARKER = "Assistant:"
"""Where a text dialogue not in hh-rlhf's form hands over to the model: the prompt of two such dialogues (the prefix
they have in common) ends right after it."""


@dataclass(frozen=True)
class Demonstration:
    prompt: str
    completion: str
    prompt_segments: tuple[str, ...] = ()
    """Where earlier assistant turns are trained too: the prompt cut into context and assistant turn alternately,
    context first and last (``"".join(prompt_segments) == prompt``). Empty when the whole prompt is context."""
    ended: bool = True
    """Whether the completion ended (a sample cut at ``max_new_tokens`` did not): an unfinished one is trained and
    scored without the end token, as the unfinished text it is."""


@dataclass(frozen=True)
class Comparison:
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    chosen_ended: bool = True
    """Whether each answer ended (see :attr:`Demonstration.ended`)."""
    rejected_ended: bool = True


@dataclass(frozen=True)
class PromptRecord:
    prompt: str


@dataclass(frozen=True)
class Unpaired:
    prompt: str
    completion: str
    label: bool
    ended: bool = True
    """Whether the completion ended (see :attr:`Demonstration.ended`)."""


Record = Demonstration | Comparison | PromptRecord | Unpaired


class RowProblem(Exception):
    """What is wrong with one row. ``reason`` is the short category that skipped rows are counted under;
    ``detail`` the specific explanation. A reader hands one over in place of a row it could not read (invalid
    JSON), so that the row is reported or skipped like any other bad row."""

    def __init__(self, field: str | None, reason: str, detail: str | None = None):
        super().__init__(detail or reason)
        self.field = field
        self.reason = reason
        self.detail = detail or reason

    @property
    def counted_as(self) -> str:
        return f"field '{self.field}': {self.reason}" if self.field else self.reason

    def located(self, source: str, row: int) -> str:
        """The one-line message: ``{source}:{row}: field '{field}': {detail}``."""
        what = f"field '{self.field}': {self.detail}" if self.field else self.detail
        return f"{source}:{row}: " + what.replace("\n", "\\n")


@dataclass
class NormalizedRows:
    """The records of a source, with every row that did not make it, and every message dropped from a row that
    did, counted by reason, each reason with the first row it happened in."""

    records: list[Record] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    dropped_messages: Counter[str] = field(default_factory=Counter)
    first_row: dict[tuple[str, str], str] = field(default_factory=dict)
    """``("skipped" or "dropped", reason)`` → ``source:row`` where it first happened."""
    ties: int = 0
    """Pairs of equally ranked responses that ranking rows could not turn into comparisons."""
    rows: int = 0
    """Rows read, good and bad."""

    @property
    def skipped_rows(self) -> int:
        return sum(self.skipped.values())

    def problems(self, source: str) -> list[str]:
        """One warning line each for the skipped rows and the dropped messages of ``source``; none when clean."""
        lines = []
        for kind, counts, what in (
            ("skipped", self.skipped, f"skipped {self.skipped_rows} of {self.rows} rows"),
            ("dropped", self.dropped_messages, f"dropped {sum(self.dropped_messages.values())} messages"),
        ):
            if counts:
                reasons = ", ".join(f"{reason} ({count}, first at {self.first_row[kind, reason]})"
                                    for reason, count in counts.most_common())
                lines.append(f"{source}: {what}: {reasons}")
        return lines

    def _count(self, kind: Literal["skipped", "dropped"], reason: str, where: str) -> None:
        (self.skipped if kind == "skipped" else self.dropped_messages)[reason] += 1
        self.first_row.setdefault((kind, reason), where)


def ranking_to_pairs(responses: list[str], ranks: list[int]) -> tuple[list[tuple[str, str]], int]:
    """All C(k, 2) pairs of a k-wise ranking as ``(chosen, rejected)``, the lower rank chosen (0 = best).

    Equal ranks are ties: they carry no preference, so the pair is dropped and counted. Pairs come in the order
    of their first response, then their second.
    """
    if len(responses) != len(ranks):
        raise ValueError(f"{len(ranks)} ranks for {len(responses)} responses")
    pairs: list[tuple[str, str]] = []
    ties = 0
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            if ranks[i] == ranks[j]:
                ties += 1
            elif ranks[i] < ranks[j]:
                pairs.append((responses[i], responses[j]))
            else:
                pairs.append((responses[j], responses[i]))
    return pairs, ties


def make_chat_renderer(tokenizer: Any = None) -> ChatRenderer:
    """Render messages with ``tokenizer``'s chat template, or :data:`DEFAULT_CHAT_TEMPLATE` where the tokenizer
    has none or no tokenizer is given."""
    if tokenizer is None:
        # The same sandboxed Jinja setup transformers renders chat templates with.
        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = environment.from_string(DEFAULT_CHAT_TEMPLATE)

        def render_default(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt)

        return render_default

    override = None if tokenizer.chat_template else DEFAULT_CHAT_TEMPLATE

    def render_with_tokenizer(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=override, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    return render_with_tokenizer


def normalize_rows(
    rows: Iterable[Any],
    kind: Kind,
    source: str = "<rows>",
    chat_renderer: ChatRenderer | None = None,
    on_bad_row: OnBadRow = "error",
    assistant_turns: AssistantTurns = "all",
) -> NormalizedRows:
    """Turn rows into the canonical records of ``kind``.

    ``rows`` are dicts, numbered from 1 under ``source``, or the ``(source, row, dict)`` triples that
    :func:`lit_rlhf.data.sources.read_rows` yields, which carry their own location. With ``on_bad_row="error"``
    the first bad row raises :class:`DataError`; with ``"skip"`` bad rows are left out and counted by reason in
    ``.skipped``, and an empty message is dropped where its conversation stays valid without it (counted in
    ``.dropped_messages``; see :func:`_messages`). ``assistant_turns`` picks the turns of a ``messages``
    demonstration that are trained on (see the module docstring).
    """
    if kind not in get_args(Kind):
        raise ValueError(f"unknown record kind {kind!r}; expected one of {get_args(Kind)}")
    if on_bad_row not in get_args(OnBadRow):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if assistant_turns not in get_args(AssistantTurns):
        raise ValueError(f"assistant_turns must be 'all' or 'last', got {assistant_turns!r}")
    parser = _RowParser(chat_renderer or make_chat_renderer(), assistant_turns, drop_empty=on_bad_row == "skip")
    result = NormalizedRows()
    for number, item in enumerate(rows, start=1):
        row_source, row_number, row = item if isinstance(item, tuple) else (source, number, item)
        result.rows += 1
        try:
            records, ties = parser.parse(row, kind)
        except RowProblem as problem:
            if on_bad_row == "error":
                raise DataError(problem.located(row_source, row_number)) from None
            result._count("skipped", problem.counted_as, f"{row_source}:{row_number}")
            continue
        for reason in parser.dropped:
            result._count("dropped", reason, f"{row_source}:{row_number}")
        result.records.extend(records)
        result.ties += ties
    return result


# --- reading single values -------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require(row: Mapping[str, Any], name: str) -> Any:
    if name not in row or row[name] is None:
        raise RowProblem(name, "missing", "required but missing")
    return row[name]


def _non_empty(text: str, name: str) -> str:
    if not text.strip():
        raise RowProblem(name, "empty", "must not be empty")
    return text


def _string(row: Mapping[str, Any], name: str) -> str:
    value = _require(row, name)
    if not isinstance(value, str):
        raise RowProblem(name, "wrong type", f"must be a string, got {_type_name(value)}")
    return _non_empty(value, name)


def _messages(value: list[Any], name: str, drop_empty: bool = False) -> tuple[list[dict[str, str]], list[str]]:
    """A validated chat and the reasons of the messages dropped from it: non-empty, each message a dict with a known
    role and string content. Extra keys are dropped so templates see only what was checked.

    An empty system message is kept: chat templates render one, and exports of real chats carry them. An empty
    assistant message in a response field (``chosen``, ``rejected``, ``responses``) is kept too: a sampled answer
    can be empty. Any other empty message makes the row bad, unless ``drop_empty`` (``on_bad_row="skip"``) and the
    conversation stays valid without it (the messages either side of it, system messages aside, are not of one
    role, and it is not the last message), in which case it is dropped and its reason returned."""
    if not value:
        raise RowProblem(name, "empty", "must not be an empty list of messages")
    messages, numbers, empty = [], [], []
    for index, message in enumerate(value, start=1):
        if not isinstance(message, Mapping):
            raise RowProblem(
                name, "malformed message", f"message {index} must be an object, got {_type_name(message)}"
            )
        missing = [key for key in ("role", "content") if message.get(key) is None]
        if missing:
            raise RowProblem(name, "malformed message", f"message {index} has no '{missing[0]}'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise RowProblem(
                name, "malformed message", f"message {index} has unknown role {role!r} (expected one of {ROLES})"
            )
        if not isinstance(content, str):
            raise RowProblem(
                name, "malformed message", f"message {index}: content must be a string, got {_type_name(content)}"
            )
        kept_empty = role == "system" or (role == "assistant" and name in _RESPONSE_FIELDS)
        if not content.strip() and not kept_empty:
            empty.append(index)
        messages.append({"role": role, "content": content})
        numbers.append(index)
    dropped = []
    for index in empty:
        position = numbers.index(index)
        role = messages[position]["role"]
        if not (drop_empty and _droppable([message["role"] for message in messages], position)):
            hint = " (on_bad_row: skip drops it where the conversation stays valid)" if not drop_empty else ""
            raise RowProblem(name, f"empty {role} message", f"message {index} ({role}): content is empty{hint}")
        del messages[position], numbers[position]
        dropped.append(f"field '{name}': empty {role} message")
    return messages, dropped


_RESPONSE_FIELDS = ("chosen", "rejected", "responses")


def _droppable(roles: list[str], position: int) -> bool:
    """Whether a conversation of these ``roles`` stays valid without the one at ``position``: it is not the last
    message (the turn that is trained on or answered), another turn is left, and the turns either side of it
    (system messages aside) are not of one role, which would join two user or two assistant turns."""
    before = [role for role in roles[:position] if role != "system"]
    after = [role for role in roles[position + 1 :] if role != "system"]
    if position == len(roles) - 1 or not (before or after):
        return False
    return not (before and after and before[-1] == after[0])


def _label(row: Mapping[str, Any]) -> bool:
    value = _require(row, "label")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise RowProblem("label", "not a bool", f"must be true/false (or 1/0), got {value!r}")


def _margin(row: Mapping[str, Any]) -> float | None:
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RowProblem("margin", "not a number", f"must be a finite number, got {value!r}")
    return float(value)


def _ended(row: Mapping[str, Any], name: str) -> bool:
    """``{name}_ended``: whether that answer ended; absent or null, it did."""
    value = row.get(f"{name}_ended")
    if value is None:
        return True
    if not isinstance(value, bool):
        raise RowProblem(f"{name}_ended", "not a bool", f"must be true or false, got {value!r}")
    return value


def _ended_list(row: Mapping[str, Any], count: int) -> list[bool]:
    """``responses_ended``: whether each ranked answer ended; absent or null, all did."""
    value = row.get("responses_ended")
    if value is None:
        return [True] * count
    if not isinstance(value, list) or len(value) != count or not all(isinstance(v, bool) for v in value):
        raise RowProblem("responses_ended", "wrong type", f"must be a list of {count} true/false, got {value!r}")
    return value


def _ranks(row: Mapping[str, Any], count: int) -> list[int]:
    ranks = _require(row, "ranks")
    if not isinstance(ranks, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        raise RowProblem("ranks", "wrong type", f"must be a list of integers, got {ranks!r}")
    if len(ranks) != count:
        raise RowProblem("ranks", "length mismatch", f"has {len(ranks)} entries for {count} responses")
    return ranks


@dataclass(frozen=True)
class _Prompt:
    text: str
    messages: list[dict[str, str]] | None
    """The prompt as messages when it was given as a chat; responses then have to be messages too."""


class _RowParser:
    """Recognises a row's format and reads it into records, raising :class:`RowProblem` for a bad row."""

    def __init__(self, render: ChatRenderer, assistant_turns: AssistantTurns = "all", drop_empty: bool = False):
        self._render_chat = render
        self._assistant_turns = assistant_turns
        self._drop_empty = drop_empty
        self.dropped: list[str] = []
        """The reasons of the messages dropped from the row parsed last."""

    def parse(self, row: Any, kind: Kind) -> tuple[list[Record], int]:
        """The row's records for ``kind`` and the ties it dropped."""
        self.dropped = []
        if isinstance(row, RowProblem):
            raise row
        if not isinstance(row, Mapping):
            raise RowProblem(None, "not an object", f"a row must be an object, got {_type_name(row)}")
        format_name = _detect_format(row, _ACCEPTED[kind])
        if kind == "prompt":
            return [self._prompt_record(row, format_name)], 0
        if format_name not in _ACCEPTED[kind]:
            raise RowProblem(None, "wrong format", _wrong_format_message(row, format_name, kind))
        if format_name == "chat":
            return [self._chat_demonstration(row)], 0
        if format_name == "prompt_completion":
            prompt = self._prompt(row, chat=isinstance(row.get("completion"), list))
            completion = self._response(row, "completion", prompt)
            return [Demonstration(prompt.text, completion, ended=_ended(row, "completion"))], 0
        if format_name == "text":
            return [Demonstration("", _string(row, "text"))], 0
        if format_name == "unpaired":
            prompt = self._prompt(row, chat=isinstance(row.get("completion"), list))
            completion = self._response(row, "completion", prompt)
            return [Unpaired(prompt.text, completion, _label(row), _ended(row, "completion"))], 0
        if format_name == "ranking":
            return self._ranking(row)
        comparison = self._preference(row)
        if kind == "unpaired":
            return [
                Unpaired(comparison.prompt, comparison.chosen, True, comparison.chosen_ended),
                Unpaired(comparison.prompt, comparison.rejected, False, comparison.rejected_ended),
            ], 0
        return [comparison], 0

    def _messages(self, value: list[Any], name: str) -> list[dict[str, str]]:
        messages, dropped = _messages(value, name, self._drop_empty)
        self.dropped += dropped
        return messages

    # --- chat rendering ---

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool, name: str) -> str:
        try:
            return self._render_chat(messages, add_generation_prompt)
        except (jinja2.TemplateError, ValueError) as error:
            raise RowProblem(name, "chat template error", f"the chat template failed: {error}") from None

    def _render_response(self, prompt: list[dict[str, str]], response: list[dict[str, str]], name: str) -> str:
        """The text the template adds for ``response`` after ``prompt``: render(all) minus render(prompt)."""
        prefix = self._render(prompt, True, name)
        full = self._render(prompt + response, False, name)
        if not full.startswith(prefix):
            raise RowProblem(
                name,
                "chat template mismatch",
                "the chat template's render of the whole conversation does not start with its render of the "
                "prompt, so the response cannot be split off",
            )
        response = full[len(prefix) :]
        return response if name in _RESPONSE_FIELDS else _non_empty(response, name)

    # --- fields ---

    def _prompt(self, row: Mapping[str, Any], chat: bool = False) -> _Prompt:
        """The row's prompt; with ``chat`` (its responses are messages) a text prompt is one user message."""
        value = _require(row, "prompt")
        if isinstance(value, str) and chat:
            value = [{"role": "user", "content": value}]
        if isinstance(value, str):
            return _Prompt(_non_empty(value, "prompt"), None)
        if isinstance(value, list):
            messages = self._messages(value, "prompt")
            return _Prompt(self._render(messages, True, "prompt"), messages)
        raise RowProblem(
            "prompt", "wrong type", f"must be a string or a list of messages, got {_type_name(value)}"
        )

    def _response_value(self, value: Any, prompt: _Prompt, name: str) -> str:
        if isinstance(value, str):
            # An empty response in a comparison or a ranking is a real sample (the policy stopped at once), so it
            # is kept; an empty demonstration teaches nothing.
            return value if name in ("chosen", "rejected", "responses") else _non_empty(value, name)
        if not isinstance(value, list):
            raise RowProblem(
                name, "wrong type", f"must be a string or a list of messages, got {_type_name(value)}"
            )
        messages = self._messages(value, name)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            roles = [message["role"] for message in messages]
            raise RowProblem(
                name, "malformed message", f"must hold exactly one assistant message, got roles {roles}"
            )
        return self._render_response(prompt.messages, messages, name)

    def _response(self, row: Mapping[str, Any], name: str, prompt: _Prompt) -> str:
        return self._response_value(_require(row, name), prompt, name)

    # --- formats ---

    def _chat_demonstration(self, row: Mapping[str, Any]) -> Demonstration:
        value = _require(row, "messages")
        if not isinstance(value, list):
            raise RowProblem("messages", "wrong type", f"must be a list of messages, got {_type_name(value)}")
        messages = self._messages(value, "messages")
        if messages[-1]["role"] != "assistant":
            raise RowProblem(
                "messages",
                "last message not from the assistant",
                f"the last message must be the assistant's, got role {messages[-1]['role']!r}",
            )
        prompt = self._render(messages[:-1], True, "messages")
        completion = self._render_response(messages[:-1], messages[-1:], "messages")
        if self._assistant_turns == "last":
            return Demonstration(prompt, completion)
        return Demonstration(prompt, completion, self._prompt_segments(messages, prompt))

    def _prompt_segments(self, messages: list[dict[str, str]], prompt: str) -> tuple[str, ...]:
        """``prompt`` (the render of all but the last message) cut at the earlier assistant turns' boundaries:
        each turn's text is its render through the turn minus its render before it with the generation prompt,
        as the last turn's is. Empty when no assistant turn comes before the last."""
        earlier_turns = [index for index, message in enumerate(messages[:-1]) if message["role"] == "assistant"]
        if not earlier_turns:
            return ()
        segments = []
        rendered = ""  # the render through the turn cut off last
        for index in earlier_turns:
            before = self._render(messages[:index], True, "messages")
            through = self._render(messages[: index + 1], False, "messages")
            segments += [_continuation(rendered, before, index), _continuation(before, through, index)]
            rendered = through
        segments.append(_continuation(rendered, prompt, earlier_turns[-1]))
        return tuple(segments)

    def _preference(self, row: Mapping[str, Any]) -> Comparison:
        if "prompt" not in row:
            prompt, chosen, rejected = self._dialogue_pair(row)
        elif isinstance(row["prompt"], str) and _is_dialogue(row.get("chosen")) and _is_dialogue(row.get("rejected")):
            # UltraFeedback (binarized) style: the prompt as text, and whole dialogues that repeat it as a user turn.
            users = [message.get("content") for message in row["chosen"] if message.get("role") == "user"]
            if row["prompt"] not in users:
                raise RowProblem("prompt", "not in the dialogue", "is not a user message of the 'chosen' dialogue")
            prompt, chosen, rejected = self._dialogue_pair(row)
        else:
            if isinstance(row.get("chosen"), list):  # checked first, so a bad 'chosen' is not blamed on 'rejected'
                _messages(row["chosen"], "chosen", self._drop_empty)
            _same_kind(row.get("chosen"), "rejected", row.get("rejected"))
            prompt_value = self._prompt(row, chat=isinstance(row.get("chosen"), list))
            prompt = prompt_value.text
            chosen = self._response(row, "chosen", prompt_value)
            rejected = self._response(row, "rejected", prompt_value)
        if chosen == rejected:
            raise RowProblem("rejected", "identical to chosen", "identical to 'chosen'")
        return Comparison(prompt, chosen, rejected, _margin(row), _ended(row, "chosen"), _ended(row, "rejected"))

    def _dialogue_pair(self, row: Mapping[str, Any]) -> tuple[str, str, str]:
        """hh-rlhf style: two whole dialogues; the prompt is what they share, the responses what follows."""
        chosen, rejected = _require(row, "chosen"), _require(row, "rejected")
        if isinstance(chosen, str):
            if not isinstance(rejected, str):
                raise RowProblem(
                    "rejected", "wrong type", f"must be a string like 'chosen', got {_type_name(rejected)}"
                )
            if chosen == rejected:
                raise RowProblem("rejected", "identical to chosen", "identical to 'chosen'")
            chosen_turns, rejected_turns = _hh_turns(chosen), _hh_turns(rejected)
            if chosen_turns is None or rejected_turns is None:
                return _split_common_prefix(_non_empty(chosen, "chosen"), _non_empty(rejected, "rejected"))
            chosen, rejected = chosen_turns, rejected_turns  # rendered with the chat template, as messages are
        if not isinstance(chosen, list):
            raise RowProblem(
                "chosen", "wrong type", f"must be a string or a list of messages, got {_type_name(chosen)}"
            )
        if not isinstance(rejected, list):
            raise RowProblem(
                "rejected", "wrong type", f"must be a list of messages like 'chosen', got {_type_name(rejected)}"
            )
        chosen_messages, rejected_messages = self._messages(chosen, "chosen"), self._messages(rejected, "rejected")
        if chosen_messages == rejected_messages:
            raise RowProblem("rejected", "identical to chosen", "identical to 'chosen'")
        shared = 0
        while chosen_messages[shared : shared + 1] == rejected_messages[shared : shared + 1]:
            shared += 1
        prompt_messages = chosen_messages[:shared]
        prompt = _Prompt(self._render(prompt_messages, True, "chosen"), prompt_messages)
        return (
            prompt.text,
            self._response_value(chosen_messages[shared:], prompt, "chosen"),
            self._response_value(rejected_messages[shared:], prompt, "rejected"),
        )

    def _ranking(self, row: Mapping[str, Any]) -> tuple[list[Record], int]:
        responses_value = _require(row, "responses")
        if not isinstance(responses_value, list):
            raise RowProblem("responses", "wrong type", f"must be a list, got {_type_name(responses_value)}")
        if len(responses_value) < 2:
            raise RowProblem(
                "responses", "too few", f"needs at least 2 responses to rank, got {len(responses_value)}"
            )
        for value in responses_value:
            _same_kind(responses_value[0], "responses", value)
        prompt = self._prompt(row, chat=isinstance(responses_value[0], list))
        responses = []
        for index, value in enumerate(responses_value, start=1):
            try:
                responses.append(self._response_value(value, prompt, "responses"))
            except RowProblem as problem:
                raise RowProblem("responses", problem.reason, f"item {index}: {problem.detail}") from None
        pairs, ties = ranking_to_pairs(responses, _ranks(row, len(responses)))
        if any(chosen == rejected for chosen, rejected in pairs):
            raise RowProblem(
                "responses", "identical responses ranked apart", "identical responses have different ranks"
            )
        margin = _margin(row)
        ended = dict(zip(responses, _ended_list(row, len(responses))))
        return [Comparison(prompt.text, chosen, rejected, margin, ended[chosen], ended[rejected])
                for chosen, rejected in pairs], ties

    def _prompt_record(self, row: Mapping[str, Any], format_name: str | None) -> PromptRecord:
        if format_name == "chat":
            value = _require(row, "messages")
            if not isinstance(value, list):
                raise RowProblem("messages", "wrong type", f"must be a list of messages, got {_type_name(value)}")
            if value and isinstance(value[-1], Mapping) and value[-1].get("role") == "assistant":
                value = value[:-1]  # the answer, which a prompt row ignores (an export's empty placeholder too)
                if not value:
                    raise RowProblem("messages", "empty", "has no messages before the assistant's answer")
            messages = self._messages(value, "messages")
            return PromptRecord(self._render(messages, True, "messages"))
        if format_name == "preference" and "prompt" not in row:
            return PromptRecord(self._dialogue_pair(row)[0])
        if "prompt" not in row:
            raise RowProblem(None, "wrong format", _wrong_format_message(row, format_name, "prompt"))
        return PromptRecord(self._prompt(row).text)


# --- formats ---------------------------------------------------------------------------------------------------

_FORMAT_KEYS = (
    ("chat", ("messages",)),
    ("ranking", ("responses", "ranks")),
    ("preference", ("chosen", "rejected")),
    ("unpaired", ("label",)),
    ("prompt_completion", ("completion",)),
    ("text", ("text",)),
    ("prompt_only", ("prompt",)),
)
"""Any one key of a format names it, so a row with ``chosen`` but no ``rejected`` is told that ``rejected`` is
missing rather than that its format is unknown."""

_DESCRIPTIONS = {
    "chat": "messages",
    "ranking": "prompt/responses/ranks",
    "preference": "prompt/chosen/rejected (or chosen/rejected dialogues)",
    "unpaired": "prompt/completion/label",
    "prompt_completion": "prompt/completion",
    "text": "text",
    "prompt_only": "prompt",
}

_ACCEPTED: dict[str, tuple[str, ...]] = {
    "demonstration": ("chat", "prompt_completion", "text"),
    "comparison": ("preference", "ranking"),
    "unpaired": ("unpaired", "preference"),
    "prompt": tuple(name for name in _DESCRIPTIONS if name != "text"),
}


def _continuation(shorter: str, longer: str, turn_index: int) -> str:
    """What ``longer``, a render of more of a conversation, adds to ``shorter``, cut around the assistant message
    at ``turn_index``."""
    if not longer.startswith(shorter):
        raise RowProblem(
            "messages",
            "chat template mismatch",
            f"the chat template's renders before, through and after message {turn_index + 1} (an assistant turn) do "
            "not each start with the one before, so the earlier assistant turns cannot be split off "
            "(assistant_turns='last' trains on the last turn only)",
        )
    return longer[len(shorter) :]


def _same_kind(first: Any, name: str, value: Any) -> None:
    """One row's responses are all text or all messages: a chat template renders only the message ones."""
    if isinstance(first, list) != isinstance(value, list) and isinstance(value, (str, list)):
        kinds = ("messages", "text") if isinstance(value, list) else ("text", "messages")
        raise RowProblem(name, "wrong type", f"is {kinds[0]}, but the row's other responses are {kinds[1]}")


def _is_dialogue(value: Any) -> bool:
    """A list of messages that starts before the assistant's answer (a whole conversation, not just a reply)."""
    return (
        isinstance(value, list) and bool(value) and all(isinstance(message, Mapping) for message in value)
        and value[0].get("role") != "assistant"
    )


def _detect_format(row: Mapping[str, Any], accepted: tuple[str, ...]) -> str | None:
    """The row's format: of those its keys name, the first that the wanted kind accepts, else the first (to say
    what the row is). Real datasets carry more than one: ``ultrafeedback_binarized`` rows have
    ``prompt``/``chosen``/``rejected`` and also ``messages`` (the chosen dialogue), a comparison and a chat."""
    present = [name for name, keys in _FORMAT_KEYS if any(key in row for key in keys)]
    return next((name for name in present if name in accepted), present[0] if present else None)


def _wrong_format_message(row: Mapping[str, Any], format_name: str | None, kind: str) -> str:
    expected = ", ".join(_DESCRIPTIONS[name] for name in _ACCEPTED[kind])
    if format_name is None:
        return f"no recognised fields; found keys {sorted(row)} — expected one of {expected}"
    article = "an" if kind[0] in "aeiou" else "a"
    return f"a {_DESCRIPTIONS[format_name]} row is not {article} {kind} row; expected one of {expected}"


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_turns(text: str) -> list[dict[str, str]] | None:
    """hh-rlhf's ``\n\nHuman: …\n\nAssistant: …`` dialogue as messages, so that it is rendered with the model's chat
    template like every other chat; ``None`` when the text is not such a dialogue (turns alternating from Human's to
    the Assistant's last)."""
    parts = _HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    roles, contents = parts[1::2], parts[2::2]
    alternating = all(a != b for a, b in zip(roles, roles[1:]))
    if parts[0] or not roles or roles[0] != "Human" or roles[-1] != "Assistant" or not alternating:
        return None
    return [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
            for role, content in zip(roles, contents)]


def _split_common_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two texts into the prefix they have in common (the prompt) and their own responses.

    The shared text ends just after its last ``Assistant:`` marker when it has one; otherwise it backs off to the
    whitespace before the first differing word, so that no word is cut in two.
    """
    shared = commonprefix([chosen, rejected])
    marker = shared.rfind(_ASSISTANT_MARKER)
    if marker >= 0:
        cut = marker + len(_ASSISTANT_MARKER)
    else:
        last_word = re.search(r"\s+\S*$", shared)
        cut = last_word.start() if last_word else 0
    if cut == 0 or not shared[:cut].strip():
        raise RowProblem("chosen", "no common prefix", "'chosen' and 'rejected' share no leading prompt text")
    return shared[:cut], _non_empty(chosen[cut:], "chosen"), _non_empty(rejected[cut:], "rejected")
