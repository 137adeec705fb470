"""The head checkpoint: the one place that makes, saves, reads and checks it, and loads the head from it.

``read_checkpoint`` is its one reader and ``check_checkpoint`` its one validator: every rule a checkpoint must meet
(types, ranges, finite metrics and weights, shapes, preprocessing) is here, so the live runner and the export trust
what it returns; only the memory a frame needs is the live runner's own (pipeline.live.checks).

A checkpoint is a plain dict of tensors and primitives, so torch's weights-only loader reads it
(pipeline.common.torch_files). It carries everything the live runner needs: the head (an ``nn.Linear`` on raw
features), the classes, the backbone's weights spec and fingerprint, the preprocessing and the compute precision.
A head that reads its features L2-normalised (CLIP's zero-shot head) says so in ``l2_normalize``; a checkpoint
without the field reads raw features, as every checkpoint before it did.
"""
from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from features.atomic import write_atomic
from pipeline.common.errors import UserError, first_line
from pipeline.common.names import CHECKPOINT_FORMAT, PRECISIONS, PRETRAINED_SPECS
from pipeline.common.preprocess import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, MODES, Preprocess
from pipeline.common.torch_files import load_weights_only

READABLE_FORMATS = (CHECKPOINT_FORMAT, "fc7-linear-head/1")  # the stamp before heads on every layer: same file format
REQUIRED_KEYS = ("head", "num_classes", "feature_dim", "class_wnids", "class_names", "weights_spec",
                 "weights_fingerprint", "preprocess")
RETRAIN = "retrain the head with run_train_head.py"


def make_checkpoint(head_state: dict[str, torch.Tensor], *, metrics: dict, epoch: int, cache_attrs: dict,
                    wnids: list[str], names: list[str], config: dict, l2_normalize: bool = False) -> dict:
    """The checkpoint of a head trained on the cache described by ``cache_attrs`` (train.h5's attributes);
    ``l2_normalize``: the head reads its features scaled to unit L2 norm (recorded only then)."""
    extra = {key: cache_attrs[key] for key in ("weights_enum", "weights_file") if key in cache_attrs}
    if l2_normalize:
        extra["l2_normalize"] = True
    # how to rebuild the layer from the model's graph (a cache that records no spec of it: by its name, as AlexNet's)
    specs = {spec["name"]: spec for spec in json.loads(cache_attrs.get("layers_json", "[]"))}
    if cache_attrs["layer"] in specs:
        extra["layer_spec"] = specs[cache_attrs["layer"]]
    return {
        "format": CHECKPOINT_FORMAT,
        **extra,
        "head": head_state,  # nn.Linear(feature_dim, num_classes) state on raw features
        "num_classes": len(wnids),
        "feature_dim": int(cache_attrs["feature_dim"]),  # the width of ``layer``
        "class_wnids": list(wnids),
        "class_names": list(names),
        "backbone": cache_attrs["backbone"],
        "layer": cache_attrs["layer"],
        "weights_spec": cache_attrs["weights_spec"],
        "weights_fingerprint": cache_attrs["weights_fingerprint"],
        "preprocess": json.loads(cache_attrs["preprocess"]),
        "precision": cache_attrs["precision"],
        "precision_auto": "precision_auto" in cache_attrs,  # chosen by --precision auto: live may choose its own
        "config": config,
        "epoch": epoch,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write to a temporary name, then rename: a kill mid-write never leaves a truncated checkpoint.

    The checkpoint (a few MB) is serialized in memory first, so a full disk raises OSError (ENOSPC) from
    the write, not a RuntimeError from inside torch's zip writer.
    """
    path = Path(path)
    head = checkpoint.get("head", {})
    if not all(torch.isfinite(t).all() for t in head.values() if isinstance(t, torch.Tensor)):
        raise UserError(f"the head to be saved as {path} has NaN or Inf weights (training diverged); lower --lr")
    diverged = [name for name, value in checkpoint.get("metrics", {}).items() if not _is_number(value)]
    if diverged:
        raise UserError(f"the head to be saved as {path} has a NaN or Inf {diverged[0]} (training diverged); lower --lr")
    check_checkpoint(checkpoint, path)  # nothing is written that read_checkpoint would refuse
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    write_atomic(path, buffer.getvalue(), durable=True)


def read_checkpoint(path: str | Path, *, weights_given: bool = False) -> dict:
    """The checkpoint dict from run_train_head.py, checked (``check_checkpoint``): a missing, corrupt, foreign or
    damaged file is one UserError line. ``weights_given``: --weights replaces the recorded weights spec."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; train a head with run_train_head.py, or pass --checkpoint PATH")
    checkpoint = load_weights_only(path, "checkpoint", "pass a best.pt or last.pt written by run_train_head.py")
    check_checkpoint(checkpoint, path, weights_given=weights_given)
    return checkpoint


