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
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel

from lit_rlhf.collect import collect_comparisons, sample_responses
from lit_rlhf.data.datamodules import DemonstrationDataModule, PromptDataModule, subsample
from lit_rlhf.errors import ConfigError
from lit_rlhf.evaluation import PolicyEvaluation, evaluate_policy, measure_answers
from lit_rlhf.generation import Response, SamplingConfig
from lit_rlhf.models import WORLD, inference_device, load_causal_lm, load_tokenizer
from lit_rlhf.phases.reward import RewardModelModule
from lit_rlhf.pipeline_spec import (
    BestOfNStage,
    CollectStage,
    FitStage,
    PipelineSpec,
    RejectionSampleStage,
    SamplingStage,
    SelfPlayStage,
    StageSpec,
    load_pipeline,
)
from lit_rlhf.scoring import Scorer, gold_scorer, make_scorer
from lit_rlhf.selection import best_of_n_kl, pick_best, self_play_pairs
from lit_rlhf.world import speaks_world_language

FitPhase = Callable[[list[str], str], Any]
"""Runs ``lit-rlhf fit ARGS`` with its logs under a folder and returns the finished LightningCLI."""
DONE_FILE = "done.json"
LOG_FILE = "log.txt"
"""Everything a stage printed, in its folder; the console shows one line per stage."""
POLICY, REWARD_MODEL, DATA, BASELINE = "policy", "reward_model", "data", "baseline"
SUMMARY_METRICS = {
    "gold_reward": "gold/reward",
    "proxy_reward": "proxy/reward",
    "kl": "objective/kl",
    "length_mean": "response/length_mean",
    "length_ratio": "hacking/length_ratio",
    "sycophancy_rate": "hacking/sycophancy_rate",
    "format_rate": "hacking/format_rate",
    "repetition_rate": "hacking/repetition_rate",
    "proxy_gap": "gold/proxy_gap",
}
"""A policy's summary columns and the evaluation metrics they hold (:func:`lit_rlhf.evaluation.evaluate_policy`)."""
SUMMARY_KEYS = ("stage", *SUMMARY_METRICS, "seconds")
SUMMARY_FILE = "summary.json"
EVAL_SAMPLES_FILE = "eval_samples.jsonl"
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
        except BaseException:
            print(f"failed, its output: {stage_dir / LOG_FILE}")
            raise
        record["seconds"] = round(time.perf_counter() - started, 1)
        print(f"done in {record['seconds']} s")
        record["spec"], record["seed"], record["inputs"] = stage.as_record(), run.seed, _stage_inputs(stage, run)
        write_atomically(stage_dir / DONE_FILE, json.dumps(record, indent=2) + "\n")
        rerun.add(stage.name)


def run_pipeline(
    config: str | Path, fit_phase: FitPhase, out: str | Path | None = None, force: tuple[str, ...] = (),
    seed: int | None = None,
) -> list[dict]:
    """Run every stage not yet complete, then evaluate, write ``summary.json`` and the report; returns the rows.

    ``seed`` replaces the file's ``seed``; a stage completed under another seed runs again.

    ``fit_phase(args, runs_dir)`` runs ``lit-rlhf fit ARGS`` with its logs under ``runs_dir`` and returns the
    finished LightningCLI (the command line passes :func:`lit_rlhf.cli.fit_phase`).
    """
    from lit_rlhf.report import build_report, publish_to_wandb

    run = start_run(config, fit_phase, out, seed)
    run_stages(run, force)
    rows = summarize(run)
    print(format_table(rows))
    rows = _merged_with_earlier_summary(rows, run.out_dir, run.seed)
    write_atomically(run.out_dir / SUMMARY_FILE, json.dumps(rows, indent=2) + "\n")
    print(f"[pipeline] summary: {run.out_dir / 'summary.json'}")
    report = build_report([run.out_dir])
    with output_to(report.out_dir / LOG_FILE):  # W&B's lines about its report run
        publish_to_wandb(report)
    print(f"[pipeline] report: {report.html_path}")
    return rows


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
    return (record is not None and record.get("spec") == stage.as_record() and not outdated
            and record.get("inputs", {}) == _stage_inputs(stage, run))


