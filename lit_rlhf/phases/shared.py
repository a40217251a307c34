"""What every phase shares: AdamW with linear warmup and cosine decay, FSDP2 sharding,
the context check, the validation means over every rank, and the export at the end."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import ModelParallelStrategy
from torchmetrics import Metric
from transformers import PreTrainedModel, get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from lit_rlhf.errors import ConfigError, TrainingDiverged
from lit_rlhf.evaluation import HeldOutEvaluator
from lit_rlhf.models import (
    check_positions,
    export,
    full_state_dict,
    is_sharded,
    merged,
    quiet_transformers,
    shard,
)
from lit_rlhf.phases.settings import OptimizerConfig
from lit_rlhf.scoring import Scorer


def adamw_with_warmup(
    trainer: Trainer, parameter_groups: Iterable, settings: OptimizerConfig, decay: bool = True
) -> dict:
    """A ``configure_optimizers`` return value: AdamW with linear warm-up, then a cosine decay that spans
    ``trainer.estimated_stepping_batches`` (``decay=False``: a constant rate). ``parameter_groups``: parameters, or
    ``torch.optim`` groups (dicts) with their own ``lr``. The fused kernel (transformers' default too) updates every
    parameter in one pass instead of a dozen small ops per tensor. Under a mixed precision (``bf16-mixed``,
    ``16-mixed``) it is the unfused one (foreach on a GPU): Lightning refuses to clip the gradients of an optimizer
    that unscales them itself, as the fused one does, and PPO clips every update."""
    optimizer = torch.optim.AdamW(
        parameter_groups, lr=settings.learning_rate, weight_decay=settings.weight_decay,
        fused=not isinstance(trainer.precision_plugin, MixedPrecision),
    )
    total_steps = max(int(trainer.estimated_stepping_batches), 1)
    warmup_steps = min(settings.warmup_steps, total_steps)
    if decay:
        schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    else:
        schedule = get_constant_schedule_with_warmup(optimizer, warmup_steps)
    scheduler = ConfiguredRateSchedule(optimizer, schedule.lr_lambdas)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ConfiguredRateSchedule(torch.optim.lr_scheduler.LambdaLR):
    """transformers' schedule (its rate functions, ``lr_lambdas``) that keeps the rates it was built with when a
    checkpoint is loaded. Lightning restores the optimizer's and the scheduler's saved state after
    ``configure_optimizers``, rates included, so a run resumed with another learning rate would train at the
    checkpoint's, and one resumed with more steps would start at the old schedule's last rate (0 after a cosine
    decay). Here the command line holds: the restored step, at the rate these settings give it."""

    def load_state_dict(self, state_dict: dict) -> None:
        configured = list(self.base_lrs)
        super().load_state_dict(state_dict)
        self.base_lrs = configured
        self._last_lr = [base * rate(self.last_epoch) for base, rate in zip(configured, self.lr_lambdas)]
        for group, base, lr in zip(self.optimizer.param_groups, configured, self._last_lr):
            group["initial_lr"], group["lr"] = base, lr


class FullyShardedStrategy(ModelParallelStrategy):
    """FSDP2 over every process of every node: Lightning's ``ModelParallelStrategy`` with all devices in the
    data-parallel dimension and no tensor parallelism. Each phase shards its networks in ``configure_model``
    (:func:`shard_networks`); ``configs/trainer/fsdp.yaml`` selects it."""

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None) -> None:
        super().__init__(
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def validation_means(metrics: Mapping[str, Metric]) -> dict[str, torch.Tensor]:
    """``val/<name>`` → each metric's value over every rank's updates, then reset; a metric no rank updated (the
    world's gold accuracy on other data, a KTO kind no batch had) is NaN and left out. Every rank computes every
    metric, a collective each, so that ranks stay in step."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method")  # that NaN case
        means = {f"val/{name}": metric.compute() for name, metric in metrics.items()}
    for metric in metrics.values():
        metric.reset()
    return {name: value for name, value in means.items() if not value.isnan()}


def held_out_evaluator(module: LightningModule, scorer: Scorer | None = None) -> HeldOutEvaluator:
    """The phase's :class:`~lit_rlhf.evaluation.HeldOutEvaluator`: its datamodule's held-out (development) prompts,
    answered with its ``sampling`` and ``eval_seed``, cut to its ``max_prompt_length``, scored by ``scorer``."""
    hp = module.hparams
    return HeldOutEvaluator(module.trainer.datamodule.eval_prompts, module.tokenizer, module.sampling,
                            hp.max_prompt_length, hp.eval_seed, scorer=scorer)


def check_context(
    module: LightningModule, model: PreTrainedModel, length: int | None = None, samples_after_fit: bool = False
) -> None:
    """:func:`check_positions` for sequences of ``length`` tokens, by default the longest a fit meets: the
    datamodule's ``max_length``, and the answers sampled to held-out prompts at each validation (``max_prompt_length
    + sampling.max_new_tokens``), or after fit (``samples_after_fit``: the reward model's score statistics). No
    check outside a Trainer, where nothing is read or sampled yet."""
    if length is None:
        trainer = module._trainer
        if trainer is None:
            return
        length = getattr(getattr(trainer.datamodule, "hparams", None), "max_length", None) or 0
        if trainer.limit_val_batches != 0 or samples_after_fit:
            length = max(length, module.hparams.get("max_prompt_length", 0) + module.sampling.max_new_tokens)
    check_positions(model, length, "sequences (data.max_length; sampled answers: max_prompt_length + "
                                   "sampling.max_new_tokens)")


def shard_networks(module: LightningModule, *networks: torch.nn.Module | None) -> None:
    """Shard each network with FSDP2 over the data-parallel mesh when the strategy gives one; else do nothing."""
    mesh = module.device_mesh
    if mesh is None:
        return
    if mesh["tensor_parallel"].size() > 1:
        raise ConfigError("tensor parallelism is not supported: use FullyShardedStrategy (tensor_parallel_size 1)")
    if any(hasattr(network, "peft_config") for network in networks):
        raise ConfigError("LoRA is not supported with FSDP yet: train the adapters with configs/trainer/ddp.yaml")
    for network in networks:
        if network is not None:
            shard(network, mesh["data_parallel"])


def leave_out_frozen(module: LightningModule, checkpoint: dict, prefixes: tuple[str, ...]) -> None:
    """Drop the frozen networks (state-dict keys starting with ``prefixes``) from a checkpoint: they reload from
    their paths, and storing them would double every checkpoint. A sharded model's checkpoint keeps them, because
    ``torch.distributed.checkpoint`` loads a model whole."""
    if not is_sharded(module):
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(prefixes)}


