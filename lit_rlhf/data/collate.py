"""Tokenisation and padding: the one place where records become token ids and batches.

A sequence is ``prompt_ids + completion_ids + [eos]``, prompt and completion tokenised separately without
special tokens, so the boundary between them is exact whatever the tokenizer merges. Truncation first cuts the
prompt to ``max_prompt_length`` from the **left** (its end, next to the response, is what matters), then cuts
the response so that the whole is at most ``max_length``, keeping its **start**; a cut response loses its EOS,
so the model is never taught to stop where the text did not, and so does a sample that ran out of
``max_new_tokens`` (a record's ``ended`` false).

A demonstration whose earlier assistant turns are trained too (``Demonstration.prompt_segments``) has for its
prompt the context before its **first** assistant turn; from that turn on, everything is its response: each turn,
the user turns and template text between them, the last turn and its EOS, each segment tokenised on its own.
So the same rule holds: the first context is cut from the left to ``max_prompt_length``, the rest at
``max_length`` from the right, keeping at least the first turn's start; a turn that is cut loses its end-of-turn
token, and the turns past the cut are gone. Whitespace a template writes after an earlier turn's EOS (ChatML's
newline after ``<|im_end|>``) stays in the sequence as context, as it is dropped after the last turn.

Masks are int64 0/1 over input positions, like Hugging Face's ``attention_mask``. ``response_mask[b, t]`` is 1
where ``input_ids[b, t]`` is a response token (the EOS included), in a multi-turn demonstration a token of any
assistant turn (0 on the user turns and the template text between them): with logits shifted by one, score
``logits[:, :-1]`` against ``input_ids[:, 1:]`` under ``response_mask[:, 1:]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.formats import Comparison, Demonstration, PromptRecord, Unpaired
from lit_rlhf.errors import ConfigError
from lit_rlhf.models.shared_prompts import SharedPrompts

Example = dict[str, Any]
"""One tokenised record: ``prompt_ids`` and, where there is a response, ``response_ids`` (or ``chosen_ids`` and
``rejected_ids``) already truncated, plus the texts; a demonstration's ``response_mask`` marks which of its
``response_ids`` are trained on."""


def pad_right(
    seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad on the right to ``length`` (default: the longest) → ``(ids, attention_mask)``, both int64 [B, T]."""
    return _pad(seqs, pad_id, length, left=False)


def pad_left(
    seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad on the left (for generation: every prompt ends at the last column) → ``(ids, attention_mask)``."""
    return _pad(seqs, pad_id, length, left=True)


def _pad(
    seqs: Sequence[Sequence[int]], pad_id: int, length: int | None, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max((len(seq) for seq in seqs), default=0)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"cannot pad a sequence of {longest} tokens to length {length}")
    padding = [[pad_id] * (length - len(seq)) for seq in seqs]
    ids = torch.tensor([[*pad, *seq] if left else [*seq, *pad] for seq, pad in zip(seqs, padding)], dtype=torch.long)
    lengths = torch.tensor([len(seq) for seq in seqs], dtype=torch.long).unsqueeze(1)
    positions = torch.arange(length)
    mask = (positions >= length - lengths) if left else (positions < lengths)
    return ids.reshape(len(seqs), length), mask.long()


def check_lengths(max_length: int, max_prompt_length: int, with_response: bool = True) -> None:
    """Fail early on limits that leave no room for a response (``with_response``; prompts alone need none)."""
    if max_prompt_length < 1:
        raise ConfigError(f"max_prompt_length must be at least 1, got {max_prompt_length}")
    if with_response and max_length <= max_prompt_length:
        raise ConfigError(
            f"max_length ({max_length}) must be larger than max_prompt_length ({max_prompt_length}) "
            "to leave room for a response"
        )


# --- tokenisation ------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    examples: list[Example]
    truncated_rows: int
    """Records whose prompt or response was cut."""


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt_length: int
) -> tuple[list[list[int]], list[bool]]:
    """Prompt ids cut from the left to ``max_prompt_length``, and which were cut. A tokenizer that starts every
    text with BOS (Llama's, Gemma's: the models were pretrained so) has one in front of each prompt, kept through the
    cut; a prompt that brings its own (a chat template that writes it) is not given a second."""
    bos = _bos_of(tokenizer)
    ids = _tokenize(tokenizer, prompts)
    if bos is None:
        return [seq[-max_prompt_length:] for seq in ids], [len(seq) > max_prompt_length for seq in ids]
    bodies = [seq[1:] if seq[:1] == [bos] else seq for seq in ids]
    room = max_prompt_length - 1
    return [[bos, *body[len(body) - room:]] if room else [bos] for body in bodies], [len(b) > room for b in bodies]


def _bos_of(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS token a tokenizer puts before every text it encodes with its special tokens, if it does."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None


def _response_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    completions: Sequence[str],
    max_length: int,
    finished: Sequence[bool],
) -> tuple[list[list[int]], list[bool]]:
    """``completion + [eos]`` cut at the end to fit after each prompt within ``max_length``, and which were cut.
    A completion that already ends with EOS (a chat template that writes it, perhaps with a newline after: Qwen,
    Zephyr) ends there, without a second one. A completion marked not ``finished`` (a sample that ran out of
    ``max_new_tokens``) gets no EOS: it is scored as the unfinished text it is."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end responses with")
    texts = [c.rstrip() if c.rstrip().endswith(tokenizer.eos_token) else c for c in completions]
    full = [
        seq if seq[-1:] == [eos] or not ends else seq + [eos]
        for seq, ends in zip(_tokenize(tokenizer, texts), finished, strict=True)
    ]
    budgets = [max_length - len(prompt) for prompt in prompt_ids]
    cut = [len(seq) > budget for seq, budget in zip(full, budgets)]
    return [seq[:budget] for seq, budget in zip(full, budgets)], cut


