"""What both decoders need to know about a JPEG before decoding it, torch-free: its size from the frame header,
the libjpeg scale-down (1/2, 1/4, 1/8) a large one is decoded at, and the floor that scale-down keeps to for a
preprocessing. Extraction and the torch runtime decode through PIL's ``draft`` (pipeline.common.images), the
torch-free runtimes through OpenCV's ``IMREAD_REDUCED_*`` (pipeline.common.sources): the same libjpeg scaling,
chosen by the same rule, so a photo gives every runtime the pixels its cached row was made from."""
from __future__ import annotations

SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame: they carry the size


def jpeg_size(data) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, or None when ``data`` (bytes, or a uint8 numpy array) is not a
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
            return (width, height) if width and height else None
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
