"""Reward models made from trained ones, the mitigations of reward hacking that train nothing new, and the score
statistics every reward-model export stores.

- :func:`average_weights`: WARM (Ramé et al. 2024, "WARM: On the Benefits of Weight Averaged Reward Models"),
  reward models fine-tuned from the same start averaged in weight space into one, which scores like an ensemble of
  them at the cost of one.
- :func:`length_slope`: the post-hoc length fix, the least-squares slope of a reward model's scores on answer
  length over the policy's own answers; the scorer subtracts slope × length (:data:`LENGTH_SLOPE_KEY`), so the
  scores no longer depend linearly on length.
- :func:`store_score_statistics`: the mean and standard deviation of a reward model's scores of the policy's answers
  (the reward phase's, and those of a model made here), which PPO normalises with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel

from lit_rlhf.collect import sample_responses
from lit_rlhf.errors import ConfigError
from lit_rlhf.generation import SamplingConfig
from lit_rlhf.models import export, inference_device, load_scalar_head_model, load_tokenizer
from lit_rlhf.scoring import LENGTH_KEYS, LENGTH_SLOPE_KEY, SCORE_MEAN_KEY, SCORE_STD_KEY, RewardModelScorer


def average_weights(members: Sequence[PreTrainedModel]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the members' weights (WARM's θ = (1/M)·Σ θ_m), computed in float64 and returned in
    each weight's own dtype. The members must share one architecture; WARM's premise is also one start (here the
    SFT export), so that they stay linearly connected and the average scores like the ensemble."""
    states = [member.state_dict() for member in members]
    if any(state.keys() != states[0].keys() for state in states):
        raise ConfigError("weight averaging needs reward models of one architecture: their weights differ in names")
    averaged = {}
    for name, first in states[0].items():
        if any(state[name].shape != first.shape for state in states):
            raise ConfigError(f"weight averaging needs reward models of one architecture: {name} differs in shape")
        averaged[name] = torch.stack([state[name].double() for state in states]).mean(dim=0).to(first.dtype)
    return averaged


def length_slope(scores: torch.Tensor, lengths: torch.Tensor) -> float:
    """The least-squares slope b of score on length, cov(s, L) / var(L) (0 when every length is the same): what
    the score gains per token, which the post-hoc length fix subtracts."""
    lengths = lengths.double()
    variance = lengths.var(unbiased=False)
    if variance == 0:
        return 0.0
    return float(((scores.double() - scores.double().mean()) * (lengths - lengths.mean())).mean() / variance)


def policy_answers(
    policy: str, prompts: Sequence[str], count: int, sampling: SamplingConfig, max_prompt_length: int,
    device: torch.device | None = None, dtype: str | None = None,
) -> tuple[list[str], list[str], list[bool]]:
    """``count`` answers of ``policy`` to the first distinct ``prompts`` (several each where there are few):
    ``(prompts, responses, ended)``, one entry per answer."""
    distinct = list(dict.fromkeys(prompts))[:count]
    per_prompt = math.ceil(count / len(distinct))
    groups = sample_responses(policy, distinct, per_prompt, sampling, max_prompt_length, 256, device, dtype)
    answers = [(prompt, response) for prompt, group in zip(distinct, groups) for response in group][:count]
    return [p for p, _ in answers], [r.text for _, r in answers], [r.ended for _, r in answers]


def store_score_statistics(scorer: RewardModelScorer, answers: tuple[list[str], list[str], list[bool]]) -> None:
    """Keep in the scorer's model config the mean and standard deviation of its scores of ``answers`` (the
    policy's, :func:`policy_answers`; the scorer built without ``normalize``) and its length limits, which scorers
    loading the export take as defaults."""
    scores = scorer.score(*answers)
    config = scorer.model.config
    for name, key in LENGTH_KEYS.items():
        setattr(config, key, getattr(scorer, name))
    setattr(config, SCORE_MEAN_KEY, scores.mean().item())
    setattr(config, SCORE_STD_KEY, max(scores.std().item(), 1e-6))


def export_reward_model(
    model: PreTrainedModel, tokenizer_path: str, out_dir: str | Path, statistics_policy: str, prompts: Sequence[str],
    samples: int, sampling: SamplingConfig, max_prompt_length: int, length_corrected: bool = False,
) -> dict[str, float]:
    """Export a reward model made here with its score statistics measured on ``samples`` answers of
    ``statistics_policy`` to ``prompts``; with ``length_corrected``, first fit and store the slope of its scores on
    answer length over the same answers (the post-hoc length fix). Returns what was measured."""
    tokenizer = load_tokenizer(tokenizer_path)
    if hasattr(model.config, LENGTH_SLOPE_KEY):  # a slope is fitted to the scores without one
        delattr(model.config, LENGTH_SLOPE_KEY)
    scorer = RewardModelScorer(model, tokenizer, getattr(model.config, LENGTH_KEYS["max_length"], 64),
                               getattr(model.config, LENGTH_KEYS["max_prompt_length"], max_prompt_length))
    answers = policy_answers(statistics_policy, prompts, samples, sampling, max_prompt_length, model.device)
    measured = {}
    if length_corrected:
        slope = length_slope(scorer.score(*answers), torch.tensor(scorer.response_lengths(answers[1])))
        setattr(model.config, LENGTH_SLOPE_KEY, slope)
        measured["length_slope"] = slope
    store_score_statistics(scorer, answers)
    export(model, tokenizer, out_dir)
    return measured | {"score_mean": getattr(model.config, SCORE_MEAN_KEY),
                       "score_std": getattr(model.config, SCORE_STD_KEY)}


def load_reward_model(path: str) -> PreTrainedModel:
    """A reward-model export, as trained, on the inference device."""
    return load_scalar_head_model(path, load_tokenizer(path), device=inference_device()).eval()
