"""Phase 3 without RL: DPO and its relatives on preference pairs, picked by ``loss_type`` (formulas and papers in
:mod:`lit_rlhf.losses`): a registered loss of ``losses.PREFERENCE_LOSSES`` (:func:`loss_types`; one decorated
function adds one) — ``sigmoid`` (DPO), ``robust``, ``hinge``, ``ipo``, ``nca`` against a frozen reference, the
starting SFT policy, with ``label_smoothing`` for ``sigmoid`` (conservative DPO) and ``robust``; ``simpo`` with
length-averaged log-probs, target margin ``simpo_gamma`` and no reference model. The registry says what each needs.
KTO, on unpaired rows, is :class:`~lit_rlhf.phases.kto.KTOModule`; both share
:class:`~lit_rlhf.phases.preference.PreferenceModule`.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from lit_rlhf import losses
from lit_rlhf.errors import ConfigError
from lit_rlhf.generation import SamplingConfig
from lit_rlhf.models import LoRAConfig
from lit_rlhf.phases.dpo_logprobs import ReferenceLogpsCache, concatenated, pair_logprobs, reference_fingerprint
from lit_rlhf.phases.preference import Metrics, PreferenceModule
from lit_rlhf.phases.settings import OptimizerConfig, check_settings

PAIRED_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                  "logps/rejected", "lengths/chosen_minus_rejected")


def loss_types() -> tuple[str, ...]:
    """Every ``loss_type`` that :class:`DPOModule` accepts, the registered pairwise losses. A function, not a
    constant, so that a loss registered after this module is imported counts too."""
    return tuple(losses.PREFERENCE_LOSSES)


class DPOModule(PreferenceModule):
    """Direct preference optimisation and its relatives (see the module docstring) on chosen/rejected pairs, from an
    SFT export; the settings they share with KTO are :class:`PreferenceModule`'s.

    Logs, each training step and with a ``val/`` prefix over the validation split, ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` and
    ``lengths/chosen_minus_rejected``: rewards are β·(log π − log π_ref), for SimPO β·(mean log π). With
    ``share_prompts`` (the default) a batch's prompts go through the policy and the reference once, into a key/value
    cache that its chosen and rejected responses then attend to (:mod:`lit_rlhf.models.shared_prompts`): the same
    log-probs up to float rounding, for about a fifth less work; without it, or for a model that takes no cache,
    chosen and rejected go through as whole sequences in one concatenated forward. ``rpo_alpha`` adds α·NLL of the
    chosen responses per token (RPO, Pang et al. 2024). With ``precompute_ref_logps`` the reference scores every
    training and validation sequence once before training and is freed (:mod:`lit_rlhf.phases.dpo_logprobs`);
    validation loads it again for the generation metrics. ``ref_logps_cache`` names a file that keeps those
    log-probs for later runs with the same reference (a β sweep, say).
    """

    METRICS = PAIRED_METRICS

    def __init__(
        self,
        model_name_or_path: str = "runs/sft/hf",
        loss_type: str = "sigmoid",
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        rpo_alpha: float = 0.0,
        length_normalized: bool = False,
        share_prompts: bool = True,
        precompute_ref_logps: bool = False,
        ref_logps_cache: str | None = None,
        optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-4, warmup_steps=10),
        sampling: SamplingConfig = SamplingConfig(),
        eval_seed: int = 1234,
        max_prompt_length: int = 32,
        export_dir: str | None = None,
        trust_remote_code: bool = False,
        dtype: str | None = None,
        lora: LoRAConfig | None = None,
    ) -> None:
        check_settings(non_negative={"simpo_gamma": simpo_gamma, "rpo_alpha": rpo_alpha})
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing is a label-flip probability below 0.5, got {label_smoothing}")
        if loss_type not in loss_types():
            raise ConfigError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(loss_types())} (KTO, on "
                              "unpaired rows, is KTOModule: configs/kto.yaml)")
        smoothed = [name for name, loss in losses.PREFERENCE_LOSSES.items() if "label_smoothing" in loss.options]
        if label_smoothing and loss_type not in smoothed:
            raise ConfigError(f"label_smoothing is defined only for {', '.join(smoothed)}, not for {loss_type!r}")
        if lora and precompute_ref_logps:
            raise ConfigError("precompute_ref_logps is not needed with lora: the reference is the policy with its "
                              "adapters disabled, already in memory")
        super().__init__(model_name_or_path, beta, length_normalized, optimizer, sampling, eval_seed, max_prompt_length,
                         export_dir, trust_remote_code, dtype, lora)
        self.pairwise_loss = losses.PREFERENCE_LOSSES[loss_type]
        """What the loss needs: a reference, averaged log-probs, its own settings."""

    def _pair_logps(self, model: PreTrainedModel, batch: dict) -> tuple[torch.Tensor, ...]:
        """A comparison batch's chosen then rejected log-probs under ``model``: ``(logps [2B], token_logps, mask)``."""
        return pair_logprobs(model, batch, self._average_logps, self.hparams.share_prompts)

    @property
    def _precomputes_reference(self) -> bool:
        return self.hparams.precompute_ref_logps and self._uses_reference

    def setup(self, stage: str) -> None:
        # Runs before every fit/validate, after the datamodule's setup: the data is tokenised, the policy not built.
        if self._precomputes_reference:
            self._precompute_reference_logps()

    def _precompute_reference_logps(self) -> None:
        """One pass of the reference over the training and validation sequences that the cache lacks."""
        hp = self.hparams
        fingerprint = reference_fingerprint(hp.model_name_or_path, hp.dtype, self._average_logps)
        if self.reference_cache is None or self.reference_cache.fingerprint != fingerprint:
            self.reference_cache = ReferenceLogpsCache(fingerprint, hp.ref_logps_cache)
        cache = self.reference_cache
        keys, computed = cache.fill(self.trainer.datamodule.every_batch(), self._load_reference, self.device,
                                    lambda reference, batch: self._pair_logps(reference, batch)[0])
        if computed and cache.path is not None and self.trainer.is_global_zero:
            cache.save(keys)

    @property
    def _uses_reference(self) -> bool:
        return self.pairwise_loss.uses_reference

    @property
    def _average_logps(self) -> bool:
        return self.hparams.length_normalized or self.pairwise_loss.average_logps

    def _step(self, batch: dict) -> tuple[torch.Tensor, Metrics]:
        hp = self.hparams
        sequences = concatenated(batch, "chosen_", "rejected_")
        logps, token_logps, mask = self._pair_logps(self.model, batch)
        chosen_logps, rejected_logps = logps.chunk(2)
        ref_chosen, ref_rejected = (
            self._reference_logps(sequences, live=lambda reference: self._pair_logps(reference, batch)[0]).chunk(2)
            if self._uses_reference else (None, None)
        )
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
