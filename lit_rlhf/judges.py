"""Judges: who decides which of several responses to a prompt is better.

A judge ranks the k responses to one prompt (0 = best; equal ranks are ties). Collection turns a ranking into
its C(k, 2) comparison pairs. Implementations: the embedded world's simulated raters (biased, noisy — the
stand-in for human labellers), the world's gold reward (an oracle), and a reward model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from lit_rlhf.errors import ConfigError
from lit_rlhf.scoring import GoldScorer, RewardModelScorer, Scorer
from lit_rlhf.world import Rater


def ranks_from_scores(scores: Sequence[float]) -> list[int]:
    """Rank i = how many responses score strictly higher (so equal scores tie): ``[0.2, 0.9, 0.2]`` → ``[1, 0, 1]``."""
    return [sum(other > score for other in scores) for score in scores]


class Judge(Protocol):
    name: str

    def rank(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[int]]:
        """Rank each prompt's responses; element [i][j] is the rank of response j to prompt i."""


class RaterJudge:
    """The world's simulated human raters: Plackett–Luce draws on a biased utility with label noise."""

    name = "raters"

    def __init__(self, rater: Rater | None = None, seed: int = 0) -> None:
        self.rater = rater or Rater()
        self.rng = random.Random(seed)

    def rank(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[int]]:
        return [self.rater.rank(prompt, list(group), self.rng) for prompt, group in zip(prompts, responses)]


class ScoreJudge:
    """Ranks by a scorer's numbers: the gold reward or a reward model."""

    def __init__(self, scorer: Scorer, name: str) -> None:
        self.scorer = scorer
        self.name = name

    def rank(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[int]]:
        flat_prompts = [prompt for prompt, group in zip(prompts, responses) for _ in group]
        flat_responses = [response for group in responses for response in group]
        scores = self.scorer.score(flat_prompts, flat_responses)
        ranks, start = [], 0
        for group in responses:
            ranks.append(ranks_from_scores(scores[start : start + len(group)].tolist()))
            start += len(group)
        return ranks


JUDGES = ("raters", "gold", "reward_model")


def make_judge(kind: str, reward_model: str | None = None, seed: int = 0) -> Judge:
    """Build a judge by name: ``raters`` (world default), ``gold`` or ``reward_model`` (needs its path)."""
    if kind == "raters":
        return RaterJudge(seed=seed)
    if kind == "gold":
        return ScoreJudge(GoldScorer(), "gold")
    if kind == "reward_model":
        if not reward_model:
            raise ConfigError("judge 'reward_model' needs a reward model path (--reward-model PATH)")
        return ScoreJudge(RewardModelScorer.from_pretrained(reward_model), "reward_model")
    raise ConfigError(f"unknown judge {kind!r}; expected one of {', '.join(JUDGES)}")
