"""Prompts, a demonstrator of mixed quality, and the writers that put the world on disk as ordinary datasets.

The files use the formats real datasets use (JSONL with ``prompt``/``completion``, ``prompt``/``chosen``/
``rejected``, ``prompt``/``completion``/``label``, ``prompt``), so the package's real loaders read them.
"""

from __future__ import annotations

import functools
import json
import random
import zlib
from dataclasses import asdict
from pathlib import Path

from lit_rlhf.world.language import (
    CATEGORIES,
    CATEGORY_NAMES,
    DECORATIONS,
    FILLERS,
    ITEM_CATEGORY,
    MAX_COUNT,
    PERIOD,
    REQUEST_VERBS,
    SYCOPHANCY_PHRASE,
    PromptSpec,
    format_prompt,
    parse_prompt,
)
from lit_rlhf.world.raters import Rater
from lit_rlhf.world.tokenizer import build_tokenizer

WORLD_VERSION = 2
"""Bumped whenever the generated files would change for the same settings, so cached worlds are rewritten."""

OPINION_PROBABILITY = 0.5
PERFECT_PROBABILITY = 0.35
TWO_FLAWS_PROBABILITY = 0.6  # of flawed demonstrations; the others have one flaw
HELD_OUT_BUCKETS = 8  # one prompt in this many is reserved for evaluation
DEV_BUCKETS = 4  # one held-out prompt in this many is a development prompt, the others are test prompts

SPLITS = ("train", "dev", "test", "held_out", "any")
_SORTED_DECORATIONS = tuple(sorted(DECORATIONS))  # a fixed order, so seeded draws are reproducible


def is_held_out(prompt: str) -> bool:
    """Whether ``prompt`` belongs to the evaluation prompts: a fixed hash of the text, stable across runs."""
    return zlib.crc32(prompt.encode("utf-8")) % HELD_OUT_BUCKETS == 0


def prompt_split(prompt: str) -> str:
    """``"train"``, ``"dev"`` or ``"test"``: the split ``prompt`` belongs to, by a fixed hash of its text. About one
    world prompt in 8 is held out from every training file; a quarter of those are development prompts (validation
    during training, tuning, a sweep's metric), the rest test prompts (the pipeline's summary)."""
    if not is_held_out(prompt):
        return "train"
    return "dev" if zlib.crc32(prompt.encode("utf-8")) // HELD_OUT_BUCKETS % DEV_BUCKETS == 0 else "test"


def in_split(prompt: str, split: str) -> bool:
    """Whether ``prompt`` belongs to ``split``: one of :func:`prompt_split`'s, ``"held_out"`` (dev or test) or
    ``"any"``."""
    return split == "any" or split == prompt_split(prompt) or (split == "held_out" and is_held_out(prompt))


