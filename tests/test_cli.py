"""The extra commands: `lit-rlhf world` and `lit-rlhf collect`, and one-line errors for bad arguments."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from helpers import run_cli
from lit_rlhf.cli import COLLECT_DEFAULTS, fit_phase, main
from lit_rlhf.errors import ConfigError
from lit_rlhf.pipeline_spec import CollectStage, load_pipeline


def test_world_command_writes_the_datasets(tmp_path, capsys):
    run_cli("world", "--out", str(tmp_path / "world"))
    printed = capsys.readouterr().out
    for name in ["demonstrations", "comparisons", "unpaired", "prompts", "dev_prompts", "test_prompts", "tokenizer"]:
        assert f"{name}: " in printed
    first = json.loads((tmp_path / "world" / "comparisons.jsonl").read_text().splitlines()[0])
    assert set(first) == {"prompt", "chosen", "rejected"}
    assert len((tmp_path / "world" / "demonstrations.jsonl").read_text().splitlines()) == 4000


def test_collect_command(world_sft_path, tmp_path, capsys):
    run_cli("collect", "--policy", world_sft_path, "--out", str(tmp_path / "c"), "--k", "3", "--num-prompts", "10")
    assert "10 prompts x 3 responses, judged by raters" in capsys.readouterr().out
    summary = json.loads((tmp_path / "c" / "collect.json").read_text())
    assert summary["pairs"] + summary["ties_dropped"] == 10 * 3
    # 10 of the world's 2,000 prompt rows drawn at random: the first 10, grouped by prompt, held 2 distinct prompts
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "c" / "rankings.jsonl").read_text().splitlines()]
    assert len(set(prompts)) == 10


def test_a_missing_model_is_one_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lit_rlhf", "collect", "--policy", str(tmp_path / "nope"), "--out", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"lit-rlhf: error: model not found: {tmp_path / 'nope'} (no such folder)"


CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # the reward model before SFT has written its export: a hub lookup traceback until now
        (["--config", str(CONFIGS / "rm.yaml")], "model not found: runs/sft/hf (no such folder)"),
        # raised while jsonargparse builds the DataModule, which re-raises it as a ValueError
        (["--config", str(CONFIGS / "sft.yaml"), "--data.batch_size", "0"], "batch_size must be at least 1, got 0"),
        (["--config", str(CONFIGS / "sft.yaml"), "--model.model_name_or_path", "empty"],
         "no tokenizer in empty (none of tokenizer.json, tokenizer_config.json, vocab.json, tokenizer.model)"),
        # out-of-range settings used to train silently
        (["--config", str(CONFIGS / "sft.yaml"), "--model.optimizer.learning_rate", "-0.001"],
         "optimizer.learning_rate must be positive, got -0.001"),
        (["--config", str(CONFIGS / "sft.yaml"), "--ckpt_path", "nope.ckpt"],
         "--ckpt_path nope.ckpt: no such checkpoint file or folder"),
        # Lightning's own configuration errors too: the GPU trainer config on this CPU-only machine
        pytest.param(["--config", str(CONFIGS / "sft.yaml"), "--config", str(CONFIGS / "trainer" / "ddp.yaml")],
                     "trainer: No supported gpu backend found!",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPUs")),
        # a hub id that cannot be fetched: the hub's message runs to several lines
        (["--config", str(CONFIGS / "sft.yaml"), "--model.model_name_or_path", "org/no-such-model"],
         "cannot load a tokenizer from org/no-such-model: "),
        (["--config", str(CONFIGS / "sft.yaml"), "--trainer.strategy", "fsdp3"],  # Lightning's ValueError
         "trainer: You selected an invalid strategy name: `strategy='fsdp3'`."),
        # Lightning's refusal comes at fit's start, with a traceback: PPO optimises by hand
        (["--config", str(CONFIGS / "ppo.yaml"), "--model.model_name_or_path", "world", "--model.reward_model", "gold",
          "--trainer.accumulate_grad_batches", "2"],
         "PPOModule steps its optimiser itself, so trainer.accumulate_grad_batches and trainer.gradient_clip_val do "
         "not apply: set its own model.update.gradient_accumulation_steps and model.update.max_grad_norm"),
    ],
)
def test_errors_while_building_a_phase_are_one_line_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"lit-rlhf: error: {message}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.bogus_key", "3"], "model: Option 'bogus_key' is not accepted"),
        (["--model.lora.r", "x"], "model.lora.r: Expected a <class 'int'>. Got value: x"),
        (["--trainer.max_stepz", "3"], "unrecognized arguments: --trainer.max_stepz 3"),
    ],
)
def test_a_command_line_the_parser_refuses_is_one_line_without_the_usage(args, message, capsys):
    """jsonargparse printed the whole usage (about 70 lines), then for a module's option seven more on the types
    it tried."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "sft.yaml"), *args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"lit-rlhf: error: {message} (lit-rlhf fit --help lists the options)\n"


