"""Decoding image files to 8-bit RGB tensors, and the skip policy for ones that will not decode.

Two kinds of failure, kept apart on purpose:

- ``ImageDecodeError``: the bytes were read but are not a usable image (empty, truncated, not an image,
  a format the decoder does not know). The file is skipped, counted and listed.
- ``ImageReadError`` (an ``OSError``): the file could not be read at all (I/O error, permission denied,
  vanished file or drive). That says nothing about the image, so it is never a skip: callers stop with
  ``unreadable(path, err)``, and a rerun after the fault is fixed reads the file again.

Real photos: the EXIF orientation is applied (a phone photo taken upright decodes upright), and a large
JPEG is downscaled while it is decoded (libjpeg's 1/2, 1/4, 1/8 scaling, through PIL's ``draft``), but only
to a size still at least twice what the preprocessing resizes to (``min_side``), so features stay at cosine
>= 0.999 to a full decode. A small image (Tiny ImageNet's 64x64) is decoded in full, exactly as before.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image

from pipeline.common.errors import UserError, first_line
from pipeline.common.jpeg import decode_with_pillow, jpeg_size, reduction

log = logging.getLogger(__name__)


class ImageDecodeError(Exception):
    """An image file that is empty, truncated or not an image; the message is the reason."""


class ImageReadError(OSError):
    """An image file that could not be read (errno and strerror of the underlying OSError, filename set)."""


@dataclass(frozen=True)
class Skipped:
    path: str  # relative to the dataset root
    reason: str

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


def unreadable(path: str | Path, err: OSError) -> UserError:
    """The one-line error for a file that cannot be read (not a skip: the run stops)."""
    reason = err.strerror or first_line(err)
    return UserError(f"cannot read {path} ({reason}); check the drive and the file's permissions, then rerun")


def read_bytes(path: str | Path) -> torch.Tensor:
    """The file's bytes as a 1-d uint8 tensor (what decode_image takes). Raises ImageReadError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ImageReadError(err.errno, err.strerror or first_line(err), str(path)) from err
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def decode_rgb(data: torch.Tensor, *, min_side: int | None = None) -> torch.Tensor:
    """(3, H, W) uint8 RGB from encoded bytes, whatever the suffix says, turned as its EXIF orientation says.

    JPEG (also grayscale or CMYK), PNG (also 16-bit: scaled to 8 bits as torchvision's to_dtype does, by
    dropping the low byte), WebP and GIF (an animation gives its first frame). Anything else raises
    ImageDecodeError with the reason. ``min_side``: a JPEG whose shorter side is at least twice this is
    decoded at 1/2, 1/4 or 1/8 scale, the smallest whose shorter side is still >= ``min_side``.
    """
    if data.numel() == 0:
        raise ImageDecodeError("empty file")
    scale = reduction(jpeg_size(data.numpy()), min_side) if min_side else 1
    if scale > 1:
        return _decode_reduced(data, scale)
    try:
        image = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError) as err:
        reason = first_line(err, last=True)
        if "truncated" in reason.lower() or "premature" in reason.lower():
            raise ImageDecodeError(f"truncated image ({reason})") from None
        if "unsupported image file" in reason.lower():
            raise ImageDecodeError("cannot decode (not a format the decoder reads: JPEG, PNG, WebP, GIF; "
                                   "convert it to JPEG)") from None
        raise ImageDecodeError(f"cannot decode ({reason})") from None
    if image.ndim == 4:  # an animated GIF: (frames, 3, H, W)
        if image.shape[0] == 0:
            raise ImageDecodeError("animation with no frames")
        image = image[0]
    if image.dtype == torch.uint16:  # 16-bit PNG: 0..65535 -> 0..255 (uint16 has no shift on the CPU)
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ImageDecodeError(f"cannot decode (unexpected {image.dtype} image of shape {tuple(image.shape)})")
    return image  # as decoded: JPEG comes channels-last in memory, the layout the resize is fastest in


def read_rgb(path: str | Path, *, min_side: int | None = None) -> torch.Tensor:
    """(3, H, W) uint8 RGB from an image file. ImageDecodeError: a skip; ImageReadError (OSError): stop.

    ``min_side``: decode a large JPEG reduced, to no less than this shorter side (decode_rgb)."""
    return decode_rgb(read_bytes(path), min_side=min_side)


def _decode_reduced(data: torch.Tensor, scale: int) -> torch.Tensor:
    """A JPEG decoded at 1/``scale`` by libjpeg (PIL's draft), turned as its EXIF orientation says."""
    try:
        array = decode_with_pillow(data.numpy().tobytes(), scale)  # (H, W, 3)
    except (OSError, ValueError, SyntaxError) as err:  # PIL says "truncated", "broken data stream", ...
        reason = first_line(err, last=True)
        if "truncated" in reason.lower() or "premature" in reason.lower():
            raise ImageDecodeError(f"truncated image ({reason})") from None
        raise ImageDecodeError(f"cannot decode ({reason})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # channels-last in memory, as decode_jpeg gives


def stack_or_list(images: list[torch.Tensor], *, channels_last: bool = False) -> torch.Tensor | list[torch.Tensor]:
    """(3, H, W) images -> one (B, 3, H, W) tensor when they share a size, else the list (resized one by one).

    ``channels_last``: stacked as (B, H, W, 3) in memory (one copy), the layout the uint8 resize is fastest in.
    """
    if len({tuple(image.shape) for image in images}) != 1:
        return list(images)
    if channels_last:
        return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    return torch.stack(images)


def check_image(root: Path, rel: str, min_side: int | None = None) -> Skipped | None:
    """None when the image decodes, a Skipped when its content does not; a read error stops (UserError)."""
    try:
        read_rgb(root / rel, min_side=min_side)
    except ImageDecodeError as err:
        return Skipped(rel, str(err))
    except OSError as err:
        raise unreadable(root / rel, err) from None
    return None


def verify_images(root: Path, paths: list[str], *, workers: int = 4, progress: bool = True,
                  min_side: int | None = None) -> list[Skipped]:
    """Decode every image once (a large JPEG reduced to ``min_side``, as read_rgb); return the ones that fail, in order."""
    from tqdm import tqdm

    pool = ThreadPoolExecutor(max(1, workers))  # decoding releases the GIL
    try:
        results = pool.map(lambda rel: check_image(root, rel, min_side), paths, chunksize=64)
        return [r for r in tqdm(results, total=len(paths), desc="checking images", unit="img",
                                disable=not progress, leave=False) if r is not None]
    finally:
        pool.shutdown(cancel_futures=True)  # after a read error, do not decode the rest first


def enforce_skip_policy(skipped: list[Skipped], *, strict: bool) -> None:
    """Undecodable images are skipped and listed; with --strict the first one is an error."""
    if skipped and strict:
        first = skipped[0]
        raise UserError(f"{first.path}: {first.reason} ({len(skipped)} bad images in all); "
                        "remove or replace them, or drop --strict to skip them")
    for item in skipped:
        log.warning("skipping %s: %s", item.path, item.reason)
