"""Phase 3: PPO against a reward model with a KL leash to the SFT policy (Ziegler et al. 2019; Ouyang et al. 2022,
§3.5), and the critic-free GRPO and RLOO estimators in the same loop.

Networks: the ``policy`` (trained); the ``reference``, a frozen copy of the SFT export for the KL penalty (with
``lora``, the policy with its adapters disabled); the ``reward_networks``, the frozen reward-model export or an
ensemble's members (none for gold or a Python reward); for ``gae`` only, the ``critic`` (trained), by default from
the reward-model export as in InstructGPT (an ensemble's first member). Frozen networks stay out of checkpoints and
reload from their paths.

The settings come in groups (:mod:`lit_rlhf.phases.settings`): ``sampling``, ``kl_control``, ``optimizer``,
``update``, ``advantage``, ``reward`` and ``ptx``. One iteration (one ``training_step``): sample responses
(``advantage.group_size`` per prompt for ``grpo``/``rloo``); score them and apply the ``reward`` group (normalised
with the reward model's stored statistics, less the optional missing-EOS penalty, clipped); take old
and reference log-probs (and values) without gradient; :func:`shape_rewards` puts −β·KL on every token and the score
on the last; ``gae`` takes whitened advantages from the critic, ``grpo``/``rloo`` give every token its sequence's
group advantage. Then ``update.epochs`` passes of ``update.num_minibatches`` updates minimise :func:`ppo_policy_loss`
+ ``vf_coef``·:func:`ppo_value_loss` (+ ``ptx.coef``·SFT loss on demonstrations, PPO-ptx; − ``entropy_coef``·entropy),
and the KL controller updates β; with ``update.target_kl`` an iteration's updates stop early once the policy has moved
that far from the one that sampled. ``trainer.max_steps`` counts those updates (an iteration stopped early makes
fewer, and more iterations run); the datamodule's ``batch_size`` is the number of prompts per iteration. The policy
and the critic are separate networks in one AdamW, each with its own learning rate (``optimizer.learning_rate``,
``update.value_learning_rate``): Adam divides out a constant scale of a loss, so ``vf_coef`` changes the critic's
steps only through the gradient-norm clip that both networks share. Every iteration is checked against
:class:`~lit_rlhf.phases.ppo_health.HealthLimits` (``health/breaches`` counts the breaches; :attr:`PPOModule.health`
keeps them).
"""

from __future__ import annotations

import json
from collections import defaultdict
from functools import cached_property
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import move_data_to_device
from torchmetrics.functional import explained_variance

from lit_rlhf.advantages import (
    cap_scores,
    clip_scores,
    gae,
    group_advantages,
    penalize_missing_eos,
    shape_rewards,
    transform_scores,
    whiten,
)
from lit_rlhf.data.datamodules import DemonstrationDataModule, global_seed
from lit_rlhf.errors import ConfigError
from lit_rlhf.evaluation import HeldOutEvaluator
from lit_rlhf.generation import Generation, SamplingConfig, generate
from lit_rlhf.kl_control import KLControlConfig
from lit_rlhf.losses import (
    kl_penalty,
    masked_mean,
    masked_sum,
    ppo_policy_loss,
    ppo_value_loss,
    sft_loss,
)
from lit_rlhf.models import (
    AdaptersOff,
    LoRAConfig,
    ValueModel,
    frozen,
    load_causal_lm,
    load_scalar_head_model,
    load_tokenizer,
    model_token_logprobs,
    response_logits,
    trainable,
    with_lora,
    without_dropout,
)
from lit_rlhf.phases.ppo_buffer import Rollout, RolloutBuffer, token_shares
from lit_rlhf.phases.ppo_health import PPOHealth
from lit_rlhf.phases.settings import (
    AdvantageConfig,
    OptimizerConfig,
    PTXConfig,
    RewardConfig,
    UpdateConfig,
    as_config,
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
)
from lit_rlhf.scoring import EnsembleScorer, gold_scorer, make_scorer

FROZEN_PREFIXES = ("reference.", "reward_networks.")
"""State-dict prefixes of the frozen networks, which checkpoints leave out."""


