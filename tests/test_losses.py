"""Hand-worked checks of lit_rlhf.losses: every expected number is derived in the comment above its assert."""

import math

import pytest
import torch

from lit_rlhf.losses import (
    PREFERENCE_LOSSES,
    bradley_terry_loss,
    kl_penalty,
    kto_kl_estimate,
    kto_loss,
    masked_mean,
    masked_sum,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
    preference_loss,
    preference_loss_type,
    reward_centering_penalty,
    rpo_nll_loss,
    sequence_logprobs,
    sft_loss,
    shift_for_next_token,
    simpo_loss,
    token_logprobs,
)

TOL = dict(atol=1e-6, rtol=0)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **TOL)


# ---------------------------------------------------------------------------------------------------------------
# Masked reductions
# ---------------------------------------------------------------------------------------------------------------


def test_masked_reductions_skip_masked_positions_even_when_nan():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("-inf"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    # Valid values 1, 2, 4, 6: sum 13, mean 3.25; per row: sums 3 and 10, means 1.5 and 5.
    assert_close(masked_sum(x, mask), 13.0)
    assert_close(masked_mean(x, mask), 3.25)
    assert_close(masked_sum(x, mask, dim=1), [3.0, 10.0])
    assert_close(masked_mean(x, mask, dim=1), [1.5, 5.0])
    # Deviations from 3.25: -2.25, -1.25, 0.75, 2.75; squares sum 5.0625+1.5625+0.5625+7.5625 = 14.75;
    # unbiased 14.75/3, biased 14.75/4.
    assert_close(masked_var(x, mask), 14.75 / 3)
    assert_close(masked_var(x, mask, unbiased=False), 14.75 / 4)


def test_masked_mean_of_empty_mask_is_zero_not_nan():
    assert_close(masked_mean(t(1.0, 2.0), torch.zeros(2)), 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Log-probabilities
# ---------------------------------------------------------------------------------------------------------------

# Logits [0, ln 2, ln 3] exponentiate to [1, 2, 3]: softmax = [1/6, 2/6, 3/6].
THREE_WORD_LOGITS = [0.0, math.log(2), math.log(3)]


def test_token_logprobs_on_a_three_word_vocabulary():
    logits = torch.tensor([[THREE_WORD_LOGITS, THREE_WORD_LOGITS], [THREE_WORD_LOGITS, THREE_WORD_LOGITS]])
    labels = torch.tensor([[0, 2], [1, 1]])
    expected = [[math.log(1 / 6), math.log(1 / 2)], [math.log(1 / 3), math.log(1 / 3)]]
    assert_close(token_logprobs(logits, labels), expected)


def test_token_logprobs_upcasts_half_precision_to_float32():
    # Three equal logits of 64 (exact in bf16): logπ = −ln 3 = −1.0986123. In bf16 the normaliser
    # 64 + ln 3 = 65.0986 would round to 65.0 (spacing 0.5) and give −1.0; float32 at 65 is good to ~4e-6.
    logits = torch.full((1, 1, 3), 64.0, dtype=torch.bfloat16)
    result = token_logprobs(logits, torch.tensor([[2]]))
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, torch.tensor([[-math.log(3)]]), atol=1e-5, rtol=0)


def test_token_logprobs_is_differentiable():
    logits = torch.tensor([[THREE_WORD_LOGITS]], requires_grad=True)
    token_logprobs(logits, torch.tensor([[2]])).sum().backward()
    # d log softmax_2 / d logits = onehot(2) − softmax = [−1/6, −2/6, 1 − 3/6].
    assert_close(logits.grad, [[[-1 / 6, -2 / 6, 0.5]]])


def test_shift_for_next_token_drops_last_logits_and_first_token():
    logits = torch.arange(12.0).view(1, 4, 3)
    input_ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[0, 1, 1, 0]])
    shifted_logits, targets, target_mask = shift_for_next_token(logits, input_ids, mask)
    assert torch.equal(shifted_logits, logits[:, :3])
    assert torch.equal(targets, torch.tensor([[6, 7, 8]]))
    assert torch.equal(target_mask, torch.tensor([[1, 1, 0]]))


def test_sequence_logprobs_sum_and_average():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # Row 0: −1 − 2 = −3 over 2 tokens (mean −1.5); row 1: −0.5 over 1 token.
    assert_close(sequence_logprobs(token_logps, mask), [-3.0, -0.5])
    assert_close(sequence_logprobs(token_logps, mask, average=True), [-1.5, -0.5])


