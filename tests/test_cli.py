"""The extra commands: `lit-rlhf world` and `lit-rlhf collect`, and one-line errors for bad arguments."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import run_cli


def test_world_command_writes_the_datasets(tmp_path, capsys):
    run_cli("world", "--out", str(tmp_path / "world"))
    printed = capsys.readouterr().out
    for name in ["demonstrations", "comparisons", "unpaired", "prompts", "eval_prompts", "tokenizer"]:
        assert f"{name}: " in printed
    first = json.loads((tmp_path / "world" / "comparisons.jsonl").read_text().splitlines()[0])
    assert set(first) == {"prompt", "chosen", "rejected"}
    assert len((tmp_path / "world" / "demonstrations.jsonl").read_text().splitlines()) == 4000


def test_collect_command(world_sft_path, tmp_path, capsys):
    run_cli("collect", "--policy", world_sft_path, "--out", str(tmp_path / "c"), "--k", "3", "--num-prompts", "10")
    assert "10 prompts x 3 responses, judged by raters" in capsys.readouterr().out
    summary = json.loads((tmp_path / "c" / "collect.json").read_text())
    assert summary["pairs"] + summary["ties_dropped"] == 10 * 3


def test_a_missing_model_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lit_rlhf", "collect", "--policy", str(tmp_path / "nope"), "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"lit-rlhf: error: model not found: {tmp_path / 'nope'} (no such folder)"
