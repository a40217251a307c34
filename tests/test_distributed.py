"""Two processes on CPU (DDP over gloo): the data edge's exact resume, and every rank reaching the end of fit.

Marked ``distributed``; `.ci/run` runs them after the default suite (about a minute in all).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
import sys
from pathlib import Path

import pytest

from tests.helpers import write_jsonl

pytestmark = pytest.mark.distributed
SCRIPT = Path(__file__).with_name("distributed_sft.py")
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


def test_ppo_and_dpo_finish_and_export_on_two_ranks(uninterrupted, tmp_path):
    """Rank 0 alone used to ask for ``trainer.log_dir`` (a collective) at the end of fit and when logging PPO's
    samples, and DPO precomputed reference log-probs of one rank's rows only; each hung or failed under DDP."""
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.enable_progress_bar", "false"]
    cli = [sys.executable, "-m", "lit_rlhf", "fit"]
    configs = Path(__file__).parents[1] / "configs"
    run(*cli, "--config", str(configs / "ppo.yaml"), *ddp, "--model.init_args.model_name_or_path", "world",
        "--model.init_args.reward_model", "gold", "--model.init_args.log_samples_every_n_iterations", "1",
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--data.init_args.batch_size", "4",
        "--model.init_args.export_dir", "null", cwd=tmp_path)
    assert (next((tmp_path / "runs" / "ppo").glob("version_*")) / "hf" / "model.safetensors").exists()

    rows = [{"prompt": f"name {n} fruits .", "chosen": "apple , pear .", "rejected": f"{n} {n} ."}
            for n in ["one", "two", "three", "four", "five", "six"] * 4]
    comparisons = str(write_jsonl(tmp_path / "pairs.jsonl", rows))
    sft_export = str(uninterrupted[0] / "hf")
    run(*cli, "--config", str(configs / "dpo.yaml"), *ddp, "--model.init_args.model_name_or_path", sft_export,
        "--data.init_args.path", comparisons, "--data.init_args.batch_size", "4",
        "--model.init_args.precompute_ref_logps", "true", "--trainer.max_steps", "6",
        "--trainer.val_check_interval", "3", "--model.init_args.export_dir", "null", cwd=tmp_path)
    assert (next((tmp_path / "runs" / "dpo").glob("version_*")) / "hf" / "model.safetensors").exists()
