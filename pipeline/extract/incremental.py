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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from features import cache
from pipeline.common.errors import UserError
from pipeline.datasets.packs import PackDamaged

log = logging.getLogger(__name__)

DATASET_FIELDS = {"dataset_signature", "files_signature", "files_identity"}  # what an incremental update may differ in


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
    sha256: np.ndarray | None = None  # (num_positions, 32) uint8: the content digest of each reused row's image
    checked: int = 0  # reused rows whose image was read to compare its content (moved, copied, touched)

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

    def reused_in(self, shard: range) -> tuple[np.ndarray, ...]:
        """(dataset positions, source rows[, content digests]) of the rows ``shard`` takes from the source."""
        positions = np.arange(shard.start, shard.stop, dtype=np.int64)
        rows = self.old_rows[shard.start:shard.stop]
        taken = positions[rows >= 0]
        if self.sha256 is None:
            return taken, rows[rows >= 0]
        return taken, rows[rows >= 0], self.sha256[taken]

    def identity(self, attrs: dict) -> dict:
        """What shards made for this update are tied to: the source file's content, and which rows it gives."""
        digest = hashlib.sha256(self.old_rows.tobytes())
        if self.sha256 is not None:
            digest.update(self.sha256[self.old_rows >= 0].tobytes())
        return {"source": self.source.name, "created": attrs.get("created"), "num_rows": attrs["num_rows"],
                "dataset_signature": attrs.get("dataset_signature"), "files_signature": attrs.get("files_signature"),
                "old_rows": digest.hexdigest()}


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
    if existing is not None and not existing.differences(settings):
        held = cache.held_layers(attrs)
        return Plan(attrs, tuple(layer for layer in layers if layer not in held))
    differences = existing.differences(settings) if existing else []
    if differences and set(differences) <= DATASET_FIELDS:
        every = tuple(dict.fromkeys([*cache.held_layers(attrs), *layers]))  # new rows cover the file's layers too
        return Plan(None, every, update=attrs)
    changed = ", ".join(differences) if existing else "it is incomplete"
    raise UserError(f"{path} was extracted with other settings ({changed}); "
                    "pass --overwrite to replace it, or another --out")


def plan_reuse(path: Path, attrs: dict, requested: tuple[str, ...], root: Path, paths: list[str],
               stamps: np.ndarray, world: int, source=None) -> Reuse | None:
    """Which rows of ``path`` (complete, ``attrs``) the updated split reuses: those whose image (``paths`` under
    ``root``, by dataset position, with their ``file_stamps``) is unchanged. None: none can be (logged: the split
    is extracted whole). An update that would keep less than half of the file's rows is another dataset (or
    another dataset's worth of edits): refused, so a finished cache is never replaced without --overwrite.

    ``source``: a pack's PackSource (pipeline.datasets.packs). A row is then matched by its sample's key, whatever
    shard holds it now; it is trusted without a read when its shard's sha256 and size and its place in it are
    those recorded (an unchanged shard), and otherwise compared by content, as a file is."""
    split = attrs["split"]
    if world > 1:
        raise UserError(f"{path} is to be updated for a changed dataset, which runs in one process: rerun "
                        "run_extract.py without torchrun (only new or changed images pass through the backbone), "
                        "or pass --overwrite to extract it whole under torchrun")
    old = cache.read_row_identity(path)
    match = _key if source is not None else str
    where = {match(rel): row for row, rel in enumerate(old.paths)}
    keys = [match(rel) for rel in paths]
    _refuse_another_dataset(path, attrs, len({key for key in keys if key in where}), len(old.paths), root)
    if old.stamps is None:
        log.info("%s: the dataset changed, and %s records no per-image sizes and times (made by an older version), "
                 "so its rows cannot be matched: extracting the whole split again", split, path)
        return None
    missing = [layer for layer in requested if layer not in cache.held_layers(attrs)]
    if missing:
        log.info("%s: the dataset changed and %s is to be added, which every row needs: extracting the whole split "
                 "again (at %s's recorded settings)", split, ", ".join(missing), path.name)
        return None
    reuse = _match_rows(path, old, where, root, paths, stamps, keys, source)
    _refuse_another_dataset(path, attrs, reuse.reused, len(old.paths), root)
    log.info("%s: the dataset changed since %s was made: reused %d, extracted %d, dropped %d", split, path.name,
             reuse.reused, reuse.extracted, reuse.dropped)
    return reuse