def check_checkpoint(checkpoint: object, path: Path, *, weights_given: bool = False) -> None:
    """Every rule a checkpoint must meet before anything is built from it: its stamp and keys, each field's exact
    type and range (finite metrics among them), the head's shape against its classes and layer, the recorded
    weights spec (unless ``weights_given``) and the preprocessing. One UserError line naming the file and the field.
    """
    if not isinstance(checkpoint, dict) or "format" not in checkpoint:
        raise UserError(f"{path} is not a head checkpoint from run_train_head.py (it has no 'format' entry)")
    if checkpoint["format"] not in READABLE_FORMATS:
        raise UserError(f"{path} has checkpoint format {checkpoint['format']!r}, expected {CHECKPOINT_FORMAT!r}; "
                        "retrain the head with this version of run_train_head.py")
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise UserError(f"{path} is incomplete: it lacks {', '.join(missing)}; {RETRAIN}")
    check_fields(path, checkpoint)
    _check_head(path, checkpoint)
    if not weights_given:
        _check_weights_spec(path, checkpoint["weights_spec"])
    check_preprocess(checkpoint["preprocess"], path)


def _check_head(path: Path, checkpoint: dict) -> None:
    """The head is a (num_classes, width of its layer) linear layer with one class name per output, all finite."""
    layer, dim, classes = checkpoint.get("layer", "fc7"), layer_dim(path, checkpoint), checkpoint["num_classes"]
    weight, bias = checkpoint["head"]["weight"], checkpoint["head"]["bias"]  # float tensors (FIELD_CHECKS)
    if not (tuple(weight.shape) == (classes, checkpoint["feature_dim"]) and tuple(bias.shape) == (classes,)
            and checkpoint["feature_dim"] == dim
            and len(checkpoint["class_wnids"]) == classes and len(checkpoint["class_names"]) == classes):
        raise UserError(f"{path} is inconsistent: its head, class lists and sizes do not agree "
                        f"(expected a {dim} -> {classes} linear head on {layer}); {RETRAIN}")
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise UserError(f"{path} holds a head with NaN or Inf weights (its training diverged); {RETRAIN} "
                        "(a lower --lr)")


def is_recorded_spec(spec: str) -> bool:
    """Whether a cache's or checkpoint's weights_spec is one a backbone records (pipeline.backbones.weights):
    imagenet, pretrained, random:seed=N, file:PATH, or an exact torchvision enum."""
    return (spec in PRETRAINED_SPECS or re.fullmatch(r"random:seed=\d+", spec) is not None or spec.startswith("file:")
            or re.fullmatch(r"\w+_Weights\.\w+", spec) is not None)


def _check_weights_spec(path: Path, spec: str) -> None:
    """The recorded backbone weights are of a kind the backbone package rebuilds."""
    if not is_recorded_spec(spec):
        raise UserError(f"{path}: weights_spec is {spec!r}, not a recorded backbone (imagenet, pretrained, "
                        f"random:seed=N, file:PATH or a torchvision weights name); {RETRAIN}, or pass --weights with "
                        "the backbone used for extraction")


def layer_dim(path: Path, checkpoint: dict) -> int:
    """The width of the layer the head reads, as its ``layer_spec`` records it; a checkpoint made before layer specs
    were recorded (AlexNet's) is checked against its backbone's layer when the backbone is rebuilt."""
    layer = checkpoint.get("layer", "fc7")
    if "layer_spec" not in checkpoint:
        return checkpoint["feature_dim"]
    spec = checkpoint["layer_spec"]
    if not (isinstance(spec, dict) and all(isinstance(spec.get(k), str) for k in ("name", "node", "reduction"))
            and _is_int(spec.get("dim")) and spec["dim"] > 0 and spec["name"] == layer):
        raise UserError(f"{path} holds a {checkpoint.get('backbone', 'backbone')} head without a usable layer_spec for "
                        f"{layer!r} (its graph node, reduction and width); {RETRAIN}")
    return spec["dim"]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite int or float: NaN and Inf are no measurement, and no size."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# each field a checkpoint may hold: its check, and what it must be (said in the one line naming it)
