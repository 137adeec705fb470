"""The recorded preprocessing (pipeline.common.preprocess) ported to numpy, for the torch-free runtimes.

torchvision resizes uint8 images with PIL's antialiased bilinear filter: a triangle filter whose support
grows with the shrink factor, applied horizontally, then vertically. ``cv2.resize`` does
not antialias when it shrinks (INTER_LINEAR reads 2 pixels of the 4-8 that one output pixel covers), so the
filter is computed here from the same formula (PIL's ``precompute_coeffs``), as per-axis weight tables over
the pixels a centre crop keeps, in float32, rounded once. It matches the torch path within one level per pixel
(float weights against torchvision's fixed-point ones), on up- and down-scaling alike. Then centre crop and mean/std as torch does.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from pipeline.common.preprocess import Preprocess


@functools.lru_cache(maxsize=64)
def filter_taps(in_size: int, out_size: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, weights), each (count, K): output pixels start..start+count of an in_size -> out_size resize."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)  # shrinking widens the triangle: the antialiasing
    support = filter_scale  # bilinear: support 1, times the filter scale
    centers = (np.arange(start, start + count) + 0.5) * scale
    first = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    last = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    taps = int((last - first).max())
    indices = first[:, None] + np.arange(taps)[None, :]  # (count, K)
    weights = np.maximum(0.0, 1.0 - np.abs((indices - centers[:, None] + 0.5) / filter_scale))
    weights[indices >= last[:, None]] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    return np.minimum(indices, in_size - 1), weights.astype(np.float32)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(values + 0.5), 0, 255).astype(np.uint8)  # rounded once, after both passes


def _filter(image: np.ndarray, indices: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """Sum over the K taps of weights x the pixels they index along ``axis`` (0: rows, 1: columns); float32.

    A loop over the few taps (K ~ 2 x shrink factor + 1), each one gather and one multiply-add over the kept
    pixels: cheaper than a dense matrix product over a whole row of the frame.
    """
    shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
    out = None
    for k in range(indices.shape[1]):
        term = np.take(image, indices[:, k], axis=axis) * weights[:, k].reshape(shape)
        out = term if out is None else np.add(out, term, out=out)
    return out


def resized_size(preprocess: Preprocess, height: int, width: int) -> tuple[int, int]:
    """(height, width) after the resize, as torchvision computes it (the shorter side to resize_size)."""
    if preprocess.mode == "resize":
        return preprocess.image_size, preprocess.image_size
    short, long = sorted((height, width))
    long_out = int(preprocess.resize_size * long / short)
    return (preprocess.resize_size, long_out) if height <= width else (long_out, preprocess.resize_size)


def resize_crop(preprocess: Preprocess, rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (S, S, 3) uint8: the resize and centre crop, computed only for the kept pixels."""
    height, width = rgb.shape[:2]
    out_h, out_w = resized_size(preprocess, height, width)
    side = preprocess.image_size
    top, left = int(round((out_h - side) / 2.0)), int(round((out_w - side) / 2.0))  # torchvision's center_crop
    columns, column_weights = filter_taps(width, out_w, left, side)
    rows, row_weights = filter_taps(height, out_h, top, side)
    wide = rgb[:, left:left + side] if out_w == width else _filter(rgb, columns, column_weights, axis=1)  # (H, S, 3)
    if out_h == height:
        return _to_uint8(wide[top:top + side]) if wide.dtype != np.uint8 else np.ascontiguousarray(wide[top:top + side])
    return _to_uint8(_filter(wide.astype(np.float32, copy=False), rows, row_weights, axis=0))


def preprocess_frames(preprocess: Preprocess, frames: Sequence[np.ndarray]) -> np.ndarray:
    """(H, W, 3) uint8 RGB frames (any sizes) -> (B, 3, S, S) float32 network input, normalised as torch does."""
    batch = np.stack([resize_crop(preprocess, frame) for frame in frames]).astype(np.float32)  # (B, S, S, 3)
    mean = np.asarray(preprocess.mean, np.float32) * 255
    std = np.asarray(preprocess.std, np.float32) * 255
    return np.ascontiguousarray(((batch - mean) / std).transpose(0, 3, 1, 2))
