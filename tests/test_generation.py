"""The one generation path on a model that is not the world's: a tiny Llama with a byte-level BPE tokenizer."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import GenerationConfig

from lit_rlhf.data.collate import tokenize_prompts
from lit_rlhf.generation import Generation, SamplingConfig, generate
from lit_rlhf.models import load_causal_lm, load_tokenizer

PROMPTS = ["name three fruits .", "User: hello there\nAssistant:"]


def sample(path: str, seed: int = 0) -> torch.Tensor:
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer)
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, PROMPTS * 4, 32)
    torch.manual_seed(seed)
    return generate(model, tokenizer, prompt_ids, prompt_mask, SamplingConfig(max_new_tokens=12)).response_ids


def test_a_models_saved_generation_settings_do_not_change_sampling(tiny_llama_path, tmp_path):
    """An instruct export often saves repetition_penalty or min_p: sampling must still be the distribution the
    log-probs describe (logits / T), so the export samples exactly as one without those settings."""
    saved = tmp_path / "instruct"
    shutil.copytree(tiny_llama_path, saved)
    instruct = GenerationConfig(do_sample=True, repetition_penalty=1.5, min_p=0.3, no_repeat_ngram_size=1, top_k=3)
    instruct.save_pretrained(saved)
    assert torch.equal(sample(str(saved)), sample(tiny_llama_path))
    tokenizer = load_tokenizer(str(saved))
    model = load_causal_lm(str(saved), tokenizer)
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, PROMPTS, 32)
    generate(model, tokenizer, prompt_ids, prompt_mask, SamplingConfig(max_new_tokens=2))
    assert model.generation_config.repetition_penalty == 1.5  # the model's own settings are back afterwards


def test_decoded_responses_keep_their_leading_space(tiny_llama_path):
    """Byte-level BPE puts the space before a word into the word's token: the decoded response keeps it, so that
    tokenising prompt and response again gives back the sampled ids."""
    tokenizer = load_tokenizer(tiny_llama_path)
    response = " apple , pear , plum ."
    response_ids = torch.tensor([tokenizer(response, add_special_tokens=False)["input_ids"]])
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, ["name three fruits ."], 32)
    generation = Generation(prompt_ids, prompt_mask, response_ids, torch.ones_like(response_ids),
                            torch.tensor([False]))
    (decoded,) = generation.decode(tokenizer)
    assert decoded == response
    assert tokenizer(decoded, add_special_tokens=False)["input_ids"] == response_ids[0].tolist()


class RecordingScorer:
    """Scores every response 0 and remembers which ones it was told had ended."""

    def __init__(self) -> None:
        self.finished: list[bool] = []

    def score(self, prompts, responses, finished=None) -> torch.Tensor:
        self.finished.extend([None] * len(responses) if finished is None else finished)
        return torch.zeros(len(responses))


def test_a_truncated_response_is_scored_as_it_is_without_eos(tiny_llama_path):
    """The reward model read a finished answer as ``prompt + response + EOS`` in training; an answer cut at
    ``max_new_tokens`` has no EOS, and appending one would score it as complete."""
    from lit_rlhf.models import scalar_scores
    from lit_rlhf.scoring import RewardModelScorer

    torch.manual_seed(0)
    scorer = RewardModelScorer.from_pretrained(tiny_llama_path)
    tokenizer = scorer.tokenizer
    prompt, response = "name three fruits .", " apple , pear"
    ids = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]

    def read(sequence: list[int]) -> float:
        return scalar_scores(scorer.model, torch.tensor([sequence]), torch.ones(1, len(sequence), dtype=torch.long))

    finished, truncated = scorer.score([prompt] * 2, [response] * 2, [True, False]).tolist()
    assert finished == pytest.approx(read(ids + [tokenizer.eos_token_id]).item(), abs=1e-6)
    assert truncated == pytest.approx(read(ids).item(), abs=1e-6)
    assert abs(finished - truncated) > 1e-4
    assert scorer.score([prompt], [response]).item() == pytest.approx(finished, abs=1e-6)  # texts alone are complete


def test_every_sampling_path_tells_the_scorer_which_answers_ended(tiny_llama_path, tmp_path):
    """Evaluation, best-of-n and the reward model's statistics sample through one path: each answer reaches the
    scorer with whether it stopped on EOS, the same flags the generation recorded."""
    from lit_rlhf.collect import sample_responses
    from lit_rlhf.evaluation import evaluate_policy
    from lit_rlhf.selection import pick_best

    tokenizer = load_tokenizer(tiny_llama_path)
    model = load_causal_lm(tiny_llama_path, tokenizer)
    with torch.no_grad():  # EOS's logit 4·h₀, every other token's 0: some answers end within 3 tokens, some are cut
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 4.0
    model.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    sampling = SamplingConfig(max_new_tokens=3)
    torch.manual_seed(0)
    groups = sample_responses(str(tmp_path / "policy"), PROMPTS, 16, sampling, 32, 64)
    ended = [response.ended for group in groups for response in group]
    assert 0 < sum(ended) < len(ended)

    recorder = RecordingScorer()
    pick_best(PROMPTS, groups, recorder)
    assert recorder.finished == ended

    recorder = RecordingScorer()
    evaluation = evaluate_policy(model, tokenizer, PROMPTS * 8, sampling, 32, seed=0, scorer=recorder)
    assert None not in recorder.finished
    assert sum(recorder.finished) / len(recorder.finished) == evaluation.metrics["response/eos_fraction"]
