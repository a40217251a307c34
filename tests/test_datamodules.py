"""Tokenisation, truncation, padding and batch layouts by exact token ids; the DataModules end to end."""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path

import lightning as L
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from helpers import TWO_TURN_CHAT
from lit_rlhf.data.collate import (
    collate_comparisons,
    collate_demonstrations,
    collate_prompts,
    collate_unpaired,
    encode_comparisons,
    encode_demonstrations,
    encode_prompts,
    encode_unpaired,
    pad_left,
    pad_right,
    tokenize_prompts,
)
from lit_rlhf.data.datamodules import (
    ComparisonDataModule,
    DemonstrationDataModule,
    PromptDataModule,
    UnpairedDataModule,
    default_world_dir,
    subsample,
    train_val_split,
)
from lit_rlhf.data.formats import Comparison, Demonstration, PromptRecord, Unpaired, normalize_rows
from lit_rlhf.errors import ConfigError, DataError
from lit_rlhf.models import load_tokenizer

PAD, EOS = 0, 1
WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "User:", "Assistant:"]
ID = {word: index for index, word in enumerate(WORDS, start=2)}
"""Token ids of the test tokenizer: one per word, after <pad> (0) and <eos> (1)."""


def ids(text: str) -> list[int]:
    return [ID[word] for word in text.split()]


