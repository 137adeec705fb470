"""Generated photo-like JPEGs with EXIF orientation tags, for the decoding tests and benchmark.

No real photos are available offline: these have a photo's size (12 MP), smooth shading, edges, fine
texture and sensor-like noise, and a camera's orientation tag.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112
PHOTO_SIZE = (4000, 3000)  # (width, height): a 12 MP phone photo


def photo_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8: shaded blobs with hard edges, stripes and noise (not a flat test card)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x, y = x / width, y / height
    image = np.empty((height, width, 3), np.float32)
    for channel in range(3):
        phase, freq = rng.uniform(0, 6.3, 2), rng.uniform(2, 9, 2)
        image[..., channel] = 120 + 60 * np.sin(freq[0] * x * 6.3 + phase[0]) * np.cos(freq[1] * y * 6.3 + phase[1])
    for _ in range(6):  # discs with hard edges and their own colour
        cx, cy, radius = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.25)
        inside = (x - cx) ** 2 + ((y - cy) * height / width) ** 2 < radius ** 2
        image[inside] = image[inside] * 0.4 + rng.uniform(0, 255, 3) * 0.6
    stripes = np.sin((x * rng.uniform(80, 200) + y * rng.uniform(20, 60)) * 6.3) > 0.6
    image[stripes] *= 0.8
    image += rng.normal(0, 4, (height, width, 3)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def save_jpeg(array: np.ndarray, path: Path, *, orientation: int | None = None, quality: int = 90) -> Path:
    """Write ``array`` as a JPEG; ``orientation``: the EXIF tag a camera writes (6: turn 90 degrees clockwise)."""
    exif = Image.Exif()
    if orientation is not None:
        exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(array).save(path, "JPEG", quality=quality, exif=exif.tobytes())
    return Path(path)
