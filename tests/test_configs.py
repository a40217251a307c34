"""Every config in configs/ parses, prints back the same, runs a training step, and says why each setting is there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from helpers import run_cli

PHASES = Path(__file__).parents[1] / "configs"
CONFIGS = sorted(PHASES.glob("*.yaml"))
PHASE_CONFIGS = [config for config in CONFIGS if not config.name.startswith("pipeline")]
EVERY_CONFIG = sorted(PHASES.rglob("*.yaml"))
BEFORE_INHERITANCE = Path(__file__).parent / "configs_before_inheritance"
"""ipo.yaml, kto.yaml and simpo.yaml as they were before they extended dpo.yaml: every setting written out (settings
groups nested, and KTO its own module, as the configs now write them)."""
MEASUREMENT = re.compile(r"[~≈]\s*\d|\d\s*(?:nats?\b|%|seconds?\b|s\b|min\b|steps\b)")
"""A measured number in a comment (``KL ~9 nats``, ``in 300 steps``): results go to the README, where they are dated."""


def _overrides(config: Path, sft: str, rm: str) -> list[str]:
    """Point a config's run-specific paths (outputs of earlier phases) at test fixtures; every phase reads the world's
    data."""
    text = config.read_text()
    overrides = ["--model.model_name_or_path", sft, "--data.path", "null"]
    if "reward_model:" in text:
        overrides += ["--model.reward_model", rm]
    if "value_model" in text:
        overrides += ["--model.value_model", rm]
    if "export_dir:" in text:
        overrides += ["--model.export_dir", "export"]
    return overrides


def _resolved(capsys, *args: str) -> dict:
    """The settings ``lit-rlhf fit ARGS`` runs with, as ``--print_config`` prints them."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *args, "--print_config")
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("config", PHASE_CONFIGS, ids=[config.name for config in PHASE_CONFIGS])
def test_config_runs_a_step(config, precision, world_sft_path, world_rm_path, tmp_path, monkeypatch):
    """Also in ``bf16-mixed``, the precision of ``configs/trainer/fsdp.yaml`` and of most GPU runs."""
    monkeypatch.chdir(tmp_path)
    run_cli(
        "fit", "--config", str(config), *_overrides(config, world_sft_path, world_rm_path),
        "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "1",
        "--data.num_eval_prompts", "4", "--trainer.precision", precision,
    )
    assert list((tmp_path / "runs").glob("*/version_0/metrics.csv"))


@pytest.mark.parametrize("trainer_config", sorted((PHASES / "trainer").glob("*.yaml")), ids=lambda path: path.name)
def test_trainer_configs_compose_with_a_phase(trainer_config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", str(PHASES / "sft.yaml"), "--config", str(trainer_config), "--print_config")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for line in trainer_config.read_text().splitlines():
        setting = line.split(" #")[0]
        if setting.startswith("  ") and ":" in setting:
            key, value = (part.strip() for part in setting.split(":", 1))
            if value:
                assert f"{key}: {value}" in printed


@pytest.mark.parametrize("name", sorted(path.name for path in BEFORE_INHERITANCE.glob("*.yaml")))
def test_a_config_that_extends_dpo_yaml_resolves_to_the_full_file_it_replaced(name, capsys):
    """Its ``config: dpo.yaml`` key reads dpo.yaml first; the dotted keys after it change single settings."""
    extending, full = PHASES / name, BEFORE_INHERITANCE / name
    assert yaml.safe_load(extending.read_text())["config"] == "dpo.yaml"
    assert _resolved(capsys, "--config", str(extending)) == _resolved(capsys, "--config", str(full))


def test_a_missing_base_config_is_named(tmp_path, capsys):
    extending = tmp_path / "mine.yaml"
    extending.write_text("config: missing.yaml\nmodel.init_args.loss_type: ipo\n")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", str(extending), "--print_config")
    assert exit_info.value.code == 2
    assert f"File does not exist: '{tmp_path / 'missing.yaml'}'" in capsys.readouterr().err


@pytest.mark.parametrize("config", EVERY_CONFIG, ids=lambda path: str(path.relative_to(PHASES)))
def test_every_setting_has_a_comment_and_no_comment_a_measurement(config):
    for number, line in enumerate(config.read_text().splitlines(), start=1):
        setting, _, comment = line.partition("#")
        assert comment.strip() or not setting.strip(), f"{config.name}:{number}: a setting without a comment"
        assert not MEASUREMENT.search(comment), f"{config.name}:{number}: a measurement belongs in the README"
