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
from lit_rlhf.run_folder import DONE_FILE, input_stamps

FitPhase = Callable[[list[str], str], Any]
"""Runs ``lit-rlhf fit ARGS`` with its logs under a folder and returns the finished LightningCLI."""
POLICY, REWARD_MODEL, DATA, BASELINE, YARDSTICK = "policy", "reward_model", "data", "baseline", "yardstick"
"""What a stage made, its ``done.json``'s ``role``: the summary evaluates policies and baselines, measures reward
models, and takes the rest's record as it is."""
BOOKKEEPING_KEYS = ("kind", "role", "model", "data", "samples", "seconds", "spec", "seed", "inputs")
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
    """The stage's ``done.json`` if it finished under ``seed``; one from before seeds were recorded counts as seed
    0, the only seed fit stages had then."""
    done = stage_dir / DONE_FILE
    record = json.loads(done.read_text()) if done.is_file() else None
    return record if record is not None and record.get("seed", 0) == seed else None


def is_complete(stage: StageSpec, stage_dir: Path, run: PipelineRun) -> bool:
    """Whether the stage finished before with the same settings, defaults included, the same seed, and the files it
    reads unchanged since (:func:`input_stamps`; otherwise it runs again). A stage finished by a version that kept
    only the settings the file named, not every one, runs again, and one from before stamps were kept if it reads a
    file; so does a best-of-n stage from before its picks were kept (no ``samples``), since the summary measures
    them."""
    record = done_under(stage_dir, run.seed)
    outdated = record is not None and record.get("kind") == "best_of_n" and "samples" not in record
    return (record is not None and record.get("spec") == stage_record(stage, run) and not outdated
            and record.get("inputs", {}) == stage_inputs(stage, run))


def stage_record(stage: StageSpec, run: PipelineRun) -> dict[str, Any]:
    """The settings a stage's output depends on: its own, and for the stages that sample the held-out prompts
    (best-of-n, the optimum) the file's ``evaluation`` too, so that new evaluation settings redraw them."""
    record = stage.as_record()
    if isinstance(stage, (BestOfNStage, OptimumStage)):
        record["evaluation"] = asdict(run.spec.evaluation)
    return record


def stage_inputs(stage: StageSpec, run: PipelineRun) -> dict[str, int]:
    """The stamps of the files a stage reads that no stage of the run writes: its phase config, data, prompts
    (the file's top-level ``prompts`` where the stage has none of its own), paths among its ``args``."""
    values = stage.reads() | {value for value in getattr(stage, "args", {}).values() if isinstance(value, str)}
    if isinstance(stage, (CollectStage, RejectionSampleStage)) and (prompts := prompts_path(stage, run.spec)):
        values.add(prompts)
    return input_stamps(value for value in sorted(values) if value not in run.stage_names)


def prompts_path(stage: CollectStage | RejectionSampleStage, spec: PipelineSpec) -> str | None:
    """The training prompts a sampling stage uses: its own ``prompts``, else the file's, else the world's."""
    return stage.prompts if stage.prompts is not None else spec.prompts
