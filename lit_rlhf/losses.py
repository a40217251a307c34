"""Every loss of the package as a pure function of tensors (imports only torch).

Phases call these functions and never inline a formula. Conventions shared by all of them:

- ``mask`` tensors are 0/1 (or bool) and have the shape of the values they mask. Masked reductions skip masked-out
  positions entirely, so a NaN or ``-inf`` sitting on a padding position never reaches the result.
- Per-example losses are returned unreduced (shape ``[B]``) so the caller chooses the reduction and can log them;
  the PPO losses, which are token-level, return the masked mean and a dict of detached statistics.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

KL_PENALTY_KINDS = ("k1", "k2", "k3", "abs")


# --------------------------------------------------------------------------------------------------------------
# Masked reductions (the one place for them; advantages.py reuses these)
# --------------------------------------------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over the positions where ``mask`` is non-zero, weighted by ``mask``.

    Masked-out positions are replaced by 0 before multiplying, so ``nan``/``inf`` values there cannot leak.
    """
    mask = mask.to(x.dtype)
    weighted = torch.where(mask != 0, x, torch.zeros_like(x)) * mask
    return weighted.sum() if dim is None else weighted.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is non-zero (over all of them when ``dim`` is None).

    An empty mask gives 0 instead of NaN, so a batch whose responses are all empty cannot poison training.
    """
    total = masked_sum(x, mask, dim)
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return total / count.clamp_min(torch.finfo(x.dtype).tiny)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all masked-in positions (a scalar).

    ``unbiased=True`` applies Bessel's correction n/(n−1), as TRL's ``masked_var`` does; with a single valid
    position there is nothing to correct and the (zero) biased variance is returned rather than NaN.
    """
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = mask.to(x.dtype).sum()
        variance = variance * count / (count - 1).clamp_min(1)
    return variance


# --------------------------------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-position entropy ``H = logsumexp(l) − Σ softmax(l)·l`` of the categorical distribution the logits
    define, ``[..., V] → [...]``, in float32. PPO's optional entropy bonus (Schulman et al. 2017, eq. 9)."""
    logits = logits.float()
    # A −inf logit has probability 0 and contributes 0 (not 0·∞ = NaN) to the expectation.
    expected_logit = torch.nan_to_num(torch.softmax(logits, dim=-1) * logits, nan=0.0).sum(dim=-1)
    return torch.logsumexp(logits, dim=-1) - expected_logit


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label token: ``logits[b, t, labels[b, t]] − logsumexp(logits[b, t])``.

    The one log-prob function of the package. ``logits`` is ``[B, T, V]`` and ``labels`` ``[B, T]``, already
    aligned (no shifting here; see :func:`shift_for_next_token`). ``labels`` must hold valid token ids at every
    position (use a mask, not ``-100``, to exclude positions). Returns ``[B, T]`` in float32 whatever the
    dtype of ``logits``.

    A full ``log_softmax`` would materialise a second ``[B, T, V]`` tensor; instead only the label logits are
    gathered and the normaliser is computed one sequence at a time, so the float32 temporary that
    ``logsumexp`` needs is one ``[T, V]`` row, not the whole batch.
    """
    label_logits = torch.gather(logits, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1).float()
    if logits.shape[0] == 0:
        return label_logits
    log_normalisers = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])
    return label_logits - log_normalisers


def shift_for_next_token(logits: Tensor, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Align a causal LM's outputs with the tokens they predict: ``(logits[:, :-1], input_ids[:, 1:], mask[:, 1:])``.

    The logits at position t score token t+1, so the last logits and the first token (and its mask) drop out.
    """
    return logits[:, :-1], input_ids[:, 1:], mask[:, 1:]


