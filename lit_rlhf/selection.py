"""Picking responses by reward: best-of-n, rejection sampling's data, and SPIN's self-play pairs.

Best-of-n (Stiennon et al. 2020; Nakano et al. 2021) samples n responses and keeps the one a reward model scores
highest; its KL to the sampling policy is at most log n − (n−1)/n (Beirami et al. 2024). Rejection-sampling
fine-tuning (Touvron et al. 2023, "Llama 2" §3.2.3) runs SFT on such picks. SPIN (Chen et al. 2024) pairs a
human demonstration (chosen) with the current model's own answer to the same prompt (rejected).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lit_rlhf.generation import Response
from lit_rlhf.scoring import Scorer


def best_of_n_kl(n: int) -> float:
    """The analytic KL(π_best-of-n ‖ π) bound ``log n − (n−1)/n``: 0 for n = 1, about 1.2 nats for n = 8."""
    return math.log(n) - (n - 1) / n


@dataclass
class Pick:
    prompt: str
    response: str
    score: float
    ended: bool = True
    """Whether the response ended on EOS rather than at ``max_new_tokens``."""


def pick_best(
    prompts: Sequence[str],
    groups: Sequence[Sequence[Response]],
    scorer: Scorer,
    keep: int = 1,
    threshold: float | None = None,
) -> list[Pick]:
    """The ``keep`` highest-scored responses of each prompt's group (best first), and of those only the ones
    scoring at least ``threshold`` when given. Duplicate responses of one prompt count once. Each response is
    scored as finished or not, as it was sampled."""
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    flat_prompts = [prompt for prompt, group in zip(prompts, groups) for _ in group]
    flat_responses = [response for group in groups for response in group]
    scores = scorer.score(flat_prompts, [r.text for r in flat_responses], [r.ended for r in flat_responses]).tolist()
    picks, start = [], 0
    for prompt, group in zip(prompts, groups):
        group_scores = dict(zip(group, scores[start : start + len(group)]))
        start += len(group)
        ranked = sorted(group_scores.items(), key=lambda item: -item[1])[:keep]
        picks.extend(
            Pick(prompt, response.text, score, response.ended)
            for response, score in ranked
            if threshold is None or score >= threshold
        )
    return picks


def self_play_pairs(
    prompts: Sequence[str], demonstrations: Sequence[str], generations: Sequence[Response]
) -> list[dict]:
    """SPIN's comparisons: the demonstration chosen over the model's own generation (``rejected_ended`` says whether
    it ended); pairs where the model already reproduces the demonstration exactly carry no signal and are left out,
    as are empty generations (EOS first), which teach nothing to push away from."""
    return [
        {"prompt": prompt, "chosen": demonstration, "rejected": generation.text, "rejected_ended": generation.ended}
        for prompt, demonstration, generation in zip(prompts, demonstrations, generations)
        if generation.text.strip() and demonstration.strip() != generation.text.strip()
    ]

