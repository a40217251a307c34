"""Collection off the embedded world: no default judge, a reward-function judge, the LLM judge's prompt (its own
chat template, the policy's chat prompts as plain text, principles from a file, one-token labels) and the
prompt-length limit."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import lit_rlhf.judges
from helpers import run_cli, write_jsonl
from lit_rlhf.cli import fit_phase
from lit_rlhf.collect import collect_comparisons
from lit_rlhf.errors import ConfigError, LitRLHFError
from lit_rlhf.generation import SamplingConfig
from lit_rlhf.judges import LLMJudge, ranks_from_scores
from lit_rlhf.models import load_causal_lm, load_tokenizer
from lit_rlhf.pipeline import run_stages
from lit_rlhf.pipeline_run import start_run

QUESTION = "name two fruits ."
GOOD, BAD = " apple , pear .", " dog ."
PRINCIPLES = "Prefer the answer that names fruits."
REWARD_MODULE = "collect_test_reward"


@pytest.fixture
def length_reward(tmp_path, monkeypatch) -> str:
    """A reward function module beside the command, as a user writes one for PPO: longer is better."""
    (tmp_path / f"{REWARD_MODULE}.py").write_text(
        "def longer(prompts, responses):\n    return [float(len(response)) for response in responses]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{REWARD_MODULE}:longer"


@pytest.fixture
def judge_inputs(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every batch the LLM judge's model is given: ``(input_ids, attention_mask)``."""
    batches = []
    original = lit_rlhf.judges.forward

    def recording(model, input_ids, attention_mask, *args, **kwargs):
        batches.append((input_ids.cpu(), attention_mask.cpu()))
        return original(model, input_ids, attention_mask, *args, **kwargs)

    monkeypatch.setattr(lit_rlhf.judges, "forward", recording)
    return batches


def read_texts(batches, tokenizer) -> list[str]:
    """The texts the model read, special tokens included."""
    return [tokenizer.decode(ids[mask.bool()], clean_up_tokenization_spaces=False)
            for input_ids, attention_mask in batches for ids, mask in zip(input_ids, attention_mask)]


def test_the_llm_judge_reads_a_plain_request_in_its_own_chat_template(tiny_chat_llama_path, judge_inputs):
    tokenizer = load_tokenizer(tiny_chat_llama_path)
    chat_prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                                add_generation_prompt=True)  # what a chat policy reads
    judge = LLMJudge(load_causal_lm(tiny_chat_llama_path, tokenizer), tokenizer, principles=PRINCIPLES,
                     requests={chat_prompt: f"User: {QUESTION}"})
    judge.prefer([chat_prompt], [GOOD], [BAD])
    shown_first, shown_second = read_texts(judge_inputs, tokenizer)
    assert shown_first == (
        f"<|im_start|>user\n{PRINCIPLES}\n\nRequest: User: {QUESTION}\n\nAnswer A: <<<{GOOD}>>>\n\n"
        f"Answer B: <<<{BAD}>>><|im_end|>\n<|im_start|>assistant\nThe better answer is Answer"
    )
    assert f"Answer A: <<<{BAD}>>>" in shown_second
    assert judge.label_ids == tokenizer.convert_tokens_to_ids(["ĠA", "ĠB"])  # " A" follows "Answer" as one token


def test_labels_that_are_not_one_token_after_the_judge_prompt_are_refused(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    # " A" is two tokens, and "A" merges with the "Answer" before it: neither can be read as the next token.
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["AnswerA", "AnswerB"] * 50, vocab_size=280, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    assert tokenizer.tokenize(" A") == ["Ġ", "A"] and tokenizer.tokenize("A") == ["A"]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=1))
    with pytest.raises(ConfigError, match=r"cannot score its answer labels 'A' and 'B'") as refused:
        LLMJudge(model, tokenizer, principles=PRINCIPLES)
    assert "\n" not in str(refused.value)


