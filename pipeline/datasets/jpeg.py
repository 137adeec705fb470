"""What both decoders need to know about a JPEG before decoding it, torch-free: its size and colour components
from the frame header, the libjpeg scale-down (1/2, 1/4, 1/8) a large one is decoded at, and the floor that
scale-down keeps to for a preprocessing. Extraction and the torch runtime decode through PIL's ``draft``
(pipeline.datasets.images), the torch-free runtimes through OpenCV's ``IMREAD_REDUCED_*`` (pipeline.live.sources):
the same libjpeg scaling, chosen by the same rule, so a photo gives every runtime the pixels its cached row was
made from. A CMYK JPEG is the exception: OpenCV's CMYK -> RGB differs from torchvision's and Pillow's by a level
on almost every pixel, so every runtime decodes those with Pillow (``decode_with_pillow``), as extraction does.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import numpy as np

SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame: they carry the size


EXIF_ORIENTATION = 0x0112  # the EXIF tag; its value -> the PIL transpose that undoes it (as ImageOps.exif_transpose)
EXIF_TURNS = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}  # FLIP_LEFT_RIGHT 0, FLIP_TOP_BOTTOM 1, ROTATE_90 2,
# ROTATE_180 3, ROTATE_270 4, TRANSPOSE 5, TRANSVERSE 6 (Image.Transpose values)


class JpegFrame(NamedTuple):
    width: int
    height: int
    components: int  # 1 grey, 3 YCbCr (or RGB), 4 CMYK (Adobe-inverted or not) or YCCK (libjpeg turns it into CMYK)


def jpeg_size(data) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, or None when ``data`` (bytes, or a uint8 numpy array) is not a
    JPEG (or has none)."""
    frame = jpeg_frame(data)
    return None if frame is None else (frame.width, frame.height)


def jpeg_frame(data) -> JpegFrame | None:
    """The frame header's size and component count, or None when ``data`` (bytes, or a uint8 numpy array) is not a
    JPEG (or has none)."""
    raw = memoryview(data).cast("B")  # indexing gives ints: ~2 us per 64 px JPEG, against 5.5 through numpy scalars
    if len(raw) < 2 or raw[0] != 0xFF or raw[1] != 0xD8:
        return None
    position, end = 2, len(raw) - 9
    while position < end:
        if raw[position] != 0xFF:
            return None
        marker = raw[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in SOF_MARKERS:
            height = (raw[position + 5] << 8) | raw[position + 6]
            width = (raw[position + 7] << 8) | raw[position + 8]
            return JpegFrame(width, height, raw[position + 9]) if width and height else None
        position += 2 + ((raw[position + 2] << 8) | raw[position + 3])
    return None


def reduction(size: tuple[int, int] | None, min_side: int) -> int:
    """The largest JPEG scale-down (8, 4, 2, or 1: none) that keeps the shorter side >= ``min_side``."""
    if size is None:
        return 1
    shorter = min(size)
    return next((scale for scale in (8, 4, 2) if -(-shorter // scale) >= min_side), 1)


def draft_scale(size: tuple[int, int] | None, min_side: int) -> int:
    """The scale a JPEG of ``size`` is really decoded at for ``min_side`` (1: in full).

    Extraction asks PIL's ``draft`` for the size reduction() gives, rounded up, and PIL takes the largest libjpeg
    scale that fits both sides into that: a side the scale does not divide gets the next smaller scale (4101 x 4333
    at 1/8 asks for 513 x 542; 4101 // 513 = 7, so 1/4). The OpenCV runtimes decode at this scale, so both see the
    same pixels."""
    scale = reduction(size, min_side)
    if scale == 1:
        return 1
    width, height = size
    fits = min(width // -(-width // scale), height // -(-height // scale))
    return next(s for s in (8, 4, 2, 1) if fits >= s)


def decode_floor(preprocess) -> int:
    """The smallest shorter side a reduced decode may give for ``preprocess`` (a Preprocess): twice the side
    the resize makes (the shorter side in "crop" mode, the whole square in "resize" mode)."""
    return 2 * (preprocess.resize_size if preprocess.mode == "crop" else preprocess.image_size)


def decode_with_pillow(data: bytes, scale: int = 1) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a JPEG decoded by Pillow, turned as its EXIF orientation says; ``scale`` > 1: reduced
    by libjpeg through PIL's ``draft``, which takes the largest scale that fits both sides into 1/``scale`` of
    them (draft_scale). Pillow's CMYK -> RGB (Adobe-inverted, rounded) is torchvision's, byte for byte.

    Raises what Pillow raises on bad data (OSError, ValueError, SyntaxError), and ImportError without Pillow.
    """
    import numpy as np
    from PIL import Image  # imported here: the torch-free runtimes need Pillow for CMYK JPEGs only

    with Image.open(io.BytesIO(data)) as image:
        if scale > 1:
            width, height = image.size
            image.draft("RGB", (-(-width // scale), -(-height // scale)))
        turn = EXIF_TURNS.get(image.getexif().get(EXIF_ORIENTATION, 1))
        rgb = image.convert("RGB")
        return np.asarray(rgb.transpose(turn) if turn is not None else rgb)