def sample_prompt(rng: random.Random, split: str = "train") -> str:
    """Draw a prompt: a random category, count (1–5) and wording; half the time after a stated opinion.

    A stated opinion names an item of the requested category (a correct view) or, equally often, of another
    category (a wrong view). ``split`` is ``"train"`` (prompts outside the held-out set), ``"dev"`` or ``"test"``
    (the two disjoint parts of the held-out set, :func:`prompt_split`), ``"held_out"`` (either) or ``"any"``; the
    split is a fixed hash of the text, so no prompt is in two of them.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    while True:
        category = rng.choice(CATEGORY_NAMES)
        count = rng.randint(1, MAX_COUNT)
        verb = rng.choice(REQUEST_VERBS)
        opinion_item = None
        if rng.random() < OPINION_PROBABILITY:
            correct_view = rng.random() < 0.5
            opinion_category = category if correct_view else rng.choice(
                [other for other in CATEGORY_NAMES if other != category])
            opinion_item = rng.choice(CATEGORIES[opinion_category][1])
        prompt = format_prompt(PromptSpec(count, category, opinion_item), verb)
        if in_split(prompt, split):
            return prompt


def distinct_prompts(rng: random.Random, split: str, n: int) -> list[str]:
    """``n`` different prompts of ``split``, in the order :func:`sample_prompt` first draws them: the world's mix of
    requests without repeats. The held-out splits hold about 350 (dev) and 1,070 (test) prompts, most with a stated
    view: only 120 prompts in all state none."""
    if n > (available := split_size(split)):
        raise ValueError(f"the world's {split} split has {available} distinct prompts, {n} were asked for")
    prompts: dict[str, None] = {}
    while len(prompts) < n:
        prompts[sample_prompt(rng, split)] = None
    return list(prompts)


@functools.cache
def split_size(split: str) -> int:
    """How many distinct prompts the world can write in ``split``."""
    prompts = (format_prompt(PromptSpec(count, category, item), verb)
               for category in CATEGORY_NAMES for count in range(1, MAX_COUNT + 1) for verb in REQUEST_VERBS
               for item in (None, *ITEM_CATEGORY))
    return sum(in_split(prompt, split) for prompt in prompts)


def demonstrate(prompt: str, rng: random.Random) -> str:
    """A demonstrator's response of mixed quality: perfect 35% of the time, otherwise with one or two flaws.

    Flaws: one item too few or too many; an item of another category; a repeated item; 1–3 filler words;
    1–3 decorations; sycophancy (listing the user's opinion item first, or opening with ``yes you are right ,``;
    only when the prompt states an opinion); no final period. Raises ``ValueError`` for an unparseable prompt.
    """
    spec = parse_prompt(prompt)
    if spec is None:
        raise ValueError(f"not a world prompt: {prompt!r}")
    flaws = []
    if rng.random() >= PERFECT_PROBABILITY:
        candidates = ["count", "wrong_item", "repeat", "fillers", "decorations", "no_period"]
        if spec.opinion_item is not None:
            candidates.append("sycophancy")
        flaws = rng.sample(candidates, 2 if rng.random() < TWO_FLAWS_PROBABILITY else 1)

    category_items = CATEGORIES[spec.category][1]
    count = spec.count
    if "count" in flaws:
        count = count + 1 if count == 1 or rng.random() < 0.5 else count - 1
    items = rng.sample(category_items, count)
    if "wrong_item" in flaws:
        other_category = rng.choice([name for name in CATEGORY_NAMES if name != spec.category])
        items[rng.randrange(len(items))] = rng.choice(CATEGORIES[other_category][1])
    if "repeat" in flaws:
        source = rng.randrange(len(items))
        if len(items) == 1:
            items.append(items[source])
        else:
            items[rng.choice([index for index in range(len(items)) if index != source])] = items[source]
    opening: list[str] = []
    if "sycophancy" in flaws:
        if rng.random() < 0.5:
            opening = list(SYCOPHANCY_PHRASE)
        elif spec.opinion_item not in items:
            items[0] = spec.opinion_item

    words = " , ".join(items).split()
    if "fillers" in flaws:
        fillers = [rng.choice(FILLERS) for _ in range(rng.randint(1, 3))]
        words = fillers + words if rng.random() < 0.5 else words + fillers
    if "decorations" in flaws:
        for decoration in (rng.choice(_SORTED_DECORATIONS) for _ in range(rng.randint(1, 3))):
            words = [decoration] + words if rng.random() < 0.5 else words + [decoration]
    words = opening + words
    if "no_period" not in flaws:
        words.append(PERIOD)
    return " ".join(words)


def write_world(
    out_dir: str | Path,
    seed: int = 0,
    n_demonstrations: int = 4000,
    n_comparisons: int = 4000,
    n_prompts: int = 2000,
    n_dev_prompts: int = 256,
    n_test_prompts: int = 512,
    rater: Rater | None = None,
) -> dict[str, Path]:
    """Write the world's datasets under ``out_dir`` and return their paths by name.

    - ``demonstrations``: ``demonstrations.jsonl`` rows ``{"prompt", "completion"}`` (SFT).
    - ``comparisons``: ``comparisons.jsonl`` rows ``{"prompt", "chosen", "rejected"}``: two demonstrations for
      one prompt, labelled by ``rater`` (default :class:`Rater`); pairs the rater values equally (identical
      responses among them) are redrawn, as real datasets drop ties.
    - ``unpaired``: ``unpaired.jsonl`` rows ``{"prompt", "completion", "label"}``: each comparison's chosen
      response labelled ``true`` and its rejected one ``false`` (KTO).
    - ``prompts``: ``prompts.jsonl`` rows ``{"prompt"}`` for RL.
    - ``dev_prompts`` and ``test_prompts``: ``dev_prompts.jsonl`` and ``test_prompts.jsonl``, distinct held-out
      prompts, disjoint from each other and from every training file (:func:`prompt_split`): the phases validate
      on the development prompts, the pipeline's summary measures on the test prompts.
    - ``tokenizer``: the ``tokenizer/`` folder saved with ``save_pretrained``; ``world``: ``world.json`` with the
      settings and :data:`WORLD_VERSION`.

    The same settings give byte-identical files; each file draws from its own seeded random stream.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rater = rater or Rater()
    paths = _world_paths(out_dir)

    def stream(name: str) -> random.Random:
        return random.Random(f"lit-rlhf-world:{seed}:{name}")

    demonstration_rng = stream("demonstrations")
    demonstrations = []
    for _ in range(n_demonstrations):
        prompt = sample_prompt(demonstration_rng)
        demonstrations.append({"prompt": prompt, "completion": demonstrate(prompt, demonstration_rng)})

    comparison_rng = stream("comparisons")
    comparisons = []
    for _ in range(n_comparisons):
        prompt = sample_prompt(comparison_rng)
        first = demonstrate(prompt, comparison_rng)
        second = demonstrate(prompt, comparison_rng)
        # A rater who values both responses equally (e.g. two perfect answers) would only add a coin-flip label.
        while rater.utility(prompt, second) == rater.utility(prompt, first):
            second = demonstrate(prompt, comparison_rng)
        if not rater.prefers_first(prompt, first, second, comparison_rng):
            first, second = second, first
        comparisons.append({"prompt": prompt, "chosen": first, "rejected": second})
    unpaired = [
        {"prompt": row["prompt"], "completion": row[side], "label": side == "chosen"}
        for row in comparisons
        for side in ("chosen", "rejected")
    ]

    prompt_rng = stream("prompts")
    prompts = [{"prompt": sample_prompt(prompt_rng)} for _ in range(n_prompts)]
    held_out = {
        split: [{"prompt": prompt} for prompt in distinct_prompts(stream(f"{split}_prompts"), split, n)]
        for split, n in (("dev", n_dev_prompts), ("test", n_test_prompts))
    }

    for name, rows in [("demonstrations", demonstrations), ("comparisons", comparisons), ("unpaired", unpaired),
                       ("prompts", prompts), ("dev_prompts", held_out["dev"]), ("test_prompts", held_out["test"])]:
        _write_jsonl(paths[name], rows)
    build_tokenizer().save_pretrained(str(paths["tokenizer"]))
    settings = _world_settings(seed, n_demonstrations, n_comparisons, n_prompts, n_dev_prompts, n_test_prompts, rater)
    paths["world"].write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return paths


