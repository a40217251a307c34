"""Two processes on CPU over gloo: DDP's exact mid-epoch resume (SFT), FSDP2 (configs/trainer/fsdp.yaml) training
SFT to DDP's weights, and the other phases reaching the end of fit and exporting on both ranks under DDP and FSDP2
(PPO also resuming from its sharded checkpoint).

Marked ``distributed``; `.ci/run` runs them after the default suite (about three minutes in all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import metric_rows, write_jsonl

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).with_name("distributed_sft.py")
CONFIGS = Path(__file__).parents[1] / "configs"
STEPS = 12


def run(*args: str, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def steps(root: Path, name: str) -> list[dict]:
    return [json.loads((root / f"{name}.rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-sft")
    rows = [{"prompt": f"name {n} fruits .", "completion": " ".join(["apple ,"] * (i % 5) + ["pear ."])}
            for i, n in enumerate(["one", "two", "three", "four", "five"] * 6)]
    demonstrations = str(write_jsonl(root / "demos.jsonl", rows))  # 30 rows, 15 a rank: 8 batches of 2 an epoch
    run(sys.executable, str(SCRIPT), str(root), demonstrations, "full", cwd=root)
    return root, demonstrations, steps(root, "full")


def test_the_two_ranks_share_each_epoch_between_them(uninterrupted):
    _, _, (rank0, rank1) = uninterrupted
    first_epoch = [row for rank in (rank0, rank1) for step in range(1, 9) for row in rank[str(step)]["input_ids"]]
    # 30 rows, 15 a rank; each count word ("one" … "five", the prompt's second token) heads 6 of them.
    assert len(first_epoch) == 30
    assert sorted(Counter(row[1] for row in first_epoch).values()) == [6] * 5


@pytest.mark.parametrize("stop_at", [5, 8, 10], ids=["first-epoch", "epoch-end", "second-epoch"])
def test_a_ddp_run_resumed_mid_epoch_sees_on_every_rank_what_the_uninterrupted_run_saw(uninterrupted, stop_at):
    root, demonstrations, full = uninterrupted
    run(sys.executable, str(SCRIPT), str(root), demonstrations, "cut", "--stop-at", str(stop_at), cwd=root)
    run(sys.executable, str(SCRIPT), str(root), demonstrations, "resumed", "--resume", str(root / "cut.ckpt"), cwd=root)
    for rank, (expected, resumed) in enumerate(zip(full, steps(root, "resumed"))):
        assert sorted(map(int, resumed)) == list(range(stop_at + 1, STEPS + 1))
        for step, seen in resumed.items():
            assert seen["input_ids"] == expected[step]["input_ids"], (rank, step)
            assert seen["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5), (rank, step)


def fit_on_two_cpus(config: str, strategy: list[str], *args: str, cwd: Path) -> None:
    """``lit-rlhf fit`` with a phase config from configs/ on two CPU processes."""
    trainer = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.enable_progress_bar", "false"]
    run(sys.executable, "-m", "lit_rlhf", "fit", "--config", str(CONFIGS / config), *strategy, *trainer, *args, cwd=cwd)


def comparisons(folder: Path) -> str:
    rows = [{"prompt": f"name {n} fruits .", "chosen": "apple , pear .", "rejected": f"{n} {n} ."}
            for n in ["one", "two", "three", "four", "five", "six"] * 4]
    return str(write_jsonl(folder / "pairs.jsonl", rows))


def test_ppo_and_dpo_finish_and_export_on_two_ranks(uninterrupted, tmp_path):
    """Rank 0 alone used to ask for ``trainer.log_dir`` (a collective) at the end of fit and when logging PPO's
    samples, which hung or failed under DDP; DPO's precomputed reference log-probs must cover every rank's rows
    in every epoch (24 pairs, 3 batches a rank, 6 steps: two epochs). PPO trains LoRA adapters here."""
    ddp = ["--trainer.strategy", "ddp"]
    fit_on_two_cpus("ppo.yaml", ddp, "--model.init_args.model_name_or_path", "world",
                    "--model.init_args.lora", "{r: 4}",
                    "--model.init_args.reward_model", "gold", "--model.init_args.log_samples_every_n_iterations", "1",
                    "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--data.init_args.batch_size", "4",
                    "--model.init_args.export_dir", "null", cwd=tmp_path)
    assert (next((tmp_path / "runs" / "ppo").glob("version_*")) / "hf" / "model.safetensors").exists()
    fit_on_two_cpus("dpo.yaml", ddp, "--model.init_args.model_name_or_path", str(uninterrupted[0] / "full-hf"),
                    "--data.init_args.path", comparisons(tmp_path), "--data.init_args.batch_size", "4",
                    "--model.init_args.precompute_ref_logps", "true", "--trainer.max_steps", "6",
                    "--trainer.val_check_interval", "3", "--model.init_args.export_dir", "null", cwd=tmp_path)
    assert (next((tmp_path / "runs" / "dpo").glob("version_*")) / "hf" / "model.safetensors").exists()


def test_fsdp_trains_the_same_weights_as_ddp(uninterrupted):
    root, demonstrations, full = uninterrupted
    run(sys.executable, str(SCRIPT), str(root), demonstrations, "sharded", "--fsdp", cwd=root)
    for expected, sharded in zip(full, steps(root, "sharded")):
        assert [sharded[step]["loss"] for step in sharded] == pytest.approx([expected[s]["loss"] for s in sharded])
    ddp, fsdp = (load_file(root / name / "model.safetensors") for name in ("full-hf", "sharded-hf"))
    for name, weight in ddp.items():
        torch.testing.assert_close(fsdp[name], weight, msg=name)


def test_reward_dpo_and_ppo_shard_export_and_resume_under_fsdp(uninterrupted, tmp_path):
    """Each phase shards all its networks; the reward model's score statistics need every rank (its scorer is
    sharded); PPO's sharded checkpoint keeps the frozen networks, which ``torch.distributed.checkpoint`` loads."""
    fsdp = ["--config", str(CONFIGS / "trainer" / "fsdp.yaml"), "--trainer.precision", "32-true",
            "--data.init_args.num_eval_prompts", "4"]
    sft, pairs = str(uninterrupted[0] / "full-hf"), comparisons(tmp_path)
    short = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
             "--model.init_args.model_name_or_path", sft, "--data.init_args.path", pairs]
    fit_on_two_cpus("rm.yaml", fsdp, *short, "--model.init_args.export_dir", "rm",
                    "--model.init_args.normalization_samples", "4", cwd=tmp_path)
    assert "lit_rlhf_score_std" in (tmp_path / "rm" / "config.json").read_text()
    fit_on_two_cpus("dpo.yaml", fsdp, *short, "--model.init_args.export_dir", "dpo", cwd=tmp_path)
    assert (tmp_path / "dpo" / "model.safetensors").exists()

    ppo = ["--model.init_args.model_name_or_path", sft, "--model.init_args.reward_model", "rm",
           "--model.init_args.export_dir", "ppo", "--data.init_args.batch_size", "4",
           "--trainer.val_check_interval", "1"]
    fit_on_two_cpus("ppo.yaml", fsdp, *ppo, "--trainer.max_steps", "16", cwd=tmp_path)  # 2 iterations of 8 updates
    checkpoint = next((tmp_path / "runs" / "ppo" / "version_0" / "checkpoints").glob("*.ckpt"))
    assert checkpoint.is_dir()  # sharded: a file a rank
    fit_on_two_cpus("ppo.yaml", fsdp, *ppo, "--trainer.max_steps", "24", "--ckpt_path", str(checkpoint), cwd=tmp_path)
    resumed = [row for row in metric_rows(tmp_path / "runs" / "ppo" / "version_1") if row.get("kl/beta")]
    assert len(resumed) == 1 and (tmp_path / "ppo" / "model.safetensors").exists()
