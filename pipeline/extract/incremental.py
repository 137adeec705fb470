"""What a split's extraction has to do: nothing, add layers, update incrementally, or extract it whole.

A complete file whose settings equal this run's is up to date (or gains the layers it lacks). When only the
dataset changed (images added, removed or edited in place, classes added: ``dataset_signature`` and
``files_signature``), the file is updated incrementally: each row records its image's path, size and mtime
(the ``stamps`` dataset), and a row whose image is still there, unchanged, is reused bit for bit; only the
other images pass through the backbone, at the file's recorded settings. Rows come out in the dataset's
order, as a fresh extraction would give them, and labels come from the new class list. Any other changed
setting is refused without --overwrite.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features import cache
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)

DATASET_FIELDS = {"dataset_signature", "files_signature"}  # what an incremental update may differ in


@dataclass(frozen=True)
class Plan:
    """What a split's extraction does."""

    kept: dict | None  # attributes of the complete file built on (up to date, or gaining layers), or None
    layers: tuple[str, ...]  # the layers to compute
    update: dict | None = None  # attributes of the file to update incrementally (only the dataset changed)
    replace_old: bool = False  # --overwrite: the old file and any partial work are replaced


@dataclass(frozen=True)
class Reuse:
    """How an incremental update takes rows from the file it updates."""

    source: Path  # the complete file whose rows are reused
    old_rows: np.ndarray  # (num_positions,) int64: the source's row for each dataset position; -1: extract it
    dropped: int  # rows of the source not reused: their image is gone or changed

    @property
    def reused(self) -> int:
        return int((self.old_rows >= 0).sum())

    @property
    def extracted(self) -> int:
        return int((self.old_rows < 0).sum())

    def to_compute(self, shard: range) -> np.ndarray:
        """The dataset positions of ``shard`` that pass through the backbone."""
        positions = np.arange(shard.start, shard.stop, dtype=np.int64)
        return positions[self.old_rows[shard.start:shard.stop] < 0]

    def reused_in(self, shard: range) -> tuple[np.ndarray, np.ndarray]:
        """(dataset positions, source rows) of the rows ``shard`` takes from the source."""
        positions = np.arange(shard.start, shard.stop, dtype=np.int64)
        rows = self.old_rows[shard.start:shard.stop]
        return positions[rows >= 0], rows[rows >= 0]

    def identity(self, attrs: dict) -> dict:
        """What shards made for this update are tied to: the source file's content, and which rows it gives."""
        return {"source": self.source.name, "created": attrs.get("created"), "num_rows": attrs["num_rows"],
                "dataset_signature": attrs.get("dataset_signature"), "files_signature": attrs.get("files_signature"),
                "old_rows": hashlib.sha256(self.old_rows.tobytes()).hexdigest()}


def plan_split(path: Path, settings: cache.CacheSettings, layers: tuple[str, ...], overwrite: bool) -> Plan:
    """What to do for the file at ``path`` to hold ``layers`` under ``settings``.

    Up to date (nothing to compute); equal settings but layers missing (they are added); only the dataset
    changed (an incremental update, ``update``); any other file is an error, unless ``overwrite`` (which
    always re-extracts every requested layer, whatever is there).
    """
    if overwrite:
        return Plan(None, layers, replace_old=True)
    attrs = cache.read_attrs(path)  # checked: a damaged or edited file is one line here
    if attrs is None:
        return Plan(None, layers)
    existing = cache.CacheSettings.from_attrs(attrs) if attrs.get("complete") is True else None
    if existing == settings:
        held = cache.held_layers(attrs)
        return Plan(attrs, tuple(layer for layer in layers if layer not in held))
    differences = existing.differences(settings) if existing else []
    if differences and set(differences) <= DATASET_FIELDS:
        every = tuple(dict.fromkeys([*cache.held_layers(attrs), *layers]))  # new rows cover the file's layers too
        return Plan(None, every, update=attrs)
    changed = ", ".join(differences) if existing else "it is incomplete"
    raise UserError(f"{path} was extracted with other settings ({changed}); "
                    "pass --overwrite to replace it, or another --out")


def plan_reuse(path: Path, attrs: dict, requested: tuple[str, ...], paths: list[str], stamps: np.ndarray,
               world: int) -> Reuse | None:
    """Which rows of ``path`` (complete, ``attrs``) the updated split reuses: those whose image (``paths``,
    by dataset position, with their ``stamps``) is unchanged. None: none can be (logged: re-extracted whole)."""
    split = attrs["split"]
    if world > 1:
        raise UserError(f"{path} is to be updated for a changed dataset, which runs in one process: rerun "
                        "run_extract.py without torchrun (only new or changed images pass through the backbone), "
                        "or pass --overwrite to extract it whole under torchrun")
    old_paths, old_stamps = cache.read_row_identity(path)
    if old_stamps is None:
        log.info("%s: the dataset changed, and %s records no per-image sizes and times (made by an older version), "
                 "so its rows cannot be matched: extracting the whole split again", split, path)
        return None
    missing = [layer for layer in requested if layer not in cache.held_layers(attrs)]
    if missing:
        log.info("%s: the dataset changed and %s is to be added, which every row needs: extracting the whole split "
                 "again (at %s's recorded settings)", split, ", ".join(missing), path.name)
        return None
    where = {rel: row for row, rel in enumerate(old_paths)}
    old_rows = np.full(len(paths), -1, np.int64)
    for position, rel in enumerate(paths):
        row = where.get(rel)
        if row is not None and stamps[position, 0] >= 0 and np.array_equal(stamps[position], old_stamps[row]):
            old_rows[position] = row
    reuse = Reuse(path, old_rows, dropped=len(old_paths) - int((old_rows >= 0).sum()))
    log.info("%s: the dataset changed since %s was made: reused %d, extracted %d, dropped %d", split, path.name,
             reuse.reused, reuse.extracted, reuse.dropped)
    return reuse
