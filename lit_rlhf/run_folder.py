"""The run-folder contract: what a pipeline's, a seed's or a sweep's folder holds, how it is written and how its
tables are printed. Pipeline, sweep and report all read and write folders through this module, and it imports
nothing of theirs, so none of them depends on another's internals.

A pipeline folder ``OUT/`` holds one folder per stage (``log.txt``: everything the stage printed; ``done.json``: what
it made and measured, and the settings and input stamps it was made with; a PPO stage's ``health.json``), and
``summary.json`` (one row per stage), ``paired.json`` (paired differences between policies) and
``eval_samples.jsonl`` (a few answers per policy); ``lit-rlhf pipeline --seeds`` adds ``aggregate.json`` over the
seeds' folders. A sweep folder holds one folder per trial and ``sweep.json``. Files that mark work as done are
written atomically, so that a killed run never leaves half of one.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import yaml

DONE_FILE = "done.json"
MADE_WITH = "made_with"
"""The key of a ``done.json`` (and of a sweep's ``baselines.json``) holding :func:`made_with`."""
"""A finished stage's or trial's record: what it made, measured, and was made with."""
LOG_FILE = "log.txt"
"""Everything a stage printed, in its folder; the console shows one line per stage."""
SUMMARY_FILE = "summary.json"
PAIRED_FILE = "paired.json"
EVAL_SAMPLES_FILE = "eval_samples.jsonl"
HEALTH_FILE = "health.json"
"""A PPO stage's breaches of :class:`lit_rlhf.phases.ppo_health.HealthLimits`, one line each, in its folder."""
AGGREGATE_FILE = "aggregate.json"
SWEEP_FILE = "sweep.json"
PAIRED_METRICS = ("gold_reward", "proxy_reward")
"""The summary columns compared between every two policies, prompt by prompt, in ``paired.json``."""
PROXY_SCORER = "proxy_scorer"
"""The summary column naming what gave ``proxy_reward`` (the evaluation's reward model), which a policy's training
reward need not be (PPO may train on a function)."""


# --- writing ---------------------------------------------------------------------------------------------------------


def write_atomically(path: Path, text: str) -> None:
    """Write a file that marks work as done (``done.json``, ``summary.json``) so that a kill never leaves a
    half-written one: the text goes to a temporary file beside it, which then replaces it in one rename."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line."""
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


@contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Everything printed inside goes to the end of ``path``: the process's output and error (file descriptors 1 and
    2), which the log handlers of Lightning and transformers, W&B and compiled code write to, and Python's
    ``sys.stdout`` and ``sys.stderr`` (which a test's capture may have replaced) pointed at them."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    console = os.dup(1), os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    # Not closed: anything still holding them after the stage (a logging handler made inside) writes to the console.
    output, error = (open(fd, "w", encoding="utf-8", buffering=1, closefd=False) for fd in (1, 2))
    try:
        with redirect_stdout(output), redirect_stderr(error):
            yield
    finally:
        for stream in (output, error, sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        for fd, original in zip((1, 2), console):
            os.dup2(original, fd)
            os.close(original)


def last_line(path: Path) -> str:
    """The last line of a log with something on it (what a failed command said last)."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.is_file() else []
    return lines[-1].strip() if lines else "no output"


# --- what a folder was made from -------------------------------------------------------------------------------------


def input_stamps(paths: Iterable[str]) -> dict[str, int]:
    """When each file or model folder among ``paths`` was last written (``mtime_ns``; a model folder by its
    ``config.json``); anything else (a hub name, a setting) is left out. A YAML file's ``config:`` (the file it
    extends, as ``configs/kto.yaml`` does ``dpo.yaml``) is stamped too. A finished run is reused only while these
    are unchanged, so an edited config, new data or a retrained model make it run again."""
    stamps: dict[str, int] = {}
    pending = [Path(path) for path in paths]
    while pending:
        path = pending.pop()
        stamp = path / "config.json" if path.is_dir() else path
        if str(path) in stamps or not stamp.is_file():
            continue
        stamps[str(path)] = stamp.stat().st_mtime_ns
        if path.suffix in (".yaml", ".yml"):
            pending += [path.parent / extended for extended in _extended_configs(path)]
    return stamps


def made_with(settings: Any, reads: Iterable[str]) -> dict[str, Any]:
    """What a piece of work was made from: its ``settings`` (whatever JSON writes) and the stamps of the files and
    model folders it read (:func:`input_stamps`). The one test of "done already?": a pipeline stage, a sweep's trial,
    a sweep's best-of-n baselines and DPO's precomputed reference log-probs each keep this beside their output
    (``MADE_WITH`` in a ``done.json``) and are made again when it differs, so that changed settings, an edited config,
    new data or a retrained model never leave stale work in use."""
    return json.loads(json.dumps({"settings": settings, "inputs": input_stamps(reads)}))


def _extended_configs(path: Path) -> list[str]:
    """The files a YAML config's top-level ``config:`` names (jsonargparse reads them first); none when unreadable."""
    try:
        extended = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return []
    extended = extended.get("config") if isinstance(extended, dict) else None
    names = extended if isinstance(extended, list) else [extended]
    return [name for name in names if isinstance(name, str)]


# --- tables ----------------------------------------------------------------------------------------------------------


def format_table(rows: list[dict[str, Any]]) -> str:
    """The summary as fixed-width text: the policies' rows, then the other stages' (data, reward models); a value
    with a standard error (``<column>_se``) is written ``value±se``; which scorer gave ``proxy_reward`` is said once,
    under the table."""
    rows = [{key: value for key, value in row.items() if key != PROXY_SCORER} for row in rows]
    policies = [row for row in rows if "length_mean" in row or "gold_reward" in row]
    others = [row for row in rows if row not in policies]
    return "\n\n".join(_fixed_width([with_errors(row) for row in group]) for group in (policies, others) if group)


def proxy_scorers(rows: list[dict[str, Any]]) -> str | None:
    """One line naming the scorer of the rows' ``proxy_reward``, or ``None`` where none has one."""
    scorers = sorted({str(row[PROXY_SCORER]) for row in rows if row.get(PROXY_SCORER)})
    return f"proxy_reward: the score of {' and '.join(scorers)} (evaluation.reward_model)" if scorers else None


def with_errors(row: dict[str, Any]) -> dict[str, Any]:
    """A row whose ``<column>_se`` values are folded into their columns' cells."""
    merged = {}
    for key, value in row.items():
        if key.endswith("_se") and key.removesuffix("_se") in row:
            continue
        error = row.get(f"{key}_se")
        merged[key] = f"{value:.3f}±{error:.3f}" if value is not None and error is not None else value
    return merged


def _fixed_width(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[format_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def format_cell(value: Any) -> str:
    """A table cell: floats to three decimals, or three significant digits where that would show a small one as
    0.000 (a learning rate of 3e-05), ``-`` for a missing value."""
    if value is None:
        return "-"
    if not isinstance(value, float):
        return str(value)
    return f"{value:.3g}" if 0 < abs(value) < 5e-4 else f"{value:.3f}"


def interval_cell(value: Any) -> Any:
    """An aggregate value (``{"mean", "ci95", "n"}``) as a table cell: ``mean [lo, hi]``; anything else as it is."""
    if not isinstance(value, dict):
        return value
    if value["ci95"] is None:
        return format_cell(value["mean"])
    low, high = value["ci95"]
    return f"{value['mean']:.3f} [{low:.3f}, {high:.3f}]"


GROUP_METRICS = ("gold_reward", "proxy_reward", "kl", "length_ratio", "repetition_rate", "sycophancy_rate",
                 "format_rate", "seconds")
"""What a sweep's seed group (``sweep.json``'s ``groups``) gives over its seeds: the rewards, the drift, the hacking
rates and the trials' training time."""


def group_cells(group: dict[str, Any]) -> dict[str, Any]:
    """A seed group as a table row: its parameters, seeds, and each measurement as ``mean [lo, hi]``."""
    return {**group["params"], "seeds": group["seeds"],
            **{metric: interval_cell(group[metric]) for metric in GROUP_METRICS if metric in group}}


def format_paired(rows: list[dict[str, Any]], metric: str | None = None) -> str:
    """The paired differences of one metric as text, each said as resolved (its interval excludes 0) or not; by
    default the first of :data:`PAIRED_METRICS` the rows have (gold where there is gold, else the proxy)."""
    metric = metric or next((name for name in PAIRED_METRICS if any(row["metric"] == name for row in rows)),
                            PAIRED_METRICS[0])
    lines = [f"paired {metric} differences (a - b, mean, 95% interval over n units):"]
    for row in (row for row in rows if row["metric"] == metric and row["ci95"] is not None):
        low, high = row["ci95"]
        verdict = (f"{row['a']} above {row['b']}" if low > 0 else f"{row['b']} above {row['a']}" if high < 0
                   else "no resolved difference")
        lines.append(f"  {row['a']:>10} - {row['b']:<10} {row['mean']:+.3f}  [{low:+.3f}, {high:+.3f}]  "
                     f"n={row['n']}  {verdict}")
    return "\n".join(lines)


# --- a sweep's results -----------------------------------------------------------------------------------------------


def gao_points(result: dict[str, Any], reference_gold: float) -> dict[str, list[tuple[float, float]]]:
    """``(√KL, gold gain over the reference)`` of a sweep's finished trials (``rl``) and best-of-n baselines
    (``bon``), where both are measured."""
    trials = [trial["metrics"] for trial in result["trials"] if trial.get("status") == "done" and trial.get("metrics")]
    return {form: [(math.sqrt(max(row["kl"], 0.0)), row["gold_reward"] - reference_gold) for row in rows
                   if row.get("kl") is not None and row.get("gold_reward") is not None]
            for form, rows in (("rl", trials), ("bon", result.get("baselines") or []))}
