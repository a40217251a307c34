"""The models package: what the loader prints and warns while loading a model from another head's export, GPT-2's
GELU run as one fused op, dropout switched off, the entropy that comes with a model's log-probs, and the response
window those log-probs come from."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.activations import FastGELUActivation, NewGELUActivation

from lit_rlhf import losses
from lit_rlhf.models import (
    export,
    forward,
    load_causal_lm,
    load_scalar_head_model,
    load_tokenizer,
    model_token_logprobs,
    response_logits,
    without_dropout,
)


def test_loading_across_heads_prints_no_load_report_and_warns_nothing(tiny_gpt2_path, tmp_path, capfd):
    """A reward model starts from a causal LM's export, and a causal LM may load a reward model's: transformers'
    reports of the head dropped or added on the way are expected, and its bars are noise."""
    tokenizer = load_tokenizer(tiny_gpt2_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reward_model = load_scalar_head_model(tiny_gpt2_path, tokenizer)
        export(reward_model, tokenizer, tmp_path / "rm")
        load_causal_lm(str(tmp_path / "rm"), tokenizer)
        load_scalar_head_model(str(tmp_path / "rm"), tokenizer)
    printed = capfd.readouterr()
    for noise in ("LOAD REPORT", "MISSING", "UNEXPECTED", "Loading weights", "were not initialized"):
        assert noise not in printed.out + printed.err, noise
    assert not [str(warning.message) for warning in caught if "untrained" in str(warning.message)]


def test_weights_missing_beyond_a_new_head_are_named_in_one_warning(tiny_gpt2_path, tmp_path):
    """Silencing transformers' report must not hide a checkpoint that lacks part of the network."""
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_path)
    partial = {name: weight for name, weight in model.state_dict().items() if not name.startswith("transformer.h.1.")}
    model.save_pretrained(tmp_path / "partial", state_dict=partial)
    tokenizer = load_tokenizer(tiny_gpt2_path)
    tokenizer.save_pretrained(tmp_path / "partial")
    for load in (load_causal_lm, load_scalar_head_model):
        with pytest.warns(UserWarning, match=r"partial lacks \d+ weights of GPT2\w+, which start untrained: "
                                             r"transformer\.h\.1\.") as caught:
            load(str(tmp_path / "partial"), tokenizer)
        assert not any("score" in str(warning.message) for warning in caught)  # the new head is expected


def test_without_dropout_switches_off_attention_dropout_outside_nn_dropout():
    """Llama-family attention reads a float ``attention_dropout`` in train mode: PPO's ratio π/π_old must still be 1
    for the same weights, so two forward passes in train mode agree."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()
    tokens = torch.randint(0, 50, (2, 12))
    assert not torch.equal(model(tokens).logits, model(tokens).logits)  # the dropout this is about
    without_dropout(model)
    assert torch.equal(model(tokens).logits, model(tokens).logits)
    assert model.config.attention_dropout == 0.0


def test_entropy_is_only_measured_without_an_entropy_bonus(tiny_llama_path):
    """PPO logs the policy's entropy at every update, but builds no autograd graph through the full-vocabulary
    softmax unless its entropy bonus needs the gradient."""
    tokenizer = load_tokenizer(tiny_llama_path)
    model = load_causal_lm(tiny_llama_path, tokenizer)
    tokens = torch.tensor([tokenizer("name three fruits . apple , pear", add_special_tokens=False)["input_ids"]])
    mask = torch.ones_like(tokens)
    logps, _, entropy = model_token_logprobs(model, tokens, mask, mask, return_entropy=True, entropy_grad=False)
    assert logps.requires_grad and not entropy.requires_grad
    _, _, with_grad = model_token_logprobs(model, tokens, mask, mask, return_entropy=True)
    assert with_grad.requires_grad and torch.allclose(with_grad.detach(), entropy)


def _full_logit_logprobs(model, input_ids, attention_mask, response_mask, temperature):
    """What model_token_logprobs computed before it kept only the response window: every position's logits."""
    logits = forward(model, input_ids, attention_mask).logits / temperature
    logits, labels, mask = losses.shift_for_next_token(logits, input_ids, response_mask)
    return losses.token_logprobs(logits, labels), losses.entropy_from_logits(logits), mask


class _IgnoresLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward takes keyword arguments but ignores ``logits_to_keep`` (a remote-code model)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, logits_to_keep=0, **kwargs):
        return self.model(**kwargs)


