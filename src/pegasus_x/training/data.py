"""Source/target pairs for fine-tuning and evaluation: reading, tokenizing, length-grouped batching.

Reading: JSONL (also ``.json`` holding a list), CSV, TSV and Parquet files (optionally ``.gz`` for the
text formats); with the ``datasets`` package also a ``datasets.Dataset`` object, a folder (one saved with
``save_to_disk``, or data files ``load_dataset`` reads) written ``FOLDER[@SPLIT]``, or a hub dataset name
written ``NAME[:CONFIG][@SPLIT]``. Rows whose source or target is empty are skipped and counted.

Batching: a *plan* is the list of global batches (lists of example indices) of one epoch. It depends
only on the token lengths, the batch limits, the seed and the epoch, so every rank of a distributed run
computes the same plan and takes its own shard of each global batch, and a run resumed at
``DataPosition(epoch, batch)`` sees exactly the batches it would have seen.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import strict_json
from ..errors import DataError
from ..model import IGNORE_INDEX

TEXT_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
# Length grouping sorts within pools of this many batches: long enough to pad little, short enough
# that batches still mix documents from all over the (shuffled) epoch.
POOL_BATCHES = 64


# ---------------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Example:
    """One pair: the document (``source``) and its summary or translation (``target``)."""

    source: str
    target: str


@dataclass
class PairDataset:
    """The usable pairs of a file plus how many rows were skipped for an empty source or target."""

    examples: list[Example]
    skipped_empty: int
    origin: str

    def __len__(self) -> int:
        return len(self.examples)

    def describe(self) -> str:
        """One line for logs, e.g. ``train.jsonl: 1200 pairs (3 rows with empty text skipped)``."""
        skipped = f" ({self.skipped_empty} rows with empty text skipped)" if self.skipped_empty else ""
        return f"{self.origin}: {len(self.examples)} pairs{skipped}"


def load_pairs(spec: Any, source_column: str = "source", target_column: str = "target") -> PairDataset:
    """Read source/target pairs from a file, a dataset folder, a ``datasets`` name or a ``datasets.Dataset``.

    Args:
        spec: a ``.jsonl`` / ``.json`` / ``.csv`` / ``.tsv`` (each optionally ``.gz``) or ``.parquet`` file; a
            ``datasets.Dataset`` (pass one split of a ``DatasetDict``: ``dd["train"]``); a folder saved with
            ``save_to_disk`` or holding data files, ``FOLDER[@SPLIT]``; or a Hugging Face ``datasets`` name
            ``NAME[:CONFIG][@SPLIT]`` (split defaults to ``train``).
        source_column: the column holding documents.
        target_column: the column holding summaries / translations.
    Returns:
        :class:`PairDataset` (texts stripped of surrounding whitespace).
    Raises:
        DataError: unreadable file, unknown format, missing column (the available ones are listed), a
            non-text value, a ``DatasetDict`` or folder without a chosen split, or no usable pair at all.
    """
    if not isinstance(spec, (str, os.PathLike)):
        rows, columns = _read_dataset(spec, repr(spec)[:60], None)
        origin = f"{type(spec).__name__} ({len(rows)} rows)"
    else:
        path, folder, split = Path(spec), None, None
        head, at, tail = str(spec).rpartition("@")
        if path.is_dir():
            folder = path
        elif at and not path.exists() and Path(head).is_dir():
            folder, split = Path(head), tail
        if path.is_file():
            rows, columns = _read_file(path)
            origin = path.name
        elif folder is not None:
            rows, columns = _read_folder(folder, split)
            origin = str(spec)
        elif _looks_like_a_file(str(spec)):
            raise DataError(f"data file {str(spec)!r} does not exist; check the path")
        else:
            rows, columns = _read_hub(str(spec))
            origin = str(spec)
    if not rows:
        raise DataError(f"{origin} is empty: no rows to train or evaluate on")
    for wanted, flag in ((source_column, "--source-column"), (target_column, "--target-column")):
        if wanted not in columns:
            raise DataError(f"{origin} has no column {wanted!r}; its columns are {sorted(columns)} — pick one "
                            f"with {flag}")
    examples, skipped = [], 0
    for i, row in enumerate(rows):
        source, target = _text(row.get(source_column), origin, i, source_column), \
            _text(row.get(target_column), origin, i, target_column)
        if not source or not target:
            skipped += 1
            continue
        examples.append(Example(source, target))
    if not examples:
        raise DataError(f"{origin} holds no usable pair ({len(rows)} rows, {skipped} with an empty "
                        f"{source_column!r} or {target_column!r}); check the file and the column names")
    return PairDataset(examples, skipped, origin)


def _looks_like_a_file(spec: str) -> bool:
    """A path rather than a dataset name: a data suffix, or an explicit absolute/relative/home path."""
    suffixes = {s.lower() for s in Path(spec).suffixes}
    return bool(suffixes & (set(TEXT_SUFFIXES) | {".gz"})) or spec.startswith(("/", "./", "../", "~"))


def _text(value: Any, origin: str, row: int, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):    # empty CSV cells read through pandas-like tools
        return ""
    if not isinstance(value, str):
        raise DataError(f"{origin} row {row}: column {column!r} holds {type(value).__name__}, expected text")
    return value.strip()


def _format(path: Path) -> tuple[str, bool]:
    suffixes = [s.lower() for s in path.suffixes]
    compressed = bool(suffixes) and suffixes[-1] == ".gz"
    if compressed:
        suffixes = suffixes[:-1]
    kind = TEXT_SUFFIXES.get(suffixes[-1] if suffixes else "")
    if kind is None or (compressed and kind == "parquet"):
        raise DataError(f"{path.name}: unknown data format; use .jsonl, .json, .csv, .tsv (optionally .gz) or "
                        ".parquet")
    return kind, compressed


def _read_file(path: Path) -> tuple[list[dict], set[str]]:
    kind, compressed = _format(path)
    if kind == "parquet":
        return _read_parquet(path)
    raw = path.read_bytes()
    try:
        text = (gzip.decompress(raw) if compressed else raw).decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path.name} is not UTF-8 text ({exc}); convert it to UTF-8") from None
    if kind == "jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rows.append(_json(line, path, n))
    elif kind == "json":
        rows = _json(text, path, None)
        if isinstance(rows, dict):        # {"data": [...]} style files
            lists = [v for v in rows.values() if isinstance(v, list)]
            rows = lists[0] if len(lists) == 1 else rows
        if not isinstance(rows, list):
            raise DataError(f"{path.name} must hold a list of objects (or use JSON Lines, one object per line)")
    else:
        # Long documents are the point: lift the csv module's 128 KiB field limit.
        csv.field_size_limit(2**31 - 1)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if kind == "tsv" else ",")
        try:
            rows = list(reader)
        except csv.Error as exc:
            raise DataError(f"{path.name} is not valid {kind.upper()} ({exc})") from None
        return rows, set(reader.fieldnames or [])
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path.name} record {n} is {type(row).__name__}; every record must be a JSON object")
    return rows, set().union(*(row.keys() for row in rows)) if rows else set()


def _json(text: str, path: Path, line: int | None) -> Any:
    where = f" line {line}" if line else ""
    try:
        return strict_json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path.name}{where} is not valid JSON ({exc.msg}); one JSON object per line is "
                        "expected") from None
    except ValueError as exc:  # NaN, a lone surrogate, too deep: see strict_json
        raise DataError(f"{path.name}{where}: {exc}") from None


def _read_parquet(path: Path) -> tuple[list[dict], set[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow: pip install pyarrow (or convert the file to JSONL)"
                        ) from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow's errors have no common base class worth naming
        raise DataError(f"{path.name} could not be read as Parquet ({exc})") from None
    return table.to_pylist(), set(table.column_names)


def _import_datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{what} needs the `datasets` package: pip install datasets (or 'pegasus-x[datasets]') "
                        "— or pass a .jsonl/.csv/.tsv/.parquet file") from None
    return datasets


def _read_dataset(table: Any, origin: str, split: str | None) -> tuple[list[dict], set[str]]:
    """The rows of a ``datasets.Dataset``, or of the chosen split of a ``DatasetDict``."""
    datasets = _import_datasets(f"reading {origin}")
    if isinstance(table, datasets.DatasetDict):
        splits = sorted(table)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in table:
            how = "add @SPLIT to the folder" if split is None else "pick one of them"
            raise DataError(f"{origin} holds the splits {splits}" + (f", not {split!r}" if split else "") +
                            f"; {how} (FOLDER@{splits[0]}), or in Python pass one split: data[{splits[0]!r}]")
        table = table[split]
    elif split is not None:
        raise DataError(f"{origin} holds a single dataset, not splits; drop @{split}")
    if not isinstance(table, datasets.Dataset):
        raise DataError(f"expected a file path, a dataset folder or name, or a datasets.Dataset; got "
                        f"{type(table).__name__}")
    return list(table), set(table.column_names)


def _read_folder(folder: Path, split: str | None) -> tuple[list[dict], set[str]]:
    datasets = _import_datasets(f"{folder} is a folder; reading a dataset folder")
    saved = any((folder / marker).is_file() for marker in ("state.json", "dataset_dict.json"))
    try:
        # save_to_disk leaves state.json (a Dataset) or dataset_dict.json (a DatasetDict); anything else is a
        # folder of data files (train.jsonl, test.csv …), which load_dataset reads into splits by file name.
        table = datasets.load_from_disk(str(folder)) if saved else datasets.load_dataset(str(folder))
    except Exception as exc:  # datasets' errors share no base class; the user acts on the message
        raise DataError(f"could not read the dataset folder {folder} ({type(exc).__name__}: {exc}); pass a "
                        "folder saved with save_to_disk or one holding .jsonl/.csv/.parquet data files") from None
    return _read_dataset(table, str(folder), split)


def _read_hub(spec: str) -> tuple[list[dict], set[str]]:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    datasets = _import_datasets(f"{spec!r} is not a file, and loading dataset names")
    try:
        table = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # network, unknown name, unknown split: the user acts on the message
        raise DataError(f"could not load dataset {spec!r} ({type(exc).__name__}: {exc}); check the name, "
                        "config and split (NAME[:CONFIG][@SPLIT])") from None
    return list(table), set(table.column_names)


# ---------------------------------------------------------------------------------------------------- tokenizing
@dataclass
class TokenizedPairs:
    """Token ids of every pair (each ending with ``</s>``), truncated to the length limits."""

    source_ids: list[list[int]]
    target_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.source_ids)

    def lengths(self) -> tuple[list[int], list[int]]:
        return [len(s) for s in self.source_ids], [len(t) for t in self.target_ids]


def tokenize_pairs(examples: Sequence[Example], tokenizer: Any, max_source_length: int,
                   max_target_length: int, chunk: int = 1024) -> TokenizedPairs:
    """Tokenize sources and targets with truncation (``</s>`` kept last), in chunks to bound memory.

    Raises:
        DataError: a length limit below 2 (no room for a token and ``</s>``).
    """
    if max_source_length < 2 or max_target_length < 2:
        raise DataError(f"max source/target lengths must be at least 2, got {max_source_length}/"
                        f"{max_target_length}")
    sources, targets = [], []
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        sources += tokenizer([e.source for e in part], max_length=max_source_length, truncation=True)["input_ids"]
        targets += tokenizer([e.target for e in part], max_length=max_target_length, truncation=True)["input_ids"]
    return TokenizedPairs(sources, targets)


# ---------------------------------------------------------------------------------------------------- batching
def plan_batches(source_lengths: Sequence[int], target_lengths: Sequence[int], *, batch_size: int | None = None,
                 max_tokens: int | None = None, seed: int = 0, epoch: int = 0, shuffle: bool = True
                 ) -> list[list[int]]:
    """The global batches of one epoch, as lists of example indices, grouped by length.

    A batch's cost is its padded size ``n × (longest source + longest target)``; with ``max_tokens`` a
    batch grows while that cost stays within the budget (a single longer example forms its own batch);
    with ``batch_size`` it holds that many examples. With ``shuffle`` the order is a permutation seeded
    by ``(seed, epoch)``, sorted by length inside pools of ``POOL_BATCHES`` batches, and the batches are
    then shuffled; without it, examples are sorted longest first (evaluation).

    Raises:
        DataError: neither or both limits given, or a limit below 1.
    """
    if (batch_size is None) == (max_tokens is None):
        raise DataError("give exactly one of batch_size or max_tokens")
    if (batch_size or max_tokens) < 1:
        raise DataError(f"batch limits must be positive, got batch_size={batch_size}, max_tokens={max_tokens}")
    n = len(source_lengths)
    src, tgt = np.asarray(source_lengths), np.asarray(target_lengths)
    rng = np.random.default_rng([seed, epoch])
    if not shuffle:
        pools = [np.argsort(-src, kind="stable")]
    else:
        order = rng.permutation(n)
        mean_cost = float(np.mean(src + tgt)) if n else 1.0
        per_batch = batch_size or max(1, int(max_tokens // max(mean_cost, 1.0)))
        size = per_batch * POOL_BATCHES
        pools = [order[i:i + size] for i in range(0, n, size)]
        pools = [pool[np.argsort(-src[pool], kind="stable")] for pool in pools]
    batches: list[list[int]] = []
    for pool in pools:
        batches += _cut(pool.tolist(), src, tgt, batch_size, max_tokens)
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _cut(indices: list[int], src: np.ndarray, tgt: np.ndarray, batch_size: int | None,
         max_tokens: int | None) -> list[list[int]]:
    if batch_size is not None:
        return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    batches, current, longest_src, longest_tgt = [], [], 0, 0
    for i in indices:
        s, t = max(longest_src, int(src[i])), max(longest_tgt, int(tgt[i]))
        if current and (len(current) + 1) * (s + t) > max_tokens:
            batches.append(current)
            current, s, t = [], int(src[i]), int(tgt[i])
        current.append(i)
        longest_src, longest_tgt = s, t
    if current:
        batches.append(current)
    return batches


def shard(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's part of a global batch: every ``world_size``-th example starting at ``rank``."""
    return list(batch[rank::world_size])


