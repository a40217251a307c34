"""Reading dataset rows from a file, a folder or a ``datasets`` name, each row with where it came from.

``path`` is tried in this order:

- a local **file**: ``.jsonl`` (one object a line; blank lines are not rows; the row number is the line
  number), ``.json`` (a list of objects, an object whose ``"data"`` field is that list, or JSON Lines as
  ``Dataset.to_json`` writes them), ``.parquet``, ``.csv`` (flat formats only: the text fields stay strings,
  other columns get their inferred types, an empty numeric cell is absent). Outside JSON Lines the row number
  is the 1-based record index.
- a local **folder**: written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with
  ``datasets.load_from_disk``; ``split`` picks from a DatasetDict), or else every supported file in it and its
  subfolders, sorted by path, hidden ones left out. When the files are named by split (``train.jsonl``,
  ``test-00000.parquet``, ``validation/part.jsonl``, ``train_prefs-00000-of-00001.parquet``) only those of
  ``split`` are read, so that a folder holding several splits is never read as one (``train`` is not
  ``train_prefs``).
- otherwise a **datasets name**: ``datasets.load_dataset(path, split=split)``; its rows are labelled
  ``name[split]``. A path that looks local (``/``, ``.``, ``~`` or a known file suffix) never goes to the hub.

An unparseable JSON line comes as a :class:`~lit_rlhf.data.formats.RowProblem` in place of its row, so that
:func:`~lit_rlhf.data.formats.normalize_rows` reports or skips it like any other bad row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet

from lit_rlhf.data.formats import TEXT_FIELDS, RowProblem
from lit_rlhf.errors import DataError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_SPLIT_NAME = re.compile(r"^((?:train|validation|valid|val|dev|test|eval)(?:_[a-z]+)*)(?=$|[-.]|_?[0-9])",
                         re.IGNORECASE)
"""A split's name at the start of a file or folder name: a split word and any ``_word`` after it (``train``,
``train_prefs``), ended by the name's end, ``-``, ``.`` or a shard number (``train-00000-of-00002``, ``train_1``)."""
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_PARQUET_BATCH_ROWS = 1024


def read_rows(path: str, split: str = "train") -> Iterator[tuple[str, int, Any]]:
    """Yield ``(source, row_number, row)`` for every row of ``path`` (see the module docstring)."""
    local = Path(path).expanduser()
    if local.is_file():
        yield from _read_file(local)
    elif local.is_dir():
        if any((local / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
            yield from _read_saved_dataset(local, split)
        else:
            for file in _data_files(local, split):
                yield from _read_file(file)
    elif _looks_local(path):
        raise DataError(f"dataset not found: {path} (no such file or folder)")
    else:
        yield from _read_hub_dataset(path, split)


def is_local(path: str) -> bool:
    """Whether ``path`` names a local file or folder (one that is there, or looks like a path), not a hub dataset."""
    return Path(path).expanduser().exists() or _looks_local(path)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).suffix in SUPPORTED_SUFFIXES


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _read_file(file: Path) -> Iterator[tuple[str, int, Any]]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
    reader = readers.get(file.suffix.lower())
    if reader is None:
        raise DataError(f"{file}: unsupported file type '{file.suffix}' (expected one of {SUPPORTED_SUFFIXES})")
    yield from reader(file)


def _read_jsonl(file: Path) -> Iterator[tuple[str, int, Any]]:
    source = str(file)
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                # utf-8-sig drops a byte-order mark, which some editors put at the start of a file.
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield source, number, RowProblem(None, "not UTF-8", f"not UTF-8 text: {error}")
                continue
            if not line.strip():
                continue
            try:
                yield source, number, json.loads(line)
            except json.JSONDecodeError as error:
                yield source, number, RowProblem(None, "invalid JSON", f"invalid JSON: {error}")


def _read_json(file: Path) -> Iterator[tuple[str, int, Any]]:
    try:
        document = json.loads(file.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as error:
        raise DataError(f"{file}: not UTF-8 text: {error}") from None
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # more than one document: JSON Lines under a .json name
            yield from _read_jsonl(file)
            return
        raise DataError(f"{file}:{error.lineno}: invalid JSON: {error}") from None
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    rows = document if isinstance(document, list) else [document]
    for number, row in enumerate(rows, start=1):
        yield str(file), number, row


def _read_parquet(file: Path) -> Iterator[tuple[str, int, Any]]:
    try:
        batches = pyarrow.parquet.ParquetFile(file).iter_batches(batch_size=_PARQUET_BATCH_ROWS)
        yield from _numbered(str(file), batches)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{file}: cannot read Parquet: {_first_line(error)}") from None


def _read_csv(file: Path) -> Iterator[tuple[str, int, Any]]:
    # A prompt such as "42" must stay text; pyarrow ignores the types of columns a file does not have.
    text_columns = pyarrow.csv.ConvertOptions(column_types={name: pa.string() for name in TEXT_FIELDS})
    try:
        yield from _numbered(str(file), pyarrow.csv.open_csv(file, convert_options=text_columns))
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{file}: cannot read CSV: {_first_line(error)}") from None


def _numbered(source: str, batches: Any) -> Iterator[tuple[str, int, Any]]:
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield source, number, row


def _split_of(relative: Path) -> str | None:
    """The split a file belongs to by its name or a folder's name, if any names one."""
    for part in (*relative.parent.parts, relative.name):
        match = _SPLIT_NAME.match(part)
        if match:
            return match.group(1).lower()
    return None


def _data_files(folder: Path, split: str) -> list[Path]:
    files = sorted(
        file
        for file in folder.rglob("*")
        if file.is_file()
        and file.suffix.lower() in SUPPORTED_SUFFIXES
        and not any(part.startswith(".") for part in file.relative_to(folder).parts)
    )
    if not files:
        raise DataError(f"{folder}: no {'/'.join(SUPPORTED_SUFFIXES)} files in this folder")
    splits = {file: _split_of(file.relative_to(folder)) for file in files}
    if not any(splits.values()):
        return files
    chosen = [file for file in files if splits[file] == split.lower()]
    if not chosen:
        found = sorted({name for name in splits.values() if name})
        unnamed = [str(file.relative_to(folder)) for file in files if splits[file] is None]
        hint = f"; the others ({', '.join(unnamed[:5])}) name no split: point data.path at one file" if unnamed else ""
        raise DataError(
            f"{folder}: no files for split '{split}' (its files are named for the splits {found}; pick one with "
            f"data.split){hint}"
        )
    return chosen


def _read_saved_dataset(folder: Path, split: str) -> Iterator[tuple[str, int, Any]]:
    try:
        dataset = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as error:
        raise DataError(f"{folder}: cannot load a saved dataset: {_first_line(error)}") from None
    source = str(folder)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"{folder}: no split '{split}' (it has {sorted(dataset)}; pick one with data.split)")
        dataset, source = dataset[split], f"{folder}[{split}]"
    for number, row in enumerate(dataset, start=1):
        yield source, number, row


def _read_hub_dataset(name: str, split: str) -> Iterator[tuple[str, int, Any]]:
    try:
        dataset = datasets.load_dataset(name, split=split)
    except OSError as error:  # not on the hub, not reachable (offline), or not a dataset at all
        raise DataError(
            f"dataset not found: {name} (no such file or folder, and not a loadable datasets name: "
            f"{_first_line(error)})"
        ) from None
    except ValueError as error:  # typically an unknown split
        raise DataError(f"{name}: cannot load split '{split}' (pick another with data.split): {_first_line(error)}") \
            from None
    for number, row in enumerate(dataset, start=1):
        yield f"{name}[{split}]", number, row