def test_collect_shows_the_llm_judge_chat_prompts_as_plain_text_with_the_principles_file(
    tiny_chat_llama_path, judge_inputs, tmp_path, capsys
):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [{"role": "user", "content": QUESTION}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "list two colors ."}]},
    ])
    (tmp_path / "principles.txt").write_text(PRINCIPLES + "\n")
    run_cli("collect", "--policy", tiny_chat_llama_path, "--prompts", str(prompts), "--judge", "llm",
            "--judge-model", tiny_chat_llama_path, "--principles", str(tmp_path / "principles.txt"), "--k", "2",
            "--max-new-tokens", "4", "--out", str(tmp_path / "out"))
    texts = read_texts(judge_inputs, load_tokenizer(tiny_chat_llama_path))
    assert texts and "judged by llm" in capsys.readouterr().out
    requests = {text.split("Request: ")[1].split("\n\nAnswer A:")[0] for text in texts}
    assert requests <= {f"User: {QUESTION}", "System: Be brief.\nUser: list two colors ."}
    for text in texts:  # the judge's template around the request, and none of the policy's inside it
        assert text.startswith(f"<|im_start|>user\n{PRINCIPLES}\n\nRequest: ")
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\nThe better answer is Answer")
        assert text.count("<|im_start|>") == 2 and text.count("<|im_end|>") == 1


@pytest.mark.parametrize("judge", [[], ["--judge", "raters"]])
def test_prompts_off_the_world_need_a_judge_named(judge, tiny_llama_path, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Write a haiku about rain."}])
    with pytest.raises(SystemExit) as stopped:
        run_cli("collect", "--policy", tiny_llama_path, "--prompts", str(prompts), *judge, "--out", str(tmp_path))
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and error.count("\n") == 1
    assert all(option in error for option in ("--judge reward_model --judge-model PATH",
                                              "--judge function --reward MODULE:FUNCTION",
                                              "--judge llm --judge-model PATH"))
    assert not (tmp_path / "comparisons.jsonl").exists()


def test_collect_ranks_by_a_reward_function(tiny_llama_path, length_reward, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Write a haiku about rain."},
                                                       {"prompt": "Name a colour."}])
    out = tmp_path / "out"
    run_cli("collect", "--policy", tiny_llama_path, "--prompts", str(prompts), "--judge", "function",
            "--reward", length_reward, "--k", "3", "--max-new-tokens", "6", "--out", str(out))
    assert json.loads((out / "collect.json").read_text())["judge"] == "function"
    for line in (out / "rankings.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["ranks"] == ranks_from_scores([len(response) for response in row["responses"]], row["responses"])
        assert len(row["responses_ended"]) == 3 and all(isinstance(e, bool) for e in row["responses_ended"])
    pairs = [json.loads(line) for line in (out / "comparisons.jsonl").read_text().splitlines()]
    assert pairs and all(len(pair["chosen"]) > len(pair["rejected"]) for pair in pairs)
    ended = {(row["prompt"], response): end for line in (out / "rankings.jsonl").read_text().splitlines()
             for row in [json.loads(line)] for response, end in zip(row["responses"], row["responses_ended"])}
    assert all(pair["chosen_ended"] == ended[pair["prompt"], pair["chosen"]]
               and pair["rejected_ended"] == ended[pair["prompt"], pair["rejected"]] for pair in pairs)
    assert not all(ended.values())  # 6 new tokens cut some answers short: those are marked


def test_collect_takes_on_bad_row_for_its_prompts(tiny_llama_path, length_reward, tmp_path, capsys):
    rows = [{"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Name a colour."}]},
            {"messages": [{"role": "user", "content": " "}]},
            {"prompt": "Write a haiku about rain."}]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    collect = ["collect", "--policy", tiny_llama_path, "--prompts", str(prompts), "--judge", "function",
               "--reward", length_reward, "--k", "2", "--max-new-tokens", "4"]
    with pytest.raises(SystemExit) as stopped:
        run_cli(*collect, "--out", str(tmp_path / "stopped"))
    assert stopped.value.code == 2 and capsys.readouterr().err.startswith(
        f"lit-rlhf: error: {prompts}:2: field 'messages': message 1 (user): content is empty")
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 rows: field 'messages': empty user message \(1, first at "
                                         rf"{prompts}:2\)"):
        run_cli(*collect, "--on-bad-row", "skip", "--out", str(tmp_path / "out"))
    rankings = [json.loads(line) for line in (tmp_path / "out" / "rankings.jsonl").read_text().splitlines()]
    assert len(rankings) == 2  # the empty system message is rendered, not a bad row


