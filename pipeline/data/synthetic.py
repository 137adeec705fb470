"""A small generated dataset in the official Tiny ImageNet layout, for the demo and the tests.

Each class has its own colour and stripe pattern, so even features from a random backbone separate
the classes a little. No real images are involved.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

WORDS = {  # real wnids and words.txt entries, so names look as they will on the real data
    "n01443537": "goldfish, Carassius auratus",
    "n02002724": "black stork, Ciconia nigra",
    "n02231487": "walking stick, walkingstick, stick insect",
    "n02669723": "academic gown, academic robe, judge's robe",
    "n02909870": "bucket, pail",
    "n03255030": "dumbbell",
    "n03770439": "miniskirt, mini",
    "n04070727": "refrigerator, icebox",
    "n04398044": "teapot",
    "n07615774": "ice lolly, lolly, lollipop, popsicle",
}


def class_image(label: int, index: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """(size, size, 3) uint8: a class-coloured, class-striped picture with per-image noise."""
    rng = np.random.default_rng((seed, label, index))
    hue = np.array([(label * 97) % 256, (label * 57 + 80) % 256, (label * 31 + 160) % 256], dtype=np.float32)
    y, x = np.mgrid[0:size, 0:size]
    stripes = (np.sin((x * (label % 3 + 1) + y * (label // 3 + 1)) * 0.35 + index) > 0)[..., None]
    image = hue * (0.55 + 0.45 * stripes) + rng.normal(0, 18, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_tiny_imagenet(root: Path, *, num_classes: int = 3, train_per_class: int = 4, val_per_class: int = 2,
                       size: int = 64, val_layout: str = "official", crlf: bool = False, seed: int = 0) -> Path:
    """Write a dataset under ``root`` (the folder that holds wnids.txt) and return ``root``.

    ``val_layout``: "official" (val/images + val_annotations.txt), "arranged" (val/<wnid>/images/) or
    "flat-arranged" (val/<wnid>/*.JPEG).
    """
    root = Path(root)
    wnids = sorted(WORDS)[:num_classes] if num_classes <= len(WORDS) else [f"n{9000000 + i:08d}" for i in range(num_classes)]
    newline = "\r\n" if crlf else "\n"
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text(newline.join(wnids) + newline, newline="")
    words = [f"{w}\t{WORDS.get(w, f'class {w}')}" for w in wnids] + ["n99999999\tan entry for another class"]
    (root / "words.txt").write_text(newline.join(words), newline="")  # no final newline, like the real file
    for label, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True, exist_ok=True)
        boxes = []
        for i in range(train_per_class):
            Image.fromarray(class_image(label, i, size, seed)).save(folder / f"{wnid}_{i}.JPEG", quality=90)
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t{size - 1}\t{size - 1}")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(newline.join(boxes) + newline, newline="")
    annotations, k = [], 0
    for label, wnid in enumerate(wnids):
        for i in range(val_per_class):
            name = f"val_{k}.JPEG"
            if val_layout == "official":
                folder = root / "val" / "images"
            elif val_layout == "arranged":
                folder = root / "val" / wnid / "images"
            else:
                folder = root / "val" / wnid
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(class_image(label, 1000 + i, size, seed)).save(folder / name, quality=90)
            annotations.append(f"{name}\t{wnid}\t0\t0\t{size - 1}\t{size - 1}")
            k += 1
    if val_layout == "official":
        (root / "val" / "val_annotations.txt").write_text(newline.join(annotations) + newline, newline="")
    (root / "test" / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(class_image(0, 9999, size, seed)).save(root / "test" / "images" / "test_0.JPEG")
    return root