def sft_batch():
    # Every position has the three-word logits, so logπ(token) = log([1, 2, 3][token] / 6).
    logits = torch.tensor([THREE_WORD_LOGITS] * 4).repeat(2, 1, 1)
    input_ids = torch.tensor([[0, 1, 2, 0], [1, 1, 0, 0]])
    # Row 0: prompt "0 1", response "2 0". Row 1: prompt "1", response "1", then padding.
    response_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]])
    return logits, input_ids, response_mask


def test_sft_loss_is_token_mean_nll_of_response_tokens():
    logits, input_ids, response_mask = sft_batch()
    # Response tokens: 2 (p 1/2) and 0 (p 1/6) in row 0, 1 (p 1/3) in row 1.
    # Token-level mean NLL = (ln 2 + ln 6 + ln 3) / 3 = ln 36 / 3 = 1.1945063
    # (the mean of per-row means would be (ln 12 / 2 + ln 3) / 2 = 1.1705328).
    assert_close(sft_loss(logits, input_ids, response_mask), 1.1945063)


def test_sft_loss_ignores_logits_that_do_not_predict_response_tokens():
    logits, input_ids, response_mask = sft_batch()
    changed = logits.clone()
    # Row 0: logits 0 predict prompt token 1 and logits 3 predict nothing; row 1: logits 2, 3 predict padding.
    changed[0, 0] = torch.tensor([5.0, -3.0, 1.0])
    changed[0, 3] = torch.tensor([-7.0, 2.0, 0.5])
    changed[1, 2:] = torch.tensor([9.0, 9.0, -9.0])
    assert_close(sft_loss(changed, input_ids, response_mask), sft_loss(logits, input_ids, response_mask).item())


# ---------------------------------------------------------------------------------------------------------------
# Preference losses
# ---------------------------------------------------------------------------------------------------------------

# chosen −1, rejected −3, both references −2:  Δ = (−1 + 2) − (−3 + 2) = 1 − (−1) = 2.
PAIR = dict(chosen_logps=t(-1.0), rejected_logps=t(-3.0), ref_chosen_logps=t(-2.0), ref_rejected_logps=t(-2.0))
NEG_LOGSIG_1 = 0.3132617  # −log σ(1) = log(1 + e^−1)
NEG_LOGSIG_MINUS_1 = 1.3132617  # −log σ(−1) = log(1 + e) = 1 + log(1 + e^−1)


def test_dpo_sigmoid_loss_and_rewards():
    # β = 0.5: βΔ = 1, loss = −log σ(1); rewards β·(−1 + 2) = 0.5 and β·(−3 + 2) = −0.5.
    losses, chosen_rewards, rejected_rewards = preference_loss(**PAIR, beta=0.5)
    assert_close(losses, [NEG_LOGSIG_1])
    assert_close(chosen_rewards, [0.5])
    assert_close(rejected_rewards, [-0.5])


def test_conservative_dpo_with_label_smoothing():
    # ε = 0.1: 0.9·(−log σ(1)) + 0.1·(−log σ(−1)) = 0.9·0.3132617 + 0.1·1.3132617 = 0.4132617.
    losses, _, _ = preference_loss(**PAIR, beta=0.5, label_smoothing=0.1)
    assert_close(losses, [0.4132617])


def test_robust_dpo():
    # ε = 0.1: (0.9·0.3132617 − 0.1·1.3132617) / 0.8 = (0.8·0.3132617 − 0.1) / 0.8 = 0.3132617 − 0.125.
    losses, _, _ = preference_loss(**PAIR, beta=0.5, loss_type="robust", label_smoothing=0.1)
    assert_close(losses, [0.1882617])
    # With ε = 0 it is plain DPO.
    losses, _, _ = preference_loss(**PAIR, beta=0.5, loss_type="robust")
    assert_close(losses, [NEG_LOGSIG_1])


def test_robust_dpo_needs_label_smoothing_below_half():
    with pytest.raises(ValueError, match="0.5"):
        preference_loss(**PAIR, beta=0.5, loss_type="robust", label_smoothing=0.5)


def test_hinge_loss_on_both_sides_of_the_hinge():
    # β = 0.25: βΔ = 0.5 < 1, loss 1 − 0.5 = 0.5.  β = 1: βΔ = 2 > 1, loss 0.
    losses, _, _ = preference_loss(**PAIR, beta=0.25, loss_type="hinge")
    assert_close(losses, [0.5])
    losses, _, _ = preference_loss(**PAIR, beta=1.0, loss_type="hinge")
    assert_close(losses, [0.0])


