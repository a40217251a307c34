"""Phase 3: PPO against a reward model with a KL leash to the SFT policy (Ziegler et al. 2019; Ouyang et al. 2022,
§3.5), and the critic-free GRPO and RLOO estimators in the same loop.

Networks: the ``policy`` (trained); the ``reference``, a frozen copy of the SFT export for the KL penalty (with
``lora``, the policy with its adapters disabled); the ``reward_network``, the frozen reward-model export (absent for
gold or a Python reward); for ``gae`` only, the ``critic`` (trained), by default from the reward-model export as in
InstructGPT. Frozen networks stay out of checkpoints and reload from their paths.

One iteration (one ``training_step``): sample responses (``group_size`` per prompt for ``grpo``/``rloo``); score
them, normalised with the reward model's stored statistics, less the optional missing-EOS penalty, clipped; take old
and reference log-probs (and values) without gradient; :func:`shape_rewards` puts −β·KL on every token and the score
on the last; ``gae`` takes whitened advantages from the critic, ``grpo``/``rloo`` give every token its sequence's
group advantage. Then ``ppo_epochs`` passes of ``num_minibatches`` updates minimise :func:`ppo_policy_loss` +
``vf_coef``·:func:`ppo_value_loss` (+ ``ptx_coef``·SFT loss on demonstrations, PPO-ptx; − ``entropy_coef``·entropy),
and the KL controller updates β; with ``target_kl`` an iteration's updates stop early once the policy has moved that
far from the one that sampled. ``trainer.max_steps`` counts those updates (an iteration stopped early makes fewer, and
more iterations run); the datamodule's ``batch_size`` is the number of prompts per iteration. The policy and the
critic are separate networks in one AdamW, each with its own learning rate (``optimizer.learning_rate``,
``value_learning_rate``): Adam divides out a constant scale of a loss, so ``vf_coef`` changes the critic's steps only
through the gradient-norm clip that both networks share. Every iteration is checked against
:class:`~lit_rlhf.phases.ppo_health.HealthLimits` (``health/breaches`` counts the breaches; :attr:`PPOModule.health`
keeps them).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import move_data_to_device
from torchmetrics.functional import explained_variance

from lit_rlhf.advantages import clip_scores, gae, group_advantages, penalize_missing_eos, shape_rewards, whiten
from lit_rlhf.data.datamodules import DemonstrationDataModule, global_seed
from lit_rlhf.errors import ConfigError
from lit_rlhf.evaluation import PolicyEvaluation, evaluate_policy
from lit_rlhf.generation import SamplingConfig, generate
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
from lit_rlhf.phases.shared import (
    OptimizerConfig,
    adamw_with_warmup,
    as_config,
    check_context,
    check_settings,
    export_trained,
    leave_out_frozen,
    restore_frozen,
    save_settings,
    shard_networks,
)
from lit_rlhf.scoring import RewardModelScorer, gold_scorer, make_scorer

FROZEN_PREFIXES = ("reference.", "reward_network.")
"""State-dict prefixes of the frozen networks, which checkpoints leave out."""


class PPOModule(LightningModule):
    """PPO / GRPO / RLOO fine-tuning of an SFT export; the module docstring describes the loop.

    ``reward_model``: a reward-model export, ``"gold"`` (the world's gold reward) or ``"package.module:function"``.
    ``value_model``: where the critic starts (``gae`` only); default the reward-model export, else the SFT export.
    ``seed`` seeds each iteration's sampling together with the iteration count; ``None`` takes the run's seed.
    ``value_learning_rate``: the critic's rate; ``None`` takes the policy's. ``target_kl``: the most approximate KL
    (``policy/approxkl``) a minibatch may start from before the iteration's remaining updates are dropped; ``None``
    never stops early.

    Logged every iteration: ``objective/{scores,kl,rlhf_reward,non_score_reward,entropy}`` (per-sequence means,
    KL and entropy estimated from the sampled tokens), ``policy/{clipfrac,approxkl,entropy}`` (``policy/entropy``:
    exact mean entropy of the next-token distributions during the update), ``loss/policy``,
    ``kl/beta``, ``policy/{updates,early_stop}``, ``health/breaches``,
    ``rollout/response/{length_mean,eos_fraction,length_drift}`` (of the rollouts' answers; drift:
    against the reference policy's answers to the held-out prompts); with a critic ``loss/value`` and the critic's
    ``value/clipfrac``, ``value/explained_variance``; with PPO-ptx ``loss/ptx``; on the world
    ``rollout/gold/reward``. Validation answers the held-out prompts with fixed
    sampling noise and logs under ``eval/`` what :func:`evaluate_policy` measures against the reference policy's
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
        advantage_estimator: Literal["gae", "grpo", "rloo"] = "gae",
        group_size: int = 4,
        sampling: SamplingConfig = SamplingConfig(),
        kl_control: KLControlConfig = KLControlConfig(),
        normalize_scores: bool = True,
        score_clip: float | None = None,
        missing_eos_penalty: float | None = None,
        optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-4),
        value_learning_rate: float | None = 1e-3,
        ppo_epochs: int = 4,
        num_minibatches: int = 1,
        gradient_accumulation_steps: int = 1,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        vf_coef: float = 0.1,
        entropy_coef: float = 0.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_advantages: bool = True,
        max_grad_norm: float | None = 1.0,
        target_kl: float | None = None,
        ptx_coef: float = 0.0,
        ptx_data_path: str | None = None,
        ptx_batch_size: int = 16,
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
        if advantage_estimator not in ("gae", "grpo", "rloo"):
            raise ConfigError(f"advantage_estimator must be gae, grpo or rloo, got {advantage_estimator!r}")
        if advantage_estimator != "gae" and group_size < 2:
            raise ConfigError(f"{advantage_estimator} needs group_size >= 2 to form a baseline, got {group_size}")
        save_settings(self)
        kl_control = as_config(KLControlConfig, kl_control)
        if self.sampling.temperature <= 0:
            raise ConfigError("PPO samples its rollouts: sampling.temperature must be positive, got "
                              f"{self.sampling.temperature}")
        check_settings(
            positive={"value_learning_rate": value_learning_rate, "target_kl": target_kl, "clip_range": clip_range,
                      "clip_range_value": clip_range_value, "ppo_epochs": ppo_epochs,
                      "num_minibatches": num_minibatches, "gradient_accumulation_steps": gradient_accumulation_steps,
                      "kl_control.target": kl_control.target, "kl_control.horizon": kl_control.horizon},
            non_negative={"kl_control.beta": kl_control.beta, "vf_coef": vf_coef, "entropy_coef": entropy_coef,
                          "ptx_coef": ptx_coef},
            unit={"gamma": gamma, "lam": lam},
        )
        self.seed = global_seed() if seed is None else seed
        self.automatic_optimization = False
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
        self.kl_controller = kl_control.controller()
        self.policy = self.reference = self.reward_network = self.critic = self.scorer = None
        self.iteration = 0
        """Completed iterations: they fix the random seed of the next one."""
        self.health = PPOHealth()
        self._reference_answers = self._demonstrations = None

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
            hp.reward_model, normalize=hp.normalize_scores, max_prompt_length=hp.max_prompt_length,
            max_length=hp.max_prompt_length + self.sampling.max_new_tokens + 1,
        )
        if isinstance(self.scorer, RewardModelScorer):
            self.reward_network = frozen(self.scorer.model)  # a registered module: the strategy places it
            # + 1: the EOS a reward model reads after a finished answer
            check_context(self, self.reward_network, hp.max_prompt_length + self.sampling.max_new_tokens + 1)
        if hp.advantage_estimator == "gae":
            start = hp.value_model or (hp.model_name_or_path if self.reward_network is None else hp.reward_model)
            on_score_scale = isinstance(self.scorer, RewardModelScorer) and start == hp.reward_model
            statistics = self.scorer.statistics if on_score_scale and hp.normalize_scores else (0.0, 1.0)
            self.critic = without_dropout(ValueModel(load_scalar_head_model(start, *load), *statistics))
        shard_networks(self, self.policy, self.reference, self.reward_network, self.critic)

    def configure_optimizers(self):
        hp = self.hparams
        groups = [{"params": trainable(self.policy), "lr": self.optimizer_config.learning_rate}]
        if self.critic is not None:
            value_learning_rate = hp.value_learning_rate or self.optimizer_config.learning_rate
            groups.append({"params": self.critic.parameters(), "lr": value_learning_rate})
        return adamw_with_warmup(self.trainer, groups, self.optimizer_config, decay=False)

    @property
    def samples_generated(self) -> int:
        """Rollout answers sampled so far, on every process: a cost of the method, beside its updates."""
        per_prompt = 1 if self.hparams.advantage_estimator == "gae" else self.hparams.group_size
        return self.iteration * self.trainer.datamodule.hparams.batch_size * per_prompt * self.trainer.world_size

    @property
    def optimizer_steps_per_batch(self) -> int:
        """``trainer.max_steps`` counts optimiser updates, this many per iteration: the progress bar counts
        iterations (:class:`lit_rlhf.trainer_parts.TrainingProgressBar`)."""
        return self.hparams.ppo_epochs * self.hparams.num_minibatches

    # --- one iteration ---

    def on_train_start(self) -> None:
        if self.hparams.ptx_coef:
            self._demonstrations = self._load_demonstrations()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        """One iteration on one batch of prompts. Its random draws are seeded by the iteration count, so a run
        resumed mid-epoch (the datamodule resumes its prompt order exactly) repeats the uninterrupted one."""
        hp = self.hparams
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(hash((self.seed, self.iteration, self.global_rank)) % 2**63)  # int hashes are stable
            rollout, metrics, samples = self._rollout(batch)
            buffer = RolloutBuffer(rollout, hp.num_minibatches, hp.gradient_accumulation_steps)
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
        hp = self.hparams
        per_prompt = 1 if hp.advantage_estimator == "gae" else hp.group_size
        prompt_texts = [text for text in prompts["prompt"] for _ in range(per_prompt)]
        generation = generate(
            self.policy, self.tokenizer, prompts["prompt_input_ids"].repeat_interleave(per_prompt, 0),
            prompts["prompt_attention_mask"].repeat_interleave(per_prompt, 0), self.sampling,
        )
        responses = generation.decode(self.tokenizer)
        scores = self._scores(prompt_texts, responses, generation.ended_with_eos)

        input_ids, attention_mask = generation.input_ids, generation.attention_mask
        response_mask = torch.cat([torch.zeros_like(generation.prompt_attention_mask), generation.response_mask], 1)
        sequences = (input_ids, attention_mask, response_mask, self.sampling.temperature)
        logprobs, mask = model_token_logprobs(self.policy, *sequences)
        ref_logprobs, _ = model_token_logprobs(self.reference, *sequences)
        beta = self.kl_controller.beta
        rewards = shape_rewards(scores, logprobs, ref_logprobs, mask, beta)  # k1 only: see the module docstring

        metrics, values, returns = {}, None, None
        if self.critic is not None:
            values = self.critic(input_ids, attention_mask)[:, :-1]
            advantages, returns = gae(rewards, values, mask, hp.gamma, hp.lam)
            metrics["value/explained_variance"] = explained_variance(values[mask.bool()], returns[mask.bool()])
            if hp.whiten_advantages:
                advantages = whiten(advantages, mask)
        else:  # already normalised once, per sequence: whitening over tokens would shift it by a length-weighted mean
            sequence_rewards = masked_sum(rewards, mask, dim=1)
            advantages = group_advantages(sequence_rewards, hp.group_size, hp.advantage_estimator)[:, None] * mask

        non_score_rewards = masked_sum(rewards, mask, dim=1) - scores
        lengths = (generation.response_lengths - generation.ended_with_eos.long()).float()
        reference_length = self._reference_evaluation().metrics["response/length_mean"]
        metrics |= {
            "objective/scores": scores.mean(),
            "objective/kl": masked_sum(kl_penalty(logprobs, ref_logprobs, "k1"), mask, dim=1).mean(),
            "objective/non_score_reward": non_score_rewards.mean(),
            "objective/rlhf_reward": (scores + non_score_rewards).mean(),
            "objective/entropy": masked_sum(-logprobs, mask, dim=1).mean(),
            "kl/beta": torch.tensor(beta),
            "rollout/response/length_mean": lengths.mean(),
            "rollout/response/length_drift": lengths.mean() - reference_length,
            "rollout/response/eos_fraction": generation.ended_with_eos.float().mean(),
        }
        samples = [
            {"iteration": self.iteration, "prompt": prompt, "response": response, "score": score}
            for prompt, response, score in zip(prompt_texts, responses, scores.tolist())
        ]
        if (oracle := gold_scorer(prompt_texts)) is not None:
            gold = oracle.score(prompt_texts, responses).float()
            metrics["rollout/gold/reward"] = gold.mean()
            for sample, value in zip(samples, gold.tolist()):
                sample["gold"] = value
        rollout = Rollout(input_ids, attention_mask, response_mask, mask, logprobs, advantages, values, returns)
        return rollout, metrics, samples

    def _scores(self, prompts: list[str], responses: list[str], ended_with_eos: torch.Tensor) -> torch.Tensor:
        hp = self.hparams
        scores = self.scorer.score(prompts, responses, ended_with_eos.tolist()).to(self.device)
        return clip_scores(penalize_missing_eos(scores, ended_with_eos, hp.missing_eos_penalty), hp.score_clip)

    def _optimise(self, buffer: RolloutBuffer) -> dict[str, torch.Tensor]:
        """``ppo_epochs`` passes of ``num_minibatches`` updates. With ``target_kl``, the iteration's remaining updates
        are dropped once a minibatch's approximate KL to the rollout policy, measured before its step, exceeds it
        (as Stable-Baselines3 does): the step that would go further is not taken. The first update is always taken,
        so that every iteration moves the policy and ``trainer.max_steps`` is reached."""
        optimizer, target_kl = self.optimizers(), self.hparams.target_kl
        stats, updates = defaultdict(list), 0
        for _ in range(self.hparams.ppo_epochs):
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
                if self.hparams.max_grad_norm is not None:
                    self.clip_gradients(optimizer, self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
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
        hp = self.hparams
        logprobs, mask, entropy = model_token_logprobs(
            self.policy, batch.input_ids, batch.attention_mask, batch.response_mask, self.sampling.temperature,
            return_entropy=True, entropy_grad=bool(hp.entropy_coef),
        )
        loss, policy_stats = ppo_policy_loss(logprobs, batch.logprobs, batch.advantages, mask, hp.clip_range)
        stats = {"loss/policy": loss.detach(), **{f"policy/{name}": value for name, value in policy_stats.items()}}
        mean_entropy = masked_mean(entropy, mask)
        stats["policy/entropy"] = mean_entropy.detach()
        if hp.entropy_coef:
            loss = loss - hp.entropy_coef * mean_entropy
        if self.critic is not None:
            values = self.critic(batch.input_ids, batch.attention_mask)[:, :-1]
            value_loss, value_stats = ppo_value_loss(values, batch.values, batch.returns, mask, hp.clip_range_value)
            loss = loss + hp.vf_coef * value_loss
            stats |= {"loss/value": value_loss.detach(), "value/clipfrac": value_stats["clipfrac"]}
        ptx_loss = torch.zeros((), device=self.device)
        if self._demonstrations is not None:
            demos = self._demonstration_batch()
            logits, input_ids, response_mask, _ = response_logits(
                self.policy, demos["input_ids"], demos["attention_mask"], demos["response_mask"]
            )
            demonstrations_loss = sft_loss(logits, input_ids, response_mask)
            ptx_loss = hp.ptx_coef * demonstrations_loss
            stats["loss/ptx"] = demonstrations_loss.detach()
        return loss, ptx_loss, stats

    # --- PPO-ptx: the SFT loss on demonstrations (the world's when ptx_data_path is unset) ---

    def _load_demonstrations(self):
        hp = self.hparams
        data = DemonstrationDataModule(
            path=hp.ptx_data_path, tokenizer_name_or_path=hp.model_name_or_path, batch_size=hp.ptx_batch_size,
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

    def _evaluate(self, model: torch.nn.Module, **scoring):
        prompts = self.trainer.datamodule.eval_prompts
        return evaluate_policy(
            model, self.tokenizer, prompts, self.sampling,
            max_prompt_length=self.hparams.max_prompt_length, seed=self.hparams.eval_seed, scorer=self.scorer,
            gold=gold_scorer(prompts), **scoring,
        )

    def _reference_evaluation(self) -> PolicyEvaluation:
        """The reference policy's answers to the held-out prompts (computed once): the baseline of drift and
        hacking metrics."""
        if self._reference_answers is None:
            self._reference_answers = self._evaluate(self.reference)
        return self._reference_answers

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Nothing per batch: :meth:`on_validation_epoch_end` answers all held-out prompts with fixed noise."""

    def on_validation_epoch_end(self) -> None:
        evaluation = self._evaluate(self.policy, reference=self.reference, baseline=self._reference_evaluation())
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
