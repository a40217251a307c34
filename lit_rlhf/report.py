"""``lit-rlhf report``: one self-contained HTML page from what ``lit-rlhf pipeline`` or ``lit-rlhf sweep`` wrote.

The page answers the questions a run is for: did the policy over-optimise the proxy reward model (gold reward
against √KL, Gao et al. 2022), which method buys the most gold reward per nat of KL (the frontier, with best-of-n
as the baseline), did it hack the reward (length, sycophancy, format, repetition), and how good were the reward
models. Figures are written as PNG files and embedded as data URIs, so ``index.html`` can be mailed or archived
alone. Each figure is skipped, with a one-line reason on the page, when no folder has its data.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from lit_rlhf.errors import ConfigError, DataError
from lit_rlhf.phases.ppo_health import HealthLimits
from lit_rlhf.run_folder import (
    EVAL_SAMPLES_FILE,
    LOG_FILE,
    PAIRED_FILE,
    PROXY_SCORER,
    SUMMARY_FILE,
    SWEEP_FILE,
    format_cell,
    format_paired,
    gao_points,
    group_cells,
    output_to,
    with_errors,
)
from lit_rlhf.uncertainty import GaoFit

EVAL_MARKERS = ("eval/gold/reward", "eval/response/length_mean")
"""A ``metrics.csv`` row with either value is a held-out evaluation; the other rows are training steps."""
HACKING = {"length_ratio": "length ratio", "sycophancy_rate": "sycophancy rate", "format_rate": "format rate",
           "repetition_rate": "repetition rate"}
SAMPLES_PER_RUN = 4
DESCRIPTIONS = {
    "overoptimisation": "Gold (left) and training reward (right: the score of what each run was trained on, its "
                        "reward model or function, named in the legend) of the held-out evaluations during training "
                        "against √KL to the reference. Training reward rising while gold reward falls as KL grows is "
                        "reward hacking (Gao et al. 2022); a larger β stops the curve earlier.",
    "frontier": "Final gold (left) and proxy (right: the evaluation's reward model, named on the axis) reward "
                "against √KL for every trial, stage and best-of-n "
                "baseline, and the KL-regularised optimum π* of the reward model where the pipeline estimated it. Up "
                "and to the left is better: more reward for less drift from the reference. A policy's gold below "
                "π*'s is optimisation error; π*'s gold below the best is the reward model's error.",
    "hacking": "Exploits of the proxy reward during training: answer length relative to the reference, "
               "sycophantic and format-gaming answers, repetition. A rising curve is the policy learning the exploit.",
    "ppo_health": "Every PPO run's iterations: the approximate KL of each iteration's updates and the share of clipped "
                  "tokens with the limits a healthy run stays under (dashed), the rollouts' KL to the reference, "
                  "the critic's explained variance and value loss. Breaches are named in the summary (health.json).",
    "scaling_law": "Each sweep's gold reward gained over the reference policy against d = √KL, its trials (circles) "
                   "and best-of-n (triangles), with Gao et al. (2022)'s forms fitted: RL d(α − β ln d), best-of-n "
                   "d(α − β d); the legend has the coefficients and R².",
    "settings": "Each setting of a sweep over its seeds: mean final gold (left) and proxy (right) reward with their "
                "95 % intervals over seeds, against the mean √KL to the reference. For a sweep over reward models "
                "(sweeps/mitigations.yaml) one point per mitigation at the same β: a mitigation that works sits above "
                "the single reward model's gold with an interval that does not reach it, usually at a smaller KL.",
    "reward_model": "Held-out pairwise accuracy of each reward model against the proxy and gold labels, and the "
                    "correlation of its score with answer length (near 0 is good); right: validation accuracy.",
}
DASHBOARD_SECTIONS = {
    "Overoptimisation": ("eval/gold/reward", "eval/proxy/reward", "eval/objective/kl"),
    "Hacking": ("eval/hacking/length_ratio", "eval/hacking/sycophancy_rate", "eval/hacking/format_rate",
                "eval/hacking/repetition_rate", "eval/gold/proxy_gap"),
    "PPO": ("objective/scores", "objective/kl", "kl/beta", "policy/clipfrac", "loss/value"),
    "DPO": ("rewards/margins", "rewards/accuracies", "val/loss"),
    "Reward model": ("val/accuracy", "val/gold/accuracy", "val/reward/length_corr"),
}


@dataclass
class Curve:
    """One training run's logged rows (each a metric → value mapping with its ``step``)."""

    label: str
    rows: list[dict[str, float]]
    reward: str | None = None
    """What a PPO run was trained on (its ``reward_model``: an export, ``gold`` or ``module:function``), which its
    logged ``eval/proxy/reward`` is the score of."""


