"""The peer side: the work of one lit-rlhf phase done by TRL's trainer for it, timed like the lit-rlhf side.

run.py starts it with a peer venv's python from the repository root::

    bench/.venv-trl1/bin/python -m bench.peer_trl --phase sft ...     # SFTTrainer, RewardTrainer, DPOTrainer
    bench/.venv-trl019/bin/python -m bench.peer_trl --phase ppo ...   # PPOTrainer (TRL 0.19.x, its last release)

Every trainer reads the cached model, tokenizer and JSONL rows that the lit-rlhf run reads, with run.py's
hyperparameters (taken from the lit-rlhf phase's config file). What TRL would otherwise do differently by default is
set to match the lit-rlhf run, each with its reason at :func:`shared_arguments`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import deque
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from bench.timing import BatchWork, SteadyStateTimer, batch_work, installed_versions, write_result

PHASE_UNITS = {"sft": "tokens", "rm": "pairs", "dpo": "pairs", "dpo_precomputed": "pairs", "ppo": "episodes"}


class CountingCollator:
    """A trainer's collator that also notes each batch's work, in the order the batches are made. The data loader
    may build a batch ahead of the step that uses it (accelerate prefetches one), so the timing callback takes the
    oldest noted batch at each step's end rather than the newest."""

    def __init__(self, collate, unit: str, response_length: int, works: deque[BatchWork]) -> None:
        self.collate, self.unit, self.response_length, self.works = collate, unit, response_length, works

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        self.works.append(batch_work(self.unit, batch, self.response_length))
        return batch

    def __getattr__(self, name: str):  # anything else a trainer asks its collator
        return getattr(self.collate, name)


class SteadyStateThroughput(TrainerCallback):
    """transformers' callback twin of bench.lit_callback.SteadyStateThroughput: one step is one optimiser step
    (SFT, reward model, DPO) or one whole PPO iteration (TRL 0.19's PPOTrainer calls ``on_step_end`` once per
    rollout-and-update)."""

    def __init__(self, timer: SteadyStateTimer, works: deque[BatchWork], result_path: str, phase: str) -> None:
        self.timer, self.works, self.result_path, self.phase = timer, works, result_path, phase

    def on_train_begin(self, args, state, control, **kwargs):
        self.timer.training_started()

    def on_step_end(self, args, state, control, **kwargs):
        self.timer.step_ended(self.works.popleft())

    def on_train_end(self, args, state, control, **kwargs):
        versions = installed_versions("trl", "torch", "transformers", "accelerate")
        write_result(self.result_path, "trl", self.phase, self.timer, versions)


def read_rows(path: str):
    from datasets import Dataset

    # In memory, not load_dataset("json"): nothing is cached on disk between runs, so every run tokenises (and for
    # precompute_ref_log_probs, scores) its rows afresh, as the lit-rlhf runs do.
    with open(path) as handle:
        return Dataset.from_list([json.loads(line) for line in handle])