def _stage_inputs(stage: StageSpec, run: PipelineRun) -> dict[str, int]:
    """The stamps of the files a stage reads that no stage of the run writes: its phase config, data, prompts
    (the file's top-level ``prompts`` where the stage has none of its own), paths among its ``args``."""
    values = stage.reads() | {value for value in getattr(stage, "args", {}).values() if isinstance(value, str)}
    if isinstance(stage, (CollectStage, RejectionSampleStage)) and (prompts := _prompts_path(stage, run.spec)):
        values.add(prompts)
    return input_stamps(value for value in sorted(values) if value not in run.stage_names)


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


def _extended_configs(path: Path) -> list[str]:
    """The files a YAML config's top-level ``config:`` names (jsonargparse reads them first); none when unreadable."""
    try:
        extended = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return []
    extended = extended.get("config") if isinstance(extended, dict) else None
    names = extended if isinstance(extended, list) else [extended]
    return [name for name in names if isinstance(name, str)]


def _run_fit(stage: FitStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    args = ["--config", stage.config, "--seed_everything", str(run.seed),
            "--model.init_args.export_dir", str(stage_dir / "hf")]
    for reference, key, output in ((stage.model, "model.init_args.model_name_or_path", "model"),
                                   (stage.reward_model, "model.init_args.reward_model", "model"),
                                   (stage.statistics_policy, "model.init_args.statistics_policy", "model"),
                                   (stage.data, "data.init_args.path", "data")):
        if reference:
            args += [f"--{key}", run.resolve(reference, output)]
    for key, value in stage.args.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    cli = run.fit_phase(args, str(stage_dir))
    role = REWARD_MODEL if isinstance(cli.model, RewardModelModule) else POLICY
    record: dict[str, Any] = {"kind": "fit", "role": role, "model": "hf"}
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
    )
    return {"kind": "collect", "role": DATA, "data": "comparisons.jsonl", "pairs": summary.pairs,
            "ties_dropped": summary.ties_dropped, "gold_agreement": summary.gold_agreement}


def _sampling(stage: SamplingStage) -> SamplingConfig:
    """A sampling stage's decoding settings."""
    return SamplingConfig(stage.max_new_tokens, stage.temperature)


def _prompts_path(stage: CollectStage | RejectionSampleStage, spec: PipelineSpec) -> str | None:
    """The training prompts a sampling stage uses: its own ``prompts``, else the file's, else the world's."""
    return stage.prompts if stage.prompts is not None else spec.prompts


def _training_prompts(stage: RejectionSampleStage, spec: PipelineSpec, policy: str) -> list[str]:
    """A sampling stage's prompts (``num_prompts`` of them drawn with the file's seed, when there are more), chat
    prompts rendered with the template of the ``policy`` that answers them."""
    prompts = PromptDataModule(path=_prompts_path(stage, spec), tokenizer_name_or_path=policy, val_fraction=0.0,
                               max_prompt_length=stage.max_prompt_length,
                               max_length=stage.max_prompt_length + stage.max_new_tokens)
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
    _write_jsonl(stage_dir / "demonstrations.jsonl", [{"prompt": p.prompt, "completion": p.response} for p in picks])
    return {"kind": "rejection_sample", "role": DATA, "data": "demonstrations.jsonl", "rows": len(picks)}