@dataclass
class RunFolder:
    """What one pipeline or sweep folder holds, read once so every plot and table sees the same data."""

    kind: str  # "pipeline" | "sweep"
    name: str
    summary: list[dict[str, Any]] = field(default_factory=list)
    roles: dict[str, str | None] = field(default_factory=dict)  # pipeline stage → done.json role
    phases: dict[str, str] = field(default_factory=dict)  # pipeline stage → ppo, dpo, sft, reward or done.json kind
    phase: str = ""  # a sweep's phase
    trials: list[dict[str, Any]] = field(default_factory=list)
    baselines: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, Any] | None = None
    gao: list[dict[str, Any]] = field(default_factory=list)  # a sweep's fitted Gao et al. forms
    groups: list[dict[str, Any]] = field(default_factory=list)  # a sweep's settings over their seeds
    curves: list[Curve] = field(default_factory=list)  # policy optimisation runs with held-out evaluations
    ppo_iterations: list[Curve] = field(default_factory=list)  # PPO runs' per-iteration rows
    rm_curves: list[Curve] = field(default_factory=list)  # reward-model runs with validation rows
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # stage or trial → sampled answers
    paired: list[dict[str, Any]] = field(default_factory=list)  # a pipeline's paired.json, a sweep's `paired`


@dataclass
class Report:
    folders: list[RunFolder]
    out_dir: Path
    plots: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    html_path: Path | None = None


class _NothingToPlot(Exception):
    """A figure's data is in none of the folders; the message says what is missing."""


# --- reading the folders -------------------------------------------------------------------------------------------


def load_folder(path: str | Path) -> RunFolder:
    path = Path(path)
    if (path / SWEEP_FILE).is_file():
        return _load_sweep(path)
    if (path / SUMMARY_FILE).is_file():
        return _load_pipeline(path)
    raise ConfigError(f"{path}: no summary.json or sweep.json (run lit-rlhf pipeline or lit-rlhf sweep first)")


def _read_json(path: Path, expected: type) -> Any:
    """A pipeline's or sweep's own JSON file, or a one-line error where it was cut short or edited into another
    shape (a run killed while writing it, say): run the command again to rewrite it."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error}): run the command that wrote it again") from None
    if not isinstance(value, expected):
        raise DataError(f"{path}: expected a JSON {'list' if expected is list else 'object'}: run the command that "
                        "wrote it again")
    return value


def _load_pipeline(path: Path) -> RunFolder:
    folder = RunFolder("pipeline", path.resolve().name, summary=_read_json(path / SUMMARY_FILE, list))
    if (path / PAIRED_FILE).is_file():
        folder.paired = _read_json(path / PAIRED_FILE, list)
    for row in folder.summary:
        stage = str(row.get("stage"))
        done = json.loads((path / stage / "done.json").read_text()) if (path / stage / "done.json").is_file() else {}
        folder.roles[stage], folder.phases[stage] = done.get("role"), done.get("kind", "")
        log = _last_log(path / stage)
        if log is None:
            continue
        hparams = _read_hparams(log.parent / "hparams.yaml")
        phase = folder.phases[stage] = _phase_of(hparams)
        beta = _beta_of(hparams)
        label = stage if beta is None or phase not in ("ppo", "dpo") else f"{stage} (β={beta:g})"
        if phase == "reward" or done.get("role") == "reward_model":
            folder.rm_curves.append(Curve(stage, _metric_rows(log, ("val/accuracy",))))
        elif phase in ("ppo", "dpo"):
            folder.curves.append(Curve(label, _metric_rows(log, EVAL_MARKERS), _reward_of(hparams)))
            if phase == "ppo":
                folder.ppo_iterations.append(Curve(label, _metric_rows(log, ("policy/approxkl",))))
    for sample in _jsonl(path / EVAL_SAMPLES_FILE):
        stage_samples = folder.samples.setdefault(str(sample.get("stage")), [])
        if len(stage_samples) < SAMPLES_PER_RUN:
            stage_samples.append(sample)
    return folder


def _load_sweep(path: Path) -> RunFolder:
    spec = _read_json(path / SWEEP_FILE, dict)
    folder = RunFolder("sweep", str(spec.get("name") or path.resolve().name), phase=str(spec.get("phase", "")),
                       trials=spec.get("trials") or [], baselines=spec.get("baselines") or [],
                       reference=spec.get("reference"), gao=spec.get("gao") or [], groups=spec.get("groups") or [],
                       paired=spec.get("paired") or [])
    for trial in folder.trials:
        log_dir = path / trial["log_dir"] if trial.get("log_dir") else None
        label = _params_label(trial.get("params") or {}) or str(trial.get("trial"))
        reward = _reward_of(_read_hparams(log_dir / "hparams.yaml")) if log_dir else None
        folder.curves.append(Curve(label, _metric_rows(log_dir / "metrics.csv", EVAL_MARKERS) if log_dir else [],
                                   reward))
        if log_dir and folder.phase == "ppo":
            folder.ppo_iterations.append(Curve(label, _metric_rows(log_dir / "metrics.csv", ("policy/approxkl",))))
        if log_dir and (samples := _jsonl(log_dir / "samples.jsonl")[-SAMPLES_PER_RUN:]):
            folder.samples[str(trial.get("trial"))] = samples
    return folder


def _metric_rows(path: Path, markers: tuple[str, ...]) -> list[dict[str, float]]:
    """The CSVLogger rows with a value in one of ``markers``, as floats (CSVLogger leaves the other cells empty)."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if any(row.get(marker) for marker in markers)]
    return [{key: float(value) for key, value in row.items() if key and value not in ("", None)} for row in rows]


