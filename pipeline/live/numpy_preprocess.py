"""The recorded preprocessing (pipeline.common.preprocess) ported to numpy, bit for bit, for the torch-free runtimes.

On the CPU, torchvision resizes uint8 images with ATen's separable antialiased kernel (``UpSampleKernel.cpp``,
the uint8 path of ``interpolate(..., antialias=True)``; PIL's resampling, which it was ported from):

- per axis, PIL's filter weights in double (``_compute_indices_min_size_weights_aa``): output pixel i is centred
  at ``scale * (i + 0.5)`` with ``scale = in / out``; a triangle (bilinear) or Keys cubic with a = -0.5 (bicubic)
  whose support grows by ``scale`` when shrinking (the antialiasing); each row normalised by its running sum;
- the weights rounded to int16 fixed point (``_compute_index_ranges_int16_weights``), with the precision the
  largest that keeps the axis's largest weight below 2**15;
- a horizontal pass, then a vertical one, each skipped where that side keeps its size: int32 sums of int16
  weight x uint8 pixel, plus ``1 << (precision - 1)``, shifted right by the precision, clamped to 0..255 (the
  horizontal pass's result is uint8 again before the vertical pass reads it).

The same integer arithmetic here gives torchvision's bytes exactly (tests/test_deploy_preprocess.py), on up- and
down-scaling, for only the pixels the centre crop keeps. Then the mean/std in float32, as torch does.
``cv2.resize`` is no substitute: it does not antialias when it shrinks, and rounds differently.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

from pipeline.common.preprocess import Preprocess

TAPS = {"bilinear": 2, "bicubic": 4}  # ATen's interp_size: the filter's support at scale 1 is half of it


def _triangle(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic (a = -0.5), in the operation order of ATen's cubic_convolution1/2."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


FILTERS = {"bilinear": _triangle, "bicubic": _keys_cubic}


@functools.lru_cache(maxsize=64)
def axis_weights(in_size: int, out_size: int, interpolation: str = "bilinear") -> tuple[np.ndarray, np.ndarray, int]:
    """(indices (out, K) int64, weights (out, K) int32 fixed point, precision) of one axis, as ATen computes them.

    Taps past an output pixel's range have weight 0 and an index clipped into the image (read, never counted).
    """
    scale = in_size / out_size  # double, as area_pixel_compute_scale without align_corners or a scale factor
    support = TAPS[interpolation] * 0.5 * (scale if scale >= 1.0 else 1.0)
    taps = int(math.ceil(support)) * 2 + 1  # max_interp_size
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # C's cast truncates toward zero
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)
    xsize = np.clip(xmax - xmin, 0, taps)
    j = np.arange(taps)
    valid = j[None, :] < xsize[:, None]
    position = (xmin[:, None] + j[None, :]).astype(np.float64)
    weights = np.where(valid, FILTERS[interpolation]((position - center[:, None] + 0.5) * invscale), 0.0)
    total = np.zeros(out_size)
    for k in range(taps):  # summed in ATen's order: the float sum is not associative
        total += weights[:, k]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    wt_max = float(weights.max(initial=0.0))
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    fixed = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)  # C's (int) cast
    return np.minimum(xmin[:, None] + j[None, :], in_size - 1), fixed, precision


@functools.lru_cache(maxsize=64)
def _kept_taps(in_size: int, out_size: int, interpolation: str, start: int, count: int,
               channels: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(indices (K, count x channels), weights (K, count x channels), precision): the output pixels
    start..start+count of one axis, for a flattened (., size x channels) image; the taps no kept pixel uses dropped.
    """
    indices, weights, precision = axis_weights(in_size, out_size, interpolation)
    indices, weights = indices[start:start + count], weights[start:start + count]
    used = weights.any(axis=0)
    flat = indices[:, used].T[:, :, None] * channels + np.arange(channels)  # (K, count, channels)
    return flat.reshape(flat.shape[0], -1), np.repeat(weights[:, used].T, channels, axis=1), precision


def _pass(image: np.ndarray, indices: np.ndarray, weights: np.ndarray, precision: int) -> np.ndarray:
    """The horizontal pass over a (rows, width x channels) uint8 image -> (rows, kept x channels) uint8.

    A loop over the few taps (2 x the shrink factor + 1), each one gather and one integer multiply-add over the
    kept pixels: exact int32 arithmetic, as ATen's; far cheaper than a dense product over a whole row.
    """
    acc = np.full((image.shape[0], indices.shape[1]), 1 << (precision - 1), dtype=np.int32)
    term = np.empty_like(acc)
    for k in range(indices.shape[0]):
        acc += np.multiply(np.take(image, indices[k], axis=1), weights[k], out=term)
    return _to_uint8(acc, precision)


def _to_uint8(acc: np.ndarray, precision: int) -> np.ndarray:
    acc >>= precision  # arithmetic shift: floor, as C's >> on the int32 sum
    return np.clip(acc, 0, 255, out=acc).astype(np.uint8)


def resized_size(preprocess: Preprocess, height: int, width: int) -> tuple[int, int]:
    """(height, width) after the resize, as torchvision computes it (the shorter side to resize_size)."""
    if preprocess.mode == "resize":
        return preprocess.image_size, preprocess.image_size
    short, long = sorted((height, width))
    long_out = int(preprocess.resize_size * long / short)
    return (preprocess.resize_size, long_out) if height <= width else (long_out, preprocess.resize_size)


def resize_crop(preprocess: Preprocess, rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (S, S, 3) uint8: torchvision's resize and centre crop, computed only for the kept pixels."""
    height, width = rgb.shape[:2]
    out_h, out_w = resized_size(preprocess, height, width)
    side = preprocess.image_size
    top, left = int(round((out_h - side) / 2.0)), int(round((out_w - side) / 2.0))  # torchvision's center_crop
    if out_h != height:  # only the input rows the vertical pass reads go through the horizontal pass
        rows, row_weights, row_precision = _kept_taps(height, out_h, preprocess.interpolation, top, side, 1)
        first, last = int(rows.min()), int(rows.max()) + 1
        image = rgb[first:last]
    else:
        image = rgb[top:top + side]
    if out_w != width:
        columns, column_weights, column_precision = _kept_taps(width, out_w, preprocess.interpolation, left, side, 3)
        wide = _pass(image.reshape(image.shape[0], -1), columns, column_weights, column_precision)
    else:
        wide = np.ascontiguousarray(image[:, left:left + side]).reshape(image.shape[0], -1)
    if out_h != height:  # the vertical pass: rows are gathered whole, each scaled by its own weight
        acc = np.full((side, wide.shape[1]), 1 << (row_precision - 1), dtype=np.int32)
        term = np.empty_like(acc)
        for k in range(rows.shape[0]):
            acc += np.multiply(wide[rows[k] - first], row_weights[k][:, None], out=term)
        wide = _to_uint8(acc, row_precision)
    return wide.reshape(side, side, 3)


def preprocess_frames(preprocess: Preprocess, frames: Sequence[np.ndarray]) -> np.ndarray:
    """(H, W, 3) uint8 RGB frames (any sizes) -> (B, 3, S, S) float32 network input, normalised as torch does."""
    batch = np.stack([resize_crop(preprocess, frame) for frame in frames]).astype(np.float32)  # (B, S, S, 3)
    mean = np.asarray(preprocess.mean, np.float32) * np.float32(255)
    std = np.asarray(preprocess.std, np.float32) * np.float32(255)
    return np.ascontiguousarray(((batch - mean) / std).transpose(0, 3, 1, 2))
