"""Decoding image files to RGB uint8 tensors, and the skip policy for ones that will not decode."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image

from pipeline.errors import UserError, first_line

log = logging.getLogger(__name__)


class ImageDecodeError(Exception):
    """An image file that is empty, truncated or not an image; the message is the reason."""


@dataclass(frozen=True)
class Skipped:
    path: str  # relative to the dataset root
    reason: str

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


def read_bytes(path: str | Path) -> torch.Tensor:
    """The file's bytes as a 1-d uint8 tensor (what decode_image and decode_jpeg take)."""
    with open(path, "rb") as f:
        data = f.read()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def decode_rgb(data: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 RGB from encoded bytes: JPEG (also grayscale or CMYK), PNG, ... whatever the suffix says."""
    if data.numel() == 0:
        raise ImageDecodeError("empty file")
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        reason = first_line(err, last=True)
        if "truncated" in reason.lower() or "premature" in reason.lower():
            raise ImageDecodeError(f"truncated image ({reason})") from None
        raise ImageDecodeError(f"cannot decode ({reason})") from None


def read_rgb(path: str | Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB from an image file."""
    return decode_rgb(read_bytes(path))


def stack_or_list(images: list[torch.Tensor], *, channels_last: bool = False) -> torch.Tensor | list[torch.Tensor]:
    """(3, H, W) images -> one (B, 3, H, W) tensor when they share a size, else the list (resized one by one).

    ``channels_last``: stacked as (B, H, W, 3) in memory (one copy), the layout the uint8 resize is fastest in.
    """
    if len({tuple(image.shape) for image in images}) != 1:
        return list(images)
    if channels_last:
        return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    return torch.stack(images)


def check_image(root: Path, rel: str) -> Skipped | None:
    try:
        read_rgb(root / rel)
    except (ImageDecodeError, OSError) as err:
        return Skipped(rel, str(err))
    return None


def verify_images(root: Path, paths: list[str], *, workers: int = 4, progress: bool = True) -> list[Skipped]:
    """Decode every image once; return the ones that fail, in order."""
    from tqdm import tqdm

    with ThreadPoolExecutor(max(1, workers)) as pool:  # decoding releases the GIL
        results = pool.map(lambda rel: check_image(root, rel), paths, chunksize=64)
        return [r for r in tqdm(results, total=len(paths), desc="checking images", unit="img",
                                disable=not progress, leave=False) if r is not None]


def enforce_skip_policy(skipped: list[Skipped], *, strict: bool) -> None:
    """Undecodable images are skipped and listed; with --strict the first one is an error."""
    if skipped and strict:
        first = skipped[0]
        raise UserError(f"{first.path}: {first.reason} ({len(skipped)} bad images in all); "
                        "remove or replace them, or drop --strict to skip them")
    for item in skipped:
        log.warning("skipping %s: %s", item.path, item.reason)
