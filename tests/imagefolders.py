"""Generated ImageFolder datasets for the tests of the ImageFolder layouts (class-coloured 64x64 pictures)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.synthetic import class_image

CLASSES = ("cat", "dog", "mug")


def write_class(folder: Path, label: int, count: int, *, start: int = 0, suffix: str = ".jpg", size: int = 64) -> list[Path]:
    """``count`` images of class ``label`` in ``folder`` (img_<i><suffix>); the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = folder / f"img_{i:03d}{suffix}"
        Image.fromarray(class_image(label, i, size)).save(path, format=_format(suffix), quality=90)
        paths.append(path)
    return paths


def _format(suffix: str) -> str:
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".gif": "GIF"}[suffix.lower()]


def make_flat(root: Path, *, classes=CLASSES, per_class: int = 10, size: int = 64) -> Path:
    """One ImageFolder without val: ROOT/<class>/*.jpg."""
    for label, name in enumerate(classes):
        write_class(root / name, label, per_class, size=size)
    return root


def make_splits(root: Path, *, classes=CLASSES, train_per_class: int = 4, val_per_class: int = 2) -> Path:
    """ImageFolder with splits: ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg."""
    for label, name in enumerate(classes):
        write_class(root / "train" / name, label, train_per_class)
        write_class(root / "val" / name, label, val_per_class, start=1000)
    return root


def write_strip(path: Path, height: int, width: int) -> Path:
    """A noise image of ``height`` x ``width`` pixels (a 1x4000 strip, a 4000x1 column), its format by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(height * 7919 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format=_format(path.suffix), quality=90)
    return path
