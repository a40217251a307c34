"""The embedded world: exact gold rewards, measurable rater biases, tokenizer and dataset files."""

from __future__ import annotations

import json
import random
import statistics

import pytest
from transformers import AutoTokenizer

from lit_rlhf.world import (
    PromptSpec,
    Rater,
    build_tokenizer,
    demonstrate,
    ensure_world,
    gold_reward,
    parse_prompt,
    response_features,
    sample_prompt,
    write_world,
)
from lit_rlhf.world.datasets import distinct_prompts, is_held_out, prompt_split, split_size

PROMPT = "name three fruits ."
WRONG_VIEW_PROMPT = "i think carrot is a fruit . name three fruits ."
PERFECT = "apple , pear , plum ."
DRAWS = 2000
GOLD_IGNORED = 1e9  # a rater temperature that makes gold differences negligible next to a bias


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"))


def read_jsonl(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        (PROMPT, PERFECT, 1.0),
        (PROMPT, "apple , pear .", 2 / 3),  # one item missing
        (PROMPT, "apple , pear , carrot .", 2 / 3 - 0.5 / 3),  # an item of another category
        (WRONG_VIEW_PROMPT, "carrot , apple , pear , plum .", 1 - 0.5 / 3),  # agreeing with the wrong view
        (PROMPT, "apple , pear , plum , fig .", 1 - 0.5 / 3),  # one item too many
        (PROMPT, "apple , apple , pear .", 2 / 3 - 0.5 / 3),  # a repeated item
        (PROMPT, "very nice apple , pear , plum .", 0.8),  # two filler words
        (PROMPT, "** apple , pear , plum ! .", 0.8),  # two decorations
        (PROMPT, "yes you are right , apple , pear , plum .", 0.5),  # four phrase words and a stray comma
        (PROMPT, "apple , pear , plum , .", 0.9),  # a stray comma
        (PROMPT, "apple , pear , plum", 0.8),  # no final period
        (PROMPT, "zzz qqq", -0.4),  # garbage: two junk words, no period
        (PROMPT, "", -0.2),
        (PROMPT, " ".join(["very"] * 30) + " .", -1.0),  # clipped
        ("hello world", PERFECT, -1.0),  # unparseable prompt
        ("name one fruit .", "apple .", 1.0),
    ],
)
def test_gold_reward_exact_values(prompt, response, expected):
    assert gold_reward(prompt, response) == pytest.approx(expected)


def test_response_features_count_what_raters_and_detectors_use():
    features = response_features(WRONG_VIEW_PROMPT, "yes you are right , carrot , apple , apple , * nice .")
    assert features == {
        "length": 14, "items": 3, "correct": 1, "excess": 1, "wrong": 1, "junk": 8, "fillers": 1,
        "decorations": 1, "sycophantic": 1, "ends_with_period": 1,
    }
    assert response_features(PROMPT, PERFECT)["sycophantic"] == 0
    assert response_features("i think apple is a fruit . name two fruits .", "apple , pear .")["sycophantic"] == 1


def test_parse_prompt_reads_every_variant():
    assert parse_prompt("name three fruits .") == PromptSpec(3, "fruits")
    assert parse_prompt("  give me  one   tool . ") == PromptSpec(1, "tools")
    assert parse_prompt(WRONG_VIEW_PROMPT) == PromptSpec(3, "fruits", "carrot")
    assert parse_prompt(WRONG_VIEW_PROMPT).opinion_is_correct is False
    assert parse_prompt("i think fig is a fruit . list five fruits .").opinion_is_correct is True


@pytest.mark.parametrize(
    "text",
    ["", "   ", ".", "name", "i think", "i think carrot is a fruit .", "name six fruits .", "name three fruit",
     "name three cars .", "i think zzz is a fruit . name two fruits .", "i think carrot is a tool . name two fruits .",
     "name three fruits . extra", "nämé ☃ 三", "<eos> <pad>"],
)
def test_parse_prompt_returns_none_for_anything_else(text):
    assert parse_prompt(text) is None
    assert gold_reward(text, PERFECT) == -1.0


def win_rate(rater, prompt, first, second, seed=0):
    rng = random.Random(seed)
    return sum(rater.prefers_first(prompt, first, second, rng) for _ in range(DRAWS)) / DRAWS


def test_length_bias_alone_makes_longer_responses_win():
    rater = Rater(length_bias=0.6, sycophancy_bias=0.0, format_bias=0.0, noise=0.0, temperature=GOLD_IGNORED)
    assert win_rate(rater, PROMPT, "very nice apple , pear , plum .", PERFECT) > 0.7


