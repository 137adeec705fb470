"""``run_extract.py --data DIR --pack OUT``: any dataset --data reads, written as tar shards and a manifest, then stop.

The format is pipeline.datasets.packs' (docs/data.md). Samples keep the index's order (split, class, path);
a shard is closed at ``--shard-size`` samples (2048: one shard of the pack is then one resumable shard of the
cache, and batches fall as they do when the folder is extracted) or at PACK_SHARD_BYTES, whichever comes first
(64x64 JPEGs: 2048 samples, about 7 MB; 12 MP photos: about 100, 512 MiB). Members are written with the standard
library's tarfile, their metadata fixed (mtime 0, uid 0, mode 0644), so the same images give the same shards,
byte for byte, and an unchanged shard keeps its sha256 across packings.

Nothing that looks complete is left by a failure: the shards are written under ``OUT/.incoming/``, and the
manifest, which makes the folder a pack, is written last (atomically) once they are all in place. A pack that was
already there stays readable until the new shards are complete.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import time
from pathlib import Path

from pipeline.common.config import ExtractConfig
from pipeline.common.errors import UserError
from pipeline.data.prepare import resolve_data
from pipeline.datasets.dataset import IMAGEFOLDER, Dataset, index_dataset
from pipeline.datasets.indexing import SPLITS, suffix
from pipeline.datasets.packs import INCOMING, MANIFEST, PACK, PACK_FORMAT, PACK_VERSION, SUFFIX_OF, key_of

log = logging.getLogger(__name__)

PACK_SHARD_BYTES = 512 * 2**20  # a shard is closed once it holds this many bytes (or --shard-size samples)



def pack_dataset(config: ExtractConfig) -> dict:
    """Write the dataset ``config.data`` names as a pack in ``config.pack``; return its manifest."""
    out = Path(config.pack).resolve()
    root = resolve_data(config.data, download=config.download, url=config.url, md5=config.md5,
                        progress=config.progress)
    dataset = index_dataset(root, config.val_fraction)
    _check_target(out, Path(dataset.root).resolve())
    incoming = out / INCOMING
    shutil.rmtree(incoming, ignore_errors=True)  # what a killed packing left
    publishing = []  # once the old manifest is gone, the new shards are kept: the rerun finds an unfinished pack
    try:
        splits = {name: _write_split(dataset, name, incoming, config.shard_size) for name in SPLITS}
        manifest = _manifest(dataset, splits, config)
        _publish(out, incoming, manifest, publishing)
    except OSError as err:
        if not publishing:
            shutil.rmtree(incoming, ignore_errors=True)
        kept = "a pack that was there is kept" if not publishing else "the unfinished pack is replaced"
        raise UserError(f"cannot write the pack in {out} ({err.strerror or err}); free space or fix permissions, "
                        f"then pack again ({kept})") from None
    except BaseException:
        if not publishing:
            shutil.rmtree(incoming, ignore_errors=True)
        raise
    return manifest


def _check_target(out: Path, root: Path) -> None:
    """OUT must be a new or empty folder, or a pack (replaced), and not inside the dataset it packs."""
    if out == root or out.is_relative_to(root):
        raise UserError(f"--pack {out} is inside the dataset {root}, where it would be read as part of it; pass "
                        "a folder outside it")
    if out.exists() and not out.is_dir():
        raise UserError(f"--pack {out} is a file; pass a new or empty folder (or a pack to replace)")
    ours = (out / MANIFEST).is_file() or (out / INCOMING).is_dir()  # a pack, or one whose packing was interrupted
    if out.is_dir() and not ours and any(os.scandir(out)):
        raise UserError(f"--pack {out} is a folder that holds other files and no {MANIFEST}; pass a new or empty "
                        "folder (or a pack to replace)")


def _write_split(dataset: Dataset, name: str, incoming: Path, shard_size: int) -> dict:
    """The shards of one split under ``incoming/<split>/``: [{name, samples, bytes, sha256, keys, ...}]."""
    split = dataset.splits[name]
    (incoming / name).mkdir(parents=True, exist_ok=True)
    shards, seen, writer = [], {}, None
    for rel, label in zip(split.paths, split.labels):
        key, ext = _key_and_extension(dataset, rel)
        if key in seen:
            raise UserError(f"{dataset.root / seen[key]} and {dataset.root / rel} would be one sample {key!r} of the "
                            "pack (one name, two formats); rename one of them")
        seen[key] = rel
        if writer is None:
            writer = _ShardWriter(incoming, f"{name}/{len(shards):06d}.tar")
        writer.add(key, ext, label, _read(dataset, rel))
        if writer.samples >= shard_size or writer.bytes >= PACK_SHARD_BYTES:
            shards.append(writer.close())
            writer = None
    if writer is not None:
        shards.append(writer.close())
    log.info("%s: %d images in %d shards", name, len(split), len(shards))
    return {"shards": shards, "skipped": list(split.excluded)}


def _key_and_extension(dataset: Dataset, rel: str) -> tuple[str, str]:
    """A sample's key and member extension: from its path; a pack's sample keeps its own (the shard dropped)."""
    if dataset.layout == PACK:
        return rel.split(".tar/", 1)[1], dataset.source.extensions[rel]
    return key_of(rel), SUFFIX_OF.get(suffix(rel), suffix(rel)[1:])


def _read(dataset: Dataset, rel: str) -> bytes:
    try:
        return dataset.read_bytes(rel)
    except OSError as err:
        raise UserError(f"cannot read {dataset.root / rel} ({err.strerror or err}); check the drive and the file's "
                        "permissions, then pack again") from None


class _ShardWriter:
    """One tar shard being written: KEY.EXT (the bytes) and KEY.cls (the label) per sample."""

    def __init__(self, incoming: Path, name: str):
        self.name, self.path = name, incoming / name
        self.tar = tarfile.open(self.path, "w", format=tarfile.PAX_FORMAT)
        self.keys, self.labels, self.offsets, self.sizes, self.exts = [], [], [], [], []

    @property
    def samples(self) -> int:
        return len(self.keys)

    @property
    def bytes(self) -> int:
        return self.tar.offset

    def add(self, key: str, ext: str, label: int, data: bytes) -> None:
        self._member(f"{key}.{ext}", data)
        self.offsets.append(self.tar.offset - _padded(len(data)))  # where the image's bytes start in the shard
        self.sizes.append(len(data))
        self._member(f"{key}.cls", str(label).encode())
        self.keys.append(key)
        self.labels.append(label)
        self.exts.append(ext)

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
        self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> dict:
        self.tar.close()
        with open(self.path, "rb+") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            os.fsync(f.fileno())
        return {"name": self.name, "samples": len(self.keys), "bytes": self.path.stat().st_size, "sha256": digest,
                "keys": self.keys, "labels": self.labels, "offsets": self.offsets, "sizes": self.sizes,
                "extensions": self.exts}


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _manifest(dataset: Dataset, splits: dict, config: ExtractConfig) -> dict:
    if dataset.layout == IMAGEFOLDER:
        rule = {"rule": "hash", "val_fraction": config.val_fraction,
                "how": "an image is in val when the first 8 bytes of the sha256 of its path relative to the dataset "
                       "root (of its burst, for frames collected from the webcam), read as a big-endian number over "
                       "2^64, are below val_fraction (pipeline.datasets.holdout.in_val)"}
    elif dataset.layout == PACK:  # a pack packed again: its split stands as it was made
        rule = dataset.source.split_rule
    else:
        rule = {"rule": "folders", "how": f"the source's own train and val ({dataset.layout} layout)"}
    return {"format": PACK_FORMAT, "version": PACK_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source": {"root": str(dataset.root), "layout": dataset.layout}, "split_rule": rule,
            "shard_limits": {"samples": config.shard_size, "bytes": PACK_SHARD_BYTES},
            "classes": [{"index": i, "id": w, "name": n, "full_name": f}
                        for i, (w, n, f) in enumerate(zip(dataset.wnids, dataset.names, dataset.full_names))],
            "splits": splits}


def _publish(out: Path, incoming: Path, manifest: dict, publishing: list) -> None:
    """The new shards in place of the old pack's, then the manifest: until it is written, OUT is no pack."""
    publishing.append(True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on, OUT is an unfinished pack until the new manifest is in
    for name in SPLITS:
        old = out / name
        if old.exists():
            shutil.rmtree(old)
        os.replace(incoming / name, old)
    tmp = incoming / MANIFEST
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)
    incoming.rmdir()  # last: while it is there without a manifest, OUT reads as an unfinished pack
