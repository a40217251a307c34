"""Reward phase and comparison collection: scoring invariances, the export, C(k,2) collection, a short fit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from helpers import latest_run, metric_rows, metric_series, run_cli
from lit_rlhf.collect import collect_comparisons
from lit_rlhf.data.datamodules import ComparisonDataModule
from lit_rlhf.errors import ConfigError
from lit_rlhf.generation import SamplingConfig
from lit_rlhf.judges import ranks_from_scores
from lit_rlhf.models import export, load_scalar_head_model, load_tokenizer
from lit_rlhf.phases.reward import RewardModelModule
from lit_rlhf.scoring import SCORE_MEAN_KEY, SCORE_STD_KEY, RewardModelScorer

CONFIGS = Path(__file__).parents[1] / "configs"
PROMPTS = ["name three fruits .", "i think carrot is a fruit . name two fruits .", "list four colors ."]
RESPONSES = ["apple , pear , plum .", "apple , carrot .", "red , blue"]


@pytest.fixture(params=["tiny_gpt2_path", "tiny_llama_path", "world_sft_path"])
def scorer(request):
    path = request.getfixturevalue(request.param)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(path)
    model = load_scalar_head_model(path, tokenizer).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)  # a random head, so scores differ visibly
    return RewardModelScorer(model, tokenizer)


def test_a_text_scores_the_same_alone_and_in_a_batch(scorer):
    batched = scorer.score(PROMPTS, RESPONSES)
    alone = torch.cat([scorer.score([p], [r]) for p, r in zip(PROMPTS, RESPONSES)])
    assert batched.std() > 1e-3
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_left_and_right_padding_give_the_same_scores(scorer):
    from lit_rlhf.data.collate import pad_left
    from lit_rlhf.models import scalar_scores

    right = scorer.score(PROMPTS, RESPONSES)
    ids = [
        scorer.tokenizer(p, add_special_tokens=False)["input_ids"]
        + scorer.tokenizer(r, add_special_tokens=False)["input_ids"]
        + [scorer.tokenizer.eos_token_id]
        for p, r in zip(PROMPTS, RESPONSES)
    ]
    input_ids, attention_mask = pad_left(ids, scorer.tokenizer.pad_token_id)
    with torch.no_grad():
        left = scalar_scores(scorer.model, input_ids, attention_mask)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)


def test_export_scores_the_same_through_transformers(scorer, tmp_path):
    export(scorer.model, scorer.tokenizer, tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    expected = scorer.score(PROMPTS, RESPONSES)
    for prompt, response, score in zip(PROMPTS, RESPONSES, expected):
        text_ids = (
            scorer.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            + scorer.tokenizer(response, add_special_tokens=False)["input_ids"]
            + [scorer.tokenizer.eos_token_id]
        )
        with torch.no_grad():
            logits = plain(input_ids=torch.tensor([text_ids])).logits
        assert logits.shape == (1, 1)
        assert logits.item() == pytest.approx(score.item(), abs=1e-5)


def test_ranks_from_scores_tie_equal_scores():
    assert ranks_from_scores([0.2, 0.9, 0.2, -1.0], ["a", "b", "c", "d"]) == [1, 0, 1, 3]
    # The same text scored a rounding error apart (another row of the batch) still ties with itself.
    assert ranks_from_scores([-0.76168370, -0.76168364, 0.5], ["", "", "x"]) == [1, 1, 0]


def test_collect_writes_all_k_choose_2_pairs_and_the_rankings(world_sft_path, tmp_path):
    summary = collect_comparisons(
        world_sft_path, tmp_path, k=4, judge="gold", num_prompts=30, sampling=SamplingConfig(16), seed=3
    )
    rankings = [json.loads(line) for line in (tmp_path / "rankings.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (tmp_path / "comparisons.jsonl").read_text().splitlines()]
    assert summary.prompts == len(rankings) == 30
    assert all(len(row["responses"]) == 4 == len(row["ranks"]) for row in rankings)
    # Each prompt's 4 responses give C(4,2) = 6 comparisons, less the tied ones.
    assert summary.pairs + summary.ties_dropped == 30 * 6
    assert summary.pairs == len(pairs)
    assert summary.ties_dropped > 0  # the gold reward ties identical answers
    from lit_rlhf.world import gold_reward

    assert all(gold_reward(p["prompt"], p["chosen"]) > gold_reward(p["prompt"], p["rejected"]) for p in pairs)
    # The comparison reader expands the rankings file to the same pairs.
    data = ComparisonDataModule(path=str(tmp_path / "rankings.jsonl"), tokenizer_name_or_path=world_sft_path,
                                val_fraction=0.0)
    data.setup("fit")
    assert len(data.train_records) == summary.pairs
    assert data.ties_dropped == summary.ties_dropped
    assert json.loads((tmp_path / "collect.json").read_text())["pairs"] == summary.pairs


def test_reward_model_fit_logs_metrics_and_exports_statistics(world_sft_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    collect_comparisons(world_sft_path, tmp_path / "collect", k=4, num_prompts=100, sampling=SamplingConfig(16))
    run_cli(
        "fit", "--config", str(CONFIGS / "rm.yaml"),
        "--model.model_name_or_path", world_sft_path,
        "--model.export_dir", str(tmp_path / "rm"),
        "--model.normalization_samples", "32",
        "--data.path", str(tmp_path / "collect" / "comparisons.jsonl"),
        "--trainer.max_steps", "45", "--trainer.val_check_interval", "20",
        "--data.max_length", "48", "--data.max_prompt_length", "24",
    )
    run = latest_run(tmp_path, "reward")
    # Validated before training, after steps 20 and 40 (Lightning logs those at the step before), and once more at
    # the end, as 45 is not a multiple of 20.
    validated = [int(row["step"]) for row in metric_rows(run) if row.get("val/loss")]
    assert validated == [0, 19, 39, 45], validated
    for name in ["val/accuracy", "val/margin", "val/reward/mean", "val/reward/std", "val/reward/length_corr",
                 "val/gold/accuracy", "train/accuracy", "train/gold/accuracy", "train/reward/length_corr"]:
        assert metric_series(run, name), name
    train_loss = metric_series(run, "train/loss")
    assert len(train_loss) == 4 and train_loss[-1] < train_loss[0]
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config[SCORE_STD_KEY] > 0
    # Normalised scores of the policy's own kind of responses centre on 0 with unit spread.
    scorer = RewardModelScorer.from_pretrained(tmp_path / "rm", normalize=True)
    assert scorer.statistics == (config[SCORE_MEAN_KEY], config[SCORE_STD_KEY])
    # A scorer loading the export cuts texts as training did, unless told otherwise.
    assert (scorer.max_length, scorer.max_prompt_length) == (48, 24)
    assert RewardModelScorer.from_pretrained(tmp_path / "rm", max_length=128).max_length == 128


def test_score_statistics_are_finite_with_a_single_distinct_prompt(world_sft_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": "name two fruits .", "chosen": "apple , pear .", "rejected": rejected}
            for rejected in ["apple .", "dog .", "pear , pear .", "cat , dog .", "apple , pear , fig ."] * 2]
    (tmp_path / "one_prompt.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_cli(
        "fit", "--config", str(CONFIGS / "rm.yaml"), "--model.model_name_or_path", world_sft_path,
        "--model.export_dir", str(tmp_path / "rm"), "--model.normalization_samples", "8",
        "--data.path", str(tmp_path / "one_prompt.jsonl"), "--trainer.max_steps", "2",
    )
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert math.isfinite(config[SCORE_MEAN_KEY]) and math.isfinite(config[SCORE_STD_KEY]) and config[SCORE_STD_KEY] > 0
    with pytest.raises(ConfigError, match="normalization_samples must be at least 2"):
        RewardModelModule(model_name_or_path=world_sft_path, normalization_samples=1)


@pytest.mark.parametrize("share_prompts, rows_run", [(True, [1, 3]), (False, [3])])
def test_scoring_each_distinct_sequence_once_gives_the_same_scores(world_sft_path, share_prompts, rows_run):
    """Three pairs of one prompt over three answers: whole, the three distinct sequences run once; sharing, the
    prompt once and then the three answers."""
    from lit_rlhf.data.collate import collate_comparisons
    from lit_rlhf.models import scalar_scores

    module = RewardModelModule(model_name_or_path=world_sft_path, share_prompts=share_prompts)
    module.configure_model()
    torch.nn.init.normal_(module.model.score.weight, std=1.0)
    rows = []
    hook = module.model.get_input_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    tokenize = lambda text: module.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = tokenize("name two fruits .")
    responses = ["apple , pear .", "fig .", "dog , pear ."]
    pairs = [(0, 1), (0, 2), (1, 2)]
    examples = [
        {"prompt_ids": prompt, "chosen_ids": tokenize(responses[c]) + [1], "rejected_ids": tokenize(responses[r]) + [1],
         "margin": None, "prompt": "name two fruits .", "chosen": responses[c], "rejected": responses[r]}
        for c, r in pairs
    ]
    batch = collate_comparisons(examples, pad_id=module.tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, rejected = module._scores(batch)
        hook.remove()
        expected = [scalar_scores(module.model, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"])
                    for side in ("chosen", "rejected")]
    torch.testing.assert_close(chosen, expected[0])
    torch.testing.assert_close(rejected, expected[1])
    assert chosen[0] == chosen[1] and rejected[0] == chosen[2] and rejected[1] == rejected[2]
    assert rows == rows_run


def test_models_outside_a_trainer_load_onto_the_inference_device(world_sft_path, world_rm_path):
    from lit_rlhf import models
    from lit_rlhf.scoring import RewardModelScorer

    assert models.inference_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = models.load_tokenizer(world_sft_path)
    assert next(models.load_causal_lm(world_sft_path, tokenizer, device="meta").parameters()).is_meta
    assert next(models.load_scalar_head_model(world_rm_path, tokenizer, device="meta").parameters()).is_meta
    device = models.inference_device()
    assert RewardModelScorer.from_pretrained(world_rm_path, device).model.device == device


def test_gold_accuracy_is_a_mean_over_the_pairs_gold_does_not_tie():
    """Two validation batches: gold ties 3 of the first's 4 pairs. Over the 5 pairs gold decides, 4 agree (0.8);
    weighting each batch's accuracy by all its pairs read (1·4 + 0.75·4) / 8 = 0.875."""
    from torchmetrics import MeanMetric

    from lit_rlhf.phases.reward import preference_metrics

    gold_accuracy = MeanMetric()
    batches = [
        (torch.tensor([1.0, 1, 1, 1]), torch.zeros(4), torch.tensor([1.0, 0, 0, 0]), torch.zeros(4)),
        (torch.tensor([1.0, 1, 1, 0]), torch.zeros(4), torch.ones(4), torch.zeros(4)),
    ]
    for chosen, rejected, gold_chosen, gold_rejected in batches:
        metrics = preference_metrics(chosen, rejected, gold_chosen, gold_rejected)
        assert metrics["accuracy"][1] == 4
        gold_accuracy.update(metrics["gold/accuracy"][0], weight=metrics["gold/accuracy"][1])
    assert gold_accuracy.compute().item() == pytest.approx(0.8)


