"""The embedded synthetic world: a tiny language with an exact gold reward and biased simulated raters.

A prompt asks for a number of items of one category (``name three fruits .``), sometimes after the user states
a view that may be wrong (``i think carrot is a fruit . name three fruits .``). A good response lists exactly that
many distinct items of the category and ends with a period (``apple , pear , plum .``); :func:`gold_reward`
scores any text exactly, penalising missing, wrong, excess or repeated items, filler words, decorations and a
missing period. Simulated raters (:class:`Rater`) choose between responses by gold reward, but they also like
longer answers, answers that agree with the user's stated view (``yes you are right ,`` or listing the item the
user named, even when it is from another category), and decorations such as ``**``, and they mislabel some
pairs. A reward model trained on their comparisons learns those biases; the gold reward does not have them, so
reward hacking shows up as proxy reward rising while gold reward does not. :func:`write_world` puts
demonstrations, comparisons, unpaired labels, prompts and a Hugging Face tokenizer on disk in ordinary dataset
formats.
"""

from lit_rlhf.world.datasets import demonstrate, ensure_world, sample_prompt, write_world
from lit_rlhf.world.gold import gold_reward, has_gold, response_features
from lit_rlhf.world.language import PromptSpec, parse_prompt
from lit_rlhf.world.raters import Rater
from lit_rlhf.world.tokenizer import WORLD_VOCAB_SIZE, build_tokenizer, speaks_world_language

__all__ = [
    "WORLD_VOCAB_SIZE",
    "PromptSpec",
    "Rater",
    "build_tokenizer",
    "demonstrate",
    "ensure_world",
    "gold_reward",
    "has_gold",
    "parse_prompt",
    "response_features",
    "sample_prompt",
    "speaks_world_language",
    "write_world",
]