@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_lightnings_test_and_predict_are_not_offered(subcommand, capsys):
    """The phases hold out a validation split, which `validate` measures; they have no test split or predictions."""
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", str(CONFIGS / "sft.yaml")])
    assert exit_info.value.code == 2
    assert f"invalid choice: '{subcommand}' (choose from 'fit', 'validate')" in capsys.readouterr().err


def test_each_fit_in_one_process_gets_its_own_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    quick = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--data.num_eval_prompts", "1"]
    for stage in ("first", "second"):  # as the pipeline runs its stages
        fit_phase(["--config", str(CONFIGS / "sft.yaml"), *quick], str(tmp_path / stage))
    first, second = (list((tmp_path / stage / "wandb").glob("offline-run-*")) for stage in ("first", "second"))
    assert len(first) == 1 and len(second) == 1  # the second stage did not log into the first one's run


def test_wandb_disabled_holds_over_a_saved_configs_offline_logger(tmp_path, monkeypatch):
    """A run's config.yaml, which resumes it, names the W&B logger with offline: true, as the first run chose."""
    from lit_rlhf.trainer_parts import DeferredWandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = DeferredWandbLogger(save_dir=str(tmp_path), project="lit-rlhf", offline=True)
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.experiment.finish()
    assert os.environ["WANDB_MODE"] == "disabled" and not list(tmp_path.rglob("offline-run-*"))


def test_the_private_lightning_attributes_we_use_are_there():
    """Each private attribute the trainer parts lean on exists in the installed Lightning, so that an upgrade that
    removes one fails here, by name, rather than somewhere in a fit."""
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    from lit_rlhf.trainer_parts import PRIVATE_ATTRIBUTES, DeferredWandbLogger

    logger = DeferredWandbLogger(project="lit-rlhf", offline=True)
    for owner, names in PRIVATE_ATTRIBUTES.items():
        instance_or_class = logger if owner.__name__ == "WandbLogger" else owner
        assert [name for name in names if not hasattr(instance_or_class, name)] == [], owner.__name__
    assert "_batches_that_stepped" in _TrainingEpochLoop.__init__.__code__.co_names


def test_help_lists_the_extra_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert all(f"  lit-rlhf {command}" in printed for command in ("pipeline", "collect", "world"))


@pytest.mark.parametrize(
    ("name", "is_missing_path"),
    [("gpt2", False), ("Qwen/Qwen2.5-0.5B", False), ("org/name", False),  # hub ids, dots included
     ("runs/sft/hf", True), ("runs/hf", True),  # "runs" is a folder here: a path
     ("./nope", True), ("a/b/c", True), ("~/nope-lit-rlhf", True)],
)
def test_names_that_can_only_be_paths_must_exist(name, is_missing_path, tmp_path, monkeypatch):
    from lit_rlhf.errors import ConfigError
    from lit_rlhf.models.loading import _check_exists

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    if is_missing_path:
        with pytest.raises(ConfigError, match=f"model not found: {name} \\(no such folder\\)"):
            _check_exists(name)
    else:
        _check_exists(name)


def test_only_a_package_error_that_caused_the_failure_becomes_the_one_line_message():
    from lit_rlhf.cli import _user_error
    from lit_rlhf.errors import ConfigError

    cause = ConfigError("batch_size must be at least 1")
    try:
        raise ValueError("Does not validate against any of the Union subtypes") from cause  # as jsonargparse does
    except ValueError as wrapped:
        assert _user_error(wrapped) is cause
    try:
        try:
            raise cause
        except ConfigError:
            raise RuntimeError("a failure while handling it")  # noqa: B904  a bug of its own: keeps its traceback
    except RuntimeError as unrelated:
        assert _user_error(unrelated) is None


def test_default_root_dir_holds_the_logs_and_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(CONFIGS / "sft.yaml"), "--trainer.default_root_dir", "elsewhere",
          "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
          "--data.num_eval_prompts", "2", "--trainer.enable_progress_bar", "false"])
    assert (tmp_path / "elsewhere" / "sft" / "version_0" / "metrics.csv").is_file()
    assert list((tmp_path / "elsewhere" / "sft" / "version_0" / "checkpoints").glob("*.ckpt"))
    assert not (tmp_path / "runs" / "sft" / "version_0").exists()  # only the export, configs/sft.yaml's export_dir


def test_a_run_that_fails_on_its_data_leaves_no_run_folder_and_starts_no_wandb_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "name one fruit .", "completion": 3}) + "\n")
    root = tmp_path / "root"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "sft.yaml"), "--data.path", str(bad), "--trainer.default_root_dir",
              str(root), "--model.export_dir", str(tmp_path / "hf"), "--trainer.enable_progress_bar", "false"])
    assert "field 'completion'" in capsys.readouterr().err
    assert not list(root.rglob("*"))  # no version_0 with only the settings, no W&B run


