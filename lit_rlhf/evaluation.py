"""The held-out evaluation of a policy: :class:`HeldOutEvaluator`, the one place where a policy's held-out numbers
are computed — its answers to fixed prompts with fixed sampling noise (:func:`evaluate_policy`), measured against the
reference policy's answers, whoever produced them (:func:`measure_answers`), with their standard errors; paired
differences between two policies on the same prompts (:func:`paired_differences`); and a reward model's accuracy on
pairs of held-out answers (:func:`measure_reward_model`).

SFT, PPO and the DPO family log these metrics under ``eval/`` at every validation (on development prompts); the
pipeline's summary has them as columns (on test prompts), a sweep's trials as their metric (on development prompts).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lit_rlhf import diagnostics, losses
from lit_rlhf.data.collate import tokenize_prompts
from lit_rlhf.generation import SamplingConfig, generate
from lit_rlhf.models import model_token_logprobs
from lit_rlhf.scoring import Scorer, gold_scorer
from lit_rlhf.uncertainty import Estimate, Interval, clustered_mean, paired_difference

WITH_ERRORS = ("gold/reward", "proxy/reward", "objective/kl")
"""Metrics that also get their standard error, clustered by prompt, as ``<name>_se``."""


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
    kl: list[float] | None = None
    """Each answer's Σ_t log π − log π_ref, when there is a reference."""
    ended: list[bool] | None = None
    """Whether each answer ended on EOS, when known."""

    def per_answer(self, metric: str) -> list[float] | None:
        """The per-answer values whose mean is ``metric`` (one of :data:`WITH_ERRORS`), if measured."""
        return {"gold/reward": self.gold, "proxy/reward": self.proxy, "objective/kl": self.kl}[metric]

    def estimate(self, metric: str) -> Estimate | None:
        """``metric``'s mean over the answers with its standard error clustered by prompt: answers to one prompt
        are not independent, so the prompts are the units (:func:`lit_rlhf.uncertainty.clustered_mean`)."""
        values = self.per_answer(metric)
        return clustered_mean(values, self.prompts) if values is not None else None

    def add_standard_errors(self) -> None:
        """``<metric>_se`` in :attr:`metrics` for each of :data:`WITH_ERRORS` measured, from two prompts on."""
        if len(set(self.prompts)) < 2:
            return
        for metric in WITH_ERRORS:
            if (estimate := self.estimate(metric)) is not None:
                self.metrics[f"{metric}_se"] = estimate.se


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
    rewards (on the world, :func:`lit_rlhf.scoring.gold_scorer`'s scores), ``gold/reward``; each reward's standard
    error clustered by prompt as ``<name>_se`` (from two prompts on). Against a ``baseline``
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
    evaluation = PolicyEvaluation(prompts, responses, lengths, proxy, gold, metrics)
    evaluation.add_standard_errors()
    return evaluation


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
    evaluation.ended = ended.tolist()
    evaluation.metrics["response/eos_fraction"] = ended.float().mean().item()
    if reference is not None:
        evaluation.kl = torch.cat(kls).float().tolist()
        evaluation.metrics["objective/kl"] = statistics.fmean(evaluation.kl)
        evaluation.add_standard_errors()
    return evaluation


class HeldOutEvaluator:
    """Every policy of one run measured alike: the same ``prompts`` (each repeat is one more answer), answered with
    the same ``sampling`` and noise (``seed``), scored by the proxy ``scorer`` (a reward model) and, where the prompts
    are the world's, by the gold reward; the reference policy's own answers, computed once, are the baseline that
    length drift, the length ratio and the proxy–gold gap compare against. Prompts longer than ``max_prompt_length``
    tokens are cut from the left, as the phases cut them."""

    def __init__(
        self,
        prompts: list[str],
        tokenizer: PreTrainedTokenizerBase,
        sampling: SamplingConfig,
        max_prompt_length: int,
        seed: int,
        batch_size: int = 64,
        scorer: Scorer | None = None,
    ) -> None:
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.max_prompt_length = max_prompt_length
        self.seed = seed
        self.batch_size = batch_size
        self.scorer = scorer
        self.gold = gold_scorer(prompts)
        """The world's gold reward, where the prompts are the world's; else None."""
        self._baseline: PolicyEvaluation | None = None

    def baseline(self, reference: PreTrainedModel) -> PolicyEvaluation:
        """The reference policy's own evaluation, computed at the first call (the reference does not change)."""
        if self._baseline is None:
            self._baseline = self.evaluate(reference)
        return self._baseline

    def evaluate(
        self, model: PreTrainedModel, reference: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> PolicyEvaluation:
        """``model``'s :func:`evaluate_policy`; given its ``reference``, KL to it and the metrics against its answers.
        ``tokenizer``: the model's, where it is not the evaluator's."""
        baseline = self.baseline(reference) if reference is not None else None
        return evaluate_policy(model, tokenizer or self.tokenizer, self.prompts, self.sampling, self.max_prompt_length,
                               self.seed, self.batch_size, reference, self.scorer, baseline, self.gold)


def paired_differences(a: PolicyEvaluation, b: PolicyEvaluation, metric: str) -> Interval | None:
    """``metric`` of ``a`` minus that of ``b``, both measured on the same prompts in the same order: the mean over
    prompts of each prompt's difference, with a 95 % t-interval over prompts
    (:func:`lit_rlhf.uncertainty.paired_difference`). Pairing removes what the prompts contribute to both, so a
    difference is resolved long before the two standard errors stop overlapping. None where either lacks it."""
    if a.prompts != b.prompts:
        raise ValueError("a paired difference needs both policies' answers to the same prompts, in the same order")
    first, second = a.per_answer(metric), b.per_answer(metric)
    if first is None or second is None or len(set(a.prompts)) < 2:
        return None
    return paired_difference(first, second, a.prompts)


@dataclass
class RewardModelAccuracy:
    """A reward model measured on pairs of answers to held-out prompts (:func:`measure_reward_model`)."""

    accuracy: Estimate
    """Agreement with the raters' expected label."""
    gold_accuracy: Estimate
    """Agreement with gold, over the pairs gold decides."""
    rater_ceiling: Estimate
    """The most ``accuracy`` any scorer reaches on these pairs: always siding with the raters' likelier label."""
    rater_agreement: Estimate
    """How often two independent raters agree on the same pairs."""
    pairs: int


def measure_reward_model(
    prompts: list[str], responses: list[str], scores: list[float], gold: list[float],
    rater_probability: Callable[[str, str, str], float],
) -> RewardModelAccuracy | None:
    """A reward model's accuracy on every pair of different answers to the same prompt.

    ``scores`` are the reward model's, ``gold`` the gold rewards of the same answers; ``rater_probability(prompt,
    first, second)`` is the raters' P(first preferred). Against the raters each pair counts by the label they give
    in expectation: p when the reward model prefers the first answer, 1 − p otherwise (no draw's noise added); no
    scorer beats max(p, 1 − p) on a pair (the ceiling), and two independent raters agree with probability
    p² + (1 − p)². Gold accuracy counts the pairs whose gold rewards differ; tied scores count
    half. Standard errors are clustered by prompt. None when fewer than two prompts have a pair that gold decides."""
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(index)
    rater, ceiling, agreement, pair_prompts, decided, decided_prompts = [], [], [], [], [], []
    for prompt, indices in groups.items():
        for i, j in combinations(indices, 2):
            if responses[i] == responses[j]:
                continue
            p = rater_probability(prompt, responses[i], responses[j])
            model_prefers_first = 0.5 if scores[i] == scores[j] else float(scores[i] > scores[j])
            rater.append(model_prefers_first * p + (1 - model_prefers_first) * (1 - p))
            ceiling.append(max(p, 1 - p))
            agreement.append(p * p + (1 - p) * (1 - p))
            pair_prompts.append(prompt)
            if gold[i] != gold[j]:
                decided.append(model_prefers_first if gold[i] > gold[j] else 1 - model_prefers_first)
                decided_prompts.append(prompt)
    if len(set(decided_prompts)) < 2:
        return None
    return RewardModelAccuracy(clustered_mean(rater, pair_prompts), clustered_mean(decided, decided_prompts),
                               clustered_mean(ceiling, pair_prompts), clustered_mean(agreement, pair_prompts),
                               len(rater))