@dataclass
class DataPosition:
    """Where a run is in its data: the epoch and the index of the next global batch within it."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataPosition":
        return cls(int(data["epoch"]), int(data["batch"]))


class BatchStream:
    """Endless global batches across epochs, resumable from a :class:`DataPosition`.

    Args:
        pairs: the tokenized training pairs.
        batch_size / max_tokens: exactly one of them (see :func:`plan_batches`).
        seed: shuffling seed; epoch ``e`` uses ``(seed, e)``.
        position: where to start (a fresh run starts at epoch 0, batch 0).
    """

    def __init__(self, pairs: TokenizedPairs, *, batch_size: int | None, max_tokens: int | None, seed: int,
                 position: DataPosition | None = None):
        self.pairs = pairs
        self.lengths = pairs.lengths()
        self.batch_size, self.max_tokens, self.seed = batch_size, max_tokens, seed
        self.position = DataPosition(**(position or DataPosition()).to_dict())
        self._plan_epoch, self._plan = -1, []

    def plan(self, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch`` (cached for the current epoch)."""
        if epoch != self._plan_epoch:
            self._plan = plan_batches(*self.lengths, batch_size=self.batch_size, max_tokens=self.max_tokens,
                                      seed=self.seed, epoch=epoch)
            self._plan_epoch = epoch
        return self._plan

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        batches = self.plan(self.position.epoch)
        if self.position.batch >= len(batches):
            self.position = DataPosition(self.position.epoch + 1, 0)
            batches = self.plan(self.position.epoch)
        batch = batches[self.position.batch]
        self.position = DataPosition(self.position.epoch, self.position.batch + 1)
        return batch


def collate(pairs: TokenizedPairs, indices: Sequence[int], pad_token_id: int = 0) -> dict[str, Tensor]:
    """Pad the chosen pairs on the right (dynamic padding: to the longest in this batch).

    Returns:
        ``input_ids`` and ``attention_mask`` ``(B, S)``; ``labels`` ``(B, T)`` with -100 where padded
        (the model makes decoder inputs by shifting labels right).
    """
    sources = [pairs.source_ids[i] for i in indices]
    targets = [pairs.target_ids[i] for i in indices]
    width, tgt_width = max(map(len, sources)), max(map(len, targets))
    input_ids = torch.full((len(indices), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
    labels = torch.full((len(indices), tgt_width), IGNORE_INDEX, dtype=torch.long)
    for row, (s, t) in enumerate(zip(sources, targets)):
        input_ids[row, :len(s)] = torch.tensor(s)
        attention_mask[row, :len(s)] = 1
        labels[row, :len(t)] = torch.tensor(t)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