def restore_frozen(module: LightningModule, checkpoint: dict, prefixes: tuple[str, ...]) -> None:
    """Hand the frozen networks' weights, loaded from their paths, back to a checkpoint that left them out, so
    that strict loading still checks every trained weight (a sharded checkpoint has them and no ``state_dict``)."""
    state = checkpoint.get("state_dict")
    if state is not None:
        state.update({k: v for k, v in module.state_dict().items() if k.startswith(prefixes) and k not in state})


def export_trained(module: LightningModule, model: PreTrainedModel) -> str:
    """Export ``model`` (LoRA adapters merged into a copy, see :func:`merged`) with the module's tokenizer to
    ``export_dir`` (default ``<log_dir>/hf``) from rank 0; every rank returns the folder once it is written. Every
    rank must call it: ``trainer.log_dir`` is a collective under DDP (rank 0 broadcasts it), and a sharded model's
    weights are gathered from all ranks."""
    trainer = module.trainer
    out_dir = module.hparams.export_dir or f"{trainer.log_dir}/hf"
    state_dict = full_state_dict(model) if is_sharded(model) else None
    if trainer.is_global_zero:
        with quiet_transformers():  # its "Writing model shards" bar
            export(merged(model), module.tokenizer, out_dir, state_dict)
    trainer.strategy.barrier("export")
    return out_dir


class StopOnNonFinite(Callback):
    """Stops a run at the first training step whose loss (or PPO's policy or value loss, or its reward scores) is
    NaN or infinite, with one line naming the step. It runs right after the step, before validation, checkpointing
    or the export at the end of fit, so no saved file holds the diverged weights and the last good checkpoint stays
    the newest."""

    WATCHED = ("objective/scores", "train/loss", "loss/policy", "loss/value")
    """Logged training metrics checked after each step, causes first: a NaN score makes every PPO loss NaN."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        values = {"loss": outputs["loss"]} if isinstance(outputs, Mapping) and "loss" in outputs else {}
        values |= {name: trainer.callback_metrics[name] for name in self.WATCHED if name in trainer.callback_metrics}
        for name, value in values.items():
            if not torch.isfinite(torch.as_tensor(value)).all():
                raise TrainingDiverged(
                    f"{name} is {float(torch.as_tensor(value).float().mean())} at step {trainer.global_step}: training "
                    "stopped before anything saved it (lower the learning rate, or check the data and reward)"
                )