def test_ipo_loss():
    # (Δ − 1/(2β))²: β = 0.5 → (2 − 1)² = 1;  β = 0.25 → (2 − 2)² = 0;  β = 1 → (2 − 0.5)² = 2.25.
    for beta, expected in [(0.5, 1.0), (0.25, 0.0), (1.0, 2.25)]:
        losses, _, _ = preference_loss(**PAIR, beta=beta, loss_type="ipo")
        assert_close(losses, [expected])


def test_preference_loss_is_per_pair_and_rewards_are_detached():
    chosen = torch.tensor([-1.0, -3.0], requires_grad=True)
    rejected = torch.tensor([-3.0, -1.0], requires_grad=True)
    # Row 0 is PAIR (βΔ = 1); row 1 swaps the responses (βΔ = −1): −log σ(−1).
    losses, chosen_rewards, rejected_rewards = preference_loss(chosen, rejected, t(-2.0, -2.0), t(-2.0, -2.0), 0.5)
    assert_close(losses, [NEG_LOGSIG_1, NEG_LOGSIG_MINUS_1])
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_nca_loss():
    # β = 0.5. Row 0: log-ratios ±2·ln 3, so r_c = ln 3 and r_r = −ln 3: σ(r_c) = 3/4, σ(−r_c) = 1/4, σ(−r_r) = 3/4;
    #   −ln(3/4) − ½·ln(1/4) − ½·ln(3/4) = 1.5·ln(4/3) + ln 2 = 0.4315231 + 0.6931472 = 1.1246703.
    # Row 1: r_c = r_r = 0: ln 2 + ½·ln 2 + ½·ln 2 = 2·ln 2 = 1.3862944 (DPO's ln 2 at Δ = 0; NCA counts each reward).
    losses, chosen_rewards, rejected_rewards = preference_loss(
        t(2 * math.log(3), 0.0), t(-2 * math.log(3), 0.0), t(0.0, 0.0), t(0.0, 0.0), beta=0.5, loss_type="nca"
    )
    assert_close(losses, [1.1246703, 1.3862944])
    assert_close(chosen_rewards, [math.log(3), 0.0])
    assert_close(rejected_rewards, [-math.log(3), 0.0])


def test_simpo_through_preference_loss_reads_the_log_probs_without_a_reference():
    # The registry entry says SimPO uses no reference: its "log-ratios" are the log-probs, its rewards β·log π.
    losses, chosen_rewards, rejected_rewards = preference_loss(
        t(-1.0, -1.5), t(-2.0, -1.0), None, None, beta=2.0, loss_type="simpo", gamma=1.0, label_smoothing=0.0
    )
    assert_close(losses, simpo_loss(t(-1.0, -1.5), t(-2.0, -1.0), beta=2.0, gamma=1.0))
    assert_close(chosen_rewards, [-2.0, -3.0])
    assert_close(rejected_rewards, [-4.0, -2.0])
    assert not PREFERENCE_LOSSES["simpo"].uses_reference and PREFERENCE_LOSSES["simpo"].average_logps


def test_a_registered_function_is_a_loss_type_with_its_own_options():
    @preference_loss_type("test_margin")
    def margin_loss(chosen_logratios, rejected_logratios, beta, margin=0.0):
        return beta * (rejected_logratios - chosen_logratios) + margin

    try:
        assert PREFERENCE_LOSSES["test_margin"].options == ("margin",)
        # PAIR: Δ = 2, β = 0.5 → −1, plus the margin 3; label_smoothing is not its option and does not reach it.
        losses, _, _ = preference_loss(**PAIR, beta=0.5, loss_type="test_margin", label_smoothing=0.1, margin=3.0)
        assert_close(losses, [2.0])
        with pytest.raises(ValueError, match="already registered"):
            preference_loss_type("test_margin")(margin_loss)
    finally:
        del PREFERENCE_LOSSES["test_margin"]


def test_unknown_preference_loss_type_names_the_allowed_ones():
    with pytest.raises(ValueError, match="sigmoid, robust, hinge, ipo"):
        preference_loss(**PAIR, beta=0.5, loss_type="dpo")


