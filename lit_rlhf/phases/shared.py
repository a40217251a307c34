"""What every phase shares: AdamW with linear warmup and cosine decay, and the export at the end of fit."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from lightning.pytorch import LightningModule, Trainer
from transformers import PreTrainedModel, get_cosine_schedule_with_warmup

from lit_rlhf.models import export


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


def export_trained(module: LightningModule, model: PreTrainedModel, before: Callable[[], None] | None = None) -> str:
    """Export ``model`` with the module's tokenizer to ``export_dir`` (default ``<log_dir>/hf``) from rank 0, with
    ``before`` run there first; every rank returns the folder once it is written.

    ``trainer.log_dir`` is a collective under DDP (rank 0 broadcasts it), so every rank asks for it; asked on rank 0
    alone it waits for ranks that have already left fit.
    """
    trainer = module.trainer
    out_dir = module.hparams.export_dir or f"{trainer.log_dir}/hf"
    if trainer.is_global_zero:
        if before is not None:
            before()
        export(model, module.tokenizer, out_dir)
    trainer.strategy.barrier("export")
    return out_dir
