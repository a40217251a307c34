"""``lit-rlhf sweep FILE``: hyperparameter sweeps of one phase, described by a W&B sweep file.

A sweep file is W&B's own format (``method``, ``metric``, ``parameters``, ``command`` with ``${args}``), so the
same file runs two ways:

- **Online** (``WANDB_API_KEY`` set): the file is handed to W&B as it is (``wandb.sweep``) and W&B's own agent
  (``wandb agent``) runs its trials; W&B's sweep engine picks them (grid, random, bayes).
- **Offline** (no key, or ``online=False``): grid and random sweeps run here, one subprocess per trial, the
  command expanded exactly as W&B's agent expands it (its ``create_sweep_command_args``). Each trial writes
  ``OUT/<trial>/`` (its logs and export, through ``LIT_RLHF_RUNS_DIR``) and ``OUT/<trial>/done.json``; a rerun
  trains again only the trials whose command or inputs changed, as the pipeline skips a finished stage. ``bayes``
  needs W&B's server and is refused. W&B's local engine (the ``sweeps`` package) pins numpy < 2, so grid and random
  are drawn here.

A sweep's trials start from the main job's SFT policy and reward model: the command names them under the
pipeline's output folder (``runs/pipeline/sft/hf``), and the sweep first runs, or reuses, the pipeline stages it
names, in its command or its parameters' values (a sweep over reward models), and those the pipeline's evaluation
needs. Offline, every trained trial's policy is then measured with the
pipeline's held-out evaluation (:class:`lit_rlhf.held_out.HeldOutEvaluation`: the same sampling noise, reference
and reward model as the pipeline's summary, on the world's development prompts, since a sweep chooses settings and
the test prompts are for reporting), and so is best-of-n from the reference at n = 1…16, the
baseline of the reward–KL frontier. Under a ``seed_everything`` parameter each setting gets its measurements over
seeds (``groups``) and its paired difference to the first setting, seed by seed (``paired``). ``OUT/sweep.json``
holds it all and ``lit-rlhf report OUT`` draws it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lit_rlhf import RUNS_DIR_VARIABLE
from lit_rlhf.errors import ConfigError
from lit_rlhf.held_out import HeldOutEvaluation
from lit_rlhf.pipeline import run_stages
from lit_rlhf.pipeline_run import FitPhase, PipelineRun, start_run
from lit_rlhf.pipeline_spec import read_yaml_file
from lit_rlhf.run_folder import (
    DONE_FILE,
    GROUP_METRICS,
    MADE_WITH,
    PAIRED_METRICS,
    SWEEP_FILE,
    format_cell,
    format_paired,
    format_table,
    gao_points,
    group_cells,
    last_line,
    made_with,
    write_atomically,
)
from lit_rlhf.selection import best_of_n_kl
from lit_rlhf.uncertainty import fit_gao, interval_over_seeds

METHODS = ("grid", "random", "bayes")
DISTRIBUTIONS = ("uniform", "log_uniform_values", "int_uniform")
"""Distributions of a random sweep's parameters drawn offline (W&B's names); W&B's server knows more."""
BEST_OF_N = (1, 2, 4, 8, 16)
BASELINES_FILE = "baselines.json"


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read and check a W&B sweep file: a ``method``, ``parameters`` each with ``value``, ``values`` or a
    distribution, and a ``command`` (a list, with ``${args}`` where the parameters go)."""
    path = Path(path)
    spec = read_yaml_file(path, "sweep")
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping (a W&B sweep configuration)")
    if spec.get("method") not in METHODS:
        raise ConfigError(f"{path}: method must be one of {', '.join(METHODS)}, got {spec.get('method')!r}")
    parameters = spec.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise ConfigError(f"{path}: 'parameters' must map each parameter to its values")
    for name, parameter in parameters.items():
        _check_parameter(path, name, parameter)
    command = spec.get("command")
    if not isinstance(command, list) or "${args}" not in command:
        raise ConfigError(f"{path}: 'command' must be a list that contains ${{args}}, where W&B puts the parameters")
    return spec


def _check_parameter(path: Path, name: str, parameter: Any) -> None:
    """A parameter has a ``value``, a non-empty ``values`` list, or ``min`` and ``max`` numbers (YAML reads ``1e-4``
    as text: made a number here), positive for a log-uniform distribution."""
    if not isinstance(parameter, dict) or not {"value", "values", "min", "max"} & set(parameter):
        raise ConfigError(f"{path}: parameter {name!r} needs 'value', 'values' or a distribution with min and max")
    if "values" in parameter and (not isinstance(parameter["values"], list) or not parameter["values"]):
        raise ConfigError(f"{path}: parameter {name!r}: 'values' must be a non-empty list")
    if "value" in parameter or "values" in parameter:
        return
    try:
        low, high = float(parameter["min"]), float(parameter["max"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{path}: parameter {name!r}: 'min' and 'max' must both be numbers") from None
    if low > high or (parameter.get("distribution") == "log_uniform_values" and low <= 0):
        raise ConfigError(f"{path}: parameter {name!r}: needs min <= max (and min > 0 for log_uniform_values)")
    parameter["min"], parameter["max"] = low, high


def trial_parameters(spec: dict[str, Any], count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The trials of a sweep run offline, in order: the grid's every combination (in file order, the last parameter
    varying fastest, as W&B's grid does), or ``count`` random draws (seeded, so a rerun draws the same trials);
    ``count`` cuts a grid short."""
    parameters = spec["parameters"]
    if spec["method"] == "bayes":
        raise ConfigError(
            "method bayes needs W&B's sweep server, which proposes each trial from the finished ones: set "
            "WANDB_API_KEY, or use grid or random offline"
        )
    if spec["method"] == "grid":
        choices = []
        for name, parameter in parameters.items():
            if "value" in parameter:
                choices.append([parameter["value"]])
            elif "values" in parameter:
                choices.append(list(parameter["values"]))
            else:
                raise ConfigError(f"a grid sweep takes 'values' lists; parameter {name!r} has a distribution")
        trials = [dict(zip(parameters, combination)) for combination in itertools.product(*choices)]
        return trials[:count] if count else trials
    if not count:
        raise ConfigError("a random sweep needs --count, the number of trials to draw")
    rng = random.Random(seed)
    return [{name: _draw(name, parameter, rng) for name, parameter in parameters.items()} for _ in range(count)]


