"""What the live runner checks before it allocates anything: a checkpoint's fields, and the memory a frame needs.

``read_checkpoint`` (pipeline.common.checkpoint) checks what every reader needs; these are the fields the live
runner itself uses (class lists, metrics, preprocessing sizes), each with its exact type and range, so a
damaged or hostile checkpoint is one line, never a traceback or a process that grows until it is killed.
Torch-free: the memory estimate is shared with the torch-free runtimes.
"""
from __future__ import annotations

import math

from pipeline.backbones.weights import is_recorded_spec
from pipeline.common.errors import UserError
from pipeline.common.hardware import available_memory
from pipeline.common.preprocess import MODES, Preprocess

NETWORK_BYTES_PER_FRAME = 8 * 2**20  # activations of one frame through AlexNet at 224 px, with headroom
REFERENCE_SIZE = 224  # the side NETWORK_BYTES_PER_FRAME is measured at; activations grow with its square
# the input sides a checkpoint may record: far above any backbone's training size (224-518), far below a runaway
# allocation; each backbone's own smallest input is checked when it is rebuilt (pipeline.backbones.rebuild)
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 4096
RETRAIN = "retrain the head with run_train_head.py"


def frame_bytes(preprocess: Preprocess, width: int, height: int) -> int:
    """Bytes one (width x height) frame needs: its copies (BGR, RGB, canvas, output), the resized image in
    float32 and the network's activations at the recorded input size."""
    short = max(1, min(width, height)) if width and height else 1
    resized = preprocess.resize_size * preprocess.resize_size * max(width, height, 1) // short
    network = NETWORK_BYTES_PER_FRAME * max(1.0, (preprocess.image_size / REFERENCE_SIZE) ** 2)
    return int(width * height * 3 * 4 + resized * 3 * 4 + network)


def check_memory(preprocess: Preprocess, what: str) -> None:
    """Refuse, before any allocation, a preprocessing whose single frame would not fit in the memory available."""
    need, available = frame_bytes(preprocess, 0, 0), available_memory()
    if available and need > available // 2:
        raise UserError(f"{what} asks for {preprocess.image_size} px inputs: one frame needs about "
                        f"{need / 2**30:.1f} GiB, and {available / 2**30:.1f} GiB is available; {RETRAIN} at a "
                        f"smaller --image-size")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_preprocess(d, path) -> Preprocess:
    """The recorded preprocessing, each field of the exact type and range the runner relies on."""
    if not isinstance(d, dict):
        raise UserError(f"{path}: preprocess is {type(d).__name__}, expected a dict; {RETRAIN}")
    for key in ("image_size", "resize_size"):
        if not _is_int(d.get(key)) or not MIN_IMAGE_SIZE <= d[key] <= MAX_IMAGE_SIZE:
            raise UserError(f"{path}: preprocess {key} is {d.get(key)!r}, expected a whole number from "
                            f"{MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}; {RETRAIN}")
    if d["resize_size"] < d["image_size"] or d.get("mode") not in MODES:
        raise UserError(f"{path}: preprocess has mode {d.get('mode')!r} and resize_size {d['resize_size']} < "
                        f"image_size {d['image_size']} (expected mode {' or '.join(MODES)} and resize_size >= "
                        f"image_size); {RETRAIN}")
    for key in ("mean", "std"):
        values = d.get(key)
        if not (isinstance(values, (list, tuple)) and len(values) == 3 and all(map(_is_number, values))
                and (key == "mean" or all(v > 0 for v in values))):
            raise UserError(f"{path}: preprocess {key} is {values!r}, expected 3 finite numbers"
                            f"{' above 0' if key == 'std' else ''}; {RETRAIN}")
    return Preprocess.from_dict(d)


def check_checkpoint_fields(checkpoint: dict, path, *, weights_given: bool = False) -> Preprocess:
    """The fields the live runner uses, checked (after read_checkpoint); returns the checked Preprocess.

    ``weights_given``: --weights names the backbone, so the recorded spec is not used (only its fingerprint).
    """
    classes = checkpoint["num_classes"]
    if not _is_int(classes) or classes < 1:
        raise UserError(f"{path}: num_classes is {classes!r}, expected at least 1; there is nothing to classify "
                        f"into; {RETRAIN} on a cache with classes")
    for key in ("class_wnids", "class_names"):
        values = checkpoint[key]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise UserError(f"{path}: {key} is not a list of strings; {RETRAIN}")
    for key in ("weights_spec", "weights_fingerprint", "layer", "precision"):
        if key in checkpoint and not isinstance(checkpoint[key], str):
            raise UserError(f"{path}: {key} is {type(checkpoint[key]).__name__} {checkpoint[key]!r}, expected a "
                            f"string; {RETRAIN}")
    spec = checkpoint["weights_spec"]
    if not weights_given and not is_recorded_spec(spec):
        raise UserError(f"{path}: weights_spec is {spec!r}, not a recorded backbone (imagenet, pretrained, "
                        f"random:seed=N or file:PATH); {RETRAIN}, or pass --weights with the backbone used for extraction")
    metrics = checkpoint.get("metrics", {})
    if not isinstance(metrics, dict):
        raise UserError(f"{path}: metrics is {type(metrics).__name__}, expected a dict of numbers; {RETRAIN}")
    for key, value in metrics.items():
        if not _is_number(value):
            raise UserError(f"{path}: metrics {key} is {value!r}, expected a finite number; {RETRAIN}")
    if "epoch" in checkpoint and not _is_int(checkpoint["epoch"]):
        raise UserError(f"{path}: epoch is {checkpoint['epoch']!r}, expected a whole number; {RETRAIN}")
    preprocess = check_preprocess(checkpoint["preprocess"], path)
    check_memory(preprocess, str(path))
    return preprocess