def _key(rel: str) -> str:
    """A pack row's sample key: its path without the shard (``train/000003.tar/KEY`` -> ``KEY``)."""
    return rel.split(".tar/", 1)[-1]


def _match_rows(path: Path, old: cache.RowIdentity, where: dict[str, int], root: Path, paths: list[str],
                stamps: np.ndarray, keys: list[str], source=None) -> Reuse:
    """Each dataset position's row of ``old``, where its image is the one the row was made from.

    A row is trusted when its image's size, mtime, inode and ctime all equal what the row recorded. When only the
    size does (a copy, a move, a fresh unpack, a rename, an edit that kept the mtime), the file is read and its
    sha256 compared with the row's. A row from before 0.8 (no inode, ctime or digest) is trusted on its size and
    mtime, as then, and gets its digest now (one read of the file)."""
    old_rows = np.full(len(paths), -1, np.int64)
    sha = np.zeros((len(paths), 32), np.uint8)
    to_read: list[tuple[int, int]] = []  # (position, old row): reused if the content says so
    for position, key in enumerate(keys):
        row = where.get(key)
        if row is None or stamps[position, 0] < 0 or stamps[position, 0] != old.stamps[row, 0]:
            continue  # new, unreadable (the extraction says why), or another size: another image
        same_mtime = stamps[position, 1] == old.stamps[row, 1]
        if old.sha256 is None:  # a row from before 0.8: trusted on size and mtime, its digest read below
            if same_mtime:
                old_rows[position] = row
                to_read.append((position, -1))
        elif same_mtime and np.array_equal(stamps[position, 2:4], old.inode_ctime[row]):
            old_rows[position], sha[position] = row, old.sha256[row]
        else:
            to_read.append((position, row))
    digests = _read_digests(root, [paths[position] for position, _ in to_read], source)
    if to_read:
        log.info("%s: %d images read to compare their content with their rows (copied, moved, renamed or touched "
                 "since %s was made, or recorded before 0.8)", path.stem, len(to_read), path.name)
    checked = 0
    for (position, row), digest in zip(to_read, digests):
        if row < 0:  # a row from before 0.8: its digest is recorded from now on
            if digest is None:
                old_rows[position] = -1  # unreadable now: read again by the extraction, which says why
            else:
                sha[position] = digest
        elif digest is not None and np.array_equal(digest, old.sha256[row]):
            old_rows[position], sha[position] = row, digest
            checked += 1
    reused = int((old_rows >= 0).sum())
    return Reuse(path, old_rows, dropped=len(old.paths) - reused, sha256=sha, checked=checked)


def _read_digests(root: Path, rels: list[str], source=None, threads: int = 4) -> list[np.ndarray | None]:
    """The sha256 of each file's bytes, (32,) uint8, or None where it cannot be read (threads: reads and hashing
    release the GIL). ``source``: a pack's, which reads each sample (a damaged shard: None, the extraction says why)."""
    if not rels:
        return []
    digest = file_sha256 if source is None else partial(_sample_sha256, source)
    with ThreadPoolExecutor(threads, thread_name_prefix="extract-check") as pool:
        return list(pool.map(lambda rel: digest(root / rel if source is None else rel), rels, chunksize=64))


def _sample_sha256(source, rel: str) -> np.ndarray | None:
    try:
        return np.frombuffer(hashlib.sha256(source.read(rel)).digest(), np.uint8)
    except (OSError, PackDamaged):
        return None


def file_sha256(path: Path) -> np.ndarray | None:
    """(32,) uint8: the sha256 of the file's bytes; None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256")
    except OSError:
        return None
    return np.frombuffer(digest.digest(), np.uint8)


def _refuse_another_dataset(path: Path, attrs: dict, kept: int, rows: int, root: Path) -> None:
    """Refuse an update that would keep less than half of a complete file's ``rows``: that is another dataset
    (or a mistyped --data), not a grown one, and the finished cache would be gone."""
    if 2 * kept >= rows:
        return
    raise UserError(f"{path} holds {rows} rows made from {attrs.get('dataset_root') or 'another dataset'}; the "
                    f"images under {root} would keep only {kept} of them (the others are not there, or changed): "
                    "that is another dataset, not an update; pass another --out for it, or --overwrite to replace "
                    f"{path.name}")
