"""The world's gold reward reaches the machinery as one scorer (:func:`lit_rlhf.scoring.gold_scorer`)."""

import pytest
import torch

from lit_rlhf.scoring import GoldScorer, gold_scorer, make_scorer
from lit_rlhf.world import gold_reward

FRUITS = "name three fruits ."
COLORS = "name two colors ."


def test_gold_scorer_on_world_prompts_scores_the_gold_reward_exactly():
    prompts = [FRUITS, FRUITS, FRUITS, COLORS]
    responses = ["apple , pear , plum .", "apple , pear .", "", "red , blue"]
    scorer = gold_scorer(prompts)
    assert isinstance(scorer, GoldScorer)
    scores = scorer.score(prompts, responses)
    # by hand: all three fruits → 1; two of three → 2/3; nothing, and no final "." → -0.2; both colors without
    # the final "." → 1 - 0.2
    assert scores.tolist() == pytest.approx([1.0, 2 / 3, -0.2, 0.8])
    assert scores.tolist() == [gold_reward(p, r) for p, r in zip(prompts, responses)]  # bit for bit: float64
    float32 = make_scorer("gold").score(prompts, responses)  # what PPO's gold reward and the reward model use
    assert float32.dtype == torch.float32 and torch.equal(float32, scores.float())


@pytest.mark.parametrize("prompts", [[FRUITS, "What is the capital of France?"], ["Hello there"], []])
def test_no_gold_scorer_unless_every_prompt_is_a_world_prompt(prompts):
    assert gold_scorer(prompts) is None
