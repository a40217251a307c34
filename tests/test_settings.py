"""Settings groups (``optimizer``, ``sampling``, ``kl_control``, ``lora``): what they set reaches the optimiser, its
schedule and the controller; one changed key keeps the group's other settings; checkpoints hold plain mappings."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from helpers import run_cli
from lit_rlhf.kl_control import AdaptiveKLController, FixedKLController, KLControlConfig
from lit_rlhf.phases.settings import OptimizerConfig
from lit_rlhf.phases.sft import SFTModule
from lit_rlhf.phases.shared import adamw_with_warmup

CONFIGS = Path(__file__).parents[1] / "configs"


def fake_trainer(total_steps: int, precision: Precision | None = None) -> SimpleNamespace:
    return SimpleNamespace(estimated_stepping_batches=total_steps, precision_plugin=precision or Precision())


def learning_rates(settings: OptimizerConfig, decay: bool, steps: int, total_steps: int = 10) -> list[list[float]]:
    """Each parameter group's rate before each of ``steps`` optimiser steps (a value group at twice the rate)."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]},
              {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 2 * settings.learning_rate}]
    configured = adamw_with_warmup(fake_trainer(total_steps), groups, settings, decay)
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(steps):
        rates.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


def test_the_optimizer_group_sets_adamw_and_its_warmup_then_cosine_schedule():
    settings = OptimizerConfig(learning_rate=0.01, weight_decay=0.1, warmup_steps=2)
    rates = learning_rates(settings, decay=True, steps=7)
    # Warm-up 0, ½, 1 of the peak; then ½(1 + cos(π·(step − 2)/8)): at step 6, half-way through the decay, ½.
    expected = [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 8)), 0.5 * (1 + math.cos(math.pi / 4)),
                0.5 * (1 + math.cos(3 * math.pi / 8)), 0.5]
    assert [rate[0] for rate in rates] == pytest.approx([0.01 * factor for factor in expected], abs=1e-12)
    assert [rate[1] for rate in rates] == pytest.approx([0.02 * factor for factor in expected], abs=1e-12)
    configured = adamw_with_warmup(fake_trainer(10), [torch.nn.Parameter(torch.ones(1))], settings)
    assert configured["optimizer"].param_groups[0]["weight_decay"] == 0.1
    assert configured["optimizer"].defaults["fused"] is True  # one kernel for every parameter, as transformers'
    under_bf16 = adamw_with_warmup(fake_trainer(10, MixedPrecision("bf16-mixed", "cpu")),
                                   [torch.nn.Parameter(torch.ones(1))], settings)
    assert under_bf16["optimizer"].defaults["fused"] is False  # Lightning clips only an optimizer that does not unscale


def test_without_decay_the_rate_holds_after_the_warmup():
    rates = learning_rates(OptimizerConfig(learning_rate=0.01, warmup_steps=4), decay=False, steps=7)
    assert [rate[0] for rate in rates] == pytest.approx([0.0, 0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01], abs=1e-12)
    assert learning_rates(OptimizerConfig(learning_rate=0.01), decay=False, steps=3) == [[0.01, 0.02]] * 3


def test_kl_control_group_picks_the_controller():
    fixed = KLControlConfig(beta=0.3).controller()
    assert isinstance(fixed, FixedKLController) and fixed.beta == 0.3
    adaptive = KLControlConfig(beta=0.3, target=2.0, horizon=500).controller()
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.beta, adaptive.target, adaptive.horizon) == (0.3, 2.0, 500)


def test_one_key_of_a_group_keeps_the_configs_other_settings(capsys):
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", str(CONFIGS / "sft.yaml"), "--model.optimizer.warmup_steps", "3",
                "--model.sampling.temperature", "0.5", "--print_config")
    model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert model["optimizer"] == {"learning_rate": 0.003, "weight_decay": 0.0, "warmup_steps": 3}
    assert model["sampling"] == {"max_new_tokens": 24, "temperature": 0.5, "top_k": 0, "top_p": 1.0}


def test_groups_are_saved_as_plain_mappings_and_read_back_from_them():
    given = SFTModule(model_name_or_path="world", optimizer=OptimizerConfig(0.01, warmup_steps=3))
    assert given.hparams.optimizer == {"learning_rate": 0.01, "weight_decay": 0.0, "warmup_steps": 3}
    assert given.hparams.lora is None and given.lora is None
    reloaded = SFTModule(**given.hparams)  # what load_from_checkpoint does with the saved mappings
    assert reloaded.optimizer_config == OptimizerConfig(0.01, warmup_steps=3)
    assert reloaded.sampling == given.sampling
