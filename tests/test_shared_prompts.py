"""Responses that share prompts: the batch layout, each prompt computed once, and the same log-probs, scores and
gradients as whole sequences give, up to float rounding, for GPT-2, Llama and five more model families (two with a
sliding window); deterministic gradients; one-line errors for a model that cannot share."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lit_rlhf.data.collate import collate_comparisons, shared_prompts
from lit_rlhf.errors import ConfigError
from lit_rlhf.models import (
    AdaptersOff,
    SharedPrompts,
    forward_sharing_prompts,
    load_causal_lm,
    load_scalar_head_model,
    load_tokenizer,
    model_token_logprobs,
    scalar_scores,
    select_rows,
    shared_prompt_logprobs,
    shared_prompt_scores,
    shares_prompts,
)
from lit_rlhf.phases.dpo_logprobs import pair_logprobs


def test_each_distinct_prompt_and_response_gets_one_row():
    """Pairs 0 and 1 share a prompt, and pair 0's rejected answer is pair 1's chosen one: two prompts, five
    responses, each pair pointing at its rows; prompts left-padded, responses right-padded."""
    layout, rows = shared_prompts(
        [[5, 6, 7], [5, 6, 7], [4], [5, 6, 7], [5, 6, 7], [4]],
        [[8, 9], [10], [8, 9], [10], [11, 12, 13], [10]],
        pad_id=0,
    )
    assert layout.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 4]]
    assert layout.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert layout.response_ids.tolist() == [[8, 9, 0], [10, 0, 0], [8, 9, 0], [11, 12, 13], [10, 0, 0]]
    assert layout.response_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert layout.prompt_of.tolist() == [0, 0, 1, 0, 1]
    assert rows.tolist() == [0, 1, 2, 1, 3, 4]


def _pairs(vocab_size: int) -> list[dict]:
    """Four pairs with prompts of 3 to 7 tokens; pairs 0 and 1 share their prompt and one answer."""
    generator = torch.Generator().manual_seed(0)

    def tokens(count: int) -> list[int]:
        return torch.randint(3, vocab_size, (count,), generator=generator).tolist()

    prompts, answers = [tokens(7), tokens(3), tokens(5)], [tokens(n) for n in (4, 9, 1, 6, 5, 2)]
    pairs = [(0, 0, 1), (0, 2, 0), (1, 3, 4), (2, 5, 1)]
    return [{"prompt_ids": prompts[p], "chosen_ids": answers[c], "rejected_ids": answers[r], "margin": None,
             "prompt": "", "chosen": "", "rejected": ""} for p, c, r in pairs]


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_shared_prompt_log_probs_and_gradients_equal_whole_sequences(architecture, tiny_gpt2_path, tiny_llama_path):
    path = {"gpt2": tiny_gpt2_path, "llama": tiny_llama_path}[architecture]
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer)
    batch = collate_comparisons(_pairs(len(tokenizer)), tokenizer.pad_token_id)
    positions = []
    model.get_input_embeddings().register_forward_hook(lambda module, inputs, output: positions.append(output.shape[1]))

    whole, _, _ = pair_logprobs(model, batch, average=False, share_prompts=False)
    whole.sum().backward()
    whole_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    shared, token_logps, mask = pair_logprobs(model, batch, average=False, share_prompts=True)
    shared.sum().backward()

    assert positions == [16, 7, 9]  # 8 rows of 16 columns; then 3 prompts of 7, and 7 distinct answers of 9
    torch.testing.assert_close(shared, whole, rtol=0, atol=1e-5)
    assert mask.sum(1).tolist() == [4, 1, 6, 2, 9, 4, 5, 9]  # each row's answer tokens, chosen then rejected
    for parameter, expected in zip(model.parameters(), whole_grads):
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-4, atol=1e-5)  # sums in another order


def _decoder(family: str) -> torch.nn.Module:
    """A two-layer decoder of a model family, random weights; Mistral's and Gemma 3's attend over a 4-token sliding
    window, shorter than the sequences, so the cache must respect it."""
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        GPTNeoXConfig,
        MistralConfig,
        OPTConfig,
        Qwen3Config,
    )

    sizes = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=128, pad_token_id=0)
    config = {
        "mistral": lambda: MistralConfig(sliding_window=4, num_key_value_heads=2, **sizes),
        "gemma3": lambda: Gemma3TextConfig(sliding_window=4, head_dim=8, num_key_value_heads=2, **sizes),
        "qwen3": lambda: Qwen3Config(head_dim=8, num_key_value_heads=2, **sizes),
        "gpt_neox": lambda: GPTNeoXConfig(**sizes),
        "opt": lambda: OPTConfig(vocab_size=300, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=0),
    }[family]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["mistral", "gemma3", "qwen3", "gpt_neox", "opt"])
def test_shared_prompts_give_whole_sequence_log_probs_across_model_families(family):
    model = _decoder(family)
    batch = collate_comparisons(_pairs(model.config.vocab_size), pad_id=0)
    with torch.no_grad():
        whole, _, _ = pair_logprobs(model, batch, average=False, share_prompts=False)
        shared, _, _ = pair_logprobs(model, batch, average=False, share_prompts=True)
    assert shares_prompts(model)
    torch.testing.assert_close(shared, whole, rtol=0, atol=2e-5)


def test_shared_prompt_log_probs_match_the_token_log_probs_of_whole_sequences(tiny_llama_path):
    """Per token, not only summed: each answer token's log-prob sits where model_token_logprobs puts it."""
    tokenizer = load_tokenizer(tiny_llama_path)
    model = load_causal_lm(tiny_llama_path, tokenizer)
    batch = collate_comparisons(_pairs(len(tokenizer)), tokenizer.pad_token_id)
    with torch.no_grad():
        whole, whole_mask = model_token_logprobs(
            model, batch["chosen_input_ids"], batch["chosen_attention_mask"], batch["chosen_response_mask"]
        )
        shared, mask = shared_prompt_logprobs(model, batch["shared_prompts"])
    for pair, row in enumerate(batch["chosen_row"].tolist()):
        torch.testing.assert_close(shared[row][mask[row] == 1], whole[pair][whole_mask[pair] == 1], rtol=0, atol=1e-5)