def sequence_logprobs(token_logps: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Log-probability of each sequence ``[B]``: masked sum of ``token_logps`` ``[B, T]`` over T.

    ``average=True`` divides by the number of masked-in tokens: the length-normalised log-likelihood that
    SimPO (Meng et al. 2024, eq. 4) uses as its implicit reward.
    """
    if average:
        return masked_mean(token_logps, mask, dim=-1)
    return masked_sum(token_logps, mask, dim=-1)


def sft_loss(logits: Tensor, input_ids: Tensor, response_mask: Tensor) -> Tensor:
    """Causal-LM negative log-likelihood of the response tokens (scalar).

    ``response_mask[b, t] = 1`` marks token t of ``input_ids`` as a response token whose likelihood counts;
    prompt and padding positions are 0. The mean is over all response tokens of the batch (token-level), so a
    long response weighs more than a short one, as in standard supervised fine-tuning (Ouyang et al. 2022, §3.5).
    """
    logits, targets, target_mask = shift_for_next_token(logits, input_ids, response_mask)
    return -masked_mean(token_logprobs(logits, targets), target_mask)


# --------------------------------------------------------------------------------------------------------------
# Preference losses
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceLoss:
    """A pairwise preference loss of :data:`PREFERENCE_LOSSES`: ``function(chosen, rejected, beta, **options)`` gives
    the per-pair losses ``[B]`` from each response's log-ratio log π − log π_ref (``[B]`` each) or, for a loss with
    ``uses_reference=False``, from its log-prob log π. ``average_logps`` asks for length-averaged log-probs
    (:func:`sequence_logprobs` with ``average=True``) instead of sums."""

    function: Callable[..., Tensor]
    uses_reference: bool = True
    average_logps: bool = False

    @property
    def options(self) -> tuple[str, ...]:
        """The loss's own keyword arguments, those after ``(chosen, rejected, beta)``: ``label_smoothing``, …"""
        return tuple(inspect.signature(self.function).parameters)[3:]


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {}
"""The registered pairwise preference losses by name, filled by :func:`preference_loss_type`. :func:`preference_loss`
dispatches on it, and ``DPOModule``'s ``loss_type`` takes its choices from it."""


def preference_loss_type(name: str, uses_reference: bool = True, average_logps: bool = False):
    """Decorator that registers a function as the pairwise preference loss ``name`` (see :class:`PreferenceLoss`):
    one function is all a new variant needs to be a ``loss_type`` of :func:`preference_loss` and ``DPOModule``."""

    def register(function: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in PREFERENCE_LOSSES:
            raise ValueError(f"a preference loss named {name!r} is already registered")
        PREFERENCE_LOSSES[name] = PreferenceLoss(function, uses_reference, average_logps)
        return function

    return register


@preference_loss_type("sigmoid")
def dpo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO, Rafailov et al. 2023, eq. 7: −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ) with Δ = ``chosen_logratios`` −
    ``rejected_logratios``; ε = ``label_smoothing`` > 0 is conservative DPO (labels flipped with probability ε)."""
    delta = chosen_logratios - rejected_logratios
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


@preference_loss_type("robust")
def robust_dpo_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """(−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)) / (1 − 2ε), Δ as in :func:`dpo_loss`: the unbiased loss under label noise
    ε = ``label_smoothing`` of Chowdhury et al. 2024 (Provably Robust DPO); needs ε < 0.5."""
    if not label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs label_smoothing < 0.5 (it divides by 1 − 2ε); got {label_smoothing}")
    delta = chosen_logratios - rejected_logratios
    return (
        -(1 - label_smoothing) * F.logsigmoid(beta * delta) + label_smoothing * F.logsigmoid(-beta * delta)
    ) / (1 - 2 * label_smoothing)


@preference_loss_type("hinge")
def hinge_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """max(0, 1 − βΔ), Δ as in :func:`dpo_loss`: the rank-calibration loss of SLiC (Zhao et al. 2023) with margin
    1/β."""
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


@preference_loss_type("ipo")
def ipo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """(Δ − 1/(2β))², Δ as in :func:`dpo_loss`: IPO, Azar et al. 2023, eq. 17 (β plays the role of τ). Δ is the
    un-normalised log-ratio difference, so pass length-averaged log-probs if you want IPO's per-token form."""
    return (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2


@preference_loss_type("nca")
def nca_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """NCA on preference pairs (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
    Rewards"; TRL's ``nca_pair``): −log σ(r_c) − ½·log σ(−r_c) − ½·log σ(−r_r) with the rewards r = β·(log π − log
    π_ref). DPO sees only the margin r_c − r_r, so both likelihoods may fall together; here each response's reward
    counts on its own, and the chosen one's terms are least at r_c = log 2 (σ(r_c) = 2·σ(−r_c)), above the
    reference: NCA optimises absolute likelihoods where DPO optimises relative ones."""
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


@preference_loss_type("simpo", uses_reference=False, average_logps=True)
def simpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, beta: float, gamma: float) -> Tensor:
    """SimPO, Meng et al. 2024, eq. 6: −log σ(β·(c − r) − γ) per pair ``[B]``.

    ``c``/``r`` are length-averaged log-probs (``sequence_logprobs(..., average=True)``); no reference model.
    ``gamma`` is the target reward margin itself (not TRL's ``gamma_beta_ratio`` = γ/β).
    """
    return -F.logsigmoid(beta * (chosen_avg_logps - rejected_avg_logps) - gamma)


