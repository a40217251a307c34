"""What the command line gives every fit besides the phase: the loggers (CSV, and W&B started only once something
is logged), the progress bar and checkpointing that count PPO's iterations, the step of the last validation, and
quiet logs. They lean on a few private attributes of Lightning and W&B, each named where it is used and listed in
:data:`PRIVATE_ATTRIBUTES`, which a test checks on the installed versions; ``pyproject.toml`` bounds those versions
from above."""

from __future__ import annotations

import logging
import math
import os
import warnings

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import DummyExperiment

RUNS_DIR = "runs"
"""Where a fit's logs go by default."""


def default_loggers(runs_dir: str = RUNS_DIR) -> list[dict]:
    """CSV always; W&B too, offline unless ``WANDB_API_KEY`` is set (never a login prompt), off when
    ``WANDB_MODE=disabled``. Both write under ``runs_dir``."""
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": runs_dir}}]
    if os.environ.get("WANDB_MODE") != "disabled":
        offline = not os.environ.get("WANDB_API_KEY")
        loggers.append(
            {
                "class_path": "lit_rlhf.trainer_parts.DeferredWandbLogger",
                "init_args": {"save_dir": runs_dir, "project": "lit-rlhf", "offline": offline},
            }
        )
    return loggers


LIBRARY_NOTICES = ("💡 Tip:",)
"""Lightning's advertisements of its own cloud services, printed at every fit."""
LIBRARY_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)
"""Deprecations inside Lightning, not in anything a user of this package can change."""


def quiet_library_notices() -> None:
    """Keep a run's log to what it is about: drop :data:`LIBRARY_NOTICES` from Lightning's info log and
    :data:`LIBRARY_WARNINGS` (W&B's end-of-run history is quieted by :class:`DeferredWandbLogger`)."""
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(found, _DropNotices) for found in rank_zero_log.filters):
        rank_zero_log.addFilter(_DropNotices())


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIBRARY_NOTICES)


class DeferredWandbLogger(WandbLogger):
    """Lightning's W&B logger, whose run starts with the first thing logged (the hyperparameters, once the data and
    the model are set up) instead of before the data is read: a run stopped by bad data or settings starts none."""

    _logged = False
    """Whether Lightning has logged anything: until then the run is not started."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # _wandb_init, _experiment and _offline are WandbLogger's private state (PRIVATE_ATTRIBUTES).
        self._wandb_init.pop("anonymous", None)  # Lightning passes W&B a setting W&B warns it ignores
        # W&B's essential lines (where the run is) stay; its end-of-run history and summary go.
        if self._wandb_init.get("settings") is None:  # the command line passes every wandb.init argument, unset
            self._wandb_init["settings"] = {"quiet": True}

    @property
    def experiment(self):
        if self._experiment is None and not self._logged:
            return DummyExperiment()  # what Lightning's early request for the run gets
        if self._experiment is None and os.environ.get("WANDB_MODE") == "disabled":
            # A run's saved config.yaml (the command to resume it) says offline: true, which Lightning turns into
            # WANDB_MODE=dryrun: the environment's disabled holds instead, also over W&B's settings of an earlier
            # run in this process.
            self._offline, self._wandb_init["mode"] = False, "disabled"
        return super().experiment

    def log_hyperparams(self, params) -> None:
        self._logged = True
        super().log_hyperparams(params)

    def log_metrics(self, metrics, step: int | None = None) -> None:
        self._logged = True
        super().log_metrics(metrics, step)


def _optimizer_steps_per_batch(module: LightningModule) -> int:
    """How many optimiser steps, which ``trainer.max_steps`` counts, one training batch makes: one, or a module's
    own ``optimizer_steps_per_batch`` (PPO: ``update.epochs × update.num_minibatches`` per iteration)."""
    return getattr(module, "optimizer_steps_per_batch", 1)


class TrainingProgressBar(TQDMProgressBar):
    """Lightning's bar, counting the training batches (PPO's iterations) that fit runs and showing the last epoch:
    Lightning's own takes ``max_steps`` for a number of batches, so PPO's bar stopped at 2/16 as if stopped early,
    and its rich bar names the last epoch ``max_epochs - 1``, -2 when ``max_steps`` is the limit."""

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_steps < 0:  # no step limit
            return trainer.num_training_batches
        remaining_steps = trainer.max_steps - trainer.global_step
        remaining = math.ceil(remaining_steps / _optimizer_steps_per_batch(trainer.lightning_module))
        return min(trainer.num_training_batches, remaining)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        limits = [trainer.max_epochs] if trainer.max_epochs not in (None, -1) else []
        if trainer.max_steps > 0 and 0 < trainer.num_training_batches < math.inf:
            batches = math.ceil(trainer.max_steps / _optimizer_steps_per_batch(pl_module))
            limits.append(math.ceil(batches / trainer.num_training_batches))
        if limits:  # epochs count from 0, as in Lightning's bars and checkpoint names
            self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}/{min(limits) - 1}")


class CheckpointAtEnd(ModelCheckpoint):
    """Lightning's ModelCheckpoint, which saves at validations only, saving also where fit ends when that step has
    none (``max_steps`` below, or not a multiple of, ``val_check_interval``): every finished fit resumes with
    ``--ckpt_path``. Without a ``monitor`` (the default) the newest checkpoint replaces the older, as at every
    validation; with one, checkpoints stay those of validations, which the monitored metric ranks."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 <= trainer.max_steps <= trainer.global_step:
            # At the last step, before the loop closes the epoch: the checkpoint then resumes mid-epoch (and names
            # the epoch) like one saved at a validation.
            self._save_unless_saved(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save_unless_saved(trainer)  # fit ended otherwise: max_epochs, or a callback stopped it
        super().on_train_end(trainer, pl_module)

    def _save_unless_saved(self, trainer: Trainer) -> None:
        # ModelCheckpoint's private steps of a save (PRIVATE_ATTRIBUTES): what it does at a validation.
        if self.monitor is None and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


class LastValidatedStep(Callback):
    """Remembers the step of the last validation, so that :class:`RLHFCLI` can validate once more after fit when
    ``max_steps`` is not a multiple of ``val_check_interval``: the last logged validation metrics, and the
    pipeline's summary, then always describe the trained model."""

    def __init__(self) -> None:
        self.step = -1

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.step = trainer.global_step

PRIVATE_ATTRIBUTES = {
    WandbLogger: ("_experiment", "_wandb_init", "_offline"),
    ModelCheckpoint: ("_should_skip_saving_checkpoint", "_monitor_candidates", "_save_topk_checkpoint",
                      "_save_last_checkpoint"),
}
"""The private attributes of Lightning's classes used here (and ``fit_loop.epoch_loop._batches_that_stepped`` by
:class:`lit_rlhf.data.datamodules.DataReport`), pinned by ``tests/test_cli.py`` on the installed versions."""
