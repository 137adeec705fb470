"""Where head training's batches come from: the checked cache, loaded into one tensor or streamed from disk.

``open_cache`` trusts nothing it has not checked: both files complete, well-formed (shapes, dtypes, labels,
the recorded split) and from the same extraction. Feature values are checked for NaN and Inf as they are
read, so a damaged row is named by file and row instead of training or scoring on it.
"""
from __future__ import annotations

from dataclasses import dataclass
import logging
from pathlib import Path
from typing import Callable, Iterator, Protocol

import h5py
import numpy as np
import torch
from tqdm import tqdm

from features.attrs import read_attrs
from features.cache import ROW_CHUNK, CacheError, CachedSplit, check_split, open_split
from features.locking import writer_holding
from pipeline.common.errors import UserError, first_line
from pipeline.common.hardware import available_memory, free_memory

log = logging.getLogger(__name__)

LOAD_ROWS = 16384  # rows read from HDF5 at a time
FANCY_SHARE = 8  # a selection of under 1/8 of a file's rows is read row by row (h5py), a larger one in blocks
STREAM_ROWS = 8192  # rows per chunk of a streamed logreg or kNN pass: 128 MiB of float32 at 4,096 columns


class FeatureSource(Protocol):
    num_rows: int

    def batches(self, batch_size: int, generator: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features (B, D) as stored, labels (B,)); shuffled when a generator is given."""


def batch_order(num_rows: int, batch_size: int, generator: torch.Generator | None,
                device: torch.device | None = None) -> list[torch.Tensor]:
    """Row indices of each batch: a seeded permutation, or the natural order without a generator.

    The permutation is drawn on the CPU (the same order on every device) and moved to ``device`` once,
    so indexing a GPU tensor with each batch's indices needs no host-to-device copy per step.
    """
    order = torch.randperm(num_rows, generator=generator) if generator is not None else torch.arange(num_rows)
    if device is not None:
        order = order.to(device, non_blocking=True)
    return list(order.split(batch_size))


def check_finite(block: torch.Tensor, path: Path, start: int, rows: np.ndarray | None = None) -> None:
    """Raise CacheError naming the file and first row when ``block`` holds NaN or Inf.

    ``block`` holds the file's rows from ``start`` on, or the file's rows ``rows`` (a selection, in its order).
    """
    if not len(block):
        return
    low, high = torch.aminmax(block)  # NaN propagates, +-Inf shows at an end: ~20x faster than isfinite(block).all()
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        bad = (~torch.isfinite(block)).any(1).nonzero()[:, 0]
        if rows is not None:
            bad_rows = sorted(int(rows[i]) for i in bad)
            where = f"row {bad_rows[0]} ({len(bad)} bad rows among the {len(block)} rows selected)"
        else:
            where = f"row {start + int(bad[0])} ({len(bad)} bad rows among rows {start}..{start + len(block) - 1})"
        raise CacheError(f"{path} holds NaN or Inf features in {where}; the file is damaged: re-extract it with "
                         "run_extract.py --overwrite")


class InMemoryFeatures:
    """All features in one tensor; a batch is one index_select. ``index``: only those rows of it, in that order
    (a part of the rows loaded once, without a copy: ``subset``)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, index: np.ndarray | None = None):
        self.features, self.labels = features, labels.to(features.device)
        self.index = None if index is None else torch.as_tensor(np.asarray(index), device=features.device)
        self.num_rows = len(labels) if index is None else len(index)

    @classmethod
    def load(cls, split: CachedSplit, device: torch.device, progress: bool = True,
             rows: np.ndarray | None = None) -> "InMemoryFeatures":
        """The split's features (``rows``: only those rows, in that order) as one tensor on ``device``."""
        if rows is not None and len(rows) * FANCY_SHARE < split.num_rows:
            with h5py.File(split.path, "r") as f:  # h5py reads a sorted, duplicate-free selection
                order = np.argsort(rows, kind="stable")
                block = np.empty((len(rows), f[split.dataset].shape[1]), dtype=f[split.dataset].dtype)
                block[order] = f[split.dataset][np.asarray(rows)[order]]
            check_finite(torch.from_numpy(block), split.path, 0, rows=np.asarray(rows))
            return cls(torch.from_numpy(block).to(device), torch.from_numpy(split.labels[rows]))
        # every row, or a large selection: read in blocks, in file order, each selected row put in its place
        position = None if rows is None else np.full(split.num_rows, -1, dtype=np.int64)
        if position is not None:
            position[np.asarray(rows)] = np.arange(len(rows))
        first = split.read_features(0, 1)
        count = split.num_rows if rows is None else len(rows)
        features = torch.empty((count, first.shape[1]), dtype=torch.from_numpy(first).dtype, device=device)
        for start in tqdm(range(0, split.num_rows, LOAD_ROWS), desc=f"load {split.path.name}", unit="block",
                          disable=not progress, leave=False):
            block = torch.from_numpy(split.read_features(start, start + LOAD_ROWS))
            if position is None:
                check_finite(block, split.path, start)
                features[start:start + len(block)].copy_(block)
                continue
            places = position[start:start + len(block)]
            keep = np.flatnonzero(places >= 0)
            check_finite(block[keep], split.path, 0, rows=start + keep)
            features[torch.from_numpy(places[keep]).to(device)] = block[keep].to(device)
        return cls(features, torch.from_numpy(split.labels if rows is None else split.labels[rows]))

    def subset(self, positions: np.ndarray) -> "InMemoryFeatures":
        """The rows at ``positions`` (into these rows) as a source of their own, sharing this one's tensor."""
        return InMemoryFeatures(self.features, self.labels, positions)

    def batches(self, batch_size, generator):
        for idx in batch_order(self.num_rows, batch_size, generator, self.features.device):
            if self.index is not None:
                idx = self.index[idx]
            yield self.features.index_select(0, idx), self.labels.index_select(0, idx)


