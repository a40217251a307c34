"""Phase 1: supervised fine-tuning on demonstrations, the loss on response tokens only (InstructGPT §3.5)."""

from __future__ import annotations

import time
from functools import cached_property

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric

from lit_rlhf import losses
from lit_rlhf.evaluation import HeldOutEvaluator
from lit_rlhf.generation import SamplingConfig
from lit_rlhf.models import LoRAConfig, load_causal_lm, load_tokenizer, response_logits, trainable, with_lora
from lit_rlhf.phases.settings import (
    OptimizerConfig,
    keep_settings,
)
from lit_rlhf.phases.shared import (
    adamw_with_warmup,
    check_context,
    export_trained,
    held_out_evaluator,
    shard_networks,
)


class SFTModule(LightningModule):
    """Causal-LM fine-tuning with the prompt masked out of the loss: the loss covers the batch's ``response_mask``,
    which in a multi-turn chat marks every assistant turn (see ``DemonstrationDataModule``'s ``assistant_turns``).

    Logs ``train/loss``, ``train/tokens_per_second``, ``val/loss``, ``val/perplexity`` and, at every validation,
    samples answers to the datamodule's held-out prompts (``sampling``, noise seeded by ``eval_seed``) and logs
    under ``eval/`` what its :class:`~lit_rlhf.evaluation.HeldOutEvaluator` measures: ``response/length_mean``,
    the ``hacking/`` rates, and ``gold/reward`` on the embedded world. Exports a Hugging Face folder at the end of fit
    (``export_dir``, default ``<log_dir>/hf``) that the next phase loads by path. With ``lora`` only LoRA adapters
    train, and the export has them merged into the weights.
    """

    def __init__(
        self,
        model_name_or_path: str = "world",
        optimizer: OptimizerConfig = OptimizerConfig(learning_rate=3e-3, warmup_steps=20),
        sampling: SamplingConfig = SamplingConfig(),
        eval_seed: int = 1234,
        max_prompt_length: int = 32,
        export_dir: str | None = None,
        trust_remote_code: bool = False,
        dtype: str | None = None,
        lora: LoRAConfig | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        keep_settings(self, optimizer, sampling, lora)
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
        self.model = None
        self.val_nll = MeanMetric()
        self._batch_started_at = 0.0

    def configure_model(self) -> None:
        if self.model is None:
            hp = self.hparams
            model = load_causal_lm(hp.model_name_or_path, self.tokenizer, hp.trust_remote_code, hp.dtype)
            self.model = with_lora(model, self.lora).train()  # from_pretrained returns eval mode: dropout off
            check_context(self, model)
            shard_networks(self, self.model)

    def _loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits, input_ids, response_mask, _ = response_logits(
            self.model, batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        )
        loss = losses.sft_loss(logits, input_ids, response_mask)
        response_tokens = batch["response_mask"][:, 1:].sum()
        return loss, response_tokens

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._batch_started_at = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, response_tokens = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(response_tokens))
        return loss

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        seconds = time.perf_counter() - self._batch_started_at
        tokens = batch["attention_mask"].sum().item()
        self.log("train/tokens_per_second", tokens / max(seconds, 1e-9))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, response_tokens = self._loss(batch)
        self.val_nll.update(loss, weight=response_tokens)

    def on_validation_epoch_end(self) -> None:
        val_loss = self.val_nll.compute()
        self.val_nll.reset()
        self.log_dict({"val/loss": val_loss, "val/perplexity": torch.exp(val_loss)}, sync_dist=True)  # already global
        metrics = self.evaluator.evaluate(self.model).metrics
        self.log_dict({f"eval/{name}": value for name, value in metrics.items()}, sync_dist=True)

    @cached_property
    def evaluator(self) -> HeldOutEvaluator:
        """The held-out prompts' evaluation, built at the first validation."""
        return held_out_evaluator(self)

    def on_fit_end(self) -> None:
        export_trained(self, self.model)

    def configure_optimizers(self):
        return adamw_with_warmup(self.trainer, trainable(self.model), self.optimizer_config)
