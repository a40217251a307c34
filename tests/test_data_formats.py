"""Row formats, validation and reading: every format parsed, every bad row named by file, row and field."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lit_rlhf.data.formats import (
    DEFAULT_CHAT_TEMPLATE,
    Comparison,
    Demonstration,
    PromptRecord,
    Unpaired,
    make_chat_renderer,
    normalize_rows,
    ranking_to_pairs,
)
from lit_rlhf.data.sources import read_rows
from lit_rlhf.errors import DataError

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def only(rows: list[dict], kind: str, **kwargs):
    return normalize_rows(rows, kind, **kwargs).records


def tokenizer_with_template(template: str | None) -> PreTrainedTokenizerFast:
    word_level = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", eos_token="<eos>")
    tokenizer.chat_template = template
    return tokenizer


# --- each format -------------------------------------------------------------------------------------------------


def test_text_and_prompt_completion_are_demonstrations():
    records = only([{"text": "hello world"}, {"prompt": "Q: hi", "completion": " A: hey"}], "demonstration")
    assert records == [Demonstration("", "hello world"), Demonstration("Q: hi", " A: hey")]


def test_messages_use_the_default_template_when_there_is_none():
    rows = [{"messages": [{"role": "system", "content": "be kind"}, user("hi"), assistant("hello")]}]
    expected = Demonstration("System: be kind\nUser: hi\nAssistant:", " hello\n")
    assert only(rows, "demonstration") == [expected]
    renderer = make_chat_renderer(tokenizer_with_template(None))
    assert only(rows, "demonstration", chat_renderer=renderer) == [expected]
    assert "Assistant:" in DEFAULT_CHAT_TEMPLATE


def test_messages_use_the_tokenizers_own_template():
    renderer = make_chat_renderer(tokenizer_with_template(CHATML_TEMPLATE))
    records = only([{"messages": [user("hi"), assistant("hello")]}], "demonstration", chat_renderer=renderer)
    assert records == [
        Demonstration("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "hello<|im_end|>\n")
    ]


def test_a_template_whose_prompt_is_not_a_prefix_is_rejected():
    renderer = make_chat_renderer(tokenizer_with_template("{% if add_generation_prompt %}X{% endif %}Y"))
    with pytest.raises(DataError, match=r"<rows>:1: field 'messages': .*does not start with its render"):
        normalize_rows([{"messages": [user("hi"), assistant("hello")]}], "demonstration", chat_renderer=renderer)


MULTI_TURN = [{"role": "system", "content": "be kind"}, user("hi"), assistant("hello"), user("bye"), assistant("ciao")]


def test_multi_turn_chats_mark_every_earlier_assistant_turn_unless_only_the_last_is_asked_for():
    records = only([{"messages": MULTI_TURN}], "demonstration")
    prompt = "System: be kind\nUser: hi\nAssistant: hello\nUser: bye\nAssistant:"
    assert records == [
        Demonstration(prompt, " ciao\n", ("System: be kind\nUser: hi\nAssistant:", " hello\n", "User: bye\nAssistant:"))
    ]
    last_only = only([{"messages": MULTI_TURN}], "demonstration", assistant_turns="last")
    assert last_only == [Demonstration(prompt, " ciao\n")]

    renderer = make_chat_renderer(tokenizer_with_template(CHATML_TEMPLATE))
    (record,) = only([{"messages": MULTI_TURN}], "demonstration", chat_renderer=renderer)
    assert record.prompt_segments == (
        "<|im_start|>system\nbe kind<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "hello<|im_end|>\n",
        "<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n",
    )
    assert "".join(record.prompt_segments) == record.prompt and record.completion == "ciao<|im_end|>\n"
    # One exchange has no earlier turn: the record is the single-turn one.
    assert only([{"messages": MULTI_TURN[:3]}], "demonstration") == [
        Demonstration("System: be kind\nUser: hi\nAssistant:", " hello\n")
    ]


def test_a_template_that_renders_earlier_turns_differently_cannot_split_them():
    # Like templates that drop an earlier answer's reasoning: only the last message is rendered in full.
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] if loop.last or m['role'] != 'assistant' else '...' }}"
        "\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    renderer = make_chat_renderer(tokenizer_with_template(template))
    rows = [{"messages": MULTI_TURN}]
    message = (r"^<rows>:1: field 'messages': the chat template's renders before, through and after message 3 \(an "
               r"assistant turn\) do not each start with the one before, .*\(assistant_turns='last' trains on the "
               r"last turn only\)$")
    with pytest.raises(DataError, match=message):
        normalize_rows(rows, "demonstration", chat_renderer=renderer)
    skipped = normalize_rows(rows, "demonstration", chat_renderer=renderer, on_bad_row="skip").skipped
    assert skipped == Counter({"field 'messages': chat template mismatch": 1})
    (record,) = only(rows, "demonstration", chat_renderer=renderer, assistant_turns="last")
    assert record.completion == " ciao\n" and "assistant: ...\n" in record.prompt


def test_prompt_chosen_rejected_strings_with_and_without_margin():
    rows = [
        {"prompt": "p", "chosen": " good", "rejected": " bad", "margin": 2},
        {"prompt": "p", "chosen": " good", "rejected": " bad"},
    ]
    assert only(rows, "comparison") == [Comparison("p", " good", " bad", 2.0), Comparison("p", " good", " bad")]


def test_prompt_chosen_rejected_as_messages():
    rows = [
        {"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("go away")]},
        {"prompt": [user("hi")], "chosen": " hello", "rejected": " go away"},
    ]
    assert only(rows, "comparison") == [
        Comparison("User: hi\nAssistant:", " hello\n", " go away\n"),
        Comparison("User: hi\nAssistant:", " hello", " go away"),
    ]


def test_hh_rlhf_strings_are_dialogues_rendered_with_the_chat_template():
    dialogue = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: name a fruit\n\nAssistant:"
    row = {"chosen": dialogue + " Sure, a pear.", "rejected": dialogue + " Sure, no."}
    prompt = "User: hi\nAssistant: hello\nUser: name a fruit\nAssistant:"
    assert only([row], "comparison") == [Comparison(prompt, " Sure, a pear.\n", " Sure, no.\n")]
    chatml_renderer = make_chat_renderer(tokenizer_with_template(CHATML_TEMPLATE))
    chatml = only([row], "unpaired", chat_renderer=chatml_renderer)  # KTO's rows: the same template
    assert chatml[0].prompt == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
                                "<|im_start|>user\nname a fruit<|im_end|>\n<|im_start|>assistant\n")
    assert [(r.completion, r.label) for r in chatml] == [("Sure, a pear.<|im_end|>\n", True),
                                                         ("Sure, no.<|im_end|>\n", False)]
    assert only([row], "prompt") == [PromptRecord(prompt)]
    assert only([{"chosen": "Human: hi Assistant: a", "rejected": "Human: hi Assistant: b"}], "comparison") == [
        Comparison("Human: hi Assistant:", " a", " b")]  # not hh-rlhf's form: split at the shared text


def test_hh_rlhf_strings_without_marker_back_off_to_whitespace():
    assert only([{"chosen": "I like cats", "rejected": "I like cows"}], "comparison") == [
        Comparison("I like", " cats", " cows")
    ]


def test_hh_rlhf_message_lists_share_their_leading_messages():
    row = {"chosen": [user("hi"), assistant("hello")], "rejected": [user("hi"), assistant("go away")]}
    assert only([row], "comparison") == [Comparison("User: hi\nAssistant:", " hello\n", " go away\n")]


def test_ultrafeedback_rows_text_prompt_and_whole_dialogues():
    # HuggingFaceH4/ultrafeedback_binarized: `prompt` is text, `chosen`/`rejected` repeat it as the user turn.
    row = {"prompt": "hi", "chosen": [user("hi"), assistant("hello")], "rejected": [user("hi"), assistant("go away")],
           "score_chosen": 8.0, "score_rejected": 2.0}
    assert only([row], "comparison") == [Comparison("User: hi\nAssistant:", " hello\n", " go away\n")]
    # A text prompt with replies as messages is one user turn.
    row = {"prompt": "hi", "chosen": [assistant("hello")], "rejected": [assistant("go away")]}
    assert only([row], "comparison") == [Comparison("User: hi\nAssistant:", " hello\n", " go away\n")]
    row = {"prompt": "hi", "completion": [assistant("hello")]}
    assert only([row], "demonstration") == [Demonstration("User: hi\nAssistant:", " hello\n")]
    with pytest.raises(DataError, match=r"<rows>:1: field 'prompt': is not a user message of the 'chosen' dialogue"):
        normalize_rows([{"prompt": "bye", "chosen": [user("hi"), assistant("a")],
                         "rejected": [user("hi"), assistant("b")]}], "comparison")
    # One row's responses are all text or all messages: a template would render only some of them.
    with pytest.raises(DataError, match=r"field 'rejected': is messages, but the row's other responses are text"):
        normalize_rows([{"prompt": "hi", "chosen": "a", "rejected": [assistant("b")]}], "comparison")
    with pytest.raises(DataError, match=r"field 'rejected': is text, but the row's other responses are messages"):
        normalize_rows([{"prompt": "hi", "chosen": [assistant("a")], "rejected": "b"}], "comparison")
    with pytest.raises(DataError, match=r"field 'responses': is text, but the row's other responses are messages"):
        normalize_rows([{"prompt": "hi", "responses": [[assistant("a")], "b"], "ranks": [0, 1]}], "comparison")


def test_ultrafeedback_rows_as_published_with_all_their_columns():
    """The published rows also carry ``messages`` (the chosen dialogue), ``prompt_id`` and the scores: a row with
    prompt/chosen/rejected is a comparison whatever else it carries, and its ``messages`` a demonstration."""
    row = {"prompt": "hi", "prompt_id": "abc123", "chosen": [user("hi"), assistant("hello")],
           "rejected": [user("hi"), assistant("go away")], "messages": [user("hi"), assistant("hello")],
           "score_chosen": 8.0, "score_rejected": 2.0}
    assert only([row], "comparison") == [Comparison("User: hi\nAssistant:", " hello\n", " go away\n")]
    assert only([row], "unpaired") == [Unpaired("User: hi\nAssistant:", " hello\n", True),
                                       Unpaired("User: hi\nAssistant:", " go away\n", False)]
    assert only([row], "demonstration") == [Demonstration("User: hi\nAssistant:", " hello\n")]
    with pytest.raises(DataError, match=r"field 'chosen': message 1 must be an object, got str"):
        normalize_rows([{"prompt": "hi", "chosen": ["a", "b"], "rejected": "c"}], "comparison")
    with pytest.raises(DataError, match=r"a messages row is not a comparison"):
        normalize_rows([{"messages": [user("hi"), assistant("hello")]}], "comparison")


def test_ranking_to_pairs_drops_and_counts_ties():
    pairs, ties = ranking_to_pairs(["a", "b", "c", "d"], [0, 1, 1, 2])
    assert pairs == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")]
    assert ties == 1
    # A partial order: "b" is best, "a" and "c" are tied below it.
    assert ranking_to_pairs(["a", "b", "c"], [1, 0, 1]) == ([("b", "a"), ("b", "c")], 1)


def test_an_empty_sample_is_kept_in_comparisons_and_rankings():
    (pair,) = normalize_rows([{"prompt": "p", "chosen": "a", "rejected": ""}], "comparison").records
    assert pair.rejected == ""
    ranked = normalize_rows([{"prompt": "p", "responses": ["a", ""], "ranks": [0, 1]}], "comparison").records
    assert [(r.chosen, r.rejected) for r in ranked] == [("a", "")]


def test_rankings_become_comparisons_and_ties_are_counted():
    result = normalize_rows([{"prompt": "p", "responses": ["a", "b", "c", "d"], "ranks": [0, 1, 1, 2]}], "comparison")
    assert len(result.records) == 5 and result.ties == 1
    assert result.records[0] == Comparison("p", "a", "b")


def test_unpaired_rows_accept_bools_and_0_or_1():
    rows = [
        {"prompt": "p", "completion": " yes", "label": True},
        {"prompt": "p", "completion": " no", "label": 0},
    ]
    assert only(rows, "unpaired") == [Unpaired("p", " yes", True), Unpaired("p", " no", False)]


def test_paired_rows_become_one_desirable_and_one_undesirable_unpaired_row():
    assert only([{"prompt": "p", "chosen": " good", "rejected": " bad"}], "unpaired") == [
        Unpaired("p", " good", True),
        Unpaired("p", " bad", False),
    ]


@pytest.mark.parametrize(
    "row, prompt",
    [
        ({"prompt": "p"}, "p"),
        ({"prompt": "p", "completion": " c"}, "p"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, "p"),
        ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, 0]}, "p"),
        ({"chosen": "I like cats", "rejected": "I like cows"}, "I like"),
        ({"messages": [user("hi"), assistant("hello")]}, "User: hi\nAssistant:"),
        ({"messages": [user("hi")]}, "User: hi\nAssistant:"),
    ],
)
def test_prompts_come_from_any_format(row, prompt):
    assert only([row], "prompt") == [PromptRecord(prompt)]


# --- bad rows ----------------------------------------------------------------------------------------------------

GOOD_ROWS = {
    "comparison": {"prompt": "p", "chosen": "a", "rejected": "b"},
    "demonstration": {"prompt": "p", "completion": "c"},
    "unpaired": {"prompt": "p", "completion": "c", "label": True},
}

BAD_ROWS = [
    ("missing field", {"prompt": "p", "chosen": "a"}, "comparison", "rejected", "required but missing"),
    ("wrong type", {"prompt": "p", "chosen": 3, "rejected": "b"}, "comparison", "chosen",
     "must be a string or a list of messages, got int"),
    ("empty text", {"prompt": "p", "completion": " "}, "demonstration", "completion", "must not be empty"),
    ("identical", {"prompt": "p", "chosen": "a", "rejected": "a"}, "comparison", "rejected", "identical to 'chosen'"),
    ("message not a dict", {"messages": ["hi"]}, "demonstration", "messages", "message 1 must be an object, got str"),
    ("message without role", {"messages": [{"content": "x"}]}, "demonstration", "messages", "has no 'role'"),
    ("unknown role", {"messages": [{"role": "bot", "content": "x"}]}, "demonstration", "messages",
     "unknown role 'bot'"),
    ("last not assistant", {"messages": [user("hi")]}, "demonstration", "messages",
     "the last message must be the assistant's, got role 'user'"),
    ("label not a bool", {"prompt": "p", "completion": "c", "label": "yes"}, "unpaired", "label",
     "must be true/false (or 1/0), got 'yes'"),
    ("ranks length", {"prompt": "p", "responses": ["a", "b"], "ranks": [0]}, "comparison", "ranks",
     "has 1 entries for 2 responses"),
    ("margin not a number", {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "comparison",
     "margin", "must be a finite number"),
    ("unknown format", {"question": "q"}, "comparison", None,
     "no recognised fields; found keys ['question'] — expected one of"),
    ("format of another kind", {"prompt": "p"}, "demonstration", None, "a prompt row is not a demonstration row"),
    ("not an unpaired row", {"prompt": "p"}, "unpaired", None, "a prompt row is not an unpaired row; expected"),
]


@pytest.mark.parametrize("row, kind, field, what", [case[1:] for case in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_bad_rows_are_named_by_file_row_and_field(tmp_path, row, kind, field, what):
    file = tmp_path / "rows.jsonl"
    file.write_text(json.dumps(GOOD_ROWS[kind]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as caught:
        normalize_rows(read_rows(str(file)), kind)
    message = str(caught.value)
    where = f"{file}:2: " + (f"field '{field}': " if field else "")
    assert message.startswith(where) and what in message and "\n" not in message


def test_skip_leaves_bad_rows_out_and_counts_them_by_reason():
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "a"},
        {"prompt": "p", "chosen": "a"},
        {"prompt": "q", "chosen": "a"},
        {"other": 1},
    ]
    result = normalize_rows(rows, "comparison", on_bad_row="skip")
    assert result.records == [Comparison("p", "a", "b")]
    assert result.skipped == Counter(
        {"field 'rejected': identical to chosen": 1, "field 'rejected': missing": 2, "wrong format": 1}
    )
    assert result.skipped_rows == 4 and result.rows == 5


def test_an_empty_system_message_is_rendered_as_the_template_renders_it():
    row = {"messages": [{"role": "system", "content": ""}, user("hi"), assistant("hello")]}
    (record,) = normalize_rows([row], "demonstration").records
    assert record == Demonstration("System: \nUser: hi\nAssistant:", " hello\n")


def test_an_empty_message_stops_the_run_naming_row_message_and_role(tmp_path):
    file = tmp_path / "chats.jsonl"
    rows = [{"messages": [user("hi"), assistant("hello")]}, {"messages": [user(""), assistant("hello")]}]
    file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=rf"^{file}:2: field 'messages': message 1 \(user\): content is empty "
                                        r"\(on_bad_row: skip drops it where the conversation stays valid\)$"):
        normalize_rows(read_rows(str(file)), "demonstration")


def test_skip_drops_an_empty_message_where_the_conversation_stays_valid_and_names_the_first_row():
    rows = [
        {"messages": [user("hi"), assistant("hello")]},
        # the empty user turn goes, leaving user → assistant
        {"messages": [user("a"), user(" "), assistant("b")]},
        # dropping it would join two assistant turns: the whole row goes
        {"messages": [user("a"), assistant("b"), user(""), assistant("c")]},
        # an empty answer to learn from: the row goes, named by its reason
        {"messages": [user("a"), assistant("")]},
        {"messages": [user("x"), assistant("y"), user("z"), assistant("")]},
    ]
    result = normalize_rows(rows, "demonstration", source="chats.jsonl", on_bad_row="skip")
    assert [record.completion for record in result.records] == [" hello\n", " b\n"]
    assert result.dropped_messages == Counter({"field 'messages': empty user message": 1})
    assert result.skipped == Counter({"field 'messages': empty user message": 1,
                                      "field 'messages': empty assistant message": 2})
    assert result.problems("chats.jsonl") == [
        "chats.jsonl: skipped 3 of 5 rows: field 'messages': empty assistant message (2, first at chats.jsonl:4), "
        "field 'messages': empty user message (1, first at chats.jsonl:3)",
        "chats.jsonl: dropped 1 messages: field 'messages': empty user message (1, first at chats.jsonl:2)",
    ]
    assert normalize_rows(rows[:1], "demonstration", on_bad_row="skip").problems("chats.jsonl") == []


def test_an_empty_sampled_answer_in_a_message_response_is_kept():
    row = {"prompt": [user("q")], "chosen": [assistant("good")], "rejected": [assistant("")]}
    (record,) = normalize_rows([row], "comparison").records
    assert record.chosen == " good\n" and record.rejected == " \n"


# --- sources -----------------------------------------------------------------------------------------------------

DEMOS = [
    {"prompt": "p1", "completion": " c1"},
    {"prompt": "p2", "completion": ""},
    {"prompt": "p3", "completion": " c3"},
]


def demonstrations(path: Path) -> list[Demonstration]:
    return normalize_rows(read_rows(str(path)), "demonstration", on_bad_row="skip").records


def test_jsonl_reports_an_invalid_line_by_its_line_number(tmp_path):
    file = tmp_path / "demos.jsonl"
    file.write_text('{"text": "one"}\n\n{"text": "two"\n{"text": "three"}\n')
    with pytest.raises(DataError, match=rf"^{file}:3: invalid JSON: "):
        normalize_rows(read_rows(str(file)), "demonstration")
    result = normalize_rows(read_rows(str(file)), "demonstration", on_bad_row="skip")
    assert [r.completion for r in result.records] == ["one", "three"]
    assert result.skipped == Counter({"invalid JSON": 1})


def test_jsonl_rows_that_are_not_objects_are_rejected(tmp_path):
    file = tmp_path / "demos.jsonl"
    file.write_text('{"text": "one"}\n[1, 2]\n')
    with pytest.raises(DataError, match=rf"^{file}:2: a row must be an object, got list$"):
        normalize_rows(read_rows(str(file)), "demonstration")


@pytest.mark.parametrize("layout", ["list", "data", "lines"])
def test_json_files(tmp_path, layout):
    file = tmp_path / "demos.json"
    if layout == "lines":
        file.write_text("".join(json.dumps(row) + "\n" for row in DEMOS))
    else:
        file.write_text(json.dumps(DEMOS if layout == "list" else {"data": DEMOS}))
    with pytest.raises(DataError, match=rf"^{file}:2: field 'completion': must not be empty$"):
        normalize_rows(read_rows(str(file)), "demonstration")
    assert demonstrations(file) == [Demonstration("p1", " c1"), Demonstration("p3", " c3")]


def test_csv_keeps_text_as_text_and_names_the_row(tmp_path):
    file = tmp_path / "demos.csv"
    file.write_text('prompt,completion,label\n42,"a, b",true\np2,,0\n')
    assert next(read_rows(str(file))) == (str(file), 1, {"prompt": "42", "completion": "a, b", "label": True})
    with pytest.raises(DataError, match=rf"^{file}:2: field 'completion': must not be empty$"):
        normalize_rows(read_rows(str(file)), "unpaired")


def test_parquet_names_the_row(tmp_path):
    file = tmp_path / "demos.parquet"
    pd.DataFrame(DEMOS).to_parquet(file)
    with pytest.raises(DataError, match=rf"^{file}:2: field 'completion': must not be empty$"):
        normalize_rows(read_rows(str(file)), "demonstration")
    assert demonstrations(file) == [Demonstration("p1", " c1"), Demonstration("p3", " c3")]


def test_a_folder_reads_its_files_sorted_and_names_each_file(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "two"}\n{"text": 2}\n')
    (tmp_path / "a").mkdir()
    pd.DataFrame([{"text": "one"}]).to_parquet(tmp_path / "a" / "part.parquet")
    (tmp_path / ".hidden.jsonl").write_text("not json\n")
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'b.jsonl'}:2: field 'text': must be a string, got int$"):
        normalize_rows(read_rows(str(tmp_path)), "demonstration")
    assert [r.completion for r in demonstrations(tmp_path)] == ["one", "two"]


def test_a_folder_of_split_files_reads_only_the_requested_split(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "train row"}\n')
    (tmp_path / "test.jsonl").write_text('{"text": "test row"}\n')
    assert [row["text"] for _, _, row in read_rows(str(tmp_path), split="test")] == ["test row"]
    assert [row["text"] for _, _, row in read_rows(str(tmp_path))] == ["train row"]
    with pytest.raises(DataError, match=r"no files for split 'validation'"):
        list(read_rows(str(tmp_path), split="validation"))


def test_splits_named_as_on_the_hub_are_told_apart_and_their_shards_read_together(tmp_path):
    """ultrafeedback_binarized's layout: data/<split>-NNNNN-of-NNNNN.parquet, splits train_prefs, train_sft, ..."""
    (tmp_path / "data").mkdir()
    for name in ("train_prefs-00000-of-00002", "train_prefs-00001-of-00002", "train_sft-00000-of-00001",
                 "test_prefs-00000-of-00001"):
        (tmp_path / "data" / f"{name}.jsonl").write_text(json.dumps({"text": name}) + "\n")
    texts = [row["text"] for _, _, row in read_rows(str(tmp_path), split="train_prefs")]
    assert texts == ["train_prefs-00000-of-00002", "train_prefs-00001-of-00002"]
    message = r"no files for split 'train' \(its files are named for the splits \['test_prefs', 'train_prefs', 'trai"
    with pytest.raises(DataError, match=message):
        list(read_rows(str(tmp_path)))  # train_prefs and train_sft are not mixed as "train"
    (tmp_path / "shards").mkdir()
    for shard in (1, 2):
        (tmp_path / "shards" / f"train_{shard}.jsonl").write_text(json.dumps({"text": f"shard {shard}"}) + "\n")
    assert [row["text"] for _, _, row in read_rows(str(tmp_path / "shards"))] == ["shard 1", "shard 2"]


