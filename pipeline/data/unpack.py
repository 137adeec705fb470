"""Unpacking the Tiny ImageNet zip: once, into a folder this tool made, and never over one it did not.

A zip is recognised by its content, not its name (``.ZIP``, ``.zip.1`` as wget saves it, or no suffix).
It is unpacked next to itself into ``<stem>/`` (``data/`` when that folder is read-only), through a hidden
``.<stem>.unpacking-<pid>/`` folder that is renamed when complete. The ``.unpacked`` marker inside records
which zip was unpacked (its size, mtime and a digest of its member list), so another zip at the same path
is unpacked afresh instead of silently reusing the old copy.

Where ``<stem>/`` already exists without the marker, it is the user's: a dataset is used as it is, anything
else is left alone and the zip goes into ``<stem>.unpacked/`` instead. Every check (encryption, compression
method, size, free space) runs before anything is written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path

from features.atomic import write_atomic
from pipeline.datasets.dataset import find_root, index_dataset
from pipeline.common.errors import UserError, first_line
from pipeline.datasets.indexing import is_image

log = logging.getLogger(__name__)

MARKER = ".unpacked"  # written last inside a finished unpack: the folder is this tool's
OWNER = ".owner"  # inside a folder being unpacked: the host that unpacks it
# Tiny ImageNet unpacks to about 0.5 GB in 120,206 files; a zip far beyond that is not it (or is a zip bomb)
MAX_UNPACKED_BYTES = 4 * 2**30
MAX_MEMBERS = 1_000_000
BLOCK = 4096  # what a small file really takes on disk
SUPPORTED_METHODS = {getattr(zipfile, name) for name in ("ZIP_STORED", "ZIP_DEFLATED", "ZIP_BZIP2", "ZIP_LZMA",
                                                         "ZIP_ZSTANDARD") if hasattr(zipfile, name)}
METHOD_NAMES = {9: "Deflate64", 6: "Implode", 98: "PPMd", 99: "AES"}
_STEM = re.compile(r"(?P<stem>.+?)\.zip(?:\.\d+)?", re.IGNORECASE)
_WORK = re.compile(r"\.(?P<stem>.+)\.(?:unpacking|old|download)-(?P<pid>\d+)")  # this tool's temporary names


@dataclass(frozen=True)
class ZipContents:
    """What a checked zip holds, and what identifies it."""

    members: list[zipfile.ZipInfo]
    unpacked_bytes: int
    identity: dict  # {"zip", "size", "mtime_ns", "members"}: recorded in the marker


def zip_stem(zip_path: Path) -> str:
    """The folder name a zip unpacks to: its name without .zip, .ZIP or .zip.N."""
    match = _STEM.fullmatch(zip_path.name)
    return match["stem"] if match else zip_path.name


def _holds_class_folders(members: list[zipfile.ZipInfo]) -> bool:
    """Whether some image in the zip sits in a class folder (below the one top folder, when there is one)."""
    names = [m.filename for m in members if not m.filename.startswith("__MACOSX/")]
    tops = {name.split("/", 1)[0] for name in names}
    top_folder = len(tops) == 1 and all("/" in name for name in names)
    return any(is_image(name.rsplit("/", 1)[-1]) and name.count("/") >= 1 + top_folder for name in names)


def _stat_identity(zip_path: Path) -> dict:
    st = zip_path.stat()
    return {"zip": str(zip_path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def inspect_zip(zip_path: Path) -> ZipContents:
    """Check that the zip can be unpacked by this tool and is Tiny ImageNet-sized; writes nothing."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as err:
        raise UserError(f"{zip_path} is a damaged zip ({first_line(err)}); download it again") from None
    except OSError as err:
        raise UserError(f"cannot read {zip_path} ({err.strerror or err}); check the drive and permissions, then rerun") from None
    encrypted = [m.filename for m in members if m.flag_bits & 0x1]
    if encrypted:
        raise UserError(f"{zip_path} is encrypted ({len(encrypted)} members, first {encrypted[0]!r}); "
                        "unpack it yourself with its password and pass the folder with --data")
    unsupported = [m for m in members if m.compress_type not in SUPPORTED_METHODS]
    if unsupported:
        method = unsupported[0].compress_type
        raise UserError(f"{zip_path} uses a compression method Python cannot unpack "
                        f"({METHOD_NAMES.get(method, f'method {method}')}, first in {unsupported[0].filename!r}); "
                        "unpack it with another tool (e.g. 7z x) and pass the folder with --data")
    if not any(m.filename == "wnids.txt" or m.filename.endswith("/wnids.txt") for m in members) \
            and not _holds_class_folders(members):
        raise UserError(f"{zip_path} holds no dataset: no wnids.txt and no <class>/ folders of images; pass the "
                        "official tiny-imagenet-200.zip or a zip of an ImageFolder dataset")
    unpacked = sum(m.file_size for m in members)
    if unpacked > MAX_UNPACKED_BYTES or len(members) > MAX_MEMBERS:
        raise UserError(f"{zip_path} would unpack to {unpacked / 1e9:.1f} GB in {len(members)} files, far more than "
                        "Tiny ImageNet (0.5 GB, 120,206 files); it is not the Tiny ImageNet zip, pass the official one")
    digest = hashlib.sha256()
    for m in members:
        digest.update(f"{m.filename}\0{m.CRC:08x}\0{m.file_size}\n".encode("utf-8", "surrogateescape"))
    return ZipContents(members, unpacked, {**_stat_identity(zip_path), "members": digest.hexdigest()})