def test_simpo_loss():
    # β = 2, γ = 1: c = −1, r = −2 → 2·1 − 1 = 1 → −log σ(1) = 0.3132617.
    # c = −1.5, r = −1 → 2·(−0.5) − 1 = −2 → −log σ(−2) = log(1 + e²) = 2.1269280.
    assert_close(simpo_loss(t(-1.0, -1.5), t(-2.0, -1.0), beta=2.0, gamma=1.0), [NEG_LOGSIG_1, 2.1269280])


def test_rpo_nll_is_the_mean_over_chosen_tokens():
    # Tokens −1, −2 (row 0) and −3 (row 1); −9 sits on masked positions. NLL = (1 + 2 + 3) / 3 = 2, a token mean:
    # the mean of per-row means would be (1.5 + 3) / 2 = 2.25.
    token_logps = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
    assert_close(rpo_nll_loss(token_logps, torch.tensor([[1, 1, 0], [1, 0, 0]])), 2.0)


def test_kto_kl_estimate_is_the_mean_mismatched_log_ratio():
    # log-ratios (−1 + 2, −2 + 2.5, −3 + 2.5) = (1, 0.5, −0.5) → mean 1/3; negative estimates are kto_loss's to clamp.
    assert_close(kto_kl_estimate(t(-1.0, -2.0, -3.0), t(-2.0, -2.5, -2.5)), 1 / 3)
    assert_close(kto_kl_estimate(t(-3.0), t(-2.0)), -1.0)


def test_kto_desirable_and_undesirable_rows():
    # β = 1, z = kl_ref = 0.5.
    # Desirable row: r = −1 − (−2) = 1, 1 − σ(1 − 0.5) = σ(−0.5) = 0.3775407, weighted by λ_D = 2 → 0.7550813.
    # Undesirable row: r = −3 − (−2) = −1, 1 − σ(0.5 − (−1)) = σ(−1.5) = 0.1824255, by λ_U = 1.5 → 0.2736383.
    losses = kto_loss(
        policy_logps=t(-1.0, -3.0),
        ref_logps=t(-2.0, -2.0),
        desirable=torch.tensor([True, False]),
        kl_ref=torch.tensor(0.5),
        beta=1.0,
        desirable_weight=2.0,
        undesirable_weight=1.5,
    )
    assert_close(losses, [0.7550813, 0.2736383])


def test_kto_clamps_and_detaches_the_reference_point():
    # kl_ref = −0.7 is clamped to z = 0: desirable r = 1 → σ(−1); undesirable r = −1 → 1 − σ(1) = σ(−1) = 0.2689414.
    kl_ref = torch.tensor(-0.7, requires_grad=True)
    policy_logps = torch.tensor([-1.0, -3.0], requires_grad=True)
    losses = kto_loss(policy_logps, t(-2.0, -2.0), torch.tensor([True, False]), kl_ref, beta=1.0)
    assert_close(losses, [0.2689414, 0.2689414])
    losses.sum().backward()
    assert kl_ref.grad is None
    assert policy_logps.grad is not None


def test_bradley_terry_with_and_without_margin():
    # s_c − s_r = 2 − 1 = 1 → −log σ(1); with margin 1 → −log σ(0) = ln 2; per-row margin [0, 1] mixes both.
    assert_close(bradley_terry_loss(t(2.0), t(1.0)), [NEG_LOGSIG_1])
    assert_close(bradley_terry_loss(t(2.0), t(1.0), margin=1.0), [math.log(2)])
    assert_close(bradley_terry_loss(t(2.0, 2.0), t(1.0, 1.0), margin=t(0.0, 1.0)), [NEG_LOGSIG_1, math.log(2)])


# ---------------------------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------------------------



def test_reward_centering_penalises_the_pair_mean_not_the_margin():
    chosen, rejected = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.0])
    assert_close(reward_centering_penalty(chosen, rejected), 2.0)  # sums 0 and 2 → mean of 0 and 4
    shift = torch.tensor([0.5, -3.0])  # widen or narrow each margin: the penalty does not move
    assert_close(reward_centering_penalty(chosen + shift, rejected - shift), 2.0)
    margin = torch.tensor(3.0, requires_grad=True)
    reward_centering_penalty(margin / 2, -margin / 2).backward()
    assert margin.grad == 0.0

