"""SFT phase through the command line: the world run, real HF models by path, resume, errors, config round-trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from transformers import AutoModelForCausalLM

from helpers import (
    TWO_TURN_CHAT,
    StopAfter,
    assert_resumed_like_uninterrupted,
    latest_run,
    metric_rows,
    metric_series,
    run_cli,
    write_jsonl,
)
from lit_rlhf.data.datamodules import ComparisonDataModule, DemonstrationDataModule
from lit_rlhf.phases.settings import OptimizerConfig
from lit_rlhf.phases.sft import SFTModule

CONFIG = str(Path(__file__).parents[1] / "configs" / "sft.yaml")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_sft_on_world_raises_gold_reward_and_exports(in_tmp):
    run_cli("fit", "--config", CONFIG, "--trainer.max_steps", "160", "--trainer.val_check_interval", "80")
    run = latest_run(in_tmp, "sft")
    gold = metric_series(run, "eval/gold/reward")
    # One row from the validation before training, then one per validation interval.
    assert len(gold) == 3
    assert gold[-1] > gold[0] + 0.5, gold
    assert len(metric_series(run, "val/perplexity")) == 3
    assert metric_series(run, "train/loss")
    export = in_tmp / "runs" / "sft" / "hf"  # configs/sft.yaml's export_dir, where configs/rm.yaml starts
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.model_type == "gpt2"
    assert (export / "tokenizer.json").exists()


@pytest.mark.parametrize("model_fixture", ["tiny_gpt2_path", "tiny_llama_path"])
def test_sft_with_hf_model_by_path_and_jsonl(in_tmp, request, model_fixture):
    model_path = request.getfixturevalue(model_fixture)
    data = write_jsonl(
        in_tmp / "demos.jsonl",
        [{"prompt": f"name {n} fruits .", "completion": " apple , pear , plum ."} for n in range(20)],
    )
    run_cli(
        "fit", "--config", CONFIG,
        "--model.model_name_or_path", model_path,
        "--data.path", str(data),
        "--data.batch_size", "4",
        "--data.num_eval_prompts", "4",
        "--trainer.max_steps", "3",
        "--trainer.val_check_interval", "3",
    )
    run = latest_run(in_tmp, "sft")
    assert len(metric_series(run, "val/loss")) == 2
    assert metric_series(run, "data/skipped_rows") == [0.0]
    assert "gold/reward" not in (run / "metrics.csv").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(in_tmp / "runs" / "sft" / "hf")
    original = AutoModelForCausalLM.from_pretrained(model_path)
    assert type(reloaded) is type(original)
    changed = any(not torch.equal(a, b) for a, b in zip(reloaded.parameters(), original.parameters()))
    assert changed, "training did not change the weights"


def test_sft_resumes_from_checkpoint(in_tmp, capsys):
    common = ["--config", CONFIG, "--trainer.val_check_interval", "10", "--data.num_eval_prompts", "8"]
    run_cli("fit", *common, "--trainer.max_steps", "10")
    checkpoint = next((latest_run(in_tmp, "sft") / "checkpoints").glob("*.ckpt"))
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 10
    # What the resuming command line says holds (Lightning alone would take the checkpoint's export_dir), and a
    # changed argument is named.
    changed = r"changed model arguments: optimizer=.*'learning_rate': 0.001.*, export_dir='resumed_hf' \("
    with pytest.warns(UserWarning, match=changed):
        run_cli("fit", *common, "--trainer.max_steps", "20", "--ckpt_path", str(checkpoint),
                "--model.export_dir", "resumed_hf", "--model.optimizer.learning_rate", "0.001",
                "--trainer.callbacks+=LearningRateMonitor", "--trainer.log_every_n_steps", "1")
    assert (in_tmp / "resumed_hf" / "config.json").is_file()
    # The new learning rate, on the schedule of the new step count (warm-up over sft.yaml's 20 steps): not the
    # checkpoint's 0.003, nor its schedule's rate at step 10.
    rates = {int(row["step"]): float(row["lr-AdamW"]) for row in metric_rows(latest_run(in_tmp, "sft"))
             if row.get("lr-AdamW")}
    assert rates == pytest.approx({step: 0.001 * step / 20 for step in range(10, 20)})
    resumed = next((latest_run(in_tmp, "sft") / "checkpoints").glob("*.ckpt"))
    assert torch.load(resumed, weights_only=False)["global_step"] == 20
    # A resumed run does not re-validate the untrained model first: one validation, at step 20.
    assert len(metric_series(latest_run(in_tmp, "sft"), "val/loss")) == 1
    # Another seed would split and order the data differently: refused in one line.
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *common, "--trainer.max_steps", "20", "--ckpt_path", str(checkpoint), "--seed_everything", "1")
    assert exit_info.value.code == 2
    # Adapters where the checkpoint holds the whole model cannot load its weights: one line, not a state-dict error.
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *common, "--trainer.max_steps", "20", "--ckpt_path", str(checkpoint), "--model.lora.r", "4")
    assert exit_info.value.code == 2
    assert "holds the weights of lora=None, which lora={'r': 4," in capsys.readouterr().err


def test_print_config_round_trips(in_tmp):
    def print_config(config: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "lit_rlhf", "fit", "--config", config, "--print_config"],
            capture_output=True, text=True, check=True,
        )
        return result.stdout

    first = print_config(CONFIG)
    (in_tmp / "printed.yaml").write_text(first)
    assert print_config(str(in_tmp / "printed.yaml")) == first
    assert "lit_rlhf.phases.sft.SFTModule" in first


def test_skipped_rows_are_counted_and_logged(in_tmp):
    rows = [{"prompt": "name two fruits .", "completion": "apple , pear ."}] * 8 + [{"prompt": "a"}, {"text": 5}]
    data = write_jsonl(in_tmp / "some_bad.jsonl", rows)
    run_cli(
        "fit", "--config", CONFIG, "--data.path", str(data), "--data.on_bad_row", "skip",
        "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--data.num_eval_prompts", "2",
    )
    assert metric_series(latest_run(in_tmp, "sft"), "data/skipped_rows") == [2.0]


def test_bad_row_exits_2_with_one_line(in_tmp):
    data = write_jsonl(in_tmp / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}])
    result = subprocess.run(
        [sys.executable, "-m", "lit_rlhf", "fit", "--config", CONFIG, "--data.path", str(data)],
        capture_output=True, text=True, cwd=in_tmp,
    )
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("lit-rlhf: error: ")
    assert "bad.jsonl:2" in last_line and "completion" in last_line
    assert "Traceback" not in result.stderr


def fit_sft(root: Path, demonstrations: str, recorder: StopAfter, ckpt_path: str | None = None) -> SFTModule:
    seed_everything(0)
    module = SFTModule(model_name_or_path="world", optimizer=OptimizerConfig(3e-3, warmup_steps=2))
    data = DemonstrationDataModule(path=demonstrations, batch_size=4, val_fraction=0.0)
    trainer = Trainer(max_steps=20, logger=False, enable_checkpointing=False, limit_val_batches=0,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                      callbacks=[recorder])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("stop_at", [5, 8, 11], ids=["first-epoch", "epoch-end", "second-epoch"])
def test_a_run_resumed_mid_epoch_sees_the_same_batches_as_an_uninterrupted_one(tmp_path, stop_at):
    rows = [{"prompt": f"name {n} fruits .", "completion": " ".join(["apple ,"] * (i % 5) + ["pear ."])}
            for i, n in enumerate(["one", "two", "three", "four", "five"] * 6)]
    demonstrations = str(write_jsonl(tmp_path / "demos.jsonl", rows))  # 30 rows: 8 batches an epoch
    uninterrupted = StopAfter()
    full = fit_sft(tmp_path, demonstrations, uninterrupted)
    checkpoint = tmp_path / "cut.ckpt"
    fit_sft(tmp_path, demonstrations, StopAfter(stop_at=stop_at, path=checkpoint))
    resumed = StopAfter()
    again = fit_sft(tmp_path, demonstrations, resumed, ckpt_path=str(checkpoint))

    assert_resumed_like_uninterrupted(uninterrupted, resumed, stop_at, 20, full.model, again.model)


@pytest.mark.parametrize("phase", ["sft", "rm"])
def test_sft_and_reward_model_train_in_train_mode(phase, tiny_gpt2_path, tmp_path):
    """``from_pretrained`` returns a model in eval mode and Lightning keeps each module's mode, so without care a
    Hugging Face model's dropout would be off during SFT and reward-model training."""
    from lit_rlhf.phases.reward import RewardModelModule

    modes = []

    class RecordMode(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append(pl_module.model.training)

    if phase == "sft":
        module = SFTModule(model_name_or_path=tiny_gpt2_path)
        rows = [{"prompt": "name three fruits .", "completion": " apple , pear , plum ."}] * 8
        data_class = DemonstrationDataModule
    else:
        module = RewardModelModule(model_name_or_path=tiny_gpt2_path)
        rows = [{"prompt": "list two colors .", "chosen": " red , blue .", "rejected": " red ."}] * 8
        data_class = ComparisonDataModule
    data = data_class(path=str(write_jsonl(tmp_path / "rows.jsonl", rows)), tokenizer_name_or_path=tiny_gpt2_path,
                      batch_size=4, val_fraction=0.0)
    trainer = Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=[RecordMode()],
                      default_root_dir=tmp_path)  # where the export goes
    trainer.fit(module, datamodule=data)
    assert modes == [True, True]


