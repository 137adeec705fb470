"""The fc7 feature cache: one self-describing HDF5 file per split, written crash-safely.

While extraction runs, each shard of rows goes to its own small file under ``<out>/.<split>.parts/``,
written to a temporary name and renamed into place, so a kill at any moment loses at most the shard
in flight. When every shard is there, they are streamed into ``<split>.h5.tmp``, which is marked
complete and renamed to ``<split>.h5``. So ``<split>.h5`` exists only when complete, and readers check
its ``complete`` attribute as well. The schema is documented in README.md.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np


log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROW_CHUNK = 256  # rows per HDF5 chunk: 4 MiB of float32 fc7
STR = h5py.string_dtype("utf-8")


class CacheError(Exception):
    """A cache that is missing, partial, foreign or locked: the entry scripts print it as one line."""


@dataclass(frozen=True)
class CacheSettings:
    """Everything that decides a cache's content. Two caches with equal settings hold equal data."""

    backbone: str  # "alexnet"
    layer: str  # "fc7"
    weights_fingerprint: str
    preprocess: str  # Preprocess.to_json()
    dtype: str  # "float32" or "float16", as stored
    precision: str  # compute precision: fp32, bf16 or fp16
    dataset_signature: str  # sha256 of the class order and the split's (path, label) list

    def differences(self, other: "CacheSettings") -> list[str]:
        mine, theirs = asdict(self), asdict(other)
        return [k for k in mine if mine[k] != theirs[k]]

    @classmethod
    def from_attrs(cls, attrs) -> "CacheSettings":
        return cls(**{k: _plain(attrs[k]) for k in cls.__dataclass_fields__})


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def split_file(out: Path, split: str) -> Path:
    return Path(out) / f"{split}.h5"


def parts_folder(out: Path, split: str) -> Path:
    return Path(out) / f".{split}.parts"


# ---------------------------------------------------------------------------------------------
# One writer at a time