def test_validation_means_leave_out_metrics_no_batch_updated_without_warning(recwarn):
    from torchmetrics import MeanMetric

    from lit_rlhf.phases.shared import validation_means

    updated, never = MeanMetric(), MeanMetric()  # never: gold/accuracy off the world
    updated.update(torch.tensor([1.0, 3.0]), weight=torch.tensor([1.0, 3.0]))
    assert validation_means({"accuracy": updated, "gold/accuracy": never}) == {"val/accuracy": torch.tensor(2.5)}
    assert not [w for w in recwarn if "before the ``update``" in str(w.message)]
    assert updated.update_count == 0  # reset for the next validation


def test_the_readmes_transformers_recipe_scores_chat_data_as_the_scorer_does(tiny_chat_llama_path, tmp_path):
    """The README's plain-transformers recipe, run as printed, on a batch of ChatML comparisons rendered as the data
    layer renders them: the same scores as RewardModelScorer (one <|im_end|>, read at it, not at the padding)."""
    import re

    from lit_rlhf.data.formats import make_chat_renderer, normalize_rows

    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_chat_llama_path)
    model = load_scalar_head_model(tiny_chat_llama_path, tokenizer).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)
    export(model, tokenizer, tmp_path / "rm")
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "name two fruits"}],
             "chosen": [{"role": "assistant", "content": "apple , pear ."}],
             "rejected": [{"role": "assistant", "content": "the quick brown fox"}]}]
    (comparison,) = normalize_rows(rows, "comparison", chat_renderer=make_chat_renderer(tokenizer)).records
    assert comparison.chosen.endswith("<|im_end|>\n")
    recipe = re.search(r"```python\n(import torch\n.*?def score\(.*?)```", (CONFIGS.parent / "README.md").read_text(),
                       re.DOTALL).group(1)
    namespace = {"path": str(tmp_path / "rm")}
    exec(recipe, namespace)
    scorer = RewardModelScorer.from_pretrained(tmp_path / "rm", max_length=200, max_prompt_length=150)
    expected = scorer.score([comparison.prompt] * 2, [comparison.chosen, comparison.rejected]).tolist()
    recipe_scores = namespace["score"]([comparison.prompt] * 2, [comparison.chosen, comparison.rejected])
    assert recipe_scores == pytest.approx(expected, abs=1e-5)  # a batch of two lengths, padded
    assert namespace["score"]([comparison.prompt], [comparison.chosen]) == pytest.approx(expected[:1], abs=1e-5)
    assert abs(expected[0] - expected[1]) > 1e-3