def save_word_tokenizer(folder: Path, chat_template: str | None = None) -> str:
    word_level = Tokenizer(models.WordLevel({"<pad>": PAD, "<eos>": EOS, **ID}, unk_token="<pad>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    return save_word_tokenizer(tmp_path_factory.mktemp("word-tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return load_tokenizer(tokenizer_path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# --- padding and truncation --------------------------------------------------------------------------------------


def test_pad_right_and_pad_left():
    padded, mask = pad_right([[5, 6, 7], [8]], pad_id=0)
    assert padded.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    padded, mask = pad_left([[5, 6, 7], [8]], pad_id=0, length=4)
    assert padded.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert padded.dtype == mask.dtype == torch.long


def test_prompts_are_cut_from_the_left_and_responses_keep_their_start(tokenizer):
    records = [Demonstration("a b c d e", " f g h i"), Demonstration("a", " b")]
    encoded = encode_demonstrations(records, tokenizer, max_length=6, max_prompt_length=3)
    long, short = encoded.examples
    assert long["prompt_ids"] == ids("c d e") and long["response_ids"] == ids("f g h")  # cut, so no EOS
    assert short["prompt_ids"] == ids("a") and short["response_ids"] == ids("b") + [EOS]
    assert encoded.truncated_rows == 1


def test_a_tokenizer_that_starts_texts_with_bos_gets_one_before_every_prompt_kept_through_the_cut(tmp_path):
    """As Llama's and Gemma's do (a post-processor adds it): the models were pretrained with it. A prompt that brings
    its own (a chat template that writes it) gets no second; a text row, with no prompt, is the BOS alone."""
    from tokenizers.processors import TemplateProcessing

    bos = len(WORDS) + 2
    word_level = Tokenizer(models.WordLevel({"<pad>": PAD, "<eos>": EOS, **ID, "<bos>": bos}, unk_token="<pad>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    word_level.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>")
    records = [Demonstration("a b c d e", " f"), Demonstration("<bos> a", " b"), Demonstration("", " c d")]
    long, own, text = encode_demonstrations(records, tokenizer, max_length=8, max_prompt_length=3).examples
    assert long["prompt_ids"] == [bos, *ids("d e")]  # cut from the left, after the BOS
    assert own["prompt_ids"] == [bos, *ids("a")]
    assert text["prompt_ids"] == [bos] and text["response_ids"] == ids("c d") + [EOS]
    prompt_ids, _ = tokenize_prompts(tokenizer, ["a b c d e", "a"], max_prompt_length=3)
    assert prompt_ids.tolist() == [[bos, *ids("d e")], [PAD, bos, *ids("a")]]
    assert tokenize_prompts(load_tokenizer(save_word_tokenizer(tmp_path)), ["a"], 3)[0].tolist() == [ids("a")]


def test_a_completion_that_ends_with_eos_gets_no_second_one(tokenizer):
    # Chat templates such as Qwen's or Zephyr's write the EOS token into the rendered answer themselves.
    (example,) = encode_demonstrations([Demonstration("a", " b <eos>")], tokenizer, 8, 4).examples
    assert example["response_ids"] == ids("b") + [EOS]


def test_demonstration_masks(tokenizer):
    examples = encode_demonstrations(
        [Demonstration("a b", " c"), Demonstration("a", " b c d")], tokenizer, 8, 4
    ).examples
    batch = collate_demonstrations(examples, pad_id=PAD)
    a, b, c, d = ids("a b c d")
    assert batch["input_ids"].tolist() == [[a, b, c, EOS, PAD], [a, b, c, d, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert batch["prompt"] == ["a b", "a"]


TWO_EXCHANGES = [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"},
                 {"role": "user", "content": "d"}, {"role": "assistant", "content": "e f"}]
"""Rendered by the default template as ``User: a b\\nAssistant: c\\nUser: d\\nAssistant: e f\\n``."""


def test_multi_turn_masks_cover_every_assistant_turn_or_only_the_last(tokenizer):
    conversation = ids("User: a b Assistant: c User: d Assistant: e f") + [EOS]
    for assistant_turns, mask in [("all", [0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 1]), ("last", [0] * 8 + [1, 1, 1])]:
        records = normalize_rows([{"messages": TWO_EXCHANGES}], "demonstration", assistant_turns=assistant_turns)
        batch = collate_demonstrations(encode_demonstrations(records.records, tokenizer, 16, 8).examples, PAD)
        assert batch["input_ids"].tolist() == [conversation]
        assert batch["response_mask"].tolist() == [mask], assistant_turns


def test_multi_turn_rows_keep_the_first_turns_start_and_cut_the_rest_from_the_right(tokenizer):
    (record,) = normalize_rows([{"messages": TWO_EXCHANGES}], "demonstration").records
    # The context before the first turn is cut from the left; the last turn, cut, loses its EOS.
    encoded = encode_demonstrations([record], tokenizer, max_length=8, max_prompt_length=2)
    batch = collate_demonstrations(encoded.examples, PAD)
    assert batch["input_ids"].tolist() == [ids("b Assistant: c User: d Assistant: e f")]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 0, 0, 0, 1, 1]]
    assert encoded.truncated_rows == 1
    # A cut that falls before the last turn leaves the first.
    batch = collate_demonstrations(encode_demonstrations([record], tokenizer, 5, 2).examples, PAD)
    assert batch["input_ids"].tolist() == [ids("b Assistant: c User: d")]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 0, 0]]


def test_comparison_batches_share_one_length(tokenizer):
    records = [Comparison("a", " b c d", " e", margin=1.5), Comparison("a b", " c", " d")]
    batch = collate_comparisons(encode_comparisons(records, tokenizer, 8, 4).examples, pad_id=PAD)
    a, b, c, d, e = ids("a b c d e")
    assert batch["chosen_input_ids"].tolist() == [[a, b, c, d, EOS], [a, b, c, EOS, PAD]]
    assert batch["rejected_input_ids"].tolist() == [[a, e, EOS, PAD, PAD], [a, b, d, EOS, PAD]]
    assert batch["chosen_response_mask"].tolist() == [[0, 1, 1, 1, 1], [0, 0, 1, 1, 0]]
    assert batch["rejected_response_mask"].tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]]
    assert batch["rejected_attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert batch["margin"].tolist() == [1.5, 0.0] and batch["has_margin"].tolist() == [True, False]
    assert batch["chosen"] == [" b c d", " c"] and batch["rejected"] == [" e", " d"]
    both = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    assert both.shape == (4, 5)


def test_answers_that_did_not_end_are_trained_without_the_end_token(tokenizer):
    a, b, c, d = ids("a b c d")
    rows = [{"prompt": "a", "chosen": " b", "rejected": " c d", "chosen_ended": True, "rejected_ended": False},
            {"prompt": "a", "responses": [" b", " c"], "ranks": [0, 1], "responses_ended": [False, True]}]
    records = normalize_rows(rows, "comparison").records
    batch = collate_comparisons(encode_comparisons(records, tokenizer, 8, 4).examples, pad_id=PAD)
    assert batch["chosen_input_ids"].tolist() == [[a, b, EOS], [a, b, PAD]]
    assert batch["rejected_input_ids"].tolist() == [[a, c, d], [a, c, EOS]]
    unpaired = normalize_rows(rows[:1], "unpaired").records  # KTO on the same pairs
    assert [(record.completion, record.ended) for record in unpaired] == [(" b", True), (" c d", False)]
    assert [e["response_ids"] for e in encode_unpaired(unpaired, tokenizer, 8, 4).examples] == [[b, EOS], [c, d]]
    (demonstration,) = normalize_rows([{"prompt": "a", "completion": " b", "completion_ended": False}],
                                      "demonstration").records
    assert encode_demonstrations([demonstration], tokenizer, 8, 4).examples[0]["response_ids"] == [b]
    with pytest.raises(DataError, match="field 'chosen_ended': must be true or false, got 'no'"):
        normalize_rows([{**rows[0], "chosen_ended": "no"}], "comparison")


def test_prompts_alone_have_no_max_length_to_exceed():
    """PPO's sequences are max_prompt_length + max_new_tokens: a long prompt limit must not trip on data.max_length,
    which only responses need."""
    assert PromptDataModule(max_prompt_length=512).hparams.max_length == 64
    with pytest.raises(ConfigError, match=r"max_length \(64\) must be larger than max_prompt_length \(512\)"):
        DemonstrationDataModule(max_prompt_length=512)
    with pytest.raises(ConfigError, match="max_prompt_length must be at least 1"):
        PromptDataModule(max_prompt_length=0)


def test_prompt_batches_are_left_padded(tokenizer):
    encoded = encode_prompts([PromptRecord("a b c d e"), PromptRecord("f")], tokenizer, max_prompt_length=3)
    batch = collate_prompts(encoded.examples, pad_id=PAD)
    assert batch["prompt_input_ids"].tolist() == [ids("c d e"), [PAD, PAD, ID["f"]]]
    assert batch["prompt_attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert encoded.truncated_rows == 1
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, ["a b c d e", "f"], max_prompt_length=3)
    assert prompt_ids.tolist() == batch["prompt_input_ids"].tolist()
    assert prompt_mask.tolist() == batch["prompt_attention_mask"].tolist()


def test_unpaired_batches_pair_each_prompt_with_the_next_completion_for_kl(tokenizer):
    records = [Unpaired("a", " b", True), Unpaired("c d", " e f g", False), Unpaired("h", " i", True)]
    batch = collate_unpaired(encode_unpaired(records, tokenizer, 5, 2).examples, pad_id=PAD, max_length=5)
    a, b, c, d, e, f, g, h, i = ids("a b c d e f g h i")
    assert batch["input_ids"].tolist() == [[a, b, EOS, PAD, PAD], [c, d, e, f, g], [h, i, EOS, PAD, PAD]]
    assert batch["label"].tolist() == [True, False, True]
    # Prompt i with completion i + 1 (mod B), cut to max_length: "c d" + " i <eos>", "h" + " b <eos>".
    assert batch["kl_input_ids"].tolist() == [[a, e, f, g], [c, d, i, EOS], [h, b, EOS, PAD]]
    assert batch["kl_response_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 0]]
    assert batch["completion"] == [" b", " e f g", " i"]


def test_kl_pairs_skip_rows_of_the_same_prompt(tokenizer):
    """Validation rows come grouped by prompt (a comparison split into its desirable and undesirable rows): the
    mismatched pair of a row is the next row with another prompt, never its own prompt's other completion."""
    records = [Unpaired("a", " b", True), Unpaired("a", " c", False), Unpaired("d", " e", True),
               Unpaired("d", " f", False)]
    batch = collate_unpaired(encode_unpaired(records, tokenizer, 5, 2).examples, pad_id=PAD, max_length=5)
    a, b, d, e = ids("a b d e")
    assert batch["kl_input_ids"][:, :3].tolist() == [[a, e, EOS], [a, e, EOS], [d, b, EOS], [d, b, EOS]]
    alone = collate_unpaired(encode_unpaired(records[:2], tokenizer, 5, 2).examples, pad_id=PAD, max_length=5)
    assert alone["kl_input_ids"][:, :2].tolist() == [[a, ids("c")[0]], [a, b]]  # one prompt: the next row anyway


# --- splitting ---------------------------------------------------------------------------------------------------


def test_train_val_split_is_deterministic_and_never_leaves_val_empty():
    train, val = train_val_split(100, 0.1, seed=3)
    assert (train, val) == train_val_split(100, 0.1, seed=3)
    assert val != train_val_split(100, 0.1, seed=4)[1]
    assert len(val) == 10 and sorted(train + val) == list(range(100))
    assert len(train_val_split(5, 0.01, seed=0)[1]) == 1
    assert train_val_split(1, 0.5, seed=0) == ([0], [])
    assert train_val_split(4, 0.0, seed=0) == ([0, 1, 2, 3], [])


# --- datamodules -------------------------------------------------------------------------------------------------

DEMONSTRATIONS = [{"prompt": f"a {word}", "completion": f" {word} b"} for word in "cdefghij"] * 3


def make(cls, path: str, tokenizer_path: str, **kwargs):
    datamodule = cls(path=path, tokenizer_name_or_path=tokenizer_path, batch_size=4, **kwargs)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def test_subsample_draws_rows_at_random_in_their_order_and_keeps_all_when_asked_for_as_many():
    grouped = ["a1", "a2", "a3", "a4", "b1", "b2", "c1", "d1", "e1", "f1"]  # records come grouped by prompt
    assert subsample(grouped, 5, seed=0) == ["a1", "a3", "b1", "c1", "f1"]  # rows 0, 2, 4, 6, 9: four prompts
    assert subsample(grouped, 5, seed=1) != subsample(grouped, 5, seed=0)
    assert subsample(grouped, 10, seed=0) == grouped == subsample(grouped, 99, seed=3)


def test_a_resume_with_another_batch_size_skips_the_rows_done_not_as_many_batches_of_the_new_size(
    tmp_path, tokenizer_path
):
    """Saved after 2 batches of 8 (rows 0–15 of the epoch's order); resumed in batches of 4, it goes on from row 16,
    not from row 8 (2 batches of 4), which would train on rows 8–15 twice."""
    path = write_jsonl(tmp_path / "demos.jsonl", DEMONSTRATIONS)

    def rows(data) -> list[list[int]]:
        return [row for batch in data.train_dataloader() for row in batch["input_ids"].tolist()]

    epoch_order = rows(make(DemonstrationDataModule, path, tokenizer_path, val_fraction=0.0))
    resumed = make(DemonstrationDataModule, path, tokenizer_path, val_fraction=0.0)
    with pytest.warns(UserWarning, match="batches of 8 on 1 of 4: the rows done are skipped"):
        resumed.load_state_dict({"epoch": 0, "batches": 2, "batch_size": 8, "world_size": 1, "seed": 0})
    assert len(epoch_order) == 24 and rows(resumed) == epoch_order[16:]


def test_without_a_split_seed_the_data_takes_the_runs_seed(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "demos.jsonl", DEMONSTRATIONS)
    assert make(DemonstrationDataModule, path, tokenizer_path).seed == 0  # no seed set: 0
    explicit = make(DemonstrationDataModule, path, tokenizer_path, val_fraction=0.25, split_seed=2)
    L.seed_everything(2)
    inherited = make(DemonstrationDataModule, path, tokenizer_path, val_fraction=0.25)
    assert inherited.seed == 2 and inherited.val_records == explicit.val_records
    assert make(DemonstrationDataModule, path, tokenizer_path, split_seed=5).seed == 5


def test_demonstration_datamodule_splits_deterministically(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "demos.jsonl", DEMONSTRATIONS)
    first = make(DemonstrationDataModule, path, tokenizer_path, val_fraction=0.25, split_seed=1)
    again = make(DemonstrationDataModule, path, tokenizer_path, val_fraction=0.25, split_seed=1)
    other = make(DemonstrationDataModule, path, tokenizer_path, val_fraction=0.25, split_seed=2)
    assert len(first.train_records) == 18 and len(first.val_records) == 6
    assert first.val_records == again.val_records != other.val_records
    assert not first.is_world and first.hparams.path == path
    assert first.eval_prompts == list(dict.fromkeys(r.prompt for r in first.val_records))
    first_batches = [batch["input_ids"].tolist() for batch in first.train_dataloader()]
    assert first_batches == [batch["input_ids"].tolist() for batch in again.train_dataloader()]
    assert [b["prompt"] for b in first.val_dataloader()][0] == [r.prompt for r in first.val_records[:4]]


def test_text_rows_are_held_out_one_by_one_and_one_prompt_data_warns_it_holds_none_out(tmp_path, tokenizer_path):
    """Rows are held out by prompt; text rows have none, so each is its own group (all 20 in one group held out
    nothing before). They also give the evaluation no prompt to answer."""
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": f"apple pear {i} ."} for i in range(20)])
    data = make(DemonstrationDataModule, texts, tokenizer_path, val_fraction=0.25)
    assert len(data.train_records) == 15 and len(data.val_records) == 5
    assert data.eval_prompts == []
    one_prompt = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "name two fruits .", "completion": "apple ."}] * 4)
    with pytest.warns(UserWarning, match=r"no validation rows: all 4 rows share one prompt"):
        data = make(DemonstrationDataModule, one_prompt, tokenizer_path, val_fraction=0.25)
    assert len(data.train_records) == 4 and data.val_records == []


