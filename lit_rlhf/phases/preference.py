"""What DPO and KTO share: a policy trained from an SFT export against a frozen reference — the SFT export itself,
or the policy with its LoRA adapters disabled — whose log-probs can be precomputed; a training step that a subclass
defines (:meth:`PreferenceModule._step`); and, at each validation, on PPO's axes, what
:class:`~lit_rlhf.evaluation.HeldOutEvaluator` measures against the reference policy's answers."""

from __future__ import annotations

import gc
from collections.abc import Callable
from functools import cached_property

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from lit_rlhf.errors import ConfigError
from lit_rlhf.evaluation import HeldOutEvaluator
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
from lit_rlhf.phases.dpo_logprobs import ReferenceLogpsCache, model_sequence_logprobs
from lit_rlhf.phases.settings import (
    OptimizerConfig,
    check_settings,
    keep_settings,
)
from lit_rlhf.phases.shared import (
    adamw_with_warmup,
    check_context,
    export_trained,
    held_out_evaluator,
    leave_out_frozen,
    restore_frozen,
    shard_networks,
    validation_means,
)

Metrics = dict[str, tuple[torch.Tensor, int]]
"""Metric name → (value, number of rows it averages), so epoch means weigh batches correctly."""


class PreferenceModule(LightningModule):
    """The base of :class:`~lit_rlhf.phases.dpo.DPOModule` and :class:`~lit_rlhf.phases.kto.KTOModule`.

    ``beta`` holds the policy to the reference. The reference is frozen, in eval mode, not optimised, and left out of
    checkpoints (it reloads from ``model_name_or_path``); DPO can precompute its log-probs instead
    (:class:`~lit_rlhf.phases.dpo.DPOModule`). ``length_normalized`` uses the mean instead of the sum of token
    log-probs.
    With ``lora`` only LoRA adapters train and the reference is the policy with its adapters disabled, so no second
    copy is loaded; the export has the adapters merged.

    Logs ``train/loss`` and the subclass's metrics each training step, the same with a ``val/`` prefix over the
    validation split, and under ``eval/`` what its :class:`~lit_rlhf.evaluation.HeldOutEvaluator` measures on the
    datamodule's held-out prompts against the reference policy's answers to the same prompts with the same sampling
    seed (computed once): ``objective/kl``, ``response/length_mean``, ``response/length_drift``, the ``hacking/``
    detectors and, on the world, ``gold/reward``.
    """

    METRICS: tuple[str, ...] = ()
    """The metrics :meth:`_step` may return, averaged over the validation split as ``val/<name>``."""

    def __init__(
        self,
        model_name_or_path: str = "runs/sft/hf",
        beta: float = 0.1,
        length_normalized: bool = False,
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
        self.save_hyperparameters()
        keep_settings(self, optimizer, sampling, lora)
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
        self.model: PreTrainedModel | None = None
        self.reference: PreTrainedModel | None = None
        self.reference_cache: ReferenceLogpsCache | None = None
        """The reference's precomputed log-probs, where a subclass precomputes them."""
        self.val_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in ("loss", *self.METRICS)})

    # --- what a subclass defines ---

    def _step(self, batch: dict) -> tuple[torch.Tensor, Metrics]:
        """The loss of one batch and its metrics."""
        raise NotImplementedError

    @property
    def _uses_reference(self) -> bool:
        """Whether the loss reads the reference's log-probs (SimPO's does not)."""
        return True

    @property
    def _precomputes_reference(self) -> bool:
        """Whether the reference's log-probs are computed before training (the reference then is not kept)."""
        return False

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
        elif self._uses_reference and not self._precomputes_reference:
            self.reference = self._load_reference()
        shard_networks(self, self.model, self.reference)

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
        reference = self.reference if self.reference is not None else self._load_reference()
        metrics = self.evaluator.evaluate(self.model, reference).metrics
        if reference is not self.reference:
            del reference
            gc.collect()
        self.log_dict({f"eval/{name}": value for name, value in metrics.items()}, sync_dist=True)

    @cached_property
    def evaluator(self) -> HeldOutEvaluator:
        """The held-out prompts' evaluation, built at the first validation."""
        return held_out_evaluator(self)

    # --- checkpoints, export, optimiser ---

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        leave_out_frozen(self, checkpoint, ("reference.",))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_frozen(self, checkpoint, ("reference.",))

    def on_fit_end(self) -> None:
        export_trained(self, self.model)

    def configure_optimizers(self):
        return adamw_with_warmup(self.trainer, trainable(self.model), self.optimizer_config)