def _draw(name: str, parameter: dict[str, Any], rng: random.Random) -> Any:
    if "value" in parameter:
        return parameter["value"]
    if "values" in parameter:
        return rng.choice(list(parameter["values"]))
    distribution = parameter.get("distribution", "uniform")
    low, high = parameter["min"], parameter["max"]
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(
            f"parameter {name!r}: offline sweeps draw {', '.join(DISTRIBUTIONS)} between min and max, got "
            f"{distribution!r}"
        )
    if distribution == "int_uniform":
        return rng.randint(math.ceil(low), math.floor(high))
    if distribution == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.uniform(low, high)


def trial_command(spec: dict[str, Any], parameters: dict[str, Any]) -> list[str]:
    """The file's command for one trial, its macros filled as W&B's agent fills them; ``lit-rlhf`` runs with this
    interpreter (``python -m lit_rlhf``), so a sweep works without the console script on ``PATH``."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    macros = create_sweep_command_args({"args": {name: {"value": value} for name, value in parameters.items()}})
    macros |= {"interpreter": [sys.executable], "program": [str(spec.get("program", ""))], "env": []}
    command: list[str] = []
    for part in create_sweep_command(spec["command"]):
        part = str(part)
        if part.startswith("${") and part.endswith("}"):
            command += macros.get(part[2:-1]) or []
        else:
            command.append(part)
    if command and command[0] == "lit-rlhf":
        command[:1] = [sys.executable, "-m", "lit_rlhf"]
    return command


def trial_name(index: int, parameters: dict[str, Any]) -> str:
    """A trial's folder: its number and parameter values, ``t01_init_kl_coef=0.5``."""
    values = "_".join(f"{name.rsplit('.', 1)[-1]}={_short(value)}" for name, value in parameters.items())
    return f"t{index:02d}_{values}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value).replace("/", "-")


def pipeline_stages_needed(spec: dict[str, Any], run: PipelineRun) -> str | None:
    """The last pipeline stage the sweep needs: those whose output folder the command or a parameter's values name
    (a sweep over reward models names several), and those the pipeline's evaluation reads (its reference policy and
    reward model); ``None`` when it needs none."""
    names = [stage.name for stage in run.spec.stages]
    out_parts = run.out_dir.parts
    needed = {run.spec.evaluation.reference, run.spec.evaluation.reward_model} & set(names)
    values = [value for parameter in spec["parameters"].values()
              for value in parameter.get("values", [parameter.get("value")])]
    for part in map(str, [*spec["command"], *values]):
        parts = Path(part.split("=", 1)[-1]).parts  # --key=PATH or PATH
        if parts[: len(out_parts)] == out_parts and len(parts) > len(out_parts) and parts[len(out_parts)] in names:
            needed.add(parts[len(out_parts)])
    return max(needed, key=names.index) if needed else None


