"""The one checked reader of a cache file's attributes: each has an exact type and range, or the file is refused.

A file this run did not just write may have been edited, damaged or made by something else: ``complete = "no"``
(a string) is not complete, and a ``layers`` attribute must name exactly the layer datasets the file holds
(the datasets are the truth). Anything else is one CacheDamaged line naming the file and the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from features.errors import CacheDamaged
from features.settings import DTYPES, PRECISIONS

FORMAT_VERSION = 1
NOT_LAYERS = ("labels", "paths", "stamps", "class_wnids", "class_names", "features")  # every other dataset is a layer
STAMPS = "stamps"  # (N, 2) int64: each row's image file size and mtime_ns when it was read (absent in older files)
# A group (older readers see no layer in it): each row's image inode and ctime_ns, beside ``stamps``, and the
# sha256 of the bytes its row was computed from. Absent in files made before 0.8: their rows are matched on
# (path, size, mtime) alone, and get both at their next update.
IDENTITY = "identity"
INODE_CTIME = f"{IDENTITY}/inode_ctime"  # (N, 2) int64
SHA256 = f"{IDENTITY}/sha256"  # (N, 32) uint8
# what a complete file must record (older files may lack the others; ``layers`` then is ``layer``)
REQUIRED = ("complete", "format_version", "split", "num_rows", "num_classes", "feature_dim", "dtype", "backbone",
            "layer", "weights_spec", "weights_fingerprint", "preprocess", "precision")


def _json(kind: type, item_ok: Callable[[object], bool] = lambda item: True) -> Callable[[object], bool]:
    def ok(value) -> bool:
        try:
            parsed = json.loads(value)
        except ValueError:
            return False
        items = parsed if isinstance(parsed, list) else parsed.values() if isinstance(parsed, dict) else ()
        return isinstance(parsed, kind) and all(item_ok(item) for item in items)
    return ok


def _text(value) -> bool:
    return bool(value)


def _at_least(low: int) -> Callable[[int], bool]:
    return lambda value: value >= low


def _names(item) -> bool:
    return isinstance(item, str) and bool(item)


# attribute -> (type, range check, what the range is in words)
SCHEMA: dict[str, tuple[type, Callable, str]] = {
    "complete": (bool, lambda v: True, "true or false"),
    "format_version": (int, _at_least(1), "a format version >= 1"),
    "split": (str, _text, "a split name"),
    "num_rows": (int, _at_least(0), "a row count >= 0"),
    "num_classes": (int, _at_least(1), "a class count >= 1"),
    "num_skipped": (int, _at_least(0), "a count >= 0"),
    "feature_dim": (int, _at_least(1), "a width >= 1"),
    "layer": (str, _text, "a layer name"),
    "layers": (str, _json(list, _names), "a JSON list of layer names"),
    "skipped": (str, _json(list, lambda item: isinstance(item, dict)), "a JSON list of skipped images"),
    "dtype": (str, lambda v: v in DTYPES, " or ".join(DTYPES)),
    "precision": (str, lambda v: v in PRECISIONS, ", ".join(PRECISIONS)),
    "backbone": (str, _text, "a backbone name"),
    "weights_enum": (str, lambda v: True, "a weights enum name or nothing"),
    "weights_file": (str, lambda v: "/" not in v, "a file name"),
    "layers_json": (str, _json(list, lambda item: isinstance(item, dict) and {"name", "node", "reduction", "dim"} <= set(item)),
                    "a JSON list of layer specs"),
    "weights_spec": (str, _text, "a weights spec"),
    "weights_fingerprint": (str, _text, "a sha256"),
    "weights_stamp": (str, _json(dict), "a JSON object"),
    "preprocess": (str, _json(dict), "a JSON object"),
    "dataset_signature": (str, _text, "a sha256"),
    "files_signature": (str, _text, "a sha256"),
    "files_identity": (str, _text, "a sha256"),
    "versions": (str, _json(dict), "a JSON object"),
    "batch_size": (int, _at_least(1), "a batch size >= 1"),
    "shard_size": (int, _at_least(1), "a shard size >= 1"),
    "world_size": (int, _at_least(1), "a process count >= 1"),
    "dataset_root": (str, lambda v: True, "a path"),
    "class_full_names": (str, lambda v: True, "text"),
    "created": (str, lambda v: True, "a time"),
    "precision_auto": (str, _json(dict), "a JSON object"),  # --precision auto's choice and measurements
}


def _plain(value):
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def check_attrs(path: Path, attrs: dict) -> dict:
    """``attrs`` (plain Python values) when each known one has its exact type and range, else CacheDamaged."""
    for name, value in attrs.items():
        if name not in SCHEMA:
            continue  # not ours to judge: read by no one
        kind, in_range, expected = SCHEMA[name]
        if type(value) is not kind or not in_range(value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise CacheDamaged(f"{path}: attribute {name} is {shown} ({type(value).__name__}), expected {expected}")
    if attrs.get("complete") is True:
        missing = [name for name in REQUIRED if name not in attrs]
        if missing:
            raise CacheDamaged(f"{path} lacks the attribute(s) {', '.join(missing)}")
    return attrs


def held_layers(attrs: dict) -> list[str]:
    """The layers a complete file holds (a file from before layers holds its ``layer``, as ``features``)."""
    return json.loads(attrs["layers"]) if "layers" in attrs else [attrs.get("layer", "fc7")]


def layer_datasets(f: h5py.File) -> list[str]:
    """The layer datasets a file holds: every dataset but the fixed ones (``features`` is a link to one)."""
    return [name for name in f if name not in NOT_LAYERS and isinstance(f.get(name, getlink=True), h5py.HardLink)
            and isinstance(f[name], h5py.Dataset)]


def check_layers(path: Path, f: h5py.File, attrs: dict) -> None:
    """A complete file's ``layers`` and ``layer`` must agree with the datasets present: those are the truth."""
    present = layer_datasets(f)
    recorded = held_layers(attrs)
    if "layers" not in attrs:  # an older file: its one layer is ``features``
        present = present or ([attrs["layer"]] if "features" in f else [])
    if sorted(recorded) != sorted(present) or len(set(recorded)) != len(recorded):
        raise CacheDamaged(f"{path}: attribute layers is {attrs.get('layers', attrs.get('layer'))!r}, but the file "
                           f"holds the layer datasets {json.dumps(sorted(present))}")
    if attrs["layer"] not in recorded:
        raise CacheDamaged(f"{path}: attribute layer is {attrs['layer']!r}, not one of its layers {recorded}")