def test_bad_rows_stop_the_datamodule_or_are_skipped_and_counted(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "demos.jsonl", [*DEMONSTRATIONS[:5], {"prompt": "a", "completion": 3}, {"x": 1}])
    expected = rf"^{path}:6: field 'completion': must be a string or a list of messages, got int$"
    with pytest.raises(DataError, match=expected):
        make(DemonstrationDataModule, path, tokenizer_path)
    datamodule = make(DemonstrationDataModule, path, tokenizer_path, on_bad_row="skip")
    assert datamodule.skipped_rows == 2
    assert datamodule.skipped_reasons == {"field 'completion': wrong type": 1, "wrong format": 1}
    assert len(datamodule.train_records) + len(datamodule.val_records) == 5


def test_a_source_without_usable_rows_is_a_data_error(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"x": 1}])
    with pytest.raises(DataError, match=r"no usable demonstration rows \(1 read, 1 skipped\)"):
        make(DemonstrationDataModule, path, tokenizer_path, on_bad_row="skip")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        ({"max_length": 16, "max_prompt_length": 16}, r"max_length \(16\) must be larger than max_prompt_length"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
    ],
)
def test_settings_that_cannot_work_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        DemonstrationDataModule(**settings)


def test_chat_rows_use_the_tokenizers_template(tmp_path):
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}j {% endif %}{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}j {% endif %}"
    )
    tokenizer_path = save_word_tokenizer(tmp_path / "chat-tokenizer", chat_template=template)
    row = {"messages": [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [row, row])
    datamodule = make(DemonstrationDataModule, path, tokenizer_path, val_fraction=0.0)
    assert datamodule.train_records[0] == Demonstration("a b j ", "c ")
    assert next(iter(datamodule.train_dataloader()))["input_ids"][0].tolist() == ids("a b j c") + [EOS]


def trained_spans(batch: dict, tokenizer) -> list[str]:
    """The text of each run of trained tokens (``response_mask`` 1) of the batch's first row."""
    runs = groupby(zip(batch["input_ids"][0].tolist(), batch["response_mask"][0].tolist()), key=lambda pair: pair[1])
    return [tokenizer.decode([token for token, _ in run]) for trained, run in runs if trained]


def test_chatml_conversations_train_on_each_assistant_turn_up_to_its_end_token(tmp_path, tiny_chat_llama_path):
    tokenizer = load_tokenizer(tiny_chat_llama_path)
    messages = TWO_TURN_CHAT
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    for assistant_turns, spans in [
        ("all", ["apple , pear , plum .<|im_end|>", "red , blue .<|im_end|>"]),
        ("last", ["red , blue .<|im_end|>"]),
    ]:
        datamodule = make(DemonstrationDataModule, path, tiny_chat_llama_path, val_fraction=0.0, max_length=256,
                          max_prompt_length=128, assistant_turns=assistant_turns)
        batch = next(iter(datamodule.train_dataloader()))
        assert trained_spans(batch, tokenizer) == spans, assistant_turns
        # The sequence is the template's rendering, ending at the last turn's end token (the EOS).
        assert tokenizer.decode(batch["input_ids"][0]) == rendered.rstrip()
        assert datamodule.truncated_rows == 0


def test_assistant_turns_is_all_or_last():
    with pytest.raises(ConfigError, match="assistant_turns must be 'all' or 'last', got 'first'"):
        DemonstrationDataModule(assistant_turns="first")


def test_comparison_datamodule_counts_ties(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "ranks.jsonl", [{"prompt": "a", "responses": [" b", " c", " d"], "ranks": [0, 1, 1]}])
    datamodule = make(ComparisonDataModule, path, tokenizer_path, val_fraction=0.0)
    assert datamodule.ties_dropped == 1 and len(datamodule.train_records) == 2
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape


def test_prompt_datamodule_validates_on_left_padded_eval_prompts(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": " ".join("abcdef"[: n + 1])} for n in range(6)])
    datamodule = make(PromptDataModule, path, tokenizer_path, val_fraction=0.5, num_eval_prompts=2)
    assert datamodule.eval_prompts == [r.prompt for r in datamodule.val_records[:2]]
    (batch,) = list(datamodule.val_dataloader())
    assert batch["prompt"] == datamodule.eval_prompts
    assert batch["prompt_attention_mask"][:, -1].tolist() == [1, 1]


def test_unpaired_datamodule_accepts_paired_rows(tmp_path, tokenizer_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}])
    datamodule = make(UnpairedDataModule, path, tokenizer_path, val_fraction=0.0)
    batch = next(iter(datamodule.train_dataloader()))
    assert sorted(zip(batch["completion"], batch["label"].tolist())) == [(" b", True), (" c", False)]