class _TolerantLoader(yaml.SafeLoader):
    """Reads ``hparams.yaml`` even where Lightning wrote Python tags (tuples, enums): their plain value is kept."""


def _untagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode) else node.value


_TolerantLoader.add_multi_constructor("", _untagged)


def _read_hparams(path: Path) -> dict[str, Any]:
    try:
        hparams = yaml.load(path.read_text(), Loader=_TolerantLoader) if path.is_file() else {}
    except yaml.YAMLError:
        return {}
    return hparams if isinstance(hparams, dict) else {}


def _beta_of(hparams: dict[str, Any]) -> float | None:
    """β of a DPO run, or PPO's starting β (``kl_control.beta``; ``init_kl_coef`` in runs before the groups)."""
    kl_control = hparams.get("kl_control")
    candidates = (kl_control.get("beta") if isinstance(kl_control, dict) else None, hparams.get("init_kl_coef"),
                  hparams.get("beta"))
    return next((value for value in candidates if isinstance(value, (int, float))), None)


def _reward_of(hparams: dict[str, Any]) -> str | None:
    """A PPO run's ``reward_model`` as a short name: an export's last two path parts (``rm/hf``), else as given."""
    reward = hparams.get("reward_model")
    if not isinstance(reward, str):
        return None
    parts = Path(reward).parts
    return "/".join(parts[-2:]) if len(parts) > 1 and ":" not in reward else reward


def _phase_of(hparams: dict[str, Any]) -> str:
    class_path = str(hparams.get("_class_path", ""))
    if "PPOModule" in class_path or "kl_control" in hparams or "init_kl_coef" in hparams:
        return "ppo"
    if "DPOModule" in class_path or "loss_type" in hparams:
        return "dpo"
    return "reward" if "RewardModelModule" in class_path else "sft"


def _last_log(stage_dir: Path) -> Path | None:
    """The newest ``<logger>/version_<N>/metrics.csv`` of a stage (``version_10`` after ``version_9``)."""

    def version(path: Path) -> tuple[str, int]:
        suffix = path.parent.name.rpartition("_")[2]
        return path.parent.parent.name, int(suffix) if suffix.isdigit() else -1

    logs = sorted(stage_dir.glob("*/version_*/metrics.csv"), key=version)
    return logs[-1] if logs else None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The readable rows of a JSON-lines file; a run killed mid-write leaves a partial last line, skipped here."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [row for row in rows if isinstance(row, dict)]


def _params_label(params: dict[str, Any]) -> str:
    """``β=0.3`` for a sweep over the KL coefficient alone, else ``key=value, ...`` with the short keys."""
    short = {key.rpartition(".")[2]: value for key, value in params.items()}
    if len(short) == 1 and next(iter(short)) in ("beta", "init_kl_coef"):
        return f"β={_param_text(next(iter(short.values())))}"
    return ", ".join(f"{key}={_param_text(value)}" for key, value in short.items())


def _param_text(value: Any) -> str:
    """A setting as a label: a number briefly, a path into a pipeline folder by its stage (``rm_worst`` for
    ``runs/pipeline/rm_worst/ensemble``)."""
    if isinstance(value, float):
        return f"{value:g}"
    path = Path(str(value))
    return path.parent.name if len(path.parts) > 2 and path.name in ("hf", "ensemble") else str(value)


# --- the figures ---------------------------------------------------------------------------------------------------


def _labelled(folder: RunFolder, label: str, folders: list[RunFolder]) -> str:
    return f"{folder.name}: {label}" if len(folders) > 1 else label


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    return path


