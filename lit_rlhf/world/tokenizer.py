"""A word-level Hugging Face tokenizer over the world's vocabulary: one token per whitespace-separated word."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lit_rlhf.world.language import VOCABULARY

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2
WORLD_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(VOCABULARY)
MODEL_MAX_LENGTH = 128


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the world's tokenizer: ``<pad>`` = 0, ``<eos>`` = 1, ``<unk>`` = 2, then the sorted vocabulary.

    Like GPT-2, the beginning-of-sequence token is the end-of-sequence token (``bos_token == eos_token``) and
    encoding adds no special tokens by itself; the data layer appends ``<eos>`` where it wants one. Decoding
    joins words with single spaces, so ``decode(encode(text)) == text`` for world text. Padding is on the right.
    """
    vocab = {token: token_id for token_id, token in enumerate(SPECIAL_TOKENS + VOCABULARY)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,  # the default clean-up would glue " ," and " ." onto the word before
    )


def speaks_world_language(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether ``tokenizer`` has the world's vocabulary, so a model using it can read the world's prompts."""
    return tokenizer.get_vocab() == build_tokenizer().get_vocab()
