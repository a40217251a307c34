"""The phases' settings groups: small frozen dataclasses that jsonargparse nests (``--model.update.clip_range``),
each checking its own ranges, stored in checkpoints and ``hparams.yaml`` as plain mappings.

Here: every phase's :class:`OptimizerConfig`, PPO's :class:`UpdateConfig`, :class:`AdvantageConfig`,
:class:`RewardConfig` and :class:`PTXConfig`, and the reward model's :class:`ODINConfig`. The groups that a mechanism
below the phases reads live with it: :class:`~lit_rlhf.generation.SamplingConfig`,
:class:`~lit_rlhf.kl_control.KLControlConfig` and :class:`~lit_rlhf.models.LoRAConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, is_dataclass
from typing import Literal, TypeVar

from lightning.pytorch import LightningModule

from lit_rlhf.advantages import SCORE_TRANSFORMS
from lit_rlhf.errors import ConfigError
from lit_rlhf.generation import SamplingConfig
from lit_rlhf.models import LoRAConfig

Settings = TypeVar("Settings")


def check_settings(
    positive: Mapping[str, float | None] | None = None,
    non_negative: Mapping[str, float] | None = None,
    unit: Mapping[str, float] | None = None,
) -> None:
    """One line for a setting out of its range, which would otherwise train silently into nonsense: ``positive``
    ones must be > 0 (learning rates, β, clip ranges, counts; ``None`` is unset), ``non_negative`` ones ≥ 0
    (coefficients, temperatures where 0 means greedy), ``unit`` ones in [0, 1]."""
    for name, value in (positive or {}).items():
        if value is not None and not value > 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    for name, value in (non_negative or {}).items():
        if not value >= 0:
            raise ConfigError(f"{name} must not be negative, got {value}")
    for name, value in (unit or {}).items():
        if not 0 <= value <= 1:
            raise ConfigError(f"{name} must be between 0 and 1, got {value}")


def as_config(kind: type[Settings], value: Settings | Mapping | None) -> Settings | None:
    """A settings group as its dataclass: the CLI and ``__init__`` pass the dataclass, a checkpoint's
    hyperparameters the plain mapping that LightningCLI saves."""
    return kind(**value) if isinstance(value, Mapping) else value


def keep_settings(
    module: LightningModule, optimizer: OptimizerConfig | Mapping, sampling: SamplingConfig | Mapping,
    lora: LoRAConfig | Mapping | None,
) -> None:
    """Called right after ``module.save_hyperparameters()``, which reads the arguments of the ``__init__`` that calls
    it: each settings group in ``hparams`` becomes a plain mapping, as LightningCLI saves it (checkpoints load with
    ``weights_only``, ``hparams.yaml`` is plain YAML), and the groups every phase has are kept on the module as their
    dataclasses: ``optimizer_config``, ``sampling`` and ``lora`` (None without LoRA)."""
    for name, value in module.hparams.items():
        if is_dataclass(value):
            module.hparams[name] = asdict(value)
    module.optimizer_config = as_config(OptimizerConfig, optimizer)
    module.sampling = as_config(SamplingConfig, sampling)
    module.lora = as_config(LoRAConfig, lora)


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW's settings, one group in every phase (``--model.optimizer.learning_rate``); each phase sets its own
    defaults.

    Args:
        learning_rate: the peak rate, reached after the warm-up
        weight_decay: AdamW's decoupled weight decay
        warmup_steps: optimiser steps of linear warm-up from 0; SFT, the reward model and DPO then decay the rate
            along a cosine to 0 at the last step, PPO holds it
    """

    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        check_settings(positive={"optimizer.learning_rate": self.learning_rate},
                       non_negative={"optimizer.weight_decay": self.weight_decay,
                                     "optimizer.warmup_steps": self.warmup_steps})


@dataclass(frozen=True)
class UpdateConfig:
    """How PPO learns from one iteration's rollouts (``--model.update.epochs``): the passes, the clipped objectives
    (Schulman et al. 2017) and their loss weights, the critic's rate and the early stop.

    Args:
        epochs: passes over each iteration's rollouts
        num_minibatches: optimiser updates per pass, each on its share of the rollouts
        gradient_accumulation_steps: micro-batches whose gradients make one update (memory, not arithmetic)
        clip_range: ε of the policy's clipped ratio
        clip_range_value: how far a value may move from the rollout's before its loss is clipped
        vf_coef: the critic's loss weight; Adam undoes a constant scale of a loss, so it acts only through the
            gradient-norm clip both networks share: ``value_learning_rate`` sets the critic's steps
        entropy_coef: weight of the entropy bonus subtracted from the loss
        max_grad_norm: clip each update's gradient norm (policy and critic together) to this; None: no clip
        target_kl: the most approximate KL to the sampling policy (``policy/approxkl``) a minibatch may start from
            before the iteration's remaining updates are dropped; None: never stop early
        value_learning_rate: the critic's rate; None takes the policy's (``optimizer.learning_rate``)
    """

    epochs: int = 4
    num_minibatches: int = 1
    gradient_accumulation_steps: int = 1
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    max_grad_norm: float | None = 1.0
    target_kl: float | None = None
    value_learning_rate: float | None = 1e-3

    def __post_init__(self) -> None:
        check_settings(
            positive={"update.epochs": self.epochs, "update.num_minibatches": self.num_minibatches,
                      "update.gradient_accumulation_steps": self.gradient_accumulation_steps,
                      "update.clip_range": self.clip_range, "update.clip_range_value": self.clip_range_value,
                      "update.max_grad_norm": self.max_grad_norm, "update.target_kl": self.target_kl,
                      "update.value_learning_rate": self.value_learning_rate},
            non_negative={"update.vf_coef": self.vf_coef, "update.entropy_coef": self.entropy_coef},
        )