def _root_kl(kl: float | None) -> float | None:
    """√KL with the estimator's small negative values clipped to 0."""
    return None if kl is None else math.sqrt(max(kl, 0.0))


def _policy_curves(folders: list[RunFolder]) -> list[tuple[str, str, Curve]]:
    """Every policy run with its legend label and a colour that stays the same in every panel and figure."""
    curves = [(folder, curve) for folder in folders for curve in folder.curves]
    return [(f"C{index % 10}", _labelled(folder, curve.label, folders), curve)
            for index, (folder, curve) in enumerate(curves)]


def plot_overoptimisation(folders: list[RunFolder], out_dir: Path) -> Path:
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    axes = dict(zip(("eval/gold/reward", "eval/proxy/reward"), figure.subplots(1, 2)))
    drawn = False
    for colour, label, curve in _policy_curves(folders):
        for metric, ax in axes.items():
            points = [(_root_kl(row["eval/objective/kl"]), row[metric]) for row in curve.rows
                      if "eval/objective/kl" in row and metric in row]
            if metric == "eval/proxy/reward" and curve.reward:
                label = f"{label} · {curve.reward}"
            if points:  # in training order; the final evaluation larger
                ax.plot(*zip(*points), marker=".", color=colour, label=label, linewidth=1, alpha=0.8)
                ax.plot(*points[-1], marker="o", color=colour)
                drawn = True
    if not drawn:
        raise _NothingToPlot("no metrics.csv has evaluation rows with eval/objective/kl and a reward")
    for (metric, ax), title in zip(axes.items(), ("gold reward", "training reward (each run's own, in the legend)")):
        ax.set(xlabel="√KL to the reference (√nats)", ylabel=title.partition(" (")[0], title=f"{title} over training")
        if ax.lines:
            ax.legend(fontsize=7)
    _drop_empty_axes(figure)
    return _save(figure, out_dir / "overoptimisation.png")


def _drop_empty_axes(figure: Figure) -> None:
    """Take out the panels nothing was drawn on (the gold panels of runs on your own data, which has no gold)."""
    for ax in list(figure.axes):
        if not ax.lines and not ax.patches:
            figure.delaxes(ax)


PPO_HEALTH_PANELS = {"policy/approxkl": HealthLimits.approxkl, "policy/clipfrac": HealthLimits.clipfrac,
                     "objective/kl": None, "value/explained_variance": None, "loss/value": None}
"""The PPO-health figure's panels and the limit drawn on each (:class:`lit_rlhf.phases.ppo_health.HealthLimits`)."""


def plot_ppo_health(folders: list[RunFolder], out_dir: Path) -> Path:
    runs = [(folder, curve) for folder in folders for curve in folder.ppo_iterations if curve.rows]
    if not runs:
        raise _NothingToPlot("no PPO run logged per-iteration metrics")
    figure = Figure(figsize=(14, 3.4), layout="constrained")
    for ax, (metric, limit) in zip(figure.subplots(1, len(PPO_HEALTH_PANELS)), PPO_HEALTH_PANELS.items()):
        for colour, (folder, curve) in enumerate(runs):
            points = [value for row in curve.rows if (value := row.get(metric)) is not None]
            ax.plot(range(len(points)), points, color=f"C{colour % 10}", linewidth=1,
                    label=_labelled(folder, curve.label, folders))
        if limit is not None:
            ax.axhline(limit, color="red", linestyle="--", linewidth=1)
        ax.set(xlabel="iteration", title=metric)
    figure.axes[0].legend(fontsize=6)
    return _save(figure, out_dir / "ppo_health.png")


def plot_scaling_law(folders: list[RunFolder], out_dir: Path) -> Path:
    figure = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = figure.subplots()
    for colour, folder in enumerate(folder for folder in folders if folder.gao and folder.reference):
        points_by_form = gao_points({"trials": folder.trials, "baselines": folder.baselines},
                                    folder.reference["gold_reward"])
        for form, marker in (("rl", "o"), ("bon", "^")):
            points = points_by_form[form]
            fit = next((fit for fit in folder.gao if fit["form"] == form), None)
            if not points or fit is None:
                continue
            ax.plot(*zip(*points), marker=marker, linestyle="none", color=f"C{colour % 10}", alpha=0.7)
            grid = [max(d for d, _ in points) * step / 50 for step in range(51)]
            predicted = GaoFit(**fit).predict(grid)
            ax.plot(grid, predicted, linestyle="-" if form == "rl" else "--", color=f"C{colour % 10}",
                    label=f"{_labelled(folder, form, folders)}: α={fit['alpha']:.2f}, β={fit['beta']:.2f}, "
                          f"R²={format_cell(fit['r2'])}")
    if not ax.lines:
        raise _NothingToPlot("no sweep folder has fitted Gao et al. forms (run a sweep with lit-rlhf sweep)")
    ax.axhline(0, color="gray", linewidth=0.5)
    ax.set(xlabel="d = √KL to the reference (√nats)", ylabel="gold reward gain over the reference",
           title="gold gain against √KL, with Gao et al.'s fits")
    ax.legend(fontsize=7)
    return _save(figure, out_dir / "scaling_law.png")