_held_locks: set[int] = set()  # file descriptors of the writer locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker), let go of the parent's writer lock.

    flock belongs to the open file description, which fork shares with the child: a worker that
    outlives a parent killed by kill -9 would keep the lock held (for seconds) and refuse the rerun.
    The child's descriptor is pointed at /dev/null instead; that does not unlock the parent's.
    """
    if not _held_locks:
        return
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        for fd in _held_locks:
            os.dup2(devnull, fd, inheritable=False)
    finally:
        os.close(devnull)
    _held_locks.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextmanager
def exclusive_writer(out: Path):
    """Hold ``<out>/.lock`` for the whole extraction; a second writer gets a clear error.

    flock is released by the kernel when the process dies, even by kill -9, so no stale lock is left
    (forked children, such as DataLoader workers, drop their inherited copy: see above).
    """
    out.mkdir(parents=True, exist_ok=True)
    lock_path = out / ".lock"
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise CacheError(f"another extraction ({holder}) is writing to {out}; wait for it, or pass another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        _held_locks.add(lock.fileno())
        try:
            yield
        finally:
            _held_locks.discard(lock.fileno())
            lock.truncate(0)


# ---------------------------------------------------------------------------------------------
# Shards: the resumable unit of work


def start_parts(parts: Path, settings: CacheSettings, **layout) -> None:
    """Make the parts folder for these settings; parts made with other settings are discarded.

    ``layout`` (batch size, shard size, row count) must match too: it decides which rows share a
    batch, and fp32 results can differ in the last bit between batch compositions.
    """
    meta_path = parts / "settings.json"
    meta = {"settings": asdict(settings), **layout}
    if meta_path.is_file():
        if json.loads(meta_path.read_text()) == meta:
            return
        log.info("discarding partial extraction in %s: it was made with other settings", parts)
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    tmp = parts / "settings.json.tmp"
    tmp.write_text(json.dumps(meta, sort_keys=True))
    os.replace(tmp, meta_path)


def shard_file(parts: Path, shard: int) -> Path:
    return parts / f"shard-{shard:06d}.h5"


def done_shards(parts: Path) -> set[int]:
    if not parts.is_dir():
        return set()
    return {int(p.stem.split("-")[1]) for p in parts.glob("shard-*.h5")}


def write_shard(parts: Path, shard: int, features: np.ndarray, positions: np.ndarray, skipped: list[dict]) -> None:
    """Atomically write one shard: rows ``features`` for dataset ``positions``, plus its skipped images."""
    final = shard_file(parts, shard)
    tmp = final.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features)
        f.create_dataset("positions", data=positions.astype(np.int64))
        f.attrs["skipped"] = json.dumps(skipped)
    os.replace(tmp, final)  # the shard exists under its real name only once fully written


# ---------------------------------------------------------------------------------------------
# The finished file


def assemble(out: Path, split: str, *, settings: CacheSettings, num_shards: int, paths: list[str],
             labels: list[int], wnids: list[str], names: list[str], attrs: dict, compression: str | None) -> dict:
    """Stream the shards into ``<split>.h5`` (complete) and drop the parts. Returns the file's attributes."""
    parts = parts_folder(out, split)
    missing = sorted(set(range(num_shards)) - done_shards(parts))
    if missing:
        raise RuntimeError(f"cannot assemble {split}: shards {missing[:5]} are missing")
    shards = [shard_file(parts, i) for i in range(num_shards)]
    skipped, num_rows = [], 0
    for path in shards:
        with h5py.File(path, "r") as f:
            num_rows += f["positions"].shape[0]
            skipped += json.loads(f.attrs["skipped"])
    dim = attrs["feature_dim"]
    final = split_file(out, split)
    tmp = final.with_name(final.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        chunks = (max(1, min(ROW_CHUNK, num_rows)), dim)
        kwargs = {"compression": compression} if compression else {}
        features = f.create_dataset("features", shape=(num_rows, dim), dtype=settings.dtype, chunks=chunks, **kwargs)
        out_labels = f.create_dataset("labels", shape=(num_rows,), dtype=np.int64)
        out_paths = f.create_dataset("paths", shape=(num_rows,), dtype=STR)
        f.create_dataset("class_wnids", data=np.array(wnids, dtype=object), dtype=STR)
        f.create_dataset("class_names", data=np.array(names, dtype=object), dtype=STR)
        labels = np.asarray(labels)
        row = 0
        for path in shards:
            with h5py.File(path, "r") as shard:
                positions = shard["positions"][:]
                n = len(positions)
                features[row:row + n] = shard["features"][:]
                out_labels[row:row + n] = labels[positions]
                out_paths[row:row + n] = np.array([paths[p] for p in positions], dtype=object)
                row += n
        record = {**attrs, **asdict(settings), "format_version": FORMAT_VERSION, "split": split,
                  "num_rows": num_rows, "num_classes": len(wnids), "num_skipped": len(skipped),
                  "skipped": json.dumps(skipped), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        for key, value in record.items():
            f.attrs[key] = value
        f.attrs["complete"] = True  # written last: only a fully written file says so
    os.replace(tmp, final)
    shutil.rmtree(parts, ignore_errors=True)
    return record


def read_attrs(path: Path) -> dict | None:
    """The attributes of a cache file, or None when there is no file."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            return {k: _plain(v) for k, v in f.attrs.items()}
    except OSError as err:
        raise CacheError(f"{path} is not a readable HDF5 file ({err}); delete it, or rerun run_extract.py with --overwrite") from None


def quick_up_to_date(path: Path, expected: dict) -> dict | None:
    """The attributes of ``path`` when it is complete and records exactly ``expected``; else None.

    A torch-free first look for reruns: ``expected`` holds the settings and the weights spec and stamp
    (the weights spec and stamp). None only means "look properly", never "out of date".
    """
    try:
        attrs = read_attrs(path)
    except CacheError:
        return None
    if not attrs or not attrs.get("complete") or attrs.get("format_version") != FORMAT_VERSION:
        return None
    return attrs if all(attrs.get(key) == value for key, value in expected.items()) else None


@dataclass
class CachedSplit:
    """One split of the cache, checked and ready to read. ``features`` stays on disk until loaded."""

    path: Path
    attrs: dict
    wnids: list[str]
    names: list[str]
    labels: np.ndarray  # (N,) int64
    paths: list[str]
    layer: str = "fc7"  # which layer read_features reads
    dataset: str = "features"  # its HDF5 dataset

    @property
    def num_rows(self) -> int:
        return len(self.labels)

    @property
    def feature_dim(self) -> int:
        with h5py.File(self.path, "r") as f:
            return int(f[self.dataset].shape[1])

    def read_features(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            return f[self.dataset][start:stop]


def open_split(path: Path, layer: str = "fc7") -> CachedSplit:
    """Open a finished cache file for one layer. Missing, partial or foreign files are clear errors.

    A layer is the dataset named after it (``pool5``, ``fc6``, ``fc7``); a cache that holds fc7 only, as
    ``features``, serves ``fc7``.
    """
    path = Path(path)
    attrs = read_attrs(path)
    if attrs is None:
        partial = parts_folder(path.parent, path.stem)
        hint = " (an extraction into it was interrupted: rerun it to finish)" if partial.exists() else ""
        raise CacheError(f"no feature cache at {path}{hint}; run run_extract.py first, or pass --features DIR")
    if not attrs.get("complete"):
        raise CacheError(f"{path} is not a complete feature cache; rerun run_extract.py to finish it")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{path} has cache format {attrs.get('format_version')}, expected {FORMAT_VERSION}; re-extract with --overwrite")
    with h5py.File(path, "r") as f:
        if layer in f:
            dataset = layer
        elif layer == attrs.get("layer", "fc7") and "features" in f:
            dataset = "features"
        else:
            held = sorted(name for name in f if name in ("pool5", "fc6", "fc7")) or [attrs.get("layer", "fc7")]
            raise CacheError(f"{path} holds no {layer} features (it has {', '.join(held)}); "
                             f"add them with run_extract.py --layers {layer}")
        labels = f["labels"][:]
        paths = list(f["paths"].asstr()[:])
        wnids = list(f["class_wnids"].asstr()[:])
        names = list(f["class_names"].asstr()[:])
    return CachedSplit(path=path, attrs=attrs, wnids=wnids, names=names, labels=labels, paths=paths, layer=layer,
                       dataset=dataset)


# ---------------------------------------------------------------------------------------------
# Checking a finished file before it is trusted (the values themselves are checked as they are read)

REQUIRED_ATTRS = ("split", "num_rows", "num_classes", "feature_dim", "dtype", "backbone", "layer", "weights_spec",
                  "weights_fingerprint", "preprocess", "precision")


def check_split(split: CachedSplit, expected_split: str) -> None:
    """Raise CacheError unless ``split`` is a well-formed ``expected_split`` file: attributes, shapes, dtypes, labels.

    Catches what the ``complete`` flag cannot: a file renamed to the other split's name, a features dataset
    shorter than its labels, labels outside the class list, an empty split.
    """
    path, attrs = split.path, split.attrs
    redo = "re-extract it with run_extract.py --overwrite"
    missing = [key for key in REQUIRED_ATTRS if key not in attrs]
    if missing:
        raise CacheError(f"{path} lacks the attribute(s) {', '.join(missing)}; {redo}")
    if attrs["split"] != expected_split:
        raise CacheError(f"{path} holds the {attrs['split']!r} split, not {expected_split!r} (train and val swapped, "
                         f"or the same split twice?); put train.h5 and val.h5 of one extraction in --features")
    num_rows = len(split.labels)
    if num_rows == 0:
        raise CacheError(f"{path} is an empty split (0 rows); extract a dataset with {expected_split} images")
    with h5py.File(path, "r") as f:
        features = f[split.dataset]
        if features.ndim != 2 or features.shape[0] != num_rows or features.shape[1] != attrs["feature_dim"]:
            raise CacheError(f"{path}: {split.dataset} has shape {features.shape}, expected ({num_rows}, "
                             f"{attrs['feature_dim']}) for its {num_rows} labels; {redo}")
        if features.dtype.kind != "f" or features.dtype.itemsize not in (2, 4):
            raise CacheError(f"{path}: {split.dataset} has dtype {features.dtype}, expected float32 or float16; {redo}")
        if str(features.dtype) != attrs["dtype"]:
            raise CacheError(f"{path}: {split.dataset} has dtype {features.dtype} but records {attrs['dtype']!r}; {redo}")
        labels = f["labels"]
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise CacheError(f"{path}: labels have shape {labels.shape} and dtype {labels.dtype}, "
                             f"expected ({num_rows},) integers; {redo}")
    if attrs["num_rows"] != num_rows:
        raise CacheError(f"{path} records {attrs['num_rows']} rows but holds {num_rows}; {redo}")
    num_classes = attrs["num_classes"]
    if not (len(split.wnids) == len(split.names) == num_classes) or len(split.paths) != num_rows:
        raise CacheError(f"{path}: class_wnids ({len(split.wnids)}), class_names ({len(split.names)}), num_classes "
                         f"({num_classes}) and paths ({len(split.paths)} for {num_rows} rows) disagree; {redo}")
    bad = np.flatnonzero((split.labels < 0) | (split.labels >= num_classes))
    if len(bad):
        raise CacheError(f"{path}: label {split.labels[bad[0]]} in row {bad[0]} is outside 0..{num_classes - 1} "
                         f"({len(bad)} bad rows in all); {redo}")
