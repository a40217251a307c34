"""The pipeline: stages wired by name, resumable after a crash, one summary row per stage; and its variants."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import yaml

from helpers import run_cli
from lit_rlhf import evaluation, held_out, pipeline, pipeline_run, pipeline_spec, run_folder, stage_runners
from lit_rlhf.cli import fit_phase
from lit_rlhf.errors import ConfigError, DataError, LitRLHFError
from lit_rlhf.generation import Response
from lit_rlhf.pipeline_spec import EvaluationSpec, FitStage, IterativeRounds, PipelineSpec, StageSpec
from lit_rlhf.report import publish_report
from lit_rlhf.scoring import GoldScorer
from lit_rlhf.selection import best_of_n_kl, pick_best, self_play_pairs
from lit_rlhf.uncertainty import interval_over_seeds

CONFIGS = Path(__file__).parents[1] / "configs"
PIPELINES = sorted(CONFIGS.glob("pipeline*.yaml"))
DOCS = Path(__file__).parents[1] / "docs" / "pipeline.md"
SPECS = (PipelineSpec, EvaluationSpec, StageSpec, *pipeline_spec.STAGES.values(), *pipeline_spec.SHORTHANDS.values())
QUICK = {"trainer.max_steps": 2, "trainer.val_check_interval": 1, "trainer.limit_val_batches": 1,
         "data.num_eval_prompts": 2}
QUICK_PPO = {**QUICK, "trainer.max_steps": 8, "data.batch_size": 8, "model.sampling.max_new_tokens": 8}


def tiny(spec_path: Path, tmp_path: Path) -> Path:
    """The pipeline file with every stage cut to seconds: few steps, prompts and samples."""
    spec = yaml.safe_load(spec_path.read_text())
    spec["evaluation"] |= {"num_prompts": 4, "samples_per_prompt": 1, "max_new_tokens": 8}
    for stage in spec["stages"]:
        if stage["kind"] not in ("fit", "best_of_n"):  # the kinds that take training prompts
            stage["num_prompts"] = 16
        if "config" in stage:
            stage["config"] = str(CONFIGS / stage["config"])
            quick = QUICK_PPO if "ppo" in stage["config"] else QUICK
            stage["args"] = {**stage.get("args", {}), **quick}
        if "rm_config" in stage:
            stage["rm_config"] = str(CONFIGS / stage["rm_config"])
            stage["rm_args"] = QUICK
    path = tmp_path / spec_path.name
    path.write_text(yaml.safe_dump(spec))
    return path


def short_pipeline(tmp_path: Path) -> Path:
    """The tiny main job cut to its first two stages, SFT and collect, measured without a reference or reward
    model."""
    spec = yaml.safe_load(tiny(CONFIGS / "pipeline.yaml", tmp_path).read_text())
    spec["stages"] = spec["stages"][:2]
    spec["evaluation"] |= {"reference": None, "reward_model": None}
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_pipeline_resumes_after_a_crash_without_redoing_completed_stages(tmp_path, monkeypatch):
    spec, out = tiny(CONFIGS / "pipeline.yaml", tmp_path), tmp_path / "out"
    runs: list[str] = []
    crashed: list[bool] = []
    fit = stage_runners.STAGE_RUNNERS["fit"]

    def crash_at_ppo(stage, *args):
        runs.append(stage.name)
        if stage.name == "ppo" and not crashed:
            crashed.append(True)
            raise KeyboardInterrupt  # the process is killed half-way through PPO
        return fit(stage, *args)

    monkeypatch.setitem(stage_runners.STAGE_RUNNERS, "fit", crash_at_ppo)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(spec, fit_phase, out)
    assert [p.parent.name for p in sorted(out.glob("*/done.json"))] == ["collect", "rm", "sft"]
    assert not (out / "ppo" / "done.json").exists()

    rows = pipeline.run_pipeline(spec, fit_phase, out, then=publish_report)
    assert runs == ["sft", "rm", "ppo", "ppo", "dpo"]  # sft and rm were not trained again
    assert [row["stage"] for row in rows] == ["init", "sft", "collect", "rm", "ppo", "dpo", "best_of_n", "optimum"]
    assert json.loads((out / "summary.json").read_text()) == rows
    by_stage = {row["stage"]: row for row in rows}
    for stage in ("init", "sft", "ppo", "dpo", "best_of_n"):
        assert set(held_out.SUMMARY_KEYS) - {"kl_se"} <= set(by_stage[stage]), stage
        assert -1.0 <= by_stage[stage]["gold_reward"] <= 1.0 and by_stage[stage]["gold_reward_se"] > 0
    assert by_stage["ppo"]["kl_se"] > 0 and by_stage["best_of_n"]["kl_se"] is None  # its KL is the analytic bound
    assert by_stage["ppo"]["health_breaches"] >= 0
    assert json.loads((out / "ppo" / "health.json").read_text()) == [] or by_stage["ppo"]["health_breaches"]
    paired = json.loads((out / "paired.json").read_text())
    policies = ["sft", "ppo", "dpo", "best_of_n"]
    assert [(row["a"], row["b"]) for row in paired if row["metric"] == "gold_reward"] == [
        (a, b) for later, a in enumerate(policies) for b in policies[:later]]
    ppo_minus_sft = next(row for row in paired if (row["a"], row["b"], row["metric"]) == ("ppo", "sft", "gold_reward"))
    assert ppo_minus_sft["mean"] == pytest.approx(by_stage["ppo"]["gold_reward"] - by_stage["sft"]["gold_reward"])
    assert ppo_minus_sft["ci95"][0] <= ppo_minus_sft["mean"] <= ppo_minus_sft["ci95"][1] and ppo_minus_sft["n"] == 4
    optimum = by_stage["optimum"]
    assert optimum["ess"] > 0 and ("refused" in optimum or -1 <= optimum["gold_reward"] <= 1)
    assert by_stage["sft"]["kl"] == 0.0 and by_stage["ppo"]["kl"] != 0.0
    # the hacking columns, measured against the reference (SFT): the reference itself has ratio 1 and no gap
    assert by_stage["sft"]["length_ratio"] == 1.0 and by_stage["sft"]["proxy_gap"] == 0.0
    assert by_stage["ppo"]["length_ratio"] > 0 and by_stage["best_of_n"]["proxy_gap"] is not None
    assert all(0 <= by_stage[stage]["sycophancy_rate"] <= 1 for stage in ("init", "sft", "ppo", "dpo", "best_of_n"))
    assert (out / "report" / "index.html").is_file() and (out / "eval_samples.jsonl").is_file()
    assert by_stage["best_of_n"]["kl"] == pytest.approx(math.log(8) - 7 / 8)
    assert 0.0 <= by_stage["rm"]["accuracy"] <= 1.0 and "gold_accuracy" in by_stage["rm"]
    assert by_stage["collect"]["pairs"] > 0
    assert {by_stage[stage].get("proxy_scorer") for stage in policies} == {"rm"}  # the evaluation's reward model
    assert "proxy_scorer" not in run_folder.format_table(rows)
    assert run_folder.proxy_scorers(rows) == "proxy_reward: the score of rm (evaluation.reward_model)"
    assert set(by_stage["collect"]) == {"stage", "generated", "pairs", "ties_dropped", "gold_agreement", "seconds"}
    assert all(row["seconds"] >= 0 for row in rows)

    runs.clear()
    best_of_n_done = (out / "best_of_n" / "done.json").stat().st_mtime_ns
    pipeline.run_pipeline(spec, fit_phase, out, force=("rm",))
    assert runs == ["rm", "ppo"]  # --force redoes that stage and those that read it: PPO, best-of-n; not SFT or DPO
    assert (out / "best_of_n" / "done.json").stat().st_mtime_ns > best_of_n_done
    assert not list(out.glob("*/.done.json.tmp"))  # done.json is written atomically


def test_the_seed_reaches_every_stage_and_a_new_seed_redoes_them(tmp_path):
    path, out = short_pipeline(tmp_path), tmp_path / "out"
    fits = []

    def recording_fit(args, runs_dir):
        fits.append(fit_phase(args, runs_dir))
        return fits[-1]

    pipeline.run_pipeline(path, recording_fit, out)
    first_pairs = (out / "collect" / "comparisons.jsonl").read_text()
    pipeline.run_pipeline(path, recording_fit, out, seed=1)
    assert len(fits) == 2  # the seed-0 SFT was not taken as done under seed 1
    assert [fit.trainer.datamodule.seed for fit in fits] == [0, 1]
    assert [fit.config.fit.seed_everything for fit in fits] == [0, 1]
    assert json.loads((out / "collect" / "done.json").read_text())["seed"] == 1
    assert (out / "collect" / "comparisons.jsonl").read_text() != first_pairs
    pipeline.run_pipeline(path, recording_fit, out, seed=1)
    assert len(fits) == 2  # the same seed again: everything is complete


def test_seeds_run_the_pipeline_once_each_and_aggregate_over_them(tmp_path):
    path, out = short_pipeline(tmp_path), tmp_path / "out"
    rows = pipeline.run_seeds(path, fit_phase, [0, 1], out)
    per_seed = {seed: {row["stage"]: row for row in json.loads((out / f"seed_{seed}" / "summary.json").read_text())}
                for seed in (0, 1)}
    assert json.loads((out / "aggregate.json").read_text()) == rows
    by_stage = {row["stage"]: row for row in rows}
    assert list(by_stage) == ["init", "sft", "collect"]
    sft_gold = [per_seed[seed]["sft"]["gold_reward"] for seed in (0, 1)]
    assert sft_gold[0] != sft_gold[1]  # each seed trained its own SFT
    assert by_stage["sft"]["gold_reward"] == interval_over_seeds(sft_gold).as_dict()
    assert by_stage["sft"]["gold_reward"]["n"] == 2 and "gold_reward_se" not in by_stage["sft"]
    assert by_stage["collect"]["pairs"]["mean"] == sum(per_seed[seed]["collect"]["pairs"] for seed in (0, 1)) / 2
    assert json.loads((out / "paired.json").read_text()) == []  # one trained policy: nothing to pair


def test_paired_differences_over_seeds_take_the_seeds_as_units():
    per_seed = [[{"a": "ppo", "b": "sft", "metric": "gold_reward", "mean": mean, "ci95": [0, 1], "n": 512}]
                for mean in (0.1, 0.2, 0.3)]
    (row,) = pipeline.aggregate_paired_over_seeds(per_seed)
    # mean 0.2, sd 0.1 over 3 seeds: half-width t(0.975, 2)·0.1/√3 = 4.303·0.057735 = 0.24844
    assert (row["a"], row["b"], row["metric"], row["n"]) == ("ppo", "sft", "gold_reward", 3)
    assert row["mean"] == pytest.approx(0.2) and row["ci95"] == pytest.approx([0.2 - 0.24844, 0.2 + 0.24844], abs=1e-4)
    assert "no resolved difference" in run_folder.format_paired([row])


def test_seeds_on_the_command_line_are_distinct_integers(capsys):
    for seeds, reason in (("0,0", "a seed is repeated in '0,0'"), ("0,x", "expected integers separated by commas")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli("pipeline", "--seeds", seeds)
        assert exit_info.value.code == 2 and reason in capsys.readouterr().err


@pytest.fixture
def wandb_offline(monkeypatch):
    """W&B as a user without a key has it: offline runs, with all they print."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_the_console_shows_one_line_per_stage_and_each_stage_folder_the_rest(tmp_path, wandb_offline, capfd):
    path, out = short_pipeline(tmp_path), tmp_path / "out"
    rows = pipeline.run_pipeline(path, fit_phase, out, then=publish_report)

    printed = capfd.readouterr()
    lines = (printed.out + printed.err).splitlines()
    assert [line.split(" ... ")[0] for line in lines[:2]] == ["[pipeline] sft: running (fit)",
                                                              "[pipeline] collect: running (collect)"]
    assert all(" ... done in " in line for line in lines[:2])
    assert lines[2:] == [*run_folder.format_table(rows).splitlines(),
                         f"[pipeline] summary: {out / 'summary.json'}, paired differences: {out / 'paired.json'}",
                         f"[pipeline] report: {out / 'report' / 'index.html'}"]
    log = (out / "sft" / run_folder.LOG_FILE).read_text()
    assert "wandb: Run data is saved locally" in log  # where the W&B run is, and not the library notices:
    assert not any(noise in log for noise in ("wandb: Run summary:", "anonymous setting", "💡 Tip", "LeafSpec"))
    assert "wandb:" in (out / "report" / run_folder.LOG_FILE).read_text()


