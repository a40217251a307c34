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
import math
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from lit_rlhf.advantages import clip_scores, normalize_scores
from lit_rlhf.collect import collect_comparisons, sample_responses
from lit_rlhf.data.datamodules import DemonstrationDataModule, PromptDataModule, default_world_dir, subsample
from lit_rlhf.errors import ConfigError, LitRLHFError
from lit_rlhf.evaluation import (
    PolicyEvaluation,
    evaluate_policy,
    measure_answers,
    measure_reward_model,
    paired_differences,
)
from lit_rlhf.generation import Response, SamplingConfig
from lit_rlhf.models import WORLD, inference_device, load_causal_lm, load_tokenizer
from lit_rlhf.phases.ppo_health import PPOHealth
from lit_rlhf.phases.reward import RewardModelModule
from lit_rlhf.pipeline_spec import (
    BestOfNStage,
    CollectStage,
    FitStage,
    OptimumStage,
    PipelineSpec,
    RejectionSampleStage,
    SamplingStage,
    SelfPlayStage,
    StageSpec,
    check_data_files,
    load_pipeline,
)
from lit_rlhf.run_folder import (
    AGGREGATE_FILE,
    DONE_FILE,
    EVAL_SAMPLES_FILE,
    HEALTH_FILE,
    LOG_FILE,
    PAIRED_FILE,
    PAIRED_METRICS,
    PROXY_SCORER,
    SUMMARY_FILE,
    format_paired,
    format_table,
    input_stamps,
    interval_cell,
    last_line,
    output_to,
    proxy_scorers,
    write_atomically,
    write_jsonl,
)
from lit_rlhf.scoring import Scorer, gold_scorer, make_scorer
from lit_rlhf.selection import best_of_n_kl, pick_best, self_play_pairs
from lit_rlhf.uncertainty import interval_over_seeds, kl_regularized_optimum
from lit_rlhf.world import Rater, ensure_world, speaks_world_language

FitPhase = Callable[[list[str], str], Any]
"""Runs ``lit-rlhf fit ARGS`` with its logs under a folder and returns the finished LightningCLI."""
POLICY, REWARD_MODEL, DATA, BASELINE, YARDSTICK = "policy", "reward_model", "data", "baseline", "yardstick"
SUMMARY_METRICS = {
    "gold_reward": "gold/reward",
    "gold_reward_se": "gold/reward_se",
    "proxy_reward": "proxy/reward",
    "proxy_reward_se": "proxy/reward_se",
    "kl": "objective/kl",
    "kl_se": "objective/kl_se",
    "length_mean": "response/length_mean",
    "length_ratio": "hacking/length_ratio",
    "sycophancy_rate": "hacking/sycophancy_rate",
    "format_rate": "hacking/format_rate",
    "repetition_rate": "hacking/repetition_rate",
    "proxy_gap": "gold/proxy_gap",
}
"""A policy's summary columns and the evaluation metrics they hold (:func:`lit_rlhf.evaluation.evaluate_policy`);
``<column>_se`` is the standard error of ``<column>``, clustered by prompt."""
SUMMARY_KEYS = ("stage", *SUMMARY_METRICS, "seconds")
COST_KEYS = ("updates", "generated")
"""What a stage cost besides its ``seconds``: optimiser updates, and answers it sampled (PPO's rollouts, collect's,
best-of-n's and the optimum's samples; DPO samples none)."""
SAMPLES_PER_STAGE = 4
"""Answers per policy written to ``eval_samples.jsonl`` for the report, each to another held-out prompt."""
BOOKKEEPING_KEYS = ("kind", "role", "model", "data", "samples", "seconds", "spec", "seed", "inputs")
"""Keys of ``done.json`` that say where a stage's output is, not what it measured."""
SAMPLING_BATCH_SIZE = 256
"""Prompts a sampling stage, or best-of-n, sends through the policy at once."""
EVALUATION_BATCH_SIZE = 128
"""Prompts the held-out evaluation sends through a policy at once."""


