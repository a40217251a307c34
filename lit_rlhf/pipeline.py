"""``lit-rlhf pipeline``: the whole recipe in one command, resumable stage by stage.

A pipeline file (``configs/pipeline.yaml``) lists stages. Each writes under ``OUT/<name>/`` and, when it is
complete, ``OUT/<name>/done.json``; a stage with that file is skipped, so re-running resumes after the last
completed stage (``--force NAME`` redoes one; a stage whose settings changed runs again). Everything a stage prints
goes to ``OUT/<name>/log.txt``; the console shows one line per stage. Stage kinds (each a typed spec in
:mod:`lit_rlhf.pipeline_spec`, with its defaults):

- ``fit``: a Lightning phase from a phase config (``config``, relative to the pipeline file), with ``model``,
  ``reward_model`` and ``data`` naming earlier stages (or paths) and ``args`` more ``--key value`` overrides.
- ``collect``: k samples per prompt from ``policy``, ranked by a ``judge``, written as C(k,2) comparisons.
- ``rejection_sample``: n samples per prompt from ``policy``, the best ``keep`` by ``reward_model`` (optionally
  above ``threshold``) written as demonstrations, for a ``fit`` with the SFT phase.
- ``self_play``: SPIN's comparisons, the demonstration over ``policy``'s own answer, for a ``fit`` with DPO.
- ``best_of_n``: the baseline, evaluated only: n samples of ``policy`` per held-out prompt, the best by
  ``reward_model``.

Sampling stages read the training prompts of their own ``prompts``, else the file's top-level ``prompts``, else the
embedded world's. The file's ``seed`` seeds every stage (``fit`` stages as ``--seed_everything``); a stage completed
under another seed runs again. Three shorthands expand into such stages: ``rejection_sampling`` (``rounds`` of sample →
SFT), ``spin`` (``rounds`` of self-play → DPO, each round's reference the previous round's model) and
``iterative`` (``rounds`` of collect from the current policy → reward model → PPO or DPO).

At the end every policy is evaluated on the same held-out prompts with the same sampling noise, and
``OUT/summary.json`` lists one object per stage: ``stage``, ``gold_reward``, ``proxy_reward``, ``kl`` (to the
``evaluation.reference`` policy), ``length_mean`` and ``seconds``; reward-model stages carry ``accuracy`` and
``gold_accuracy`` instead of the reward keys, and the ``init`` row is the untrained model.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lit_rlhf.errors import ConfigError, LitRLHFError
from lit_rlhf.held_out import summarize
from lit_rlhf.pipeline_run import FitPhase, PipelineRun, done_under, is_complete, stage_made_with, start_run
from lit_rlhf.pipeline_spec import check_data_files, load_pipeline
from lit_rlhf.run_folder import (
    AGGREGATE_FILE,
    DONE_FILE,
    HEALTH_FILE,
    LOG_FILE,
    MADE_WITH,
    PAIRED_FILE,
    SUMMARY_FILE,
    format_paired,
    format_table,
    interval_cell,
    last_line,
    output_to,
    proxy_scorers,
    write_atomically,
)
from lit_rlhf.stage_runners import STAGE_RUNNERS
from lit_rlhf.uncertainty import interval_over_seeds

# --- running -------------------------------------------------------------------------------------------------------


def run_stages(run: PipelineRun, force: tuple[str, ...] = (), until: str | None = None) -> None:
    """Run every stage not yet complete (and those in ``force``), in order, up to and including ``until``. A stage
    that runs again makes every later stage that reads it run again too, so no output is built on an old one."""
    names = [stage.name for stage in run.spec.stages]
    unknown = [name for name in (*force, *([until] if until else [])) if name not in names]
    if unknown:
        raise ConfigError(f"--force {unknown[0]}: no such stage (stages: {', '.join(names)})")
    check_data_files(run.spec)
    rerun: set[str] = set()
    for stage in run.spec.stages[: names.index(until) + 1 if until else None]:
        stage_dir = run.out_dir / stage.name
        if is_complete(stage, stage_dir, run) and stage.name not in force and not stage.reads() & rerun:
            print(f"[pipeline] {stage.name}: complete, skipped")
            continue
        if stage_dir.exists():
            shutil.rmtree(stage_dir)  # a stage cut short leaves partial output behind
        stage_dir.mkdir(parents=True)
        print(f"[pipeline] {stage.name}: running ({stage.kind}) ...", end=" ", flush=True)
        started = time.perf_counter()
        try:
            with output_to(stage_dir / LOG_FILE):
                record = STAGE_RUNNERS[stage.kind](stage, stage_dir, run)
        except SystemExit as stopped:  # the phase's command line refused an argument, its message in the log
            print(f"failed, its output: {stage_dir / LOG_FILE}")
            if stopped.code in (0, None):
                raise
            reason = last_line(stage_dir / LOG_FILE).removeprefix("lit-rlhf: error: ")
            raise ConfigError(f"stage {stage.name!r}: {reason}") from None
        except BaseException as error:
            print(f"failed, its output: {stage_dir / LOG_FILE}")
            _log_failure(stage_dir / LOG_FILE, error)
            raise
        record["seconds"] = round(time.perf_counter() - started, 1)
        print(f"done in {record['seconds']} s")
        record |= {"seed": run.seed, MADE_WITH: stage_made_with(stage, run)}
        write_atomically(stage_dir / DONE_FILE, json.dumps(record, indent=2) + "\n")
        rerun.add(stage.name)


def run_pipeline(
    config: str | Path, fit_phase: FitPhase, out: str | Path | None = None, force: tuple[str, ...] = (),
    seed: int | None = None, then: Callable[[Path], object] | None = None,
) -> list[dict]:
    """Run every stage not yet complete, then evaluate and write ``summary.json`` and ``paired.json``; returns the
    rows. ``then`` is called with the run folder last (``lit-rlhf pipeline`` passes
    :func:`lit_rlhf.report.publish_report`, which writes the folder's report).

    ``seed`` replaces the file's ``seed``; a stage completed under another seed runs again.

    ``fit_phase(args, runs_dir)`` runs ``lit-rlhf fit ARGS`` with its logs under ``runs_dir`` and returns the
    finished LightningCLI (the command line passes :func:`lit_rlhf.cli.fit_phase`).
    """
    run = start_run(config, fit_phase, out, seed)
    run_stages(run, force)
    summary = summarize(run)
    print(format_table(summary.rows))
    if scorer_line := proxy_scorers(summary.rows):
        print(scorer_line)
    for row in summary.rows:
        if row.get("health_breaches"):
            print(f"[pipeline] {row['stage']}: {row['health_breaches']} PPO-health breaches, the first "
                  f"{json.loads((run.out_dir / row['stage'] / HEALTH_FILE).read_text())[0]!r} (all in "
                  f"{run.out_dir / row['stage'] / HEALTH_FILE})")
    if summary.paired:
        print(format_paired(summary.paired))
    rows = _merged_with_earlier_summary(summary.rows, run.out_dir, run.seed)
    paired = _merged_with_earlier_paired(summary.paired, run.out_dir, run.seed)
    write_atomically(run.out_dir / SUMMARY_FILE, json.dumps(rows, indent=2) + "\n")
    write_atomically(run.out_dir / PAIRED_FILE, json.dumps(paired, indent=2) + "\n")
    print(f"[pipeline] summary: {run.out_dir / SUMMARY_FILE}, paired differences: {run.out_dir / PAIRED_FILE}")
    if then is not None:
        then(run.out_dir)
    return rows


AGGREGATE_SKIPPED = ("stage", "n", "test_pairs")
"""Summary keys that are not measurements to aggregate over seeds."""
AGGREGATE_PRINTED = ("stage", "gold_reward", "proxy_reward", "kl", "length_ratio", "sycophancy_rate", "format_rate",
                     "proxy_gap", "health_breaches", "ess", "pairs", "gold_agreement", "accuracy", "gold_accuracy",
                     "rater_ceiling")
"""The aggregate's columns the console shows."""


def run_seeds(
    config: str | Path, fit_phase: FitPhase, seeds: list[int], out: str | Path | None = None,
    force: tuple[str, ...] = (), then: Callable[[Path], object] | None = None,
) -> list[dict]:
    """The pipeline once per seed, in ``OUT/seed_<n>/``, then ``OUT/aggregate.json``: per stage, every measurement's
    mean over seeds with its 95 % t-interval (:func:`lit_rlhf.uncertainty.interval_over_seeds`), and
    ``OUT/paired.json``: each paired difference's mean over seeds with its interval, the seeds the units (a seed
    redraws the data, the initialisation, the training noise and the comparisons; the test prompts and the
    evaluation's sampling seed stay the same, so the intervals are about training runs, measured alike). ``then`` is
    :func:`run_pipeline`'s, for each seed's folder. Returns the aggregate rows."""
    base = Path(out or load_pipeline(config).out)
    summaries, paired = [], []
    for seed in seeds:
        print(f"[pipeline] seed {seed}")
        summaries.append(run_pipeline(config, fit_phase, base / f"seed_{seed}", force, seed, then))
        paired.append(json.loads((base / f"seed_{seed}" / PAIRED_FILE).read_text()))
    rows, differences = aggregate_over_seeds(summaries), aggregate_paired_over_seeds(paired)
    write_atomically(base / AGGREGATE_FILE, json.dumps(rows, indent=2) + "\n")
    write_atomically(base / PAIRED_FILE, json.dumps(differences, indent=2) + "\n")
    print(f"[pipeline] over seeds {', '.join(map(str, seeds))} (mean [95% interval]; all columns: {AGGREGATE_FILE}):")
    print(format_table([{key: interval_cell(value) for key, value in row.items() if key in AGGREGATE_PRINTED}
                        for row in rows]))
    if differences:
        print(format_paired(differences))
    print(f"[pipeline] aggregate: {base / AGGREGATE_FILE}, paired differences over seeds: {base / PAIRED_FILE}")
    return rows


def aggregate_over_seeds(summaries: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """``aggregate.json``'s rows: for each stage (in the first seed's order), each numeric summary value as
    ``{"mean", "ci95", "n"}`` over the seeds that have it; standard errors within a seed are left out (the spread
    over seeds holds them)."""
    by_stage: dict[str, dict[str, list[float]]] = {}
    for rows in summaries:
        for row in rows:
            values = by_stage.setdefault(row["stage"], {})
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in AGGREGATE_SKIPPED \
                        and not key.endswith("_se"):
                    values.setdefault(key, []).append(float(value))
    return [{"stage": stage, **{key: interval_over_seeds(values).as_dict() for key, values in metrics.items()}}
            for stage, metrics in by_stage.items()]


def aggregate_paired_over_seeds(paired: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each paired difference (``a``, ``b``, ``metric``) averaged over the seeds, with its interval over them."""
    means: dict[tuple[str, str, str], list[float]] = {}
    for rows in paired:
        for row in rows:
            means.setdefault((row["a"], row["b"], row["metric"]), []).append(row["mean"])
    return [{"a": a, "b": b, "metric": metric, **interval_over_seeds(values).as_dict()}
            for (a, b, metric), values in means.items()]


def _log_failure(log: Path, error: BaseException) -> None:
    """Why a stage failed, at the end of its log: the one line of an error of ours (bad data or settings), the
    traceback of anything else."""
    reason = str(error) if isinstance(error, LitRLHFError) else "".join(traceback.format_exception(error)).rstrip()
    with open(log, "a") as handle:
        handle.write(f"[pipeline] failed: {reason}\n")


def _merged_with_earlier_summary(rows: list[dict[str, Any]], out_dir: Path, seed: int) -> list[dict[str, Any]]:
    """This run's rows, with the rows another pipeline file wrote into the same folder kept in their places when
    their stage is still there under the same seed: a variant run with ``--out`` on the main job's folder adds its
    rows to the main job's."""
    path = out_dir / SUMMARY_FILE
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else []
    except json.JSONDecodeError:
        print(f"[pipeline] {path} is not valid JSON: replaced")
        earlier = []
    new = {row["stage"]: row for row in rows}
    kept = []
    for row in earlier if isinstance(earlier, list) else []:
        stage = row.get("stage") if isinstance(row, dict) else None
        if stage in new:
            kept.append(new.pop(stage))
        elif stage is not None and done_under(out_dir / stage, seed) is not None:
            kept.append(row)
    return kept + list(new.values())


def _merged_with_earlier_paired(rows: list[dict[str, Any]], out_dir: Path, seed: int) -> list[dict[str, Any]]:
    """This run's paired differences, after the earlier ones in the same folder whose two stages are still there
    under the same seed and that this run did not measure again (as :func:`_merged_with_earlier_summary` keeps
    rows)."""
    path = out_dir / PAIRED_FILE
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else []
    except json.JSONDecodeError:
        earlier = []
    new = {(row["a"], row["b"], row["metric"]) for row in rows}
    kept = [row for row in earlier if isinstance(row, dict)
            and (row.get("a"), row.get("b"), row.get("metric")) not in new
            and all(done_under(out_dir / str(row.get(side)), seed) is not None for side in ("a", "b"))]
    return kept + rows


# --- evaluation and the summary ------------------------------------------------------------------------------------