class PPOModule(LightningModule):
    """PPO / GRPO / RLOO fine-tuning of an SFT export; the module docstring describes the loop.

    ``reward_model``: a reward-model export, ``"gold"`` (the world's gold reward) or ``"package.module:function"``.
    ``value_model``: where the critic starts (``gae`` only); default the reward-model export, else the SFT export.
    ``seed`` seeds each iteration's sampling together with the iteration count; ``None`` takes the run's seed.
    ``ptx``: PPO-ptx's settings; ``None``, no SFT loss. The groups' fields are documented in
    :mod:`lit_rlhf.phases.settings`.

    Logged every iteration: ``objective/{scores,kl,rlhf_reward,non_score_reward,entropy}`` (per-sequence means,
    KL and entropy estimated from the sampled tokens), ``policy/{clipfrac,approxkl,entropy}`` (``policy/entropy``:
    exact mean entropy of the next-token distributions during the update), ``loss/policy``,
    ``kl/beta``, ``policy/{updates,early_stop}``, ``health/breaches``,
    ``rollout/response/{length_mean,eos_fraction,length_drift}`` (of the rollouts' answers; drift:
    against the reference policy's answers to the held-out prompts); with a critic ``loss/value`` and the critic's
    ``value/clipfrac``, ``value/explained_variance``; with PPO-ptx ``loss/ptx``; on the world
    ``rollout/gold/reward``. Validation answers the held-out prompts with fixed sampling noise and logs under
    ``eval/`` what its :class:`~lit_rlhf.evaluation.HeldOutEvaluator` measures against the reference policy's
    answers: generation metrics, ``proxy/reward`` (the scorer's mean), ``objective/kl`` to the reference, the
    ``hacking/`` detectors and on the world ``gold/reward`` and ``gold/proxy_gap``. Every
    ``log_samples_every_n_iterations`` some samples go to a W&B table and to ``samples.jsonl`` in the run folder.
    The policy is exported at the end of fit.
    """

    def __init__(
        self,
        model_name_or_path: str = "runs/sft/hf",
        reward_model: str = "runs/reward/hf",
        value_model: str | None = None,
        sampling: SamplingConfig = SamplingConfig(),
        kl_control: KLControlConfig = KLControlConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-4),
        update: UpdateConfig = UpdateConfig(),
        advantage: AdvantageConfig = AdvantageConfig(),
        reward: RewardConfig = RewardConfig(),
        ptx: PTXConfig | None = None,
        log_samples_every_n_iterations: int = 10,
        num_logged_samples: int = 8,
        eval_seed: int = 1234,
        seed: int | None = None,
        max_prompt_length: int = 32,
        export_dir: str | None = None,
        trust_remote_code: bool = False,
        dtype: str | None = None,
        lora: LoRAConfig | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        keep_settings(self, optimizer, sampling, lora)
        self.kl_control = as_config(KLControlConfig, kl_control)
        self.update = as_config(UpdateConfig, update)
        self.advantage = as_config(AdvantageConfig, advantage)
        self.reward = as_config(RewardConfig, reward)
        self.ptx = as_config(PTXConfig, ptx)
        if self.sampling.temperature <= 0:
            raise ConfigError("PPO samples its rollouts: sampling.temperature must be positive, got "
                              f"{self.sampling.temperature}")
        kl = self.kl_control  # a pure-math module's settings: checked here, in the package's words
        check_settings(positive={"kl_control.target": kl.target, "kl_control.horizon": kl.horizon},
                       non_negative={"kl_control.beta": kl.beta})
        self.seed = global_seed() if seed is None else seed
        self.automatic_optimization = False
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
        self.kl_controller = self.kl_control.controller()
        self.policy = self.reference = self.critic = self.scorer = None
        self.reward_networks = torch.nn.ModuleList()
        self.iteration = 0
        """Completed iterations: they fix the random seed of the next one."""
        self.health = PPOHealth()
        self._demonstrations = None

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        load = (self.tokenizer, hp.trust_remote_code, hp.dtype)
        self.policy = without_dropout(with_lora(load_causal_lm(hp.model_name_or_path, *load), self.lora))
        check_context(self, self.policy, hp.max_prompt_length + self.sampling.max_new_tokens)
        # With LoRA the reference is the policy with its adapters disabled: the loaded weights, no second copy.
        reference = AdaptersOff(self.policy) if self.lora else load_causal_lm(hp.model_name_or_path, *load)
        self.reference = frozen(reference)
        self.scorer = make_scorer(
            hp.reward_model, normalize=self.reward.normalize, max_prompt_length=hp.max_prompt_length,
            max_length=hp.max_prompt_length + self.sampling.max_new_tokens + 1,
        )
        # registered modules, so that the strategy places them
        self.reward_networks = torch.nn.ModuleList(frozen(network) for network in getattr(self.scorer, "networks", []))
        for network in self.reward_networks:  # + 1: the EOS a reward model reads after a finished answer
            check_context(self, network, hp.max_prompt_length + self.sampling.max_new_tokens + 1)
        if self.advantage.estimator == "gae":
            # an ensemble's critic starts from its first member, whose normalised scale the ensemble's scores share
            first = self.scorer.members[0] if isinstance(self.scorer, EnsembleScorer) else self.scorer
            reward_start = first.name_or_path if self.reward_networks else None
            start = hp.value_model or reward_start or hp.model_name_or_path
            statistics = first.statistics if start == reward_start and first.normalize else (0.0, 1.0)
            self.critic = without_dropout(ValueModel(load_scalar_head_model(start, *load), *statistics))
        shard_networks(self, self.policy, self.reference, *self.reward_networks, self.critic)

    def configure_optimizers(self):
        groups = [{"params": trainable(self.policy), "lr": self.optimizer_config.learning_rate}]
        if self.critic is not None:
            value_learning_rate = self.update.value_learning_rate or self.optimizer_config.learning_rate
            groups.append({"params": self.critic.parameters(), "lr": value_learning_rate})
        return adamw_with_warmup(self.trainer, groups, self.optimizer_config, decay=False)

    @property
    def samples_generated(self) -> int:
        """Rollout answers sampled so far, on every process: a cost of the method, beside its updates."""
        prompts = self.trainer.datamodule.hparams.batch_size
        return self.iteration * prompts * self.advantage.answers_per_prompt * self.trainer.world_size

    @property
    def optimizer_steps_per_batch(self) -> int:
        """``trainer.max_steps`` counts optimiser updates, this many per iteration: the progress bar counts
        iterations (:class:`lit_rlhf.trainer_parts.TrainingProgressBar`)."""
        return self.update.epochs * self.update.num_minibatches

    # --- one iteration ---

    def on_train_start(self) -> None:
        if self.ptx is not None:
            self._demonstrations = self._load_demonstrations()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        """One iteration on one batch of prompts. Its random draws are seeded by the iteration count, so a run
        resumed mid-epoch (the datamodule resumes its prompt order exactly) repeats the uninterrupted one."""
        hp = self.hparams
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(hash((self.seed, self.iteration, self.global_rank)) % 2**63)  # int hashes are stable
            rollout, metrics, samples = self._rollout(batch)
            buffer = RolloutBuffer(rollout, self.update.num_minibatches, self.update.gradient_accumulation_steps)
            metrics |= self._optimise(buffer)
        kl = self.trainer.strategy.reduce(metrics["objective/kl"], reduce_op="mean")
        self.kl_controller.update(kl, n_steps=len(rollout) * self.trainer.world_size)
        self.health.check(self.iteration, {name: float(value) for name, value in metrics.items()})
        metrics["health/breaches"] = torch.tensor(float(len(self.health.breaches)))
        self.log_dict(metrics, batch_size=len(rollout))
        if self.iteration % hp.log_samples_every_n_iterations == 0:
            self._log_samples(samples[: hp.num_logged_samples])
        self.iteration += 1

    @torch.no_grad()
    def _rollout(self, prompts: dict) -> tuple[Rollout, dict[str, torch.Tensor], list[dict]]:
        """One iteration's experience: sample, score, take the advantages; with what the rollouts show."""
        prompt_texts, generation = self._sample(prompts)
        responses = generation.decode(self.tokenizer)
        scores = self._scores(prompts, prompt_texts, responses, generation.ended_with_eos)
        prompt_zeros = torch.zeros_like(generation.prompt_attention_mask)
        response_mask = torch.cat([prompt_zeros, generation.response_mask], 1)
        sequences = (generation.input_ids, generation.attention_mask, response_mask, self.sampling.temperature)
        logprobs, mask = model_token_logprobs(self.policy, *sequences)
        ref_logprobs, _ = model_token_logprobs(self.reference, *sequences)
        rewards = shape_rewards(scores, logprobs, ref_logprobs, mask, self.kl_controller.beta)  # k1: module docstring
        advantages, values, returns = self._advantages(rewards, mask, generation.input_ids, generation.attention_mask)
        rollout = Rollout(generation.input_ids, generation.attention_mask, response_mask, mask, logprobs, advantages,
                          values, returns)
        metrics = self._rollout_metrics(rollout, generation, scores, rewards, ref_logprobs)
        samples = [
            {"iteration": self.iteration, "prompt": prompt, "response": response, "score": score}
            for prompt, response, score in zip(prompt_texts, responses, scores.tolist())
        ]
        if (oracle := gold_scorer(prompt_texts)) is not None:
            gold = oracle.score(prompt_texts, responses).float()
            metrics["rollout/gold/reward"] = gold.mean()
            for sample, value in zip(samples, gold.tolist()):
                sample["gold"] = value
        return rollout, metrics, samples

    def _sample(self, prompts: dict) -> tuple[list[str], Generation]:
        """Each prompt's answers (a group of them for ``grpo``/``rloo``), with the prompt text of each."""
        repeats = self.advantage.answers_per_prompt
        generation = generate(
            self.policy, self.tokenizer, prompts["prompt_input_ids"].repeat_interleave(repeats, 0),
            prompts["prompt_attention_mask"].repeat_interleave(repeats, 0), self.sampling,
        )
        return [text for text in prompts["prompt"] for _ in range(repeats)], generation

    def _scores(
        self, batch: dict, prompts: list[str], responses: list[str], ended_with_eos: torch.Tensor
    ) -> torch.Tensor:
        """The scorer's scores shaped by the ``reward`` group: transformed against the reference policy's answer to
        each of the ``batch``'s prompts, capped, less the missing-EOS penalty, clipped."""
        scores = self.scorer.score(prompts, responses, ended_with_eos.tolist()).to(self.device)
        if self.reward.transform != "none":
            reference = generate(self.reference, self.tokenizer, batch["prompt_input_ids"],
                                 batch["prompt_attention_mask"], self.sampling)
            reference_scores = self.scorer.score(batch["prompt"], reference.decode(self.tokenizer),
                                                 reference.ended_with_eos.tolist()).to(self.device)
            repeated = reference_scores.repeat_interleave(self.advantage.answers_per_prompt)
            scores = transform_scores(scores, repeated, self.reward.transform)
        scores = cap_scores(scores, self.reward.cap)
        penalized = penalize_missing_eos(scores, ended_with_eos, self.reward.missing_eos_penalty)
        return clip_scores(penalized, self.reward.clip)

    def _advantages(
        self, rewards: torch.Tensor, mask: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Each response token's advantage, and with a critic its values and returns: GAE over the shaped rewards,
        else every token gets its sequence's group advantage (already normalised per group: whitening over tokens
        would shift it by a length-weighted mean)."""
        if self.critic is None:
            sequence_rewards = masked_sum(rewards, mask, dim=1)
            advantages = group_advantages(sequence_rewards, self.advantage.group_size, self.advantage.estimator)
            return advantages[:, None] * mask, None, None
        values = self.critic(input_ids, attention_mask)[:, :-1]
        advantages, returns = gae(rewards, values, mask, self.advantage.gamma, self.advantage.lam)
        return whiten(advantages, mask) if self.advantage.whiten else advantages, values, returns

    def _rollout_metrics(
        self, rollout: Rollout, generation: Generation, scores: torch.Tensor, rewards: torch.Tensor,
        ref_logprobs: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The ``objective/``, ``kl/``, ``rollout/response/`` and ``value/`` metrics of one iteration's rollouts."""
        mask, logprobs = rollout.mask, rollout.logprobs
        non_score_rewards = masked_sum(rewards, mask, dim=1) - scores
        lengths = (generation.response_lengths - generation.ended_with_eos.long()).float()
        reference_length = self.evaluator.baseline(self.reference).metrics["response/length_mean"]
        metrics = {
            "objective/scores": scores.mean(),
            "objective/kl": masked_sum(kl_penalty(logprobs, ref_logprobs, "k1"), mask, dim=1).mean(),
            "objective/non_score_reward": non_score_rewards.mean(),
            "objective/rlhf_reward": (scores + non_score_rewards).mean(),
            "objective/entropy": masked_sum(-logprobs, mask, dim=1).mean(),
            "kl/beta": torch.tensor(self.kl_controller.beta),
            "rollout/response/length_mean": lengths.mean(),
            "rollout/response/length_drift": lengths.mean() - reference_length,
            "rollout/response/eos_fraction": generation.ended_with_eos.float().mean(),
        }
        if rollout.values is not None:
            tokens = mask.bool()
            metrics["value/explained_variance"] = explained_variance(rollout.values[tokens], rollout.returns[tokens])
        return metrics

    def _optimise(self, buffer: RolloutBuffer) -> dict[str, torch.Tensor]:
        """``update.epochs`` passes of ``update.num_minibatches`` updates. With ``update.target_kl``, the iteration's
        remaining updates are dropped once a minibatch's approximate KL to the rollout policy, measured before its
        step, exceeds it (as Stable-Baselines3 does): the step that would go further is not taken. The first update is
        always taken, so that every iteration moves the policy and ``trainer.max_steps`` is reached."""
        optimizer, target_kl = self.optimizers(), self.update.target_kl
        stats, updates = defaultdict(list), 0
        for _ in range(self.update.epochs):
            for micro_batches in buffer.minibatches():
                approxkl = []
                for micro_batch, share in zip(micro_batches, token_shares(micro_batches)):
                    token_loss, ptx_loss, micro_stats = self._loss(micro_batch)
                    self.manual_backward(share * token_loss + ptx_loss / len(micro_batches))
                    approxkl.append(share * micro_stats["policy/approxkl"])
                    for name, value in micro_stats.items():
                        stats[name].append(value)
                if target_kl is not None and updates and self._reduced(torch.stack(approxkl).sum()) > target_kl:
                    optimizer.zero_grad()
                    return self._update_stats(stats, updates, stopped=True)
                if self.update.max_grad_norm is not None:
                    self.clip_gradients(optimizer, self.update.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad()
                self.lr_schedulers().step()
                updates += 1
        return self._update_stats(stats, updates, stopped=False)

    def _reduced(self, value: torch.Tensor) -> float:
        """The mean over every process, so that all of them stop an iteration's updates together."""
        return float(self.trainer.strategy.reduce(value.detach(), reduce_op="mean"))

    @staticmethod
    def _update_stats(stats: dict[str, list[torch.Tensor]], updates: int, stopped: bool) -> dict[str, torch.Tensor]:
        means = {name: torch.stack(values).mean() for name, values in stats.items()}
        counts = {"policy/updates": float(updates), "policy/early_stop": float(stopped)}
        return means | {name: torch.tensor(value) for name, value in counts.items()}

    def _loss(self, batch: Rollout) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """A micro-batch's losses: the token means over its responses (policy, entropy bonus, value), and PPO-ptx's
        over a batch of demonstrations of its own (0 without it), with their metrics."""
        update = self.update
        logprobs, mask, entropy = model_token_logprobs(
            self.policy, batch.input_ids, batch.attention_mask, batch.response_mask, self.sampling.temperature,
            return_entropy=True, entropy_grad=bool(update.entropy_coef),
        )
        loss, policy_stats = ppo_policy_loss(logprobs, batch.logprobs, batch.advantages, mask, update.clip_range)
        stats = {"loss/policy": loss.detach(), **{f"policy/{name}": value for name, value in policy_stats.items()}}
        mean_entropy = masked_mean(entropy, mask)
        stats["policy/entropy"] = mean_entropy.detach()
        if update.entropy_coef:
            loss = loss - update.entropy_coef * mean_entropy
        if self.critic is not None:
            values = self.critic(batch.input_ids, batch.attention_mask)[:, :-1]
            value_loss, value_stats = ppo_value_loss(values, batch.values, batch.returns, mask, update.clip_range_value)
            loss = loss + update.vf_coef * value_loss
            stats |= {"loss/value": value_loss.detach(), "value/clipfrac": value_stats["clipfrac"]}
        ptx_loss = torch.zeros((), device=self.device)
        if self._demonstrations is not None:
            demos = self._demonstration_batch()
            logits, input_ids, response_mask, _ = response_logits(
                self.policy, demos["input_ids"], demos["attention_mask"], demos["response_mask"]
            )
            demonstrations_loss = sft_loss(logits, input_ids, response_mask)
            ptx_loss = self.ptx.coef * demonstrations_loss
            stats["loss/ptx"] = demonstrations_loss.detach()
        return loss, ptx_loss, stats

    # --- PPO-ptx: the SFT loss on demonstrations (the world's when ptx_data_path is unset) ---

    def _load_demonstrations(self):
        hp = self.hparams
        data = DemonstrationDataModule(
            path=self.ptx.data_path, tokenizer_name_or_path=hp.model_name_or_path, batch_size=self.ptx.batch_size,
            max_length=hp.max_prompt_length + self.sampling.max_new_tokens + 1, max_prompt_length=hp.max_prompt_length,
            val_fraction=0.0,
        )
        data.prepare_data()
        data.setup("fit")
        return data.train_dataloader()

    def _demonstration_batch(self) -> dict:
        loader = self._demonstrations
        rows = torch.randint(len(loader.dataset), (loader.batch_size,)).tolist()
        return move_data_to_device(loader.collate_fn([loader.dataset[i] for i in rows]), self.device)

    # --- evaluation and logging ---

    @cached_property
    def evaluator(self) -> HeldOutEvaluator:
        """The held-out prompts' evaluation, proxy reward by the PPO's scorer; its baseline, the reference policy's
        answers, is also what the rollouts' length drift is measured against."""
        return held_out_evaluator(self, self.scorer)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Nothing per batch: :meth:`on_validation_epoch_end` answers all held-out prompts with fixed noise."""

    def on_validation_epoch_end(self) -> None:
        evaluation = self.evaluator.evaluate(self.policy, self.reference)
        self.log_dict({f"eval/{name}": value for name, value in evaluation.metrics.items()}, sync_dist=True)

    def _log_samples(self, samples: list[dict]) -> None:
        log_dir = self.trainer.log_dir or "."  # a collective under DDP: every rank asks
        if not self.trainer.is_global_zero or not samples:
            return
        with open(Path(log_dir) / "samples.jsonl", "a") as handle:
            handle.writelines(json.dumps(sample) + "\n" for sample in samples)
        columns = list(samples[0])
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("samples", columns, [[sample.get(column) for column in columns] for sample in samples])

    # --- checkpoint and export ---

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Beyond weights and optimiser state, the loop's state is β, the seed and the iteration count, which fix
        every random draw of the next iteration (so no RNG state needs saving); the datamodule keeps the prompt
        order."""
        leave_out_frozen(self, checkpoint, FROZEN_PREFIXES)
        checkpoint["ppo"] = {
            "kl_controller": self.kl_controller.state_dict(), "iteration": self.iteration, "seed": self.seed,
            "health": self.health.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """The loop's state as it was, so that the run continues exactly, except what the resuming command line
        changed: other ``kl_control`` settings start their controller afresh (an adaptive β from its new start),
        another ``seed`` draws from it."""
        restore_frozen(self, checkpoint, FROZEN_PREFIXES)
        saved_settings = checkpoint.get("hyper_parameters", {})
        if saved_settings.get("kl_control", self.hparams.kl_control) == self.hparams.kl_control:
            self.kl_controller.load_state_dict(checkpoint["ppo"]["kl_controller"])
        if saved_settings.get("seed", self.hparams.seed) == self.hparams.seed:
            self.seed = checkpoint["ppo"].get("seed", self.seed)
        self.iteration = checkpoint["ppo"]["iteration"]
        self.health.load_state_dict(checkpoint["ppo"]["health"])

    def on_fit_end(self) -> None:
        export_trained(self, self.policy)
