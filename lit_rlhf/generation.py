"""The one generation function (:func:`generate`) and the record of what it produced.

SFT evaluation, comparison collection, PPO rollouts, rejection sampling and SPIN all sample through
:func:`generate`, so decoding settings mean the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from lit_rlhf.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings, one group wherever a phase samples (``--model.sampling.temperature``).

    Args:
        max_new_tokens: answer length limit, in tokens
        temperature: softmax temperature; 0 decodes greedily
        top_k: sample among the k likeliest tokens only; 0 keeps them all
        top_p: sample within the smallest set of tokens holding this much probability; 1 keeps them all
    """

    max_new_tokens: int = 24
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (self.max_new_tokens > 0 and self.temperature >= 0 and self.top_k >= 0 and 0 < self.top_p <= 1):
            raise ConfigError("sampling: max_new_tokens must be positive, temperature and top_k not negative and "
                              f"top_p in (0, 1]; got {self}")

    def to_generation_config(self, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
        sampling = self.temperature > 0
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=sampling,
            temperature=self.temperature if sampling else None,
            top_k=self.top_k if sampling else None,
            top_p=self.top_p if sampling else None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )


@dataclass
class Generation:
    """Prompts (left-padded) and the sampled responses (right-padded, EOS included when produced)."""

    prompt_input_ids: torch.Tensor
    prompt_attention_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended_with_eos: torch.Tensor
    """Whether each response stopped on EOS rather than running out of ``max_new_tokens``."""

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_input_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_attention_mask, self.response_mask], dim=1)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)

    def decode(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """Response texts without special tokens or padding, and otherwise exactly as decoded: a byte-level BPE or
        SentencePiece response keeps its leading space, so that tokenising it again gives back the sampled tokens
        (stripped, collected comparisons and SPIN's pairs would hold texts the policy never produced)."""
        ids = self.response_ids.masked_fill(self.response_mask == 0, tokenizer.pad_token_id)
        return tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


class Response(NamedTuple):
    """One decoded sample and whether it ended on EOS (``False``: cut at ``max_new_tokens``), which scorers read."""

    text: str
    ended: bool


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 on generated tokens up to and including the first EOS; what follows is padding ``generate`` wrote."""
    is_eos = (response_ids == eos_token_id).long()
    eos_seen_before = (is_eos.cumsum(dim=1) - is_eos) > 0
    return (~eos_seen_before).long()


@contextmanager
def _without_saved_generation_settings(model: torch.nn.Module) -> Iterator[None]:
    """``generate`` fills every setting the given config leaves unset from the model's saved ``generation_config``
    (an instruct model's ``repetition_penalty``, ``min_p``, ``no_repeat_ngram_size``…), which would sample from
    another distribution than the one PPO's log-probs (logits / T) describe. Every wrapped model's saved settings
    are set aside while sampling, so only :class:`SamplingConfig` shapes the distribution."""
    saved = [(module, module.generation_config) for module in model.modules()
             if isinstance(getattr(module, "generation_config", None), GenerationConfig)]
    for module, _ in saved:
        module.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for module, config in saved:
            module.generation_config = config


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_input_ids: torch.Tensor,
    prompt_attention_mask: torch.Tensor,
    sampling: SamplingConfig,
) -> Generation:
    """Sample one response per (left-padded) prompt with the KV cache, in eval mode, stopping at EOS.

    The model's train/eval mode is restored afterwards. Under FSDP every rank must call this together
    (``generate`` keeps ranks in step itself; never pass ``synced_gpus=False``).
    """
    was_training = model.training
    model.eval()
    try:
        with _without_saved_generation_settings(model):
            output = model.generate(
                input_ids=prompt_input_ids,
                attention_mask=prompt_attention_mask,
                generation_config=sampling.to_generation_config(tokenizer),
            )
    finally:
        model.train(was_training)
    response_ids = output[:, prompt_input_ids.shape[1] :]
    response_mask = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
    ended_with_eos = ((response_ids == tokenizer.eos_token_id) & (response_mask == 1)).any(dim=1)
    response_ids = response_ids.masked_fill(response_mask == 0, tokenizer.pad_token_id)
    return Generation(prompt_input_ids, prompt_attention_mask, response_ids, response_mask, ended_with_eos)