FIELD_CHECKS = {
    "num_classes": (lambda v: _is_int(v) and v >= 1, "a whole number of classes, at least 1"),
    "feature_dim": (lambda v: _is_int(v) and v > 0, "a positive whole number"),
    "class_wnids": (_strings, "a list of strings"),
    "class_names": (_strings, "a list of strings"),
    "weights_spec": (lambda v: isinstance(v, str), "a string"),
    "weights_fingerprint": (lambda v: isinstance(v, str), "a string"),
    "preprocess": (lambda v: isinstance(v, dict), "a dict of preprocessing settings"),
    "layer": (lambda v: isinstance(v, str), "a layer name"),
    "backbone": (lambda v: isinstance(v, str) and bool(v), "a backbone name"),
    "weights_enum": (lambda v: isinstance(v, str), "a string"),
    "precision": (lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "precision_auto": (lambda v: isinstance(v, bool), "true or false"),
    "l2_normalize": (lambda v: isinstance(v, bool), "true or false"),
    "epoch": (lambda v: _is_int(v) and v >= 0, "a whole number, 0 or more"),
    "metrics": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_number(x) for k, x in v.items()),
                "a dict of finite numbers"),
    "config": (lambda v: isinstance(v, dict), "a dict"),
    "head": (lambda v: isinstance(v, dict) and set(v) == {"weight", "bias"}
             and all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in v.values()),
             "a Linear layer's state (a float 'weight' and 'bias')"),
}


def check_fields(path: Path, checkpoint: dict) -> None:
    """Each field present has its exact type and range; else one line naming the file and the field."""
    for name, (ok, what) in FIELD_CHECKS.items():
        if name in checkpoint and not ok(checkpoint[name]):
            value = checkpoint[name]
            shown = type(value).__name__ if not isinstance(value, (int, float, str)) else repr(value)[:60]
            if name == "metrics" and isinstance(value, dict):  # name the entry that is not a number
                bad = next(((k, x) for k, x in value.items() if not (isinstance(k, str) and _is_number(x))), None)
                shown = f"{bad[0]!r}: {bad[1]!r}"[:60] if bad else shown
            raise UserError(f"{path}: field {name!r} must be {what}, got {shown}; the checkpoint is damaged or not "
                            "from run_train_head.py: retrain the head")


def check_preprocess(d: dict, path: Path) -> Preprocess:
    """The recorded preprocessing, each field of the exact type and range every reader relies on (sizes from
    MIN_IMAGE_SIZE to MAX_IMAGE_SIZE, three finite means, three positive stds, RGB); returns it."""
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
    if d.get("color", "RGB") != "RGB":
        raise UserError(f"{path} expects {d['color']!r} input; every reader feeds RGB; {RETRAIN}")
    try:
        return Preprocess.from_dict(d)
    except (AttributeError, KeyError, TypeError, ValueError) as err:  # an interpolation no backbone uses
        raise UserError(f"{path} has unusable preprocessing settings ({first_line(err)}); {RETRAIN}") from None


def head_normalizes(checkpoint: dict) -> bool:
    """Whether the head reads its layer's features L2-normalised (a zero-shot head); absent: raw features."""
    return checkpoint.get("l2_normalize", False)


def load_head(checkpoint: dict) -> nn.Linear:
    """The checkpoint's head as an fp32 ``nn.Linear(feature_dim, num_classes)`` on the CPU, in eval mode (on
    L2-normalised features where ``head_normalizes``: its caller applies that)."""
    head = nn.Linear(checkpoint["feature_dim"], checkpoint["num_classes"])
    head.load_state_dict({"weight": checkpoint["head"]["weight"].float(), "bias": checkpoint["head"]["bias"].float()})
    head.requires_grad_(False)
    return head.eval()


def checkpoint_preprocess(checkpoint: dict) -> Preprocess:
    return Preprocess.from_dict(checkpoint["preprocess"])
