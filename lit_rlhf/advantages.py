"""Score shaping (normalising, an ensemble's combination, transforms against a reference answer, caps),
advantage estimation, whitening, reward shaping and group baselines, as pure functions of tensors.

Token-level tensors are ``[B, T]`` with a 0/1 ``mask`` marking the response tokens; outputs are 0 wherever the
mask is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_rlhf.losses import kl_penalty, masked_mean, masked_var

GROUP_ADVANTAGE_KINDS = ("grpo", "rloo")
ENSEMBLE_RULES = ("mean", "worst_case", "uncertainty")
SCORE_TRANSFORMS = ("none", "preference", "log_sigmoid")


def normalize_scores(scores: Tensor, mean: float, std: float) -> Tensor:
    """(s − mean) / std, with the mean and std of the reward model's scores for samples of the policy to be trained:
    those samples then score mean 0 and variance 1, as Ziegler et al. 2019 normalise their reward model. A fixed map,
    not a batch statistic, so a score means the same at every iteration, and β and the missing-EOS penalty are in
    units of that std."""
    return (scores - mean) / std


def penalize_missing_eos(scores: Tensor, ended_with_eos: Tensor, penalty: float | None) -> Tensor:
    """s − penalty·[no EOS], ``[B]``: an answer cut at the length limit loses ``penalty`` (no penalty when it is None
    or 0), so that rambling past the limit does not pay. Huang et al. 2024 ("The N+ Implementation Details of RLHF
    with PPO") give such answers a constant score instead; subtracting, like TRL's ``missing_eos_penalty``, keeps the
    reward model's order among them."""
    if not penalty:
        return scores
    return scores - penalty * (~ended_with_eos.bool()).float()


def clip_scores(scores: Tensor, limit: float | None) -> Tensor:
    """Scores clamped to [−limit, limit] (unchanged when ``limit`` is None), so that one outlier score cannot dominate
    the advantages of its batch (TRL's ``score_clip``, trlX's ``cliprange_reward``)."""
    if limit is None:
        return scores
    return scores.clamp(-limit, limit)


def combine_ensemble(member_scores: Tensor, rule: str, uncertainty_penalty: float = 1.0) -> Tensor:
    """One score per answer from ``member_scores`` ``[K, B]``, the normalised scores of K reward models (Coste et al.
    2024, "Reward Model Ensembles Help Mitigate Overoptimization", §3): ``mean`` their mean; ``worst_case`` their
    minimum (WCO), an answer only as good as its harshest member says; ``uncertainty`` the mean less λ times the
    variance over members, (1/K)·Σ_k (r_k − r̄)² (UWO), so that answers the members disagree on, those away from
    the comparisons they learnt from, pay for it."""
    if rule == "mean":
        return member_scores.mean(dim=0)
    if rule == "worst_case":
        return member_scores.min(dim=0).values
    if rule == "uncertainty":
        return member_scores.mean(dim=0) - uncertainty_penalty * member_scores.var(dim=0, unbiased=False)
    raise ValueError(f"unknown ensemble rule {rule!r}; expected one of {', '.join(ENSEMBLE_RULES)}")


def transform_scores(scores: Tensor, reference_scores: Tensor, transform: str) -> Tensor:
    """Each answer's score measured against the score of a reference answer to the same prompt (the SFT policy's):
    ``preference``, σ(r − r_ref), the probability under Bradley–Terry that the answer beats the reference one
    (preference as reward, Fu et al. 2025, "Reward Shaping to Mitigate Reward Hacking in RLHF"): bounded in (0, 1),
    so far past the reference there is little left to gain; ``log_sigmoid``, log σ(r − r_ref) (Wang et al. 2024,
    "Transforming and Combining Rewards for Aligning Large Language Models"): steep below the reference and flat
    above it, so fixing a bad answer pays more than polishing a good one; ``none``, r unchanged."""
    if transform == "none":
        return scores
    if transform == "preference":
        return torch.sigmoid(scores - reference_scores)
    if transform == "log_sigmoid":
        return torch.nn.functional.logsigmoid(scores - reference_scores)
    raise ValueError(f"unknown score transform {transform!r}; expected one of {', '.join(SCORE_TRANSFORMS)}")


def cap_scores(scores: Tensor, cap: float | None) -> Tensor:
    """min(r, cap) (unchanged when ``cap`` is None): no answer is worth more than ``cap``, so the policy gains nothing
    by pushing the reward model past it, the simplest of the shaping baselines Fu et al. 2025 compare."""
    return scores if cap is None else scores.clamp(max=cap)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation, Schulman et al. 2016, eq. 16: A_t = Σ_l (γλ)^l δ_{t+l} with
    δ_t = r_t + γ·V_{t+1} − V_t. Returns ``(advantages, returns)``, both ``[B, T]``, returns = A + V.

    Rows may end at different positions (right padding) and may start with masked prompt positions. Masked
    positions get advantage and return 0, and their rewards and values never reach valid positions: the value
    after the last valid token is 0 (the episode ends there), and a 0 inside a row's mask ends the episode for
    the positions before it. Computed without gradient: these are regression targets.
    """
    rewards, values = rewards.detach(), values.detach()
    valid = mask.bool()
    rewards = torch.where(valid, rewards, torch.zeros_like(rewards))
    values = torch.where(valid, values, torch.zeros_like(values))

    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(valid[:, t], delta + gamma * lam * next_advantage, torch.zeros_like(delta))
        advantages[:, t] = advantage
        # Masked values and advantages are 0, so an invalid next position bootstraps nothing.
        next_value, next_advantage = values[:, t], advantage

    returns = torch.where(valid, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise ``x`` to mean 0 and variance 1 over all masked-in positions of the batch (as in TRL's
    ``masked_whiten``); the variance is the unbiased one (Bessel-corrected, like TRL's ``masked_var``).

    ``shift_mean=False`` only rescales: the mean is added back, e.g. to keep the sign of rewards.
    Positions outside the mask are 0 in the output.
    """
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def shape_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, beta: float, kind: str = "k1"
) -> Tensor:
    """Per-token RLHF reward ``[B, T]``: −β·KL penalty on every response token, plus the sequence score
    ``scores[b]`` on the last valid token of row b (Ziegler et al. 2019, §2; Ouyang et al. 2022, eq. 2).

    ``kind`` picks the KL estimator (see :func:`lit_rlhf.losses.kl_penalty`); a trainer should use ``k1``, log π/π_ref:
    with k2 or k3 as a fixed per-token reward the expected update is not the gradient of KL(π‖π_ref) (Tang & Munos
    2025). For the same reason the critic-free estimators take the KL here too, in the reward, rather than GRPO's
    published k3 term in the loss: differentiated through the samples, that term has the gradient of KL(π_ref‖π)
    and stops short of the KL-regularised optimum π* ∝ π_ref·exp(r/β), which the reward form reaches
    (tests/test_ppo.py checks that optimum on a bandit for every estimator).

    The last valid token is the last position where ``mask`` is non-zero, so leading prompt positions are fine. A
    row with an empty mask has no token to credit and gets all zeros.
    """
    valid = mask.bool()
    rewards = -beta * kl_penalty(logprobs, ref_logprobs, kind)
    rewards = torch.where(valid, rewards, torch.zeros_like(rewards))

    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(valid)
    last_valid = torch.where(valid, positions, -1).amax(dim=1)
    has_valid = last_valid >= 0
    score_credit = torch.where(has_valid, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))
    return rewards.scatter_add(1, last_valid.clamp_min(0).unsqueeze(1), score_credit.unsqueeze(1))