def check_stamps(path: Path, f: h5py.File, attrs: dict) -> None:
    """A complete file's ``stamps`` (where present: older files have none) holds one (size, mtime_ns) per row, and
    its ``identity`` group (where present) one (inode, ctime_ns) and one sha256 per row."""
    rows = attrs["num_rows"]
    expected = {STAMPS: ((rows, 2), "iu", "integers (one size and mtime per row)"),
                INODE_CTIME: ((rows, 2), "iu", "integers (one inode and ctime per row)"),
                SHA256: ((rows, 32), "u", "bytes (one sha256 per row)")}
    if IDENTITY in f and not isinstance(f[IDENTITY], h5py.Group) or (IDENTITY in f) != (INODE_CTIME in f and SHA256 in f):
        raise CacheDamaged(f"{path}: {IDENTITY} is not a group holding {INODE_CTIME} and {SHA256}")
    for name, (shape, kinds, what) in expected.items():
        if name not in f:
            continue
        data = f[name]
        if not isinstance(data, h5py.Dataset) or data.shape != shape or data.dtype.kind not in kinds:
            raise CacheDamaged(f"{path}: dataset {name} has shape {getattr(data, 'shape', None)} and dtype "
                               f"{getattr(data, 'dtype', None)}, expected {shape} {what}")
    if IDENTITY in f and STAMPS not in f:
        raise CacheDamaged(f"{path} has {IDENTITY} but no {STAMPS}")


@dataclass(frozen=True)
class RowIdentity:
    """What a file records of each row's image, to match it to the images of a later run."""

    paths: list[str]  # relative to the dataset root
    stamps: np.ndarray | None  # (N, 2) int64 (size, mtime_ns); None: a file made before stamps were recorded
    inode_ctime: np.ndarray | None = None  # (N, 2) int64; None: a file made before 0.8
    sha256: np.ndarray | None = None  # (N, 32) uint8: the digest of the bytes each row was computed from


def read_row_identity(path: Path) -> RowIdentity:
    """Each row's image path and what the file recorded of it (None where an older version recorded nothing)."""
    with h5py.File(path, "r") as f:
        paths = list(f["paths"].asstr()[:])
        stamps = f[STAMPS][:].astype(np.int64) if STAMPS in f else None
        if IDENTITY in f and stamps is not None:
            return RowIdentity(paths, stamps, f[INODE_CTIME][:].astype(np.int64), f[SHA256][:].astype(np.uint8))
    return RowIdentity(paths, stamps)


def read_attrs(path: Path) -> dict | None:
    """The checked attributes of a cache file, or None when there is no file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            attrs = check_attrs(path, {key: _plain(value) for key, value in f.attrs.items()})
            if attrs.get("complete") is True:
                check_layers(path, f, attrs)
                check_stamps(path, f, attrs)
    except OSError as err:
        raise CacheDamaged(f"{path} is not a readable HDF5 file ({err})") from None
    return attrs