def test_a_phase_argument_refused_by_its_command_line_is_one_line_on_the_console(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "sft", "kind": "fit", "config": str(CONFIGS / "sft.yaml"),
                                                "args": {"trainer.max_stepz": 2}}]}))
    message = r"^stage 'sft': unrecognized arguments: --trainer.max_stepz 2 \(lit-rlhf fit --help lists the options\)$"
    with pytest.raises(ConfigError, match=message):
        pipeline.run_pipeline(path, fit_phase, tmp_path / "out")


def test_a_stage_that_fails_on_its_data_starts_no_wandb_run(tmp_path, wandb_offline, capfd, monkeypatch):
    monkeypatch.setattr(pipeline, "check_data_files", lambda spec: None)  # as a hub dataset, read by its stage only
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "name one fruit .", "completion": 3}) + "\n")
    path, out = tmp_path / "bad.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump({
        "stages": [{"name": "sft", "kind": "fit", "config": str(CONFIGS / "sft.yaml"), "data": str(bad)}],
        "evaluation": {"prompts": str(bad)},
    }))
    with pytest.raises(LitRLHFError, match="field 'completion'"):
        pipeline.run_pipeline(path, fit_phase, out)
    log = out / "sft" / run_folder.LOG_FILE
    assert capfd.readouterr().out == f"[pipeline] sft: running (fit) ... failed, its output: {log}\n"
    assert run_folder.last_line(log).startswith(f"[pipeline] failed: {bad}:1: field 'completion'")  # the reason too
    assert sorted(path.name for path in (out / "sft").iterdir()) == [run_folder.LOG_FILE]  # no W&B run, no run folder


