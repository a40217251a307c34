"""DPO's log-probs: the sequences of a preference batch stacked for one forward (:func:`concatenated`), their
log-probs under a model (:func:`model_sequence_logprobs`; :func:`pair_logprobs` for a comparison batch, each prompt
computed once where the model allows), and the reference's computed before training, so that the
reference need not stay in memory: a content-addressed cache (:class:`ReferenceLogpsCache`), optionally kept in a file
for later runs with the same reference (a β sweep, say)."""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from lightning.pytorch.utilities import move_data_to_device
from transformers import PreTrainedModel

from lit_rlhf import losses
from lit_rlhf.models import model_token_logprobs, select_rows, shared_prompt_logprobs, shares_prompts
from lit_rlhf.run_folder import made_with

SEQUENCE_FIELDS = ("input_ids", "attention_mask", "response_mask")


def concatenated(batch: dict, *prefixes: str) -> dict:
    """The sequence fields of ``batch`` under each prefix, stacked along the batch for a single forward."""
    return {field: torch.cat([batch[f"{prefix}{field}"] for prefix in prefixes]) for field in SEQUENCE_FIELDS}


def model_sequence_logprobs(model: PreTrainedModel, sequences: dict, average: bool) -> tuple[torch.Tensor, ...]:
    """``(logps [B], token_logps [B, T-1], mask [B, T-1])`` of the response tokens of ``sequences``: the per-token
    log-probs of :func:`lit_rlhf.models.model_token_logprobs` and their sum (``average``: mean) per sequence,
    :func:`lit_rlhf.losses.sequence_logprobs`."""
    token_logps, mask = model_token_logprobs(model, *(sequences[field] for field in SEQUENCE_FIELDS))
    return losses.sequence_logprobs(token_logps, mask, average=average), token_logps, mask


def pair_logprobs(
    model: PreTrainedModel, batch: dict, average: bool, share_prompts: bool
) -> tuple[torch.Tensor, ...]:
    """:func:`model_sequence_logprobs` of a comparison batch's chosen then rejected responses (``[2B]``, and the
    per-token ``[2B, T]`` with their mask). With ``share_prompts``, for a model that takes a key/value cache, each
    distinct prompt and response goes through the model once (the batch's ``shared_prompts``,
    :func:`~lit_rlhf.models.shared_prompt_logprobs`): the same values up to float rounding, the per-token ones over
    the response columns only."""
    if not (share_prompts and shares_prompts(model)):
        return model_sequence_logprobs(model, concatenated(batch, "chosen_", "rejected_"), average)
    token_logps, mask = shared_prompt_logprobs(model, batch["shared_prompts"])
    rows = torch.cat([batch["chosen_row"], batch["rejected_row"]])
    token_logps, mask = select_rows(token_logps, rows), mask[rows]
    return losses.sequence_logprobs(token_logps, mask, average=average), token_logps, mask


class ReferenceLogpsCache:
    """Reference log-probs of sequences, addressed by content, optionally kept in a file between runs.

    A sequence's key hashes its tokens and which of them are response tokens: all its log-prob depends on
    besides the reference. So shuffling is harmless, and changed rows, tokenizer or length limits simply miss the
    cache and get computed. The file is tagged with ``fingerprint``, the reference's identity; a file with
    another fingerprint is ignored and overwritten.
    """

    def __init__(self, fingerprint: str, path: str | None = None) -> None:
        self.fingerprint, self.path = fingerprint, Path(path) if path else None
        self.values: dict[bytes, float] = {}
        if self.path is not None and self.path.exists():
            stored = torch.load(self.path, weights_only=True)
            if stored["fingerprint"] == fingerprint:
                self.values = dict(zip(map(bytes, stored["keys"].numpy()), stored["logps"].tolist()))

    KEY_BYTES = 16

    @classmethod
    def keys(cls, sequences: dict) -> list[bytes]:
        keys = []
        for ids, attention, response in zip(*(sequences[field].cpu() for field in SEQUENCE_FIELDS)):
            real = attention == 1
            content = ids[real].numpy().tobytes() + response[real].numpy().tobytes()
            keys.append(hashlib.blake2b(content, digest_size=cls.KEY_BYTES).digest())
        return keys

    def lookup(self, sequences: dict) -> torch.Tensor:
        try:
            return torch.tensor([self.values[key] for key in self.keys(sequences)])
        except KeyError:
            raise RuntimeError("a sequence has no precomputed reference log-prob; did the data change?") from None

    def fill(
        self, batches: Iterable[dict], load_reference: Callable[[], PreTrainedModel], device: torch.device,
        logprobs: Callable[[PreTrainedModel, dict], torch.Tensor],
    ) -> tuple[set[bytes], bool]:
        """Compute the entries the chosen and rejected sequences of ``batches`` lack, as ``logprobs(reference,
        batch)`` gives them (``[2B]``, chosen then rejected) with the reference that ``load_reference()`` gives,
        loaded only when one is missing and freed afterwards. Returns every key of ``batches`` and whether anything
        was computed."""
        reference, current_keys = None, set()
        for batch in batches:
            sequences = concatenated(batch, "chosen_", "rejected_")
            keys = self.keys(sequences)
            current_keys.update(keys)
            if all(key in self.values for key in keys):
                continue
            if reference is None:
                reference = load_reference()
            with torch.no_grad():
                self.values.update(zip(keys, logprobs(reference, move_data_to_device(batch, device)).tolist()))
        computed = reference is not None
        del reference  # out of memory before training starts
        gc.collect()
        return current_keys, computed

    def save(self, keep: set[bytes]) -> None:
        """Write the entries in ``keep`` (the current data's keys) to the file."""
        kept = [key for key in self.values if key in keep]
        keys = torch.tensor([list(key) for key in kept], dtype=torch.uint8).reshape(len(kept), self.KEY_BYTES)
        logps = torch.tensor([self.values[key] for key in kept], dtype=torch.float32)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"fingerprint": self.fingerprint, "keys": keys, "logps": logps}, self.path)


def reference_fingerprint(model_name_or_path: str, dtype: str | None, average: bool) -> str:
    """The reference's identity, hashed: its name or folder, when that was written, the dtype and averaging
    (:func:`lit_rlhf.run_folder.made_with`, the package's one test of "made with the same inputs?")."""
    folder = Path(model_name_or_path)
    name = str(folder.resolve()) if folder.is_dir() else model_name_or_path
    made = made_with({"model": name, "dtype": dtype, "average": average}, [model_name_or_path])
    return hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()