def run_sweep(
    path: str | Path, fit_phase: FitPhase, out: str | Path | None = None, count: int | None = None,
    pipeline: str | Path = "configs/pipeline.yaml", online: bool | None = None, project: str = "lit-rlhf",
    entity: str | None = None,
) -> dict[str, Any] | None:
    """Run a sweep file (see the module docstring): online through W&B when ``online`` (default: when
    ``WANDB_API_KEY`` is set), else offline here. Returns what ``OUT/sweep.json`` holds (``None`` online: W&B holds
    the results)."""
    spec = load_sweep(path)
    online = bool(os.environ.get("WANDB_API_KEY")) if online is None else online
    if not online:
        trial_parameters(spec, count)  # refuse bayes, or a random sweep without a count, before any work
    run = start_run(pipeline, fit_phase)
    until = pipeline_stages_needed(spec, run)
    if until:
        print(f"[sweep] pipeline {pipeline} up to {until!r} (reused where complete)")
        run_stages(run, until=until)
    if online:
        run_online(spec, count, project, entity)
        return None
    return run_offline(spec, Path(path), run, Path(out or Path("runs/sweeps") / Path(path).stem), count)


def run_online(spec: dict[str, Any], count: int | None, project: str, entity: str | None) -> None:
    """Create the sweep on W&B from the file as it is, then run W&B's own agent on it in this folder."""
    import wandb

    project, entity = spec.get("project", project), spec.get("entity", entity)
    try:
        sweep_id = wandb.sweep(sweep=spec, project=project, entity=entity)
    except Exception as error:  # W&B's client raises many kinds (auth, validation, network)
        raise ConfigError(f"W&B did not create the sweep: {error}") from error
    if not sweep_id:
        raise ConfigError("W&B did not create the sweep (see its message above)")
    target = "/".join(part for part in (entity, project, sweep_id) if part)
    agent = [sys.executable, "-m", "wandb", "agent", *(["--count", str(count)] if count else []), target]
    print(f"[sweep] W&B sweep {target}: {' '.join(agent[1:])}")
    returncode = subprocess.run(agent, check=False).returncode
    if returncode != 0:
        raise ConfigError(f"wandb agent {target} exited with status {returncode}")


def run_offline(spec: dict[str, Any], path: Path, run: PipelineRun, out_dir: Path, count: int | None) -> dict:
    """Train each trial not yet trained as a subprocess, measure every trial's policy with the pipeline's held-out
    evaluation (a few seconds each, so the numbers always come from the current evaluation), and write
    ``OUT/sweep.json``."""
    evaluation = HeldOutEvaluation(run, split="dev")  # a sweep chooses settings: never on the test prompts
    out_dir.mkdir(parents=True, exist_ok=True)
    trials = [_run_trial(spec, trial_name(index, parameters), parameters, out_dir, evaluation)
              for index, parameters in enumerate(trial_parameters(spec, count), start=1)]
    result = {
        "name": path.stem, "file": str(path), "method": spec["method"], "phase": _phase(spec),
        "parameters": list(spec["parameters"]), "metric": spec.get("metric"), "trials": trials,
        "reference": {"stage": run.spec.evaluation.reference,
                      **evaluation.row(evaluation.policy(evaluation.reference_path))}
        if evaluation.reference_path else None,
        "baselines": _best_of_n_curve(evaluation, out_dir),
    }
    result["groups"] = seed_groups(trials)
    result["paired"] = paired_with_the_first_setting(trials)
    result["gao"] = gao_fits(result)
    write_atomically(out_dir / SWEEP_FILE, json.dumps(result, indent=2) + "\n")
    print(format_trials(result))
    if any(group["seeds"] > 1 for group in result["groups"]):
        print(format_table([group_cells(group) for group in result["groups"]]))
    if result["paired"]:
        print(format_paired(result["paired"]))
    for fit in result["gao"]:
        print(f"[sweep] Gao et al. (2022) {fit['form']} fit of gold gain over the reference against sqrt(KL): "
              f"alpha {fit['alpha']:.3f}, beta {fit['beta']:.3f}, R^2 {format_cell(fit['r2'])} over {fit['n']} points")
    print(f"[sweep] {out_dir / SWEEP_FILE}; draw it with: lit-rlhf report {out_dir}")
    failed = [trial["trial"] for trial in trials if trial["status"] != "done"]
    if failed:
        raise ConfigError(f"{len(failed)} trial(s) failed: {', '.join(failed)} (see log.txt in each folder)")
    return result


