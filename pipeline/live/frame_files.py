"""The image folder ``run_webcam.py --collect`` writes into, and how a frame is saved there. Torch-free.

A frame is encoded in memory, written under a hidden partial name opened with O_EXCL, flushed to disk, then
hard-linked to its final name (``os.link`` fails if that name exists: nothing is ever replaced) and the
partial name removed. A kill therefore leaves only complete JPEGs under final names, at most one hidden
``.burst-..jpg.partial`` (removed by the next collection into that folder), and never touches another file.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipeline.common.errors import UserError
from pipeline.common.names import VAL_FRACTION
from pipeline.datasets.holdout import burst_of, frame_name, in_val, new_burst
from pipeline.datasets.indexing import SPLITS
from pipeline.datasets.layouts import class_name_problem
from pipeline.common.names import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

JPEG_QUALITY = 95  # near-lossless: the backbone sees the camera's frame, not JPEG blocks
# what a class folder may hold besides what the dataset reads: photos a decoder may not read (a listed skip there)
PHOTO_SUFFIXES = (*IMAGE_SUFFIXES, ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif")
PARTIAL_PATTERN = re.compile(r"^\.burst-\d{8}-\d{6}-[0-9a-f]{4}_\d+\.jpg\.partial$")
STALE_PARTIAL_SECONDS = 60  # a partial file older than this was left by a killed collection (a save takes ms)
MAX_NAME_BYTES = 255  # a file name on every common file system
STEER_VAL_BELOW = 0.05  # a burst steered to val is in val at any --val-fraction from 0.05
STEER_TRAIN_FROM = 0.5  # a burst steered to train is in train at any --val-fraction up to 0.5


def check_class_name(name: str) -> None:
    """CLASS becomes a folder name: refuse one that is not a plain, single folder name, or that the dataset's
    layouts would refuse as a class (layouts.class_name_problem: train, val, pen.jpg, .hidden)."""
    shown = repr(name)
    if not name.strip():
        raise UserError("--collect needs a class name (it becomes the folder DIR/<class>/), got an empty one")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise UserError(f"--collect {shown} is not a folder name: use one name without '/' or '\\' (e.g. mug)")
    if name != name.strip() or any(ord(c) < 32 or c == "\x7f" for c in name):
        raise UserError(f"--collect {shown} has spaces at its ends or control characters; use a plain name")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise UserError(f"--collect {shown[:40]}... is too long for a folder name; use a shorter one")
    problem = class_name_problem(name)
    if problem:
        raise UserError(f"--collect {shown} cannot be a class of the image folder: {problem}; pick another class "
                        "name (nothing was written)")


def _visible(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder`` a dataset reads: hidden ones (.DS_Store, our partial files) are not."""
    with os.scandir(folder) as entries:
        return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _not_image_folder(into: Path, what: str) -> UserError:
    return UserError(f"--into {into} is not an image folder: it holds {what}. Pass a new or empty folder, or one "
                     "that holds only class folders of images (DIR/<class>/*.jpg); nothing was written")


def check_into(into: Path, name: str) -> Path:
    """Refuse an ``--into`` that is not an image folder (the user's other files stay untouched); return the
    class folder ``into/name`` (created later, when the first frame is saved)."""
    if into.exists() and not into.is_dir():
        raise UserError(f"--into {into} is a file, not a folder; pass a folder (it is created if missing)")
    if not into.is_dir():
        return into / name
    try:
        entries = _visible(into)
        files = [e for e in entries if not e.is_dir()]
        if files:
            more = f" (and {len(files) - 1} more files)" if len(files) > 1 else ""
            raise _not_image_folder(into, f"the file {files[0].name}{more} beside its class folders")
        names = {e.name for e in entries}
        if set(SPLITS) <= names:
            raise UserError(f"--into {into} has train/ and val/ splits; collect into {into / 'train'} "
                            "(its val images then come from val/ only)")
        for entry in entries:
            for item in _visible(Path(entry.path)):
                if item.is_dir():
                    raise _not_image_folder(into, f"the folder {entry.name}/{item.name} (class folders hold images only)")
                if Path(item.name).suffix.lower() not in PHOTO_SUFFIXES:
                    raise _not_image_folder(into, f"{entry.name}/{item.name}, which is not an image")
    except OSError as err:
        raise UserError(f"cannot read {err.filename or into} ({err.strerror or err}); check its permissions") from None
    folder = into / name
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, so it cannot be the folder of class {name!r}; pick another class name")
    return folder


def burst_in_val(name: str, burst: str, fraction: float = VAL_FRACTION) -> bool:
    """Whether the dataset's split holds the burst ``burst`` of class ``name`` out for val at ``fraction``."""
    return in_val(f"{name}/{frame_name(burst, 0)}", fraction)


