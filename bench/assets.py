"""The shared work of the benchmark: one tiny GPT-2, one word-level tokenizer and synthetic JSONL data, built once
and cached under ``bench/.cache/<case>/``, which both libraries load by path.

Layout of a case folder::

    manifest.json     the case's sizes and parameter counts (read by run.py for the MFU)
    policy/           GPT2LMHeadModel + tokenizer: SFT, the reward model's and DPO's starting point, PPO's policy
    policy-no-eos/    the same weights with a tokenizer whose EOS id lies outside the model's vocabulary (PPO)
    reward/           GPT2ForSequenceClassification (num_labels=1): PPO's reward model and critic
    data/             demonstrations.jsonl, comparisons.jsonl, prompts.jsonl, and per-run prefixes of them

Why a second tokenizer for PPO: both sides must sample exactly ``response_length`` tokens per episode. TRL 0.19's
PPOTrainer never stops early (``stop_token=None``), but lit-rlhf samples until EOS. An EOS token the model cannot
emit (its id is past the model's output rows) makes lit-rlhf run to ``max_new_tokens`` too, without touching the
weights or the sampling distribution of any other token. The prompts never contain it.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
SPECIAL_TOKENS = {"unk": "<unk>", "pad": "<pad>", "bos": "<bos>", "eos": "<eos>"}
"""Ids 0-3 in this order. The pad id is non-zero on purpose: TRL's DPO collator takes ``pad_token_id or
eos_token_id``, which would silently pad with EOS if pad were id 0."""
UNREACHABLE_EOS = "<never-sampled-eos>"
FORMAT_VERSION = 1
"""Bump to rebuild every cached case after a change to what is built."""


@dataclass(frozen=True)
class Case:
    """One benchmark size: the model, the vocabulary and the lengths of the synthetic data."""

    name: str
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    max_length: int
    """Longest prompt + response (+ EOS) in tokens; also the model's positions."""
    max_prompt_length: int
    """lit-rlhf cuts prompts from the left to this: set above every prompt, so nothing is ever cut."""
    prompt_words: tuple[int, int]
    response_words: tuple[int, int]
    ppo_response_length: int
    """Tokens sampled per PPO episode, on both sides."""
    rows: int = 2048
    """Rows in each full data file; a run reads the prefix it needs."""
    seed: int = 0


SMALL = Case(
    name="small", vocab_size=2048, n_embd=256, n_layer=12, n_head=4, max_length=128, max_prompt_length=64,
    prompt_words=(28, 36), response_words=(32, 64), ppo_response_length=32,
)
"""~10M parameters, almost all in the transformer blocks: a small vocabulary keeps the LM head cheap."""
LARGE = Case(
    name="large", vocab_size=32000, n_embd=512, n_layer=4, n_head=8, max_length=512, max_prompt_length=256,
    prompt_words=(112, 144), response_words=(128, 256), ppo_response_length=128,
)
"""~30M parameters, over half of them the 32k-token embedding: LM-head and log-softmax cost and peak memory show."""
CASES = {case.name: case for case in (SMALL, LARGE)}


@dataclass(frozen=True)
class Assets:
    """Where one built case lies, and the parameter counts that the model-FLOPs estimate uses."""

    case: Case
    root: Path
    parameters: int
    """The causal LM's parameters, the tied embedding counted once."""
    causal_lm_flop_params: int
    """Parameters whose matmuls run once per token in a causal LM: all but the position table. The token embedding
    is tied to the LM head, so counting it once counts the LM-head matmul (the embedding lookup itself is free)."""
    scalar_head_flop_params: int
    """The same for the scalar-head model: no LM head, so neither embedding table counts."""

    @property
    def policy(self) -> Path:
        return self.root / "policy"

    @property
    def policy_no_eos(self) -> Path:
        return self.root / "policy-no-eos"

    @property
    def reward(self) -> Path:
        return self.root / "reward"

    def data_file(self, kind: str, rows: int) -> Path:
        """The first ``rows`` rows of ``kind`` (demonstrations, comparisons, prompts), written on first use so that
        both sides read exactly the same rows and a run needs no more than one pass over them (DPO's precomputed
        reference log-probs cover the whole file on both sides)."""
        full = self.root / "data" / f"{kind}.jsonl"
        if rows >= self.case.rows:
            return full
        prefix = self.root / "data" / f"{kind}.first{rows}.jsonl"
        if not prefix.exists():
            with full.open() as source:
                lines = [next(source) for _ in range(rows)]
            _write_atomically(prefix, "".join(lines))
        return prefix


