"""The project folder the page works on: an ordinary folder, and everything the page shows is read from it.

    DIR/images/<class>/*.jpg   the ImageFolder, as run_webcam.py --collect writes it (bursts and all)
    DIR/trash/<class>/*.jpg    deleted images and removed classes, until restored
    DIR/features/              the feature cache (run_extract.py --data DIR/images --out DIR/features)
    DIR/heads/<head>/          the head runs the page trains (run_train_head.py --features DIR/features --out DIR/heads/linear)
    DIR/export/                the page's export (run_webcam.py --export DIR/export/classifier.onnx)
    DIR/.lock                  held by the one server working on the folder

Nothing lives only in memory: a restart on the same folder shows the same classes, samples and trash.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import cv2
import numpy as np

from pipeline.app.files import (AppError, check_file_name, check_image, is_zip, move_new, safe_stem, unpack_zip,
                                write_new)
from pipeline.common.errors import UserError
from pipeline.common.names import IMAGE_SUFFIXES, VAL_FRACTION
from pipeline.live.collect import advice
from pipeline.live.frame_files import check_class_name, count_classes, pick_burst, remove_stale_partials, save_jpeg

log = logging.getLogger(__name__)

THUMBNAIL_SIDE = 160  # the longer side of a thumbnail on the page


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


class Project:
    """One project folder. Its methods take names from the page, check them, and touch only files under it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.images, self.trash = self.root / "images", self.root / "trash"
        self.features, self.heads = self.root / "features", self.root / "heads"
        self.lock = threading.Lock()  # the server's threads: one change to the folder at a time

    def open(self) -> Project:
        """Create the folders; remove what a killed server or collection left half-written (hidden files only)."""
        for folder in (self.images, self.trash):
            folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".dataset-*.zip.partial"):  # a download's zip a killed server left
            leftover.unlink()
        for name in self._class_names():
            remove_stale_partials(self.images / name)
            for leftover in (self.images / name).glob(".*.upload.partial"):
                leftover.unlink()
        return self

    # classes

    def class_folder(self, name: str, *, exists: bool = True) -> Path:
        """``images/<name>``, after the class name check of --collect; with ``exists``, the class must be there."""
        try:
            check_class_name(name)
        except UserError as err:  # the same rule, worded for the page
            raise AppError(str(err).replace("--collect ", "class ", 1).replace(" (it becomes the folder DIR/<class>/)",
                                                                             ""), 400) from None
        folder = self.images / name
        if exists and not folder.is_dir():
            raise AppError(f"there is no class {name!r} in this project", 404)
        return folder

    def _class_names(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.images) if e.is_dir() and not e.name.startswith("."))

    def summary(self) -> dict:
        """The classes with their counts, what they still need, and the trash's size."""
        counts = count_classes(self.images, VAL_FRACTION)
        return {"classes": [{"name": c.name, "images": c.images, "bursts": len(c.bursts), "val": c.val}
                            for c in counts],
                "advice": [line.replace("(run --collect again for each)", "(hold its Record button again)")
                           for line in advice(counts)], "trash": len(self.trash_items())}

    def add_class(self, name: str) -> None:
        folder = self.class_folder(name, exists=False)
        with self.lock:
            if folder.exists():
                raise AppError(f"there is already a class {name!r}", 409)
            folder.mkdir()

    def rename_class(self, name: str, to: str) -> None:
        """Rename the class folder (and its trash folder, so restored images follow it)."""
        folder, target = self.class_folder(name), self.class_folder(to, exists=False)
        with self.lock:
            if target.exists():
                raise AppError(f"there is already a class {to!r}; pick another name", 409)
            os.rename(folder, target)
            if (self.trash / name).is_dir() and not (self.trash / to).exists():
                os.rename(self.trash / name, self.trash / to)

    def remove_class(self, name: str) -> int:
        """Move every file of the class to the trash, then remove its folder; returns the images moved."""
        folder = self.class_folder(name)
        moved = 0
        with self.lock:
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                if entry.name.startswith("."):
                    os.unlink(entry.path)  # a partial file of ours, or the desktop's own (.DS_Store)
                else:
                    move_new(Path(entry.path), self.trash / name)
                    moved += 1
            folder.rmdir()
        return moved

    # samples

    def samples(self, name: str) -> list[str]:
        folder = self.class_folder(name)
        return sorted(e.name for e in os.scandir(folder) if e.is_file() and is_image_name(e.name))

    def sample_path(self, name: str, file: str, *, trash: bool = False) -> Path:
        """The image ``file`` of class ``name`` (in the trash with ``trash``), both names checked; 404 if absent."""
        check_file_name(file)
        if trash:
            self.class_folder(name, exists=False)
            path = self.trash / name / file
        else:
            path = self.class_folder(name) / file
        if not path.is_file():
            raise AppError(f"there is no image {file!r} in {'the trash of ' if trash else ''}class {name!r}", 404)
        return path

    def delete_sample(self, name: str, file: str) -> str:
        """Move the image to the trash (restorable); returns its name there."""
        path = self.sample_path(name, file)
        with self.lock:
            return move_new(path, self.trash / name).name

    def trash_items(self) -> list[dict]:
        items = []
        for folder in sorted(p for p in self.trash.iterdir() if p.is_dir()):
            items += [{"class": folder.name, "name": e.name} for e in sorted(os.scandir(folder), key=lambda e: e.name)
                      if e.is_file() and is_image_name(e.name)]
        return items

    def restore(self, name: str, file: str) -> str:
        """Move a trashed image back into its class (made again if it was removed); returns its name there."""
        path = self.sample_path(name, file, trash=True)
        with self.lock:
            folder = self.class_folder(name, exists=False)
            return move_new(path, folder).name

    # new images

    def upload(self, name: str, filename: str, data: bytes) -> dict:
        """Store an uploaded image, or a zip's images, in class ``name``; the kind is told by content."""
        folder = self.class_folder(name)
        what = repr(safe_stem(filename)) if filename else "the upload"
        if is_zip(data):
            unpacked = unpack_zip(data, what)
            images, skipped = unpacked.images, unpacked.skipped
        else:
            images, skipped = [(safe_stem(filename), check_image(data, what), data)], []
        with self.lock:
            stored = [write_new(folder, stem, suffix, content).name for stem, suffix, content in images]
        return {"stored": stored, "skipped": skipped}

    def start_burst(self, name: str) -> tuple[Path, str]:
        """The class folder and a new burst name for one hold of the record button (as --collect picks it)."""
        folder = self.class_folder(name)
        with self.lock:
            burst, _ = pick_burst(folder, name)
        return folder, burst

    def save_frame(self, folder: Path, burst: str, index: int, jpeg: bytes) -> int:
        """Save one captured frame as --collect does (a whole JPEG, never over a file); returns its index."""
        if jpeg[:3] == b"\xff\xd8\xff" and (image_bgr := _decode(jpeg)):
            _, index = save_jpeg(folder, burst, index, image_bgr[0])
            return index
        raise AppError("a captured frame is not a JPEG image; nothing was stored", 415)

    def thumbnail(self, path: Path) -> bytes:
        """A small JPEG of the image (its own bytes when OpenCV cannot read it, as for a GIF)."""
        data = path.read_bytes()
        decoded = _decode(data)
        if not decoded:
            return data
        bgr = decoded[0]
        scale = THUMBNAIL_SIDE / max(bgr.shape[:2])
        if scale < 1:
            bgr = cv2.resize(bgr, (max(1, round(bgr.shape[1] * scale)), max(1, round(bgr.shape[0] * scale))),
                             interpolation=cv2.INTER_AREA)
        ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 85])
        return encoded.tobytes() if ok else data


def _decode(data: bytes) -> tuple[np.ndarray] | None:
    """(BGR image,) or None when OpenCV cannot decode ``data``."""
    if not data:
        return None
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if bgr is None else (bgr,)