PIPELINE_GROUPS = {"ppo": ("PPO", "o"), "dpo": ("DPO family", "s"), "best_of_n": ("best-of-n", "^"),
                   "optimum": ("π* (KL-regularised optimum)", "*")}
"""A pipeline stage's phase → its frontier legend entry and marker; other policies are diamonds."""


@dataclass
class _Series:
    """Points of the frontier drawn alike: (KL, gold, proxy, annotation)."""

    label: str
    marker: str
    connect: bool
    points: list[tuple[float | None, float | None, float | None, str]]


def _point(row: dict[str, Any], note: str) -> tuple[float | None, float | None, float | None, str]:
    return row.get("kl"), row.get("gold_reward"), row.get("proxy_reward"), note


def _frontier_series(folder: RunFolder) -> list[_Series]:
    if folder.kind == "sweep":
        method = "PPO" if folder.phase == "ppo" else (folder.phase or "DPO").upper()
        done = [(trial["metrics"], curve.label) for trial, curve in zip(folder.trials, folder.curves)
                if trial.get("status") == "done" and trial.get("metrics")]
        series = [_Series(f"{method} trials", "o" if folder.phase == "ppo" else "s", True,
                          sorted((_point(metrics, label) for metrics, label in done), key=lambda p: p[0] or 0.0))]
        series.append(_Series("best-of-n", "^", True, [_point(row, f"n={row.get('n')}") for row in
                                                      sorted(folder.baselines, key=lambda row: row.get("n") or 0)]))
        if folder.reference:
            reference = {**folder.reference, "kl": folder.reference.get("kl") or 0.0}
            series.append(_Series(_reference_name(reference), "*", False, [_point(reference, "")]))
        return series
    series: dict[str, _Series] = {}
    for row in _policy_rows(folder):
        stage = str(row.get("stage"))
        label, marker = PIPELINE_GROUPS.get(folder.phases.get(stage, ""), ("other policies", "D"))
        series.setdefault(label, _Series(label, marker, False, [])).points.append(_point(row, stage))
    return list(series.values())


def _reference_name(reference: dict[str, Any]) -> str:
    """``reference (sft)`` when the sweep names the stage its reference policy came from."""
    stage = reference.get("stage")
    return f"reference ({stage})" if stage and stage != "reference" else "reference"


def _policy_rows(folder: RunFolder) -> list[dict[str, Any]]:
    """A pipeline's rows of trained policies, baselines and the optimum π* (not the untrained ``init``, whose KL of
    many nats to the reference would squeeze the frontier into a corner)."""
    return [row for row in folder.summary
            if folder.roles.get(str(row.get("stage"))) in ("policy", "baseline", "yardstick")]


def plot_frontier(folders: list[RunFolder], out_dir: Path) -> Path:
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    gold_ax, proxy_ax = figure.subplots(1, 2)
    labelled, seen = [], set()
    for folder in folders:
        for series in _frontier_series(folder):
            if (series.label, tuple(series.points)) not in seen:  # sweeps of one pipeline share baseline, reference
                seen.add((series.label, tuple(series.points)))
                labelled.append((_labelled(folder, series.label, folders), series))
    for colour, (label, series) in enumerate(labelled):  # one colour per series in both panels
        for ax, index in ((gold_ax, 1), (proxy_ax, 2)):
            points = [(_root_kl(p[0]), p[index], p[3]) for p in series.points if None not in (p[0], p[index])]
            if not points:
                continue
            xs, ys, notes = zip(*points)
            ax.plot(xs, ys, marker=series.marker, linestyle="-" if series.connect else "none",
                    color=f"C{colour % 10}", label=label)
            for x, y, note in points:
                ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if not gold_ax.lines and not proxy_ax.lines:
        raise _NothingToPlot("no trial, stage or baseline has a final KL with a gold or proxy reward")
    scorers = sorted({str(row[PROXY_SCORER]) for folder in folders for row in folder.summary if row.get(PROXY_SCORER)})
    proxy = f"proxy reward ({' and '.join(scorers)})" if scorers else "proxy reward"
    for ax, title in ((gold_ax, "gold reward"), (proxy_ax, proxy)):
        ax.set(xlabel="√KL to the reference (√nats)", ylabel=f"final {title}", title=f"{title}–KL frontier")
        if ax.lines:
            ax.legend(fontsize=7)
    _drop_empty_axes(figure)
    return _save(figure, out_dir / "frontier.png")