# --- running -------------------------------------------------------------------------------------------------------


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
        if _is_complete(stage, stage_dir, run) and stage.name not in force and not stage.reads() & rerun:
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
        record |= {"spec": _stage_record(stage, run), "seed": run.seed, "inputs": _stage_inputs(stage, run)}
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
        elif stage is not None and _done_under(out_dir / stage, seed) is not None:
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
            and all(_done_under(out_dir / str(row.get(side)), seed) is not None for side in ("a", "b"))]
    return kept + rows


def _done_under(stage_dir: Path, seed: int) -> dict[str, Any] | None:
    """The stage's ``done.json`` if it finished under ``seed``; one from before seeds were recorded counts as seed
    0, the only seed fit stages had then."""
    done = stage_dir / DONE_FILE
    record = json.loads(done.read_text()) if done.is_file() else None
    return record if record is not None and record.get("seed", 0) == seed else None


def _is_complete(stage: StageSpec, stage_dir: Path, run: PipelineRun) -> bool:
    """Whether the stage finished before with the same settings, defaults included, the same seed, and the files it
    reads unchanged since (:func:`input_stamps`; otherwise it runs again). A stage finished by a version that kept
    only the settings the file named, not every one, runs again, and one from before stamps were kept if it reads a
    file; so does a best-of-n stage from before its picks were kept (no ``samples``), since the summary measures
    them."""
    record = _done_under(stage_dir, run.seed)
    outdated = record is not None and record.get("kind") == "best_of_n" and "samples" not in record
    return (record is not None and record.get("spec") == _stage_record(stage, run) and not outdated
            and record.get("inputs", {}) == _stage_inputs(stage, run))


def _stage_record(stage: StageSpec, run: PipelineRun) -> dict[str, Any]:
    """The settings a stage's output depends on: its own, and for the stages that sample the held-out prompts
    (best-of-n, the optimum) the file's ``evaluation`` too, so that new evaluation settings redraw them."""
    record = stage.as_record()
    if isinstance(stage, (BestOfNStage, OptimumStage)):
        record["evaluation"] = asdict(run.spec.evaluation)
    return record


def _stage_inputs(stage: StageSpec, run: PipelineRun) -> dict[str, int]:
    """The stamps of the files a stage reads that no stage of the run writes: its phase config, data, prompts
    (the file's top-level ``prompts`` where the stage has none of its own), paths among its ``args``."""
    values = stage.reads() | {value for value in getattr(stage, "args", {}).values() if isinstance(value, str)}
    if isinstance(stage, (CollectStage, RejectionSampleStage)) and (prompts := _prompts_path(stage, run.spec)):
        values.add(prompts)
    return input_stamps(value for value in sorted(values) if value not in run.stage_names)


