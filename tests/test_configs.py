"""Every config in configs/ parses, prints back the same, and runs a training step."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import run_cli

PHASES = Path(__file__).parents[1] / "configs"
CONFIGS = sorted(PHASES.glob("*.yaml"))
PHASE_CONFIGS = [config for config in CONFIGS if "class_path" in config.read_text() and "model:" in config.read_text()]


def _overrides(config: Path, sft: str, rm: str) -> list[str]:
    """Point a config's run-specific paths (outputs of earlier phases) at test fixtures."""
    text = config.read_text()
    overrides = ["--model.model_name_or_path", sft]
    if "ComparisonDataModule" in text or "runs/collect" in text:
        overrides += ["--data.path", "null"]
    if "reward_model:" in text:
        overrides += ["--model.reward_model", rm]
    if "value_model" in text:
        overrides += ["--model.value_model", rm]
    if "export_dir:" in text:
        overrides += ["--model.export_dir", "export"]
    return overrides


@pytest.mark.parametrize("config", PHASE_CONFIGS, ids=[config.name for config in PHASE_CONFIGS])
def test_config_runs_a_step(config, world_sft_path, world_rm_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_cli(
        "fit", "--config", str(config), *_overrides(config, world_sft_path, world_rm_path),
        "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "1",
        "--data.num_eval_prompts", "4",
    )
    assert list((tmp_path / "runs").glob("*/version_0/metrics.csv"))


@pytest.mark.parametrize("trainer_config", sorted((PHASES / "trainer").glob("*.yaml")), ids=lambda path: path.name)
def test_trainer_configs_compose_with_a_phase(trainer_config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", str(PHASES / "sft.yaml"), "--config", str(trainer_config), "--print_config")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for line in trainer_config.read_text().splitlines():
        if line.startswith("  ") and ":" in line:
            key, value = (part.strip() for part in line.split(":", 1))
            if value:
                assert f"{key}: {value}" in printed
