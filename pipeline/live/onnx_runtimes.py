"""The torch-free runtimes of the live classifier: an exported graph on ONNX Runtime or OpenCV's DNN module.

Both read ``classifier.onnx`` and its sidecar ``classifier.json`` (pipeline.live.export), preprocess frames
with the numpy port of the recorded preprocessing (pipeline.live.numpy_preprocess) and decode image files
with OpenCV (a large JPEG reduced as extraction decoded it). Nothing here imports torch: ``--runtime opencv``
needs only opencv-python and numpy.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from pipeline.common.errors import UserError, first_line
from pipeline.common.jpeg import decode_floor
from pipeline.common.names import ONNX_FORMAT
from pipeline.common.preprocess import Preprocess
from pipeline.common.sources import opencv_decoder, quiet_opencv
from pipeline.live.checks import check_memory, frame_bytes
from pipeline.live.classifier import ClassInfo
from pipeline.live.numpy_preprocess import TAPS, preprocess_frames

log = logging.getLogger(__name__)

INSTALL = "pip install -r requirements-deploy.txt"
EXPORT = "export it again with run_webcam.py --checkpoint best.pt --export classifier.onnx"
SIDECAR_KEYS = {"format": str, "version": str, "onnx_sha256": str, "input": str, "output": str, "num_classes": int,
                "class_wnids": list, "class_names": list, "preprocess": dict, "weights_spec": str}


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (the exported graph is hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sidecar(onnx_path: Path) -> dict:
    """The sidecar beside ``onnx_path``, checked field by field and against the graph's sha256."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"no exported graph at {onnx_path}; {EXPORT}")
    path = onnx_path.with_suffix(".json")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{onnx_path} has no sidecar {path} (its classes and preprocessing); {EXPORT}") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable sidecar ({first_line(err)}); {EXPORT}") from None
    if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        raise UserError(f"{path} is not the sidecar of an exported classifier (format {ONNX_FORMAT}); {EXPORT}")
    for key, kind in SIDECAR_KEYS.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise UserError(f"{path}: {key} is {meta.get(key)!r}, expected a {kind.__name__}; {EXPORT}")
    classes = meta["num_classes"]
    if (classes < 1 or len(meta["class_wnids"]) != classes or len(meta["class_names"]) != classes
            or not all(isinstance(name, str) for name in meta["class_wnids"] + meta["class_names"])):
        raise UserError(f"{path}: its {classes} classes and its class lists do not agree; {EXPORT}")
    if file_sha256(onnx_path) != meta["onnx_sha256"]:
        raise UserError(f"{path} describes another graph than {onnx_path} (its sha256 differs): the classes and "
                        f"preprocessing would be another head's; {EXPORT}")
    return meta


def sidecar_preprocess(meta: dict, path: Path) -> Preprocess:
    """The sidecar's preprocessing, checked: an RGB, NCHW float32 input of a sane size."""
    d = meta["preprocess"]
    try:
        preprocess = Preprocess.from_dict(d)
        ok = (d.get("channel_order", "RGB") == "RGB" and len(preprocess.mean) == 3 and len(preprocess.std) == 3
              and all(float(v) > 0 for v in preprocess.std) and 0 < preprocess.image_size <= 4096)
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: unusable preprocessing ({first_line(err)}); {EXPORT}") from None
    if not ok:
        raise UserError(f"{path}: unusable preprocessing {d!r}; {EXPORT}")
    if preprocess.interpolation not in TAPS:  # what the numpy port (pipeline.live.numpy_preprocess) resizes
        raise UserError(f"{path}: {preprocess.interpolation} resizing is not ported to the torch-free runtimes yet; "
                        "run this head with --checkpoint on torch")
    check_memory(preprocess, str(path))
    return preprocess