def _run_fit(stage: FitStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    args = ["--config", stage.config, "--seed_everything", str(run.seed),
            "--model.init_args.export_dir", str(stage_dir / "hf")]
    for reference, key, output in ((stage.model, "model.init_args.model_name_or_path", "model"),
                                   (stage.reward_model, "model.init_args.reward_model", "model"),
                                   (stage.statistics_policy, "model.init_args.statistics_policy", "model"),
                                   (stage.data, "data.init_args.path", "data")):
        if reference:
            args += [f"--{key}", run.resolve(reference, output)]
    if not {"data.on_bad_row", "data.init_args.on_bad_row"} & set(stage.args):
        args += ["--data.init_args.on_bad_row", run.spec.on_bad_row]
    for key, value in stage.args.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    cli = run.fit_phase(args, str(stage_dir))
    role = REWARD_MODEL if isinstance(cli.model, RewardModelModule) else POLICY
    record: dict[str, Any] = {"kind": "fit", "role": role, "model": "hf", "updates": cli.trainer.global_step}
    if (generated := getattr(cli.model, "samples_generated", None)) is not None:
        record["generated"] = generated
    if isinstance(health := getattr(cli.model, "health", None), PPOHealth):
        write_atomically(stage_dir / HEALTH_FILE, json.dumps(health.breaches, indent=2) + "\n")
        record["health_breaches"] = len(health.breaches)
    if role == REWARD_MODEL:
        metrics = cli.trainer.callback_metrics
        record["accuracy"] = _float(metrics.get("val/accuracy"))
        record["gold_accuracy"] = _float(metrics.get("val/gold/accuracy"))
        record["length_corr"] = _float(metrics.get("val/reward/length_corr"))
    return record


def _run_collect(stage: CollectStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    summary = collect_comparisons(
        run.resolve(stage.policy, "model"), stage_dir, k=stage.k,
        judge=stage.judge, judge_model=run.resolve(stage.judge_model, "model"),
        reward=stage.reward, principles_path=stage.principles,
        prompts_path=_prompts_path(stage, run.spec), num_prompts=stage.num_prompts,
        sampling=_sampling(stage), max_prompt_length=stage.max_prompt_length, seed=run.seed,
        on_bad_row=_on_bad_row(stage, run.spec),
    )
    return {"kind": "collect", "role": DATA, "data": "comparisons.jsonl", "generated": summary.prompts * summary.k,
            "pairs": summary.pairs,
            "ties_dropped": summary.ties_dropped, "gold_agreement": summary.gold_agreement}


def _sampling(stage: SamplingStage) -> SamplingConfig:
    """A sampling stage's decoding settings."""
    return SamplingConfig(stage.max_new_tokens, stage.temperature)


def _on_bad_row(stage: SamplingStage, spec: PipelineSpec) -> str:
    """A sampling stage's ``on_bad_row``, else the file's."""
    return stage.on_bad_row or spec.on_bad_row


def _prompts_path(stage: CollectStage | RejectionSampleStage, spec: PipelineSpec) -> str | None:
    """The training prompts a sampling stage uses: its own ``prompts``, else the file's, else the world's."""
    return stage.prompts if stage.prompts is not None else spec.prompts


def _training_prompts(stage: RejectionSampleStage, spec: PipelineSpec, policy: str) -> list[str]:
    """A sampling stage's prompts (``num_prompts`` of them drawn with the file's seed, when there are more), chat
    prompts rendered with the template of the ``policy`` that answers them."""
    prompts = PromptDataModule(path=_prompts_path(stage, spec), tokenizer_name_or_path=policy, val_fraction=0.0,
                               max_prompt_length=stage.max_prompt_length,
                               max_length=stage.max_prompt_length + stage.max_new_tokens,
                               on_bad_row=_on_bad_row(stage, spec))
    prompts.setup("fit")
    return [record.prompt for record in subsample(prompts.train_records, stage.num_prompts, spec.seed)]


def _run_rejection_sample(stage: RejectionSampleStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    policy = run.resolve(stage.policy, "model")
    prompts = _training_prompts(stage, run.spec, policy)
    torch.manual_seed(run.seed)
    groups = sample_responses(policy, prompts, stage.n, _sampling(stage), stage.max_prompt_length,
                              SAMPLING_BATCH_SIZE)
    scorer = make_scorer(run.resolve(stage.reward_model, "model"), device=inference_device())
    answers = [[response for response in group if response.text.strip()] for group in groups]  # EOS first: no answer
    picks = pick_best(prompts, answers, scorer, stage.keep, stage.threshold)  # an empty completion is a bad row
    write_jsonl(stage_dir / "demonstrations.jsonl",
                 [{"prompt": p.prompt, "completion": p.response, "completion_ended": p.ended} for p in picks])
    return {"kind": "rejection_sample", "role": DATA, "data": "demonstrations.jsonl", "rows": len(picks)}


def _run_self_play(stage: SelfPlayStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    policy = run.resolve(stage.policy, "model")
    demonstrations = DemonstrationDataModule(path=stage.demonstrations, tokenizer_name_or_path=policy,
                                             val_fraction=0.0, on_bad_row=_on_bad_row(stage, run.spec))
    demonstrations.setup("fit")
    records = subsample(demonstrations.train_records, stage.num_prompts, run.seed)
    torch.manual_seed(run.seed)
    prompts = [record.prompt for record in records]
    groups = sample_responses(policy, prompts, 1, _sampling(stage), stage.max_prompt_length, SAMPLING_BATCH_SIZE)
    pairs = self_play_pairs(prompts, [record.completion for record in records], [group[0] for group in groups])
    write_jsonl(stage_dir / "comparisons.jsonl", pairs)
    return {"kind": "self_play", "role": DATA, "data": "comparisons.jsonl", "pairs": len(pairs)}


def _run_best_of_n(stage: BestOfNStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    """Best-of-n on the held-out evaluation prompts; the summary measures its picks (``samples.jsonl``) like the
    policies' answers."""
    evaluation, policy = HeldOutEvaluation(run), run.resolve(stage.policy, "model")
    groups = evaluation.sample_groups(policy, stage.n, stage.max_prompt_length)
    picks = evaluation.best_picks(policy, run.resolve(stage.reward_model, "model"), groups)
    write_jsonl(stage_dir / "samples.jsonl", picks)
    return {"kind": "best_of_n", "role": BASELINE, "n": stage.n, "samples": "samples.jsonl",
            "generated": len(groups) * stage.n,
            "kl": best_of_n_kl(stage.n)}


def _run_optimum(stage: OptimumStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    """The KL-regularised optimum of ``policy`` and ``reward_model`` (:func:`lit_rlhf.uncertainty.
    kl_regularized_optimum`) on the distinct held-out prompts, ``n`` samples of ``policy`` each: its gold and proxy
    reward (the evaluation's reward model, as every row's) and its KL to ``policy``, with standard errors over prompts,
    and the effective sample size. Refused, with one line in the summary, where that is below
    ``min_effective_sample_size``: then a few samples carry all the weight and the numbers say little."""
    evaluation, policy = HeldOutEvaluation(run), run.resolve(stage.policy, "model")
    prompts = list(dict.fromkeys(evaluation.prompts))[: stage.num_prompts]
    torch.manual_seed(evaluation.seed)
    groups = sample_responses(policy, prompts, stage.n, evaluation.sampling,
                              stage.max_prompt_length or evaluation.max_prompt_length, SAMPLING_BATCH_SIZE)
    flat = [(prompt, response) for prompt, group in zip(prompts, groups) for response in group]
    texts, finished = [response.text for _, response in flat], [response.ended for _, response in flat]
    flat_prompts = [prompt for prompt, _ in flat]
    scorer = evaluation.scorer_for(run.resolve(stage.reward_model, "model"))
    raw = scorer.score(flat_prompts, texts, finished).double()
    statistics = getattr(scorer, "statistics", (0.0, 1.0))  # only a reward-model export stores them
    rewards = normalize_scores(raw, *statistics) if stage.normalize_scores else raw
    measures = {}
    if evaluation.scorer is not None:
        same = scorer is evaluation.scorer
        measures["proxy_reward"] = raw if same else evaluation.scorer.score(flat_prompts, texts, finished).double()
    if evaluation.gold is not None:
        measures["gold_reward"] = evaluation.gold.score(flat_prompts, texts, finished).double()
    shape = (len(prompts), stage.n)
    optimum = kl_regularized_optimum(clip_scores(rewards, stage.score_clip).cpu().view(shape), stage.beta,
                                     {name: values.cpu().view(shape) for name, values in measures.items()})
    record: dict[str, Any] = {"kind": "optimum", "role": YARDSTICK, "beta": stage.beta, "n": stage.n,
                              "generated": len(prompts) * stage.n,
                              "ess": round(optimum.effective_sample_size, 2),
                              "ess_min": round(optimum.min_effective_sample_size, 2)}
    if optimum.effective_sample_size < stage.min_effective_sample_size:
        record["refused"] = (f"effective sample size {optimum.effective_sample_size:.1f} of {stage.n} < "
                             f"{stage.min_effective_sample_size}: raise beta or n")
        return record
    for name, estimate in (*optimum.measures.items(), ("kl", optimum.kl)):
        record[name], record[f"{name}_se"] = estimate.mean, None if math.isnan(estimate.se) else estimate.se
    return record


STAGE_RUNNERS: dict[str, Callable[[Any, Path, PipelineRun], dict[str, Any]]] = {
    "fit": _run_fit,
    "optimum": _run_optimum,
    "collect": _run_collect,
    "rejection_sample": _run_rejection_sample,
    "self_play": _run_self_play,
    "best_of_n": _run_best_of_n,
}


# --- evaluation and the summary ------------------------------------------------------------------------------------


class HeldOutEvaluation:
    """What every policy of a run is measured with (the file's ``evaluation``): the same held-out prompts, each
    repeated ``samples_per_prompt`` times, the same sampling noise, the ``reference`` policy that KL and the hacking
    metrics are measured against, and the ``reward_model`` that gives the proxy reward; prompts are cut from the left
    to ``max_prompt_length`` tokens (by default the world's; set it to the phases' own on other data). Sweeps
    measure their trials with it too, on the world's development prompts (``split``), so a sweep's numbers and a
    pipeline's summary are measured alike, on different prompts."""

    def __init__(self, run: PipelineRun, split: str = "test") -> None:
        self.spec = run.spec.evaluation
        self.split = split
        """The world's held-out prompts it reads where the file names none: ``test`` (the summary) or ``dev``
        (a sweep's trials, which choose settings)."""
        self.prompts_path = self.spec.prompts if self.spec.prompts is not None else run.spec.prompts
        """The held-out prompts: ``evaluation.prompts``, else the file's ``prompts``, else the world's test prompts."""
        self.num_prompts = self.spec.num_prompts
        self.repeats = self.spec.samples_per_prompt
        self.sampling = SamplingConfig(self.spec.max_new_tokens, self.spec.temperature)
        self.seed = self.spec.seed
        self.max_prompt_length = self.spec.max_prompt_length
        """Prompts longer than this (in tokens) are cut from the left, as the phases cut them."""
        self.run = run

    @cached_property
    def prompts(self) -> list[str]:
        """Each held-out prompt ``samples_per_prompt`` times, chat prompts rendered with the template of the
        policies' tokenizer (the reference's, else the init model's): what the policies were trained to read."""
        tokenizer = self.reference_path or self.spec.init or WORLD
        if self.prompts_path is None and not speaks_world_language(load_tokenizer(tokenizer)):
            raise ConfigError(f"evaluation.prompts is unset, and {tokenizer} cannot read the world's prompts: name "
                              "held-out prompts of your own data (any file with a prompt column)")
        path = self.prompts_path or str(ensure_world(default_world_dir())[f"{self.split}_prompts"])
        prompts = PromptDataModule(path=path, tokenizer_name_or_path=tokenizer, val_fraction=0.0,
                                   max_prompt_length=self.max_prompt_length,
                                   max_length=self.max_prompt_length + self.sampling.max_new_tokens,
                                   num_eval_prompts=self.num_prompts, on_bad_row=self.run.spec.on_bad_row)
        prompts.setup("fit")
        return [p for p in prompts.eval_prompts for _ in range(self.repeats)]

    @cached_property
    def reference_path(self) -> str | None:
        """Resolved when first needed: a best-of-n stage may run before the stages the evaluation names."""
        return self.run.resolve(self.spec.reference, "model")

    @cached_property
    def reward_model(self) -> str | None:
        return self.run.resolve(self.spec.reward_model, "model")

    @cached_property
    def scorer(self) -> Scorer | None:
        return make_scorer(self.reward_model, device=inference_device()) if self.reward_model else None

    @cached_property
    def gold(self) -> Scorer | None:
        """The world's gold reward on the held-out prompts, where they are the world's."""
        return gold_scorer(self.prompts)

    @cached_property
    def reference(self) -> PreTrainedModel | None:
        if not self.reference_path:
            return None
        tokenizer = load_tokenizer(self.reference_path)
        return load_causal_lm(self.reference_path, tokenizer, device=inference_device()).eval()

    @cached_property
    def baseline(self) -> PolicyEvaluation | None:
        """The reference policy's own evaluation, which drift and hacking metrics compare against."""
        if self.reference is None:
            return None
        return evaluate_policy(self.reference, load_tokenizer(self.reference_path), self.prompts, self.sampling,
                               self.max_prompt_length, self.seed, EVALUATION_BATCH_SIZE, scorer=self.scorer,
                               gold=self.gold)

    def policy(self, name_or_path: str) -> PolicyEvaluation:
        """A policy's :class:`lit_rlhf.evaluation.PolicyEvaluation`."""
        baseline = self.baseline
        tokenizer = load_tokenizer(name_or_path)
        torch.manual_seed(self.run.seed)  # the untrained world model is built from this seed
        model = load_causal_lm(name_or_path, tokenizer, device=inference_device()).eval()
        return evaluate_policy(model, tokenizer, self.prompts, self.sampling, self.max_prompt_length, self.seed,
                               EVALUATION_BATCH_SIZE,
                               self.reference,
                               self.scorer, baseline, gold=self.gold)

    def sample_groups(self, policy: str, n: int, max_prompt_length: int | None = None) -> list[list[Response]]:
        """``n`` samples of ``policy`` for each held-out prompt, with the evaluation's sampling and seed."""
        torch.manual_seed(self.seed)
        return sample_responses(policy, self.prompts, n, self.sampling, max_prompt_length or self.max_prompt_length,
                                SAMPLING_BATCH_SIZE)

    def best_picks(self, policy: str, reward_model: str, groups: list[list[Response]]) -> list[dict]:
        """The best sample of each prompt's group by ``reward_model``: ``{"prompt", "response", "score", "ended",
        "length"}`` (length in tokens of ``policy``'s tokenizer)."""
        scorer = self.scorer_for(reward_model)
        tokenizer = load_tokenizer(policy)
        return [{**vars(pick), "length": len(tokenizer(pick.response, add_special_tokens=False)["input_ids"])}
                for pick in pick_best(self.prompts, groups, scorer)]

    def picks(self, picks: list[dict]) -> PolicyEvaluation:
        """The :class:`lit_rlhf.evaluation.PolicyEvaluation` of best-of-n picks, measured like a policy's answers: the
        proxy reward is the evaluation's reward model's score, whichever reward model picked them."""
        prompts, responses = [p["prompt"] for p in picks], [p["response"] for p in picks]
        finished = [p.get("ended", True) for p in picks]  # samples.jsonl of earlier versions lacks "ended"
        proxy = self.scorer.score(prompts, responses, finished).float().tolist() if self.scorer else None
        gold = self.gold.score(prompts, responses, finished).tolist() if self.gold is not None else None
        return measure_answers(prompts, responses, [p["length"] for p in picks], proxy, self.baseline, gold)

    def scorer_for(self, reward_model: str) -> Scorer:
        """The scorer of ``reward_model``: the evaluation's own when it is the evaluation's reward model."""
        return self.scorer if reward_model == self.reward_model else make_scorer(reward_model,
                                                                                 device=inference_device())

    def reward_model_row(self, reward_model: str) -> dict[str, Any]:
        """A reward model's summary columns measured on every pair of different reference answers to a held-out
        prompt (:func:`lit_rlhf.evaluation.measure_reward_model`): ``accuracy`` against the world's raters,
        ``gold_accuracy``, each with its standard error, ``rater_ceiling`` (the most ``accuracy`` any scorer
        reaches on these pairs), ``rater_agreement`` (two raters' agreement) and the number of ``test_pairs``;
        none where too few pairs differ (one answer per prompt): then the row keeps the reward phase's validation
        numbers."""
        baseline = self.baseline
        scorer = self.scorer_for(reward_model)
        scores = scorer.score(baseline.prompts, baseline.responses, baseline.ended).float().tolist()
        measured = measure_reward_model(baseline.prompts, baseline.responses, scores, baseline.gold,
                                        Rater().probability)
        if measured is None:
            return {}
        return {"accuracy": measured.accuracy.mean, "accuracy_se": measured.accuracy.se,
                "gold_accuracy": measured.gold_accuracy.mean, "gold_accuracy_se": measured.gold_accuracy.se,
                "rater_ceiling": measured.rater_ceiling.mean, "rater_agreement": measured.rater_agreement.mean,
                "test_pairs": measured.pairs}

    def row(self, evaluation: PolicyEvaluation) -> dict[str, Any]:
        """An evaluation as summary columns (None where a metric does not apply)."""
        return {key: evaluation.metrics.get(metric) for key, metric in SUMMARY_METRICS.items()}

    def samples(self, stage: str, evaluation: PolicyEvaluation) -> list[dict[str, Any]]:
        """A few answers of one stage, to different prompts, for the report."""
        rows = range(0, len(evaluation.prompts), self.repeats)
        return [
            {"stage": stage, "prompt": evaluation.prompts[i], "response": evaluation.responses[i],
             "gold": evaluation.gold[i] if evaluation.gold else None,
             "proxy": evaluation.proxy[i] if evaluation.proxy else None}
            for i in list(rows)[:SAMPLES_PER_STAGE]
        ]


@dataclass
class Summary:
    """What the summary measured: one row per stage (``summary.json``) and the paired differences between every two
    policies on the same prompts (``paired.json``)."""

    rows: list[dict[str, Any]]
    paired: list[dict[str, Any]]


def summarize(run: PipelineRun) -> Summary:
    """One row per stage (and the ``init`` row): policies evaluated here, reward models measured on pairs of the
    reference's answers where the prompts have gold (else their validation numbers), the rest from their
    ``done.json``; a few answers of each policy go to ``eval_samples.jsonl``."""
    evaluation = HeldOutEvaluation(run)
    rows, samples, policies = [], [], {}

    def measured(stage: str, result: PolicyEvaluation) -> dict[str, Any]:
        samples.extend(evaluation.samples(stage, result))
        policies[stage] = result
        row = evaluation.row(result)
        return row | ({PROXY_SCORER: evaluation.spec.reward_model} if "proxy_reward" in row else {})

    if evaluation.spec.init:
        rows.append({"stage": "init", **measured("init", evaluation.policy(evaluation.spec.init)),
                     "seconds": 0.0})
    for stage in run.spec.stages:
        done = run.done(stage.name)
        row: dict[str, Any] = {"stage": stage.name}
        if done["role"] == POLICY:
            row |= measured(stage.name, evaluation.policy(str(run.out_dir / stage.name / done["model"])))
            row |= {key: done[key] for key in COST_KEYS + ("health_breaches",) if key in done}
        elif done["role"] == BASELINE:
            picks = [json.loads(line) for line in (run.out_dir / stage.name / done["samples"]).open()]
            row |= measured(stage.name, evaluation.picks(picks)) | {"kl": done["kl"], "n": done["n"],
                                                                      "generated": done["generated"]}
        else:
            row |= {key: value for key, value in done.items() if key not in BOOKKEEPING_KEYS}
            if done["role"] == REWARD_MODEL and evaluation.gold is not None and evaluation.baseline is not None:
                row |= evaluation.reward_model_row(str(run.out_dir / stage.name / done["model"]))
        rows.append({**row, "seconds": done["seconds"]})
    write_jsonl(run.out_dir / EVAL_SAMPLES_FILE, samples)
    return Summary(rows, paired_rows(policies, exclude=("init",)))


def paired_rows(policies: dict[str, PolicyEvaluation], exclude: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """``paired.json``'s rows: for every two policies (``a`` the later stage) and each of :data:`PAIRED_METRICS`,
    the mean over prompts of a − b with its 95 % interval (:func:`lit_rlhf.evaluation.paired_differences`)."""
    names = [name for name in policies if name not in exclude]
    rows = []
    for later, a in enumerate(names):
        for b in names[:later]:
            for column in PAIRED_METRICS:
                interval = paired_differences(policies[a], policies[b], SUMMARY_METRICS[column])
                if interval is not None:
                    rows.append({"a": a, "b": b, "metric": column, **interval.as_dict()})
    return rows


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


