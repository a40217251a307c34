"""Small helpers shared by the tests that drive the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from lit_rlhf.cli import main

QUICK_TRAINER = ["--trainer.enable_progress_bar", "false"]


def run_cli(*args: str) -> None:
    main([*args, *QUICK_TRAINER] if args and args[0] in ("fit", "validate", "test") else list(args))


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
