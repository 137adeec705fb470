"""The one checked reader of a cache file's attributes: each has an exact type and range, or the file is refused.

A file this run did not just write may have been edited, damaged or made by something else: ``complete = "no"``
(a string) is not complete, and a ``layers`` attribute must name exactly the layer datasets the file holds
(the datasets are the truth). Anything else is one CacheDamaged line naming the file and the field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from features.errors import CacheDamaged
from features.settings import DTYPES, PRECISIONS

FORMAT_VERSION = 1
NOT_LAYERS = ("labels", "paths", "stamps", "class_wnids", "class_names", "features")  # every other dataset is a layer
STAMPS = "stamps"  # (N, 2) int64: each row's image file size and mtime_ns when it was read (absent in older files)
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
    """A complete file's ``stamps`` (where present: older files have none) holds one (size, mtime_ns) per row."""
    if STAMPS not in f:
        return
    stamps = f[STAMPS]
    if not isinstance(stamps, h5py.Dataset) or stamps.shape != (attrs["num_rows"], 2) or stamps.dtype.kind not in "iu":
        shape = getattr(stamps, "shape", None)
        raise CacheDamaged(f"{path}: dataset stamps has shape {shape} and dtype {getattr(stamps, 'dtype', None)}, "
                           f"expected ({attrs['num_rows']}, 2) integers (one size and mtime per row)")


def read_row_identity(path: Path) -> tuple[list[str], np.ndarray | None]:
    """(each row's image path, its (size, mtime_ns) stamp or None for a file made before stamps were recorded)."""
    with h5py.File(path, "r") as f:
        paths = list(f["paths"].asstr()[:])
        stamps = f[STAMPS][:].astype(np.int64) if STAMPS in f else None
    return paths, stamps


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
