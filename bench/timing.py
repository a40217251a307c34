"""What both sides' timing callbacks share: how much work a batch is, the steady-state timer, and the result file.

Imports only the standard library and torch, because it runs in every venv: the project's, under Lightning, and the
peers', under transformers' Trainer.

Each run writes one JSON result::

    {"side", "phase", "steps", "timed_steps", "seconds", "units", "tokens", "throughput", "peak_rss_mib",
     "peak_gpu_mib", "threads", "versions"}

``units`` are what the phase's throughput counts (tokens, pairs or episodes) and ``tokens`` the non-padding tokens
those steps ran through the policy, from which run.py estimates model FLOPs.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

UNITS = {"tokens": "tokens/s", "pairs": "pairs/s", "episodes": "episodes/s"}


@dataclass(frozen=True)
class BatchWork:
    units: int
    tokens: int


def batch_work(unit: str, batch: dict[str, Any], response_length: int = 0) -> BatchWork:
    """The work in one training batch, read from either library's batch layout.

    - ``tokens`` (SFT): the non-padding tokens, prompt included (both sides run the prompt through the model).
    - ``pairs`` (reward model, DPO): lit-rlhf keeps ``chosen_*`` and ``rejected_*`` side by side; TRL stacks the
      chosen rows, then the rejected rows, in one ``input_ids``.
    - ``episodes`` (PPO): the batch holds prompts (lit-rlhf: ``prompt_*``, TRL: ``input_ids``); each episode adds
      ``response_length`` sampled tokens, forced to that length on both sides.
    """
    if unit == "tokens":
        tokens = int(batch["attention_mask"].sum())
        return BatchWork(tokens, tokens)
    if unit == "pairs":
        if "chosen_attention_mask" in batch:
            chosen, rejected = batch["chosen_attention_mask"], batch["rejected_attention_mask"]
            return BatchWork(len(chosen), int(chosen.sum()) + int(rejected.sum()))
        mask = batch["attention_mask"]
        return BatchWork(len(mask) // 2, int(mask.sum()))
    if unit == "episodes":
        mask = batch["prompt_attention_mask"] if "prompt_attention_mask" in batch else batch["attention_mask"]
        return BatchWork(len(mask), int(mask.sum()) + len(mask) * response_length)
    raise ValueError(f"unknown unit {unit!r}")


class SteadyStateTimer:
    """Times training steps after the first ``warmup_steps``: the clock starts when step ``warmup_steps`` ends (or
    when training starts, without warm-up) and stops when the last step ends, so data loading of the timed steps
    counts and one-off costs (first-call allocations, lazy initialisation, PPO's reference answers) do not."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.timed_steps = 0
        self.units = 0
        self.tokens = 0
        self.started_at: float | None = None
        self.stopped_at: float | None = None

    def training_started(self) -> None:
        if self.warmup_steps == 0:
            self.started_at = time.perf_counter()

    def step_ended(self, work: BatchWork) -> None:
        now = time.perf_counter()
        self.steps += 1
        if self.steps == self.warmup_steps:
            self.started_at = now
        elif self.steps > self.warmup_steps:
            self.timed_steps += 1
            self.units += work.units
            self.tokens += work.tokens
            self.stopped_at = now

    def result(self) -> dict[str, Any]:
        seconds = (self.stopped_at - self.started_at) if self.timed_steps else 0.0
        return {
            "steps": self.steps,
            "timed_steps": self.timed_steps,
            "seconds": seconds,
            "units": self.units,
            "tokens": self.tokens,
            "throughput": self.units / seconds if seconds > 0 else None,
        }


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def installed_versions(*packages: str) -> dict[str, str]:
    """Each package's version; lit-rlhf itself may run uninstalled from the checkout (the GPU check in
    bench/README.md, on a machine without a package index)."""
    versions = {}
    for package in packages:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def write_result(path: str | Path, side: str, phase: str, timer: SteadyStateTimer, versions: dict[str, str]) -> None:
    import torch

    result = {
        "side": side,
        "phase": phase,
        **timer.result(),
        "peak_rss_mib": peak_rss_mib(),
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None,
        "threads": torch.get_num_threads(),
        "versions": versions,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