def tokenize_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts ready for generation, cut from the left and left-padded → ``(ids, attention_mask)``."""
    ids, _ = _prompt_ids(tokenizer, prompts, max_prompt_length)
    return pad_left(ids, tokenizer.pad_token_id)


def encode_demonstrations(
    records: Sequence[Demonstration],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int,
) -> Encoded:
    """Demonstrations as ``prompt_ids``, ``response_ids`` and the ``response_mask`` of the trained response
    tokens (all of them but a multi-turn demonstration's user turns and template text, see the module docstring);
    a completion that did not end gets no EOS (see :func:`_response_ids`)."""
    check_lengths(max_length, max_prompt_length)
    first_contexts = [record.prompt_segments[0] if record.prompt_segments else record.prompt for record in records]
    prompt_ids, prompt_cut = _prompt_ids(tokenizer, first_contexts, max_prompt_length)
    earlier_ids, earlier_masks = _earlier_turns(tokenizer, [record.prompt_segments[1:] for record in records])
    rooms = [max_length - len(prompt) for prompt in prompt_ids]
    earlier_cut = [len(ids) > room for ids, room in zip(earlier_ids, rooms)]
    earlier_ids = [ids[:room] for ids, room in zip(earlier_ids, rooms)]
    earlier_masks = [mask[:room] for mask, room in zip(earlier_masks, rooms)]
    before_last = [prompt + earlier for prompt, earlier in zip(prompt_ids, earlier_ids)]
    last_ids, last_cut = _response_ids(
        tokenizer, before_last, [record.completion for record in records], max_length,
        [record.ended for record in records],
    )
    examples = [
        {
            "prompt_ids": prompt,
            "response_ids": earlier + last,
            "response_mask": earlier_mask + [1] * len(last),
            "prompt": record.prompt,
        }
        for record, prompt, earlier, earlier_mask, last in zip(
            records, prompt_ids, earlier_ids, earlier_masks, last_ids
        )
    ]
    return Encoded(examples, sum(map(any, zip(prompt_cut, earlier_cut, last_cut))))


def _earlier_turns(
    tokenizer: PreTrainedTokenizerBase, segments: Sequence[Sequence[str]]
) -> tuple[list[list[int]], list[list[int]]]:
    """Each demonstration's earlier assistant turns with the context after each (``segments``: turn, context, turn,
    context, ...), as ids and a mask that is 1 on the turns' tokens."""
    pieces = [_move_whitespace_after_eos(texts, tokenizer.eos_token) for texts in segments]
    piece_ids = iter(_tokenize(tokenizer, [piece for texts in pieces for piece in texts]))
    ids, masks = [], []
    for texts in pieces:
        row_ids, row_mask = [], []
        for position in range(len(texts)):
            piece = next(piece_ids)
            row_ids += piece
            row_mask += [int(position % 2 == 0)] * len(piece)
        ids.append(row_ids)
        masks.append(row_mask)
    return ids, masks


def _move_whitespace_after_eos(segments: Sequence[str], eos_token: str | None) -> list[str]:
    """``segments`` (turn, context, ...) with the whitespace after a turn's EOS moved into the context after it:
    the turn is learnt up to its EOS, as the last turn is (see :func:`_response_ids`)."""
    pieces = list(segments)
    for turn in range(0, len(pieces), 2):
        ended = pieces[turn].rstrip()
        if eos_token is not None and ended.endswith(eos_token):
            pieces[turn], pieces[turn + 1] = ended, pieces[turn][len(ended) :] + pieces[turn + 1]
    return pieces


