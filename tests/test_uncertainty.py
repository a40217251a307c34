"""Hand-worked checks of lit_rlhf.uncertainty: every expected number is derived in the comment above its assert."""

import math
import random
import statistics

import pytest
import torch

from lit_rlhf.uncertainty import (
    Estimate,
    Interval,
    clustered_mean,
    fit_gao,
    interval_over_seeds,
    kl_regularized_optimum,
    paired_difference,
    t_quantile_975,
)

# --------------------------------------------------------------------------------------------------------------
# t_quantile_975
# --------------------------------------------------------------------------------------------------------------


def test_t_quantile_reads_the_table_up_to_30_degrees_of_freedom():
    assert t_quantile_975(1) == 12.706
    assert t_quantile_975(2) == 4.303
    assert t_quantile_975(30) == 2.042


@pytest.mark.parametrize("df, exact", [(31, 2.0395), (40, 2.0211), (60, 2.0003), (120, 1.9799), (1000, 1.9623)])
def test_t_quantile_beyond_the_table_is_within_1e3(df, exact):
    assert t_quantile_975(df) == pytest.approx(exact, abs=1e-3)


def test_t_quantile_decreases_across_the_end_of_the_table_towards_the_normal_quantile():
    quantiles = [t_quantile_975(df) for df in range(25, 200)]
    assert all(later < earlier for earlier, later in zip(quantiles, quantiles[1:]))
    assert t_quantile_975(10**6) == pytest.approx(1.959964, abs=1e-5)


def test_t_quantile_needs_a_degree_of_freedom():
    with pytest.raises(ValueError):
        t_quantile_975(0)


# --------------------------------------------------------------------------------------------------------------
# clustered_mean
# --------------------------------------------------------------------------------------------------------------


def test_clustered_mean_by_hand_with_unequal_clusters():
    # values 1, 2 | 3 | 6: ȳ = 12/4 = 3; residual sums per cluster: (1−3)+(2−3) = −3, 0, 3, squares sum to 18.
    # se² = G/(G−1)·18/N² = 3/2·18/16 = 27/16, se = √27/4.
    estimate = clustered_mean([1.0, 2.0, 3.0, 6.0], ["a", "a", "b", "c"])
    assert estimate == Estimate(mean=pytest.approx(3.0), se=pytest.approx(math.sqrt(27) / 4), n=3)


def test_clustered_mean_with_equal_clusters_is_the_sd_of_cluster_means_over_root_g():
    # cluster means 2, 6, 6: mean 14/3; deviations −8/3, 4/3, 4/3, squares 96/9, sd² = 96/9/2 = 16/3;
    # se = sd/√3 = √(16/9) = 4/3. By the CR1 formula: residual sums −16/3, 8/3, 8/3, squares 384/9;
    # 3/2 · 384/9 / 36 = 16/9, the same.
    estimate = clustered_mean([1.0, 3.0, 5.0, 7.0, 6.0, 6.0], ["a", "a", "b", "b", "c", "c"])
    assert (estimate.mean, estimate.se, estimate.n) == (pytest.approx(14 / 3), pytest.approx(4 / 3), 3)


def test_clustered_mean_with_equal_clusters_matches_the_sd_of_cluster_means_on_random_data():
    rng = random.Random(0)
    n_clusters, size = 7, 4
    values = [rng.gauss(cluster, 1.0) for cluster in range(n_clusters) for _ in range(size)]
    clusters = [cluster for cluster in range(n_clusters) for _ in range(size)]
    cluster_means = [statistics.fmean(values[cluster * size:(cluster + 1) * size]) for cluster in range(n_clusters)]
    estimate = clustered_mean(values, clusters)
    assert estimate.se == pytest.approx(statistics.stdev(cluster_means) / math.sqrt(n_clusters), rel=1e-12)
    assert estimate.mean == pytest.approx(statistics.fmean(cluster_means), rel=1e-12)


def test_clustered_mean_with_one_value_per_cluster_is_the_usual_standard_error():
    # G = N: se² = N/(N−1)·Σ(y−ȳ)²/N² = s²/N. Values 1, 2, 3, 4: s² = 5/3, se = √(5/12).
    estimate = clustered_mean([1.0, 2.0, 3.0, 4.0], [0, 1, 2, 3])
    assert estimate.se == pytest.approx(math.sqrt(5 / 12))


def test_clustered_mean_of_one_cluster_has_no_standard_error():
    estimate = clustered_mean([1.0, 2.0], ["a", "a"])
    assert estimate.mean == 1.5 and math.isnan(estimate.se) and estimate.n == 1


def test_clustered_mean_needs_a_label_per_value():
    with pytest.raises(ValueError):
        clustered_mean([1.0, 2.0], ["a"])


# --------------------------------------------------------------------------------------------------------------
# interval_over_seeds and paired_difference
# --------------------------------------------------------------------------------------------------------------


