"""The memory one frame needs, checked before the live runner or an export allocates anything. Torch-free.

Every field of a checkpoint is checked by its one reader (pipeline.common.checkpoint), and an exported graph's by
its sidecar's (pipeline.live.sidecar); what is left is the live runtimes' own question: whether a frame at the
recorded input size fits in the memory there is. The estimate is shared by every runtime.
"""
from __future__ import annotations

from pipeline.common.errors import UserError
from pipeline.common.hardware import available_memory
from pipeline.common.preprocess import Preprocess

NETWORK_BYTES_PER_FRAME = 8 * 2**20  # activations of one frame through AlexNet at 224 px, with headroom
REFERENCE_SIZE = 224  # the side NETWORK_BYTES_PER_FRAME is measured at; activations grow with its square


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
                        f"{need / 2**30:.1f} GiB, and {available / 2**30:.1f} GiB is available; retrain the head "
                        "with run_train_head.py at a smaller --image-size")