def test_a_folder_of_different_datasets_asks_for_one_file(tmp_path):
    for name in ("demonstrations", "prompts", "eval_prompts"):  # as `lit-rlhf world --out` writes
        (tmp_path / f"{name}.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    message = (r"no files for split 'train' \(its files are named for the splits \['eval_prompts'\]; pick one with "
               r"data.split\); the others "
               r"\(demonstrations.jsonl, prompts.jsonl\) name no split: point data.path at one file$")
    with pytest.raises(DataError, match=message):
        list(read_rows(str(tmp_path)))


def test_save_to_disk_folders_load(tmp_path):
    datasets.Dataset.from_list(DEMOS[:1]).save_to_disk(str(tmp_path / "single"))
    assert demonstrations(tmp_path / "single") == [Demonstration("p1", " c1")]
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(DEMOS[:1]), "test": datasets.Dataset.from_list(DEMOS[2:])}
    )
    splits.save_to_disk(str(tmp_path / "splits"))
    assert list(read_rows(str(tmp_path / "splits"), split="test")) == [(f"{tmp_path / 'splits'}[test]", 1, DEMOS[2])]
    with pytest.raises(DataError, match=r"no split 'train_prefs' \(it has \['test', 'train'\]; pick one with data"):
        list(read_rows(str(tmp_path / "splits"), split="train_prefs"))


def test_missing_paths_and_unknown_names_are_data_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"^dataset not found: .*missing\.jsonl \(no such file or folder\)$"):
        list(read_rows(str(tmp_path / "missing.jsonl")))
    with pytest.raises(DataError, match=r"^dataset not found: no-such-org/nothing \(no such file or folder, and not"):
        list(read_rows("no-such-org/nothing"))