def encode_comparisons(
    records: Sequence[Comparison], tokenizer: PreTrainedTokenizerBase, max_length: int, max_prompt_length: int
) -> Encoded:
    check_lengths(max_length, max_prompt_length)
    prompt_ids, prompt_cut = _prompt_ids(tokenizer, [record.prompt for record in records], max_prompt_length)
    chosen_ids, chosen_cut = _response_ids(
        tokenizer, prompt_ids, [record.chosen for record in records], max_length,
        [record.chosen_ended for record in records],
    )
    rejected_ids, rejected_cut = _response_ids(
        tokenizer, prompt_ids, [record.rejected for record in records], max_length,
        [record.rejected_ended for record in records],
    )
    examples = [
        {
            "prompt_ids": prompt,
            "chosen_ids": chosen,
            "rejected_ids": rejected,
            "margin": record.margin,
            "prompt": record.prompt,
            "chosen": record.chosen,
            "rejected": record.rejected,
        }
        for record, prompt, chosen, rejected in zip(records, prompt_ids, chosen_ids, rejected_ids)
    ]
    return Encoded(examples, sum(map(any, zip(prompt_cut, chosen_cut, rejected_cut))))


def encode_prompts(
    records: Sequence[PromptRecord], tokenizer: PreTrainedTokenizerBase, max_prompt_length: int
) -> Encoded:
    prompt_ids, prompt_cut = _prompt_ids(tokenizer, [record.prompt for record in records], max_prompt_length)
    examples = [{"prompt_ids": prompt, "prompt": record.prompt} for record, prompt in zip(records, prompt_ids)]
    return Encoded(examples, sum(prompt_cut))


def encode_unpaired(
    records: Sequence[Unpaired], tokenizer: PreTrainedTokenizerBase, max_length: int, max_prompt_length: int
) -> Encoded:
    check_lengths(max_length, max_prompt_length)
    prompt_ids, prompt_cut = _prompt_ids(tokenizer, [record.prompt for record in records], max_prompt_length)
    response_ids, response_cut = _response_ids(
        tokenizer, prompt_ids, [record.completion for record in records], max_length,
        [record.ended for record in records],
    )
    examples = [
        {
            "prompt_ids": prompt,
            "response_ids": response,
            "label": record.label,
            "prompt": record.prompt,
            "completion": record.completion,
        }
        for record, prompt, response in zip(records, prompt_ids, response_ids)
    ]
    return Encoded(examples, sum(map(any, zip(prompt_cut, response_cut))))


# --- batches -----------------------------------------------------------------------------------------------------


def padded_length(example: Example | Sequence[Example]) -> int:
    """The columns an example fills in a batch: its prompt and its longest response (a prompt-grouped example, a
    list of pairs, its longest pair)."""
    if isinstance(example, list):
        return max(map(padded_length, example))
    responses = (len(example[key]) for key in ("response_ids", "chosen_ids", "rejected_ids") if key in example)
    return len(example["prompt_ids"]) + max(responses, default=0)


