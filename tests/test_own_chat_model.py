"""Your own chat model and data, end to end: a ChatML Llama on disk and data in the shapes of real hub datasets,
through `configs/pipeline_hf.yaml` as a user would run it (only the model name and the run's size changed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lit_rlhf import pipeline, run_folder
from lit_rlhf.cli import fit_phase
from lit_rlhf.data.collate import encode_comparisons
from lit_rlhf.report import publish_report

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).parents[1] / "configs"
EXAMPLE_MODELS = ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct")
SYSTEM = {"role": "system", "content": "the quick brown fox"}
EMPTY_SYSTEM = {"role": "system", "content": ""}
LONG = " ".join(["once upon a time"] * 500)
FRUITS = ["apple , pear .", "pear , plum .", "plum , apple ."]


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_hub_shaped_data(folder: Path) -> None:
    """The files configs/pipeline_hf.yaml names, each in the shape of the hub dataset it stands for."""
    folder.mkdir()
    # ultrachat_200k / Capybara: prompt, prompt_id and a multi-turn `messages` (here with a system turn)
    # what real exports carry: empty system prompts, a 2,000-word message, unicode and emoji, and a conversation
    # with an empty user turn that on_bad_row: skip drops (the turns either side of it stay user → assistant)
    write_jsonl(folder / "chats.jsonl", [
        {"prompt": f"name two fruits {i}", "prompt_id": f"{i:04x}",
         "messages": [SYSTEM if i % 3 else EMPTY_SYSTEM, user(f"name two fruits {i}"), assistant(FRUITS[i % 3]),
                      user("list two colors ." + (" ☕ café" if i % 4 == 0 else "")), assistant("red , blue .")]}
        for i in range(24)
    ] + [{"messages": [user("tell me a long story ."), assistant(LONG)]},
         {"messages": [user("name a fruit ."), user(""), assistant("pear 🍐 .")]}])
    # ultrafeedback_binarized as published: prompt, prompt_id, chosen/rejected dialogues, messages, scores
    write_jsonl(folder / "ultrafeedback.jsonl", [
        {"prompt": f"name two fruits {i}", "prompt_id": f"{i:064x}",
         "chosen": [user(f"name two fruits {i}"), assistant(FRUITS[i % 3])],
         "rejected": [user(f"name two fruits {i}"), assistant("the lazy dog .")],
         "messages": [user(f"name two fruits {i}"), assistant(FRUITS[i % 3])],
         "score_chosen": 8.0, "score_rejected": 3.5}
        for i in range(24)
    ])
    # Anthropic/hh-rlhf: two whole dialogues sharing their prompt
    write_jsonl(folder / "hh_rlhf.jsonl", [
        {"chosen": f"\n\nHuman: name two fruits {i}\n\nAssistant: {FRUITS[i % 3]}",
         "rejected": f"\n\nHuman: name two fruits {i}\n\nAssistant: the lazy dog ."}
        for i in range(24)
    ])
    # chat-format prompts, both shapes: a `messages` conversation and a message-list `prompt`
    write_jsonl(folder / "prompts.jsonl", [
        {"messages": [EMPTY_SYSTEM, user(f"name two fruits {i}")]} if i % 2
        else {"prompt": [user(f"list two colors {i}")]}
        for i in range(16)
    ] + [{"messages": [user("")]}])  # a bad prompt row, skipped by every stage that reads the file
    write_jsonl(folder / "eval_prompts.jsonl", [{"prompt": [SYSTEM, user(f"name three fruits {i}")]} for i in range(4)])


def small(spec: dict, model: str) -> dict:
    """The user's file with their model in place of the example's, and every stage cut to seconds."""
    text = yaml.safe_dump(spec)
    for example in EXAMPLE_MODELS:
        text = text.replace(example, model)
    spec = yaml.safe_load(text)
    spec["evaluation"] |= {"num_prompts": 2, "samples_per_prompt": 2, "max_new_tokens": 8, "max_prompt_length": 64}
    spec["on_bad_row"] = "skip"
    for stage in spec["stages"]:
        if "config" in stage:  # the package's phase config by name: the copied file has none beside it
            quick = {"trainer.max_steps": 2, "trainer.val_check_interval": 1, "trainer.limit_val_batches": 1,
                     "data.num_eval_prompts": 2, "data.batch_size": 4, "data.max_length": 128,
                     "data.max_prompt_length": 64}
            if stage["config"].endswith("ppo.yaml"):
                quick |= {"trainer.max_steps": 8, "model.sampling.max_new_tokens": 8}
                del quick["data.max_length"]
            if stage["config"].endswith("rm.yaml"):
                quick |= {"model.sampling.max_new_tokens": 8, "model.normalization_samples": 8}
            stage["args"] = {**stage.get("args", {}), **quick}
        if stage["kind"] == "collect":
            stage |= {"k": 2, "num_prompts": 4, "max_new_tokens": 8, "max_prompt_length": 64}
    return spec


def test_your_own_chat_model_and_data_end_to_end(tiny_chat_llama_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    write_hub_shaped_data(tmp_path / "data")
    (tmp_path / "my_rewards.py").write_text(
        "def score(prompts, responses):\n    return [-abs(len(response) - 12) / 12 for response in responses]\n"
    )
    spec = yaml.safe_load((CONFIGS / "pipeline_hf.yaml").read_text())
    (tmp_path / "pipeline_hf.yaml").write_text(yaml.safe_dump(small(spec, tiny_chat_llama_path)))
    fits = {}

    def recording_fit(args, runs_dir):
        fits[Path(runs_dir).name] = fit_phase(args, runs_dir)
        return fits[Path(runs_dir).name]

    rows = pipeline.run_pipeline(tmp_path / "pipeline_hf.yaml", recording_fit, tmp_path / "out", then=publish_report)
    out = tmp_path / "out"
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama_path)

    # SFT's loss covers both assistant turns of each chat, ended by <|im_end|>, and nothing of the system or user
    batch = next(iter(fits["sft"].datamodule.train_dataloader()))
    trained = tokenizer.decode(batch["input_ids"][0][batch["response_mask"][0].bool()])
    assert trained.count("<|im_end|>") == 2 and "red , blue ." in trained
    assert "system" not in trained and "quick brown fox" not in trained and "list two colors" not in trained

    # hh-rlhf's text dialogues reach KTO in the model's chat template, as every other stage's chats do
    kto_batch = next(iter(fits["kto"].datamodule.train_dataloader()))
    kto_text = tokenizer.decode(kto_batch["input_ids"][0])
    assert "<|im_start|>user\nname two fruits" in kto_text and "Human:" not in kto_text

    # collected answers cut at max_new_tokens are marked, and DPO trains them without the end-of-turn token
    pairs = [json.loads(line) for line in (out / "collect" / "comparisons.jsonl").open()]
    assert any(not (pair["chosen_ended"] and pair["rejected_ended"]) for pair in pairs)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    dpo_data = fits["dpo_rlaif"].datamodule
    records = dpo_data.train_records
    encoded = encode_comparisons(records, dpo_data.tokenizer, dpo_data.hparams.max_length, 64).examples
    assert [example["chosen_ids"][-1] == im_end for example in encoded] == [r.chosen_ended for r in records]
    assert [example["rejected_ids"][-1] == im_end for example in encoded] == [r.rejected_ended for r in records]

    # the summary: every stage ran; no world metric, as no prompt is the world's
    assert [row["stage"] for row in rows] == ["init", "sft", "collect", "rm", "dpo", "dpo_rlaif", "kto", "ppo"]
    for row in rows:
        assert row.get("gold_reward") is None and row.get("proxy_gap") is None and row.get("gold_accuracy") is None
    assert all(row["proxy_reward"] is not None for row in rows if row["stage"] in ("sft", "dpo", "kto", "ppo"))

    # the held-out prompts were rendered with the model's own chat template, as the policies trained on them
    samples = [json.loads(line) for line in (out / run_folder.EVAL_SAMPLES_FILE).open()]
    expected = tokenizer.apply_chat_template([SYSTEM, user("name three fruits 0")], tokenize=False,
                                             add_generation_prompt=True)
    assert samples[0]["prompt"] == expected

    # the LLM judge labelled the comparisons that dpo_rlaif trained on
    assert json.loads((out / "collect" / "collect.json").read_text())["judge"] == "llm"

    # every export loads with plain transformers, keeps the chat template and ends turns with one EOS
    for stage in ("sft", "dpo", "dpo_rlaif", "kto", "ppo"):
        export = out / stage / "hf"
        model = AutoModelForCausalLM.from_pretrained(export)
        exported = AutoTokenizer.from_pretrained(export)
        assert exported.chat_template == tokenizer.chat_template and exported.eos_token == "<|im_end|>"
        ids = exported.apply_chat_template([user("name two fruits")], add_generation_prompt=True, return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        assert model.generate(ids, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2
    reward_model = AutoModelForSequenceClassification.from_pretrained(out / "rm" / "hf")
    assert reward_model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 1)

    # the report: no gold panels or gold columns, the proxy named by its scorer; quiet logs
    page = (out / "report" / "index.html").read_text()
    assert "These runs have no gold reward" in page and "gold_reward" not in page and "proxy_scorer" in page
    assert all(row.get("proxy_scorer") == "rm" for row in rows if row.get("proxy_reward") is not None)
    for log in out.glob("*/log.txt"):
        assert "💡 Tip" not in log.read_text() and "wandb: Run summary" not in log.read_text()
