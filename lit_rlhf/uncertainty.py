"""Measurements with their errors: means with standard errors and 95 % intervals, the KL-regularised optimum estimated
from samples of the reference policy, and Gao et al.'s overoptimisation curves (imports only torch).

The unit of independence is explicit everywhere: answers to one prompt are correlated, so a prompt is a cluster;
runs with different seeds are independent replicates. ``n`` in every result counts those units, not the answers.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from statistics import fmean, stdev
from typing import Literal

import torch
from torch import Tensor

_T_975_TABLE = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
                2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
                2.045, 2.042)
"""Student's t 97.5 % quantiles for 1 to 30 degrees of freedom."""
_Z_975 = 1.959964
"""The standard normal 97.5 % quantile."""

GAO_FORMS = ("rl", "bon")


@dataclass(frozen=True)
class Estimate:
    """A mean, its standard error and the number of independent units (clusters, prompts or seeds) behind it."""

    mean: float
    se: float
    n: int


@dataclass(frozen=True)
class Interval:
    """A mean with its 95 % confidence interval (None when fewer than 2 independent units give no spread)."""

    mean: float
    ci95: tuple[float, float] | None
    n: int

    def as_dict(self) -> dict:
        """``{"mean": .., "ci95": [lo, hi] or None, "n": ..}``, ready for JSON."""
        return {"mean": self.mean, "ci95": None if self.ci95 is None else list(self.ci95), "n": self.n}


def t_quantile_975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom, the factor of a two-sided 95 % interval.

    Tabulated for df ≤ 30; above, the Cornish–Fisher expansion around the normal quantile z = 1.959964
    (Abramowitz & Stegun 26.7.5), t ≈ z + (z³ + z)/(4·df) + (5z⁵ + 16z³ + 3z)/(96·df²), within 1e-3 there.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    if df <= len(_T_975_TABLE):
        return _T_975_TABLE[df - 1]
    z = _Z_975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def clustered_mean(values: Sequence[float], clusters: Sequence[Hashable]) -> Estimate:
    """The mean ȳ of all N values and its cluster-robust standard error over their G clusters:
    se² = G/(G−1) · Σ_g (Σ_{i∈g} (y_i − ȳ))² / N², the CR1 variance of Cameron & Miller 2015 ("A Practitioner's
    Guide to Cluster-Robust Inference") for a mean. With equal cluster sizes it equals sd(cluster means)/√G.

    ``n`` is G; with a single cluster the spread between clusters is unknown and ``se`` is nan.
    """
    if len(values) != len(clusters):
        raise ValueError(f"{len(values)} values but {len(clusters)} cluster labels")
    if not values:
        raise ValueError("no values")
    grand_mean = fmean(values)
    residual_sums: dict[Hashable, float] = {}
    for value, cluster in zip(values, clusters):
        residual_sums[cluster] = residual_sums.get(cluster, 0.0) + value - grand_mean
    n_clusters = len(residual_sums)
    if n_clusters < 2:
        return Estimate(mean=grand_mean, se=math.nan, n=n_clusters)
    sum_of_squares = sum(residual_sum**2 for residual_sum in residual_sums.values())
    se = math.sqrt(n_clusters / (n_clusters - 1) * sum_of_squares) / len(values)
    return Estimate(mean=grand_mean, se=se, n=n_clusters)


def interval_over_seeds(values: Sequence[float]) -> Interval:
    """The mean of n independent replicates (one per seed) with its 95 % t-interval, mean ± t_{0.975, n−1}·sd/√n
    (sd with n − 1 in the denominator); ``ci95`` is None for n = 1."""
    if not values:
        raise ValueError("no values")
    mean = fmean(values)
    if len(values) < 2:
        return Interval(mean=mean, ci95=None, n=len(values))
    half_width = t_quantile_975(len(values) - 1) * stdev(values) / math.sqrt(len(values))
    return Interval(mean=mean, ci95=(mean - half_width, mean + half_width), n=len(values))


def paired_difference(a: Sequence[float], b: Sequence[float], clusters: Sequence[Hashable]) -> Interval:
    """The difference a − b of two measurements on the same units (same prompts, same order) with its 95 %
    t-interval: the differences a_i − b_i are averaged within each of the G clusters, and the result is the mean of
    those G cluster means, mean ± t_{0.975, G−1}·sd/√G. Pairing removes the prompt-to-prompt variation both share;
    averaging per cluster first makes each prompt count once however many answers it has. ``n`` is G."""
    if not len(a) == len(b) == len(clusters):
        raise ValueError(f"lengths differ: {len(a)} in a, {len(b)} in b, {len(clusters)} cluster labels")
    differences: dict[Hashable, list[float]] = {}
    for value_a, value_b, cluster in zip(a, b, clusters):
        differences.setdefault(cluster, []).append(value_a - value_b)
    # The cluster means are independent replicates, as runs with different seeds are.
    return interval_over_seeds([fmean(cluster_differences) for cluster_differences in differences.values()])


@dataclass(frozen=True)
class OptimumEstimate:
    """What :func:`kl_regularized_optimum` estimates; every :class:`Estimate` is over prompts (``n`` = P)."""

    weights: Tensor
    """``[P, N]`` self-normalised importance weights, each row summing to 1."""
    measures: dict[str, Estimate]
    """E_π*[m] for each measure m."""
    kl: Estimate
    """KL(π* ‖ π_ref)."""
    effective_sample_size: float
    """Kish's effective sample size 1/Σ_j w_j², averaged over prompts: how many of the N samples carry the estimate."""
    min_effective_sample_size: float
    """The smallest effective sample size of any prompt: the prompt whose estimate is least reliable."""


