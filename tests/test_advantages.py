"""Hand-worked checks of lit_rlhf.advantages."""

import pytest
import torch

from lit_rlhf.advantages import (
    clip_scores,
    gae,
    group_advantages,
    normalize_scores,
    penalize_missing_eos,
    shape_rewards,
    whiten,
)
from lit_rlhf.losses import masked_mean, masked_var

TOL = dict(atol=1e-6, rtol=0)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **TOL)


def test_normalize_scores_with_the_stored_statistics():
    # mean 1, std 2: (3 − 1) / 2 = 1 and (−1 − 1) / 2 = −1.
    assert_close(normalize_scores(torch.tensor([3.0, -1.0]), 1.0, 2.0), [1.0, -1.0])


def test_missing_eos_penalty_comes_off_the_unfinished_answers_only():
    scores, ended = torch.tensor([0.5, 0.5]), torch.tensor([True, False])
    assert_close(penalize_missing_eos(scores, ended, 1.5), [0.5, -1.0])  # 0.5 − 1.5 on the answer without EOS
    for off in (None, 0.0):
        assert_close(penalize_missing_eos(scores, ended, off), [0.5, 0.5])


def test_clip_scores():
    assert_close(clip_scores(torch.tensor([-3.0, 0.5, 2.0]), 1.0), [-1.0, 0.5, 1.0])
    assert_close(clip_scores(torch.tensor([-3.0, 0.5, 2.0]), None), [-3.0, 0.5, 2.0])


# Two rows ending at different positions; the values 99 / 5 / 7 sit on masked positions.
GAE_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
GAE_REWARDS = torch.tensor([[1.0, 0.0, 2.0, 99.0], [0.0, 1.0, 5.0, 5.0]])
GAE_VALUES = torch.tensor([[0.5, 1.0, 1.5, 99.0], [1.0, 2.0, 7.0, 7.0]])


def test_gae_on_rows_of_different_lengths():
    # γ = 0.9, λ = 0.8, γλ = 0.72; δ_t = r_t + γ·V_{t+1} − V_t with V = 0 after the last valid token.
    # Row 0: δ2 = 2 + 0 − 1.5 = 0.5                A2 = 0.5
    #        δ1 = 0 + 0.9·1.5 − 1.0 = 0.35         A1 = 0.35 + 0.72·0.5 = 0.71
    #        δ0 = 1 + 0.9·1.0 − 0.5 = 1.4          A0 = 1.4 + 0.72·0.71 = 1.9112
    #        returns = A + V = [2.4112, 1.71, 2.0]
    # Row 1: δ1 = 1 + 0 − 2 = −1                   A1 = −1
    #        δ0 = 0 + 0.9·2 − 1 = 0.8              A0 = 0.8 + 0.72·(−1) = 0.08
    #        returns = [1.08, 1.0]
    advantages, returns = gae(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=0.9, lam=0.8)
    assert_close(advantages, [[1.9112, 0.71, 0.5, 0.0], [0.08, -1.0, 0.0, 0.0]])
    assert_close(returns, [[2.4112, 1.71, 2.0, 0.0], [1.08, 1.0, 0.0, 0.0]])


def test_gae_ignores_rewards_and_values_at_masked_positions():
    expected = gae(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=0.9, lam=0.8)
    rewards, values = GAE_REWARDS.clone(), GAE_VALUES.clone()
    rewards[0, 3], values[0, 3] = -50.0, 123.0
    rewards[1, 2:], values[1, 2:] = torch.tensor([8.0, -8.0]), torch.tensor([-3.0, 40.0])
    changed = gae(rewards, values, GAE_MASK, gamma=0.9, lam=0.8)
    assert_close(changed[0], expected[0])
    assert_close(changed[1], expected[1])


def test_gae_with_a_masked_prompt_before_the_response():
    # Mask [0, 1, 1, 0]: δ2 = 2 − 1.0 = 1, A2 = 1; δ1 = 1 + 0.9·1.0 − 0.5 = 1.4, A1 = 1.4 + 0.72·1 = 2.12; A0 = 0.
    rewards = torch.tensor([[9.0, 1.0, 2.0, 9.0]])
    values = torch.tensor([[9.0, 0.5, 1.0, 9.0]])
    advantages, returns = gae(rewards, values, torch.tensor([[0, 1, 1, 0]]), gamma=0.9, lam=0.8)
    assert_close(advantages, [[0.0, 2.12, 1.0, 0.0]])
    assert_close(returns, [[0.0, 2.62, 2.0, 0.0]])


