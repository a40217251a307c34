"""Shared fixtures: offline settings, a per-session world cache, and tiny real models saved to disk.

Tiny GPT-2 and Llama models are built with ``from_config`` and written with ``save_pretrained``, so tests load
them by path through the same code a user's Hugging Face model goes through.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

CORPUS = [
    "name three fruits . apple , pear , plum .",
    "the quick brown fox jumps over the lazy dog .",
    "User: hello there\nAssistant: hi , how can I help ?",
    "list two colors . red , blue .",
] * 20


@pytest.fixture(scope="session", autouse=True)
def world_cache(tmp_path_factory):
    """Each test session writes the embedded world once, into its own folder."""
    cache = tmp_path_factory.mktemp("lit-rlhf-cache")
    os.environ["LIT_RLHF_CACHE"] = str(cache)
    return cache


@pytest.fixture(autouse=True)
def no_global_seed(monkeypatch):
    """Each test starts without a global seed, so a test that seeds Lightning with another value than 0 cannot
    change the data order of the tests after it (a DataModule without ``split_seed`` takes the global seed)."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


def _bpe_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"])
    # Like GPT-2's own tokenizer: an EOS token and no pad token, so the loader has to supply one.
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    tokenizer = _bpe_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-gpt2")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    tokenizer = _bpe_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, the chat template of Qwen's and many other chat models' tokenizers."""


@pytest.fixture(scope="session")
def tiny_chat_llama_path(tmp_path_factory):
    """A tiny Llama whose tokenizer speaks ChatML (its template and its special tokens) and reads " A" and " B" as
    one token each, as real chat tokenizers do: a chat policy, or an LLM judge (512 positions: room for one)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    torch.manual_seed(0)
    verdicts = ["The better answer is Answer A .", "The better answer is Answer B ."] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS + verdicts, vocab_size=360, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"], chat_template=CHATML_TEMPLATE,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def world_sft_path(tmp_path_factory):
    """A briefly trained SFT policy on the embedded world, exported in Hugging Face format (~10 s)."""
    from lit_rlhf.cli import main

    root = tmp_path_factory.mktemp("world-sft")
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "sft.yaml")
    main([
        "fit", "--config", config,
        "--trainer.max_steps", "300", "--trainer.val_check_interval", "300",
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
        "--data.num_eval_prompts", "16", "--model.export_dir", str(root / "hf"),
    ])
    return str(root / "hf")


@pytest.fixture(scope="session")
def world_rm_path(world_sft_path, tmp_path_factory):
    """A reward-model export initialised from the world SFT policy (scalar head untrained): for plumbing tests."""
    from lit_rlhf.models import export, load_scalar_head_model, load_tokenizer

    torch.manual_seed(0)
    tokenizer = load_tokenizer(world_sft_path)
    path = tmp_path_factory.mktemp("world-rm")
    export(load_scalar_head_model(world_sft_path, tokenizer), tokenizer, path)
    return str(path)