def test_interval_over_seeds_by_hand():
    # mean 2.5; s² = (2.25+0.25+0.25+2.25)/3 = 5/3; half width t(3)·s/√4 = 3.182·√(5/3)/2 = 2.053972.
    interval = interval_over_seeds([1.0, 2.0, 3.0, 4.0])
    assert interval.mean == pytest.approx(2.5) and interval.n == 4
    assert interval.ci95 == pytest.approx((2.5 - 2.053972, 2.5 + 2.053972), abs=1e-6)
    assert interval.as_dict() == {"mean": 2.5, "ci95": list(interval.ci95), "n": 4}


def test_one_seed_has_no_interval():
    assert interval_over_seeds([0.7]) == Interval(mean=0.7, ci95=None, n=1)
    assert interval_over_seeds([0.7]).as_dict() == {"mean": 0.7, "ci95": None, "n": 1}


def test_paired_difference_by_hand():
    # differences 2, 3 | 2, 3 | 0, 1: cluster means 2.5, 2.5, 0.5; mean 11/6; deviations 2/3, 2/3, −4/3,
    # s² = (4/9+4/9+16/9)/2 = 4/3, s/√3 = 2/3; half width t(2)·2/3 = 4.303·2/3 = 2.868667.
    interval = paired_difference([3.0, 5.0, 4.0, 6.0, 2.0, 2.0], [1.0, 2.0, 2.0, 3.0, 2.0, 1.0],
                                 ["p", "p", "q", "q", "r", "r"])
    assert interval.mean == pytest.approx(11 / 6) and interval.n == 3
    assert interval.ci95 == pytest.approx((11 / 6 - 2.868667, 11 / 6 + 2.868667), abs=1e-6)


def test_paired_difference_counts_each_prompt_once():
    # differences 1, 1, 1 | 4: the mean of cluster means is (1+4)/2 = 2.5, not the mean of answers 7/4;
    # s² = (1.5² + 1.5²)/1 = 4.5, s/√2 = 1.5; half width t(1)·1.5 = 12.706·1.5 = 19.059.
    interval = paired_difference([1.0, 1.0, 1.0, 4.0], [0.0, 0.0, 0.0, 0.0], ["p", "p", "p", "q"])
    assert interval.mean == pytest.approx(2.5) and interval.n == 2
    assert interval.ci95 == pytest.approx((2.5 - 19.059, 2.5 + 19.059))


def test_paired_difference_needs_equal_lengths():
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0], ["a", "b"])


# --------------------------------------------------------------------------------------------------------------
# kl_regularized_optimum
# --------------------------------------------------------------------------------------------------------------


def test_optimum_by_hand():
    # rewards 0, ln 3 with β = 1: weights ∝ 1, 3, so 0.25, 0.75; a measure 1, 5 has weighted mean 0.25 + 3.75 = 4;
    # KL = 0.25·ln(2·0.25) + 0.75·ln(2·0.75); ESS = 1/(0.0625 + 0.5625) = 1.6. One prompt: no se.
    estimate = kl_regularized_optimum(torch.tensor([[0.0, math.log(3)]]), 1.0, {"gold": torch.tensor([[1.0, 5.0]])})
    torch.testing.assert_close(estimate.weights, torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    assert estimate.measures["gold"].mean == pytest.approx(4.0) and math.isnan(estimate.measures["gold"].se)
    assert estimate.kl.mean == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5)) and estimate.kl.n == 1
    assert estimate.effective_sample_size == pytest.approx(1.6)
    assert estimate.min_effective_sample_size == pytest.approx(1.6)


def test_optimum_divides_rewards_by_beta():
    # rewards 0, 2·ln 3 with β = 2 are rewards 0, ln 3 with β = 1: weights 0.25, 0.75.
    estimate = kl_regularized_optimum(torch.tensor([[0.0, 2 * math.log(3)]]), 2.0, {})
    torch.testing.assert_close(estimate.weights, torch.tensor([[0.25, 0.75]], dtype=torch.float64))


def test_optimum_with_an_underflowing_weight():
    # rewards 0, 2000 with β = 1: weights exp(−2000) → 0 and 1; the zero weight adds 0 (not 0·ln 0 = nan),
    # so KL = 1·ln(2·1) = ln 2 and ESS = 1. Prompt 2 (rewards 0, 0): weights 0.5, 0.5, KL 0, ESS 2.
    # Over prompts: KL mean ln2/2, se = sd/√2 = (ln2/√2)/√2 = ln2/2; ESS mean 1.5, min 1.
    estimate = kl_regularized_optimum(torch.tensor([[0.0, 2000.0], [0.0, 0.0]]), 1.0, {})
    assert estimate.kl == Estimate(mean=pytest.approx(math.log(2) / 2), se=pytest.approx(math.log(2) / 2), n=2)
    assert estimate.effective_sample_size == pytest.approx(1.5)
    assert estimate.min_effective_sample_size == pytest.approx(1.0)