def group_advantages(scores: Tensor, group_size: int, kind: str) -> Tensor:
    """Critic-free advantages ``[B]`` from groups of completions of the same prompt.

    ``scores`` is ``[B]`` with consecutive runs of ``group_size`` rows forming a group.

    - ``grpo``: (s − group mean) / (group std + 1e-6), GRPO outcome supervision (Shao et al. 2024, §4.1.2),
      with the unbiased (n − 1) standard deviation, as TRL's GRPO uses.
    - ``rloo``: s − mean of the other members of its group, the REINFORCE leave-one-out baseline
      (Ahmadian et al. 2024, "Back to Basics", RLOO).

    Each is normalised once, per sequence, as the papers define it: whitening again over tokens would shift it by
    a length-weighted mean and could turn a short above-average answer's advantage negative.
    """
    if kind not in GROUP_ADVANTAGE_KINDS:
        raise ValueError(f"unknown group advantage kind {kind!r}; expected one of {', '.join(GROUP_ADVANTAGE_KINDS)}")
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2 to form a baseline; got {group_size}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(f"batch of {scores.shape[0]} scores is not divisible into groups of {group_size}")

    groups = scores.view(-1, group_size)
    if kind == "grpo":
        advantages = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + 1e-6)
    else:
        others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
        advantages = groups - others_mean
    return advantages.reshape(-1)
