"""A packed dataset: tar shards and their manifest (made by ``run_extract.py --pack``; docs/data.md).

    OUT/manifest.json                  format, version, classes, split rule, skips, and per shard: its name,
                                       sample count, byte size, sha256 and each sample's key, label, offset, size
    OUT/train/000000.tar, ...          KEY.jpg (or .png, .webp, .gif: the original bytes) + KEY.cls (the label)
    OUT/val/000000.tar, ...

Reading a pack is indexing its manifest (no tar is parsed: each sample's bytes sit at the offset the manifest
records), checking each shard's size, and on first use of a shard in a process its sha256: a damaged or
truncated shard is one line (``PackDamaged``), never read as images. Torch-free; only the standard library.
A row's path is ``SHARD/KEY`` (``train/000003.tar/train/n01443537/images/n01443537_0``): the key is the image's
path relative to the source dataset's root, without its extension, dots escaped (``key_of``).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from pipeline.common.errors import UserError
from pipeline.datasets.indexing import SPLITS, Dataset, Split

PACK = "pack"  # the layout name of a packed dataset
MANIFEST = "manifest.json"
PACK_FORMAT = "fc7-pack"  # the manifest's "format": what tells a pack from any other folder holding a manifest.json
PACK_VERSION = 1
SHARD_SUFFIX = ".tar"
SUFFIX_OF = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".gif": "gif"}  # the member's extension


class PackDamaged(Exception):
    """A shard whose bytes are not those the manifest records (truncated, damaged, replaced): the message is the
    one line for the user."""


def key_of(rel: str) -> str:
    """The sample key of the image at ``rel`` (relative to the dataset root, with '/'): the path without its
    extension, with '%' and '.' escaped as %25 and %2E, so the key's first dot is the extension's (WebDataset
    splits a member's name there)."""
    stem = rel[: -len(os.path.splitext(rel)[1]) or None]
    return stem.replace("%", "%25").replace(".", "%2E")


def path_of(key: str) -> str:
    """The relative path, without its extension, that ``key`` was made from (key_of undone)."""
    return key.replace("%2E", ".").replace("%2e", ".").replace("%25", "%")


INCOMING = ".incoming"  # where --pack writes the shards before the manifest makes the folder a pack


def is_pack(folder: Path) -> bool:
    """Whether ``folder`` holds a pack's manifest (by name; its content is checked when it is indexed). A folder
    where packing was interrupted (shards, no manifest) is one line."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        return True
    if (folder / INCOMING).is_dir():
        raise UserError(f"{folder} is an unfinished pack (packing was interrupted before its {MANIFEST} was "
                        "written); run --pack again")
    return False


def shard_of(path: str) -> str:
    """``train/000003.tar`` of a row's path ``train/000003.tar/KEY`` (a key has no dot, so the first '.tar/' ends it)."""
    return path[: path.index(SHARD_SUFFIX + "/") + len(SHARD_SUFFIX)]


def read_manifest(root: Path) -> dict:
    """The manifest of the pack at ``root``, checked for its format and version; anything else is one line."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err}); check the drive and permissions") from None
    except ValueError as err:
        raise UserError(f"{path} is not a pack's manifest ({err}); pack the dataset again with --pack") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        raise UserError(f"{path} is not a pack's manifest (its format is not {PACK_FORMAT!r}); pass the folder "
                        "--pack wrote, or pack the dataset again with --pack")
    if manifest.get("version") != PACK_VERSION:
        raise UserError(f"{path} is a pack of format version {manifest.get('version')!r}; this version reads "
                        f"version {PACK_VERSION}: pack the dataset again with --pack")
    return manifest


class PackSource:
    """The bytes of a pack's samples, by row path: ``read(path)``. Each shard's size is checked when the pack is
    indexed, its sha256 once per process before its first sample is handed out. Picklable (DataLoader workers)."""

    def __init__(self, root: Path, shards: list[dict]):
        self.root, self.shards = Path(root), {s["name"]: s for s in shards}
        self.members: dict[str, tuple[str, int, int]] = {}
        self.extensions: dict[str, str] = {}  # each sample's member extension (jpg, png, ...): a pack packed again
        for shard in shards:
            name = shard["name"]
            for key, offset, size, ext in zip(shard["keys"], shard["offsets"], shard["sizes"], shard["extensions"]):
                self.members[f"{name}/{key}"] = (name, offset, size)
                self.extensions[f"{name}/{key}"] = ext
        self._reset()

    def _reset(self) -> None:
        self._fds: dict[str, int] = {}
        self._checked: set[str] = set()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def read(self, path: str) -> bytes:
        """The bytes of the sample at row path ``path``. PackDamaged: its shard is not the manifest's; OSError:
        it cannot be read."""
        name, offset, size = self.members[path]
        fd = self._open_checked(name)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise PackDamaged(f"{self.root / name} is truncated: {path} ends at byte {offset + size}, past the "
                              f"file's end; restore the shard or pack the dataset again with --pack")
        return data

    def _open_checked(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is not None and name in self._checked:
            return fd
        with self._lock:  # one thread hashes a shard; the others wait for its verdict
            if name not in self._checked:
                self._fds[name] = fd = self._fds.get(name) or os.open(self.root / name, os.O_RDONLY)
                check_shard(self.root, self.shards[name], fd)
                self._checked.add(name)
            return self._fds[name]

    def stamps(self, paths: list[str]) -> list[tuple[int, int, int, int]]:
        """What a cache row records of each sample (its stamp): (size, the shard's sha256 as a number, offset,
        the shard's byte size). Two rows match without a read when all four agree: the same bytes at the same place
        of a shard whose sha256 and size are the manifest's (pipeline.extract.incremental)."""
        digest = {name: int(s["sha256"][:16], 16) & (2**63 - 1) for name, s in self.shards.items()}
        out = []
        for path in paths:
            name, offset, size = self.members[path]
            out.append((size, digest[name], offset, self.shards[name]["bytes"]))
        return out

    def shard_rows(self, split: str) -> list[int]:
        """The sample count of each shard of ``split``, in order: the resumable units of its extraction."""
        return [s["samples"] for s in self.shards.values() if s["name"].startswith(f"{split}/")]


def check_shard(root: Path, shard: dict, fd: int | None = None) -> None:
    """PackDamaged unless the shard's size and sha256 are the manifest's."""
    path = Path(root) / shard["name"]
    opened = fd is None
    fd = os.open(path, os.O_RDONLY) if opened else fd
    try:
        size = os.fstat(fd).st_size
        if size != shard["bytes"]:
            raise PackDamaged(_size_problem(path, size, shard["bytes"]))
        digest = hashlib.sha256()
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
    finally:
        if opened:
            os.close(fd)
    if digest.hexdigest() != shard["sha256"]:
        raise PackDamaged(f"{path} is damaged: its sha256 is not the one {MANIFEST} records; restore the shard or "
                          "pack the dataset again with --pack (finished shards of the cache are kept)")


def _size_problem(path: Path, size: int, recorded: int) -> str:
    what = "truncated" if size < recorded else "not the shard packed"
    return (f"{path} is {what}: {size} bytes, {MANIFEST} records {recorded}; restore the shard or pack the dataset "
            "again with --pack")


def index_pack(root: Path) -> Dataset:
    """The dataset of the pack at ``root``: its manifest read, each shard's size checked (a missing or truncated
    shard is one line). The split is the one recorded when packing; nothing is split again."""
    root = Path(root)
    manifest = read_manifest(root)
    try:
        classes = manifest["classes"]
        splits, every_shard = {}, []
        for name in SPLITS:
            entry = manifest["splits"][name]
            split = Split(excluded=list(entry.get("skipped", [])))
            for shard in entry["shards"]:
                _check_size(root, shard)
                split.paths += [f"{shard['name']}/{key}" for key in shard["keys"]]
                split.labels += shard["labels"]
                every_shard.append(shard)
            splits[name] = split
        wnids = [c["id"] for c in classes]
        names, full_names = [c["name"] for c in classes], [c["full_name"] for c in classes]
    except (KeyError, TypeError) as err:
        raise UserError(f"{root / MANIFEST} lacks {err} (a damaged or edited manifest); pack the dataset again "
                        "with --pack") from None
    for name, split in splits.items():
        if not split.paths:
            raise UserError(f"{root / MANIFEST} lists no {name} images; pack a dataset with {name} images")
    source = PackSource(root, every_shard)
    source.split_rule = manifest.get("split_rule")
    return Dataset(root=root, wnids=wnids, names=names, full_names=full_names, splits=splits, layout=PACK,
                   source=source)


def _check_size(root: Path, shard: dict) -> None:
    path = root / shard["name"]
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {MANIFEST} lists it; restore it or pack the dataset again with --pack") from None
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err}); check the drive and permissions") from None
    if size != shard["bytes"]:
        raise UserError(_size_problem(path, size, shard["bytes"]))