# the marker's fields: (type, range check, what is expected in words)
MARKER_FIELDS = {
    "zip": (str, bool, "the zip's path"),
    "size": (int, lambda v: v >= 0, "a byte count >= 0"),
    "mtime_ns": (int, lambda v: True, "a time in nanoseconds"),
    "members": (str, lambda v: len(v) == 64 and all(c in "0123456789abcdef" for c in v), "a sha256 in hex"),
}


def _read_marker(folder: Path) -> dict | None:
    """The checked marker of a folder this tool unpacked; None when there is none, or one from an older version
    (plain text: the zip it came from is unknown). A JSON marker with a field of the wrong type or range is
    one line naming the file and the field."""
    path = folder / MARKER
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict):
        raise UserError(f"{path} is {type(recorded).__name__}, not this tool's marker (a JSON object); move the "
                        f"folder {folder} aside and rerun")
    for name, (kind, in_range, expected) in MARKER_FIELDS.items():
        value = recorded.get(name)
        if type(value) is not kind or not in_range(value):
            raise UserError(f"{path}: field {name} is {value!r}, expected {expected}; move the folder {folder} "
                            "aside (or delete it if this tool unpacked it) and rerun")
    return recorded


def _write_marker(folder: Path, identity: dict) -> None:
    write_atomic(folder / MARKER, json.dumps(identity, indent=1) + "\n")