def test_the_world_is_the_default(world_cache):
    datamodule = ComparisonDataModule(batch_size=8)
    assert datamodule.is_world and datamodule.world_dir == default_world_dir() == world_cache / "world"
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert len(datamodule.eval_prompts) == 64 and datamodule.skipped_rows == 0
    assert datamodule.val_records and datamodule.train_records
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["chosen_input_ids"].shape[0] == 8
    assert int(batch["chosen_input_ids"].max()) < len(datamodule.tokenizer)


def test_comparisons_split_by_prompt_and_group_every_pair_of_a_prompt_in_one_batch(tmp_path):
    fruits = ["apple .", "pear .", "plum .", "fig ."]
    rankings = [{"prompt": f"name {n} fruits .", "responses": fruits, "ranks": [0, 1, 2, 3]}
                for n in ["one", "two", "three", "four", "five", "six"]]
    path = write_jsonl(tmp_path / "rankings.jsonl", rankings)
    grouped = ComparisonDataModule(path=path, tokenizer_name_or_path="world", batch_size=2, val_fraction=0.34,
                                   group_by_prompt=True)
    grouped.setup("fit")
    train_prompts = {r.prompt for r in grouped.train_records}
    val_prompts = {r.prompt for r in grouped.val_records}
    assert len(train_prompts) == 4 and len(val_prompts) == 2 and not train_prompts & val_prompts
    batches = list(grouped.train_dataloader())
    # Two prompts per batch, each with its C(4,2) = 6 pairs.
    assert [len(batch["prompt"]) for batch in batches] == [12, 12]
    assert all(len(set(batch["prompt"])) == 2 for batch in batches)
    assert {p for batch in batches for p in batch["prompt"]} == train_prompts
    assert batches[0]["chosen_input_ids"].shape == batches[0]["rejected_input_ids"].shape