def _run_trial(
    spec: dict[str, Any], name: str, parameters: dict[str, Any], out_dir: Path, evaluation: HeldOutEvaluation
) -> dict[str, Any]:
    trial_dir = out_dir / name
    command = trial_command(spec, parameters)
    done_file = trial_dir / DONE_FILE
    trained = made_with(command[1:], (part.split("=", 1)[-1] for part in command))  # PATH and --key=PATH
    record = json.loads(done_file.read_text()) if done_file.is_file() else {}
    export = trial_dir / record["export"] if record.get("export") else None
    if record.get("status") == "done" and record.get(MADE_WITH) == trained and (export / "config.json").is_file():
        print(f"[sweep] {name}: trained, reused")
    else:
        record = _train(name, parameters, command, trial_dir, out_dir) | {MADE_WITH: trained}
        export = trial_dir / record["export"] if record.get("export") else None
    if record["status"] == "done":
        record["metrics"] = evaluation.row(evaluation.policy(str(export)))
        print(f"[sweep] {name}: {_brief(record['metrics'])}")
    write_atomically(done_file, json.dumps(record, indent=2) + "\n")
    return record


def _train(name: str, parameters: dict[str, Any], command: list[str], trial_dir: Path, out_dir: Path) -> dict:
    """Run one trial's command with its logs and export in ``trial_dir``."""
    if trial_dir.exists():
        shutil.rmtree(trial_dir)  # a trial cut short leaves partial logs behind
    trial_dir.mkdir(parents=True)
    print(f"[sweep] {name}: training")
    started = time.perf_counter()
    environment = {**os.environ, RUNS_DIR_VARIABLE: str(trial_dir)}
    with open(trial_dir / "log.txt", "w") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment).returncode == 0
    record: dict[str, Any] = {"trial": name, "params": parameters, "seconds": round(time.perf_counter() - started, 1)}
    logs = sorted(trial_dir.glob("*/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if logs:
        record["log_dir"] = str(logs[-1].parent.relative_to(out_dir))
    exports = sorted(trial_dir.glob("**/hf/config.json"), key=lambda p: p.stat().st_mtime)
    if finished and exports:
        record |= {"status": "done", "export": str(exports[-1].parent.relative_to(trial_dir))}
    else:
        record["status"] = "failed"
        print(f"[sweep] {name}: failed ({last_line(trial_dir / 'log.txt')})")
    return record


def _best_of_n_curve(evaluation: HeldOutEvaluation, out_dir: Path) -> list[dict[str, Any]] | None:
    """Best-of-n from the reference policy by the reward model at n = 1…16, each n the first n of the same
    samples; cached in ``OUT/baselines.json`` while the evaluation and the models it reads are unchanged."""
    if not (evaluation.reference_path and evaluation.reward_model):
        return None
    key = made_with({"evaluation": asdict(evaluation.spec), "seed": evaluation.run.seed},
                    [evaluation.reference_path, evaluation.reward_model])
    cached = out_dir / BASELINES_FILE
    if cached.is_file() and (record := json.loads(cached.read_text())).get(MADE_WITH) == key:
        return record["curve"]
    groups = evaluation.sample_groups(evaluation.reference_path, max(BEST_OF_N))
    curve = []
    for n in BEST_OF_N:
        picks = evaluation.best_picks(evaluation.reference_path, evaluation.reward_model, [g[:n] for g in groups])
        curve.append({"stage": "best_of_n", "n": n, **evaluation.row(evaluation.picks(picks)), "kl": best_of_n_kl(n)})
    write_atomically(cached, json.dumps({MADE_WITH: key, "curve": curve}, indent=2) + "\n")
    return curve


SEED_PARAMETER = "seed_everything"
"""A sweep parameter that repeats the other parameters' trials under other seeds (``seed_everything: {values:
[0, 1, 2]}``): :func:`seed_groups` puts them together."""
def seed_groups(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished trials grouped by their parameters other than the seed, each measurement of
    :data:`GROUP_METRICS` as ``{"mean", "ci95", "n"}`` over the group's seeds
    (:func:`lit_rlhf.uncertainty.interval_over_seeds`), in the order the groups first appear."""
    groups: dict[str, dict[str, Any]] = {}
    for trial in trials:
        if trial.get("status") != "done" or not trial.get("metrics"):
            continue
        params = {name: value for name, value in trial["params"].items() if name != SEED_PARAMETER}
        group = groups.setdefault(json.dumps(params, sort_keys=True), {"params": params, "values": {}})
        for metric in GROUP_METRICS:
            if (value := trial["metrics"].get(metric, trial.get(metric))) is not None:
                group["values"].setdefault(metric, []).append(value)
    return [{"params": group["params"], "seeds": max(map(len, group["values"].values()), default=0),
             **{metric: interval_over_seeds(values).as_dict() for metric, values in group["values"].items()}}
            for group in groups.values()]


def paired_with_the_first_setting(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each setting minus the sweep's first, seed by seed: the trials of one seed share the seed of the data order,
    the initialisation and the training noise, so pairing them removes what the seed adds to both. For each of
    :data:`PAIRED_METRICS`, the mean of the per-seed differences with its 95 % interval over the seeds both settings
    finished (:func:`lit_rlhf.uncertainty.interval_over_seeds`), as ``paired.json``'s rows: ``a`` the setting,
    ``b`` the first, each named by the values that differ between settings. A sweep over reward models lists the
    single reward model first, so each row is a mitigation's effect."""
    by_setting: dict[str, dict[Any, dict[str, Any]]] = {}
    for trial in trials:
        if trial.get("status") == "done" and trial.get("metrics") and SEED_PARAMETER in trial["params"]:
            params = {name: value for name, value in trial["params"].items() if name != SEED_PARAMETER}
            by_setting.setdefault(json.dumps(params), {})[trial["params"][SEED_PARAMETER]] = trial["metrics"]
    if not by_setting:
        return []
    settings = [json.loads(key) for key in by_setting]
    varying = [name for name in settings[0] if len({json.dumps(setting[name]) for setting in settings}) > 1]

    def label(params: dict[str, Any]) -> str:
        return ",".join(_short(params[name]) for name in varying) or "all"

    rows = []
    first_key, *other_keys = list(by_setting)
    for key in other_keys:
        for metric in PAIRED_METRICS:
            seeds = [seed for seed in by_setting[key] if seed in by_setting[first_key]
                     and None not in (by_setting[key][seed].get(metric), by_setting[first_key][seed].get(metric))]
            if seeds:
                differences = [by_setting[key][seed][metric] - by_setting[first_key][seed][metric] for seed in seeds]
                rows.append({"a": label(json.loads(key)), "b": label(settings[0]), "metric": metric,
                             **interval_over_seeds(differences).as_dict()})
    return rows


def gao_fits(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Gao, Schulman & Hilton (2022)'s forms fitted to the gold reward gained over the reference policy against
    d = √KL (:func:`lit_rlhf.uncertainty.fit_gao`): ``rl`` d(α − β ln d) to every finished trial, ``bon``
    d(α − β d) to the best-of-n baselines; each ``{"form", "alpha", "beta", "r2", "n"}``, where the points allow one."""
    reference = (result.get("reference") or {}).get("gold_reward")
    if reference is None:
        return []
    fits = []
    for form, points in gao_points(result, reference).items():
        if len({d for d, _ in points if d > 0}) >= 2:
            fit = asdict(fit_gao([d for d, _ in points], [gain for _, gain in points], form))
            fits.append(fit | {"r2": None if math.isnan(fit["r2"]) else fit["r2"]})  # no spread in the gains
    return fits


def _phase(spec: dict[str, Any]) -> str | None:
    """The phase a sweep trains, named by its command's phase config (``configs/ipo.yaml`` → ``ipo``)."""
    command = [str(part) for part in spec["command"]]
    for index, part in enumerate(command):
        if part == "--config" and index + 1 < len(command):
            return Path(command[index + 1]).stem
        if part.startswith("--config="):
            return Path(part.split("=", 1)[1]).stem
    return None


def _brief(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value:.3f}" for key, value in metrics.items() if isinstance(value, float))


def format_trials(result: dict[str, Any]) -> str:
    """One table: the reference, each trial's parameters, status and measurements, then the best-of-n baselines."""
    rows = [
        {"trial": trial["trial"], **trial["params"], "status": trial["status"], **(trial.get("metrics") or {}),
         "seconds": trial["seconds"]}
        for trial in result["trials"]
    ]
    baselines = [{"trial": f"best_of_{row['n']}", **{k: v for k, v in row.items() if k not in ("stage", "n")}}
                 for row in result.get("baselines") or []]
    reference = [{"trial": "reference", **{k: v for k, v in result["reference"].items() if k != "stage"}}] \
        if result.get("reference") else []
    return format_table(reference + rows + baselines)