def _is_dataset(folder: Path) -> bool:
    if (folder / "wnids.txt").is_file() or len(list(folder.glob("*/wnids.txt"))) == 1:
        return True
    try:  # an ImageFolder dataset (or a folder holding one) whose class folders hold images
        index_dataset(find_root(folder))
    except UserError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it exists (another user's); odd numbers: leave alone
        return True
    return True


def remove_stale(parent: Path, stem: str) -> list[Path]:
    """Remove this tool's temporary folders (and partial downloads) for ``stem`` in ``parent`` whose process
    is gone (a killed unpack or download); those of live processes, or of another host, stay. Returns what
    was removed."""
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        match = _WORK.fullmatch(entry.name)
        if not match or match["stem"] != stem or entry.is_symlink():
            continue
        pid = int(match["pid"])
        owner = Path(entry.path) / OWNER
        if _alive(pid) or (owner.is_file() and owner.read_text().strip() != socket.gethostname()):
            continue
        log.info("removing %s, left by a run that was killed (process %d is gone)", entry.path, pid)
        if entry.is_dir():
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        removed.append(Path(entry.path))
    return removed


def _existing_ancestor(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_space(zip_path: Path, contents: ZipContents, parent: Path) -> None:
    """Stop before writing when the unpacked files will not fit in ``parent``'s file system."""
    need = sum(-(-m.file_size // BLOCK) * BLOCK + (BLOCK if m.is_dir() else 0) for m in contents.members)
    free = shutil.disk_usage(_existing_ancestor(parent)).free
    if need > free:
        raise UserError(f"not enough space to unpack {zip_path} into {parent}: it needs about {need / 1e6:.0f} MB, "
                        f"{free / 1e6:.0f} MB are free; free some space, or unpack it elsewhere and pass the folder with --data")


def _extract(zip_path: Path, members: list[zipfile.ZipInfo], folder: Path, *, progress: bool | None) -> None:
    """``progress``: a bar; None: a bar only on a terminal (callers that know --no-progress pass False)."""
    from tqdm import tqdm

    with zipfile.ZipFile(zip_path) as archive:
        bar = tqdm(members, desc=f"unpacking {zip_path.name}", unit="file", leave=False,
                   disable=None if progress is None else not progress)
        for member in bar:
            archive.extract(member, folder)  # names are sanitised: no absolute paths, no '..'


def _move_into_place(work: Path, target: Path, identity: dict) -> Path:
    """Rename the finished ``work`` folder to ``target``; an old copy there is this tool's and is replaced."""
    try:
        os.rename(work, target)  # atomic; fails when target is a non-empty folder
        return target
    except OSError:
        if not target.is_dir():
            raise
    if not (target / MARKER).is_file():  # someone else's folder appeared meanwhile: never touch it
        raise UserError(f"{target} appeared while unpacking and was not made by this tool; move it away and rerun")
    if (_read_marker(target) or {}).get("members") == identity["members"]:  # another run finished the same zip first
        shutil.rmtree(work, ignore_errors=True)
        return target
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.rename(target, old)
    os.rename(work, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _unpack_into(zip_path: Path, contents: ZipContents, target: Path, *, progress: bool | None) -> Path:
    parent = target.parent
    check_space(zip_path, contents, parent)
    work = parent / f".{target.name}.unpacking-{os.getpid()}"
    log.info("unpacking %s into %s", zip_path, target)
    if work.exists() or work.is_symlink():  # left by a dead process that had our PID (this one unpacks once)
        owner = work / OWNER
        if owner.is_file() and owner.read_text().strip() != socket.gethostname():
            raise UserError(f"{work} belongs to an unpack running on another machine; wait for it, then rerun")
        log.info("removing %s, left by a run that was killed", work)
        shutil.rmtree(work) if work.is_dir() and not work.is_symlink() else work.unlink()
    try:
        work.mkdir(parents=True)
        (work / OWNER).write_text(socket.gethostname() + "\n")
        _extract(zip_path, contents.members, work, progress=progress)
        (work / OWNER).unlink()
        _write_marker(work, contents.identity)
        return _move_into_place(work, target, contents.identity)
    except BaseException as err:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(err, (zipfile.BadZipFile, EOFError)):
            raise UserError(f"{zip_path} is damaged ({first_line(err)}); download it again") from None
        if isinstance(err, OSError):
            raise UserError(f"unpacking {zip_path} into {parent} failed ({err.strerror or first_line(err)}); "
                            "nothing was kept: fix that (free space, permissions) and rerun") from None
        raise


def _writable(folder: Path) -> bool:
    # root passes os.access everywhere, so also respect a folder whose mode has no write bits at all
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def unpack_zip(zip_path: Path, *, fallback: Path, progress: bool | None = None) -> Path:
    """The folder holding the zip's content: unpacked once, next to the zip (or in ``fallback`` when that
    folder is read-only). A folder this tool did not make is used when it is a dataset, else left alone."""
    zip_path = Path(zip_path)
    stem = zip_stem(zip_path)
    if not _writable(zip_path.parent):  # read-only: a copy already beside the zip is used as it is
        for folder in (zip_path.parent / stem, zip_path.parent / f"{stem}.unpacked"):
            if os.path.abspath(folder) == os.path.abspath(zip_path) or not folder.is_dir():
                continue
            recorded = _read_marker(folder)
            if recorded is None and _is_dataset(folder):
                log.info("using the dataset already in %s (not made by this tool) instead of unpacking %s", folder,
                         zip_path)
                return folder
            if recorded and all(recorded.get(k) == v for k, v in _stat_identity(zip_path).items()):
                return folder
    parent = zip_path.parent if _writable(zip_path.parent) else Path(fallback)
    candidates = [c for c in (parent / stem, parent / f"{stem}.unpacked")  # a zip named without suffix is not one
                  if os.path.abspath(c) != os.path.abspath(zip_path)]
    if parent.is_dir():
        for name in {stem, *(c.name for c in candidates)}:
            remove_stale(parent, name)
    stat = _stat_identity(zip_path)
    for folder in candidates:  # an earlier unpack of this very zip (same size and mtime): no need to open it
        recorded = _read_marker(folder) if folder.is_dir() else None
        if recorded and all(recorded.get(k) == v for k, v in stat.items()):
            return folder
    contents = inspect_zip(zip_path)  # every check before anything is written
    for folder in candidates:
        recorded = _read_marker(folder) if folder.is_dir() else None
        if recorded and recorded.get("members") == contents.identity["members"]:
            # the same content (the zip was copied or touched): note its new stat for the quick look next time
            try:
                _write_marker(folder, contents.identity)
            except OSError:  # a read-only copy: nothing needs writing, the next run just looks again
                pass
            return folder
    if parent != zip_path.parent:
        log.info("%s is read-only; unpacking into %s instead", zip_path.parent, parent)
    for folder in candidates:
        if folder.is_dir() and (folder / MARKER).is_file():  # this tool's copy of another zip: replace it
            log.info("%s holds a copy of another zip (or an older version's); unpacking %s afresh", folder, zip_path)
            return _unpack_into(zip_path, contents, folder, progress=progress)
        if folder.is_dir() and _is_dataset(folder):
            log.info("using the dataset already in %s (not made by this tool) instead of unpacking %s", folder, zip_path)
            return folder
        if not folder.exists() and not folder.is_symlink():
            if folder != candidates[0]:
                log.info("%s is in the way (not a dataset, not made by this tool: left as it is); unpacking into %s",
                         candidates[0], folder)
            return _unpack_into(zip_path, contents, folder, progress=progress)
    raise UserError(f"cannot unpack {zip_path}: {' and '.join(map(str, candidates))} exist and are not datasets made "
                    "by this tool; move one away, or unpack the zip yourself and pass the folder with --data")