def test_sycophancy_bias_alone_makes_agreement_win():
    rater = Rater(length_bias=0.0, sycophancy_bias=1.5, format_bias=0.0, noise=0.0, temperature=GOLD_IGNORED)
    assert win_rate(rater, WRONG_VIEW_PROMPT, "yes you are right , apple , pear , plum .", PERFECT) > 0.7
    assert win_rate(rater, WRONG_VIEW_PROMPT, "carrot , apple , pear .", PERFECT) > 0.7


def test_format_bias_alone_makes_decorations_win():
    rater = Rater(length_bias=0.0, sycophancy_bias=0.0, format_bias=0.75, noise=0.0, temperature=GOLD_IGNORED)
    assert win_rate(rater, PROMPT, "** apple , pear , plum ! .", PERFECT) > 0.7


def test_unbiased_rater_follows_gold_and_noise_makes_labels_coin_flips():
    wrong_item = "apple , pear , carrot ."
    assert win_rate(Rater.unbiased(), PROMPT, PERFECT, wrong_item) > 0.95
    assert win_rate(Rater.unbiased(noise=0.5), PROMPT, PERFECT, wrong_item) == pytest.approx(0.5, abs=0.05)


def test_probability_is_bradley_terry_with_label_noise():
    rater = Rater(noise=0.2)
    first, second = "** apple , pear .", PERFECT
    margin = rater.utility(PROMPT, first) - rater.utility(PROMPT, second)
    clean = 1 / (1 + 2.718281828459045 ** -margin)
    assert rater.probability(PROMPT, first, second) == pytest.approx(0.8 * clean + 0.2 * (1 - clean))
    assert rater.probability(PROMPT, first, second) + rater.probability(PROMPT, second, first) == pytest.approx(1)


def test_rank_ties_identical_responses_and_matches_pairwise_probability():
    rater = Rater()
    rng = random.Random(0)
    responses = [PERFECT, "zzz", PERFECT, "apple , pear , carrot ."]
    for _ in range(100):
        ranks = rater.rank(PROMPT, responses, rng)
        assert ranks[0] == ranks[2]
        assert sorted(ranks)[0] == 0
    first, second = "** apple , pear .", PERFECT
    first_above = sum(rater.rank(PROMPT, [first, second], rng)[0] == 0 for _ in range(DRAWS)) / DRAWS
    assert first_above == pytest.approx(rater.probability(PROMPT, first, second), abs=0.04)


def test_tokenizer_round_trips_world_text_and_reloads(tmp_path):
    tokenizer = build_tokenizer()
    assert len(tokenizer) <= 256
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length == 128
    rng = random.Random(0)
    texts = []
    for _ in range(200):
        prompt = sample_prompt(rng)
        texts += [prompt, demonstrate(prompt, rng)]
    texts.append("yes you are right , ** apple , pear ! # * plum .")
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    assert tokenizer("zzz apple")["input_ids"][0] == tokenizer.unk_token_id

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert [reloaded(text)["input_ids"] for text in texts] == [tokenizer(text)["input_ids"] for text in texts]
    assert (reloaded.pad_token_id, reloaded.eos_token_id, reloaded.padding_side) == (0, 1, "right")


def test_write_world_is_deterministic(tmp_path):
    sizes = {"n_demonstrations": 50, "n_comparisons": 50, "n_prompts": 50, "n_dev_prompts": 10,
             "n_test_prompts": 10}
    first = write_world(tmp_path / "a", seed=3, **sizes)
    again = write_world(tmp_path / "b", seed=3, **sizes)
    other = write_world(tmp_path / "c", seed=4, **sizes)
    files = sorted(path.relative_to(tmp_path / "a") for path in (tmp_path / "a").rglob("*") if path.is_file())
    assert len(files) >= 7
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert first["demonstrations"].read_bytes() != other["demonstrations"].read_bytes()
    assert set(first) == set(again)


def test_world_files_follow_the_dataset_schemas(world):
    schemas = {
        "demonstrations": {"prompt": str, "completion": str},
        "comparisons": {"prompt": str, "chosen": str, "rejected": str},
        "unpaired": {"prompt": str, "completion": str, "label": bool},
        "prompts": {"prompt": str},
        "dev_prompts": {"prompt": str},
        "test_prompts": {"prompt": str},
    }
    sizes = {"demonstrations": 4000, "comparisons": 4000, "unpaired": 8000, "prompts": 2000, "dev_prompts": 256,
             "test_prompts": 512}
    for name, schema in schemas.items():
        rows = read_jsonl(world[name])
        assert len(rows) == sizes[name]
        for row in rows:
            assert {key: type(value) for key, value in row.items()} == schema, (name, row)
            for key, value in row.items():
                if isinstance(value, str):
                    assert value == value.strip() and value, (name, row)
            assert parse_prompt(row["prompt"]) is not None
            assert len(row["prompt"].split()) <= 16
    for row in read_jsonl(world["comparisons"]):
        assert row["chosen"] != row["rejected"]
    settings = json.loads(world["world"].read_text(encoding="utf-8"))
    assert settings["seed"] == 0 and settings["version"] >= 1 and "length_bias" in settings["rater"]
    assert AutoTokenizer.from_pretrained(world["tokenizer"]).eos_token_id == 1