def test_every_data_file_is_read_before_the_first_stage_runs(tmp_path, capfd):
    good, bad = tmp_path / "prompts.jsonl", tmp_path / "held_out.jsonl"
    good.write_text(json.dumps({"prompt": "name one fruit ."}) + "\n")
    bad.write_text(json.dumps({"prompt": "name one fruit ."}) + "\n" + json.dumps({"prompt": ""}) + "\n")
    stages = [{"name": "sft", "kind": "fit", "config": str(CONFIGS / "sft.yaml")},
              {"name": "collect", "kind": "collect", "policy": "sft", "prompts": str(good)},
              {"name": "kto", "kind": "fit", "config": str(CONFIGS / "kto.yaml"), "data": "collect"}]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": stages, "evaluation": {"prompts": str(bad)}}))
    with pytest.raises(DataError, match=rf"^{bad}:2: field 'prompt': must not be empty$"):
        pipeline.run_pipeline(path, fit_phase, tmp_path / "out")
    assert capfd.readouterr().out == "" and not (tmp_path / "out").exists()  # no stage started
    assert sorted(pipeline_spec.data_files(pipeline_spec.load_pipeline(path))) == [
        (str(bad), "prompt", "error"), (str(good), "prompt", "error")]  # kto reads the collect stage's output
    path.write_text(yaml.safe_dump({"stages": stages, "evaluation": {"prompts": str(bad)}, "on_bad_row": "skip"}))
    pipeline_spec.check_data_files(pipeline_spec.load_pipeline(path))  # the bad row is skipped: nothing to stop
    stages[2]["data"] = str(tmp_path / "missing.jsonl")
    path.write_text(yaml.safe_dump({"stages": stages, "evaluation": {"prompts": str(good)}}))
    assert (str(tmp_path / "missing.jsonl"), "unpaired", "error") in pipeline_spec.data_files(
        pipeline_spec.load_pipeline(path))  # kto.yaml's data module, through the dpo.yaml it extends
    with pytest.raises(DataError, match=r"dataset not found: .*missing.jsonl"):
        pipeline.run_pipeline(path, fit_phase, tmp_path / "out")