def _sequences(
    prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + response`` → ``(input_ids, attention_mask, response_mask)``."""
    input_ids, attention_mask = pad_right([p + r for p, r in zip(prompts, responses)], pad_id, length)
    positions = torch.arange(input_ids.shape[1])
    starts = torch.tensor([len(p) for p in prompts], dtype=torch.long).unsqueeze(1)
    ends = starts + torch.tensor([len(r) for r in responses], dtype=torch.long).unsqueeze(1)
    response_mask = ((positions >= starts) & (positions < ends)).long()
    return input_ids, attention_mask, response_mask


def collate_demonstrations(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """``input_ids``, ``attention_mask``, ``response_mask`` [B, T]; ``prompt`` texts."""
    input_ids, attention_mask = pad_right([e["prompt_ids"] + e["response_ids"] for e in examples], pad_id)
    response_mask, _ = pad_right(
        [[0] * len(e["prompt_ids"]) + e["response_mask"] for e in examples], 0, input_ids.shape[1]
    )
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "prompt": [e["prompt"] for e in examples],
    }


def collate_comparisons(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """``chosen_*`` and ``rejected_*`` ``input_ids`` / ``attention_mask`` / ``response_mask``, all [B, T] with
    ONE common T so that a phase can ``torch.cat`` them for a single forward; the same pairs as ``shared_prompts``
    (:func:`shared_prompts`) with ``chosen_row`` and ``rejected_row`` [B], each pair's rows of its responses;
    ``margin`` float [B] (0.0 where absent) and ``has_margin`` bool [B]; ``prompt``, ``chosen``, ``rejected``
    texts."""
    prompts = [e["prompt_ids"] for e in examples]
    length = max(map(padded_length, examples))
    batch: dict[str, Any] = {}
    for side in ("chosen", "rejected"):
        input_ids, attention_mask, response_mask = _sequences(
            prompts, [e[f"{side}_ids"] for e in examples], pad_id, length
        )
        batch[f"{side}_input_ids"] = input_ids
        batch[f"{side}_attention_mask"] = attention_mask
        batch[f"{side}_response_mask"] = response_mask
    batch["shared_prompts"], rows = shared_prompts(
        prompts + prompts, [e[f"{side}_ids"] for side in ("chosen", "rejected") for e in examples], pad_id
    )
    batch["chosen_row"], batch["rejected_row"] = rows.chunk(2)
    batch["margin"] = torch.tensor([e["margin"] or 0.0 for e in examples], dtype=torch.float)
    batch["has_margin"] = torch.tensor([e["margin"] is not None for e in examples], dtype=torch.bool)
    for text in ("prompt", "chosen", "rejected"):
        batch[text] = [e[text] for e in examples]
    return batch


def shared_prompts(
    prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int
) -> tuple[SharedPrompts, torch.Tensor]:
    """``responses`` after their ``prompts`` (one each), laid out to share them
    (:class:`~lit_rlhf.models.SharedPrompts`): each distinct prompt, and each distinct response to it, once. Also
    the row of each of ``responses`` in that layout [N]."""
    prompt_rows: dict[tuple[int, ...], int] = {}
    response_rows: dict[tuple[int, tuple[int, ...]], int] = {}
    rows = []
    for prompt_tokens, response in zip(prompts, responses, strict=True):
        prompt = prompt_rows.setdefault(tuple(prompt_tokens), len(prompt_rows))
        rows.append(response_rows.setdefault((prompt, tuple(response)), len(response_rows)))
    prompt_ids, prompt_mask = pad_left([list(prompt) for prompt in prompt_rows], pad_id)
    response_ids, response_mask = pad_right([list(response) for _, response in response_rows], pad_id)
    prompt_of = torch.tensor([prompt for prompt, _ in response_rows], dtype=torch.long)
    return SharedPrompts(prompt_ids, prompt_mask, response_ids, response_mask, prompt_of), torch.tensor(rows)


def collate_comparison_groups(groups: Sequence[Sequence[Example]], pad_id: int) -> dict[str, Any]:
    """Every pair of every group (one prompt's comparisons) in one :func:`collate_comparisons` batch."""
    return collate_comparisons([example for group in groups for example in group], pad_id)


def collate_prompts(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """``prompt_input_ids``, ``prompt_attention_mask`` [B, T] **left**-padded for generation; ``prompt`` texts."""
    prompt_input_ids, prompt_attention_mask = pad_left([e["prompt_ids"] for e in examples], pad_id)
    return {
        "prompt_input_ids": prompt_input_ids,
        "prompt_attention_mask": prompt_attention_mask,
        "prompt": [e["prompt"] for e in examples],
    }


def collate_unpaired(examples: Sequence[Example], pad_id: int, max_length: int) -> dict[str, Any]:
    """``input_ids``, ``attention_mask``, ``response_mask`` [B, T], ``label`` bool [B]; and ``kl_input_ids``,
    ``kl_attention_mask``, ``kl_response_mask``: prompt i with the completion of the next row (cyclically) that has
    another prompt, the mismatched pairs KTO estimates its KL reference point from (Ethayarajh et al. 2024).
    Skipping rows of the same prompt matters where rows come grouped by prompt (validation, unshuffled, or paired
    data split into a desirable and an undesirable row): the next row's completion would answer the same prompt.
    Only when every row has one prompt (a batch of one too) is a row paired with the next row anyway. ``prompt``
    and ``completion`` texts."""
    prompts = [e["prompt_ids"] for e in examples]
    responses = [e["response_ids"] for e in examples]
    input_ids, attention_mask, response_mask = _sequences(prompts, responses, pad_id)
    rows = len(examples)
    partners = [
        next((j % rows for j in range(i + 1, i + rows) if prompts[j % rows] != prompts[i]), (i + 1) % rows)
        for i in range(rows)
    ]
    shifted = [responses[partner] for partner in partners]
    kl_responses = [response[: max_length - len(prompt)] for prompt, response in zip(prompts, shifted)]
    kl_input_ids, kl_attention_mask, kl_response_mask = _sequences(prompts, kl_responses, pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "label": torch.tensor([e["label"] for e in examples], dtype=torch.bool),
        "kl_input_ids": kl_input_ids,
        "kl_attention_mask": kl_attention_mask,
        "kl_response_mask": kl_response_mask,
        "prompt": [e["prompt"] for e in examples],
        "completion": [e["completion"] for e in examples],
    }
