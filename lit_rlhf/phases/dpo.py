"""Phase 3 without RL: DPO and its relatives on preference data, one LightningModule for all of them.

``loss_type`` picks the objective (formulas and papers in :mod:`lit_rlhf.losses`):

- on pairs, a registered loss of ``losses.PREFERENCE_LOSSES`` (:func:`loss_types`; one decorated function adds one):
  ``sigmoid`` (DPO), ``robust``, ``hinge``, ``ipo``, ``nca`` against a frozen reference, the starting SFT policy, with
  ``label_smoothing`` for ``sigmoid`` (conservative DPO) and ``robust``; ``simpo`` with length-averaged log-probs,
  target margin ``simpo_gamma`` and no reference model. The registry says what each needs.
- ``kto`` on unpaired rows (``UnpairedDataModule``, which also splits preference pairs into a desirable and an
  undesirable row). Its reference point is KL(π‖π_ref), estimated on the batch's mismatched prompt–completion pairs.

Chosen and rejected go through the policy in one concatenated forward. With ``precompute_ref_logps`` the
reference scores every training and validation sequence once before training and is then freed
(:mod:`lit_rlhf.phases.dpo_logprobs` says how the values are kept and invalidated).
"""

from __future__ import annotations

import gc

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from lit_rlhf import losses
from lit_rlhf.errors import ConfigError
from lit_rlhf.evaluation import PolicyEvaluation, evaluate_policy
from lit_rlhf.generation import SamplingConfig
from lit_rlhf.models import (
    AdaptersOff,
    frozen,
    is_world,
    load_causal_lm,
    load_tokenizer,
    trainable,
    with_lora,
    without_dropout,
)
from lit_rlhf.phases.dpo_logprobs import (
    ReferenceLogpsCache,
    concatenated,
    model_sequence_logprobs,
    reference_fingerprint,
)
from lit_rlhf.phases.shared import (
    adamw_with_warmup,
    check_context,
    check_settings,
    export_trained,
    leave_out_frozen,
    restore_frozen,
    shard_networks,
    validation_means,
)

UNPAIRED_LOSS_TYPE = "kto"
"""The one loss type on unpaired rows; every other ``loss_type`` is a pairwise loss of ``losses.PREFERENCE_LOSSES``."""
Metrics = dict[str, tuple[torch.Tensor, int]]
"""Metric name → (value, number of rows it averages), so epoch means weigh batches correctly."""
PAIRED_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                  "logps/rejected", "lengths/chosen_minus_rejected")
KTO_METRICS = ("kl", *(name for name in PAIRED_METRICS if name != "rewards/accuracies"))
"""KTO's chosen and rejected are its desirable and undesirable rows; a batch reports those it has."""


def loss_types() -> tuple[str, ...]:
    """Every ``loss_type`` that :class:`DPOModule` accepts: the registered pairwise losses, then KTO. A function, not
    a constant, so that a loss registered after this module is imported counts too."""
    return (*losses.PREFERENCE_LOSSES, UNPAIRED_LOSS_TYPE)


