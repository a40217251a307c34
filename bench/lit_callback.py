"""The lit-rlhf side's timing: a Lightning callback that run.py adds to ``lit-rlhf fit`` with
``--trainer.callbacks+=``. One training batch is one step: an optimiser step for SFT, the reward model and DPO, one
whole sample-score-update iteration for PPO."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from bench.timing import SteadyStateTimer, batch_work, installed_versions, write_result


class SteadyStateThroughput(Callback):
    """Times the training batches after ``warmup_steps`` and writes the result to ``result_path`` when training ends,
    before anything fit does afterwards (the export, the reward model's score statistics)."""

    def __init__(self, result_path: str, phase: str, unit: str, warmup_steps: int = 2, response_length: int = 0):
        self.result_path = result_path
        self.phase = phase
        self.unit = unit
        self.response_length = response_length
        self.timer = SteadyStateTimer(warmup_steps)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.timer.training_started()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":  # the step's kernels run asynchronously: time them to their end
            torch.cuda.synchronize(pl_module.device)
        self.timer.step_ended(batch_work(self.unit, batch, self.response_length))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        versions = installed_versions("lit-rlhf", "torch", "transformers", "lightning")
        write_result(self.result_path, "lit-rlhf", self.phase, self.timer, versions)