WHITEN_X = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, 0.0]])
WHITEN_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_whiten_over_the_mask():
    # Valid values 1..5: mean 3, unbiased variance (4 + 1 + 0 + 1 + 4) / 4 = 2.5, std 1.5811388:
    # (x − 3) / 1.5811388 = [−1.2649111, −0.6324555, 0, 0.6324555, 1.2649111]; 0 outside the mask.
    whitened = whiten(WHITEN_X, WHITEN_MASK)
    assert_close(whitened, [[-1.2649111, -0.6324555, 0.0, 0.0], [0.6324555, 1.2649111, 0.0, 0.0]])
    assert_close(masked_mean(whitened, WHITEN_MASK), 0.0)
    torch.testing.assert_close(masked_var(whitened, WHITEN_MASK), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_whiten_without_shifting_keeps_the_mean():
    # Same scaling, mean 3 added back: [1.7350889, 2.3675445, 3, 3.6324555, 4.2649111].
    whitened = whiten(WHITEN_X, WHITEN_MASK, shift_mean=False)
    assert_close(whitened, [[1.7350889, 2.3675445, 3.0, 0.0], [3.6324555, 4.2649111, 0.0, 0.0]])
    assert_close(masked_mean(whitened, WHITEN_MASK), 3.0)


def test_shape_rewards_places_the_score_on_the_last_valid_token():
    # β = 0.1, k1 = log ρ: reward −0.1·log ρ per valid token, plus the score on the last valid one.
    # Row 0 (mask [1,1,1,0], log ρ [0.5, −0.5, 1.0, ·], score 1): [−0.05, 0.05, −0.1 + 1 = 0.9, 0]
    # Row 1 (mask [1,1,0,0], log ρ [0.2, 0.3, ·, ·], score 2):    [−0.02, −0.03 + 2 = 1.97, 0, 0]
    # Row 2 (mask [0,1,1,0]: prompt first, log ρ [·, 0.4, 0.6, ·], score −1): [0, −0.04, −0.06 − 1 = −1.06, 0]
    ref_logprobs = torch.full((3, 4), -2.0)
    log_ratios = torch.tensor([[0.5, -0.5, 1.0, 7.0], [0.2, 0.3, 7.0, 7.0], [7.0, 0.4, 0.6, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]])
    rewards = shape_rewards(torch.tensor([1.0, 2.0, -1.0]), ref_logprobs + log_ratios, ref_logprobs, mask, beta=0.1)
    assert_close(rewards, [[-0.05, 0.05, 0.9, 0.0], [-0.02, 1.97, 0.0, 0.0], [0.0, -0.04, -1.06, 0.0]])


def test_shape_rewards_uses_the_chosen_kl_kind():
    # k2 = ½(log ρ)²: log ρ = 0.5 → −0.1·0.125 = −0.0125, then the score 1 on the only token.
    logprobs, ref_logprobs = torch.tensor([[0.5]]), torch.tensor([[0.0]])
    rewards = shape_rewards(torch.tensor([1.0]), logprobs, ref_logprobs, torch.ones(1, 1), beta=0.1, kind="k2")
    assert_close(rewards, [[0.9875]])


def test_grpo_group_advantages():
    # Groups [1, 2, 3] and [0, 0, 6].
    # Group 1: mean 2, unbiased std 1 → (s − 2) / (1 + 1e−6) = [−0.999999, 0, 0.999999].
    # Group 2: mean 2, unbiased var (4 + 4 + 16) / 2 = 12, std 3.4641016 → [−0.5773501, −0.5773501, 1.1547002].
    advantages = group_advantages(torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0]), group_size=3, kind="grpo")
    assert_close(advantages, [-0.999999, 0.0, 0.999999, -0.5773501, -0.5773501, 1.1547002])


def test_rloo_group_advantages():
    # Group [1, 2, 3]: 1 − (2+3)/2 = −1.5, 2 − (1+3)/2 = 0, 3 − (1+2)/2 = 1.5.
    # Group [0, 0, 6]: 0 − (0+6)/2 = −3, −3, 6 − 0 = 6.
    advantages = group_advantages(torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0]), group_size=3, kind="rloo")
    assert_close(advantages, [-1.5, 0.0, 1.5, -3.0, -3.0, 6.0])


@pytest.mark.parametrize(
    "batch, group_size, kind, message",
    [(5, 3, "grpo", "divisible"), (6, 3, "ppo", "grpo, rloo"), (6, 1, "rloo", "at least 2")],
)
def test_group_advantages_rejects_bad_arguments(batch, group_size, kind, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(torch.zeros(batch), group_size, kind)