def test_a_pipeline_collect_stage_takes_a_reward_function_or_principles(
    tiny_llama_path, tiny_chat_llama_path, length_reward, judge_inputs, tmp_path
):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": QUESTION}])
    (tmp_path / "principles.txt").write_text(PRINCIPLES)
    sampling = {"k": 2, "max_new_tokens": 4}
    spec = {"prompts": str(prompts), "stages": [
        {"name": "by_function", "kind": "collect", "policy": tiny_llama_path, "judge": "function",
         "reward": length_reward, **sampling, "k": 4},  # k=2 drew two answers of one length: no pair to write
        {"name": "by_llm", "kind": "collect", "policy": tiny_llama_path, "judge": "llm",
         "judge_model": tiny_chat_llama_path, "principles": str(tmp_path / "principles.txt"), **sampling},
    ]}
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    run = start_run(tmp_path / "pipeline.yaml", fit_phase, tmp_path / "out")
    run_stages(run)
    assert json.loads((run.out_dir / "by_function" / "collect.json").read_text())["judge"] == "function"
    texts = read_texts(judge_inputs, load_tokenizer(tiny_chat_llama_path))
    assert texts and all(text.startswith(f"<|im_start|>user\n{PRINCIPLES}\n\n") for text in texts)


def test_the_truncation_count_honours_the_prompt_length_limit(tiny_llama_path, length_reward, tmp_path, monkeypatch):
    tokenizer = load_tokenizer(tiny_llama_path)
    texts = ["the quick brown fox jumps over the lazy dog . " * 2, "name three fruits . apple , pear , plum . " * 2]
    assert all(32 < len(tokenizer(text)["input_ids"]) <= 64 for text in texts)  # over the default limit, not 64
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": text} for text in texts])
    reported = []
    monkeypatch.setattr("lit_rlhf.data.datamodules.rank_zero_info", reported.append)

    def collect(max_prompt_length: int) -> None:
        collect_comparisons(tiny_llama_path, tmp_path / "out", k=2, judge="function", reward=length_reward,
                            prompts_path=str(prompts), sampling=SamplingConfig(4), max_prompt_length=max_prompt_length)

    collect(64)
    assert not [message for message in reported if "truncated" in message]
    collect(16)
    assert [message for message in reported if "truncated" in message] == [f"{prompts}: truncated 2 rows to fit the "
                                                                           "length limits"]


def test_principles_and_reward_functions_are_refused_where_no_judge_reads_them(tmp_path):
    with pytest.raises(ConfigError, match="principles file not found"):
        collect_comparisons("world", tmp_path, judge="llm", judge_model="x", principles_path=tmp_path / "none.txt")
    (tmp_path / "principles.txt").write_text(PRINCIPLES)
    with pytest.raises(ConfigError, match=r"judge 'raters' takes no principles \(--principles is for --judge llm\)"):
        collect_comparisons("world", tmp_path, judge="raters", principles_path=tmp_path / "principles.txt")
    with pytest.raises(ConfigError, match="judge 'gold' takes no reward function"):
        collect_comparisons("world", tmp_path, judge="gold", reward="module:function")
    with pytest.raises(ConfigError, match=r"needs a reward function --reward MODULE:FUNCTION, got 'module'"):
        collect_comparisons("world", tmp_path, judge="function", reward="module")



def test_counts_that_cannot_make_comparisons_are_refused_before_sampling(tmp_path):
    """The library's own check, for callers without a stage spec (`lit-rlhf collect` refuses these as a file's
    collect stage is refused: tests/test_cli.py)."""
    for settings, message in (({"k": 1}, "k=1, num_prompts=2000"), ({"num_prompts": 0}, "k=4, num_prompts=0")):
        with pytest.raises(ConfigError, match="collect needs k of at least 2 answers per prompt .to compare. and "
                                              f"num_prompts of at least 1, got {message}"):
            collect_comparisons("world", tmp_path, **settings)


def test_a_judge_that_ties_every_pair_writes_no_comparisons_and_says_so(tiny_llama_path, tmp_path, monkeypatch):
    (tmp_path / "flat_reward.py").write_text("def flat(prompts, responses):\n    return [0.0] * len(responses)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Name a colour."}])
    with pytest.raises(LitRLHFError, match=r"no comparisons: the judge 'function' tied every pair of 1 prompts × 3"):
        collect_comparisons(tiny_llama_path, tmp_path / "out", k=3, judge="function", reward="flat_reward:flat",
                            prompts_path=str(prompts), sampling=SamplingConfig(4))


def test_labels_the_tokenizer_reads_as_its_unknown_token_are_refused():
    """The world's word-level tokenizer has no "A" or "B": both would read as <unk>, every verdict a tie."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer("world")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=1))
    with pytest.raises(ConfigError, match=r"does not read each as a token of its own \(not the unknown token\)"):
        LLMJudge(model, tokenizer, principles=PRINCIPLES)