def preference_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    **options: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The registered pairwise preference loss ``loss_type`` (:data:`PREFERENCE_LOSSES`) on a batch of pairs, with
    the implicit reward β·(log π − log π_ref); returns ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``,
    the rewards detached.

    A reference-free loss (SimPO) reads the log-probs themselves, its rewards are β·log π, and the reference
    arguments may be None. ``label_smoothing`` and the other ``options`` (SimPO's ``gamma``) reach the losses that
    take them and no others, so one set of settings serves every loss type: ``label_smoothing`` affects only
    ``sigmoid`` and ``robust``.
    """
    loss = PREFERENCE_LOSSES.get(loss_type)
    if loss is None:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(PREFERENCE_LOSSES)}")
    if loss.uses_reference:
        chosen, rejected = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    else:
        chosen, rejected = chosen_logps, rejected_logps
    settings = {"label_smoothing": label_smoothing, **options}
    own_settings = {name: settings[name] for name in loss.options if name in settings}
    return loss.function(chosen, rejected, beta, **own_settings), beta * chosen.detach(), beta * rejected.detach()


def rpo_nll_loss(chosen_token_logps: Tensor, chosen_mask: Tensor) -> Tensor:
    """RPO's auxiliary term (scalar): the negative log-likelihood of the chosen responses, ``[B, T]`` token log-probs
    averaged over every masked-in token of the batch, added to a preference loss with a weight α (``rpo_alpha``).

    Pang et al. 2024 ("Iterative Reasoning Preference Optimization", §2) add this NLL of the winner to DPO and find it
    necessary; Liu et al. 2024 ("Provably Mitigating Overoptimization in RLHF", RPO) show that it regularises against
    overoptimisation. Pang et al. normalise each response by its length; the mean here is over tokens, as TRL's
    ``rpo_alpha``, so a long chosen response weighs more, as in :func:`sft_loss`.
    """
    return -masked_mean(chosen_token_logps, chosen_mask)


def kto_kl_estimate(mismatched_logps: Tensor, mismatched_ref_logps: Tensor) -> Tensor:
    """KTO's estimate of KL(π‖π_ref) (Ethayarajh et al. 2024), from which its reference point z = max(KL, 0) comes
    (:func:`kto_loss` clamps and detaches it): the mean log-ratio log π(y'|x) − log π_ref(y'|x) ``[B] → scalar`` over
    mismatched pairs, each prompt x with the completion y' of another row of the batch. The caller computes it without
    gradient and averages it over devices."""
    return (mismatched_logps - mismatched_ref_logps).mean()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_ref: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (Ethayarajh et al. 2024): per-example losses ``[B]`` for unpaired feedback.

    With r = log π − log π_ref and the reference point z = max(``kl_ref``, 0) (detached: the paper does not
    backpropagate through it), desirable rows (``desirable`` True) cost λ_D·(1 − σ(β(r − z))) and undesirable
    rows λ_U·(1 − σ(β(z − r))). ``kl_ref`` is a scalar tensor, usually the batch estimate of KL(π‖π_ref) on
    mismatched prompt/completion pairs.
    """
    logratios = policy_logps - ref_logps
    reference_point = kl_ref.detach().clamp_min(0)
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - reference_point)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (reference_point - logratios)))
    return torch.where(desirable.bool(), desirable_losses, undesirable_losses)


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None) -> Tensor:
    """Reward-model loss −log σ(s_c − s_r − m) per pair ``[B]``.

    Bradley–Terry likelihood of the human choice (Stiennon et al. 2020, eq. 1; Ouyang et al. 2022, eq. 1); the
    optional ``margin`` m (scalar or ``[B]``) asks for a larger gap on clearer preferences (Touvron et al. 2023,
    Llama 2, eq. 2).
    """
    logits = chosen_scores - rejected_scores
    if margin is not None:
        logits = logits - margin
    return -F.logsigmoid(logits)