def plot_hacking(folders: list[RunFolder], out_dir: Path) -> Path:
    figure = Figure(figsize=(14, 3.8), layout="constrained")
    axes = dict(zip(HACKING, figure.subplots(1, len(HACKING))))
    for colour, label, curve in _policy_curves(folders):
        for key, ax in axes.items():
            last_step = max((row.get("step", 0.0) for row in curve.rows), default=0.0) or 1.0
            points = [(row.get("step", 0.0) / last_step, row[f"eval/hacking/{key}"]) for row in curve.rows
                      if f"eval/hacking/{key}" in row]
            if points:
                ax.plot(*zip(*points), marker=".", color=colour, label=label)
    if not any(ax.lines for ax in axes.values()):
        raise _NothingToPlot("no metrics.csv has eval/hacking/* columns")
    for key, ax in axes.items():
        ax.set(xlabel="share of training steps", title=HACKING[key])
    next(ax for ax in axes.values() if ax.lines).legend(fontsize=7)
    return _save(figure, out_dir / "hacking.png")


def plot_settings(folders: list[RunFolder], out_dir: Path) -> Path:
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    gold_ax, proxy_ax = figure.subplots(1, 2)
    groups = [(folder, group) for folder in folders for group in folder.groups if group.get("seeds", 0) > 1]
    for colour, (folder, group) in enumerate(groups):
        label = _labelled(folder, _params_label(group["params"]), folders)
        x = _root_kl(group["kl"]["mean"]) if "kl" in group else None
        for ax, metric in ((gold_ax, "gold_reward"), (proxy_ax, "proxy_reward")):
            if x is None or metric not in group:
                continue
            mean, interval = group[metric]["mean"], group[metric]["ci95"]
            error = [[mean - interval[0]], [interval[1] - mean]] if interval else None
            ax.errorbar([x], [mean], yerr=error, marker="o", capsize=3, color=f"C{colour % 10}", label=label)
    if not gold_ax.lines and not proxy_ax.lines:
        raise _NothingToPlot("no sweep has a setting run under more than one seed")
    for ax, title in ((gold_ax, "gold reward"), (proxy_ax, "proxy reward")):
        ax.set(xlabel="mean √KL to the reference (√nats)", ylabel=f"final {title}, 95 % interval over seeds",
               title=f"each setting's {title} over its seeds")
        if ax.lines:
            ax.legend(fontsize=7)
    _drop_empty_axes(figure)
    return _save(figure, out_dir / "settings.png")


def plot_reward_model(folders: list[RunFolder], out_dir: Path) -> Path:
    rows = [(_labelled(folder, str(row.get("stage")), folders), row) for folder in folders for row in folder.summary
            if folder.roles.get(str(row.get("stage"))) == "reward_model" or "accuracy" in row]
    if not rows:
        raise _NothingToPlot("no reward-model stage in a pipeline summary.json")
    figure = Figure(figsize=(11, 4), layout="constrained")
    bars_ax, curve_ax = figure.subplots(1, 2)
    keys = [key for key in ("accuracy", "gold_accuracy", "length_corr")
            if any(row.get(key) is not None for _, row in rows)]
    width = 0.8 / max(len(keys), 1)
    for offset, key in enumerate(keys):
        values = [row.get(key) if row.get(key) is not None else math.nan for _, row in rows]
        bars_ax.bar([i + (offset - (len(keys) - 1) / 2) * width for i in range(len(rows))], values, width, label=key)
    bars_ax.set_xticks(range(len(rows)), [label for label, _ in rows], rotation=20)
    bars_ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    bars_ax.set(title="held-out reward models (dotted: chance)", ylim=(min(0.0, bars_ax.get_ylim()[0]), 1.0))
    bars_ax.legend(fontsize=7)
    for folder in folders:
        for curve in folder.rm_curves:
            if curve.rows:
                steps = [row.get("step", 0.0) for row in curve.rows]
                accuracies = [row["val/accuracy"] for row in curve.rows]
                curve_ax.plot(steps, accuracies, marker=".", label=_labelled(folder, curve.label, folders))
    curve_ax.set(xlabel="step", ylabel="val/accuracy", title="validation accuracy")
    if curve_ax.lines:
        curve_ax.legend(fontsize=7)
    return _save(figure, out_dir / "reward_model.png")


PLOTS = {"overoptimisation": plot_overoptimisation, "frontier": plot_frontier, "scaling_law": plot_scaling_law,
         "ppo_health": plot_ppo_health, "hacking": plot_hacking, "settings": plot_settings,
         "reward_model": plot_reward_model}