class DPOModule(LightningModule):
    """Direct preference optimisation and its relatives (see the module docstring), from an SFT export.

    Logs ``train/loss`` and, each training step, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``, ``lengths/chosen_minus_rejected``; the same with
    a ``val/`` prefix over the validation split. Rewards are β·(log π − log π_ref), for SimPO β·(mean log π). KTO
    logs no accuracies (its rows are unpaired), its chosen and rejected are the desirable and undesirable rows,
    and ``kl`` is its reference point. Each validation also samples the datamodule's held-out prompts and logs
    under ``eval/``, on PPO's axes, what :func:`evaluate_policy` measures against the reference policy's answers
    to the same prompts with the same sampling seed (computed once): ``objective/kl`` (to the reference, on the
    samples), ``response/length_mean``, ``response/length_drift``, the ``hacking/`` detectors and, on the world,
    ``gold/reward``.

    The reference is frozen, in eval mode, not optimised, and left out of checkpoints (it reloads from
    ``model_name_or_path``). With ``precompute_ref_logps``, and for SimPO, it is not kept in memory at all:
    validation loads it for the generation metrics and frees it again. ``ref_logps_cache`` names a file that keeps
    precomputed log-probs for later runs with the same reference (a β sweep, say). ``length_normalized`` uses the
    mean instead of the sum of token log-probs; ``rpo_alpha`` adds α·NLL of the chosen responses per token (RPO,
    Pang et al. 2024). With ``lora`` (``peft.LoraConfig`` arguments) only LoRA adapters train and the reference is
    the policy with its adapters disabled, so no second copy is loaded; the export has the adapters merged.
    """

    def __init__(
        self,
        model_name_or_path: str = "runs/sft/hf",
        loss_type: str = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        length_normalized: bool = False,
        rpo_alpha: float = 0.0,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        precompute_ref_logps: bool = False,
        ref_logps_cache: str | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        export_dir: str | None = None,
        max_new_tokens: int = 24,
        eval_temperature: float = 1.0,
        eval_seed: int = 1234,
        max_prompt_length: int = 32,
        trust_remote_code: bool = False,
        dtype: str | None = None,
        lora: dict | None = None,
    ) -> None:
        super().__init__()
        check_settings(
            positive={"beta": beta, "learning_rate": learning_rate, "max_new_tokens": max_new_tokens},
            non_negative={"simpo_gamma": simpo_gamma, "rpo_alpha": rpo_alpha, "weight_decay": weight_decay,
                          "desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight,
                          "eval_temperature": eval_temperature},
        )
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing is a label-flip probability below 0.5, got {label_smoothing}")
        if loss_type not in loss_types():
            raise ConfigError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(loss_types())}")
        if is_world(model_name_or_path):
            raise ConfigError("DPO starts from a trained policy: set model_name_or_path to an SFT export, not 'world'")
        smoothed = [name for name, loss in losses.PREFERENCE_LOSSES.items() if "label_smoothing" in loss.options]
        if label_smoothing and loss_type not in smoothed:
            raise ConfigError(f"label_smoothing is defined only for {', '.join(smoothed)}, not for {loss_type!r}")
        if loss_type == UNPAIRED_LOSS_TYPE and (rpo_alpha or precompute_ref_logps):
            raise ConfigError(
                "kto supports neither rpo_alpha (it has no chosen responses) nor precompute_ref_logps (its KL pairs "
                "are formed per batch, so their reference log-probs cannot be computed ahead)"
            )
        if lora and precompute_ref_logps:
            raise ConfigError("precompute_ref_logps is not needed with lora: the reference is the policy with its "
                              "adapters disabled, already in memory")
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
        self.model: PreTrainedModel | None = None
        self.reference: PreTrainedModel | None = None
        self.reference_cache: ReferenceLogpsCache | None = None
        self.pairwise_loss = losses.PREFERENCE_LOSSES.get(loss_type)
        """What the pairwise loss needs (a reference, averaged log-probs); None for KTO, which is unpaired."""
        names = KTO_METRICS if self.pairwise_loss is None else PAIRED_METRICS
        self.val_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in ("loss", *names)})
        self._reference_answers: PolicyEvaluation | None = None

    @property
    def _uses_reference(self) -> bool:
        return self.pairwise_loss is None or self.pairwise_loss.uses_reference

    @property
    def _average_logps(self) -> bool:
        return self.hparams.length_normalized or (self.pairwise_loss is not None and self.pairwise_loss.average_logps)

    def _load_reference(self) -> PreTrainedModel:
        hp = self.hparams
        reference = load_causal_lm(hp.model_name_or_path, self.tokenizer, hp.trust_remote_code, hp.dtype)
        return frozen(reference).to(self.device)

    def configure_model(self) -> None:
        hp = self.hparams
        if self.model is not None:
            return
        policy = load_causal_lm(hp.model_name_or_path, self.tokenizer, hp.trust_remote_code, hp.dtype)
        self.model = without_dropout(with_lora(policy, hp.lora))
        check_context(self, policy)
        if hp.lora:
            self.reference = AdaptersOff(self.model)  # the loaded weights themselves: no second copy
        elif self._uses_reference and not hp.precompute_ref_logps:
            self.reference = self._load_reference()
        shard_networks(self, self.model, self.reference)

    # --- reference log-probs ---

    def setup(self, stage: str) -> None:
        # Runs before every fit/validate, after the datamodule's setup: the data is tokenised, the policy not built.
        if self.hparams.precompute_ref_logps and self._uses_reference:
            self._precompute_reference_logps()

    def _precompute_reference_logps(self) -> None:
        """One pass of the reference over the training and validation sequences that the cache lacks."""
        hp = self.hparams
        fingerprint = reference_fingerprint(hp.model_name_or_path, hp.dtype, self._average_logps)
        if self.reference_cache is None or self.reference_cache.fingerprint != fingerprint:
            self.reference_cache = ReferenceLogpsCache(fingerprint, hp.ref_logps_cache)
        cache = self.reference_cache
        keys, computed = cache.fill(self.trainer.datamodule.every_batch(), self._load_reference, self.device,
                                    self._average_logps)
        if computed and cache.path is not None and self.trainer.is_global_zero:
            cache.save(keys)

    def _reference_logps(self, sequences: dict) -> torch.Tensor:
        if self.reference_cache is not None:
            return self.reference_cache.lookup(sequences).to(self.device)
        with torch.no_grad():
            return model_sequence_logprobs(self.reference, sequences, self._average_logps)[0]

    # --- losses ---

    def _paired_step(self, batch: dict) -> tuple[torch.Tensor, Metrics]:
        hp = self.hparams
        sequences = concatenated(batch, "chosen_", "rejected_")
        logps, token_logps, mask = model_sequence_logprobs(self.model, sequences, self._average_logps)
        chosen_logps, rejected_logps = logps.chunk(2)
        ref_chosen, ref_rejected = self._reference_logps(sequences).chunk(2) if self._uses_reference else (None, None)
        # Each loss takes the settings among these that it declares (PreferenceLoss.options), ignores the others.
        per_pair, chosen_rewards, rejected_rewards = losses.preference_loss(
            chosen_logps, rejected_logps, ref_chosen, ref_rejected, hp.beta, hp.loss_type, hp.label_smoothing,
            gamma=hp.simpo_gamma,
        )
        loss = per_pair.mean()
        if hp.rpo_alpha:
            loss = loss + hp.rpo_alpha * losses.rpo_nll_loss(token_logps.chunk(2)[0], mask.chunk(2)[0])
        chosen_lengths, rejected_lengths = sequences["response_mask"].sum(1).float().chunk(2)
        pairs = len(chosen_logps)
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": chosen_logps.detach().mean(),
            "logps/rejected": rejected_logps.detach().mean(),
            "lengths/chosen_minus_rejected": (chosen_lengths - rejected_lengths).mean(),
        }
        return loss, {name: (value, pairs) for name, value in metrics.items()}

    def _kto_step(self, batch: dict) -> tuple[torch.Tensor, Metrics]:
        hp = self.hparams
        matched, mismatched = concatenated(batch, ""), concatenated(batch, "kl_")
        logps = model_sequence_logprobs(self.model, matched, self._average_logps)[0]
        with torch.no_grad():
            mismatched_logps = model_sequence_logprobs(self.model, mismatched, self._average_logps)[0]
            local_kl = losses.kto_kl_estimate(mismatched_logps, self._reference_logps(mismatched))
        kl = self.all_gather(local_kl).mean()  # KTO's reference point, estimated on every device's batch together
        ref_logps = self._reference_logps(matched)
        desirable = batch["label"]
        per_row = losses.kto_loss(logps, ref_logps, desirable, kl, hp.beta, hp.desirable_weight, hp.undesirable_weight)
        rewards, lengths = hp.beta * (logps.detach() - ref_logps), matched["response_mask"].sum(1).float()
        metrics = {"kl": (kl, len(logps))}
        for side, rows in {"chosen": desirable, "rejected": ~desirable}.items():
            if rows.any():
                metrics[f"rewards/{side}"] = (rewards[rows].mean(), int(rows.sum()))
                metrics[f"logps/{side}"] = (logps.detach()[rows].mean(), int(rows.sum()))
        if desirable.any() and not desirable.all():
            metrics["rewards/margins"] = (rewards[desirable].mean() - rewards[~desirable].mean(), len(logps))
            length_gap = lengths[desirable].mean() - lengths[~desirable].mean()
            metrics["lengths/chosen_minus_rejected"] = (length_gap, len(logps))
        return per_row.mean(), metrics

    def _step(self, batch: dict) -> tuple[torch.Tensor, Metrics]:
        return self._kto_step(batch) if self.pairwise_loss is None else self._paired_step(batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, metrics = self._step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))
        for name, (value, rows) in metrics.items():
            self.log(name, value, batch_size=rows)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, metrics = self._step(batch)
        for name, (value, rows) in {"loss": (loss, len(batch["prompt"])), **metrics}.items():
            self.val_metrics[name].update(value, weight=rows)

    # --- generation-side metrics, on PPO's axes ---

    def on_validation_epoch_end(self) -> None:
        self.log_dict(validation_means(self.val_metrics), sync_dist=True)  # row-weighted, already global
        hp = self.hparams
        reference = self.reference if self.reference is not None else self._load_reference()
        evaluation = dict(
            tokenizer=self.tokenizer,
            prompts=self.trainer.datamodule.eval_prompts,
            sampling=SamplingConfig(hp.max_new_tokens, hp.eval_temperature),
            max_prompt_length=hp.max_prompt_length,
            seed=hp.eval_seed,
        )
        if self._reference_answers is None:
            self._reference_answers = evaluate_policy(reference, **evaluation)
        baseline = self._reference_answers
        metrics = evaluate_policy(self.model, reference=reference, baseline=baseline, **evaluation).metrics
        if reference is not self.reference:
            del reference
            gc.collect()
        self.log_dict({f"eval/{name}": value for name, value in metrics.items()}, sync_dist=True)

    # --- checkpoints and export ---

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        leave_out_frozen(self, checkpoint, ("reference.",))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_frozen(self, checkpoint, ("reference.",))

    def on_fit_end(self) -> None:
        export_trained(self, self.model)

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_with_warmup(
            self.trainer, trainable(self.model), hp.learning_rate, hp.weight_decay, hp.warmup_steps
        )