class OnnxClassifier:
    """An exported graph: frames -> the numpy preprocessing -> the runtime's forward -> probabilities."""

    runtime = ""

    def __init__(self, onnx_path: Path, meta: dict, preprocess: Preprocess):
        self.path, self.meta, self.preprocess = Path(onnx_path), meta, preprocess
        top1 = meta.get("metrics", {}).get("val_top1") if isinstance(meta.get("metrics"), dict) else None
        self.classes = ClassInfo(meta["class_wnids"], meta["class_names"],
                                 f"{self.path.name}: {meta['num_classes']} classes, val top-1 "
                                 f"{f'{top1:.2f}%' if isinstance(top1, (int, float)) else '?'}; exported backbone "
                                 f"{meta['weights_spec']}, on {self.runtime}", meta["weights_spec"])
        self.decode = opencv_decoder(min_side=decode_floor(preprocess))  # a large JPEG as extraction read it

    def per_frame_bytes(self, width: int, height: int) -> int:
        return frame_bytes(self.preprocess, width, height)

    def predict(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        probs = self.forward(preprocess_frames(self.preprocess, frames))
        if probs.shape != (len(frames), self.meta["num_classes"]):
            raise UserError(f"{self.path} gives {probs.shape[-1]} scores per frame, but its sidecar lists "
                            f"{self.meta['num_classes']} classes: the sidecar is another head's; {EXPORT}")
        return probs.astype(np.float32, copy=False)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class OnnxRuntimeClassifier(OnnxClassifier):
    runtime = "onnxruntime"

    def __init__(self, onnx_path: Path, meta: dict, preprocess: Preprocess):
        super().__init__(onnx_path, meta, preprocess)
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        try:
            self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own exception types
            raise UserError(f"ONNX Runtime cannot load {onnx_path} ({first_line(err)[:200]}); {EXPORT}") from None

    def forward(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.meta["output"]], {self.meta["input"]: batch})[0]


class OpenCVClassifier(OnnxClassifier):
    runtime = "opencv"

    def __init__(self, onnx_path: Path, meta: dict, preprocess: Preprocess):
        super().__init__(onnx_path, meta, preprocess)
        try:
            with quiet_opencv():
                self.net = cv2.dnn.readNetFromONNX(str(onnx_path))
        except cv2.error as err:
            raise UserError(f"OpenCV's DNN module cannot read {onnx_path} ({first_line(err, last=True)[:160]}); "
                            f"run it with --runtime onnxruntime ({INSTALL})") from None

    def forward(self, batch: np.ndarray) -> np.ndarray:
        try:
            self.net.setInput(batch)
            return self.net.forward()
        except cv2.error as err:
            raise UserError(f"OpenCV's DNN module cannot run {self.path} ({first_line(err, last=True)[:160]}); "
                            f"run it with --runtime onnxruntime ({INSTALL})") from None


def default_runtime() -> str:
    """ONNX Runtime when it is installed (the fastest and steadiest, measured in docs/deploy.md), else OpenCV."""
    return "onnxruntime" if onnxruntime_installed() else "opencv"


def onnx_classifier(onnx_path: Path, runtime: str | None) -> tuple[OnnxClassifier, dict[str, Path | None]]:
    """(the classifier of an exported graph on ``runtime``, its input files {option: path})."""
    runtime = runtime or default_runtime()
    if runtime == "onnxruntime" and not onnxruntime_installed():
        raise UserError(f"--runtime onnxruntime needs ONNX Runtime, which is not installed: {INSTALL} (or "
                        "pip install onnxruntime), or use --runtime opencv")
    meta = read_sidecar(onnx_path)
    preprocess = sidecar_preprocess(meta, Path(onnx_path).with_suffix(".json"))
    kind = OnnxRuntimeClassifier if runtime == "onnxruntime" else OpenCVClassifier
    classifier = kind(Path(onnx_path), meta, preprocess)
    return classifier, {"--onnx": Path(onnx_path), "--onnx sidecar": Path(onnx_path).with_suffix(".json")}