def load_or_build(case: Case, rebuild: bool = False) -> Assets:
    root = CACHE_DIR / case.name
    manifest_path = root / "manifest.json"
    expected = {"format_version": FORMAT_VERSION, "case": asdict(case)}
    if not rebuild and manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if {key: manifest.get(key) for key in expected} == json.loads(json.dumps(expected)):
            return _assets(case, root, manifest)
    print(f"building the {case.name} case under {root} (once) ...", flush=True)
    manifest = {**expected, **_build(case, root)}
    _write_atomically(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return _assets(case, root, manifest)


def _assets(case: Case, root: Path, manifest: dict) -> Assets:
    return Assets(
        case, root, manifest["parameters"], manifest["causal_lm_flop_params"], manifest["scalar_head_flop_params"]
    )


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


# --- the tokenizer -----------------------------------------------------------------------------------------------


def _words(case: Case) -> list[str]:
    """The vocabulary's ordinary words: short made-up words, none of them a special token."""
    return [f"w{index}" for index in range(case.vocab_size - len(SPECIAL_TOKENS))]


def _tokenizer(case: Case, eos_token: str = SPECIAL_TOKENS["eos"]):
    """A word-level tokenizer over :func:`_words` that splits on whitespace. With ``eos_token`` other than the usual
    one, that token is appended to the vocabulary, past the model's rows (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = [*SPECIAL_TOKENS.values(), *_words(case)]
    if eos_token not in vocabulary:
        vocabulary.append(eos_token)
    core = Tokenizer(models.WordLevel({token: index for index, token in enumerate(vocabulary)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, as they were written
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=SPECIAL_TOKENS["unk"],
        pad_token=SPECIAL_TOKENS["pad"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=eos_token,
        model_max_length=case.max_length,
        padding_side="right",
    )


# --- the models --------------------------------------------------------------------------------------------------


def _config(case: Case, tokenizer, **extra):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=case.vocab_size,
        n_positions=case.max_length,
        n_embd=case.n_embd,
        n_layer=case.n_layer,
        n_head=case.n_head,
        # No dropout: RLHF's probability ratios must not be noisy, and both libraries then run the same forward.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _build(case: Case, root: Path) -> dict:
    import torch
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # its "Writing model shards" bars
    tokenizer = _tokenizer(case)
    torch.manual_seed(case.seed)
    policy = GPT2LMHeadModel(_config(case, tokenizer)).eval()
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")

    policy.save_pretrained(root / "policy-no-eos")
    _tokenizer(case, eos_token=UNREACHABLE_EOS).save_pretrained(root / "policy-no-eos")

    # The reward model: the policy's transformer under a fresh scalar head, as a reward model trained from the SFT
    # policy would start. pad_token_id tells transformers' own forward where each row ends.
    reward = GPT2ForSequenceClassification(_config(case, tokenizer, num_labels=1)).eval()
    reward.transformer.load_state_dict(policy.transformer.state_dict())
    reward.save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")

    _write_data(case, root / "data")
    position_params = policy.transformer.wpe.weight.numel()
    embedding_params = policy.transformer.wte.weight.numel()
    total_policy = sum(p.numel() for p in policy.parameters())  # tied: wte counted once
    total_reward = sum(p.numel() for p in reward.parameters())
    return {
        "parameters": total_policy,
        "causal_lm_flop_params": total_policy - position_params,
        "scalar_head_flop_params": total_reward - position_params - embedding_params,
    }


# --- the data ----------------------------------------------------------------------------------------------------


def _write_data(case: Case, folder: Path) -> None:
    """Random-word prompts and responses, in the row formats both libraries read: ``prompt``/``completion``
    (TRL's prompt-completion format; lit-rlhf's DemonstrationDataModule reads it too), ``prompt``/``chosen``/
    ``rejected``, and ``prompt`` alone. Responses start with a space: TRL joins prompt and response as text before
    tokenising, lit-rlhf tokenises them apart; with the space both get the same tokens. Every prompt is distinct, so
    lit-rlhf's reward model, which groups pairs by prompt, gets one pair per prompt like TRL."""
    rng = random.Random(case.seed)
    words = _words(case)

    def text(length_range: tuple[int, int]) -> str:
        return " ".join(rng.choices(words, k=rng.randint(*length_range)))

    prompts: list[str] = []
    seen: set[str] = set()
    while len(prompts) < case.rows:
        prompt = text(case.prompt_words)
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)

    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(row) + "\n" for row in rows)

    _write_atomically(
        folder / "demonstrations.jsonl",
        jsonl([{"prompt": prompt, "completion": " " + text(case.response_words)} for prompt in prompts]),
    )
    _write_atomically(
        folder / "comparisons.jsonl",
        jsonl([
            {"prompt": prompt, "chosen": " " + text(case.response_words), "rejected": " " + text(case.response_words)}
            for prompt in prompts
        ]),
    )
    _write_atomically(folder / "prompts.jsonl", jsonl([{"prompt": prompt} for prompt in prompts]))