# --- tables and the page -------------------------------------------------------------------------------------------


def summary_rows(folder: RunFolder) -> list[dict[str, Any]]:
    """A pipeline's summary rows; for a sweep one row per trial, then the baselines and the reference."""
    if folder.kind == "pipeline":
        return folder.summary
    rows = [{"trial": trial.get("trial"), **(trial.get("params") or {}), "status": trial.get("status"),
             "seconds": trial.get("seconds"), **(trial.get("metrics") or {})} for trial in folder.trials]
    rows += [{"trial": f"best_of_n (n={row.get('n')})", "status": "baseline",
              **{key: value for key, value in row.items() if key not in ("stage", "n")}} for row in folder.baselines]
    if folder.reference:
        rows.append({"trial": _reference_name(folder.reference), "status": "reference",
                     **{key: value for key, value in folder.reference.items() if key != "stage"}})
    return rows


def _hacking_rows(folders: list[RunFolder]) -> list[dict[str, Any]]:
    rows = []
    for folder in folders:
        if folder.kind == "sweep":
            named = [(curve.label, trial.get("metrics") or {}) for trial, curve in zip(folder.trials, folder.curves)]
        else:
            named = [(str(row.get("stage")), row) for row in folder.summary]
        rows += [{"run": _labelled(folder, name, folders), **{key: row.get(key) for key in (*HACKING, "proxy_gap")}}
                 for name, row in named if any(row.get(key) is not None for key in HACKING)]
    return rows


def _html_table(rows: list[dict[str, Any]]) -> str:
    """Rows as an HTML table of the columns that have a value in some row (no column of dashes)."""
    columns = [column for column in dict.fromkeys(key for row in rows for key in row)
               if any(row.get(column) is not None for row in rows)]
    head = "".join(f"<th>{html.escape(column)}</th>" for column in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(row.get(column)))}</td>" for column in columns) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}img{max-width:100%}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px}
td{white-space:pre-wrap;vertical-align:top}.skip{color:#a33}.note{color:#555}"""


CAPTIONS_WITHOUT_GOLD = {
    "overoptimisation": "The training reward of the held-out evaluations during training (each run's own reward model "
                        "or function, named in the legend) against √KL to the reference. These runs have no gold "
                        "reward (only the embedded world has one), so whether the policy gamed its reward is not "
                        "measured here: the hacking metrics below are the signs to read.",
    "frontier": "Final proxy reward (the evaluation's reward model, named on the axis) against √KL for every stage and "
                "best-of-n baseline. These runs have no gold reward, so the frontier shows what the reward model "
                "gave for each nat of drift, not what was gained.",
    "settings": "Each setting of a sweep over its seeds: mean final proxy reward with its 95 % interval over seeds, "
                "against the mean √KL to the reference. These runs have no gold reward, so whether a setting "
                "resisted the reward model's exploits is not measured here.",
    "reward_model": "Held-out pairwise accuracy of each reward model and the correlation of its score with answer "
                    "length (near 0 is good); right: validation accuracy. Without a gold reward there is no gold "
                    "accuracy.",
}
"""The captions of the figures with gold panels, for runs without gold (your own data): the panels are left out."""


def _has_gold(folder: RunFolder) -> bool:
    rows = [*folder.summary, *(trial.get("metrics") or {} for trial in folder.trials), *folder.baselines]
    curves = [row for curve in folder.curves for row in curve.rows]
    return any(row.get("gold_reward") is not None for row in rows) or any("eval/gold/reward" in r for r in curves)


def render_html(report: Report) -> str:
    names = ", ".join(folder.name for folder in report.folders)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>lit-rlhf report: {html.escape(names)}"
             f"</title><style>{STYLE}</style></head><body><h1>lit-rlhf report: {html.escape(names)}</h1>"]
    has_gold = any(_has_gold(folder) for folder in report.folders)
    for name, description in DESCRIPTIONS.items():
        if not has_gold and name in CAPTIONS_WITHOUT_GOLD:
            description = CAPTIONS_WITHOUT_GOLD[name]
        parts.append(f"<h2>{name.replace('_', ' ')}</h2><p class='note'>{html.escape(description)}</p>")
        if name in report.plots:
            data = base64.b64encode(report.plots[name].read_bytes()).decode("ascii")
            parts.append(f"<img alt='{name}' src='data:image/png;base64,{data}'>")
        else:
            parts.append(f"<p class='skip'>Skipped {name}: {html.escape(report.skipped[name])}.</p>")
        if name == "hacking" and (hacking := _hacking_rows(report.folders)):
            parts.append("<h3>final hacking metrics</h3>" + _html_table(hacking))
    parts.append("<h2>summary</h2>")
    for folder in report.folders:
        rows = [with_errors(row) for row in summary_rows(folder)]
        parts.append(f"<h3>{html.escape(folder.name)} ({folder.kind})</h3>" + _html_table(rows))
        if folder.groups:
            parts.append("<h4>each setting over its seeds: mean [95 % interval]</h4>" + _html_table(
                [group_cells(group) | {key: _param_text(value) for key, value in group["params"].items()}
                 for group in folder.groups]))
        if folder.paired:
            parts.append(f"<pre>{html.escape(format_paired(folder.paired))}</pre>")
    if any(folder.samples for folder in report.folders):
        parts.append("<h2>sampled answers</h2>")
    for folder in report.folders:
        for run, samples in folder.samples.items():
            parts.append(f"<h3>{html.escape(_labelled(folder, run, report.folders))}</h3>" + _html_table(samples))
    return "\n".join(parts) + "</body></html>\n"


