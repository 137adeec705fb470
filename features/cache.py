"""The feature cache: one self-describing HDF5 file per split, written crash-safely, read checked.

Extraction writes resumable shards (features.shards) and assembles them into ``<split>.h5``
(features.writer), which exists only when complete. Every attribute is read through one checked reader
(features.attrs). This module is what readers use: open a split, check it, and the names the writers
share. Messages say what is wrong; the commands add what to do (pipeline.cli).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from features.attrs import FORMAT_VERSION, RowIdentity, held_layers, read_attrs, read_row_identity
from features.errors import CacheBusy, CacheDamaged, CacheError, CacheIncomplete, CacheMissing, LayerMissing
from features.locking import exclusive_writer, writer_holding
from features.settings import CacheSettings
from features.shards import (discard, discard_trash, done_shards, parts_digest, parts_folder, shard_file, start_parts,
                             write_shard)
from features.writer import (ROW_CHUNK, STR, Assembly, SplitRows, _write_isolated, assemble,  # noqa: F401
                             rewrite_class_names, split_file)

__all__ = ["FORMAT_VERSION", "ROW_CHUNK", "STR", "Assembly", "CacheError", "CacheSettings", "CachedSplit", "SplitRows", "assemble", "check_split",
           "discard", "discard_trash", "done_shards", "exclusive_writer", "held_layers", "open_split",
           "parts_digest", "parts_folder", "quick_up_to_date", "read_attrs", "read_row_identity", "RowIdentity", "rewrite_class_names", "shard_file",
           "split_file", "start_parts", "write_shard", "writer_holding"]


def quick_up_to_date(path: Path, expected: dict, layers: tuple[str, ...] | list[str] = (),
                     unrecorded: tuple[str, ...] = ()) -> dict | None:
    """The attributes of ``path`` when it is complete, records exactly ``expected`` and holds ``layers``;
    else None. ``unrecorded``: keys of ``expected`` that a file made before they existed may lack (then they
    are not compared).

    A torch-free first look for reruns: ``expected`` holds the settings, and the weights spec and stamp
    in place of the fingerprint. None only means "look properly", never "out of date".
    """
    try:
        attrs = read_attrs(path)
    except CacheError:
        return None
    if not attrs or attrs.get("complete") is not True or attrs.get("format_version") != FORMAT_VERSION:
        return None
    if not set(layers) <= set(held_layers(attrs)):
        return None
    return attrs if all(attrs.get(key) == value for key, value in expected.items()
                        if key in attrs or key not in unrecorded) else None


def _absent_hint(path: Path) -> str:
    """Why ``path`` is not there yet: being written now (an error of its own), interrupted, or never made."""
    holder = writer_holding(path.parent)
    if holder:
        raise CacheBusy(f"{path} is being written by {holder} right now")
    return " (an extraction into it was interrupted)" if parts_folder(path.parent, path.stem).exists() else ""


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
        raise CacheMissing(f"no feature cache at {path}{hint}")
    if attrs.get("complete") is not True:
        raise CacheIncomplete(f"{path} is not a complete feature cache")
    if attrs["format_version"] != FORMAT_VERSION:
        raise CacheDamaged(f"{path} has cache format {attrs['format_version']}, expected {FORMAT_VERSION}")
    with h5py.File(path, "r") as f:
        if layer in f:
            dataset = layer
        elif layer == attrs["layer"] and "features" in f:
            dataset = "features"
        else:
            raise LayerMissing(f"{path} holds no {layer} features (it has {', '.join(held_layers(attrs))})", layer)
        labels = f["labels"][:]
        paths = list(f["paths"].asstr()[:])
        wnids = list(f["class_wnids"].asstr()[:])
        names = list(f["class_names"].asstr()[:])
    return CachedSplit(path=path, attrs=attrs, wnids=wnids, names=names, labels=labels, paths=paths, layer=layer,
                       dataset=dataset)


# ---------------------------------------------------------------------------------------------
# Checking a finished file before it is trusted (the values themselves are checked as they are read)

def check_split(split: CachedSplit, expected_split: str) -> None:
    """Raise CacheError unless ``split`` is a well-formed ``expected_split`` file: attributes, shapes, dtypes, labels.

    Catches what the ``complete`` flag cannot: a file renamed to the other split's name, a features dataset
    shorter than its labels, labels outside the class list, an empty split.
    """
    path, attrs = split.path, split.attrs
    # the attributes' presence, types and ranges were checked as they were read (features.attrs.read_attrs)
    if attrs["split"] != expected_split:
        raise CacheError(f"{path} holds the {attrs['split']!r} split, not {expected_split!r} (train and val swapped, "
                         f"or the same split twice?)")
    num_rows = len(split.labels)
    if num_rows == 0:
        raise CacheDamaged(f"{path} is an empty split (0 rows)")
    with h5py.File(path, "r") as f:
        features = f[split.dataset]
        # the layer ``feature_dim`` describes (fc7, or the only one cached) must have that width; every layer
        # must have a row per label
        dim = attrs["feature_dim"] if split.layer == attrs["layer"] else features.shape[-1]
        if features.ndim != 2 or features.shape[0] != num_rows or features.shape[1] != dim:
            raise CacheDamaged(f"{path}: {split.dataset} has shape {features.shape}, expected ({num_rows}, "
                             f"{dim}) for its {num_rows} labels")
        if features.dtype.kind != "f" or features.dtype.itemsize not in (2, 4):
            raise CacheDamaged(f"{path}: {split.dataset} has dtype {features.dtype}, expected float32 or float16")
        if str(features.dtype) != attrs["dtype"]:
            raise CacheDamaged(f"{path}: {split.dataset} has dtype {features.dtype} but records {attrs['dtype']!r}")
        labels = f["labels"]
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise CacheDamaged(f"{path}: labels have shape {labels.shape} and dtype {labels.dtype}, "
                             f"expected ({num_rows},) integers")
    if attrs["num_rows"] != num_rows:
        raise CacheDamaged(f"{path} records {attrs['num_rows']} rows but holds {num_rows}")
    num_classes = attrs["num_classes"]
    if not (len(split.wnids) == len(split.names) == num_classes) or len(split.paths) != num_rows:
        raise CacheDamaged(f"{path}: class_wnids ({len(split.wnids)}), class_names ({len(split.names)}), num_classes "
                         f"({num_classes}) and paths ({len(split.paths)} for {num_rows} rows) disagree")
    bad = np.flatnonzero((split.labels < 0) | (split.labels >= num_classes))
    if len(bad):
        raise CacheDamaged(f"{path}: label {split.labels[bad[0]]} in row {bad[0]} is outside 0..{num_classes - 1} "
                         f"({len(bad)} bad rows in all)")