def reward_centering_penalty(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Auxiliary loss mean((s_c + s_r)²) over pairs (Eisenstein et al. 2023, "Helping or Herding?", §3; TRL's
    ``center_rewards_coefficient``): it pulls each pair's mean score to zero, so scores stay centred without a
    normalisation pass, and it does not touch the margin s_c − s_r that the Bradley–Terry loss learns (penalising
    s_c² and s_r² separately would shrink the margin too)."""
    return (chosen_scores + rejected_scores).pow(2).mean()


# --------------------------------------------------------------------------------------------------------------
# PPO
# --------------------------------------------------------------------------------------------------------------


def pearson_correlation(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson's ρ of two ``[N]`` tensors, differentiable; 0 where either is constant."""
    x, y = x.float() - x.float().mean(), y.float() - y.float().mean()
    return (x * y).sum() / ((x.square().sum() * y.square().sum()).sqrt() + eps)


def odin_length_loss(quality: Tensor, length_scores: Tensor, lengths: Tensor) -> Tensor:
    """ODIN's disentangling loss (Chen et al. 2024, "ODIN: Disentangled Reward Mitigates Hacking in RLHF", §4):
    |ρ(r_Q, L)| − ρ(r_L, L) over a batch of answers of ``lengths`` L, so that the quality head r_Q carries no linear
    trace of length and the length head r_L carries it all; the Bradley–Terry loss is taken on r_Q + r_L, and only
    r_Q scores afterwards."""
    return pearson_correlation(quality, lengths).abs() - pearson_correlation(length_scores, lengths)


def odin_orthogonality_loss(quality_weight: Tensor, length_weight: Tensor) -> Tensor:
    """|w_Q · w_L|, ODIN's orthogonality of the two heads' weight vectors (Chen et al. 2024, §4), so that they read
    different directions of the last hidden state."""
    return (quality_weight.flatten() * length_weight.flatten()).sum().abs()


def odin_penalty(
    quality: Tensor, length_scores: Tensor, lengths: Tensor, quality_weight: Tensor, length_weight: Tensor,
    length_coef: float, orthogonality_coef: float,
) -> Tensor:
    """ODIN's two terms added to the Bradley–Terry loss on r_Q + r_L (Chen et al. 2024, §4):
    λ_L·(|ρ(r_Q, L)| − ρ(r_L, L)) + λ_O·|w_Q · w_L|."""
    return (length_coef * odin_length_loss(quality, length_scores, lengths)
            + orthogonality_coef * odin_orthogonality_loss(quality_weight, length_weight))


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, Schulman et al. 2017, eq. 7, as a loss: masked mean of
    max(−A·ρ, −A·clip(ρ, 1−c, 1+c)) with ρ = exp(logprobs − old_logprobs); all inputs ``[B, T]``.

    ``old_logprobs`` and ``advantages`` are constants of the objective and are detached here.
    Returns ``(loss, stats)`` with detached scalars ``clipfrac`` (fraction of masked-in tokens where the clipped
    branch is the active one, i.e. carries no gradient) and ``approxkl`` (masked mean of ½(log ρ)², the k2
    estimator of KL(π_old‖π)).
    """
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approxkl": masked_mean(0.5 * log_ratio**2, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss of PPO implementations (Schulman et al. 2017; the OpenAI baselines ``ppo2`` form):
    ½·masked mean of max((v − R)², (clip(v, v_old − c, v_old + c) − R)²); all inputs ``[B, T]``.

    ``old_values`` and ``returns`` are targets and are detached here. Returns ``(loss, stats)`` with the
    detached scalar ``clipfrac``: fraction of masked-in tokens where the clipped loss is the larger one.
    """
    old_values = old_values.detach()
    returns = returns.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_loss > unclipped_loss).to(values.dtype), mask)}
    return loss, stats


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(π‖π_ref) from samples of π, with ρ = π/π_ref (Schulman 2020, "Approximating KL
    divergence"):

    - ``k1``: log ρ — unbiased, high variance, can be negative.
    - ``k2``: ½(log ρ)² — biased, low variance, always ≥ 0.
    - ``k3``: (ρ⁻¹ − 1) + log ρ — unbiased, low variance, always ≥ 0.
    - ``abs``: |log ρ|.

    Same shape as the inputs; no masking (callers mask).
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    if kind == "abs":
        return log_ratio.abs()
    raise ValueError(f"unknown KL penalty kind {kind!r}; expected one of {', '.join(KL_PENALTY_KINDS)}")
