"""The one model loader: what it prints and warns while loading a model from another head's export."""

from __future__ import annotations

import warnings

import pytest
from transformers import AutoModelForCausalLM

from lit_rlhf.models import export, load_causal_lm, load_scalar_head_model, load_tokenizer


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