@pytest.mark.parametrize("size", [48, 50])
def test_epoch_shuffle_rebuilds_any_epoch_of_a_seeded_shuffling_loader_and_resumes_inside_it(size):
    from torch.utils.data import DataLoader

    from lit_rlhf.data.datamodules import EpochShuffle

    shuffling = DataLoader(range(size), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
    expected = [[batch.tolist() for batch in shuffling] for _ in range(3)]
    order = EpochShuffle(size, seed=3)
    loader = DataLoader(range(size), batch_size=8, sampler=order)
    assert [[batch.tolist() for batch in loader] for _ in range(3)] == expected and order.epoch == 2
    order.resume_at(epoch=1, rows=16)
    assert [batch.tolist() for batch in loader] == expected[1][2:] and order.epoch == 1
    assert [batch.tolist() for batch in loader] == expected[2]  # the pass after a resumed one is the next epoch


def test_epoch_shuffle_shares_an_epoch_between_replicas_and_resumes_each_where_it_stopped():
    from lit_rlhf.data.datamodules import EpochShuffle

    whole = list(EpochShuffle(7, seed=3))
    padded = whole + whole[:1]  # 7 rows for 2 replicas: padded with the first, as DistributedSampler pads
    replicas = [EpochShuffle(7, seed=3, num_replicas=2, rank=rank) for rank in (0, 1)]
    assert [list(replica) for replica in replicas] == [padded[0::2], padded[1::2]]
    assert [len(replica) for replica in replicas] == [4, 4]
    for replica in replicas:
        replica.resume_at(epoch=0, rows=4)  # two batches of one row done on each replica
    assert [list(replica) for replica in replicas] == [padded[4::2], padded[5::2]]


def test_epoch_shuffle_pads_a_set_smaller_than_the_replicas_by_repeating_it():
    from lit_rlhf.data.datamodules import EpochShuffle

    whole = list(EpochShuffle(3, seed=3))
    replicas = [list(EpochShuffle(3, seed=3, num_replicas=4, rank=rank)) for rank in range(4)]
    assert replicas == [[row] for row in whole + whole[:1]]


def test_the_world_data_with_a_model_that_does_not_speak_it_warns(world_sft_path, tiny_gpt2_path, recwarn):
    warning = "data.path is unset, so the data is the embedded world's"
    for tokenizer in ("world", world_sft_path):
        DemonstrationDataModule(tokenizer_name_or_path=tokenizer).setup("fit")
    assert not [w for w in recwarn if warning in str(w.message)]
    with pytest.warns(UserWarning, match=warning):
        PromptDataModule(tokenizer_name_or_path=tiny_gpt2_path).setup("fit")


def test_a_template_answer_with_a_newline_after_its_eos_ends_at_the_eos(tiny_gpt2_path):
    from lit_rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_gpt2_path)
    (example,) = encode_demonstrations([Demonstration("hi", " hello<|endoftext|>\n")], tokenizer, 32, 16).examples
    hello = tokenizer(" hello", add_special_tokens=False)["input_ids"]
    assert example["response_ids"] == hello + [tokenizer.eos_token_id]