def test_a_fit_shorter_than_its_validation_interval_saves_a_checkpoint_to_resume_from(tmp_path):
    quick = ["--config", str(CONFIGS / "sft.yaml"), "--trainer.val_check_interval", "5",
             "--trainer.limit_val_batches", "1", "--data.num_eval_prompts", "2", "--model.sampling.max_new_tokens", "2",
             "--model.export_dir", str(tmp_path / "hf"), "--trainer.callbacks+=helpers.StopAfter"]
    fit_phase([*quick, "--trainer.max_steps", "2"], str(tmp_path))
    (checkpoint,) = (tmp_path / "sft" / "version_0" / "checkpoints").glob("*.ckpt")
    assert checkpoint.name == "epoch=0-step=2.ckpt"  # the last step, within the first epoch
    resumed = fit_phase([*quick, "--trainer.max_steps", "4", "--ckpt_path", str(checkpoint)], str(tmp_path))
    (recorder,) = [callback for callback in resumed.trainer.callbacks if type(callback).__name__ == "StopAfter"]
    assert sorted(recorder.losses) == [3, 4]  # it went on from step 2


def _collect_options(capsys) -> dict[str, str]:
    """`lit-rlhf collect --help`'s options → their metavar and help, on one line."""
    with pytest.raises(SystemExit):
        run_cli("collect", "--help")
    entries = re.split(r"\n  (?=--)", capsys.readouterr().out.split("options:\n", 1)[1])
    return {flag: " ".join(text.split()) for flag, _, text in (entry.strip().partition(" ") for entry in entries)
            if flag.startswith("--")}


def test_collects_options_are_a_collect_stages_keys(capsys):
    """One list of settings: a pipeline file's collect stage keys, and the command's output folder and seed."""
    stage_options = {f"--{key.name.replace('_', '-')}" for key in fields(CollectStage) if key.name != "name"}
    assert set(_collect_options(capsys)) == stage_options | {"--out", "--seed", "--reward-model"}


def test_collect_takes_its_defaults_from_a_pipeline_collect_stage(capsys):
    """One place for the defaults: `lit-rlhf collect` and a pipeline's collect stage sample alike; the command's own
    are a policy (the stage has none) and stopping at a bad row (the stage's none is the file's)."""
    options = _collect_options(capsys)
    for key in (key for key in fields(CollectStage) if key.name != "name"):
        metavar_and_help, _, default = options[f"--{key.name.replace('_', '-')}"].rpartition(" (default: ")
        assert default == f"{COLLECT_DEFAULTS.get(key.name, key.default)}).", key.name
        assert len(metavar_and_help.split()) > 2, f"{key.name} has no help"  # its docstring
    assert COLLECT_DEFAULTS == {"policy": "runs/sft/hf", "on_bad_row": "error"}


@pytest.mark.parametrize(("key", "value"), [("k", 1), ("temperature", -1), ("num_prompts", 0), ("k", "abc"),
                                            ("judge", "nobody")])
def test_collect_refuses_what_a_pipeline_file_refuses_in_the_same_words(key, value, tmp_path, capsys):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"stages": [{"name": "c", "kind": "collect", "policy": "sft", key: value}]}))
    with pytest.raises(ConfigError) as refused:
        load_pipeline(pipeline)
    reason = str(refused.value).removeprefix(f"{pipeline}: stage 'c' (collect): ")
    assert reason.startswith(f"{key} must be ")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("collect", f"--{key.replace('_', '-')}", str(value), "--out", str(tmp_path / "c"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"lit-rlhf: error: collect: {reason}\n"


def test_collect_builds_its_stage_from_the_command_line(tmp_path, monkeypatch, capsys):
    import lit_rlhf.collect

    called = {}

    def collect_comparisons(policy, out_dir, **settings):
        called.update(settings, policy=policy, out_dir=out_dir)
        return SimpleNamespace(prompts=1, k=2, judge="reward_model", pairs=1, ties_dropped=0, seconds=0.0,
                               gold_agreement=None)

    monkeypatch.setattr(lit_rlhf.collect, "collect_comparisons", collect_comparisons)
    run_cli("collect", "--judge", "reward_model", "--reward-model", "rm", "--temperature", "0", "--on-bad-row", "skip",
            "--prompts", "2024", "--out", str(tmp_path), "--seed", "3")
    assert called["policy"] == "runs/sft/hf" and called["out_dir"] == str(tmp_path) and called["seed"] == 3
    assert called["judge"] == "reward_model" and called["judge_model"] == "rm"  # --reward-model: --judge-model
    assert called["sampling"].temperature == 0.0 and called["on_bad_row"] == "skip"
    assert called["prompts_path"] == "2024"  # a text key's value stays text, as a file's quoted one
    assert "1 prompts x 2 responses" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_cli("collect", "--reward-model", "rm", "--judge-model", "rm")
    assert capsys.readouterr().err.endswith("--reward-model and --judge-model name the same thing: give one\n")