def _run_self_play(stage: SelfPlayStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    policy = run.resolve(stage.policy, "model")
    demonstrations = DemonstrationDataModule(path=stage.demonstrations, tokenizer_name_or_path=policy,
                                             val_fraction=0.0)
    demonstrations.setup("fit")
    records = subsample(demonstrations.train_records, stage.num_prompts, run.seed)
    torch.manual_seed(run.seed)
    prompts = [record.prompt for record in records]
    groups = sample_responses(policy, prompts, 1, _sampling(stage), stage.max_prompt_length, SAMPLING_BATCH_SIZE)
    generations = [group[0].text for group in groups]
    pairs = self_play_pairs(prompts, [record.completion for record in records], generations)
    _write_jsonl(stage_dir / "comparisons.jsonl", pairs)
    return {"kind": "self_play", "role": DATA, "data": "comparisons.jsonl", "pairs": len(pairs)}


def _run_best_of_n(stage: BestOfNStage, stage_dir: Path, run: PipelineRun) -> dict[str, Any]:
    """Best-of-n on the held-out evaluation prompts; the summary measures its picks (``samples.jsonl``) like the
    policies' answers."""
    evaluation, policy = HeldOutEvaluation(run), run.resolve(stage.policy, "model")
    groups = evaluation.sample_groups(policy, stage.n, stage.max_prompt_length)
    picks = evaluation.best_picks(policy, run.resolve(stage.reward_model, "model"), groups)
    _write_jsonl(stage_dir / "samples.jsonl", picks)
    return {"kind": "best_of_n", "role": BASELINE, "n": stage.n, "samples": "samples.jsonl",
            "kl": best_of_n_kl(stage.n)}


STAGE_RUNNERS: dict[str, Callable[[Any, Path, PipelineRun], dict[str, Any]]] = {
    "fit": _run_fit,
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
    measure their trials with it too, so a sweep's numbers and a pipeline's summary are on the same axes."""

    def __init__(self, run: PipelineRun) -> None:
        self.spec = run.spec.evaluation
        self.prompts_path = self.spec.prompts if self.spec.prompts is not None else run.spec.prompts
        """The held-out prompts: ``evaluation.prompts``, else the file's ``prompts``, else the world's."""
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
        prompts = PromptDataModule(path=self.prompts_path, tokenizer_name_or_path=tokenizer, val_fraction=0.0,
                                   max_prompt_length=self.max_prompt_length,
                                   max_length=self.max_prompt_length + self.sampling.max_new_tokens,
                                   num_eval_prompts=self.num_prompts)
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
        same = reward_model == self.reward_model
        scorer = self.scorer if same else make_scorer(reward_model, device=inference_device())
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


def summarize(run: PipelineRun) -> list[dict[str, Any]]:
    """One row per stage (and the ``init`` row): policies evaluated here, the rest from their ``done.json``; a few
    answers of each policy go to ``eval_samples.jsonl``."""
    evaluation = HeldOutEvaluation(run)
    rows, samples = [], []

    def measured(stage: str, result: PolicyEvaluation) -> dict[str, Any]:
        samples.extend(evaluation.samples(stage, result))
        return evaluation.row(result)

    if evaluation.spec.init:
        rows.append({"stage": "init", **measured("init", evaluation.policy(evaluation.spec.init)),
                     "seconds": 0.0})
    for stage in run.spec.stages:
        done = run.done(stage.name)
        row: dict[str, Any] = {"stage": stage.name}
        if done["role"] == POLICY:
            row |= measured(stage.name, evaluation.policy(str(run.out_dir / stage.name / done["model"])))
        elif done["role"] == BASELINE:
            picks = [json.loads(line) for line in (run.out_dir / stage.name / done["samples"]).open()]
            row |= measured(stage.name, evaluation.picks(picks)) | {"kl": done["kl"], "n": done["n"]}
        else:
            row |= {key: value for key, value in done.items() if key not in BOOKKEEPING_KEYS}
        rows.append({**row, "seconds": done["seconds"]})
    _write_jsonl(run.out_dir / EVAL_SAMPLES_FILE, samples)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The summary as fixed-width text: the policies' rows, then the other stages' (data, reward models)."""
    policies = [row for row in rows if "length_mean" in row]
    others = [row for row in rows if "length_mean" not in row]
    return "\n\n".join(_fixed_width(group) for group in (policies, others) if group)


def _fixed_width(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[format_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def format_cell(value: Any) -> str:
    """A table cell: floats to three decimals, ``-`` for a missing value."""
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def write_atomically(path: Path, text: str) -> None:
    """Write a file that marks work as done (``done.json``, ``summary.json``) so that a kill never leaves a
    half-written one: the text goes to a temporary file beside it, which then replaces it in one rename."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
