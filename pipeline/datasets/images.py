"""Decoding image files to 8-bit RGB tensors, and the skip policy for ones that will not decode.

Two kinds of failure, kept apart on purpose:

- ``ImageDecodeError``: the bytes were read but are not a usable image (empty, truncated, not an image,
  a format the decoder does not know, more elongated than preprocess.MAX_ASPECT_RATIO). The file is skipped,
  counted and listed.
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
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torchvision.io import ImageReadMode, decode_image

from pipeline.common.errors import UserError, first_line
from pipeline.datasets.jpeg import decode_with_pillow, jpeg_size, reduction
from pipeline.datasets.packs import PackDamaged
# stack_or_list lives beside the resize it batches for; extraction imports it from here too
from pipeline.common.preprocess import aspect_problem, stack_or_list  # noqa: F401

log = logging.getLogger(__name__)


class ImageDecodeError(Exception):
    """An image file that is empty, truncated or not an image; the message is the reason."""


# torchvision's C++ checks prefix their message with the function and its build's source location:
# "decode_jpeg, /__w/vision/.../decode_jpeg.cpp:171, Image is incomplete or truncated"
SOURCE_LOCATION = re.compile(r"^\s*\w+,\s*\S+\.(?:c|cc|cpp|cxx|h|hpp):\d+,\s*|\s*\S+\.(?:c|cc|cpp|cxx|h|hpp):\d+,?")


def decoder_words(err: BaseException) -> str:
    """A decoder's message for a person: its last line, without a C++ function and source location."""
    return SOURCE_LOCATION.sub("", first_line(err, last=True)).strip() or type(err).__name__


def decode_error(reason: str) -> ImageDecodeError:
    """The skip for content that does not decode: "truncated image (...)" or "cannot decode (...)"."""
    truncated = "truncated" in reason.lower() or "premature" in reason.lower()
    return ImageDecodeError(f"{'truncated image' if truncated else 'cannot decode'} ({reason})")


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


def read_bytes(path: str | Path, read: Callable[[str], bytes] | None = None) -> torch.Tensor:
    """The file's bytes as a 1-d uint8 tensor (what decode_image takes). Raises ImageReadError.

    ``read``: reads ``path`` (a dataset's read_bytes: a pack's sample) in place of opening the file; a pack's
    PackDamaged passes through."""
    try:
        if read is not None:
            data = read(str(path))
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as err:
        raise ImageReadError(err.errno, err.strerror or first_line(err), str(path)) from err
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def decode_rgb(data: torch.Tensor, *, min_side: int | None = None) -> torch.Tensor:
    """(3, H, W) uint8 RGB from encoded bytes, whatever the suffix says, turned as its EXIF orientation says.

    JPEG (also grayscale or CMYK), PNG (also 16-bit: scaled to 8 bits as torchvision's to_dtype does, by
    dropping the low byte), WebP and GIF (an animation gives its first frame). Anything else raises
    ImageDecodeError with the reason, and so does an image too elongated to preprocess (aspect_problem). ``min_side``: a JPEG whose shorter side is at least twice this is
    decoded at 1/2, 1/4 or 1/8 scale, the smallest whose shorter side is still >= ``min_side``.
    """
    if data.numel() == 0:
        raise ImageDecodeError("empty file")
    scale = reduction(jpeg_size(data.numpy()), min_side) if min_side else 1
    image = _decode_reduced(data, scale) if scale > 1 else _decode_full(data)
    problem = aspect_problem(*image.shape[1:])  # a listed skip: the resize would not fit in memory
    if problem:
        raise ImageDecodeError(problem)
    return image


def _decode_full(data: torch.Tensor) -> torch.Tensor:
    """torchvision's decode of the whole image, turned as its EXIF orientation says; 16-bit PNG to 8 bits."""
    try:
        image = decode_image(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except (RuntimeError, ValueError) as err:
        reason = decoder_words(err)
        if "unsupported image file" in reason.lower():
            raise ImageDecodeError("cannot decode (not a format the decoder reads: JPEG, PNG, WebP, GIF; "
                                   "convert it to JPEG)") from None
        raise decode_error(reason) from None
    if image.ndim == 4:  # an animated GIF: (frames, 3, H, W)
        if image.shape[0] == 0:
            raise ImageDecodeError("animation with no frames")
        image = image[0]
    if image.dtype == torch.uint16:  # 16-bit PNG: 0..65535 -> 0..255 (uint16 has no shift on the CPU)
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ImageDecodeError(f"cannot decode (unexpected {image.dtype} image of shape {tuple(image.shape)})")
    return image  # as decoded: JPEG comes channels-last in memory, the layout the resize is fastest in


def read_rgb(path: str | Path, *, min_side: int | None = None, read: Callable[[str], bytes] | None = None) -> torch.Tensor:
    """(3, H, W) uint8 RGB from an image file. ImageDecodeError: a skip; ImageReadError (OSError): stop.

    ``min_side``: decode a large JPEG reduced, to no less than this shorter side (decode_rgb). ``read``: as
    read_bytes."""
    return decode_rgb(read_bytes(path) if read is None else read_bytes(path, read), min_side=min_side)


def _decode_reduced(data: torch.Tensor, scale: int) -> torch.Tensor:
    """A JPEG decoded at 1/``scale`` by libjpeg (PIL's draft), turned as its EXIF orientation says."""
    try:
        array = decode_with_pillow(data.numpy().tobytes(), scale)  # (H, W, 3)
    except (OSError, ValueError, SyntaxError) as err:  # PIL says "truncated", "broken data stream", ...
        raise decode_error(decoder_words(err)) from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # channels-last in memory, as decode_jpeg gives


def check_image(root: Path, rel: str, min_side: int | None = None,
                read: Callable[[str], bytes] | None = None) -> Skipped | None:
    """None when the image decodes, a Skipped when its content does not; a read error stops (UserError), and so
    does a damaged pack shard. ``read``: the dataset's read_bytes, which takes ``rel``."""
    try:
        read_rgb(rel if read is not None else root / rel, min_side=min_side, read=read)
    except ImageDecodeError as err:
        return Skipped(rel, str(err))
    except OSError as err:
        raise unreadable(root / rel, err) from None
    except PackDamaged as err:
        raise UserError(str(err)) from None
    return None


def verify_images(root: Path, paths: list[str], *, workers: int = 4, progress: bool = True,
                  min_side: int | None = None, read: Callable[[str], bytes] | None = None) -> list[Skipped]:
    """Decode every image once (a large JPEG reduced to ``min_side``, as read_rgb); return the ones that fail, in order.
    ``read``: the dataset's read_bytes (a pack's samples)."""
    from tqdm import tqdm

    pool = ThreadPoolExecutor(max(1, workers))  # decoding releases the GIL
    try:
        results = pool.map(lambda rel: check_image(root, rel, min_side, read), paths, chunksize=64)
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
