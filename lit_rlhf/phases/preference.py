"""What DPO and KTO share: a policy trained from an SFT export against a frozen reference — the SFT export itself,
or the policy with its LoRA adapters disabled — whose log-probs can be precomputed; a training step that a subclass
defines (:meth:`PreferenceModule._step`); and, at each validation, on PPO's axes, what :func:`evaluate_policy`
measures against the reference policy's answers."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from lit_rlhf.errors import ConfigError
from lit_rlhf.evaluation import PolicyEvaluation, evaluate_policy
from lit_rlhf.generation import SamplingConfig
from lit_rlhf.models import (
    AdaptersOff,
    LoRAConfig,
    frozen,
    is_world,
    load_causal_lm,
    load_tokenizer,
    trainable,
    with_lora,
    without_dropout,
)
from lit_rlhf.phases.dpo_logprobs import ReferenceLogpsCache, model_sequence_logprobs, reference_fingerprint
from lit_rlhf.phases.shared import (
    OptimizerConfig,
    adamw_with_warmup,
    check_context,
    check_settings,
    export_trained,
    leave_out_frozen,
    restore_frozen,
    save_settings,
    shard_networks,
    validation_means,
)
from lit_rlhf.scoring import gold_scorer

Metrics = dict[str, tuple[torch.Tensor, int]]
"""Metric name → (value, number of rows it averages), so epoch means weigh batches correctly."""


class PreferenceModule(LightningModule):
    """The base of :class:`~lit_rlhf.phases.dpo.DPOModule` and :class:`~lit_rlhf.phases.kto.KTOModule`.

    ``beta`` holds the policy to the reference. The reference is frozen, in eval mode, not optimised, and left out of
    checkpoints (it reloads from ``model_name_or_path``). With ``precompute_ref_logps`` it scores every training and
    validation sequence once before training and is freed (:mod:`lit_rlhf.phases.dpo_logprobs`); validation loads it
    again for the generation metrics. ``ref_logps_cache`` names a file that keeps those log-probs for later runs with
    the same reference (a β sweep, say). ``length_normalized`` uses the mean instead of the sum of token log-probs.
    With ``lora`` only LoRA adapters train and the reference is the policy with its adapters disabled, so no second
    copy is loaded; the export has the adapters merged.

    Logs ``train/loss`` and the subclass's metrics each training step, the same with a ``val/`` prefix over the
    validation split, and under ``eval/`` what :func:`evaluate_policy` measures on the datamodule's held-out prompts
    against the reference policy's answers to the same prompts with the same sampling seed (computed once):
    ``objective/kl``, ``response/length_mean``, ``response/length_drift``, the ``hacking/`` detectors and, on the
    world, ``gold/reward``.
    """

    METRICS: tuple[str, ...] = ()
    """The metrics :meth:`_step` may return, averaged over the validation split as ``val/<name>``."""

    def __init__(
        self,
        model_name_or_path: str = "runs/sft/hf",
        beta: float = 0.1,
        length_normalized: bool = False,
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
        super().__init__()
        check_settings(positive={"beta": beta})
        if is_world(model_name_or_path):
            raise ConfigError(f"{type(self).__name__} starts from a trained policy: set model_name_or_path to an SFT "
                              "export, not 'world'")
        if lora and precompute_ref_logps:
            raise ConfigError("precompute_ref_logps is not needed with lora: the reference is the policy with its "
                              "adapters disabled, already in memory")
        save_settings(self)
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
        self.model: PreTrainedModel | None = None
        self.reference: PreTrainedModel | None = None
        self.reference_cache: ReferenceLogpsCache | None = None
        self.val_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in ("loss", *self.METRICS)})
        self._reference_answers: PolicyEvaluation | None = None

    # --- what a subclass defines ---

    def _step(self, batch: dict) -> tuple[torch.Tensor, Metrics]:
        """The loss of one batch and its metrics."""
        raise NotImplementedError

    def _pair_logps(self, model: PreTrainedModel, batch: dict) -> tuple[torch.Tensor, ...]:
        """A comparison batch's chosen then rejected log-probs under ``model`` (``(logps [2B], token_logps, mask)``):
        what ``precompute_ref_logps`` stores, with the reference; a subclass that allows it defines this."""
        raise NotImplementedError

    @property
    def _uses_reference(self) -> bool:
        """Whether the loss reads the reference's log-probs (SimPO's does not)."""
        return True

    @property
    def _average_logps(self) -> bool:
        """Whether a sequence's log-prob is the mean of its token log-probs rather than their sum."""
        return self.hparams.length_normalized

    # --- the policy and its reference ---

    def _load_reference(self) -> PreTrainedModel:
        hp = self.hparams
        reference = load_causal_lm(hp.model_name_or_path, self.tokenizer, hp.trust_remote_code, hp.dtype)
        return frozen(reference).to(self.device)

    def configure_model(self) -> None:
        hp = self.hparams
        if self.model is not None:
            return
        policy = load_causal_lm(hp.model_name_or_path, self.tokenizer, hp.trust_remote_code, hp.dtype)
        self.model = without_dropout(with_lora(policy, self.lora))
        check_context(self, policy)
        if self.lora:
            self.reference = AdaptersOff(self.model)  # the loaded weights themselves: no second copy
        elif self._uses_reference and not hp.precompute_ref_logps:
            self.reference = self._load_reference()
        shard_networks(self, self.model, self.reference)

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
                                    lambda reference, batch: self._pair_logps(reference, batch)[0])
        if computed and cache.path is not None and self.trainer.is_global_zero:
            cache.save(keys)

    def _reference_logps(
        self, sequences: dict, live: Callable[[PreTrainedModel], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The reference's log-probs of ``sequences``: looked up where they were precomputed, else ``live(reference)``
        without gradients (by default the log-probs of the whole sequences)."""
        if self.reference_cache is not None:
            return self.reference_cache.lookup(sequences).to(self.device)
        with torch.no_grad():
            if live is not None:
                return live(self.reference)
            return model_sequence_logprobs(self.reference, sequences, self._average_logps)[0]

    # --- training and validation ---

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

    def on_validation_epoch_end(self) -> None:
        self.log_dict(validation_means(self.val_metrics), sync_dist=True)  # row-weighted, already global
        hp = self.hparams
        reference = self.reference if self.reference is not None else self._load_reference()
        evaluation = dict(
            tokenizer=self.tokenizer,
            prompts=self.trainer.datamodule.eval_prompts,
            sampling=self.sampling,
            max_prompt_length=hp.max_prompt_length,
            seed=hp.eval_seed,
        )
        evaluation["gold"] = gold_scorer(evaluation["prompts"])
        if self._reference_answers is None:
            self._reference_answers = evaluate_policy(reference, **evaluation)
        baseline = self._reference_answers
        metrics = evaluate_policy(self.model, reference=reference, baseline=baseline, **evaluation).metrics
        if reference is not self.reference:
            del reference
            gc.collect()
        self.log_dict({f"eval/{name}": value for name, value in metrics.items()}, sync_dist=True)

    # --- checkpoints, export, optimiser ---

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        leave_out_frozen(self, checkpoint, ("reference.",))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_frozen(self, checkpoint, ("reference.",))

    def on_fit_end(self) -> None:
        export_trained(self, self.model)

    def configure_optimizers(self):
        return adamw_with_warmup(self.trainer, trainable(self.model), self.optimizer_config)