class StreamedFeatures:
    """For caches larger than memory: blocks of rows read from HDF5 one at a time (each checked for NaN/Inf).

    Rows are stored in class order, so a shuffled block is gathered from ``block_rows / 256`` random
    256-row chunks (the HDF5 chunk size) across the whole file, then shuffled row by row: every batch
    sees the classes mixed, and each row comes once per epoch. ``rows``: only those rows of the file (a part of
    train too large for memory), each block read whole and the others dropped from it.
    """

    def __init__(self, split: CachedSplit, block_rows: int = 8 * LOAD_ROWS, rows: np.ndarray | None = None):
        self.split, self.block_rows = split, block_rows
        self.chunk_rows = min(ROW_CHUNK, block_rows)
        self.labels = torch.from_numpy(split.labels)
        self.file_rows = split.num_rows
        self.kept = None  # rows: only those rows of the file are yielded (each block read whole, then masked)
        if rows is not None:
            self.kept = torch.zeros(split.num_rows, dtype=torch.bool)
            self.kept[torch.from_numpy(np.asarray(rows, dtype=np.int64))] = True
        self.num_rows = self.file_rows if rows is None else len(rows)

    def _masked(self, block: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor):
        """(block, labels) of the file rows ``rows`` that are kept."""
        if self.kept is None:
            return block, labels
        keep = self.kept[rows]
        return block[keep], labels[keep]

    def batches(self, batch_size, generator):
        """Each block is read into one buffer, reused for the next block (a batch is a gathered copy), so the
        memory is one block whatever the rows: no list of pieces, no concatenated copy, no second block."""
        with h5py.File(self.split.path, "r") as f:
            features = f[self.split.dataset]
            if generator is None:  # evaluation and statistics: plain order
                buffer = np.empty((min(self.block_rows, self.file_rows), features.shape[1]), features.dtype)
                for start in range(0, self.file_rows, self.block_rows):
                    block = self._read(features, buffer, [start], min(self.block_rows, self.file_rows - start))
                    block, labels = self._masked(block, self.labels[start:start + len(block)],
                                                 torch.arange(start, start + len(block)))
                    for idx in batch_order(len(block), batch_size, None):
                        yield block[idx], labels[idx]
                return
            chunks = torch.arange(0, self.file_rows, self.chunk_rows)
            chunks = chunks[torch.randperm(len(chunks), generator=generator)]
            per_block = max(1, self.block_rows // self.chunk_rows)
            buffer = np.empty((min(per_block * self.chunk_rows, self.file_rows), features.shape[1]), features.dtype)
            for group in chunks.split(per_block):
                starts = sorted(group.tolist())  # read in file order
                block = self._read(features, buffer, starts, self.chunk_rows)
                rows = torch.cat([torch.arange(s, min(s + self.chunk_rows, self.file_rows)) for s in starts])
                block, labels = self._masked(block, self.labels[rows], rows)
                for idx in batch_order(len(block), batch_size, generator):
                    yield block[idx], labels[idx]

    def _read(self, features: h5py.Dataset, buffer: np.ndarray, starts: list[int], rows: int) -> torch.Tensor:
        """Rows ``s:s + rows`` for each start, one after another into ``buffer``, each checked for NaN/Inf."""
        filled = 0
        for s in starts:
            n = min(rows, self.file_rows - s)
            features.read_direct(buffer, np.s_[s:s + n], np.s_[filled:filled + n])
            check_finite(torch.from_numpy(buffer[filled:filled + n]), self.split.path, s)
            filled += n
        return torch.from_numpy(buffer[:filled])


# ---------------------------------------------------------------------------------------------
# Opening the cache


def extraction_in_progress(folder: Path) -> str | None:
    """Who holds ``<folder>/.lock`` (run_extract.py's writer lock) right now, or None."""
    return writer_holding(folder)


def _open_checked(path: Path, split: str, layer: str = "fc7") -> CachedSplit:
    try:
        cached = open_split(path, layer)
        check_split(cached, split)
    except (KeyError, ValueError, TypeError, IndexError) as err:  # a dataset or attribute missing or malformed
        raise CacheError(f"{path} is damaged or not a feature cache ({first_line(err)}); "
                         "re-extract it with run_extract.py --overwrite") from None
    return cached


def open_cache(folder: Path, layer: str = "fc7") -> tuple[CachedSplit, CachedSplit]:
    """train.h5 and val.h5 (their ``layer`` features), checked complete, well-formed and consistent."""
    folder = Path(folder)
    holder = extraction_in_progress(folder)
    if holder:
        who = f"an extraction ({holder})" if holder.startswith("pid ") else f"another run ({holder})"
        raise UserError(f"{who} is writing the cache in {folder} right now; wait for it to finish, then rerun")
    backbones = [(read_attrs(folder / f"{split}.h5") or {}).get("backbone") for split in ("train", "val")]
    if None not in backbones and backbones[0] != backbones[1]:  # before the layer: each backbone names its own
        raise UserError(f"train and val in {folder} were extracted with different backbones ({' and '.join(backbones)}); "
                        "re-extract one of them with the same run_extract.py settings (--overwrite)")
    train, val = _open_checked(folder / "train.h5", "train", layer), _open_checked(folder / "val.h5", "val", layer)
    if train.path.resolve() == val.path.resolve():
        raise CacheError(f"{train.path} and {val.path} are the same file; extract the val split too")
    checks = [("class_wnids", train.wnids, val.wnids, "different classes"),
              ("backbone", train.attrs["backbone"], val.attrs["backbone"], "different backbones"),
              ("weights_fingerprint", train.attrs["weights_fingerprint"], val.attrs["weights_fingerprint"], "different weights"),
              ("preprocess", train.attrs["preprocess"], val.attrs["preprocess"], "different preprocessing"),
              ("layer", train.attrs["layer"], val.attrs["layer"], "different layers"),
              ("precision", train.attrs["precision"], val.attrs["precision"], "different precisions"),
              ("feature_dim", train.feature_dim, val.feature_dim, "different feature sizes")]
    for _, a, b, what in checks:
        if a != b:
            raise UserError(f"train and val in {folder} were extracted with {what}; re-extract one of them "
                            "with the same run_extract.py settings (--overwrite)")
    return train, val


# ---------------------------------------------------------------------------------------------
# In memory or streamed


def _free(device: torch.device) -> int | None:
    """Free bytes on ``device`` (this module's ``available_memory`` on the CPU, which tests narrow)."""
    return free_memory(device) if device.type == "cuda" else available_memory()


def _fits_in_memory(num_bytes: int, device: torch.device) -> bool:
    if device.type == "cuda":
        return num_bytes < 0.8 * free_memory(device)
    available = available_memory()
    return available is None or num_bytes < 0.7 * available


def load_source(split: CachedSplit, device: torch.device, stream: bool | None, progress: bool) -> FeatureSource:
    itemsize = np.dtype(split.attrs["dtype"]).itemsize
    num_bytes = split.num_rows * split.feature_dim * itemsize
    if stream is None:
        stream = not _fits_in_memory(num_bytes, device) and not (device.type == "cuda" and _fits_in_memory(num_bytes, torch.device("cpu")))
        if stream:
            log.info("%s (%.1f GiB) does not fit in memory: streaming it", split.path, num_bytes / 2**30)
    if stream:
        return StreamedFeatures(split)
    target = device if device.type == "cpu" or _fits_in_memory(num_bytes, device) else torch.device("cpu")
    return InMemoryFeatures.load(split, target, progress)


MEMORY_SHARE = 0.7  # a head that holds the features in memory refuses what would not fit in this share


@dataclass
class FeatureReader:
    """One split of the checked cache and the rows a head uses (None: all): what every head's ``fit`` gets.

    A head opens it the way it needs: ``source`` streams from disk when the rows do not fit in memory;
    ``load_float32`` holds them as one tensor, refused with one line when that would not fit (``fits_float32``
    says so first); ``chunks`` reads them afresh on each pass, a bounded block at a time.
    """

    split: CachedSplit
    rows: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return self.split.num_rows if self.rows is None else len(self.rows)

    def file_rows(self) -> np.ndarray:
        """The rows used, as rows of the file."""
        return np.arange(self.split.num_rows) if self.rows is None else np.asarray(self.rows)

    @property
    def labels(self) -> np.ndarray:
        return self.split.labels if self.rows is None else self.split.labels[self.rows]

    @property
    def paths(self) -> list[str]:
        return self.split.paths if self.rows is None else [self.split.paths[row] for row in self.rows]

    def part(self, positions: np.ndarray) -> "FeatureReader":
        """The rows at ``positions`` (into this reader's rows, in that order) as a reader of their own."""
        return FeatureReader(self.split, self.file_rows()[np.asarray(positions, dtype=np.int64)])

    def _kept_in_memory(self, device: torch.device, stream: bool | None) -> bool:
        """A selection is read once and kept: a small one (few-shot) even with --stream, a larger one when it fits."""
        small = 2 * self.num_rows <= self.split.num_rows
        return (small or not stream) and self.fits_float32(device)

    def source(self, device: torch.device, stream: bool | None, progress: bool) -> FeatureSource:
        if self.rows is None:
            return load_source(self.split, device, True if stream else None, progress)
        if self._kept_in_memory(device, stream):
            return InMemoryFeatures.load(self.split, device, progress, rows=self.rows)
        return StreamedFeatures(self.split, rows=self.rows)

    def parts(self, device: torch.device, stream: bool | None, progress: bool,
              selection) -> tuple[FeatureSource, FeatureSource, FeatureSource]:
        """(every row, the fit rows, the held-out rows) of a ``selection`` (pipeline.heads.selection): in memory one
        load serves all three; streamed, the fit rows are a masked pass over the file, the held-out ones kept."""
        whole = self.source(device, stream, progress)
        held = self.part(selection.held)
        if isinstance(whole, InMemoryFeatures):
            return whole, whole.subset(selection.fit), whole.subset(selection.held)
        return whole, StreamedFeatures(self.split, rows=self.file_rows()[selection.fit]), held.source(device, stream, progress)

    def float32_bytes(self, extra_bytes: int = 0) -> int:
        return self.num_rows * self.split.feature_dim * 4 + extra_bytes

    def fits_float32(self, device: torch.device, extra_bytes: int = 0) -> bool:
        """Whether ``load_float32`` (with ``extra_bytes`` more beside it) fits in MEMORY_SHARE of what is free."""
        free = _free(device)
        return free is None or self.float32_bytes(extra_bytes) <= MEMORY_SHARE * free

    def load_float32(self, device: torch.device, progress: bool, extra_bytes: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, D) float32, labels (N,)) on ``device``; refused if they would not fit."""
        count, split = self.num_rows, self.split
        if not self.fits_float32(device, extra_bytes):
            free = _free(device)
            raise UserError(f"{split.path} ({split.layer}, {count} rows) needs "
                            f"{self.float32_bytes(extra_bytes) / 2**30:.1f} GiB in memory, but {free / 2**30:.1f} "
                            f"GiB is free on {device}; use --shots, or --stream")
        source = InMemoryFeatures.load(split, device, progress, rows=self.rows)
        features = source.features if source.features.dtype == torch.float32 else source.features.float()
        return features, source.labels

    def chunks(self, device: torch.device, rows: int | None = None, transform=None) -> Callable[[], Iterator]:
        """A chunk factory: each call is a fresh pass over the rows in file order, as (x (B, D) float32 on
        ``device``, y (B,)) with B <= ``rows``, ``transform`` applied to x. Each block is read from disk and
        checked for NaN/Inf as it comes (few-shot rows, a small selection, are read once and kept; a large one is
        a masked pass over the file).
        ``rows``: STREAM_ROWS by default."""
        rows = rows or STREAM_ROWS
        if self.rows is not None and self._kept_in_memory(torch.device("cpu"), True):
            source = InMemoryFeatures.load(self.split, torch.device("cpu"), False, rows=self.rows)
        else:
            source = StreamedFeatures(self.split, block_rows=rows, rows=self.rows)

        def chunks():
            for x, y in source.batches(rows, None):
                x = x.to(device, torch.float32)
                yield (x if transform is None else transform(x)), y.to(device)

        return chunks