def test_optimum_on_a_bandit_where_it_is_exact():
    # π_ref a categorical over 5 arms; π* = p·exp(r/β)/Z exactly, so E_π*[gold] and KL(π*‖p) are sums over arms.
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    reward = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    gold = torch.tensor([0.0, 0.6, 1.0, 0.8, 0.2], dtype=torch.float64)
    beta = 1.0
    optimum = probs * torch.exp(reward / beta)
    optimum = optimum / optimum.sum()
    exact_gold = (optimum * gold).sum().item()
    exact_kl = (optimum * (optimum / probs).log()).sum().item()

    arms = torch.multinomial(probs.expand(4, 5), 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = kl_regularized_optimum(reward[arms], beta, {"gold": gold[arms], "proxy": reward[arms]})

    tolerance = 0.02
    assert estimate.measures["gold"].mean == pytest.approx(exact_gold, abs=tolerance)
    assert estimate.kl.mean == pytest.approx(exact_kl, abs=tolerance)
    assert estimate.measures["proxy"].mean == pytest.approx((optimum * reward).sum().item(), abs=tolerance)
    # The tolerance is many standard errors wide, so the test is not a coin flip on the seed.
    assert 4 * estimate.measures["gold"].se < tolerance and 4 * estimate.kl.se < tolerance
    assert estimate.measures["gold"].n == estimate.kl.n == 4
    # Kish's ESS of the exact weights π*/p: N/E_p[(π*/p)²] = N/Σ π*²/p.
    assert estimate.effective_sample_size == pytest.approx(20000 / (optimum**2 / probs).sum().item(), rel=0.02)
    torch.testing.assert_close(estimate.weights.sum(dim=1), torch.ones(4, dtype=torch.float64))


def test_optimum_rejects_a_non_positive_beta_and_mismatched_shapes():
    rewards = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        kl_regularized_optimum(rewards, 0.0, {})
    with pytest.raises(ValueError):
        kl_regularized_optimum(rewards, 1.0, {"gold": torch.zeros(2, 4)})


# --------------------------------------------------------------------------------------------------------------
# fit_gao
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form, curve", [
    ("rl", lambda d: d * (1.2 - 0.5 * math.log(d)) if d > 0 else 0.0),
    ("bon", lambda d: d * (1.2 - 0.5 * d)),
])
def test_fit_gao_recovers_exact_curves(form, curve):
    d = [0.0, 0.5, 1.0, 2.0, 3.0]
    fit = fit_gao(d, [curve(value) for value in d], form)
    assert (fit.form, fit.n) == (form, 5)
    assert fit.alpha == pytest.approx(1.2, abs=1e-9) and fit.beta == pytest.approx(0.5, abs=1e-9)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.predict([0.0, 4.0]) == pytest.approx([0.0, curve(4.0)], abs=1e-9)


def test_fit_gao_by_hand_on_noisy_points():
    # best-of-n, d = 1, 2, 3, gain = 1, 2, 1; columns x₁ = d = (1, 2, 3), x₂ = −d² = (−1, −4, −9).
    # Normal equations [[14, −36], [−36, 98]]·(α, β) = (8, −18), determinant 1372 − 1296 = 76:
    # α = (98·8 − 36·18)/76 = 136/76 = 34/19, β = (14·(−18) + 36·8)/76 = 36/76 = 9/19.
    # Predictions 25/19, 32/19, 21/19; residuals −6/19, 6/19, −2/19, SS_res = 76/361 = 4/19;
    # SS_tot about 4/3 = 1/9 + 4/9 + 1/9 = 2/3; r2 = 1 − (4/19)/(2/3) = 13/19.
    fit = fit_gao([1.0, 2.0, 3.0], [1.0, 2.0, 1.0], "bon")
    assert fit.alpha == pytest.approx(34 / 19) and fit.beta == pytest.approx(9 / 19)
    assert fit.r2 == pytest.approx(13 / 19)
    assert fit.predict([1.0, 2.0, 3.0]) == pytest.approx([25 / 19, 32 / 19, 21 / 19])


@pytest.mark.parametrize("d, gain, form", [
    ([0.0, 1.0], [0.0, 1.0], "rl"),  # one d > 0 cannot fix two parameters
    ([0.0, 1.0, 1.0], [0.0, 1.0, 1.1], "bon"),  # nor can one d repeated
    ([-1.0, 1.0, 2.0], [0.0, 1.0, 1.0], "rl"),  # d = √KL ≥ 0
    ([1.0, 2.0], [1.0], "rl"),
    ([1.0, 2.0], [1.0, 1.0], "ppo"),
])
def test_fit_gao_rejects_what_cannot_be_fitted(d, gain, form):
    with pytest.raises(ValueError):
        fit_gao(d, gain, form)