def publish_report(run_dir: str | Path) -> Report:
    """A pipeline folder's report in ``run_dir/report/``, logged to a W&B ``report`` run (W&B's own lines go to
    ``report/log.txt``): what ``lit-rlhf pipeline`` does once a folder's summary is written."""
    report = build_report([run_dir])
    with output_to(report.out_dir / LOG_FILE):
        publish_to_wandb(report)
    print(f"[pipeline] report: {report.html_path}")
    return report


def build_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> Report:
    """Read the folders, draw every figure that has data and write ``index.html``; never touches W&B."""
    folders = [load_folder(path) for path in run_dirs]
    report = Report(folders, Path(out_dir) if out_dir is not None else Path(run_dirs[0]) / "report")
    report.out_dir.mkdir(parents=True, exist_ok=True)
    for name, plot in PLOTS.items():
        try:
            report.plots[name] = plot(folders, report.out_dir)
        except _NothingToPlot as reason:
            report.skipped[name] = str(reason)
    report.html_path = report.out_dir / "index.html"
    report.html_path.write_text(render_html(report), encoding="utf-8")
    return report


# --- Weights & Biases ----------------------------------------------------------------------------------------------


def log_report_to_wandb(report: Report, run: Any = None) -> None:
    """Log the figures and the summary table to ``run`` (default: the active run); without a run, nothing."""
    import wandb

    run = run if run is not None else wandb.run
    if run is None:
        return
    rows = [{"folder": folder.name, **row} for folder in report.folders for row in summary_rows(folder)]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    payload: dict[str, Any] = {f"report/{name}": wandb.Image(str(path)) for name, path in report.plots.items()}
    payload["report/summary"] = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
    run.log(payload)


def publish_to_wandb(report: Report, project: str = "lit-rlhf") -> None:
    """Log the report to the active W&B run, else to a new ``report`` run (offline unless ``WANDB_API_KEY`` is
    set, as the phases log); nothing when ``WANDB_MODE=disabled``."""
    import wandb

    if os.environ.get("WANDB_MODE") == "disabled":
        return
    if wandb.run is not None:
        log_report_to_wandb(report, wandb.run)
        return
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    with wandb.init(project=project, job_type="report", mode=mode, dir=str(report.out_dir)) as run:
        log_report_to_wandb(report, run)
    # The run's settings outlive it in W&B's process-wide state: without a teardown the next phase's offline
    # WandbLogger in this process (`pipeline --seeds`' next seed) asks for an API key.
    wandb.teardown()


def save_dashboard(project: str, entity: str | None = None, name: str = "lit-rlhf") -> str:
    """Save a W&B workspace with one section per question (over-optimisation, hacking, PPO, DPO, reward model) to
    ``entity/project``; returns its URL."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError:
        install = 'pip install "lit-rlhf[sweeps]"'
        raise ConfigError(f"lit-rlhf dashboard needs the wandb-workspaces package: {install}") from None
    if not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("lit-rlhf dashboard needs WANDB_API_KEY: a saved workspace lives on a W&B server")
    sections = [ws.Section(name=title, panels=[wr.LinePlot(title=metric, x="Step", y=[metric]) for metric in metrics],
                           is_open=True) for title, metrics in DASHBOARD_SECTIONS.items()]
    sections[0].panels.append(wr.ScatterPlot(title="gold reward against KL", x="eval/objective/kl",
                                             y="eval/gold/reward"))
    if entity is None:
        import wandb

        entity = os.environ.get("WANDB_ENTITY") or wandb.Api().default_entity
    workspace = ws.Workspace(entity=entity, project=project, name=name, sections=sections)
    workspace.save()
    return workspace.url
