"""Comparison collection: k sampled responses per prompt, ranked by a judge, written as C(k, 2) pairs.

The seed's data-efficiency point: one ranking of k responses yields k(k−1)/2 comparisons. Output, in the
formats the data layer reads: ``comparisons.jsonl`` (``prompt``/``chosen``/``rejected``, and ``chosen_ended``/
``rejected_ended``, whether each answer ended or ran out of ``max_new_tokens``; tied pairs dropped and counted),
``rankings.jsonl`` (``prompt``/``responses``/``ranks``/``responses_ended``, the full ranking per prompt) and
``collect.json`` (what was done, with the counts).

The judge defaults to the world's simulated raters on the world's prompts; other prompts have no default judge.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.collate import tokenize_prompts
from lit_rlhf.data.datamodules import PromptDataModule, subsample
from lit_rlhf.data.formats import OnBadRow, make_chat_renderer, normalize_rows, ranking_to_pairs
from lit_rlhf.data.sources import read_rows
from lit_rlhf.errors import ConfigError, DataError
from lit_rlhf.generation import Response, SamplingConfig, generate
from lit_rlhf.judges import JUDGES_FOR_ANY_PROMPTS, WORLD_JUDGES, check_judge_options, make_judge, read_principles
from lit_rlhf.models import inference_device, load_causal_lm, load_tokenizer
from lit_rlhf.scoring import Scorer, gold_scorer


@dataclass
class CollectionSummary:
    policy: str
    judge: str
    k: int
    prompts: int
    pairs: int
    ties_dropped: int
    seconds: float
    gold_agreement: float | None = None
    """On the world: the share of the written pairs, among those gold does not tie, whose chosen response has the
    higher gold reward — how often this judge agrees with gold."""


def sample_responses(
    policy: str,
    prompts: list[str],
    k: int,
    sampling: SamplingConfig,
    max_prompt_length: int,
    batch_size: int,
    device: torch.device | None = None,
    dtype: str | None = None,
) -> list[list[Response]]:
    """``k`` independent samples from the policy export for each prompt, on ``device`` (default
    :func:`inference_device`), in ``dtype`` if given, each with whether it ended."""
    tokenizer = load_tokenizer(policy)
    model = load_causal_lm(policy, tokenizer, dtype=dtype, device=device or inference_device()).eval()
    repeated = [prompt for prompt in prompts for _ in range(k)]
    samples: list[Response] = []
    for start in range(0, len(repeated), batch_size):
        prompt_ids, prompt_mask = tokenize_prompts(tokenizer, repeated[start : start + batch_size], max_prompt_length)
        generation = generate(model, tokenizer, prompt_ids.to(model.device), prompt_mask.to(model.device), sampling)
        samples.extend(map(Response, generation.decode(tokenizer), generation.ended_with_eos.tolist()))
    return [samples[i * k : (i + 1) * k] for i in range(len(prompts))]


def write_comparisons(
    out_dir: Path, prompts: list[str], samples: list[list[Response]], ranks: list[list[int]], oracle: Scorer | None
) -> tuple[int, int, float | None]:
    """Each prompt's ranking to ``rankings.jsonl`` and its C(k, 2) pairs (ties left out) to ``comparisons.jsonl``;
    returns the pairs written, the ties left out and, with a gold ``oracle``, the share of the pairs gold decides
    whose chosen answer gold prefers."""
    pairs, ties, agree, decided = 0, 0, 0, 0
    with open(out_dir / "comparisons.jsonl", "w") as comparisons, open(out_dir / "rankings.jsonl", "w") as rankings:
        for prompt, group_samples, group_ranks in zip(prompts, samples, ranks):
            group = [sample.text for sample in group_samples]
            ended = {sample.text: sample.ended for sample in group_samples}
            rankings.write(json.dumps({"prompt": prompt, "responses": group, "ranks": group_ranks,
                                       "responses_ended": [sample.ended for sample in group_samples]}) + "\n")
            group_pairs, group_ties = ranking_to_pairs(group, group_ranks)
            ties += group_ties
            gold = dict(zip(group, oracle.score([prompt] * len(group), group).tolist())) if oracle else {}
            for chosen, rejected in group_pairs:
                comparisons.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                                              "chosen_ended": ended[chosen], "rejected_ended": ended[rejected]}) + "\n")
                pairs += 1
                if gold and (gold_margin := gold[chosen] - gold[rejected]) != 0:
                    decided += 1
                    agree += gold_margin > 0
    return pairs, ties, agree / decided if decided else None


def collect_comparisons(
    policy: str,
    out_dir: str | Path,
    k: int = 4,
    judge: str | None = None,
    judge_model: str | None = None,
    prompts_path: str | None = None,
    num_prompts: int = 2000,
    sampling: SamplingConfig = SamplingConfig(),
    max_prompt_length: int = 32,
    batch_size: int = 256,
    seed: int = 0,
    reward: str | None = None,
    principles_path: str | Path | None = None,
    on_bad_row: OnBadRow = "error",
) -> CollectionSummary:
    """Sample ``k`` responses per prompt from ``policy``, rank them with ``judge``, write pairs and rankings.

    Prompts come from ``prompts_path`` (any format the data layer reads) or the embedded world's training prompts,
    ``num_prompts`` of them drawn with ``seed`` where there are more, cut from the left to ``max_prompt_length``
    tokens. ``judge`` defaults to the world's simulated raters, which
    exist only for the world's prompts: other prompts need a judge named (:func:`default_judge`). ``judge_model`` is
    the reward-model export (``judge="reward_model"``) or causal LM (``judge="llm"``), ``reward`` the
    ``"package.module:function"`` of ``judge="function"``, and ``principles_path`` a text file of the LLM judge's
    principles; the LLM judge's verdicts are cached in ``out_dir/judge_cache.json``. ``on_bad_row`` is the data
    layer's: ``"skip"`` leaves bad prompt rows out (counted in a warning) where ``"error"`` stops at the first.
    """
    started = time.perf_counter()
    if k < 2 or num_prompts < 1:
        raise ConfigError(f"collect needs k of at least 2 answers per prompt (to compare) and num_prompts of at least "
                          f"1, got k={k}, num_prompts={num_prompts}")
    principles = read_principles(principles_path) if principles_path is not None else None
    prompt_data = PromptDataModule(
        path=prompts_path, tokenizer_name_or_path=policy, val_fraction=0.0, max_prompt_length=max_prompt_length,
        max_length=max_prompt_length + sampling.max_new_tokens, on_bad_row=on_bad_row,
    )
    prompt_data.setup("fit")
    prompts = [record.prompt for record in subsample(prompt_data.train_records, num_prompts, seed)]
    oracle = gold_scorer(prompts)
    on_world = oracle is not None
    judge = judge or default_judge(on_world)
    check_judge_options(judge, judge_model, reward, principles)
    if judge in WORLD_JUDGES and not on_world:
        raise ConfigError(
            f"judge {judge!r} knows only the embedded world's prompts, and these are not all the world's: use "
            f"{JUDGES_FOR_ANY_PROMPTS}"
        )
    torch.manual_seed(seed)
    samples = sample_responses(policy, prompts, k, sampling, max_prompt_length, batch_size)
    responses = [[sample.text for sample in group] for group in samples]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    requests = judge_requests(prompts_path, prompt_data.hparams.split, prompt_data.tokenizer) if judge == "llm" else {}
    ranker = make_judge(judge, judge_model, seed, out_dir / "judge_cache.json", reward, principles, requests)
    ranks = ranker.rank(prompts, responses, [[sample.ended for sample in group] for group in samples])
    pairs, ties, agreement = write_comparisons(out_dir, prompts, samples, ranks, oracle)
    if not pairs:
        raise DataError(f"{out_dir / 'comparisons.jsonl'}: no comparisons: the judge {judge!r} tied every pair of "
                        f"{len(prompts)} prompts × {k} answers")
    summary = CollectionSummary(policy, judge, k, len(prompts), pairs, ties, time.perf_counter() - started, agreement)
    (out_dir / "collect.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary


def default_judge(on_world: bool) -> str:
    """The judge when none is named: the world's simulated raters on the world's prompts. Other prompts have no
    default, since nothing about them says what a better answer is."""
    if not on_world:
        raise ConfigError(
            f"these prompts are not the embedded world's, so its simulated raters cannot rank the answers: name a "
            f"judge: {JUDGES_FOR_ANY_PROMPTS}"
        )
    return "raters"


def judge_requests(prompts_path: str | None, split: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """For each chat prompt of ``prompts_path``, the text the policy reads (rendered with ``tokenizer``'s chat
    template, as the data layer renders it) → the same conversation as plain ``Role: content`` lines (the data
    layer's default template, :data:`lit_rlhf.data.formats.DEFAULT_CHAT_TEMPLATE`), which is what an LLM judge is
    shown (:class:`lit_rlhf.judges.LLMJudge`'s ``requests``).

    The policy's template wraps a chat in its own scaffolding (``<|im_start|>user\n…<|im_end|>``), which a judge
    with another template, or none, would read as part of the request. The rendered text cannot be turned back into
    the messages in general — templates differ, and decoding it without special tokens still leaves the role names
    and any markers that are plain text (``[INST]``) — so the rows are read again through the same row parser with a
    renderer that remembers, for every chat it renders, the plain conversation. Text prompts are the data's own
    text and are shown as they are; the world's prompts are all text.
    """
    if prompts_path is None:
        return {}
    render_for_policy, render_plain = make_chat_renderer(tokenizer), make_chat_renderer()
    requests: dict[str, str] = {}

    def render_and_remember(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        rendered = render_for_policy(messages, add_generation_prompt)
        requests[rendered] = render_plain(messages, False).rstrip()
        return rendered

    normalize_rows(read_rows(prompts_path, split), "prompt", prompts_path, render_and_remember, on_bad_row="skip")
    return requests
