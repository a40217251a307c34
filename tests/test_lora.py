"""LoRA adapters (``lora``: ``peft.LoraConfig`` arguments) in SFT, the reward model, DPO and PPO: only the adapters
(and a new scalar head) train, the reference is the policy with its adapters disabled (no second copy), and the
export has them merged."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from transformers import AutoModelForCausalLM

from helpers import latest_run, run_cli, write_jsonl
from lit_rlhf.data.datamodules import ComparisonDataModule, PromptDataModule
from lit_rlhf.errors import ConfigError
from lit_rlhf.generation import SamplingConfig
from lit_rlhf.models import (
    AdaptersOff,
    LoRAConfig,
    count_parameters,
    load_causal_lm,
    load_tokenizer,
    trainable,
    with_lora,
)
from lit_rlhf.phases.dpo import DPOModule
from lit_rlhf.phases.ppo import PPOModule
from lit_rlhf.phases.reward import RewardModelModule
from lit_rlhf.phases.settings import AdvantageConfig, OptimizerConfig
from lit_rlhf.phases.shared import shard_networks

pytest.importorskip("peft")
LORA = LoRAConfig(r=4, lora_alpha=8)
PROBE = torch.tensor([[85, 54, 8, 14, 7, 94, 8]])  # token ids of a short world text


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE.to(model.device)).logits


class InspectLastStep(Callback):
    """At the last training step, before the export merges the adapters: what the module holds and computes."""

    def on_train_end(self, trainer, pl_module) -> None:
        policy = pl_module.model if hasattr(pl_module, "model") else pl_module.policy
        self.parameters, self.policy_parameters = count_parameters(pl_module), count_parameters(policy)
        self.optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.adapter_ids = {id(p) for name, p in policy.named_parameters() if "lora_" in name}
        self.policy_logits, self.reference_logits = logits(policy), logits(pl_module.reference)


def test_dpo_with_lora_trains_the_adapters_against_the_loaded_weights_and_exports_them_merged(
    world_sft_path, world_cache, tmp_path
):
    from lit_rlhf.world import ensure_world

    rows = ensure_world(world_cache / "world")["comparisons"].read_text().splitlines()[:64]
    pairs = str(write_jsonl(tmp_path / "pairs.jsonl", [json.loads(row) for row in rows]))
    L.seed_everything(0)
    module = DPOModule(world_sft_path, optimizer=OptimizerConfig(1e-2), lora=LORA, export_dir=str(tmp_path / "export"))
    inspect = InspectLastStep()
    trainer = L.Trainer(max_steps=6, val_check_interval=6, limit_val_batches=1, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[inspect])
    data = ComparisonDataModule(path=pairs, tokenizer_name_or_path=world_sft_path, batch_size=8, num_eval_prompts=4)
    trainer.fit(module, data)
    # Validation measured KL to the adapters-off reference: a sampled k1 estimate, not zero (the policy against
    # itself), of either sign on four prompts.
    assert abs(trainer.callback_metrics["eval/objective/kl"]) > 1e-3

    assert isinstance(module.reference, AdaptersOff)
    assert inspect.parameters == inspect.policy_parameters  # no second copy for the reference
    assert inspect.optimised == inspect.adapter_ids  # only the adapters train
    sft = load_causal_lm(world_sft_path, load_tokenizer(world_sft_path))
    torch.testing.assert_close(inspect.reference_logits, logits(sft))  # the reference is the loaded SFT policy
    assert not torch.allclose(inspect.policy_logits, logits(sft), atol=1e-3)  # while the policy moved
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    torch.testing.assert_close(logits(exported), inspect.policy_logits, atol=1e-5, rtol=1e-5)
    # The export merged a copy: the module still trains adapters against its reference.
    torch.testing.assert_close(logits(module.reference), logits(sft))
    torch.testing.assert_close(logits(module.model), inspect.policy_logits)
    assert {id(p) for p in trainable(module.model)} == inspect.adapter_ids


def test_ppo_with_lora_keeps_one_copy_of_the_sft_weights(world_sft_path, tmp_path):
    L.seed_everything(0)
    module = PPOModule(world_sft_path, reward_model="gold", advantage=AdvantageConfig("rloo", 2), lora=LORA,
                       sampling=SamplingConfig(8), optimizer=OptimizerConfig(1e-2), export_dir=str(tmp_path / "export"))
    inspect = InspectLastStep()
    trainer = L.Trainer(max_steps=8, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[inspect])
    trainer.fit(module, PromptDataModule(tokenizer_name_or_path=world_sft_path, batch_size=4, num_eval_prompts=4))

    assert inspect.parameters == inspect.policy_parameters and inspect.optimised == inspect.adapter_ids
    sft = load_causal_lm(world_sft_path, load_tokenizer(world_sft_path))
    torch.testing.assert_close(inspect.reference_logits, logits(sft))
    assert not torch.allclose(inspect.policy_logits, logits(sft), atol=1e-3)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "export")),
                               inspect.policy_logits, atol=1e-5, rtol=1e-5)


def test_reward_model_with_lora_trains_adapters_and_head_and_exports_them_merged(world_sft_path, world_cache, tmp_path):
    from lit_rlhf.scoring import RewardModelScorer
    from lit_rlhf.world import ensure_world

    rows = ensure_world(world_cache / "world")["comparisons"].read_text().splitlines()[:64]
    pairs = str(write_jsonl(tmp_path / "pairs.jsonl", [json.loads(row) for row in rows]))
    L.seed_everything(0)
    module = RewardModelModule(world_sft_path, optimizer=OptimizerConfig(1e-2), lora=LORA,
                               export_dir=str(tmp_path / "export"), normalization_samples=4)
    trainer = L.Trainer(max_steps=6, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, ComparisonDataModule(path=pairs, tokenizer_name_or_path=world_sft_path, batch_size=8))

    optimised = {name for name, p in module.model.named_parameters() if p.requires_grad}
    assert optimised and all("lora_" in name or ".score." in name for name in optimised)
    assert any(".score." in name for name in optimised)  # the new scalar head trains in full
    texts = (["name two fruits ."] * 2, ["apple , pear .", "pear pear"])
    exported = RewardModelScorer.from_pretrained(tmp_path / "export").score(*texts)
    trained = RewardModelScorer(module.model, module.tokenizer).score(*texts)
    torch.testing.assert_close(exported, trained, atol=1e-5, rtol=1e-5)


def test_sft_takes_lora_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).parents[1] / "configs" / "sft.yaml")
    run_cli("fit", "--config", config, "--model.lora", "{r: 4, lora_alpha: 8}", "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2", "--data.num_eval_prompts", "4", "--model.export_dir", "export")
    assert "lora" in (latest_run(tmp_path, "sft") / "hparams.yaml").read_text()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")  # merged: a plain transformers model
    assert not any("lora" in name for name, _ in exported.named_parameters())


@pytest.mark.parametrize("option", ["bias", "init_lora_weights", "rank"])
def test_lora_options_that_would_change_the_reference_are_not_accepted(tmp_path, monkeypatch, capsys, option):
    """``bias`` (trained biases) and ``init_lora_weights`` (PiSSA, LoftQ rewrite the weights under the adapters) would
    make the model with its adapters off differ from the loaded one, the reference: LoRAConfig does not have them."""
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).parents[1] / "configs" / "sft.yaml")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", config, f"--model.lora.{option}", "all", "--trainer.max_steps", "1")
    assert exit_info.value.code != 0 and option in capsys.readouterr().err


def test_lora_mistakes_are_config_errors(world_sft_path):
    model = load_causal_lm(world_sft_path, load_tokenizer(world_sft_path))
    with pytest.raises(ConfigError, match="lora: .*target"):
        with_lora(model, LoRAConfig(r=4, target_modules=["no_such_layer"]))
    with pytest.raises(ConfigError, match="precompute_ref_logps is not needed"):
        DPOModule(world_sft_path, lora=LORA, precompute_ref_logps=True)
    mesh = {"tensor_parallel": SimpleNamespace(size=lambda: 1), "data_parallel": None}
    with pytest.raises(ConfigError, match="LoRA is not supported with FSDP"):
        shard_networks(SimpleNamespace(device_mesh=mesh), with_lora(model, LORA))