def test_padded_length_is_the_prompt_and_the_longest_response():
    from lit_rlhf.data.collate import padded_length

    pair = {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7, 8, 9]}
    assert padded_length(pair) == 7
    assert padded_length({"prompt_ids": [1, 2], "response_ids": [3]}) == 3
    assert padded_length({"prompt_ids": [1, 2]}) == 2
    assert padded_length([pair, {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}]) == 7


def test_epoch_shuffle_by_length_visits_every_row_once_in_batches_of_similar_length_and_resumes():
    """200 rows of lengths 1..200 in batches of 4: a plain shuffle leaves 1/3 or more of each batch padding, the
    grouped one under 2%; each pass visits every row once, in its own order, and resumes inside it exactly."""
    from lit_rlhf.data.datamodules import EpochShuffle

    lengths = list(range(1, 201))

    def padding(order):
        batches = [order[start : start + 4] for start in range(0, len(order), 4)]
        padded = sum(4 * max(lengths[row] for row in batch) for batch in batches)
        return 1 - sum(lengths) / padded

    grouped = EpochShuffle(200, seed=3, lengths=lengths, batch_size=4)
    first, second = list(grouped), list(grouped)
    assert sorted(first) == sorted(second) == list(range(200)) and first != second
    assert padding(first) < 0.02 and padding(second) < 0.02 and padding(list(EpochShuffle(200, seed=3))) > 0.3
    batch_maxima = [max(lengths[row] for row in first[start : start + 4]) for start in range(0, 200, 4)]
    assert batch_maxima != sorted(batch_maxima)  # the batches themselves come in a random order
    again = EpochShuffle(200, seed=3, lengths=lengths, batch_size=4)
    again.resume_at(epoch=1, rows=40)
    assert list(again) == second[40:]