def shared_arguments(options: argparse.Namespace, hparams: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments common to SFT, reward and DPO, set to do what the lit-rlhf run does."""
    return dict(
        output_dir=options.output_dir,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=1,
        max_steps=options.steps,
        # The lit-rlhf config's schedule: AdamW, linear warm-up, then cosine decay over max_steps, no weight decay.
        learning_rate=hparams["learning_rate"],
        warmup_steps=hparams["warmup_steps"],
        lr_scheduler_type="cosine",
        weight_decay=hparams.get("weight_decay", 0.0),
        max_grad_norm=0.0,  # lit-rlhf's configs set no gradient clipping for these phases (TRL's default: 1.0)
        # fp32 and no activation checkpointing, as lit-rlhf runs (TRL's defaults: bf16 and checkpointing on).
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        # Nothing but training: no evaluation, no checkpoints, no logging to services, no progress bar.
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


def build_sft(options, hparams):
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        **shared_arguments(options, hparams),
        max_length=options.max_length,
        completion_only_loss=True,  # the loss on completion tokens only, as lit-rlhf's SFT
        packing=False,
    )
    return SFTTrainer(model=options.model, args=config, train_dataset=read_rows(options.data))


def build_reward(options, hparams):
    from trl import RewardConfig, RewardTrainer

    config = RewardConfig(
        **shared_arguments(options, hparams),
        max_length=options.max_length,
        center_rewards_coefficient=hparams.get("center_rewards_coefficient"),
    )
    # From the causal LM's folder, as lit-rlhf's reward model: transformers adds a fresh scalar head.
    return RewardTrainer(model=options.model, args=config, train_dataset=read_rows(options.data))


def build_dpo(options, hparams, precompute: bool):
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(
        **shared_arguments(options, hparams),
        max_length=options.max_length,
        beta=hparams["beta"],
        loss_type=[hparams.get("loss_type", "sigmoid")],
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=options.batch_size,  # lit-rlhf precomputes in training-sized batches too
    )
    return DPOTrainer(model=options.model, args=config, train_dataset=read_rows(options.data))


def build_ppo(options, hparams, collator_for):
    """TRL 0.19's PPOTrainer with lit-rlhf's four networks: policy and reference from the causal LM, reward model
    and critic from the scalar-head model."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
    )
    from trl import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(options.model, padding_side="left")
    rows = read_rows(options.data)
    prompts = rows.map(
        lambda row: {"input_ids": tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]},
        remove_columns=rows.column_names,
    )
    config = PPOConfig(
        output_dir=options.output_dir,
        per_device_train_batch_size=options.batch_size,  # prompts per iteration, as lit-rlhf's data.batch_size
        gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=options.batch_size,  # every rollout forward over the whole batch at once
        total_episodes=options.steps * options.batch_size,  # one iteration per step
        num_ppo_epochs=options.ppo_epochs,
        num_mini_batches=hparams["num_minibatches"],
        response_length=options.response_length,
        stop_token=None,  # always response_length tokens; lit-rlhf's tokenizer has an EOS it cannot sample
        temperature=hparams.get("temperature", 1.0),
        kl_coef=hparams["kl_coef"],
        vf_coef=hparams["vf_coef"],
        learning_rate=hparams["learning_rate"],
        lr_scheduler_type="constant",  # lit-rlhf's PPO holds its rate (and ppo.yaml sets no warm-up)
        num_sample_generations=0,  # no sample tables during training (lit-rlhf's validation is off too)
        bf16=False,
        fp16=False,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    policy = AutoModelForCausalLM.from_pretrained(options.model)
    reference = AutoModelForCausalLM.from_pretrained(options.model)
    reward = AutoModelForSequenceClassification.from_pretrained(options.reward_model, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(options.reward_model, num_labels=1)
    return PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward,
        value_model=value,
        train_dataset=prompts,
        eval_dataset=prompts.select(range(min(len(prompts), options.batch_size))),  # required; never sampled
        data_collator=collator_for(DataCollatorWithPadding(tokenizer)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", required=True, choices=PHASE_UNITS)
    parser.add_argument("--model", required=True, help="the causal LM's folder (model and tokenizer)")
    parser.add_argument("--reward-model", help="the scalar-head model's folder (PPO)")
    parser.add_argument("--data", required=True, help="JSONL rows")
    parser.add_argument("--steps", type=int, required=True, help="optimiser steps; PPO: iterations")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--response-length", type=int, default=0, help="PPO's sampled tokens per episode")
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--hparams", default="{}", help="JSON: the lit-rlhf config's hyperparameters")
    parser.add_argument("--output-dir", required=True, help="a scratch folder for the trainer")
    parser.add_argument("--result", required=True, help="where to write the JSON result")
    options = parser.parse_args()
    hparams = json.loads(options.hparams)
    os.environ.setdefault("WANDB_MODE", "disabled")

    unit = PHASE_UNITS[options.phase]
    works: deque[BatchWork] = deque()
    timer = SteadyStateTimer(options.warmup_steps)

    def counting(collate):
        return CountingCollator(collate, unit, options.response_length, works)

    torch.manual_seed(0)
    if options.phase == "ppo":
        trainer = build_ppo(options, hparams, counting)
    else:
        builders = {
            "sft": lambda: build_sft(options, hparams),
            "rm": lambda: build_reward(options, hparams),
            "dpo": lambda: build_dpo(options, hparams, precompute=False),
            "dpo_precomputed": lambda: build_dpo(options, hparams, precompute=True),
        }
        trainer = builders[options.phase]()
        # Wrapped after construction: DPO's precomputation of the reference log-probs, in __init__, goes through the
        # collator too, and is not training.
        trainer.data_collator = counting(trainer.data_collator)
    trainer.add_callback(SteadyStateThroughput(timer, works, options.result, options.phase))
    Path(options.output_dir).mkdir(parents=True, exist_ok=True)
    trainer.train()


if __name__ == "__main__":
    main()