def test_the_loss_covers_every_assistant_turn_of_a_chat_or_only_the_last(tiny_chat_llama_path, tmp_path):
    from lit_rlhf.models import forward

    messages = TWO_TURN_CHAT
    path = str(write_jsonl(tmp_path / "chats.jsonl", [{"messages": messages}] * 4))
    module = SFTModule(model_name_or_path=tiny_chat_llama_path)
    module.configure_model()
    first, last = (len(module.tokenizer(turn + "<|im_end|>", add_special_tokens=False)["input_ids"])
                   for turn in ("apple , pear , plum .", "red , blue ."))

    def data(assistant_turns: str) -> DemonstrationDataModule:
        return DemonstrationDataModule(path=path, tokenizer_name_or_path=tiny_chat_llama_path, batch_size=4,
                                       val_fraction=0.0, max_length=256, max_prompt_length=128,
                                       assistant_turns=assistant_turns)

    for assistant_turns, trained_tokens in [("all", first + last), ("last", last)]:
        datamodule = data(assistant_turns)
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
        loss, response_tokens = module._loss(batch)
        assert response_tokens == 4 * trained_tokens, assistant_turns
        # The mean negative log-likelihood of exactly those tokens, each predicted from the one before.
        logits = forward(module.model, batch["input_ids"], batch["attention_mask"]).logits[:, :-1]
        nll = -torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        torch.testing.assert_close(loss, nll[batch["response_mask"][:, 1:].bool()].mean())

    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(SFTModule(model_name_or_path=tiny_chat_llama_path), datamodule=data("all"))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_sequences_longer_than_the_models_positions_are_refused_in_one_line(tiny_gpt2_path, tmp_path, capsys,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": "name three fruits .", "completion": " apple , pear , plum ."}] * 8
    path = str(write_jsonl(tmp_path / "rows.jsonl", rows))
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", CONFIG, "--model.model_name_or_path", tiny_gpt2_path, "--data.path", path,
                "--data.max_length", "200")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        f"sequences (data.max_length; sampled answers: max_prompt_length + sampling.max_new_tokens) of up to 200 "
        f"tokens do not fit "
        f"{tiny_gpt2_path}, which has 128 positions"
    )


