"""The one generation function, the record of what it produced, and PPO's experience (:class:`Rollout`,
:class:`RolloutBuffer`).

SFT evaluation, comparison collection, PPO rollouts, rejection sampling and SPIN all sample through
:func:`generate`, so decoding settings mean the same thing everywhere.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, NamedTuple

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from lit_rlhf import diagnostics, losses
from lit_rlhf.data.collate import tokenize_prompts
from lit_rlhf.models import response_logprobs
from lit_rlhf.world import gold_reward, has_gold

if TYPE_CHECKING:
    from lit_rlhf.scoring import Scorer


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings. ``temperature=0`` means greedy decoding."""

    max_new_tokens: int = 24
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

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


@dataclass
class PolicyEvaluation:
    """Sampled answers to held-out prompts, what was measured on each, and the metrics computed from them."""

    prompts: list[str]
    responses: list[str]
    lengths: list[float]
    """Tokens before EOS, per answer."""
    proxy: list[float] | None = None
    """The scorer's (reward model's) score of each answer, when there is a scorer."""
    gold: list[float] | None = None
    """The world's gold reward of each answer, when every prompt is a world prompt."""
    metrics: dict[str, float] = field(default_factory=dict)


def measure_answers(
    prompts: list[str],
    responses: list[str],
    lengths: list[float],
    proxy: list[float] | None = None,
    baseline: PolicyEvaluation | None = None,
) -> PolicyEvaluation:
    """The metrics of answers to held-out prompts, whoever produced them (a policy, best-of-n).

    ``response/length_mean``; the hacking detectors of :mod:`lit_rlhf.diagnostics` (``hacking/sycophancy_rate``,
    ``hacking/format_rate``, ``hacking/repetition_rate``); given ``proxy`` scores, ``proxy/reward``; on the world,
    ``gold/reward``. Against a ``baseline`` (the reference policy's evaluation on the same prompts and sampling
    seed): ``response/length_drift`` (difference of mean lengths), ``hacking/length_ratio`` and, when both have proxy
    and gold rewards, ``gold/proxy_gap`` (:func:`lit_rlhf.diagnostics.proxy_gold_gap`).
    """
    if baseline is not None and baseline.prompts != prompts:
        raise ValueError("a baseline must answer the same prompts, in the same order")
    gold = list(map(gold_reward, prompts, responses)) if has_gold(prompts) else None
    metrics = {"response/length_mean": statistics.fmean(lengths), **diagnostics.hacking_metrics(prompts, responses)}
    if proxy is not None:
        metrics["proxy/reward"] = statistics.fmean(proxy)
    if gold is not None:
        metrics["gold/reward"] = statistics.fmean(gold)
    if baseline is not None:
        metrics["response/length_drift"] = metrics["response/length_mean"] - baseline.metrics["response/length_mean"]
        if baseline.metrics["response/length_mean"] > 0:
            metrics["hacking/length_ratio"] = diagnostics.length_ratio(lengths, baseline.lengths)
        if None not in (proxy, gold, baseline.proxy, baseline.gold):
            metrics["gold/proxy_gap"] = diagnostics.proxy_gold_gap(proxy, gold, baseline.proxy, baseline.gold)
    return PolicyEvaluation(prompts, responses, lengths, proxy, gold, metrics)