@pytest.mark.parametrize("variant", ["rejection_sampling", "spin", "iterative"])
def test_each_variant_runs_end_to_end(variant, tmp_path):
    rows = pipeline.run_pipeline(tiny(CONFIGS / f"pipeline_{variant}.yaml", tmp_path), fit_phase, tmp_path / "out")
    stages = [row["stage"] for row in rows]
    expected = {
        "rejection_sampling": ["rejection_sampling_data", "rejection_sampling"],
        "spin": ["spin1_data", "spin1", "spin2_data", "spin2", "spin3_data", "spin3"],
        "iterative": ["iterative1_collect", "iterative1_rm", "iterative1", "iterative2_collect", "iterative2_rm",
                      "iterative2"],
    }[variant]
    assert stages[-len(expected):] == expected
    assert rows[-1]["gold_reward"] is not None and rows[-1]["kl"] is not None


def test_shorthands_wire_each_round_to_the_previous_one(tmp_path):
    spec = pipeline.load_pipeline(CONFIGS / "pipeline_iterative.yaml")
    stages = {stage.name: stage for stage in spec.stages}
    assert stages["iterative2_collect"].policy == "iterative1"
    assert stages["iterative2_rm"].data == "iterative2_collect" and stages["iterative2_rm"].model == "iterative1"
    assert stages["iterative2"].model == "iterative1" and stages["iterative2"].reward_model == "iterative2_rm"
    continued = IterativeRounds(name="it", policy="sft", config="ppo.yaml", rm_config="rm.yaml", rounds=2,
                                reward_init="previous").expand()
    second_rm = next(stage for stage in continued if stage.name == "it2_rm")
    # continuing the last round's reward model, whose score statistics must come from the policy PPO will train
    assert second_rm.model == "it1_rm" and second_rm.statistics_policy == "it1"
    spin = {stage.name: stage for stage in pipeline.load_pipeline(CONFIGS / "pipeline_spin.yaml").stages}
    assert spin["spin2_data"].policy == "spin1" and spin["spin2"].model == "spin1"  # reference: last round


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"name": "a", "kind": "train"}], "unknown kind 'train'"),
        ([{"name": "a", "kind": "fit", "config": "missing.yaml"}], "config not found"),
        ([{"name": "a", "kind": "collect", "policy": "x"}] * 2, "used twice"),
        ([{"kind": "collect"}], "needs a 'name' and a 'kind'"),
        ([{"name": "bon", "kind": "best_of_n", "policy": "sft"}], r"'bon' \(best_of_n\) needs reward_model"),
        ([{"name": "it", "kind": "iterative", "policy": "sft", "config": "ppo.yaml"}], "needs rm_config"),
        ([{"name": "sft", "kind": "fit", "config": "sft.yaml", "dat": "x"}],
         r"stage 'sft' \(fit\): unknown key 'dat'; expected one of name, config, model, reward_model, "),
        ([{"name": "c", "kind": "collect", "policy": "sft", "k": "four"}],
         r"stage 'c' \(collect\): k must be an integer, got 'four'$"),
        ([{"name": "c", "kind": "collect", "policy": "sft", "temperature": True}], "temperature must be a number"),
        ([{"name": "it", "kind": "iterative", "policy": "sft", "config": "ppo.yaml", "rm_config": "rm.yaml",
           "algorithm": "grpo"}], "algorithm must be one of ppo, dpo, got 'grpo'"),
        ([{"name": "rs", "kind": "rejection_sampling", "policy": "sft", "reward_model": "rm", "config": "sft.yaml",
           "prompts": "p.jsonl"}], r"stage 'rs' \(rejection_sampling\): unknown key 'prompts'"),
        # numbers out of range, refused before anything runs rather than failing (or doing nothing) on the way
        ([{"name": "s", "kind": "spin", "policy": "sft", "config": "dpo.yaml", "rounds": 0}],
         r"stage 's' \(spin\): rounds must be at least 1, got 0$"),
        ([{"name": "c", "kind": "collect", "policy": "sft", "k": 1}], "k must be at least 2, got 1$"),
        ([{"name": "c", "kind": "collect", "policy": "sft", "num_prompts": -3}], "num_prompts must be at least 1"),
        ([{"name": "r", "kind": "rejection_sample", "policy": "sft", "reward_model": "rm", "keep": 0}],
         "keep must be at least 1, got 0$"),
        ([{"name": "b", "kind": "best_of_n", "policy": "sft", "reward_model": "rm", "n": 0}], "n must be at least 1"),
        ([{"name": "c", "kind": "collect", "policy": "sft", "temperature": -1}], "temperature must be at least 0"),
        ([{"name": "it", "kind": "iterative", "policy": "sft", "config": "ppo.yaml", "rm_config": "rm.yaml", "k": 1}],
         r"stage 'it' \(iterative\): k must be at least 2, got 1$"),
        # names checked when the file is read, not when their stage's turn comes
        ([{"name": "c", "kind": "collect", "policy": "sft", "judge": "human"}],
         "judge must be one of raters, gold, reward_model, function, llm or null, got 'human'$"),
        ([{"name": "c", "kind": "collect", "policy": "later"}, {"name": "later", "kind": "collect", "policy": "x"}],
         r"stage 'c' reads 'later', which runs after it \(or is itself\): a stage reads only earlier stages$"),
    ],
)
def test_bad_pipeline_files_are_config_errors(stages, message, tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    with pytest.raises(ConfigError, match=message) as error:
        pipeline.load_pipeline(path)
    assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"seeds": 1}, r"unknown key 'seeds'; expected one of stages, out, seed, prompts, evaluation, on_bad_row$"),
        ({"seed": "zero"}, "seed must be an integer, got 'zero'"),
        ({"evaluation": {"num_prompt": 4}}, r": evaluation: unknown key 'num_prompt'; expected one of prompts, "),
        ({"evaluation": {"reference": 3}}, "evaluation: reference must be text or null, got 3"),
        ({"evaluation": ["sft"]}, "evaluation: expected a mapping"),
        ({"evaluation": {"samples_per_prompt": 0}}, "evaluation: samples_per_prompt must be at least 1, got 0$"),
    ],
)
def test_bad_file_and_evaluation_settings_are_config_errors(settings, message, tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "sft", "kind": "fit", "config": str(CONFIGS / "sft.yaml")}],
                                    **settings}))
    with pytest.raises(ConfigError, match=message):
        pipeline.load_pipeline(path)