def test_answers_sampled_past_the_models_positions_are_refused_before_training(tiny_gpt2_path, tmp_path, capsys,
                                                                               monkeypatch):
    """data.max_length fits the 128 positions, but the held-out answers each validation samples run to
    max_prompt_length + max_new_tokens = 96 + 48 tokens: an IndexError at the first validation until now."""
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": "name three fruits .", "completion": " apple , pear , plum ."}] * 8
    path = str(write_jsonl(tmp_path / "rows.jsonl", rows))
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", CONFIG, "--model.model_name_or_path", tiny_gpt2_path, "--data.path", path,
                "--data.max_length", "128", "--data.max_prompt_length", "96", "--model.sampling.max_new_tokens", "48")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"of up to 144 tokens do not fit {tiny_gpt2_path}, which has 128 "
                                                    "positions")


def test_rotary_models_are_not_held_to_their_max_position_embeddings(tiny_llama_path, tiny_gpt2_path):
    from lit_rlhf.errors import ConfigError
    from lit_rlhf.models import check_positions, load_causal_lm, load_tokenizer

    llama = load_causal_lm(tiny_llama_path, load_tokenizer(tiny_llama_path))
    check_positions(llama, 10 * llama.config.max_position_embeddings, "sequences")  # RoPE extrapolates
    gpt2 = load_causal_lm(tiny_gpt2_path, load_tokenizer(tiny_gpt2_path))
    with pytest.raises(ConfigError, match="sequences of up to 129 tokens do not fit"):
        check_positions(gpt2, 129, "sequences")  # learned positions end at 128