@pytest.mark.parametrize("wrap", [False, True])
def test_log_probs_come_from_the_response_window_alone_and_equal_the_full_computation(tiny_llama_path, wrap):
    """Two rows, right-padded, whose responses start at columns 4 and 6: the LM head runs on columns 3.. only
    (the model is asked for 7 of 10 positions), and every response log-prob and entropy is bit-identical to the
    full-sequence computation. A model that returns every position's logits anyway is cut to the same window."""
    tokenizer = load_tokenizer(tiny_llama_path)
    model = load_causal_lm(tiny_llama_path, tokenizer)
    head_rows = []
    model.lm_head.register_forward_hook(lambda head, inputs, output: head_rows.append(inputs[0].shape[1]))
    torch.manual_seed(0)
    input_ids = torch.randint(3, len(tokenizer), (2, 10))
    attention_mask = torch.tensor([[1] * 10, [1] * 8 + [0] * 2])
    response_mask = torch.tensor([[0] * 4 + [1] * 6, [0] * 6 + [1] * 2 + [0] * 2])
    expected_logps, expected_entropy, expected_mask = _full_logit_logprobs(
        model, input_ids, attention_mask, response_mask, 0.7
    )
    head_rows.clear()
    runner = _IgnoresLogitsToKeep(model) if wrap else model
    logps, mask, entropy = model_token_logprobs(
        runner, input_ids, attention_mask, response_mask, 0.7, return_entropy=True
    )
    assert head_rows == [10 if wrap else 7]
    assert logps.shape == entropy.shape == (2, 9) and torch.equal(mask, expected_mask)
    assert torch.equal(logps * mask, expected_logps * mask)
    assert torch.equal(entropy * mask, expected_entropy * mask)
    assert torch.equal(logps[:, :3], torch.zeros(2, 3))  # the prompt columns before the window

    logits, window_ids, window_mask, start = response_logits(model, input_ids, attention_mask, response_mask)
    assert start == 3 and logits.shape[1] == 7
    assert torch.equal(window_ids, input_ids[:, 3:]) and torch.equal(window_mask, response_mask[:, 3:])
    full_logits = forward(model, input_ids, attention_mask).logits
    assert torch.equal(losses.sft_loss(logits, window_ids, window_mask),
                       losses.sft_loss(full_logits, input_ids, response_mask))


def test_training_forwards_build_no_generation_cache(tiny_gpt2_path):
    tokenizer = load_tokenizer(tiny_gpt2_path)
    model = load_causal_lm(tiny_gpt2_path, tokenizer)
    tokens = torch.tensor([[5, 6, 7, 8]])
    assert model(input_ids=tokens).past_key_values is not None  # what the model does unless told
    assert forward(model, tokens, torch.ones_like(tokens)).past_key_values is None


def _tanh_gelu_config(family: str, vocab_size: int):
    """Two-layer configs of the families whose MLP uses transformers' eight-op tanh GELU."""
    from transformers import GPT2Config, GPTJConfig, GPTNeoConfig, PhiConfig

    gpt2 = dict(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    return {
        "gpt2": lambda: GPT2Config(**gpt2),
        "gpt2-gelu_fast": lambda: GPT2Config(activation_function="gelu_fast", **gpt2),
        "gptj": lambda: GPTJConfig(rotary_dim=8, **gpt2),
        "gpt_neo": lambda: GPTNeoConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=2,
                                        attention_types=[[["global", "local"], 1]], window_size=4,
                                        max_position_embeddings=64),
        "phi": lambda: PhiConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64),
    }[family]()


@pytest.mark.parametrize("family", ["gpt2", "gpt2-gelu_fast", "gptj", "gpt_neo", "phi"])
def test_the_eight_op_tanh_gelu_runs_as_torchs_fused_one_with_the_same_outputs_and_gradients(
    family, tiny_gpt2_path, tmp_path
):
    tokenizer = load_tokenizer(tiny_gpt2_path)
    torch.manual_seed(0)
    path = tmp_path / family
    AutoModelForCausalLM.from_config(_tanh_gelu_config(family, len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    eight_op = (NewGELUActivation, FastGELUActivation)
    as_saved = AutoModelForCausalLM.from_pretrained(path)
    assert sum(isinstance(layer, eight_op) for layer in as_saved.modules()) == 2  # one per MLP
    for load in (load_causal_lm, load_scalar_head_model):
        layers = list(load(str(path), tokenizer).modules())
        assert sum(type(layer).__name__ == "GELUTanh" for layer in layers) == 2
        assert not any(isinstance(layer, eight_op) for layer in layers)
    model = load_causal_lm(str(path), tokenizer)

    tokens = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    fused, eight_ops = model(input_ids=tokens).logits, as_saved(input_ids=tokens).logits
    torch.testing.assert_close(fused, eight_ops, atol=1e-5, rtol=0)
    fused.logsumexp(-1).sum().backward()
    eight_ops.logsumexp(-1).sum().backward()
    for (name, weight), reference in zip(model.named_parameters(), as_saved.parameters(), strict=True):
        torch.testing.assert_close(weight.grad, reference.grad, atol=1e-5, rtol=1e-4, msg=name)

    export(model, tokenizer, tmp_path / "export")  # the config keeps its activation: the export loads as saved
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert sum(isinstance(layer, eight_op) for layer in exported.modules()) == 2
