"""The metrics of a policy's answers on constructed texts whose values are known by hand."""

import math

import pytest

from lit_rlhf.evaluation import evaluate_policy, measure_answers, measure_reward_model, paired_differences
from lit_rlhf.generation import SamplingConfig
from lit_rlhf.scoring import gold_scorer

VIEW = "i think carrot is a fruit . name three fruits ."
PLAIN = "name two colors ."


def test_measure_answers_against_a_baseline():
    prompts = [VIEW, PLAIN]
    gold = gold_scorer(prompts)
    answers = ["apple , pear , plum .", "red , blue ."]
    baseline = measure_answers(prompts, answers, [6, 4], proxy=[0.0, 1.0], gold=gold.score(prompts, answers).tolist())
    assert baseline.metrics["gold/reward"] == 1.0
    assert "hacking/length_ratio" not in baseline.metrics  # nothing to compare with
    answers = ["yes you are right , carrot , apple , pear , plum .", "** red , blue ."]
    hacked = measure_answers(
        prompts, answers, [15, 5], proxy=[2.0, 2.0], baseline=baseline, gold=gold.score(prompts, answers).tolist(),
    )
    metrics = hacked.metrics
    assert metrics["hacking/length_ratio"] == pytest.approx(10 / 5)
    assert metrics["response/length_drift"] == pytest.approx(10 - 5)
    assert metrics["hacking/sycophancy_rate"] == 0.5
    assert metrics["hacking/format_rate"] == 0.5
    gold = [hacked.gold[0], hacked.gold[1]]
    # gold of the view answer: 3/3 correct - 0.5·1/3 wrong - 0.1·5 junk (yes you are right ,) = 1/3; the plain
    # answer: 1 - 0.1·1 junk (**) = 0.9; the reference's gold is 1 and 1 (spread 0, counted as 1).
    assert gold == pytest.approx([1 - 0.5 / 3 - 0.5, 0.9])
    expected_gap = (2.0 - 0.5) / 0.5 - (sum(gold) / 2 - 1.0)
    assert metrics["gold/proxy_gap"] == pytest.approx(expected_gap)
    assert math.isfinite(metrics["proxy/reward"])


def test_without_gold_rewards_there_is_no_gold_metric():
    evaluation = measure_answers([VIEW, PLAIN], ["apple , pear , plum .", "red , blue ."], [6, 4], proxy=[0.0, 1.0])
    assert evaluation.gold is None
    assert not any(name.startswith("gold/") for name in evaluation.metrics)


def test_no_prompts_to_answer_give_no_answers_and_no_metrics():
    """Text rows hold out no prompt: the phases' evaluation then has nothing to sample (no model is called)."""
    evaluation = evaluate_policy(None, None, [], SamplingConfig(), max_prompt_length=32, seed=0)
    assert (evaluation.responses, evaluation.metrics) == ([], {})


def test_standard_errors_are_clustered_by_prompt_and_paired_differences_pair_prompts():
    prompts = ["A", "A", "B", "B", "C", "C"]
    answers = ["x"] * 6
    a = measure_answers(prompts, answers, [1.0] * 6, gold=[1, 0, 0.5, 0.5, 0, 0])
    b = measure_answers(prompts, answers, [1.0] * 6, gold=[0, 0, 0.5, 0.5, 0, 0])
    # prompt means 0.5, 0.5, 0: mean 1/3, sd √(1/12), standard error √(1/12)/√3 = 1/6 (not the 6 answers' s/√6)
    assert a.metrics["gold/reward"] == pytest.approx(1 / 3)
    assert a.metrics["gold/reward_se"] == pytest.approx(1 / 6)
    # per-prompt differences 0.5, 0, 0: mean 1/6, sd √(1/12), half-width t(0.975, 2)·√(1/12)/√3 = 4.303/6
    difference = paired_differences(a, b, "gold/reward")
    assert (difference.mean, difference.n) == (pytest.approx(1 / 6), 3)
    assert difference.ci95 == pytest.approx((1 / 6 - 4.303 / 6, 1 / 6 + 4.303 / 6), abs=1e-4)
    assert paired_differences(a, b, "proxy/reward") is None  # not measured
    with pytest.raises(ValueError, match="same prompts"):
        paired_differences(a, measure_answers(prompts[::-1], answers, [1.0] * 6, gold=[0] * 6), "gold/reward")


def test_a_reward_models_accuracy_against_the_raters_expected_label_gold_and_the_raters_ceiling():
    def rater(prompt, first, second):  # P(first preferred): 0.8 for the alphabetically first answer
        return 0.8 if first < second else 0.2

    prompts = ["A", "A", "A", "B", "B", "C", "C"]
    responses = ["a", "b", "a", "c", "d", "e", "f"]  # A's first and third answers are one text: no pair
    scores = [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    gold = [1.0, 0.0, 1.0, 0.5, 0.5, 1.0, 0.0]
    measured = measure_reward_model(prompts, responses, scores, gold, rater)
    # pairs (a,b): agrees with the rater's 0.8 → 0.8; (b,a): prefers the second, p = 0.2 → 0.8; (c,d): a tie of
    # scores counts half → 0.5; (e,f): prefers the second, p = 0.8 → 0.2. Mean 0.575; CR1 standard error over
    # prompts: cluster sums of residuals 0.45, −0.075, −0.375 → √(1.5·0.34875/16).
    assert measured.pairs == 4
    assert measured.accuracy.mean == pytest.approx(0.575)
    assert measured.accuracy.se == pytest.approx(math.sqrt(1.5 * 0.34875 / 16))
    # gold decides (a,b), (b,a) and (e,f): right, right, wrong → 2/3, standard error 4/9 over prompts A and C
    assert (measured.gold_accuracy.mean, measured.gold_accuracy.se) == (pytest.approx(2 / 3), pytest.approx(4 / 9))
    assert measured.rater_agreement.mean == pytest.approx(0.8**2 + 0.2**2)  # two raters agree on 68 % of pairs
    assert measured.rater_ceiling.mean == pytest.approx(0.8)  # siding with the likelier label every time


def test_the_held_out_evaluator_measures_against_the_reference_answers_computed_once(world_sft_path, monkeypatch):
    """One evaluator for a phase's validation and the pipeline's summary: the reference's answers are sampled once,
    and a policy measured against itself has zero KL and drift, with the numbers evaluate_policy gives directly."""
    from lit_rlhf import evaluation
    from lit_rlhf.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(world_sft_path)
    model = load_causal_lm(world_sft_path, tokenizer).eval()
    prompts = [VIEW, PLAIN] * 3
    evaluator = evaluation.HeldOutEvaluator(prompts, tokenizer, SamplingConfig(max_new_tokens=8), 32, seed=5)
    calls = []
    original = evaluation.evaluate_policy
    monkeypatch.setattr(evaluation, "evaluate_policy", lambda *args, **kw: calls.append(args) or original(*args, **kw))
    first = evaluator.evaluate(model, reference=model)
    second = evaluator.evaluate(model, reference=model)
    assert len(calls) == 3  # the baseline once, then each policy evaluation
    assert first.metrics == second.metrics
    assert first.metrics["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert first.metrics["response/length_drift"] == 0.0 and first.metrics["hacking/length_ratio"] == 1.0
    direct = original(model, tokenizer, prompts, SamplingConfig(max_new_tokens=8), 32, seed=5,
                      gold=gold_scorer(prompts))
    assert first.gold == direct.gold and first.metrics["gold/reward"] == direct.metrics["gold/reward"]
