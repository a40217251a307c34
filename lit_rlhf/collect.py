"""Comparison collection: k sampled responses per prompt, ranked by a judge, written as C(k, 2) pairs.

The seed's data-efficiency point: one ranking of k responses yields k(k−1)/2 comparisons. Output, in the
formats the data layer reads: ``comparisons.jsonl`` (``prompt``/``chosen``/``rejected``; tied pairs dropped and
counted), ``rankings.jsonl`` (``prompt``/``responses``/``ranks``, the full ranking per prompt) and
``collect.json`` (what was done, with the counts).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lit_rlhf.data.collate import tokenize_prompts
from lit_rlhf.data.datamodules import PromptDataModule
from lit_rlhf.data.formats import ranking_to_pairs
from lit_rlhf.judges import make_judge
from lit_rlhf.models import inference_device, load_causal_lm, load_tokenizer
from lit_rlhf.rollout import SamplingConfig, generate
from lit_rlhf.world import gold_reward, has_gold


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
) -> list[list[str]]:
    """``k`` independent samples from the policy export for each prompt, on ``device`` (default
    :func:`inference_device`), in ``dtype`` if given."""
    tokenizer = load_tokenizer(policy)
    model = load_causal_lm(policy, tokenizer, dtype=dtype, device=device or inference_device()).eval()
    repeated = [prompt for prompt in prompts for _ in range(k)]
    texts: list[str] = []
    for start in range(0, len(repeated), batch_size):
        prompt_ids, prompt_mask = tokenize_prompts(tokenizer, repeated[start : start + batch_size], max_prompt_length)
        prompt_ids, prompt_mask = prompt_ids.to(model.device), prompt_mask.to(model.device)
        texts.extend(generate(model, tokenizer, prompt_ids, prompt_mask, sampling).decode(tokenizer))
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def collect_comparisons(
    policy: str,
    out_dir: str | Path,
    k: int = 4,
    judge: str = "raters",
    judge_model: str | None = None,
    prompts_path: str | None = None,
    num_prompts: int = 2000,
    sampling: SamplingConfig = SamplingConfig(),
    max_prompt_length: int = 32,
    batch_size: int = 256,
    seed: int = 0,
) -> CollectionSummary:
    """Sample ``k`` responses per prompt from ``policy``, rank them with ``judge``, write pairs and rankings.

    Prompts come from ``prompts_path`` (any format the data layer reads) or the embedded world's training prompts.
    ``judge_model`` is the reward-model export (``judge="reward_model"``) or causal LM (``judge="llm"``); the LLM
    judge's verdicts are cached in ``out_dir/judge_cache.json``.
    """
    started = time.perf_counter()
    prompt_data = PromptDataModule(path=prompts_path, tokenizer_name_or_path=policy, val_fraction=0.0)
    prompt_data.setup("fit")
    prompts = [record.prompt for record in prompt_data.train_records][:num_prompts]
    torch.manual_seed(seed)
    responses = sample_responses(policy, prompts, k, sampling, max_prompt_length, batch_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = make_judge(judge, judge_model, seed, cache_path=out_dir / "judge_cache.json").rank(prompts, responses)
    pairs, ties, agree, decided = 0, 0, 0, 0
    on_world = has_gold(prompts)
    with open(out_dir / "comparisons.jsonl", "w") as comparisons, open(out_dir / "rankings.jsonl", "w") as rankings:
        for prompt, group, group_ranks in zip(prompts, responses, ranks):
            rankings.write(json.dumps({"prompt": prompt, "responses": group, "ranks": group_ranks}) + "\n")
            group_pairs, group_ties = ranking_to_pairs(group, group_ranks)
            ties += group_ties
            for chosen, rejected in group_pairs:
                comparisons.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
                pairs += 1
                if on_world and (gold := gold_reward(prompt, chosen) - gold_reward(prompt, rejected)) != 0:
                    decided += 1
                    agree += gold > 0
    summary = CollectionSummary(
        policy, judge, k, len(prompts), pairs, ties, time.perf_counter() - started,
        agree / decided if decided else None,
    )
    (out_dir / "collect.json").write_text(json.dumps(asdict(summary), indent=2) + "\n")
    return summary
