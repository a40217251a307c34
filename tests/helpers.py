"""Small helpers shared by the tests that drive the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from lit_rlhf.cli import main

QUICK_TRAINER = ["--trainer.enable_progress_bar", "false"]
TWO_TURN_CHAT = [
    {"role": "system", "content": "you help ."},
    {"role": "user", "content": "name three fruits ."},
    {"role": "assistant", "content": "apple , pear , plum ."},
    {"role": "user", "content": "list two colors ."},
    {"role": "assistant", "content": "red , blue ."},
]
"""A chat with a system turn and two exchanges: multi-turn SFT trains on both assistant turns."""


def run_cli(*args: str) -> None:
    main([*args, *QUICK_TRAINER] if args and args[0] in ("fit", "validate") else list(args))


def latest_run(root: Path, phase: str) -> Path:
    versions = sorted((root / "runs" / phase).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return versions[-1]


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def metric_series(run_dir: Path, name: str) -> list[float]:
    return [float(row[name]) for row in metric_rows(run_dir) if row.get(name) not in (None, "")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


class StopAfter(Callback):
    """Records each step's loss; with ``stop_at``, saves a checkpoint to ``path`` there and stops (a run cut short)."""

    def __init__(self, stop_at: int | None = None, path: Path | None = None) -> None:
        self.stop_at, self.path, self.losses = stop_at, path, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])
        if trainer.global_step == self.stop_at:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def assert_resumed_like_uninterrupted(
    uninterrupted: StopAfter, resumed: StopAfter, stop_at: int, steps: int,
    full: torch.nn.Module, again: torch.nn.Module,
) -> None:
    """The resumed run logged every step after the cut with the uninterrupted run's loss and ended with its weights."""
    assert sorted(resumed.losses) == list(range(stop_at + 1, steps + 1))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(uninterrupted.losses[step], rel=1e-5), step
    for name, weight in full.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], weight, msg=name)
