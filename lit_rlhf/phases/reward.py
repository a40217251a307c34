"""Phase 2: a reward model on comparisons with the Bradley–Terry loss (InstructGPT §3.5, Stiennon et al. 2020).

The model starts from the SFT export with its LM head replaced by a scalar head read at the last non-pad token
(``AutoModelForSequenceClassification``, ``num_labels=1``). After fit it scores the responses of the policy PPO will
train (``statistics_policy``, by default the SFT export) to training prompts and stores the mean and std of those
scores in the export's config, so PPO can normalise.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torchmetrics import CatMetric, MeanMetric

from lit_rlhf import losses
from lit_rlhf.errors import ConfigError
from lit_rlhf.generation import SamplingConfig
from lit_rlhf.models import (
    LoRAConfig,
    is_sharded,
    load_scalar_head_model,
    load_tokenizer,
    scalar_scores,
    select_rows,
    shared_prompt_scores,
    shares_prompts,
    trainable,
    with_lora,
)
from lit_rlhf.phases.settings import (
    ODINConfig,
    OptimizerConfig,
    as_config,
    check_settings,
    keep_settings,
)
from lit_rlhf.phases.shared import (
    adamw_with_warmup,
    check_context,
    export_trained,
    shard_networks,
    validation_means,
)
from lit_rlhf.reward_models import policy_answers, store_score_statistics
from lit_rlhf.scoring import RewardModelScorer, gold_scorer


def preference_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, gold_chosen: torch.Tensor | None = None,
    gold_rejected: torch.Tensor | None = None,
) -> dict[str, tuple[torch.Tensor, int]]:
    """Each metric with the number of pairs it is a mean over: ``accuracy`` (chosen scored higher), ``margin``,
    ``reward/mean``, ``reward/std`` over all and, with gold rewards, ``gold/accuracy``: agreement with the gold
    preference over the pairs where gold is not tied."""
    scores, pairs = torch.cat([chosen, rejected]), len(chosen)
    metrics = {
        "accuracy": ((chosen > rejected).float().mean(), pairs),
        "margin": ((chosen - rejected).mean(), pairs),
        "reward/mean": (scores.mean(), pairs),
        "reward/std": (scores.std() if scores.numel() > 1 else torch.zeros(()), pairs),
    }
    if gold_chosen is not None:
        decided = gold_chosen != gold_rejected
        if decided.any():
            agree = (chosen > rejected) == (gold_chosen > gold_rejected)
            metrics["gold/accuracy"] = (agree[decided].float().mean(), int(decided.sum()))
    return metrics


class RewardModelModule(LightningModule):
    """Bradley–Terry reward model. Logs, with ``train/`` and ``val/`` prefixes: ``loss``, ``accuracy``,
    ``margin``, ``reward/mean``, ``reward/std``, ``reward/length_corr`` (Pearson correlation of scores with
    response length: the inherited length bias in one number) and, on the world, ``gold/accuracy``. With ``lora``
    LoRA adapters and the scalar head train, and the export has them merged. ``sampling``: how the policy PPO will
    train answers, for the score statistics (its length limit and temperature should be PPO's). With
    ``share_prompts`` (the default) a batch's prompts go through the model once, into a key/value cache that its
    responses then attend to (:mod:`lit_rlhf.models.shared_prompts`): the same scores up to float rounding, for about
    a fifth less work; without it, or for a model that takes no cache, each whole sequence goes through. With
    ``odin`` a second, length head trains beside the score head (ODIN, :class:`~lit_rlhf.phases.settings.ODINConfig`;
    logged ``train/odin/length_head_corr``); the export scores with the quality head alone."""

    def __init__(
        self,
        model_name_or_path: str = "runs/sft/hf",
        optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-3, warmup_steps=10),
        center_rewards_coefficient: float = 0.0,
        normalization_samples: int = 256,
        statistics_policy: str | None = None,
        sampling: SamplingConfig = SamplingConfig(),
        max_prompt_length: int = 32,
        export_dir: str | None = None,
        trust_remote_code: bool = False,
        dtype: str | None = None,
        lora: LoRAConfig | None = None,
        share_prompts: bool = True,
        odin: ODINConfig | None = None,
    ) -> None:
        super().__init__()
        check_settings(non_negative={"center_rewards_coefficient": center_rewards_coefficient})
        if normalization_samples < 2:
            raise ConfigError(f"normalization_samples must be at least 2 (for a std), got {normalization_samples}")
        self.save_hyperparameters()
        keep_settings(self, optimizer, sampling, lora)
        self.odin = as_config(ODINConfig, odin)
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
        self.model = None
        self.length_head: torch.nn.Linear | None = None
        """ODIN's length head, trained beside the model's score head and never exported."""
        self.val_metrics = torch.nn.ModuleDict(
            {"loss": MeanMetric(), "accuracy": MeanMetric(), "margin": MeanMetric(), "gold/accuracy": MeanMetric()}
        )
        self.val_scores = CatMetric()
        self.val_lengths = CatMetric()

    def configure_model(self) -> None:
        if self.model is None:
            hp = self.hparams
            model = load_scalar_head_model(hp.model_name_or_path, self.tokenizer, hp.trust_remote_code, hp.dtype)
            self.model = with_lora(model, self.lora, task_type="SEQ_CLS").train()  # from_pretrained: eval mode
            if self.odin is not None:
                self.length_head = torch.nn.Linear(model.config.hidden_size, 1, bias=False)
            check_context(self, model, samples_after_fit=True)  # the score statistics' samples
            shard_networks(self, self.model)

    def _scores(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen and rejected scores, each distinct sequence scored once (a response in several pairs of a
        prompt-grouped batch is scored once and its score shared): with ``share_prompts`` each distinct prompt too,
        else in one concatenated forward of the whole sequences."""
        if self.hparams.share_prompts and shares_prompts(self.model):
            scores = shared_prompt_scores(self.model, batch["shared_prompts"], self.length_head)
            return select_rows(scores, batch["chosen_row"]), select_rows(scores, batch["rejected_row"])
        input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
        attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
        distinct, row_of = torch.unique(torch.cat([input_ids, attention_mask], 1), dim=0, return_inverse=True)
        distinct_ids, distinct_mask = distinct.split(input_ids.shape[1], dim=1)
        return scalar_scores(self.model, distinct_ids, distinct_mask, self.length_head)[row_of].chunk(2)

    def _step(self, batch: dict) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
        chosen, rejected = self._scores(batch)
        lengths = torch.cat([batch["chosen_response_mask"].sum(1), batch["rejected_response_mask"].sum(1)]).float()
        margin = torch.where(batch["has_margin"], batch["margin"], torch.zeros_like(batch["margin"]))
        if self.length_head is None:
            loss = losses.bradley_terry_loss(chosen, rejected, margin).mean()
        else:  # ODIN: the loss on the heads' sum; the quality head alone is the score
            quality, length_scores = torch.cat([chosen, rejected]).unbind(dim=1)
            total_chosen, total_rejected = (quality + length_scores).chunk(2)
            loss = losses.bradley_terry_loss(total_chosen, total_rejected, margin).mean() + losses.odin_penalty(
                quality, length_scores, lengths, self.model.score.weight, self.length_head.weight,
                self.odin.length_weight, self.odin.orthogonality_weight)
            self.log("train/odin/length_head_corr", losses.pearson_correlation(length_scores.detach(), lengths))
            chosen, rejected = quality.chunk(2)
        if self.hparams.center_rewards_coefficient:
            loss = loss + self.hparams.center_rewards_coefficient * losses.reward_centering_penalty(chosen, rejected)
        gold = None
        if (oracle := gold_scorer(batch["prompt"])) is not None:
            gold = [oracle.score(batch["prompt"], batch[side]).to(chosen.device, torch.float32)
                    for side in ("chosen", "rejected")]
        metrics = preference_metrics(chosen.detach(), rejected.detach(), *(gold or (None, None)))
        return loss, metrics, torch.cat([chosen, rejected]).detach(), lengths

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, metrics, scores, lengths = self._step(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{name}": value for name, (value, _) in metrics.items()})
        self.log("train/reward/length_corr", losses.pearson_correlation(scores, lengths))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, metrics, scores, lengths = self._step(batch)
        for name, (value, pairs) in {"loss": (loss, len(batch["prompt"])), **metrics}.items():
            if name in self.val_metrics:  # each a mean over its own pairs: gold/accuracy's leave out gold's ties
                self.val_metrics[name].update(value, weight=pairs)
        self.val_scores.update(scores)
        self.val_lengths.update(lengths)

    def on_validation_epoch_end(self) -> None:
        logged = validation_means(self.val_metrics)
        scores, lengths = self.val_scores.compute(), self.val_lengths.compute()
        logged["val/reward/mean"] = scores.mean()
        logged["val/reward/std"] = scores.std()
        logged["val/reward/length_corr"] = losses.pearson_correlation(scores, lengths)
        self.log_dict(logged, sync_dist=True)  # already global: torchmetrics gathers every rank's updates
        self.val_scores.reset()
        self.val_lengths.reset()

    def on_fit_end(self) -> None:
        if is_sharded(self.model) or self.trainer.is_global_zero:  # a sharded model scores only on every rank
            self._store_score_statistics()
        export_trained(self, self.model)

    def _store_score_statistics(self) -> None:
        """Score the responses of the policy PPO will train (``statistics_policy``, by default the SFT export the
        reward model starts from) to training prompts; keep their mean and std in the config, and the length limits
        of training, which scorers loading the export take as their defaults. A reward model that continues an
        earlier one (iterative RLHF's ``reward_init: previous``) must name the policy: its own start is no policy."""
        hp = self.hparams
        datamodule = self.trainer.datamodule
        self.model.eval()
        scorer = RewardModelScorer(
            self.model, self.tokenizer, datamodule.hparams.max_length, datamodule.hparams.max_prompt_length
        )
        answers = policy_answers(hp.statistics_policy or hp.model_name_or_path,
                                 [record.prompt for record in datamodule.train_records], hp.normalization_samples,
                                 self.sampling, scorer.max_prompt_length, self.device, hp.dtype)
        store_score_statistics(scorer, answers)

    def configure_optimizers(self):
        length_head = [] if self.length_head is None else list(self.length_head.parameters())
        return adamw_with_warmup(self.trainer, [*trainable(self.model), *length_head], self.optimizer_config)
