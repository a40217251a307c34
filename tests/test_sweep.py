"""Sweeps: every shipped sweep file is a real W&B sweep of real CLI keys; offline grid/random trials run, resume and
are measured with the pipeline's evaluation; online, the file goes to W&B as it is and W&B's agent runs it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import run_cli
from lit_rlhf import sweep
from lit_rlhf.cli import fit_phase
from lit_rlhf.errors import ConfigError
from lit_rlhf.report import build_report

ROOT = Path(__file__).parents[1]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
CONFIGS = ROOT / "configs"


def first_trial(spec: dict) -> dict:
    """A trial of any sweep: each parameter's first value, or the low end of its distribution."""
    return {name: p.get("value", (p.get("values") or [p.get("min")])[0]) for name, p in spec["parameters"].items()}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda path: path.name)
def test_sweep_file_is_a_w_and_b_sweep_of_real_cli_keys(path, monkeypatch, capsys):
    spec = sweep.load_sweep(path)
    assert spec["metric"]["name"].startswith("eval/")
    parameters = first_trial(spec)
    command = sweep.trial_command(spec, parameters)
    assert command[:3] == [sys.executable, "-m", "lit_rlhf"] and command[3] == "fit"
    assert command[-len(parameters):] == [f"--{name}={value}" for name, value in parameters.items()]  # ${args}
    monkeypatch.chdir(ROOT)  # the commands name configs/ relative to the repository, as a user runs them
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*command[3:], "--print_config")  # jsonargparse refuses an unknown key or a mistyped value
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    for name, value in parameters.items():
        section, *keys = name.split(".")
        if not keys:  # a top-level setting: seed_everything
            assert printed[section] == value, name
            continue
        setting = printed[section]["init_args"]
        for key in keys:  # a settings group nests: model.kl_control.beta
            setting = setting[key]
        assert setting == value, name
    assert printed["model"]["init_args"]["export_dir"] is None  # each trial exports beside its own logs


def test_grid_and_random_trials():
    spec = {"method": "grid", "parameters": {"a": {"values": [1, 2]}, "b": {"values": ["x", "y"]}, "c": {"value": 0}}}
    assert sweep.trial_parameters(spec) == [
        {"a": 1, "b": "x", "c": 0}, {"a": 1, "b": "y", "c": 0}, {"a": 2, "b": "x", "c": 0}, {"a": 2, "b": "y", "c": 0},
    ]
    assert sweep.trial_parameters(spec, count=2) == sweep.trial_parameters(spec)[:2]
    spec = {"method": "random", "parameters": {
        "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "n": {"distribution": "int_uniform", "min": 1, "max": 3}, "kind": {"values": ["k1", "k3"]},
    }}
    trials = sweep.trial_parameters(spec, count=20, seed=3)
    assert trials == sweep.trial_parameters(spec, count=20, seed=3)  # a rerun draws the same trials
    assert all(1e-4 <= t["lr"] <= 1e-2 and t["n"] in (1, 2, 3) and t["kind"] in ("k1", "k3") for t in trials)
    assert len({t["lr"] for t in trials}) == 20
    with pytest.raises(ConfigError, match="--count"):
        sweep.trial_parameters(spec)
    with pytest.raises(ConfigError, match="bayes needs W&B's sweep server"):
        sweep.trial_parameters({**spec, "method": "bayes"}, count=3)
    assert sweep.trial_name(3, {"model.kl_control.beta": 0.30000001}) == "t03_beta=0.3"


