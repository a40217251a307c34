"""The optimiser every supervised phase uses: AdamW with linear warmup and cosine decay over the run."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from lightning.pytorch import Trainer
from transformers import get_cosine_schedule_with_warmup


def adamw_with_warmup(
    trainer: Trainer,
    parameters: Iterable[torch.nn.Parameter],
    learning_rate: float,
    weight_decay: float,
    warmup_steps: int,
) -> dict:
    """A ``configure_optimizers`` return value; the schedule spans ``trainer.estimated_stepping_batches``."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    total_steps = max(int(trainer.estimated_stepping_batches), 1)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(warmup_steps, total_steps), total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
