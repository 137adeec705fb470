"""The feature cache: one self-describing HDF5 file per split, written crash-safely.

While extraction runs, each shard of rows goes to its own small ``.npz`` file under ``<out>/.<split>.parts/``,
written to a temporary name and renamed into place, so a kill at any moment loses at most the shard in
flight. Every shard's name and content carry the digest of the settings that made it, so a shard is never
assembled under other settings, whatever moment a kill interrupted a cleanup. When every shard is there,
they are streamed into ``<split>.h5.tmp``, which is marked complete and renamed to ``<split>.h5``. So
``<split>.h5`` exists only when complete, and readers check its ``complete`` attribute as well. A file holds
one dataset per layer (``pool5``, ``fc6``, ``fc7``) and ``features``, a soft link to its fc7 (or its only
layer). The schema is documented in README.md.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from features.errors import CacheError, describe_error
from features.locking import exclusive_writer, lock_shared_with_child, writer_holding
from features.shards import (discard, discard_trash, done_shards, parts_digest, parts_folder, read_shard, shard_file,
                             start_parts, write_shard)

__all__ = ["CacheError", "CacheSettings", "CachedSplit", "assemble", "discard", "discard_trash", "done_shards",
           "exclusive_writer", "held_layers", "open_split", "parts_digest", "parts_folder", "quick_up_to_date",
           "read_attrs", "shard_file", "split_file", "start_parts", "write_shard", "writer_holding"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROW_CHUNK = 256  # rows per HDF5 chunk: 4 MiB of float32 fc7
STR = h5py.string_dtype("utf-8")
LAYER_DATASETS = ("pool5", "fc6", "fc7")  # the layer datasets a cache may hold, in network order (models.LAYERS)


@dataclass(frozen=True)
class CacheSettings:
    """Everything that decides a cache's content. Two caches with equal settings hold equal data.

    Which layers a file holds is not a setting: a file with equal settings can gain a layer.
    """

    backbone: str  # "alexnet"
    weights_fingerprint: str
    preprocess: str  # Preprocess.to_json()
    dtype: str  # "float32" or "float16", as stored
    precision: str  # compute precision: fp32, bf16 or fp16
    dataset_signature: str  # sha256 of the class order and the split's (path, label) list
    files_signature: str | None = None  # sha256 of each image's size and mtime: an image changed in place
    layer: str = field(default="fc7", compare=False)  # the layer ``features`` links to (see assemble)

    def differences(self, other: "CacheSettings") -> list[str]:
        mine, theirs = asdict(self), asdict(other)
        return [f.name for f in fields(self) if f.compare and mine[f.name] != theirs[f.name]]

    @classmethod
    def from_attrs(cls, attrs) -> "CacheSettings":
        """The settings a file records (a file from before a field was added records None for it)."""
        return cls(**{f.name: _plain(attrs[f.name]) if f.name in attrs else f.default for f in fields(cls)})


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def held_layers(attrs: dict) -> list[str]:
    """The layers a complete file holds (a file from before layers holds its ``layer``, as ``features``)."""
    return json.loads(attrs["layers"]) if "layers" in attrs else [attrs.get("layer", "fc7")]


def split_file(out: Path, split: str) -> Path:
    return Path(out) / f"{split}.h5"


# ---------------------------------------------------------------------------------------------
# The finished file


def _write_isolated(path: Path, fill: Callable[[h5py.File], None]) -> None:
    """Write the HDF5 file ``path`` with ``fill`` in a forked child, and report its failure in one line.

    After a failed HDF5 write (a full disk), closing the file or even exiting the process segfaults
    (h5py 3.16, HDF5 2.0: measured). The child leaves by ``os._exit``, before any of that runs; the parent
    keeps a sound HDF5 library and turns the child's error into a CacheError. The child keeps the writer
    lock until it exits, so a rerun after the parent's kill -9 cannot write the same file beside it.
    """
    read_end, write_end = os.pipe()
    with lock_shared_with_child():
        pid = os.fork()
    if pid == 0:  # the child: write, and never return into the caller's code
        code = 1
        try:
            os.close(read_end)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)  # HDF5's complaints while it unwinds a failed write: the pipe carries the reason
            f = h5py.File(path, "w")
            fill(f)
            f.close()
            code = 0
        except BaseException as err:  # noqa: BLE001 - everything is reported to the parent
            try:
                os.write(write_end, describe_error(err).encode()[:2000])
            except BaseException:  # noqa: BLE001
                pass
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        reason = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        path.unlink(missing_ok=True)
        reason = reason or (f"the writer died of signal {-code}" if code < 0 else "the writer failed")
        raise CacheError(f"cannot write {path}: {reason}; free some space (or fix the folder's permissions) "
                         "and rerun: the extracted shards are kept")


def _check_space(folder: Path, num_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < num_bytes:
        raise CacheError(f"{folder} has {free / 2**20:.0f} MiB free, but the cache file needs about "
                         f"{num_bytes / 2**20:.0f} MiB; free some space and rerun: the extracted shards are kept")


def assemble(out: Path, split: str, *, settings: CacheSettings, num_shards: int, paths: list[str],
             labels: list[int], wnids: list[str], names: list[str], attrs: dict, compression: str | None,
             layers: dict[str, int] | None = None, keep: Path | None = None,
             skipped_before: list[dict] | None = None) -> dict:
    """Stream the shards into ``<split>.h5`` (complete) and drop the parts. Returns the file's attributes.

    ``layers``: {layer: dim} the shards hold (default: ``settings.layer`` of ``attrs["feature_dim"]``).
    ``keep``: a complete file with equal settings; its other layers are copied as they are (bit for bit)
    into the new file, which then replaces it. ``skipped_before``: images left out before extraction (such
    as file names the cache cannot store), listed with the shards' skips.
    """
    parts = parts_folder(out, split)
    digest = parts_digest(parts)
    missing = sorted(set(range(num_shards)) - done_shards(parts))
    if digest is None or missing:
        raise CacheError(f"cannot assemble {split}: shards {missing[:5]} are missing in {parts}; rerun run_extract.py")
    layers = dict(layers or {settings.layer: int(attrs["feature_dim"])})
    shards = [shard_file(parts, i, digest) for i in range(num_shards)]
    skipped, rows = list(skipped_before or []), []
    for path in shards:
        shard = read_shard(path, digest)
        rows.append(shard["positions"])
        skipped += shard["skipped"]
    order = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    num_rows = len(order)

    kept: dict[str, tuple[str, int]] = {}  # layer -> (its dataset in ``keep``, dim)
    if keep is not None:
        keep_attrs = read_attrs(keep) or {}
        with h5py.File(keep, "r") as old:
            if list(old["paths"].asstr()[:]) != [paths[p] for p in order]:
                raise CacheError(f"{keep} holds other rows than the images extracted now; rerun with --overwrite")
            for name in held_layers(keep_attrs):
                if name not in layers:
                    source = name if name in old else "features"
                    kept[name] = (source, int(old[source].shape[1]))
    dims = {**layers, **{name: dim for name, (_, dim) in kept.items()}}
    all_layers = [n for n in LAYER_DATASETS if n in dims] + [n for n in dims if n not in LAYER_DATASETS]
    main = "fc7" if "fc7" in dims else all_layers[0]  # what ``features`` links to, and ``layer`` names
    if not compression:
        _check_space(Path(out), num_rows * (sum(dims.values()) * np.dtype(settings.dtype).itemsize + 256) + 2**20)

    record = {**attrs, **asdict(settings), "layer": main, "layers": json.dumps(all_layers), "feature_dim": dims[main],
              "format_version": FORMAT_VERSION, "split": split, "num_rows": num_rows, "num_classes": len(wnids),
              "num_skipped": len(skipped), "skipped": json.dumps(skipped),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    record = {key: value for key, value in record.items() if value is not None}
    labels = np.asarray(labels)

    def fill(f: h5py.File) -> None:
        kwargs = {"compression": compression} if compression else {}
        datasets = {name: f.create_dataset(name, shape=(num_rows, dim), dtype=settings.dtype,
                                           chunks=(max(1, min(ROW_CHUNK, num_rows)), dim), **kwargs)
                    for name, dim in layers.items()}
        out_labels = f.create_dataset("labels", shape=(num_rows,), dtype=np.int64)
        out_paths = f.create_dataset("paths", shape=(num_rows,), dtype=STR)
        f.create_dataset("class_wnids", data=np.array(wnids, dtype=object), dtype=STR)
        f.create_dataset("class_names", data=np.array(names, dtype=object), dtype=STR)
        row = 0
        for path in shards:
            shard = read_shard(path, digest)
            positions = shard["positions"]
            n = len(positions)
            for name, dataset in datasets.items():
                dataset[row:row + n] = shard["layers"][name]
            out_labels[row:row + n] = labels[positions]
            out_paths[row:row + n] = np.array([paths[p] for p in positions], dtype=object)
            row += n
        if kept:
            with h5py.File(keep, "r") as old:
                for name, (source, _) in kept.items():
                    old.copy(old[source], f, name=name)  # raw bytes, chunks and compression as they were
        f["features"] = h5py.SoftLink(f"/{main}")  # today's readers of ``features`` keep working
        for key, value in record.items():
            f.attrs[key] = value
        f.attrs["complete"] = True  # written last: only a fully written file says so

    final = split_file(out, split)
    tmp = final.with_name(final.name + ".tmp")
    _write_isolated(tmp, fill)
    os.replace(tmp, final)
    discard(parts)
    discard_trash(parts)
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


def quick_up_to_date(path: Path, expected: dict, layers: tuple[str, ...] | list[str] = ()) -> dict | None:
    """The attributes of ``path`` when it is complete, records exactly ``expected`` and holds ``layers``;
    else None.

    A torch-free first look for reruns: ``expected`` holds the settings, and the weights spec and stamp
    in place of the fingerprint. None only means "look properly", never "out of date".
    """
    try:
        attrs = read_attrs(path)
    except CacheError:
        return None
    if not attrs or not attrs.get("complete") or attrs.get("format_version") != FORMAT_VERSION:
        return None
    if not set(layers) <= set(held_layers(attrs)):
        return None
    return attrs if all(attrs.get(key) == value for key, value in expected.items()) else None


def _absent_hint(path: Path) -> str:
    """Why ``path`` is not there yet: being written now (an error of its own), interrupted, or never made."""
    holder = writer_holding(path.parent)
    if holder:
        raise CacheError(f"{path} is being written by {holder} right now; wait for run_extract.py to finish, then rerun")
    return " (an extraction into it was interrupted: rerun it to finish)" if parts_folder(path.parent, path.stem).exists() else ""


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
        hint = _absent_hint(path)
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
            held = [name for name in LAYER_DATASETS if name in f] or [attrs.get("layer", "fc7")]
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
        # the layer ``feature_dim`` describes (fc7, or the only one cached) must have that width; every layer
        # must have a row per label
        dim = attrs["feature_dim"] if split.layer == attrs.get("layer", "fc7") else features.shape[-1]
        if features.ndim != 2 or features.shape[0] != num_rows or features.shape[1] != dim:
            raise CacheError(f"{path}: {split.dataset} has shape {features.shape}, expected ({num_rows}, "
                             f"{dim}) for its {num_rows} labels; {redo}")
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