def test_the_typed_specs_keep_the_files_defaults_in_one_place(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": [
        {"name": "c", "kind": "collect", "policy": "sft", "temperature": 1},
        {"name": "rs", "kind": "rejection_sampling", "policy": "sft", "reward_model": "rm",
         "config": str(CONFIGS / "sft.yaml")},
    ]}))
    spec = pipeline.load_pipeline(path)
    collect, picks, fit = spec.stages
    assert collect.temperature == 1.0 and isinstance(collect.temperature, float)  # an integer is taken as a number
    assert (collect.k, collect.num_prompts, picks.n, picks.num_prompts) == (4, 2000, 8, 1000)
    assert fit == FitStage(name="rs", config=str(CONFIGS / "sft.yaml"), model="sft", data="rs_data")
    assert spec.out == "runs/pipeline" and spec.seed == 0 and spec.evaluation.samples_per_prompt == 4


def test_the_command_line_reports_a_missing_pipeline_file_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("pipeline", "--config", str(tmp_path / "nope.yaml"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"lit-rlhf: error: pipeline file not found: "
                                                            f"{tmp_path / 'nope.yaml'}"]


def test_pick_best_keeps_the_top_scored_distinct_responses():
    prompts = ["name two fruits .", "name one fruit ."]
    texts = [["dog .", "apple , pear .", "apple , pear .", "apple ."], ["fig .", "fig , fig ."]]
    groups = [[Response(text, True) for text in group] for group in texts]
    picks = pick_best(prompts, groups, GoldScorer(), keep=2)
    assert [(p.prompt, p.response, round(p.score, 3)) for p in picks] == [
        ("name two fruits .", "apple , pear .", 1.0), ("name two fruits .", "apple .", 0.5),
        ("name one fruit .", "fig .", 1.0), ("name one fruit .", "fig , fig .", 0.5),
    ]
    assert [p.response for p in pick_best(prompts, groups, GoldScorer(), keep=2, threshold=0.9)] == ["apple , pear .",
                                                                                                    "fig ."]


def test_best_of_n_kl_and_self_play_pairs():
    assert best_of_n_kl(1) == 0.0 and best_of_n_kl(8) == pytest.approx(2.0794415 - 0.875)
    pairs = self_play_pairs(["p", "q", "r", "s"], ["good .", "same .", "fine .", "ok ."],
                            [Response("bad .", True), Response("same .", True), Response(" ", True),
                             Response("cut", False)])
    assert pairs == [{"prompt": "p", "chosen": "good .", "rejected": "bad .", "rejected_ended": True},
                     {"prompt": "s", "chosen": "ok .", "rejected": "cut", "rejected_ended": False}]


def test_a_copied_pipeline_file_finds_the_packages_phase_configs(tmp_path):
    copy = tmp_path / "mine.yaml"
    copy.write_text((CONFIGS / "pipeline_hf.yaml").read_text())
    spec = pipeline.load_pipeline(copy)
    assert spec.stages[0].config == str((CONFIGS / "sft.yaml").resolve())
    (tmp_path / "sft.yaml").write_text((CONFIGS / "sft.yaml").read_text())  # one of your own beside it wins
    assert pipeline.load_pipeline(copy).stages[0].config == str(tmp_path / "sft.yaml")


@pytest.mark.parametrize("path", PIPELINES, ids=[path.name for path in PIPELINES])
def test_every_pipeline_file_loads(path):
    spec = pipeline.load_pipeline(path)
    assert all(stage.kind in pipeline_spec.STAGES for stage in spec.stages)


def _documented_keys() -> dict[str, dict[str, str]]:
    """docs/pipeline.md's key tables: the spec named in a section's heading → each key → its default column."""
    tables: dict[str, dict[str, str]] = {}
    table = None
    for line in DOCS.read_text().splitlines():
        if line.startswith("#"):
            spec_name = re.search(r"\(`(\w+)`\)$", line)
            table = tables.setdefault(spec_name.group(1), {}) if spec_name else None
        elif table is not None and (row := re.match(r"\| `(\w+)` \| ([^|]+) \|", line)):
            table[row.group(1)] = row.group(2).strip()
    return tables


@pytest.mark.parametrize("spec_class", SPECS, ids=lambda spec_class: spec_class.__name__)
def test_the_docs_list_every_key_of_every_spec_with_its_default(spec_class):
    shared = {field.name for field in fields(StageSpec)} if issubclass(spec_class, StageSpec) else set()
    own = [field for field in fields(spec_class) if spec_class is StageSpec or field.name not in shared]
    documented = _documented_keys().get(spec_class.__name__)
    assert documented is not None, f"docs/pipeline.md has no section headed (`{spec_class.__name__}`)"
    assert set(documented) == {field.name for field in own}
    for field in own:
        if field.default is MISSING and field.default_factory is MISSING:
            assert documented[field.name] == "required", field.name
        elif field.default is not None and field.default is not MISSING:
            assert documented[field.name] == f"`{field.default}`", field.name
        else:  # no value: the cell says what takes its place
            assert documented[field.name] != "required", field.name


def test_a_second_pipeline_file_in_the_same_folder_adds_its_rows(tmp_path):
    earlier = [{"stage": name, "gold_reward": 0.1} for name in ("init", "sft", "ppo", "dpo", "removed")]
    (tmp_path / "summary.json").write_text(json.dumps(earlier))
    for name, seed in (("sft", 1), ("ppo", 1), ("dpo", 0), ("rs", 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / run_folder.DONE_FILE).write_text(json.dumps({"seed": seed}))
    rows = [{"stage": name, "gold_reward": 0.2} for name in ("init", "sft", "rs")]
    merged = pipeline._merged_with_earlier_summary(rows, tmp_path, seed=1)
    assert [(row["stage"], row["gold_reward"]) for row in merged] == [
        ("init", 0.2), ("sft", 0.2), ("ppo", 0.1), ("rs", 0.2)  # "removed" is gone, "dpo" ran under seed 0
    ]
    (tmp_path / "summary.json").write_text("{not json")
    assert pipeline._merged_with_earlier_summary(rows, tmp_path, seed=1) == rows


def run_of(stage: StageSpec, seed: int, out_dir: Path) -> pipeline_run.PipelineRun:
    """A run of one stage, to ask whether it is complete."""
    return pipeline_run.PipelineRun(PipelineSpec(stages=[stage], seed=seed), out_dir, fit_phase)


def test_a_stage_is_done_only_under_its_seed_with_the_same_settings(tmp_path):
    stage = FitStage(name="sft", config="sft.yaml")  # no such file here: nothing to stamp
    made = pipeline_run.stage_made_with(stage, run_of(stage, 0, tmp_path))
    (tmp_path / run_folder.DONE_FILE).write_text(json.dumps({"kind": "fit", "seed": 0, run_folder.MADE_WITH: made}))
    assert pipeline_run.is_complete(stage, tmp_path, run_of(stage, 0, tmp_path))
    assert not pipeline_run.is_complete(stage, tmp_path, run_of(stage, 1, tmp_path))
    other = FitStage(name="sft", config="other.yaml")
    assert not pipeline_run.is_complete(other, tmp_path, run_of(other, 0, tmp_path))
    # a folder of an earlier version, which kept the settings its own way, runs again
    (tmp_path / run_folder.DONE_FILE).write_text(json.dumps({"kind": "fit", "seed": 0, "spec": stage.as_record()}))
    assert not pipeline_run.is_complete(stage, tmp_path, run_of(stage, 0, tmp_path))


def test_an_edited_phase_config_the_config_it_extends_or_data_reruns_the_stage(tmp_path):
    """The settings in the pipeline file are unchanged; the files they name are not. kto.yaml extends dpo.yaml."""
    base, config, data = tmp_path / "dpo.yaml", tmp_path / "kto.yaml", tmp_path / "pairs.jsonl"
    base.write_text("trainer: {max_steps: 2}\n")
    config.write_text("config: dpo.yaml\nmodel: {init_args: {beta: 0.1}}\n")
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    stage = FitStage(name="kto", config=str(config), model="sft", data=str(data))
    run = pipeline_run.PipelineRun(PipelineSpec(stages=[FitStage(name="sft", config=str(base)), stage]), tmp_path,
                                   fit_phase)
    stage_dir = tmp_path / "kto"
    stage_dir.mkdir()
    done = {"kind": "fit", "seed": 0, run_folder.MADE_WITH: pipeline_run.stage_made_with(stage, run)}
    (stage_dir / run_folder.DONE_FILE).write_text(json.dumps(done))
    assert set(done[run_folder.MADE_WITH]["inputs"]) == {str(base), str(config), str(data)}  # not the stage "sft"
    assert pipeline_run.is_complete(stage, stage_dir, run)
    for edited in (config, base, data):
        stamp = edited.stat().st_mtime_ns
        os.utime(edited, ns=(stamp + 10**9, stamp + 10**9))  # written again, a second later
        assert not pipeline_run.is_complete(stage, stage_dir, run), edited.name
        os.utime(edited, ns=(stamp, stamp))
    assert pipeline_run.is_complete(stage, stage_dir, run)


@pytest.mark.parametrize("setting, expected", [({}, 32), ({"max_prompt_length": 128}, 128)])
def test_the_evaluation_cuts_prompts_at_the_files_prompt_length(setting, expected, tmp_path, monkeypatch):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "stages": [{"name": "sft", "kind": "fit", "config": str(CONFIGS / "sft.yaml")}],
        "evaluation": {"num_prompts": 2, "samples_per_prompt": 1, **setting},
    }))
    calls = []
    monkeypatch.setattr(evaluation, "evaluate_policy", lambda *args, **kwargs: calls.append(args))
    run = pipeline_run.start_run(path, fit_phase, tmp_path / "out")
    held_out.HeldOutEvaluation(run).policy("world")
    assert calls[0][4] == expected  # evaluate_policy(model, tokenizer, prompts, sampling, max_prompt_length, ...)