def test_shared_prompt_scores_and_their_gradients_equal_whole_sequence_scores(tiny_llama_path):
    tokenizer = load_tokenizer(tiny_llama_path)
    model = load_scalar_head_model(tiny_llama_path, tokenizer)
    torch.nn.init.normal_(model.score.weight)
    batch = collate_comparisons(_pairs(len(tokenizer)), tokenizer.pad_token_id)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # a loss that weighs each pair's chosen score differently
    whole = scalar_scores(model, batch["chosen_input_ids"], batch["chosen_attention_mask"])
    (whole * weights).sum().backward()
    whole_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    shared = select_rows(shared_prompt_scores(model, batch["shared_prompts"]), batch["chosen_row"])
    (shared * weights).sum().backward()
    for parameter, expected in zip(model.parameters(), whole_grads):
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        shared = shared_prompt_scores(model, batch["shared_prompts"])
        whole = whole.detach()
        empty = SharedPrompts(batch["shared_prompts"].prompt_ids[:1], batch["shared_prompts"].prompt_mask[:1],
                              torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                              torch.tensor([0]))
        prompt_alone = scalar_scores(model, empty.prompt_ids, empty.prompt_mask)
        empty_score = shared_prompt_scores(model, empty)
    torch.testing.assert_close(shared[batch["chosen_row"]], whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(empty_score, prompt_alone)  # an answer cut to nothing scores as its prompt's end


def test_selected_rows_are_exact_and_their_gradients_sum_the_repeats():
    table = torch.tensor([[1.5, -2.0], [3.25, 4.0]], requires_grad=True)
    picked = select_rows(table, torch.tensor([1, 1, 0]))
    assert picked.tolist() == [[3.25, 4.0], [3.25, 4.0], [1.5, -2.0]]
    (picked * torch.tensor([[1.0], [2.0], [4.0]])).sum().backward()
    assert table.grad.tolist() == [[4.0, 4.0], [3.0, 3.0]]


def test_models_that_take_a_key_value_cache_share_prompts(tiny_gpt2_path):
    tokenizer = load_tokenizer(tiny_gpt2_path)
    model = load_causal_lm(tiny_gpt2_path, tokenizer)
    assert shares_prompts(model)
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"]))
    assert shares_prompts(adapted) and shares_prompts(AdaptersOff(adapted))  # the LoRA policy and its reference
    assert not shares_prompts(torch.nn.Linear(2, 2))


def test_a_model_that_cannot_share_prompts_is_one_line_naming_the_setting(tiny_gpt2_path):
    tokenizer = load_tokenizer(tiny_gpt2_path)
    model = load_causal_lm(tiny_gpt2_path, tokenizer)
    batch = collate_comparisons(_pairs(len(tokenizer)), tokenizer.pad_token_id)
    original = model.forward

    def forward_without_cache(*args, cache=None, **kwargs):
        return original(*args, **kwargs)

    model.forward = forward_without_cache
    with pytest.raises(ConfigError, match="did not fill the key/value cache it was given.*set share_prompts: false"):
        forward_sharing_prompts(model, batch["shared_prompts"])
    with pytest.raises(ConfigError, match="Linear takes no key/value cache.*set share_prompts: false"):
        forward_sharing_prompts(torch.nn.Linear(2, 2), batch["shared_prompts"])


def test_selected_rows_keep_their_values_and_dtype_under_autocast():
    table = torch.tensor([[1.0 + 2**-20, 3.0], [-7.123456, 0.1]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        picked = select_rows(table, torch.tensor([1, 0, 1]))
    assert picked.dtype == torch.float32 and torch.equal(picked, table[[1, 0, 1]])


def test_shared_prompt_log_probs_stay_float32_under_bf16_autocast(tiny_llama_path):
    """Mixed precision (the multi-device trainer configs' ``bf16-mixed``): the shared log-probs are float32 sums near
    the whole sequences' (both run their matrix products in bf16), not sums rounded to bf16."""
    tokenizer = load_tokenizer(tiny_llama_path)
    model = load_causal_lm(tiny_llama_path, tokenizer)
    batch = collate_comparisons(_pairs(len(tokenizer)), tokenizer.pad_token_id)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        whole, _, _ = pair_logprobs(model, batch, average=False, share_prompts=False)
        shared, _, _ = pair_logprobs(model, batch, average=False, share_prompts=True)
    assert shared.dtype == whole.dtype == torch.float32
    torch.testing.assert_close(shared, whole, rtol=0, atol=0.1)


def test_selected_scores_keep_their_shape():
    assert select_rows(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2, 0, 2])).tolist() == [2.0, 0.5, 2.0]
