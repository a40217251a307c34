"""LightningDataModules for the four kinds of RLHF data: read → normalise → tokenise once, then batch.

Each takes ``path`` (a local .jsonl/.json/.parquet/.csv file or folder, a ``save_to_disk`` folder, or a
``datasets`` name; see :mod:`lit_rlhf.data.sources`) and uses the embedded world when ``path`` is unset. Rows
become canonical records in :mod:`lit_rlhf.data.formats` and batches in :mod:`lit_rlhf.data.collate`, whose
docstrings give the accepted formats and the batch layouts.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from transformers import PreTrainedTokenizerBase

from lit_rlhf.data.collate import (
    Encoded,
    Example,
    check_lengths,
    collate_comparison_groups,
    collate_comparisons,
    collate_demonstrations,
    collate_prompts,
    collate_unpaired,
    encode_comparisons,
    encode_demonstrations,
    encode_prompts,
    encode_unpaired,
    padded_length,
)
from lit_rlhf.data.formats import (
    AssistantTurns,
    Kind,
    NormalizedRows,
    PromptRecord,
    Record,
    make_chat_renderer,
    normalize_rows,
)
from lit_rlhf.data.sources import read_rows
from lit_rlhf.errors import ConfigError, DataError
from lit_rlhf.models import load_tokenizer
from lit_rlhf.world import ensure_world, speaks_world_language


def default_world_dir() -> Path:
    """Where the embedded world is written: ``$LIT_RLHF_CACHE/world``, else ``~/.cache/lit-rlhf/world``."""
    return Path(os.environ.get("LIT_RLHF_CACHE") or Path.home() / ".cache" / "lit-rlhf") / "world"


def global_seed() -> int:
    """The run's seed: what Lightning's ``seed_everything`` (LightningCLI's ``--seed_everything``) set, else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def train_val_split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a deterministic random split, each list in increasing order.

    The same ``n``, fraction and seed always give the same split. Validation gets ``round(n · val_fraction)``
    rows, at least one when ``val_fraction > 0`` and ``n ≥ 2``; training always keeps at least one row.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(round(n * val_fraction), max(n - 1, 0))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


T = TypeVar("T")


def subsample(items: list[T], n: int, seed: int) -> list[T]:
    """``n`` of ``items`` drawn at random (seeded) and kept in their order; all of them when there are no more.
    Training records come grouped by prompt (:meth:`RLHFDataModule._split`), so their first ``n`` would be a few
    prompts, each as often as the data repeats it, rather than a sample of the prompts."""
    if n >= len(items):
        return list(items)
    return [items[index] for index in sorted(random.Random(seed).sample(range(len(items)), n))]


class EpochShuffle(DistributedSampler):
    """Pass e over the rows visits them in the order ``DataLoader(shuffle=True, generator=Generator().manual_seed(
    seed))`` gives in its epoch e, rebuilt from scratch so that any epoch's order can be recovered. :attr:`epoch`
    is the epoch of the pass under way; after :meth:`resume_at` the next pass is that epoch, started that many rows
    in. The epoch is counted here, by passes, not taken from the trainer (``set_epoch`` is ignored): a run stopped
    by ``max_steps`` counts its unfinished epoch as done, and would otherwise resume in the next epoch's order.

    Under data parallelism the order is padded to a multiple of ``num_replicas`` by repeating it from its start, as
    ``DistributedSampler`` pads, and replica r takes every ``num_replicas``-th row from row r. ``resume_at`` skips
    rows of that whole order, so a replica resumed with the same number of replicas sees exactly the rows it would
    have seen. Being a ``DistributedSampler``, it is used as it is by Lightning, which would otherwise wrap it.

    With ``lengths`` (one per row) and ``batch_size``, rows of similar length share a batch, so batches carry little
    padding (transformers' ``group_by_length``): the shuffled order is cut into runs of :data:`MEGABATCH_BATCHES`
    global batches (``batch_size`` rows for every replica), each run sorted by length, cut into its global batches,
    and those shuffled. Every row is still visited once per pass, and batches still come in a random order."""

    MEGABATCH_BATCHES = 50
    """Global batches sorted together: more groups lengths more tightly, fewer keeps the order more random."""

    def __init__(
        self,
        size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        lengths: list[int] | None = None,
        batch_size: int = 1,
    ) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.size, self.lengths, self.batch_size = size, lengths, batch_size
        self.epoch, self._next_epoch, self._skip = -1, 0, 0

    def resume_at(self, epoch: int, rows: int) -> None:
        self._next_epoch, self._skip = epoch, rows

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the epoch is counted by passes (see the class docstring)."""

    def __iter__(self) -> Iterator[int]:
        self.epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epoch):  # an epoch of DataLoader + RandomSampler draws a worker seed and two orders
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            torch.randperm(self.size, generator=generator)
            torch.randperm(self.size, generator=generator)
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is not None:
            order = self._grouped_by_length(order)
        order = (order * math.ceil(self.total_size / self.size))[: self.total_size]  # the padding, repeated if short
        skip, self._skip = self._skip, 0
        return iter(order[skip + self.rank :: self.num_replicas])

    def _grouped_by_length(self, order: list[int]) -> list[int]:
        """``order`` regrouped so each global batch holds rows of similar length (see the class docstring). A
        replica takes every ``num_replicas``-th row, so a global batch of rows gives every replica one batch."""
        global_batch = self.batch_size * self.num_replicas
        shuffle = random.Random(f"length groups {self.seed} {self.epoch}").shuffle
        grouped: list[int] = []
        for start in range(0, len(order), global_batch * self.MEGABATCH_BATCHES):
            run = sorted(order[start : start + global_batch * self.MEGABATCH_BATCHES], key=self.lengths.__getitem__)
            batches = [run[first : first + global_batch] for first in range(0, len(run), global_batch)]
            partial_batch = batches.pop() if len(batches[-1]) < global_batch else []  # the pass's last: kept last
            shuffle(batches)
            grouped += [row for batch in batches for row in batch] + partial_batch
        return grouped


class RLHFDataModule(LightningDataModule):
    """Reads, validates and tokenises a dataset once in :meth:`setup`, then serves right-padded batches.

    Args:
        path: A file, folder or ``datasets`` name; ``None`` uses the embedded world (:attr:`is_world`).
        tokenizer_name_or_path: The tokenizer to encode with, the model's; ``"world"`` is the world's.
        max_length: Most tokens in prompt + response; responses are cut at the end to fit. Prompts alone
            (:class:`PromptDataModule`) do not use it: PPO's sequences are ``max_prompt_length + max_new_tokens``.
        max_prompt_length: Most prompt tokens; prompts are cut from the left (a multi-turn demonstration's prompt is
            the context before its first trained turn).
        batch_size: Rows per batch.
        val_fraction: Share of the rows held out for validation, in [0, 1).
        split_seed: Seeds the train/val split and the training shuffle; ``None`` takes the run's seed
            (:func:`global_seed`), so ``--seed_everything`` reseeds the data with everything else.
        on_bad_row: ``"error"`` stops at the first bad row; ``"skip"`` leaves bad rows out and counts them, and
            drops an empty message where its conversation stays valid without it (warned, with the first row).
        num_workers: DataLoader worker processes.
        split: The split of a ``datasets`` name, a saved DatasetDict, or a folder whose files are named by split.
        num_eval_prompts: How many prompts :attr:`eval_prompts` holds.
        world_dir: Where the world is written; default :func:`default_world_dir`.
        group_by_length: Training batches of rows of similar length, so less of each batch is padding; still every
            row once per epoch, in batches drawn in a random order (:class:`EpochShuffle`).

    After :meth:`setup` the phases read :attr:`tokenizer`, :attr:`train_records` / :attr:`val_records`,
    :attr:`eval_prompts` (the world's development prompts, or else the first distinct prompts of the validation
    split), and the counts :attr:`skipped_rows`, :attr:`skipped_reasons`, :attr:`truncated_rows` and
    :attr:`ties_dropped`.
    """

    kind: ClassVar[Kind]
    world_file: ClassVar[str]
    """The key of :func:`lit_rlhf.world.ensure_world`'s paths that holds this kind's rows."""

    def __init__(
        self,
        path: str | None = None,
        tokenizer_name_or_path: str = "world",
        max_length: int = 64,
        max_prompt_length: int = 32,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        split_seed: int | None = None,
        on_bad_row: Literal["error", "skip"] = "error",
        num_workers: int = 0,
        split: str = "train",
        num_eval_prompts: int = 64,
        world_dir: str | None = None,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        check_lengths(max_length, max_prompt_length, with_response=self.kind != "prompt")
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if on_bad_row not in ("error", "skip"):
            raise ConfigError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        if num_workers < 0 or num_eval_prompts < 0:
            raise ConfigError("num_workers and num_eval_prompts must not be negative")
        self.save_hyperparameters()
        self.seed = global_seed() if split_seed is None else split_seed
        """The seed of the split and the shuffle: ``split_seed``, else the run's seed when this was built."""
        self.train_records: list[Record] = []
        self.val_records: list[Record] = []
        self.eval_prompts: list[str] = []
        self.skipped_rows = 0
        self.skipped_reasons: Counter[str] = Counter()
        self.truncated_rows = 0
        self.ties_dropped = 0
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._train: Encoded | None = None
        self._val: Encoded | None = None
        self._train_order: EpochShuffle | None = None
        self._resume_position: tuple[int, int] | None = None

    @property
    def is_world(self) -> bool:
        return self.hparams.path is None

    @property
    def world_dir(self) -> Path:
        return Path(self.hparams.world_dir) if self.hparams.world_dir else default_world_dir()

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """Loaded on first use, so that a model can size its embeddings before :meth:`setup`."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer_name_or_path)
        return self._tokenizer

    def prepare_data(self) -> None:
        # Runs on one process per node: the only place that writes files.
        if self.is_world:
            ensure_world(self.world_dir)

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        source = str(ensure_world(self.world_dir)[self.world_file]) if self.is_world else self.hparams.path
        if self.is_world and not speaks_world_language(self.tokenizer):
            rank_zero_warn(
                f"data.path is unset, so the data is the embedded world's, but {self.hparams.tokenizer_name_or_path} "
                "does not speak the world's language: set data.path to your own data"
            )
        normalized = self._normalize(source, self.kind)
        self.skipped_rows, self.skipped_reasons = normalized.skipped_rows, normalized.skipped
        self.ties_dropped = normalized.ties
        for problem in normalized.problems(source):
            rank_zero_warn(problem)
        if not normalized.records:
            raise DataError(
                f"{source}: no usable {self.kind} rows ({normalized.rows} read, {normalized.skipped_rows} skipped)"
            )
        self.train_records, self.val_records = self._split(normalized.records)
        self._train, self._val = self._encode(self.train_records), self._encode(self.val_records)
        self.truncated_rows = self._train.truncated_rows + self._val.truncated_rows
        if self.truncated_rows:
            rank_zero_info(f"{source}: truncated {self.truncated_rows} rows to fit the length limits")
        self.eval_prompts = self._eval_prompts()

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        examples, hp = self._train.examples, self.hparams
        lengths = [padded_length(example) for example in examples] if hp.group_by_length else None
        self._train_order = EpochShuffle(len(examples), self.seed, *self._replica(), lengths, hp.batch_size)
        if self._resume_position is not None:
            self._train_order.resume_at(*self._resume_position)
            self._resume_position = None
        # The loader's own generator seeds worker processes; given one, it leaves the global RNG alone.
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(examples, sampler=self._train_order, generator=generator)

    def state_dict(self) -> dict[str, int]:
        """Where training is in its data, for an exact mid-epoch resume: the epoch and the batches of it done, and
        the batch size and replicas that say how many rows those were."""
        if self._train_order is None or self.trainer is None:
            return {}
        return {
            "epoch": max(self._train_order.epoch, 0),
            "batches": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed,
            "batch_size": self.hparams.batch_size,
            "world_size": self._replica()[0],
            "seed": self.seed,
        }

    def _replica(self) -> tuple[int, int]:
        """``(number of data-parallel replicas, this process's replica)``, as the strategy shares out data."""
        sharing = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer else None
        return (sharing["num_replicas"], sharing["rank"]) if sharing else (1, 0)

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the saved epoch's order where it stopped (a saved epoch end starts the next one)."""
        if not state_dict:
            return
        saved_seed = state_dict.get("seed", self.seed)  # checkpoints before the seed was saved: not checked
        if saved_seed != self.seed:
            raise ConfigError(
                f"the checkpoint's data was split and shuffled with seed {saved_seed}, this run's with {self.seed}: "
                f"resume with --seed_everything {saved_seed} (or the run's config.yaml)"
            )
        world_size = state_dict["world_size"]
        batch_size = state_dict.get("batch_size", self.hparams.batch_size)  # not saved before: taken as unchanged
        if (world_size, batch_size) != (self._replica()[0], self.hparams.batch_size):
            rank_zero_warn(
                f"resuming data saved with {world_size} data-parallel replicas of batches of {batch_size} on "
                f"{self._replica()[0]} of {self.hparams.batch_size}: the rows done are skipped, but the batches after "
                "them differ from the uninterrupted run's"
            )
        epoch, batches = state_dict["epoch"], state_dict["batches"]
        rows_per_rank = math.ceil(len(self._train.examples) / world_size) if self._train is not None else math.inf
        if batches >= math.ceil(rows_per_rank / batch_size):
            epoch, batches = epoch + 1, 0
        self._resume_position = (epoch, batches * batch_size * world_size)

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self._val.examples, shuffle=False)

    def every_batch(self) -> Iterator[dict[str, Any]]:
        """Every training and validation row once, in file order, batched like training: one pass of a frozen
        model over all the data (DPO's reference log-probs), whichever rows this process trains on."""
        self._require_setup()
        return chain(self._loader(self._train.examples), self._loader(self._val.examples))

    # --- per kind ---

    def _encode(self, records: list[Record]) -> Encoded:
        raise NotImplementedError

    def _collate_fn(self) -> Callable[[list[Example]], dict[str, Any]]:
        raise NotImplementedError

    def _assistant_turns(self) -> AssistantTurns:
        """The assistant turns of a ``messages`` demonstration that are trained on: a choice of SFT data only."""
        return "all"

    # --- helpers ---

    def _normalize(self, source: str, kind: Kind) -> NormalizedRows:
        return normalize_rows(
            read_rows(source, self.hparams.split),
            kind,
            source=source,
            chat_renderer=make_chat_renderer(self.tokenizer),
            on_bad_row=self.hparams.on_bad_row,
            assistant_turns=self._assistant_turns(),
        )

    def _split(self, records: list[Record]) -> tuple[list[Record], list[Record]]:
        """Split by prompt, so that no prompt (and none of a ranking's pairs) is on both sides. Rows without a prompt
        (``text`` rows) are each a group of their own. Where every row has one prompt nothing can be held out: that
        is warned about, not left to Lightning's remark on an empty validation loader."""
        by_prompt: dict[str | int, list[Record]] = {}
        for index, record in enumerate(records):
            by_prompt.setdefault(record.prompt or index, []).append(record)
        groups = list(by_prompt.values())
        train_indices, val_indices = train_val_split(len(groups), self.hparams.val_fraction, self.seed)
        if self.hparams.val_fraction > 0 and not val_indices and len(records) > 1:
            rank_zero_warn(f"no validation rows: all {len(records)} rows share one prompt, and rows are held out by "
                           "prompt (so that none is on both sides); validation is skipped")
        return [r for i in train_indices for r in groups[i]], [r for i in val_indices for r in groups[i]]

    def _eval_prompts(self) -> list[str]:
        if self.is_world:
            world_eval = self._normalize(str(ensure_world(self.world_dir)["dev_prompts"]), "prompt")
            prompts = [record.prompt for record in world_eval.records]
        else:
            prompts = list(dict.fromkeys(record.prompt for record in self.val_records or self.train_records
                                         if record.prompt))  # a text row's empty prompt asks for nothing
        return prompts[: self.hparams.num_eval_prompts]

    def _require_setup(self) -> None:
        if self._train is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are asked for")

    def _loader(
        self,
        examples: list[Example],
        shuffle: bool = False,
        sampler: Sampler | None = None,
        generator: torch.Generator | None = None,
    ) -> DataLoader:
        return DataLoader(
            examples,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            generator=generator,
            collate_fn=self._collate_fn(),
            num_workers=self.hparams.num_workers,
        )


class DemonstrationDataModule(RLHFDataModule):
    """SFT data. Batches: ``input_ids``, ``attention_mask``, ``response_mask`` [B, T]; ``prompt`` texts.

    ``assistant_turns`` says which assistant turns of a ``messages`` row ``response_mask`` covers: ``"all"`` (the
    default, TRL's ``assistant_only_loss``; ``max_prompt_length`` then limits the context before the first turn)
    or ``"last"`` (the earlier turns are prompt). See :mod:`lit_rlhf.data.formats` and :mod:`lit_rlhf.data.collate`.
    """

    kind = "demonstration"
    world_file = "demonstrations"

    def __init__(self, *args: Any, assistant_turns: AssistantTurns = "all", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if assistant_turns not in get_args(AssistantTurns):
            raise ConfigError(f"assistant_turns must be 'all' or 'last', got {assistant_turns!r}")
        self.save_hyperparameters()

    def _assistant_turns(self) -> AssistantTurns:
        return self.hparams.assistant_turns

    def _encode(self, records: list[Record]) -> Encoded:
        hp = self.hparams
        return encode_demonstrations(records, self.tokenizer, hp.max_length, hp.max_prompt_length)

    def _collate_fn(self) -> Callable[[list[Example]], dict[str, Any]]:
        return partial(collate_demonstrations, pad_id=self.tokenizer.pad_token_id)


class ComparisonDataModule(RLHFDataModule):
    """Reward-model and DPO data. Batches: ``chosen_`` and ``rejected_`` ``input_ids`` / ``attention_mask`` /
    ``response_mask``, all [B, T] with one common T; ``margin`` [B], ``has_margin`` [B]; ``prompt``, ``chosen``,
    ``rejected`` texts. Ranking rows are expanded to pairs; :attr:`ties_dropped` counts the tied pairs.

    With ``group_by_prompt`` a batch holds every pair of ``batch_size`` prompts: the C(k,2) comparisons of a
    k-wise ranking then train as one batch element, each response scored once (InstructGPT §3.5, where this both
    saves forwards and stops the reward model overfitting to responses seen in k − 1 separate pairs)."""

    kind = "comparison"
    world_file = "comparisons"

    def __init__(self, *args: Any, group_by_prompt: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()

    def _encode(self, records: list[Record]) -> Encoded:
        hp = self.hparams
        encoded = encode_comparisons(records, self.tokenizer, hp.max_length, hp.max_prompt_length)
        if hp.group_by_prompt:
            groups: dict[str, list[Example]] = {}
            for example in encoded.examples:
                groups.setdefault(example["prompt"], []).append(example)
            encoded.examples = list(groups.values())
        return encoded

    def _collate_fn(self) -> Callable[[list[Example]], dict[str, Any]]:
        collate = collate_comparison_groups if self.hparams.group_by_prompt else collate_comparisons
        return partial(collate, pad_id=self.tokenizer.pad_token_id)


class PromptDataModule(RLHFDataModule):
    """PPO prompts. Batches: ``prompt_input_ids``, ``prompt_attention_mask`` [B, T] left-padded; ``prompt`` texts.
    Training serves the training split; validation serves :attr:`eval_prompts`."""

    kind = "prompt"
    world_file = "prompts"

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        records = [PromptRecord(prompt) for prompt in self.eval_prompts]
        return self._loader(self._encode(records).examples, shuffle=False)

    def _encode(self, records: list[Record]) -> Encoded:
        return encode_prompts(records, self.tokenizer, self.hparams.max_prompt_length)

    def _collate_fn(self) -> Callable[[list[Example]], dict[str, Any]]:
        return partial(collate_prompts, pad_id=self.tokenizer.pad_token_id)


class UnpairedDataModule(RLHFDataModule):
    """KTO data; paired comparison rows are accepted too (chosen desirable, rejected undesirable). Batches:
    ``input_ids``, ``attention_mask``, ``response_mask`` [B, T], ``label`` bool [B]; ``kl_input_ids``,
    ``kl_attention_mask``, ``kl_response_mask`` (prompt i with completion i + 1 mod B); ``prompt``,
    ``completion`` texts."""

    kind = "unpaired"
    world_file = "unpaired"

    def _encode(self, records: list[Record]) -> Encoded:
        hp = self.hparams
        return encode_unpaired(records, self.tokenizer, hp.max_length, hp.max_prompt_length)

    def _collate_fn(self) -> Callable[[list[Example]], dict[str, Any]]:
        return partial(collate_unpaired, pad_id=self.tokenizer.pad_token_id, max_length=self.hparams.max_length)


class DataReport(Callback):
    """Logs what the data edge left out or cut (``data/skipped_rows``, ``data/truncated_rows``,
    ``data/ties_dropped``) once, when training starts, so the counts sit beside the run's metrics."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, RLHFDataModule):
            return
        counts = {
            "data/skipped_rows": datamodule.skipped_rows,
            "data/truncated_rows": datamodule.truncated_rows,
            "data/ties_dropped": datamodule.ties_dropped,
        }
        # The step self.log gives metrics, which Lightning's LearningRateMonitor takes too: under PPO the iteration,
        # not the optimiser step.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # private: trainer_parts.PRIVATE_ATTRIBUTES
        for logger in trainer.loggers:
            logger.log_metrics(counts, step=step)