def pick_burst(folder: Path, name: str) -> tuple[str, str | None]:
    """A new burst name for class ``name`` that none of ``folder``'s files starts with, and why it was steered
    to its side of the split (None: left to the hash).

    A burst goes to val whole, one in five at the default fraction: left to chance, two bursts leave val (or
    train) empty 2 times in 3. So a class's first burst is named to fall in train, and while its bursts are all
    on one side, the next one's random digits are drawn until it falls on the other; with a margin (val below
    STEER_VAL_BELOW, train from STEER_TRAIN_FROM), so that two bursts are one train and one val at any
    --val-fraction between them. Later bursts are left to the hash. The split stays a function of the names.
    """
    taken = Counter(burst_of(p.name) for p in folder.iterdir()) if folder.is_dir() else Counter()
    taken.pop(None, None)
    sides = {burst_in_val(name, burst) for burst in taken}
    if not sides:
        want, why = "train", "train, as the class's first burst"
    elif len(sides) == 1:
        want = "train" if True in sides else "val"
        why = f"{want}: the class's bursts so far are all in {'val' if want == 'train' else 'train'}"
    else:
        want = why = None
    for _ in range(10_000):  # about 20 draws for val, 2 for train
        burst = new_burst()
        if burst in taken:
            continue
        if (want is None or (want == "val" and burst_in_val(name, burst, STEER_VAL_BELOW))
                or (want == "train" and not burst_in_val(name, burst, STEER_TRAIN_FROM))):
            return burst, why
    raise AssertionError("no burst name fell on the wanted side in 10000 draws")  # 0.95**10000: never


def remove_stale_partials(folder: Path) -> int:
    """Remove the hidden partial files a killed collection left in ``folder`` (only ours, only old ones)."""
    removed = 0
    if not folder.is_dir():
        return 0
    now = time.time()
    for path in folder.iterdir():
        if PARTIAL_PATTERN.match(path.name) and now - path.lstat().st_mtime > STALE_PARTIAL_SECONDS:
            path.unlink()
            removed += 1
    if removed:
        log.info("removed %d unfinished frame file(s) a stopped collection left in %s", removed, folder)
    return removed


def _place(partial: Path, final: Path) -> None:
    """Give ``partial`` the name ``final`` without ever replacing a file there (FileExistsError instead)."""
    try:
        os.link(partial, final)  # fails if final exists: O_EXCL semantics for a rename
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        # a file system without hard links (FAT, some network drives): rename, after a check; the burst's
        # random name makes a rival file between the check and the rename practically impossible
        if os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, "file exists", str(final)) from None
        os.rename(partial, final)
        return
    partial.unlink()


def save_jpeg(folder: Path, burst: str, index: int, bgr: np.ndarray) -> tuple[Path, int]:
    """Save ``bgr`` (H, W, 3) as ``folder/frame_name(burst, i)`` for the first unused i >= ``index``.

    Returns (the file, its index). Raises OSError (a full disk: ENOSPC) with no file of ours left behind.
    """
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise UserError(f"OpenCV could not encode a {bgr.shape[1]}x{bgr.shape[0]} frame as JPEG")
    data = encoded.tobytes()
    while True:
        final = folder / frame_name(burst, index)
        partial = folder / f".{final.name}.partial"
        try:
            file = open(partial, "xb")  # "x": O_EXCL, never an existing file (nor one we did not create)
        except FileExistsError:
            index += 1
            continue
        try:
            with file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())  # the bytes are on disk before the name says the frame is complete
            _place(partial, final)
            return final, index
        except FileExistsError:  # a name taken since the burst was chosen: the next index, never a reuse
            _discard(partial)
            index += 1
        except BaseException:  # a full disk, an interrupt: no half-written file stays under any name of ours
            _discard(partial)
            raise


def _discard(partial: Path) -> None:
    try:
        partial.unlink()
    except FileNotFoundError:
        pass


@dataclass
class ClassCount:
    """One class folder of the image folder: its images, bursts, and images held out at a val fraction."""

    name: str
    images: int = 0
    val: int = 0
    bursts: Counter = field(default_factory=Counter)  # burst -> frames; other images have none

    @property
    def others(self) -> int:
        """Images that are not collected frames (split one by one, not by burst)."""
        return self.images - sum(self.bursts.values())


def count_classes(into: Path, val_fraction: float) -> list[ClassCount]:
    """Each class folder of ``into`` with what the dataset's --val-fraction split will make of it."""
    counts = []
    for entry in _visible(into):
        if not entry.is_dir():
            continue
        count = ClassCount(entry.name)
        for item in _visible(Path(entry.path)):
            if Path(item.name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            count.images += 1
            count.val += in_val(f"{entry.name}/{item.name}", val_fraction)
            burst = burst_of(item.name)
            if burst:
                count.bursts[burst] += 1
        counts.append(count)
    return counts
