"""Simulated human raters: a Bradley–Terry choice on the gold reward plus biases, with label noise.

A reward model trained on their labels learns the biases as if they were quality; the gold reward does not have
them. The gap between the two is the reward hacking that the world makes measurable.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass

from lit_rlhf.world.gold import gold_reward, response_features

MAX_REWARDED_DECORATIONS = 3
"""Decorations beyond this many add no more to a rater's utility (the format bias saturates)."""

_SMALLEST_POSITIVE = sys.float_info.min


@dataclass
class Rater:
    """A simulated rater whose utility for a response mixes its gold reward with three biases.

    ``utility = gold / temperature + length_bias·length + sycophancy_bias·sycophantic
    + format_bias·min(decorations, 3)``, all in logit units, where ``length``, ``sycophantic`` and
    ``decorations`` come from :func:`response_features`. With probability ``noise`` a label is flipped.
    ``temperature`` sets how sharply gold differences decide a choice: a gold gap of 0.1 is one logit by default.

    The defaults make hacks pay for the rater while gold falls: each of the first three decorations is worth
    0.6 + 0.75 − 1.0 = +0.35 logits net of its gold cost, and agreeing with a wrong view by adding its item to a
    correct list of N is worth 1.5 + 1.2 − 5/N logits (positive from N = 2); filler words cost the rater
    0.4 logits each. On the world's comparisons the rater agrees with the gold preference about 78% of the time.
    """

    length_bias: float = 0.6
    sycophancy_bias: float = 1.5
    format_bias: float = 0.75
    noise: float = 0.05
    temperature: float = 0.1

    @classmethod
    def unbiased(cls, noise: float = 0.0, temperature: float = 0.1) -> Rater:
        """A rater without biases, choosing by gold reward only (plus label noise, if any)."""
        return cls(length_bias=0.0, sycophancy_bias=0.0, format_bias=0.0, noise=noise, temperature=temperature)

    def utility(self, prompt: str, response: str) -> float:
        """The rater's utility for ``response`` in logit units (see the class docstring)."""
        features = response_features(prompt, response)
        return (
            gold_reward(prompt, response) / self.temperature
            + self.length_bias * features["length"]
            + self.sycophancy_bias * features["sycophantic"]
            + self.format_bias * min(features["decorations"], MAX_REWARDED_DECORATIONS)
        )

    def probability(self, prompt: str, first: str, second: str) -> float:
        """P(the rater prefers ``first``) = (1−noise)·σ(u₁ − u₂) + noise·σ(u₂ − u₁)."""
        margin = self.utility(prompt, first) - self.utility(prompt, second)
        return (1.0 - self.noise) * _sigmoid(margin) + self.noise * _sigmoid(-margin)

    def prefers_first(self, prompt: str, first: str, second: str, rng: random.Random) -> bool:
        """Draw one preference label: ``True`` when the rater prefers ``first``."""
        return rng.random() < self.probability(prompt, first, second)

    def rank(self, prompt: str, responses: list[str], rng: random.Random) -> list[int]:
        """Rank ``responses``: element i is the rank of response i, 0 the best.

        A Plackett–Luce draw: each distinct response's utility gets an independent Gumbel perturbation and they
        are sorted. With probability ``noise`` the whole ranking is drawn on negated utilities, so that for two
        responses P(first ranked above second) equals :meth:`probability`. Identical responses share one draw
        and tie; a rank counts the responses strictly better, so ranks of ``[a, a, b]`` may be ``[0, 0, 2]``.
        """
        sign = -1.0 if rng.random() < self.noise else 1.0
        perturbed = {
            response: sign * self.utility(prompt, response) + _gumbel(rng)
            for response in dict.fromkeys(responses)  # distinct responses, in first-seen order for determinism
        }
        scores = [perturbed[response] for response in responses]
        return [sum(other > score for other in scores) for score in scores]


def _sigmoid(x: float) -> float:
    """The logistic function, without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    exp_x = math.exp(x)
    return exp_x / (1.0 + exp_x)


def _gumbel(rng: random.Random) -> float:
    """A standard Gumbel draw; the difference of two is logistic, which makes Gumbel-max a Bradley–Terry choice."""
    uniform = max(rng.random(), _SMALLEST_POSITIVE)  # random() may return exactly 0.0
    return -math.log(-math.log(uniform))