def test_epoch_shuffle_by_length_gives_every_replica_batches_of_similar_length():
    from lit_rlhf.data.datamodules import EpochShuffle

    lengths = list(range(1, 201))
    replicas = [list(EpochShuffle(200, seed=3, num_replicas=2, rank=rank, lengths=lengths, batch_size=4))
                for rank in (0, 1)]
    assert sorted(replicas[0] + replicas[1]) == list(range(200))
    for order in replicas:
        for start in range(0, 100, 4):
            batch = [lengths[row] for row in order[start : start + 4]]
            assert max(batch) - min(batch) < 8  # one global batch of 8 neighbouring lengths, shared out


def test_comparison_batches_grouped_by_length_carry_less_padding(tmp_path, tokenizer_path):
    """Chosen answers of 1 to 10 tokens, 96 pairs in batches of 8: both orders carry the same pairs and 804 real
    chosen tokens, the plain shuffle in 1,184 columns (32% padding), the length-grouped one in 840 (4%), each of its
    batches holding pairs whose lengths differ by at most one token."""
    rows = [{"prompt": "a b", "chosen": " ".join(WORDS[: 1 + n % 10]), "rejected": "Assistant:"} for n in range(96)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)

    def batches(group_by_length):
        datamodule = ComparisonDataModule(path=path, tokenizer_name_or_path=tokenizer_path, batch_size=8,
                                          val_fraction=0.0, group_by_length=group_by_length)
        datamodule.setup("fit")
        return list(datamodule.train_dataloader())

    plain, grouped = batches(False), batches(True)
    assert sorted(t for b in grouped for t in b["chosen"]) == sorted(t for b in plain for t in b["chosen"])
    for order, columns in ((plain, 1184), (grouped, 840)):
        assert sum(int(batch["chosen_attention_mask"].sum()) for batch in order) == 804
        assert sum(batch["chosen_input_ids"].numel() for batch in order) == columns
    for batch in grouped:
        lengths = batch["chosen_attention_mask"].sum(dim=1)
        assert int(lengths.max() - lengths.min()) <= 1
