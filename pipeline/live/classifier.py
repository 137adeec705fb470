"""What the live loop needs from a classifier, whatever runs it: torch, ONNX Runtime or OpenCV's DNN. Torch-free.

A classifier maps (H, W, 3) uint8 RGB frames to (B, C) float32 class probabilities (numpy), and says which
classes those are and how it decodes image files. The loop (pipeline.live.runner) knows nothing else, so a
torch-free runtime (pipeline.live.onnx_runtimes) plugs in beside the torch one (pipeline.live.torch_classifier).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from pipeline.common.config import RUNTIMES  # noqa: F401  (re-exported: the runtimes a Classifier comes from)
from pipeline.live.sources import Decoder



@dataclass(frozen=True)
class ClassInfo:
    """The classes a classifier scores, in its output order, and what the log line says about it."""

    wnids: list[str]
    names: list[str]
    description: str  # e.g. "head: 10 classes, epoch 3, val top-1 41.00%; backbone imagenet on cpu"
    weights_spec: str  # the backbone's weights as recorded: random ones get a warning on every frame


class Classifier(Protocol):
    """Frames in, probabilities out."""

    classes: ClassInfo
    decode: Decoder  # how this runtime reads image files (the torch one: exactly as extraction did)

    def predict(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """(H, W, 3) uint8 RGB frames (any sizes) -> (B, C) float32 probabilities, in order."""
        ...

    def per_frame_bytes(self, width: int, height: int) -> int:
        """Memory one frame of this size needs through the network (the batch size is fitted to it)."""
        ...
