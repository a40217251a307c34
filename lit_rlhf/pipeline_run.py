"""A pipeline run: a pipeline file bound to its folder (``OUT/``), each stage's output found by the stage's name,
and whether a stage is done already with the same settings, seed and inputs, so that a rerun resumes after the last
stage that is."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lit_rlhf.errors import ConfigError
from lit_rlhf.pipeline_spec import (
    BestOfNStage,
    CollectStage,
    OptimumStage,
    PipelineSpec,
    RejectionSampleStage,
    StageSpec,
    load_pipeline,
)
from lit_rlhf.run_folder import DONE_FILE, MADE_WITH, made_with

FitPhase = Callable[[list[str], str], Any]
"""Runs ``lit-rlhf fit ARGS`` with its logs under a folder and returns the finished LightningCLI."""
POLICY, REWARD_MODEL, DATA, BASELINE, YARDSTICK = "policy", "reward_model", "data", "baseline", "yardstick"
"""What a stage made, its ``done.json``'s ``role``: the summary evaluates policies and baselines, measures reward
models, and takes the rest's record as it is."""
BOOKKEEPING_KEYS = ("kind", "role", "model", "data", "samples", "seconds", "seed", MADE_WITH)
"""Keys of ``done.json`` that say where a stage's output is, not what it measured."""


@dataclass
class PipelineRun:
    """One run of a pipeline file: its stages, where they write, and how a ``fit`` stage runs a phase."""
    spec: PipelineSpec
    out_dir: Path
    fit_phase: FitPhase

    @property
    def seed(self) -> int:
        """The file's ``seed``: every ``fit`` stage's ``--seed_everything`` and every sampling stage's seed."""
        return self.spec.seed

    @property
    def stage_names(self) -> set[str]:
        return {stage.name for stage in self.spec.stages}

    def done(self, name: str) -> dict[str, Any]:
        done = self.out_dir / name / DONE_FILE
        if not done.exists():
            raise ConfigError(f"stage {name!r} is referred to before it has run")
        return json.loads(done.read_text())

    def resolve(self, reference: str | None, output: str) -> str | None:
        """A stage name → that stage's ``output`` (its model folder or data file); anything else is a path or
        a name, returned as it is."""
        if reference is None or reference not in self.stage_names:
            return reference
        return str(self.out_dir / reference / self.done(reference)[output])


def start_run(
    config: str | Path, fit_phase: FitPhase, out: str | Path | None = None, seed: int | None = None
) -> PipelineRun:
    """A pipeline file ready to run: ``seed`` replaces the file's, ``out`` its ``out``."""
    spec = load_pipeline(config)
    if seed is not None:
        spec = replace(spec, seed=seed)
    return PipelineRun(spec, Path(out or spec.out), fit_phase)


def done_under(stage_dir: Path, seed: int) -> dict[str, Any] | None:
    """The stage's ``done.json`` if it finished under ``seed``."""
    done = stage_dir / DONE_FILE
    record = json.loads(done.read_text()) if done.is_file() else None
    return record if record is not None and record.get("seed") == seed else None


def is_complete(stage: StageSpec, stage_dir: Path, run: PipelineRun) -> bool:
    """Whether the stage finished before under this seed, made with what it would be made with now
    (:func:`stage_made_with`); otherwise it runs again, as does a folder written by an earlier version."""
    record = done_under(stage_dir, run.seed)
    return record is not None and record.get(MADE_WITH) == stage_made_with(stage, run)


def stage_made_with(stage: StageSpec, run: PipelineRun) -> dict[str, Any]:
    """What a stage's output is made from (:func:`lit_rlhf.run_folder.made_with`): its settings, defaults included,
    and the seed; for the stages that sample the held-out prompts (best-of-n, the optimum) the file's ``evaluation``
    too, so that new evaluation settings redraw them; and the files it reads that no stage of the run writes: its
    phase config, data, prompts (the file's top-level ``prompts`` where the stage has none of its own), paths among
    its ``args``."""
    settings = {"spec": stage.as_record(), "seed": run.seed}
    if isinstance(stage, (BestOfNStage, OptimumStage)):
        settings["evaluation"] = asdict(run.spec.evaluation)
    reads = stage.reads() | {value for value in getattr(stage, "args", {}).values() if isinstance(value, str)}
    if isinstance(stage, (CollectStage, RejectionSampleStage)) and (prompts := run.spec.training_prompts(stage)):
        reads.add(prompts)
    return made_with(settings, sorted(value for value in reads if value not in run.stage_names))