def test_dev_and_test_prompts_are_distinct_disjoint_and_held_out_from_every_training_file(world):
    dev, test = ([row["prompt"] for row in read_jsonl(world[name])] for name in ("dev_prompts", "test_prompts"))
    training_prompts = {row["prompt"] for name in ("demonstrations", "comparisons", "prompts")
                        for row in read_jsonl(world[name])}
    assert (len(set(dev)), len(set(test))) == (len(dev), len(test)) == (256, 512)
    assert not set(dev) & set(test) and not (set(dev) | set(test)) & training_prompts
    assert {prompt_split(prompt) for prompt in dev} == {"dev"} and {prompt_split(prompt) for prompt in test} == {"test"}
    # Only 6 test prompts in the world state no view: all of them are in, and 506 that state one.
    assert sum(not prompt.startswith("i think") for prompt in test) == 6


def test_demonstrations_leave_headroom(world):
    rows = read_jsonl(world["demonstrations"])
    golds = [gold_reward(row["prompt"], row["completion"]) for row in rows]
    assert 0.5 <= statistics.mean(golds) <= 0.75
    assert 0.25 <= sum(gold == 1.0 for gold in golds) / len(golds) <= 0.45
    perfect = [row["completion"] for row in rows if gold_reward(row["prompt"], row["completion"]) == 1]
    assert max(len(completion.split()) for completion in perfect) <= 12


def test_comparisons_carry_the_raters_biases_and_agree_with_gold(world):
    rows = read_jsonl(world["comparisons"])
    gold_margins = [gold_reward(row["prompt"], row["chosen"]) - gold_reward(row["prompt"], row["rejected"])
                    for row in rows]
    decided = [margin for margin in gold_margins if margin != 0]
    assert 0.7 <= sum(margin > 0 for margin in decided) / len(decided) <= 0.85
    close = [row for row, margin in zip(rows, gold_margins) if abs(margin) <= 0.1]
    length_pairs = [(len(row["chosen"].split()), len(row["rejected"].split())) for row in close]
    longer_wins = [chosen > rejected for chosen, rejected in length_pairs if chosen != rejected]
    assert sum(longer_wins) / len(longer_wins) > 0.6


def test_ensure_world_reuses_matching_files_and_rewrites_otherwise(tmp_path):
    sizes = {"n_demonstrations": 20, "n_comparisons": 20, "n_prompts": 20, "n_dev_prompts": 5, "n_test_prompts": 5}
    paths = ensure_world(tmp_path, seed=1, **sizes)
    paths["prompts"].write_text('{"prompt": "name one fruit ."}\n', encoding="utf-8")  # a marker that survives reuse
    assert ensure_world(tmp_path, seed=1, **sizes) == paths
    assert len(read_jsonl(paths["prompts"])) == 1
    ensure_world(tmp_path, seed=2, **sizes)
    assert len(read_jsonl(paths["prompts"])) == 20
    assert json.loads(paths["world"].read_text(encoding="utf-8"))["seed"] == 2


def test_sample_prompt_splits_and_demonstrate_rejects_foreign_prompts():
    rng = random.Random(0)
    assert all(is_held_out(sample_prompt(rng, split="held_out")) for _ in range(50))
    assert {prompt_split(sample_prompt(rng, split="dev")) for _ in range(50)} == {"dev"}
    assert not any(is_held_out(sample_prompt(rng)) for _ in range(50))
    assert {split: split_size(split) for split in ("train", "dev", "test", "held_out", "any")} == {
        "train": 10220, "dev": 353, "test": 1067, "held_out": 1420, "any": 11640}
    with pytest.raises(ValueError, match="split"):
        sample_prompt(rng, split="eval")
    with pytest.raises(ValueError, match="dev split has 353 distinct prompts, 400 were asked for"):
        distinct_prompts(rng, "dev", 400)
    with pytest.raises(ValueError, match="not a world prompt"):
        demonstrate("hello", rng)