def ensure_world(
    out_dir: str | Path,
    seed: int = 0,
    n_demonstrations: int = 4000,
    n_comparisons: int = 4000,
    n_prompts: int = 2000,
    n_dev_prompts: int = 256,
    n_test_prompts: int = 512,
    rater: Rater | None = None,
) -> dict[str, Path]:
    """Like :func:`write_world`, but reuse the files when ``out_dir`` already holds a world with these settings."""
    out_dir = Path(out_dir)
    paths = _world_paths(out_dir)
    settings = _world_settings(seed, n_demonstrations, n_comparisons, n_prompts, n_dev_prompts, n_test_prompts,
                               rater or Rater())
    if all(path.exists() for path in paths.values()):
        try:
            if json.loads(paths["world"].read_text(encoding="utf-8")) == settings:
                return paths
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # a damaged world.json is rewritten below
    return write_world(out_dir, seed, n_demonstrations, n_comparisons, n_prompts, n_dev_prompts, n_test_prompts,
                       rater)


def _world_paths(out_dir: Path) -> dict[str, Path]:
    """Where :func:`write_world` puts each output, by name."""
    return {
        "demonstrations": out_dir / "demonstrations.jsonl",
        "comparisons": out_dir / "comparisons.jsonl",
        "unpaired": out_dir / "unpaired.jsonl",
        "prompts": out_dir / "prompts.jsonl",
        "dev_prompts": out_dir / "dev_prompts.jsonl",
        "test_prompts": out_dir / "test_prompts.jsonl",
        "tokenizer": out_dir / "tokenizer",
        "world": out_dir / "world.json",
    }


def _world_settings(seed: int, n_demonstrations: int, n_comparisons: int, n_prompts: int, n_dev_prompts: int,
                    n_test_prompts: int, rater: Rater) -> dict:
    """The contents of ``world.json``: everything that determines the generated files."""
    return {
        "version": WORLD_VERSION,
        "seed": seed,
        "n_demonstrations": n_demonstrations,
        "n_comparisons": n_comparisons,
        "n_prompts": n_prompts,
        "n_dev_prompts": n_dev_prompts,
        "n_test_prompts": n_test_prompts,
        "rater": asdict(rater),
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write one JSON object per line, UTF-8, with ``\\n`` line endings on every platform."""
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