@torch.no_grad()
def evaluate_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    sampling: SamplingConfig,
    max_prompt_length: int,
    seed: int,
    batch_size: int = 64,
    reference: PreTrainedModel | None = None,
    scorer: Scorer | None = None,
    baseline: PolicyEvaluation | None = None,
) -> PolicyEvaluation:
    """Answer fixed prompts with fixed sampling noise, so successive evaluations differ only by the policy.

    Metrics: those of :func:`measure_answers` (given a ``scorer``, the reward model, its scores are the proxy
    reward; given a ``baseline``, the reference policy's own evaluation, the drift and hacking metrics against it),
    ``response/eos_fraction`` and, given a ``reference``, ``objective/kl``: the mean over samples of
    Σ_t log π − log π_ref on the sampled response tokens (the k1 estimate of KL(π‖π_ref), both models at the
    sampling temperature as in PPO). The global RNG is left untouched.
    """
    temperature = sampling.temperature or 1.0  # greedy decoding: score with the untempered distributions
    responses: list[str] = []
    lengths: list[torch.Tensor] = []
    ended: list[torch.Tensor] = []
    kls: list[torch.Tensor] = []
    device = model.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            prompt_ids, prompt_mask = tokenize_prompts(tokenizer, chunk, max_prompt_length)
            generation = generate(model, tokenizer, prompt_ids.to(device), prompt_mask.to(device), sampling)
            responses.extend(generation.decode(tokenizer))
            lengths.append(generation.response_lengths - generation.ended_with_eos.long())
            ended.append(generation.ended_with_eos)
            if reference is not None:
                prompt_zeros = torch.zeros_like(generation.prompt_attention_mask)
                response_mask = torch.cat([prompt_zeros, generation.response_mask], dim=1)
                sampled = (generation.input_ids, generation.attention_mask, response_mask)
                logps, mask = response_logprobs(model, *sampled, temperature=temperature)
                ref_logps, _ = response_logprobs(reference, *sampled, temperature=temperature)
                kls.append(losses.masked_sum(losses.kl_penalty(logps, ref_logps, "k1"), mask, dim=1))
    ended = torch.cat(ended)
    proxy = scorer.score(prompts, responses, ended.tolist()).float().tolist() if scorer is not None else None
    evaluation = measure_answers(prompts, responses, torch.cat(lengths).float().tolist(), proxy, baseline)
    evaluation.metrics["response/eos_fraction"] = ended.float().mean().item()
    if reference is not None:
        evaluation.metrics["objective/kl"] = torch.cat(kls).mean().item()
    return evaluation


@dataclass
class Rollout:
    """One batch of PPO experience.

    ``input_ids``, ``attention_mask`` and ``response_mask`` are ``[B, T]`` over input positions (prompt
    left-padded, response right-padded), ready for a forward pass. The other tensors are ``[B, T-1]``, aligned with
    :func:`lit_rlhf.models.response_logprobs`: column t is about the token at input position t+1, and ``mask`` is 1
    on response tokens. ``values`` and ``returns`` are ``None`` for critic-free estimators.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    """Log-probs under the policy that sampled the responses (PPO's π_old)."""
    advantages: torch.Tensor
    values: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout restricted to ``rows`` (indices into the batch)."""
        return Rollout(**{f.name: None if (v := getattr(self, f.name)) is None else v[rows] for f in fields(self)})


class RolloutBuffer:
    """The experience of one PPO iteration, served for several passes as shuffled minibatches.

    Each minibatch is one optimiser step, split into ``gradient_accumulation_steps`` micro-batches whose gradients
    add up (so a large minibatch fits in memory).
    """

    def __init__(self, rollout: Rollout, num_minibatches: int, gradient_accumulation_steps: int) -> None:
        if len(rollout) < num_minibatches * gradient_accumulation_steps:
            raise ValueError(
                f"a rollout of {len(rollout)} samples cannot be split into {num_minibatches} minibatches of "
                f"{gradient_accumulation_steps} micro-batches"
            )
        self.rollout = rollout
        self.num_minibatches = num_minibatches
        self.gradient_accumulation_steps = gradient_accumulation_steps

    def __len__(self) -> int:
        return len(self.rollout)

    def minibatches(self) -> Iterator[list[Rollout]]:
        """One pass: a fresh shuffle (global RNG) cut into minibatches, each a list of micro-batches."""
        order = torch.randperm(len(self.rollout))
        for minibatch in order.tensor_split(self.num_minibatches):
            yield [self.rollout.select(rows) for rows in minibatch.tensor_split(self.gradient_accumulation_steps)]