def test_ppo_policy_loss_clipping_and_stats():
    # clip c = 0.2; per token ρ, A → max(−Aρ, −A·clip(ρ)), clipped branch active?
    #   ρ 1.1, A +1 → max(−1.1, −1.1) = −1.1, no   (inside the range)
    #   ρ 1.5, A +1 → max(−1.5, −1.2) = −1.2, yes  (above, positive advantage: clipped)
    #   ρ 0.5, A −1 → max( 0.5,  0.8) =  0.8, yes  (below, negative advantage: clipped)
    #   ρ 1.5, A −1 → max( 1.5,  1.2) =  1.5, no   (above, negative advantage: pessimistic unclipped)
    #   ρ 0.5, A +1 → max(−0.5, −0.8) = −0.5, no   (below, positive advantage: pessimistic unclipped)
    #   ρ 3.0, A +2 → masked out (would be −2.4, clipped)
    # loss = (−1.1 − 1.2 + 0.8 + 1.5 − 0.5) / 5 = −0.1;  clipfrac = 2/5 = 0.4
    # approxkl = mean ½(ln ρ)² = ½·(0.0090840 + 0.1644020 + 0.4804530 + 0.1644020 + 0.4804530) / 5 = 0.1298794
    ratios = t(1.1, 1.5, 0.5, 1.5, 0.5, 3.0).unsqueeze(0)
    old_logprobs = torch.full_like(ratios, -1.0)
    logprobs = (old_logprobs + ratios.log()).requires_grad_()
    advantages = t(1.0, 1.0, -1.0, -1.0, 1.0, 2.0).unsqueeze(0)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])

    loss, stats = ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=0.2)
    assert_close(loss, -0.1)
    assert_close(stats["clipfrac"], 0.4)
    assert_close(stats["approxkl"], 0.1298794)
    assert not any(value.requires_grad for value in stats.values())

    # d/d logprob of −Aρ/5 is −Aρ/5 on the unclipped tokens; clipped and masked tokens get no gradient.
    loss.backward()
    assert_close(logprobs.grad, [[-1.1 / 5, 0.0, 0.0, 1.5 / 5, -0.5 / 5, 0.0]])


def test_ppo_value_loss_clipped_and_unclipped():
    # c = 0.2; per token v, v_old, R → clip(v) and max((v − R)², (clip(v) − R)²), clipped loss larger?
    #   1.0, 0.9, 1.5 → clip 1.0: max(0.25, 0.25) = 0.25, no   (inside the range)
    #   2.0, 1.0, 1.0 → clip 1.2: max(1.00, 0.04) = 1.00, no   (clipping would help, unclipped kept)
    #   2.0, 1.0, 3.0 → clip 1.2: max(1.00, 3.24) = 3.24, yes
    #   10,  0,  −10  → masked out
    # loss = ½·(0.25 + 1 + 3.24) / 3 = 0.7483333;  clipfrac = 1/3
    values = t(1.0, 2.0, 2.0, 10.0).unsqueeze(0)
    old_values = t(0.9, 1.0, 1.0, 0.0).unsqueeze(0)
    returns = t(1.5, 1.0, 3.0, -10.0).unsqueeze(0)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo_value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    assert_close(loss, 0.7483333)
    assert_close(stats["clipfrac"], 1 / 3)


@pytest.mark.parametrize(
    "ratio, kind, expected",
    [
        # ρ = 2: k1 ln 2; k2 ½(ln 2)²; k3 (1/2 − 1) + ln 2; abs ln 2.
        (2.0, "k1", 0.6931472),
        (2.0, "k2", 0.2402265),
        (2.0, "k3", 0.1931472),
        (2.0, "abs", 0.6931472),
        # ρ = 1/2: k1 −ln 2; k2 ½(ln 2)²; k3 (2 − 1) − ln 2; abs ln 2.
        (0.5, "k1", -0.6931472),
        (0.5, "k2", 0.2402265),
        (0.5, "k3", 0.3068528),
        (0.5, "abs", 0.6931472),
    ],
)
def test_kl_penalty_kinds(ratio, kind, expected):
    ref_logprobs = t(-1.0)
    assert_close(kl_penalty(ref_logprobs + math.log(ratio), ref_logprobs, kind), [expected])


def test_unknown_kl_penalty_kind():
    with pytest.raises(ValueError, match="k1, k2, k3, abs"):
        kl_penalty(t(0.0), t(0.0), "full")


def test_entropy_from_logits_by_hand():
    from lit_rlhf.losses import entropy_from_logits

    # Uniform over 4: H = ln 4. Probabilities (1/2, 1/4, 1/4) from logits ln(2), 0, 0: H = 1.5·ln 2.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0, -math.inf]])
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([math.log(4.0), 1.5 * math.log(2.0)]))