@pytest.mark.parametrize("stage", [
    {"name": "sft", "kind": "fit", "config": str(CONFIGS / "sft.yaml"), "data": "my/chats.jsonl"},
    {"name": "sft", "kind": "fit", "config": str(CONFIGS / "sft.yaml"), "args": {"data.init_args.path": "my.jsonl"}},
    {"name": "rs", "kind": "rejection_sample", "policy": "p", "reward_model": "r", "prompts": "my/prompts.jsonl"},
])
def test_a_file_that_reads_own_data_must_name_the_evaluation_prompts(stage, tmp_path):
    """The summary would otherwise answer the world's prompts with a model that never saw them."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": [stage]}))
    with pytest.raises(ConfigError, match=r"evaluation.prompts is unset, but the stages read your own data"):
        pipeline.load_pipeline(path)
    path.write_text(yaml.safe_dump({"stages": [stage], "evaluation": {"prompts": "my/held_out.jsonl"}}))
    assert pipeline.load_pipeline(path).evaluation.prompts == "my/held_out.jsonl"


def test_the_evaluation_renders_chat_prompts_with_the_policies_template(tiny_chat_llama_path, tmp_path):
    """Held-out chat prompts read as the policies trained on them: the reference's chat template, not a default."""
    from lit_rlhf.models import load_tokenizer

    prompts = tmp_path / "held_out.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": f"Name {n} fruits."}]}) + "\n"
                                for n in ("two", "three")))
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "stages": [{"name": "sft", "kind": "fit", "config": str(CONFIGS / "sft.yaml")}],
        "evaluation": {"prompts": str(prompts), "reference": tiny_chat_llama_path, "num_prompts": 2,
                       "samples_per_prompt": 1},
    }))
    evaluation = held_out.HeldOutEvaluation(pipeline_run.start_run(path, fit_phase, tmp_path / "out"))
    tokenizer = load_tokenizer(tiny_chat_llama_path)
    assert evaluation.prompts == [
        tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": f"Name {n} fruits."}],
                                      tokenize=False, add_generation_prompt=True)
        for n in ("two", "three")
    ]


