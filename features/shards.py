"""Shards, the resumable unit of extraction: ``.npz`` files in ``<out>/.<split>.parts/``, tied to their settings.

Every shard's name and content carry the digest of the settings and layout that made it, so a shard is
never counted or assembled under other settings, whatever moment a kill interrupted a cleanup. Shards are
written with plain numpy I/O, where a full disk is a clean OSError (not an HDF5 write failure).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
import numpy as np

from features.atomic import write_atomic
from features.errors import CacheIncomplete, CacheUnwritable, describe_error
from features.settings import CacheSettings

log = logging.getLogger(__name__)


def parts_folder(out: Path, split: str) -> Path:
    return Path(out) / f".{split}.parts"


def start_parts(parts: Path, settings: CacheSettings, **layout) -> str:
    """Make the parts folder for these settings and return their digest; other parts are discarded.

    ``layout`` (batch size, shard size, row count, device, layers) must match too: it decides which rows
    share a batch, and fp32 results can differ in the last bit between batch compositions and devices.
    Shards are named by the digest, so a shard made under other settings is never counted, even when a
    kill left it behind; the old folder is renamed away before it is deleted.
    """
    meta = {"settings": asdict(settings), **layout}
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    if parts_digest(parts) == digest:
        return digest
    if parts.exists():
        log.info("discarding partial extraction in %s: it was made with other settings", parts)
        discard(parts)
    discard_trash(parts)
    parts.mkdir(parents=True, exist_ok=True)
    write_atomic(parts / "settings.json", json.dumps({"digest": digest, **meta}, sort_keys=True))
    return digest


def parts_digest(parts: Path) -> str | None:
    """The settings digest of a parts folder (None when it has no readable settings file)."""
    try:
        return json.loads((parts / "settings.json").read_text()).get("digest")
    except (OSError, ValueError, AttributeError):
        return None


def discard(folder: Path) -> None:
    """Delete a folder of our own making: renamed away first (atomic), so no kill leaves it half-deleted
    under its real name."""
    if not folder.exists():
        return
    trash = folder.with_name(f"{folder.name}.trash-{os.getpid()}-{time.time_ns()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def discard_trash(parts: Path) -> None:
    """Finish deletions that a kill interrupted."""
    for trash in parts.parent.glob(f"{parts.name}.trash-*"):
        shutil.rmtree(trash, ignore_errors=True)


def shard_file(parts: Path, shard: int, digest: str | None = None) -> Path:
    return parts / f"shard-{digest or parts_digest(parts)}-{shard:06d}.npz"


def done_shards(parts: Path) -> set[int]:
    """The shards finished under the folder's current settings."""
    digest = parts_digest(parts)
    if digest is None:
        return set()
    return {int(p.stem.rsplit("-", 1)[1]) for p in parts.glob(f"shard-{digest}-*.npz")}


def write_shard(parts: Path, shard: int, layers: dict[str, np.ndarray], positions: np.ndarray,
                skipped: list[dict], reused: tuple[np.ndarray, ...] | None = None,
                sha256: np.ndarray | None = None) -> None:
    """Atomically write one shard: rows ``layers`` ({layer: (n, dim)}) for dataset ``positions``, plus its
    skipped images. Plain numpy I/O: a full disk is a clean OSError here.

    ``reused``: (dataset positions, rows of the file being updated[, (k, 32) uint8 content digests]) of the
    shard's rows that are copied from that file at assembly (an incremental update): referenced here, not copied.
    ``sha256``: (n, 32) uint8, the digest of the bytes each computed row was made from.
    """
    digest = parts_digest(parts)
    if digest is None:
        raise CacheIncomplete(f"{parts} has no settings file")
    final = shard_file(parts, shard, digest)
    arrays = {f"layer_{name}": np.ascontiguousarray(rows) for name, rows in layers.items()}
    if reused is not None:
        arrays["reused_positions"], arrays["reused_rows"] = (np.asarray(a, dtype=np.int64) for a in reused[:2])
        if len(reused) > 2:
            arrays["reused_sha256"] = np.asarray(reused[2], dtype=np.uint8).reshape(-1, 32)
    if sha256 is not None:
        arrays["sha256"] = np.asarray(sha256, dtype=np.uint8).reshape(-1, 32)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, positions=np.asarray(positions, dtype=np.int64), skipped=np.array(json.dumps(skipped)),
                     digest=np.array(digest), **arrays)

    try:
        write_atomic(final, write=write)  # the shard exists under its real name only once fully written
    except OSError as err:
        raise CacheUnwritable(f"cannot write {final}: {describe_error(err)}") from None


def read_shard(path: Path, digest: str, *, layers: bool = True) -> dict:
    """One shard's positions, skips and reused rows, and (``layers``) its feature rows: without them, only the
    small arrays are read from the file."""
    with np.load(path, allow_pickle=False) as shard:
        if str(shard["digest"]) != digest:
            path.unlink()
            raise CacheIncomplete(f"{path} was made under other settings and is discarded")
        none = np.zeros(0, np.int64)
        reused = shard["reused_positions"] if "reused_positions" in shard.files else none
        return {"positions": shard["positions"], "skipped": json.loads(str(shard["skipped"])),
                "layers": {key[6:]: shard[key] for key in shard.files if key.startswith("layer_")} if layers else {},
                "reused_positions": reused,
                "reused_rows": shard["reused_rows"] if "reused_rows" in shard.files else none,
                "sha256": shard["sha256"] if "sha256" in shard.files else None,
                # no reused rows: nothing to give a digest for
                "reused_sha256": shard["reused_sha256"] if "reused_sha256" in shard.files
                else (np.zeros((0, 32), np.uint8) if not len(reused) else None)}
