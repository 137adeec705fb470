"""The indexed dataset every layout produces, and the folder listing the layouts share. Torch-free.

A dataset is indexed without reading an image: its classes, and per split the (path, label) list in a fixed
order (class, then path). Layouts: Tiny ImageNet (pipeline.datasets.dataset) and the two ImageFolder ones
(pipeline.datasets.layouts).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.common.errors import UserError
from pipeline.common.names import IMAGE_SUFFIXES, UNREAD_IMAGE_SUFFIXES

log = logging.getLogger(__name__)

TINY_IMAGENET = "tiny-imagenet"  # wnids.txt, words.txt, train/<wnid>/images/, val/images/ + annotations
IMAGEFOLDER_SPLITS = "imagefolder-splits"  # ROOT/train/<class>/*, ROOT/val/<class>/*
IMAGEFOLDER = "imagefolder"  # ROOT/<class>/*: val held out by a hash of each path (--val-fraction)
LAYOUTS = (TINY_IMAGENET, IMAGEFOLDER_SPLITS, IMAGEFOLDER)
SPLITS = ("train", "val")  # the splits every layout gives, and the folders that hold them (ROOT/train/, ROOT/val/)
MAX_EXAMPLES = 3  # how many offending names an error message quotes


@dataclass
class Split:
    """The labelled images of one split, in a fixed order (class, then file name)."""

    paths: list[str] = field(default_factory=list)  # relative to the dataset root, with '/'
    labels: list[int] = field(default_factory=list)
    # images that cannot be indexed (a file name that is not UTF-8, a format the decoder cannot read), as
    # [{"path", "reason"}]: skips, counted and listed
    excluded: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Dataset:
    """An indexed dataset. A label is a class's position in the sorted ``wnids`` (the class ids: Tiny
    ImageNet's wnids, or an ImageFolder's folder names)."""

    root: Path
    wnids: list[str]
    names: list[str]  # short names: the first synonym in words.txt ("goldfish"), or the folder name
    full_names: list[str]  # the whole words.txt entry, or the folder name
    splits: dict[str, Split]
    ignored: list[str] = field(default_factory=list)  # stray files that are not images
    layout: str = TINY_IMAGENET  # one of LAYOUTS, or a pack (pipeline.datasets.packs)
    source: object = None  # where the bytes are: a pack's PackSource; None: the files under root

    def read_bytes(self, rel: str) -> bytes:
        """The bytes of the image at ``rel`` (a path of ``splits``): a file under ``root``, or a pack's sample.
        OSError: it cannot be read; a pack's PackDamaged: its shard is not the one packed."""
        if self.source is not None:
            return self.source.read(rel)
        with open(self.root / rel, "rb") as f:
            return f.read()

    @property
    def num_classes(self) -> int:
        return len(self.wnids)

    def signature(self, split: str) -> str:
        """sha256 over the class order and one split's (path, label) list: what a cache was made from."""
        digest = hashlib.sha256()
        digest.update("\n".join(self.wnids).encode())
        for path, label in zip(self.splits[split].paths, self.splits[split].labels):
            digest.update(f"\n{path}\t{label}".encode())
        return digest.hexdigest()


def read_lines(path: Path) -> list[str]:
    """Non-blank lines without their line ending or trailing blanks; CRLF, a missing final newline and a
    byte-order mark all work."""
    try:
        with open(path, encoding="utf-8-sig", newline=None) as f:
            return [line.rstrip() for line in f if line.strip()]
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err}); check the drive and permissions, then rerun") from None


def shown(name: str) -> str:
    """A path or name as text that can always be printed and stored: bytes that are not UTF-8 as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # os.scandir hands undecodable bytes over as lone surrogates
    except UnicodeEncodeError:
        return False
    return True


def suffix(name: str) -> str:
    return os.path.splitext(name)[1].lower()  # .JPG, .Jpeg: case does not matter


def is_image(name: str) -> bool:
    """A file indexed as an image: a suffix the decoder reads (any case), not hidden (macOS ._ forks)."""
    return suffix(name) in IMAGE_SUFFIXES and not name.startswith(".")


def is_unread_image(name: str) -> bool:
    """A photo in a format the decoder cannot read (HEIC, AVIF, TIFF, ...): a listed skip, never ignored."""
    return suffix(name) in UNREAD_IMAGE_SUFFIXES and not name.startswith(".")


def scan(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as err:
        raise UserError(f"cannot list {folder} ({err.strerror or err}); check the drive and permissions, then rerun") from None


def list_images(root: Path, rel: str, ignored: list[str], excluded: list[dict], *,
                keep_folders: tuple[str, ...] = ("images",)) -> list[str]:
    """Image files in the folder ``root/rel``, sorted, as paths relative to ``root`` (strings: pathlib would
    cost more than the listing on 110,000 files). Anything else (.DS_Store, *_boxes.txt, ...) is noted as
    ignored; an image whose name is not UTF-8 (it cannot be stored in the cache) or whose format the decoder
    cannot read as excluded. Sub-folders named in ``keep_folders`` are left to the caller."""
    images = []
    for entry in scan(root / rel):
        name, path = entry.name, f"{rel}/{entry.name}" if rel else entry.name
        if entry.is_file() and (is_image(name) or is_unread_image(name)):
            if not is_utf8(name):
                excluded.append({"path": shown(path), "reason": f"file name {os.fsencode(name)!r} is not valid "
                                 "UTF-8 and cannot be stored in the cache; rename the file to use it"})
            elif is_unread_image(name):
                excluded.append({"path": path, "reason": f"{suffix(name)[1:].upper()} is a format the decoder cannot "
                                 f"read (it reads {', '.join(s[1:].upper() for s in IMAGE_SUFFIXES)}); convert it to "
                                 "JPEG to use it"})
            else:
                images.append(path)
        elif entry.is_symlink() and is_image(name) and not entry.is_dir():
            # a link whose target is gone (a vanished drive): a read failure, never a silent omission
            raise UserError(f"cannot read {root / path} (a link to {os.readlink(root / path)}, which does not "
                            "exist); reconnect the drive or fix the link, then rerun")
        elif not (name in keep_folders and entry.is_dir()):
            ignored.append(path)
    return images


def subfolders(folder: Path) -> list[str]:
    return [e.name for e in scan(folder) if e.is_dir() and not e.name.startswith(".")]


def examples(items) -> str:
    """The first few names, each as repr: two names that differ only in invisible characters look different."""
    items = [repr(item) for item in items]
    more = f", ... ({len(items)} in all)" if len(items) > MAX_EXAMPLES else ""
    return ", ".join(items[:MAX_EXAMPLES]) + more


def log_index(ignored: list[str]) -> None:
    """The index's note on ignored stray files (info). Excluded images are skips: the skip policy that every
    command applies to them (images.enforce_skip_policy) lists each one, so the index does not."""
    if ignored:
        log.info("ignored %d files that are not images (first: %s)", len(ignored), examples(ignored))
