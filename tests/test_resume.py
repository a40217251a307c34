"""A reward-model or DPO run (also with LoRA) cut mid-epoch and resumed from its checkpoint repeats the uninterrupted
run exactly: the same loss at every later step and the same final weights (SFT's own test is in test_sft.py, PPO's
in test_ppo.py, the DDP case in test_distributed.py)."""

from __future__ import annotations

import json

import lightning as L
import pytest

from helpers import StopAfter, assert_resumed_like_uninterrupted, write_jsonl
from lit_rlhf.data.datamodules import ComparisonDataModule
from lit_rlhf.generation import SamplingConfig
from lit_rlhf.models import LoRAConfig
from lit_rlhf.phases.dpo import DPOModule
from lit_rlhf.phases.reward import RewardModelModule
from lit_rlhf.phases.settings import OptimizerConfig

STEPS = 10  # 72 training pairs in batches of 16: 5 batches an epoch, so the cut at step 3 is inside the first


def fit(phase: str, sft: str, pairs: str, root, recorder: StopAfter, ckpt_path=None):
    L.seed_everything(0)
    export_dir = str(root / f"{phase}-export")
    if phase == "rm":
        module = RewardModelModule(sft, optimizer=OptimizerConfig(1e-3), export_dir=export_dir, normalization_samples=4)
    else:
        lora = LoRAConfig(r=4, lora_alpha=8) if phase == "dpo-lora" else None
        module = DPOModule(sft, optimizer=OptimizerConfig(1e-3), export_dir=export_dir, sampling=SamplingConfig(4),
                           lora=lora)
    data = ComparisonDataModule(path=pairs, tokenizer_name_or_path=sft, batch_size=16, val_fraction=0.25)
    trainer = L.Trainer(max_steps=STEPS, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        callbacks=[recorder])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module.model


@pytest.mark.parametrize("phase", ["rm", "dpo", "dpo-lora"])
def test_a_run_resumed_mid_epoch_repeats_the_uninterrupted_one(phase, world_cache, world_sft_path, tmp_path):
    from lit_rlhf.world import ensure_world

    rows = ensure_world(world_cache / "world")["comparisons"].read_text().splitlines()[:96]
    pairs = str(write_jsonl(tmp_path / "pairs.jsonl", [json.loads(row) for row in rows]))
    uninterrupted = StopAfter()
    full = fit(phase, world_sft_path, pairs, tmp_path, uninterrupted)
    checkpoint = tmp_path / "cut.ckpt"
    fit(phase, world_sft_path, pairs, tmp_path, StopAfter(stop_at=3, path=checkpoint))
    resumed = StopAfter()
    again = fit(phase, world_sft_path, pairs, tmp_path, resumed, ckpt_path=str(checkpoint))

    assert_resumed_like_uninterrupted(uninterrupted, resumed, 3, STEPS, full, again)