def test_sweep_files_are_checked_at_the_edge(tmp_path):
    def load(parameters: dict) -> dict:
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump({"method": "random", "parameters": parameters, "command": ["x", "${args}"]}))
        return sweep.load_sweep(path)

    spec = load({"lr": {"distribution": "log_uniform_values", "min": "1e-4", "max": "1e-2"}})  # YAML reads text
    assert spec["parameters"]["lr"] == {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}
    for parameters, message in [
        ({"lr": {"values": []}}, "non-empty list"),
        ({"lr": {"distribution": "uniform", "min": "low", "max": 1}}, "must both be numbers"),
        ({"lr": {"distribution": "log_uniform_values", "min": 0, "max": 1}}, "min > 0"),
        ({"lr": {"distribution": "uniform", "min": 2, "max": 1}}, "min <= max"),
        ({"lr": 0.1}, "needs 'value', 'values'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load(parameters)
    assert sweep._phase({"command": ["lit-rlhf", "fit", "--config", "configs/ipo.yaml", "${args}"]}) == "ipo"
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: grid\nparameters:\n  beta: {values: [0.1, 0.2}\n")
    with pytest.raises(ConfigError, match=rf"^{broken}:3:27: not valid YAML: expected ',' or ']', but got '}}'$"):
        sweep.load_sweep(broken)


def test_bayes_offline_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("sweep", "sweeps/ppo_beta_bayes.yaml")
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "bayes needs W&B's sweep server" in error


def test_online_hands_the_file_to_w_and_b_and_runs_its_agent(monkeypatch, tmp_path):
    """The network boundary faked: ``wandb.sweep`` records the configuration it would upload, and the agent
    subprocess is replaced by a stand-in that checks it is W&B's agent on that sweep and runs the first trial's
    command the way W&B's agent builds it."""
    import wandb
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    uploaded, agents, prepared = [], [], []
    monkeypatch.setattr(wandb, "sweep", lambda sweep, project, entity: uploaded.append((sweep, project, entity))
                        or "abc123")
    monkeypatch.setattr(sweep, "run_stages", lambda run, until: prepared.append((run.out_dir, until)))

    def fake_agent(argv, check):
        agents.append(argv)
        config = uploaded[-1][0]
        trial = {"args": {name: {"value": value} for name, value in first_trial(config).items()}}
        macros = {**create_sweep_command_args(trial), "env": [], "interpreter": ["python"]}
        command = [part for chunk in create_sweep_command(config["command"])
                   for part in (macros[chunk[2:-1]] if chunk.startswith("${") else [chunk])]
        agents.append(command)
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(sweep.subprocess, "run", fake_agent)
    run_cli("sweep", "sweeps/ppo_beta.yaml", "--count", "3", "--project", "rlhf", "--entity", "me")
    assert uploaded == [(yaml.safe_load((ROOT / "sweeps" / "ppo_beta.yaml").read_text()), "rlhf", "me")]
    assert agents[0] == [sys.executable, "-m", "wandb", "agent", "--count", "3", "me/rlhf/abc123"]
    assert agents[1][:4] == ["lit-rlhf", "fit", "--config", "configs/ppo.yaml"]
    assert agents[1][-2:] == ["--model.kl_control.beta=2.0", "--seed_everything=0"]
    assert prepared == [(Path("runs/pipeline"), "rm")]  # the SFT policy and reward model the trials start from

    def failing_sweep(sweep, project, entity):
        raise RuntimeError("permission denied")

    monkeypatch.setattr(wandb, "sweep", failing_sweep)
    with pytest.raises(ConfigError, match="W&B did not create the sweep: permission denied"):
        sweep.run_sweep("sweeps/ppo_beta.yaml", fit_phase)


def tiny_pipeline(tmp_path: Path) -> Path:
    """configs/pipeline.yaml up to the reward model, cut to seconds, writing under tmp_path/pipeline."""
    spec = yaml.safe_load((CONFIGS / "pipeline.yaml").read_text())
    quick = {"trainer.max_steps": 2, "trainer.val_check_interval": 1, "trainer.limit_val_batches": 1,
             "data.num_eval_prompts": 2}
    spec["stages"] = [stage for stage in spec["stages"] if stage["name"] in ("sft", "collect", "rm")]
    for stage in spec["stages"]:
        if stage["kind"] == "collect":  # the one kind here that takes training prompts
            stage["num_prompts"] = 16
        if "config" in stage:
            stage["config"], stage["args"] = str(CONFIGS / stage["config"]), quick
    spec["evaluation"] |= {"num_prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 8}
    spec["out"] = str(tmp_path / "pipeline")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_offline_sweep_runs_resumes_and_reports(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    pipeline_file = tiny_pipeline(tmp_path)
    out = tmp_path / "pipeline"
    spec = {
        "program": "lit-rlhf", "method": "grid", "metric": {"name": "eval/gold/reward", "goal": "maximize"},
        "parameters": {"model.kl_control.beta": {"values": [1.0, 0.1]}},
        "command": ["lit-rlhf", "fit", "--config", str(CONFIGS / "ppo.yaml"),
                    f"--model.model_name_or_path={out}/sft/hf", f"--model.reward_model={out}/rm/hf",
                    "--model.export_dir=null", "--trainer.max_steps=4", "--trainer.val_check_interval=1",
                    "--model.update.epochs=1", "--data.batch_size=4", "--data.num_eval_prompts=2",
                    "--model.sampling.max_new_tokens=8", "--model.optimizer.learning_rate=1e-3", "${args}"],
    }
    sweep_file = tmp_path / "beta.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    result = sweep.run_sweep(sweep_file, fit_phase, tmp_path / "sweep", pipeline=pipeline_file)

    assert [p.name for p in sorted(out.glob("*/done.json"))] == ["done.json"] * 3  # sft, collect, rm ran first
    trials = result["trials"]
    assert [t["trial"] for t in trials] == ["t01_beta=1", "t02_beta=0.1"]
    assert all(t["status"] == "done" and -1 <= t["metrics"]["gold_reward"] <= 1 for t in trials)
    assert all(t["metrics"]["kl"] > 0 and t["metrics"]["sycophancy_rate"] is not None for t in trials)
    for trial in trials:
        hparams = yaml.safe_load((tmp_path / "sweep" / trial["log_dir"] / "hparams.yaml").read_text())
        assert hparams["kl_control"]["beta"] == trial["params"]["model.kl_control.beta"]
    assert [row["n"] for row in result["baselines"]] == list(sweep.BEST_OF_N)
    assert result["baselines"][0]["kl"] == 0.0 and result["reference"]["length_ratio"] == 1.0
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == result

    def no_trial_runs(*args, **kwargs):
        raise AssertionError("a trained trial trained again")

    monkeypatch.setattr(sweep.subprocess, "run", no_trial_runs)
    assert sweep.run_sweep(sweep_file, fit_phase, tmp_path / "sweep", pipeline=pipeline_file)["trials"] == trials
    sft_config = out / "sft" / "hf" / "config.json"  # the SFT policy is exported again: every trial is stale
    os.utime(sft_config, ns=(sft_config.stat().st_atime_ns, sft_config.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="trained again"):
        sweep.run_sweep(sweep_file, fit_phase, tmp_path / "sweep", pipeline=pipeline_file)

    assert [group["params"] for group in result["groups"]] == [{"model.kl_control.beta": 1.0},
                                                               {"model.kl_control.beta": 0.1}]
    assert [fit["form"] for fit in result["gao"]] == ["rl", "bon"] and result["gao"][1]["n"] == len(sweep.BEST_OF_N)
    report = build_report([tmp_path / "sweep"])
    assert report.html_path.is_file() and {"scaling_law", "ppo_health", "frontier"} <= set(report.plots)
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in report.plots.values())


def test_seed_groups_take_each_setting_over_its_seeds():
    def trial(beta, seed, gold, status="done"):
        return {"params": {"model.kl_control.beta": beta, "seed_everything": seed}, "status": status,
                "metrics": {"gold_reward": gold, "proxy_reward": 0.0, "kl": 1.0} if status == "done" else None}

    groups = sweep.seed_groups([trial(1.0, 0, 0.5), trial(1.0, 1, 0.7), trial(0.1, 0, 0.2, status="failed")])
    (group,) = groups  # the failed trial's setting has no finished seed
    assert group["params"] == {"model.kl_control.beta": 1.0} and group["seeds"] == 2
    # mean 0.6, sd 0.1414 over 2 seeds: half-width t(0.975, 1)·0.1414/√2 = 12.706·0.1 = 1.2706
    assert group["gold_reward"]["mean"] == pytest.approx(0.6)
    assert group["gold_reward"]["ci95"] == pytest.approx([0.6 - 1.2706, 0.6 + 1.2706], abs=1e-4)
    assert group["kl"] == {"mean": 1.0, "ci95": [1.0, 1.0], "n": 2}


def test_gao_fits_recover_the_forms_from_gains_over_the_reference():
    # RL form with α = 1, β = 0.5: R(0.5) = 0.5 + 0.25 ln 2, R(1) = 1, R(2) = 2 − ln 2; gains over gold 0.5
    gains = {0.5: 0.5 + 0.25 * math.log(2), 1.0: 1.0, 2.0: 2 - math.log(2)}
    result = {"reference": {"gold_reward": 0.5}, "baselines": [],
              "trials": [{"status": "done", "metrics": {"kl": d * d, "gold_reward": 0.5 + gain}}
                         for d, gain in gains.items()]}
    (fit,) = sweep.gao_fits(result)
    assert (fit["form"], fit["n"]) == ("rl", 3)
    assert (fit["alpha"], fit["beta"], fit["r2"]) == (pytest.approx(1.0), pytest.approx(0.5), pytest.approx(1.0))
    assert sweep.gao_fits({**result, "reference": None}) == []  # no reference: no gain to fit


def test_the_stages_a_sweep_needs_include_those_its_parameters_name(tmp_path):
    """A sweep over reward models names them in a parameter's values: each is built before the trials."""
    from lit_rlhf.pipeline_run import start_run

    run = start_run(CONFIGS / "pipeline_mitigations.yaml", fit_phase, "runs/pipeline")
    spec = sweep.load_sweep(ROOT / "sweeps" / "mitigations.yaml")
    assert sweep.pipeline_stages_needed(spec, run) == "rm_odin"  # the last stage any value names
    spec["parameters"]["model.reward_model"] = {"value": "runs/pipeline/rm_seed1/hf"}
    assert sweep.pipeline_stages_needed(spec, run) == "rm_seed1"
    spec["parameters"].pop("model.reward_model")
    assert sweep.pipeline_stages_needed(spec, run) == "rm"  # the evaluation's reward model


def test_each_setting_is_paired_with_the_first_seed_by_seed():
    def trial(model, seed, gold, status="done"):
        return {"params": {"model.reward_model": model, "model.kl_control.beta": 0.01, "seed_everything": seed},
                "status": status, "metrics": {"gold_reward": gold, "proxy_reward": 1.0} if status == "done" else None}

    trials = [trial("runs/pipeline/rm/hf", 0, 0.3), trial("runs/pipeline/rm/hf", 1, 0.5),
              trial("runs/pipeline/rm/hf", 2, 0.4), trial("runs/pipeline/rm_worst/ensemble", 0, 0.6),
              trial("runs/pipeline/rm_worst/ensemble", 1, 0.7), trial("runs/pipeline/rm_worst/ensemble", 2, 0.0,
                                                                      status="failed")]
    gold, proxy = sweep.paired_with_the_first_setting(trials)
    # seeds 0 and 1 only: differences 0.3 and 0.2, mean 0.25, sd 0.0707, half-width 12.706 · 0.0707 / √2 = 0.635
    assert (gold["a"], gold["b"], gold["metric"], gold["n"]) == (
        "runs-pipeline-rm_worst-ensemble", "runs-pipeline-rm-hf", "gold_reward", 2)
    assert gold["mean"] == pytest.approx(0.25) and gold["ci95"] == pytest.approx([0.25 - 0.6353, 0.25 + 0.6353],
                                                                                abs=1e-4)
    assert proxy["mean"] == 0.0
    assert sweep.paired_with_the_first_setting([{**t, "params": {"b": 1}} for t in trials[:1]]) == []  # no seeds