def test_the_world_prompts_are_refused_to_a_model_that_cannot_read_them(tiny_llama_path, tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "stages": [{"name": "sft", "kind": "fit", "config": str(CONFIGS / "sft.yaml")}],
        "evaluation": {"reference": tiny_llama_path},
    }))
    evaluation = held_out.HeldOutEvaluation(pipeline_run.start_run(path, fit_phase, tmp_path / "out"))
    with pytest.raises(ConfigError, match=f"evaluation.prompts is unset, and {tiny_llama_path} cannot read the world"):
        evaluation.prompts


def test_table_cells_show_small_settings_and_missing_values():
    assert [run_folder.format_cell(value) for value in (3e-05, 0.0001, 0.7456, 0.0, -2.0, None, 8, "rm")] == [
        "3e-05", "0.0001", "0.746", "0.000", "-2.000", "-", "8", "rm"]


def test_made_with_is_what_a_done_file_reads_back(tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("trainer: {max_steps: 2}\n")
    made = run_folder.made_with({"beta": 0.1, "shape": (2, 3)}, [str(config), "gpt2"])  # a hub name has no stamp
    assert made == json.loads(json.dumps(made)) == {"settings": {"beta": 0.1, "shape": [2, 3]},
                                                     "inputs": {str(config): config.stat().st_mtime_ns}}
