"""The torch-free runtimes of the live classifier: an exported graph on ONNX Runtime or OpenCV's DNN module.

Both read ``classifier.onnx`` and its sidecar ``classifier.json``, checked against each other (pipeline.live.sidecar),
preprocess frames with the numpy port of the recorded preprocessing (pipeline.live.numpy_preprocess) and decode
image files with OpenCV (a large JPEG reduced as extraction decoded it). Nothing here imports torch:
``--runtime opencv`` needs only opencv-python and numpy.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from pipeline.common.errors import UserError, first_line
from pipeline.datasets.jpeg import decode_floor
from pipeline.common.preprocess import Preprocess
from pipeline.live.sources import opencv_decoder, quiet_opencv
from pipeline.live.checks import frame_bytes
from pipeline.live.classifier import ClassInfo
from pipeline.live.numpy_preprocess import preprocess_frames
from pipeline.live.onnx_proto import read_graph_header
from pipeline.live.sidecar import EXPORT, read_export, sidecar_path

log = logging.getLogger(__name__)

INSTALL = "pip install -r requirements-deploy.txt"


def onnxruntime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


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


# operators whose subgraph (torch's exact GELU: Div, Erf, Add, Mul, Mul) makes OpenCV's ONNX reader end the process
# with a segmentation fault (OpenCV 5.1, measured), instead of raising cv2.error
CRASHES_OPENCV = frozenset({"Erf"})


class OpenCVClassifier(OnnxClassifier):
    runtime = "opencv"

    def __init__(self, onnx_path: Path, meta: dict, preprocess: Preprocess):
        super().__init__(onnx_path, meta, preprocess)
        crashing = sorted(CRASHES_OPENCV & read_graph_header(onnx_path).op_types)
        if crashing:  # checked before OpenCV reads the graph: reading it would end the process
            raise UserError(f"{onnx_path} uses {', '.join(crashing)} (exact GELU: ViT, Swin, ConvNeXt), which OpenCV "
                            f"{cv2.__version__}'s DNN module crashes on; run it with --runtime onnxruntime ({INSTALL})")
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
    meta, preprocess = read_export(onnx_path)  # the graph's facts, the sidecar checked against them
    kind = OnnxRuntimeClassifier if runtime == "onnxruntime" else OpenCVClassifier
    classifier = kind(Path(onnx_path), meta, preprocess)
    return classifier, {"--onnx": Path(onnx_path), "--onnx sidecar": sidecar_path(onnx_path)}