@dataclass(frozen=True)
class AdvantageConfig:
    """How each token's advantage is estimated (``--model.advantage.estimator``).

    Args:
        estimator: ``gae`` (a critic, Schulman et al. 2016), or the critic-free ``grpo`` (Shao et al. 2024) and
            ``rloo`` (Ahmadian et al. 2024), which compare ``group_size`` answers to one prompt
        group_size: answers sampled per prompt for ``grpo`` and ``rloo`` (at least 2, to form a baseline)
        gamma: GAE's discount per token
        lam: GAE's λ, trading the critic's bias for the returns' variance
        whiten: whiten GAE's advantages over the rollout's tokens (the group estimators are normalised already)
    """

    estimator: Literal["gae", "grpo", "rloo"] = "gae"
    group_size: int = 4
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True

    def __post_init__(self) -> None:
        if self.estimator not in ("gae", "grpo", "rloo"):
            raise ConfigError(f"advantage.estimator must be gae, grpo or rloo, got {self.estimator!r}")
        if self.estimator != "gae" and self.group_size < 2:
            raise ConfigError(f"{self.estimator} needs advantage.group_size >= 2 to form a baseline, got "
                              f"{self.group_size}")
        check_settings(unit={"advantage.gamma": self.gamma, "advantage.lam": self.lam})

    @property
    def answers_per_prompt(self) -> int:
        """Answers sampled per prompt in a rollout: one for ``gae``, a group for the critic-free estimators."""
        return 1 if self.estimator == "gae" else self.group_size


@dataclass(frozen=True)
class RewardConfig:
    """What PPO does to the reward model's score before the KL penalty joins it (``--model.reward.clip``), in this
    order: normalise, transform, cap, the missing-EOS penalty, clip (:mod:`lit_rlhf.advantages`).

    Args:
        normalize: with the mean and standard deviation the reward phase stored: scores in standard deviations
        transform: ``preference`` σ(r − r_ref) or ``log_sigmoid`` log σ(r − r_ref), against the score of the
            reference policy's answer to the same prompt (sampled each iteration: one more answer per prompt), or
            ``none``; shaping that leaves little to gain past the reference (:func:`transform_scores`)
        cap: no score above this; None: no cap
        missing_eos_penalty: subtracted from the score of an answer cut at ``sampling.max_new_tokens``; None: none
        clip: clip scores to ±this, against outliers; None: no clip
    """

    normalize: bool = True
    transform: Literal["none", "preference", "log_sigmoid"] = "none"
    cap: float | None = None
    missing_eos_penalty: float | None = None
    clip: float | None = None

    def __post_init__(self) -> None:
        if self.transform not in SCORE_TRANSFORMS:
            raise ConfigError(f"reward.transform must be one of {', '.join(SCORE_TRANSFORMS)}, got {self.transform!r}")
        check_settings(positive={"reward.clip": self.clip},
                       non_negative={"reward.missing_eos_penalty": self.missing_eos_penalty or 0.0})


@dataclass(frozen=True)
class PTXConfig:
    """PPO-ptx (InstructGPT §3.5): the SFT loss on demonstrations added to PPO's (``--model.ptx.coef``).

    Args:
        coef: the demonstrations' loss weight
        data_path: demonstrations (any format the demonstration data reads); None: the embedded world's
        batch_size: demonstrations per micro-batch, drawn at random
    """

    coef: float = 0.1
    data_path: str | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        check_settings(positive={"ptx.coef": self.coef, "ptx.batch_size": self.batch_size})


@dataclass(frozen=True)
class ODINConfig:
    """ODIN (Chen et al. 2024): the reward model learns a second, length head beside its quality head; the
    Bradley–Terry loss is taken on their sum, the length head is made to carry the scores' correlation with answer
    length and the quality head none of it (:func:`~lit_rlhf.losses.odin_length_loss`), and only the quality head
    is exported (``--model.odin.length_weight``).

    Args:
        length_weight: λ_L, the weight of |ρ(r_Q, L)| − ρ(r_L, L)
        orthogonality_weight: λ_O, the weight of |w_Q · w_L|, the two heads' weights kept orthogonal
    """

    length_weight: float = 1.0
    orthogonality_weight: float = 1.0

    def __post_init__(self) -> None:
        check_settings(non_negative={"odin.length_weight": self.length_weight,
                                     "odin.orthogonality_weight": self.orthogonality_weight})