def _mean_over_prompts(per_prompt: Tensor) -> Estimate:
    """Mean of ``[P]`` per-prompt values, se = sd over prompts/√P (nan for a single prompt)."""
    n_prompts = per_prompt.numel()
    se = (per_prompt.std() / math.sqrt(n_prompts)).item() if n_prompts > 1 else math.nan
    return Estimate(mean=per_prompt.mean().item(), se=se, n=n_prompts)


def kl_regularized_optimum(rewards: Tensor, beta: float, measures: Mapping[str, Tensor]) -> OptimumEstimate:
    """The optimum of the KL-regularised RLHF objective E_π[r] − β·KL(π ‖ π_ref),
    π*(y|x) = π_ref(y|x)·exp(r(x, y)/β)/Z(x) (Korbak et al. 2022; Rafailov et al. 2023, eq. 4), estimated by
    self-normalised importance sampling from N samples of π_ref per prompt.

    ``rewards`` and every tensor of ``measures`` are ``[P, N]``: P prompts, N samples of π_ref each. Per prompt the
    weights are w = softmax(r/β) over its N samples, so E_π*[m] ≈ Σ_j w_j·m_j, and since π*/π_ref ≈ N·w at the
    samples, KL(π* ‖ π_ref) ≈ Σ_j w_j·log(N·w_j), a zero weight contributing 0. Computed in float64.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, samples], got shape {tuple(rewards.shape)}")
    for name, measure in measures.items():
        if measure.shape != rewards.shape:
            raise ValueError(f"measure {name!r} has shape {tuple(measure.shape)}, rewards {tuple(rewards.shape)}")
    n_samples = rewards.shape[1]
    # softmax subtracts the row's logsumexp, so exp(r/β) never overflows however small β is.
    weights = torch.softmax(rewards.double() / beta, dim=1)
    kl_per_prompt = torch.special.xlogy(weights, n_samples * weights).sum(dim=1)
    effective_sample_sizes = 1.0 / weights.square().sum(dim=1)
    return OptimumEstimate(
        weights=weights,
        measures={name: _mean_over_prompts((weights * measure.double()).sum(dim=1))
                  for name, measure in measures.items()},
        kl=_mean_over_prompts(kl_per_prompt),
        effective_sample_size=effective_sample_sizes.mean().item(),
        min_effective_sample_size=effective_sample_sizes.min().item(),
    )


@dataclass(frozen=True)
class GaoFit:
    """Gao et al.'s gold reward gain R(d) at d = √KL, fitted by :func:`fit_gao`; ``n`` counts the points."""

    form: Literal["rl", "bon"]
    alpha: float
    beta: float
    r2: float
    n: int

    def predict(self, d: Sequence[float]) -> list[float]:
        """R(d) at each d: d(α − β·ln d) for the RL form, d(α − β·d) for best-of-n; R(0) = 0."""
        coefficients = torch.tensor([self.alpha, self.beta], dtype=torch.float64)
        return (_gao_columns(d, self.form) @ coefficients).tolist()


def _gao_columns(d: Sequence[float], form: str) -> Tensor:
    """The ``[n, 2]`` design matrix of R(d) = α·x₁ + β·x₂: x = (d, −d·ln d) for "rl", (d, −d²) for "bon"."""
    root_kl = torch.tensor(d, dtype=torch.float64)
    if form == "rl":
        # d·ln d → 0 as d → 0; xlogy takes that limit instead of giving 0·(−∞) = nan.
        return torch.stack([root_kl, -torch.special.xlogy(root_kl, root_kl)], dim=1)
    if form == "bon":
        return torch.stack([root_kl, -root_kl.square()], dim=1)
    raise ValueError(f"form must be one of {GAO_FORMS}, got {form!r}")


def fit_gao(d: Sequence[float], gain: Sequence[float], form: Literal["rl", "bon"]) -> GaoFit:
    """Fit Gao, Schulman & Hilton 2022 ("Scaling Laws for Reward Model Overoptimization"): the gold reward
    gain over the initial policy as a function of d = √KL(π ‖ π_init), R(d) = d(α − β·ln d) for RL ("rl") and
    R(d) = d(α − β·d) for best-of-n ("bon").

    Both forms are linear in (α, β), so this is least squares without intercept; r2 = 1 − SS_res/SS_tot with SS_tot
    about the mean gain (nan when all gains are equal). Points at d = 0 fit any (α, β) and only enter r2. (α, β) is
    determined by 2 distinct d > 0, so fewer raise ValueError, as does a negative d.
    """
    if len(d) != len(gain):
        raise ValueError(f"{len(d)} values of d but {len(gain)} gains")
    if any(value < 0 for value in d):
        raise ValueError(f"d = √KL cannot be negative, got {list(d)}")
    if len({value for value in d if value > 0}) < 2:
        raise ValueError(f"fitting (α, β) needs at least 2 distinct d > 0, got {list(d)}")
    columns = _gao_columns(d, form)
    gain_tensor = torch.tensor(gain, dtype=torch.float64)
    coefficients = torch.linalg.lstsq(columns, gain_tensor.unsqueeze(1)).solution.squeeze(1)
    residual_sum_of_squares = (gain_tensor - columns @ coefficients).square().sum()
    total_sum_of_squares = (gain_tensor - gain_tensor.mean()).square().sum()
    r2 = (1 - residual_sum_of_squares / total_sum_of_squares).item() if total_sum_of_squares > 0 else math.nan
    alpha, beta = coefficients.tolist()
    return GaoFit(form=form, alpha=alpha, beta=beta, r2=r2, n=len(d))
