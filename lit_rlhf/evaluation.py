"""The held-out evaluation of a policy: its answers to fixed prompts with fixed sampling noise
(:func:`evaluate_policy`) and the metrics of answers, whoever produced them (:func:`measure_answers`).

SFT, PPO and the DPO family log these metrics under ``eval/`` at every validation; the pipeline's summary has them
as columns.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_rlhf import diagnostics, losses
from lit_rlhf.data.collate import tokenize_prompts
from lit_rlhf.generation import SamplingConfig, generate
from lit_rlhf.models import model_token_logprobs

if TYPE_CHECKING:
    from lit_rlhf.scoring import Scorer


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
    """The gold reward of each answer, when there is a gold scorer (:func:`lit_rlhf.scoring.gold_scorer`)."""
    metrics: dict[str, float] = field(default_factory=dict)


def measure_answers(
    prompts: list[str],
    responses: list[str],
    lengths: list[float],
    proxy: list[float] | None = None,
    baseline: PolicyEvaluation | None = None,
    gold: list[float] | None = None,
) -> PolicyEvaluation:
    """The metrics of answers to held-out prompts, whoever produced them (a policy, best-of-n).

    ``response/length_mean``; the hacking detectors of :mod:`lit_rlhf.diagnostics` (``hacking/sycophancy_rate``,
    ``hacking/format_rate``, ``hacking/repetition_rate``); given ``proxy`` scores, ``proxy/reward``; given ``gold``
    rewards (on the world, :func:`lit_rlhf.scoring.gold_scorer`'s scores), ``gold/reward``. Against a ``baseline``
    (the reference policy's evaluation on the same prompts and sampling seed): ``response/length_drift`` (difference
    of mean lengths), ``hacking/length_ratio`` and, when both have proxy and gold rewards, ``gold/proxy_gap``
    (:func:`lit_rlhf.diagnostics.proxy_gold_gap`).
    """
    if baseline is not None and baseline.prompts != prompts:
        raise ValueError("a baseline must answer the same prompts, in the same order")
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
    gold: Scorer | None = None,
) -> PolicyEvaluation:
    """Answer fixed prompts with fixed sampling noise, so successive evaluations differ only by the policy.

    Metrics: those of :func:`measure_answers` (given a ``scorer``, the reward model, its scores are the proxy
    reward; given ``gold``, the world's :func:`lit_rlhf.scoring.gold_scorer`, its scores are the gold reward; given a
    ``baseline``, the reference policy's own evaluation, the drift and hacking metrics against it),
    ``response/eos_fraction`` and, given a ``reference``, ``objective/kl``: the mean over samples of
    Σ_t log π − log π_ref on the sampled response tokens (the k1 estimate of KL(π‖π_ref), both models at the
    sampling temperature as in PPO). The global RNG is left untouched. No prompts (data of ``text`` rows has none to
    hold out): no answers and no metrics.
    """
    if not prompts:
        return PolicyEvaluation([], [], [])
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
                logps, mask = model_token_logprobs(model, *sampled, temperature=temperature)
                ref_logps, _ = model_token_logprobs(reference, *sampled, temperature=temperature)
                kls.append(losses.masked_sum(losses.kl_penalty(logps, ref_logps, "k1"), mask, dim=1))
    ended = torch.cat(ended)
    proxy = scorer.score(prompts, responses, ended.tolist()).float().tolist() if scorer is not None else None
    gold_rewards = gold.score(prompts, responses, ended.tolist()).tolist() if gold is not None else None
    evaluation = measure_answers(prompts, responses, torch.cat(lengths).float().tolist(), proxy, baseline, gold_rewards)
    evaluation.metrics["response/eos_fraction"] = ended.float().mean().item()
    if reference is not None:
        evaluation.metrics["objective/kl"] = torch.cat(kls).mean().item()
    return evaluation
