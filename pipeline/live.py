"""The live runner: the trained head on the frozen backbone, applied frame by frame to a camera or a file.

The checkpoint written by run_train_head.py holds everything needed: the head (an ``nn.Linear`` on raw
fc7), the class wnids and names, the preprocessing and the backbone's weights spec and fingerprint.
The backbone is rebuilt from that spec (or ``--weights``) and must have the recorded fingerprint, so a
head is never run on features of another backbone. Every frame goes through the same ``Preprocess``
as extraction, and the fc7 -> head split is kept (fc7 under the extraction precision, the head in
fp32), so an image gives the probabilities that ``softmax(head(cached fc7))`` gives for it.

Sources are a camera index, a video file, an image file or a folder of images. Camera and video frames
come from OpenCV as BGR and are converted to RGB; image files are decoded with ``pipeline.images.read_rgb``
exactly as extraction decodes them.

Frames of a video file, image or folder are classified in batches of ``batch_frames`` (default 8): at
batch 1 fc6/fc7 are memory-bound (218 MB of weights read per frame), a batch reads them once for all its
frames. The results are per frame and in frame order as at batch 1 (smoothing, overlay, video, predictions
line); a frame's ``latency_ms`` is the batch's model time divided by the frames in it. A camera is always
read one frame at a time: there latency matters, and the camera's own frame rate caps the FPS anyway.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import deque
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from models import FC7_DIM, AlexNetClassifier
from pipeline.backbone import load_backbone, resolve_device
from pipeline.errors import UserError
from pipeline.images import ImageDecodeError, read_rgb
from pipeline.preprocess import Preprocess

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fc7-linear-head/1"  # pipeline.train_head.CHECKPOINT_FORMAT (not imported: it pulls in h5py)
REQUIRED_KEYS = ("head", "num_classes", "feature_dim", "class_wnids", "class_names", "weights_spec",
                 "weights_fingerprint", "preprocess")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_FPS = 30.0  # output video frame rate when the source has none (camera without one, images)
CAMERA_RETRIES = 3  # consecutive failed reads before a camera counts as stopped
MIN_VIEW_SIDE = 360  # smaller frames (Tiny ImageNet's 64x64) are enlarged for display and the output video
STATUS_SECONDS = 2.0  # headless without outputs: how often a status line is logged
QUIT_KEYS = (ord("q"), ord("Q"), 27)  # q or Esc
DEFAULT_BATCH_FRAMES = 8  # frames per forward pass for video files, images and folders (cameras: always 1)


@dataclass
class LiveConfig:
    checkpoint: Path = Path("runs/head/best.pt")
    weights: str | None = None  # None: the checkpoint's weights_spec
    seed: int = 0  # for weights="random"
    device: str = "auto"
    source: str = "0"  # camera index, video file, image file or folder of images
    width: int | None = None  # requested camera resolution
    height: int | None = None
    top_k: int = 3
    smooth: int = 1  # average the probabilities over the last N frames
    display: bool | None = None  # None: show a window when a display is present
    output: Path | None = None  # annotated video (mp4v)
    predictions: Path | None = None  # one JSON line per frame
    max_frames: int | None = None
    batch_frames: int | None = None  # frames per forward pass; None: DEFAULT_BATCH_FRAMES, a camera always 1
    window: str = "fc7 live"


# ---------------------------------------------------------------------------------------------
# The classifier


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_reason(err: BaseException) -> str:
    """torch.load's complaint, shortened to its gist (its weights-only message is paragraphs of advice)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        detail = [line.strip() for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()]
        return f"holds more than tensors and plain values, or is damaged: {detail[0] if detail else 'unpickling failed'}"
    return _reason(err).split(". ")[0][:160]


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict from run_train_head.py, checked: a missing, corrupt or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; train a head with run_train_head.py, or pass --checkpoint PATH")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling, zip and EOF errors alike
        raise UserError(f"{path} is not a readable checkpoint ({_load_reason(err)}); "
                        "pass a best.pt or last.pt written by run_train_head.py") from None
    if not isinstance(checkpoint, dict) or "format" not in checkpoint:
        raise UserError(f"{path} is not a head checkpoint from run_train_head.py (it has no 'format' entry)")
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise UserError(f"{path} has checkpoint format {checkpoint['format']!r}, expected {CHECKPOINT_FORMAT!r}; "
                        "retrain the head with this version of run_train_head.py")
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise UserError(f"{path} is incomplete: it lacks {', '.join(missing)}; retrain the head with run_train_head.py")
    if checkpoint.get("layer", "fc7") != "fc7":
        raise UserError(f"{path} holds a head for layer {checkpoint['layer']!r}; the live runner uses fc7")
    head, classes = checkpoint["head"], checkpoint["num_classes"]
    weight = head.get("weight") if isinstance(head, dict) else None
    bias = head.get("bias") if isinstance(head, dict) else None
    if not (isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
            and tuple(weight.shape) == (classes, checkpoint["feature_dim"]) and tuple(bias.shape) == (classes,)
            and checkpoint["feature_dim"] == FC7_DIM
            and len(checkpoint["class_wnids"]) == classes and len(checkpoint["class_names"]) == classes):
        raise UserError(f"{path} is inconsistent: its head, class lists and sizes do not agree "
                        f"(expected a {FC7_DIM} -> {classes} linear head); retrain the head with run_train_head.py")
    if checkpoint.get("precision", "fp32") not in PRECISIONS:
        raise UserError(f"{path} records an unknown precision {checkpoint['precision']!r}")
    try:
        Preprocess.from_dict(checkpoint["preprocess"])
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path} has unusable preprocessing settings ({_reason(err)}); retrain the head") from None
    if checkpoint["preprocess"].get("color", "RGB") != "RGB":
        raise UserError(f"{path} expects {checkpoint['preprocess']['color']} input; the live runner feeds RGB")
    return checkpoint


def build_classifier(checkpoint: dict, *, weights: str | None = None, seed: int = 0,
                     device: torch.device | str = "cpu") -> AlexNetClassifier:
    """Backbone (from the checkpoint's weights spec, or ``weights``) + head, in eval mode on ``device``.

    The backbone's fingerprint must be the one recorded in the checkpoint, else a UserError.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    spec = weights if weights is not None else checkpoint["weights_spec"]
    backbone, recorded, fingerprint = load_backbone(spec, seed=seed)
    if fingerprint != checkpoint["weights_fingerprint"]:
        trained_on = f"{checkpoint['weights_spec']!r} (fingerprint {checkpoint['weights_fingerprint'][:12]})"
        if weights is not None:
            raise UserError(f"--weights {recorded} gives a backbone with fingerprint {fingerprint[:12]}, but the head was "
                            f"trained on features of {trained_on}; pass the weights used for extraction, or drop --weights")
        raise UserError(f"the backbone weights {recorded} now have fingerprint {fingerprint[:12]}, but the head was "
                        f"trained on features of {trained_on}; pass --weights with the backbone used for extraction")
    head = nn.Linear(checkpoint["feature_dim"], checkpoint["num_classes"])
    head.load_state_dict({"weight": checkpoint["head"]["weight"].float(), "bias": checkpoint["head"]["bias"].float()})
    model = AlexNetClassifier(backbone, head)
    model.backbone.to(device, memory_format=torch.channels_last)  # as extraction runs it
    model.head.to(device)
    model.requires_grad_(False)
    return model.eval()


def load_classifier(checkpoint_path: str | Path, weights: str | None = None, device: torch.device | str = "cpu", *,
                    seed: int = 0) -> tuple[AlexNetClassifier, dict, Preprocess]:
    """(model in eval mode on ``device``, the checked checkpoint dict, its Preprocess)."""
    checkpoint = read_checkpoint(checkpoint_path)
    model = build_classifier(checkpoint, weights=weights, seed=seed, device=device)
    return model, checkpoint, Preprocess.from_dict(checkpoint["preprocess"])


def _batch(images: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """(3, H, W) uint8 images -> a (B, 3, H, W) channels_last batch when they have one size, else a list."""
    if len(images) == 1:
        return images[0][None].to(device, non_blocking=True)  # a view: a frame's (3, H, W) is already HWC in memory
    if len({tuple(image.shape) for image in images}) == 1:
        # stacked as (B, H, W, 3): interleaved pixels, the layout Preprocess resizes in, one copy
        hwc = torch.stack([image.permute(1, 2, 0) for image in images])
        return hwc.to(device, non_blocking=True).permute(0, 3, 1, 2)
    return [image.to(device, non_blocking=True) for image in images]  # mixed sizes (a folder): resized one by one


@torch.inference_mode()
def predict_frames(model: AlexNetClassifier, preprocess: Preprocess, images: Sequence[torch.Tensor], *,
                   precision: str = "fp32") -> torch.Tensor:
    """(3, H, W) RGB uint8 images (any sizes) -> (B, C) float32 class probabilities on the CPU, in order.

    fc7 is computed as extraction computed it (same preprocessing, same autocast precision) for the whole
    batch in one backbone pass, and the head runs in fp32 on it, as it did on the cached features.
    """
    if not len(images):
        raise ValueError("predict_frames needs at least one image")
    device = model.head.weight.device
    x = preprocess(_batch(images, device))  # (B, 3, S, S) float, channels_last
    dtype = PRECISIONS[precision]
    with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
        fc7 = model.backbone(x)
    logits = model.head(fc7.float())
    return torch.softmax(logits, dim=1).cpu()


def predict_frame(model: AlexNetClassifier, preprocess: Preprocess, rgb: torch.Tensor, *,
                  precision: str = "fp32") -> torch.Tensor:
    """(3, H, W) RGB uint8 -> (C,) float32 class probabilities on the CPU: ``predict_frames`` on one image."""
    return predict_frames(model, preprocess, [rgb], precision=precision)[0]


class Smoother:
    """The mean of the last ``n`` probability vectors (n=1: the current frame's)."""

    def __init__(self, n: int):
        self.window: deque[torch.Tensor] = deque(maxlen=max(1, n))

    def __call__(self, probs: torch.Tensor) -> torch.Tensor:
        if self.window.maxlen == 1:
            return probs
        self.window.append(probs)
        return torch.stack(tuple(self.window)).mean(0)  # (n, C): tiny, and no drift from a running sum


def top_k(probs: torch.Tensor, k: int, wnids: list[str], names: list[str]) -> list[dict]:
    values, indices = probs.topk(min(k, probs.numel()))
    return [{"wnid": wnids[i], "name": names[i], "prob": p} for p, i in zip(values.tolist(), indices.tolist())]


# ---------------------------------------------------------------------------------------------
# Frame sources


@dataclass
class Frame:
    label: str  # the "source" of the predictions line: image path, camera index or video path
    rgb: torch.Tensor  # (3, H, W) uint8 RGB: what the network sees
    bgr: np.ndarray  # (H, W, 3) uint8 BGR: what is drawn on


def open_capture(target: int | str) -> cv2.VideoCapture:
    """cv2.VideoCapture, with OpenCV's own warnings muted (a failed open is reported as one clear line)."""
    with _quiet_opencv():
        return cv2.VideoCapture(target)


@contextmanager
def _quiet_opencv():
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def bgr_to_frame(label: str, bgr: np.ndarray) -> Frame:
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # (H, W, 3) contiguous
    return Frame(label, torch.from_numpy(rgb).permute(2, 0, 1), bgr)  # a (3, H, W) view, no copy


def rgb_to_frame(label: str, rgb: torch.Tensor) -> Frame:
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb.permute(1, 2, 0).numpy()), cv2.COLOR_RGB2BGR)
    return Frame(label, rgb, bgr)


class FrameSource:
    """Iterate for Frames; release() frees the device or file. ``fps`` is None when unknown."""

    label: str = ""
    fps: float | None = None
    still: bool = False  # still images: a window waits for a key on each one
    camera: bool = False  # a live camera: classified one frame at a time, never batched

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def release(self) -> None:
        pass


class CaptureSource(FrameSource):
    """A camera or a video file read with cv2.VideoCapture."""

    def __init__(self, capture, label: str, *, camera: bool):
        self.capture, self.label, self.camera = capture, label, camera
        fps = capture.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and 0 < fps < 1000 else None
        self.frames = 0
        self.stopped = False  # a camera that stopped delivering frames

    def _read(self) -> np.ndarray | None:
        tries = CAMERA_RETRIES if self.camera and self.frames else 1  # a video's end is final at once
        for attempt in range(tries):
            ok, bgr = self.capture.read()
            if ok and bgr is not None:
                return bgr
            if attempt + 1 < tries:
                time.sleep(0.05)
        return None

    def __iter__(self) -> Iterator[Frame]:
        while True:
            bgr = self._read()
            if bgr is None:
                break
            if bgr.ndim == 2:
                bgr = cv2.cvtColor(bgr, cv2.COLOR_GRAY2BGR)
            elif bgr.shape[2] == 4:
                bgr = cv2.cvtColor(bgr, cv2.COLOR_BGRA2BGR)
            self.frames += 1
            yield bgr_to_frame(self.label, bgr)
        if self.camera:
            if not self.frames:
                raise UserError(f"camera {self.label} opened but delivered no frames; is another program using it? "
                                "Try another --source index")
            self.stopped = True
            log.warning("camera %s stopped delivering frames after %d frames; stopping", self.label, self.frames)
        elif not self.frames:
            raise UserError(f"cannot read any frame from video {self.label}; it is empty, damaged, "
                            "or in a codec this OpenCV build cannot decode")
        else:
            log.info("end of video %s after %d frames", self.label, self.frames)

    def release(self) -> None:
        self.capture.release()


class ImageSource(FrameSource):
    """Image files, decoded to RGB with pipeline.images.read_rgb as extraction decodes them."""

    still = True

    def __init__(self, paths: list[Path], label: str, *, folder: bool):
        self.paths, self.label, self.folder = paths, label, folder

    def __iter__(self) -> Iterator[Frame]:
        good = 0
        for path in self.paths:
            try:
                rgb = read_rgb(path)
            except (ImageDecodeError, OSError) as err:
                if not self.folder:
                    raise UserError(f"cannot read image {path}: {err}") from None
                log.warning("skipping %s: %s", path, err)
                continue
            good += 1
            yield rgb_to_frame(str(path), rgb)
        if self.folder and not good:
            raise UserError(f"none of the {len(self.paths)} images in {self.label} could be read")


def open_source(source: str, *, width: int | None = None, height: int | None = None) -> FrameSource:
    """A camera index ("0"), a video file, an image file or a folder of images."""
    text = str(source).strip()
    if text.isdigit():
        index = int(text)
        capture = open_capture(index)
        if not capture.isOpened():
            capture.release()
            raise UserError(f"cannot open camera {index} (no camera with that index, or it is in use); "
                            "pass --source with another camera index, a video file, an image or a folder")
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, width), (cv2.CAP_PROP_FRAME_HEIGHT, height)):
            if value:
                capture.set(prop, value)
        capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a queue of stale ones (if supported)
        got = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        if (width and got[0] != width) or (height and got[1] != height):
            log.warning("camera %d gives %dx%d, not the requested %sx%s", index, got[0], got[1], width or "-", height or "-")
        log.info("camera %d: %dx%d", index, *got)
        return CaptureSource(capture, str(index), camera=True)
    if width or height:
        log.warning("--width/--height apply to cameras only; ignored for %s", text)
    path = Path(text).expanduser()
    if path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
        log.info("%s: %d images", path, len(paths))
        return ImageSource(paths, str(path), folder=True)
    if not path.is_file():
        raise UserError(f"no such file or folder: {path}; --source takes a camera index, a video, an image or a folder")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageSource([path], str(path), folder=False)
    capture = open_capture(str(path))
    if not capture.isOpened():
        capture.release()
        raise UserError(f"cannot open video {path}: it is not a video, is damaged, "
                        "or uses a codec this OpenCV build cannot decode")
    source = CaptureSource(capture, str(path), camera=False)
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    log.info("video %s: %s frames at %s fps", path, count if count > 0 else "?", f"{source.fps:g}" if source.fps else "?")
    return source


# ---------------------------------------------------------------------------------------------
# Drawing, display and outputs


def view(bgr: np.ndarray, min_side: int = MIN_VIEW_SIDE) -> np.ndarray:
    """The canvas to draw on: the frame itself, or an enlarged copy of a small one."""
    h, w = bgr.shape[:2]
    if min(h, w) >= min_side:
        return bgr
    scale = min_side / min(h, w)
    return cv2.resize(bgr, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_NEAREST)


def annotate(bgr: np.ndarray, topk: list[dict], fps: float | None) -> np.ndarray:
    """Draw the top-k names with probabilities and the FPS on ``bgr`` (in place) over a dark box; return it."""
    h, w = bgr.shape[:2]
    scale = max(0.45, min(h, w) / 800)
    thickness = 1 if scale < 0.7 else 2
    font = cv2.FONT_HERSHEY_SIMPLEX
    lines = [f"{i}. {t['name'][:32]}  {100 * t['prob']:5.1f}%" for i, t in enumerate(topk, 1)]
    lines.append(f"FPS {fps:5.1f}" if fps else "FPS   -")
    sizes = [cv2.getTextSize(line, font, scale, thickness) for line in lines]
    line_h = max(s[0][1] + s[1] for s in sizes) + int(8 * scale)
    pad = int(8 * scale) + 2
    box_w = min(w, max(s[0][0] for s in sizes) + 2 * pad)
    box_h = min(h, line_h * len(lines) + 2 * pad)
    roi = bgr[:box_h, :box_w]
    roi >>= 2  # a dark box (a quarter of the brightness) keeps the text legible on any frame
    y = pad
    for line, (_, baseline) in zip(lines, sizes):
        y += line_h
        cv2.putText(bgr, line, (pad, y - baseline - 2), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return bgr


def _opencv_has_gui() -> bool:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GUI:"):
            return line.split(":", 1)[1].strip().upper() not in ("NONE", "NO")
    return True


def display_available() -> bool:
    """A window can be shown: macOS or Windows, or DISPLAY / WAYLAND_DISPLAY set, and an OpenCV with a GUI."""
    if sys.platform == "darwin" or sys.platform.startswith("win"):
        screen = True
    else:
        screen = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return screen and _opencv_has_gui()


class Display:
    """The window: cv2.imshow / waitKey / destroyAllWindows, looked up at call time so tests can replace them."""

    def __init__(self, window: str):
        self.window = window
        self.shown = False

    def show(self, image: np.ndarray) -> None:
        cv2.imshow(self.window, image)
        self.shown = True

    def key(self, delay_ms: int) -> int:
        """The key pressed within ``delay_ms`` (0: wait for one) as 0-255, or -1."""
        key = cv2.waitKey(delay_ms)
        return -1 if key < 0 else key & 0xFF

    def closed(self) -> bool:
        """The user closed the window with its close button."""
        try:
            return self.shown and cv2.getWindowProperty(self.window, cv2.WND_PROP_VISIBLE) < 1
        except cv2.error:
            return False

    def close(self) -> None:
        try:
            cv2.destroyAllWindows()
            cv2.waitKey(1)  # lets HighGUI process the destroy on platforms that need an event turn
        except cv2.error:  # no window was ever shown (the GUI failed to start)
            pass


class VideoOutput:
    """The annotated video: opened on the first frame (its size), mp4v; later frames are fitted to that size."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = Path(path), fps
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None
        self.frames = 0

    def write(self, bgr: np.ndarray) -> None:
        if self.writer is None:
            self.size = (bgr.shape[1], bgr.shape[0])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _quiet_opencv():
                self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size)
            if not self.writer.isOpened():
                raise UserError(f"cannot write video {self.path} (mp4v at {self.size[0]}x{self.size[1]}); "
                                "use an .mp4 name in a writable folder")
            log.info("writing %s (%dx%d, %g fps)", self.path, *self.size, self.fps)
        if (bgr.shape[1], bgr.shape[0]) != self.size:
            bgr = cv2.resize(bgr, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(bgr)
        self.frames += 1

    def release(self) -> None:
        if self.writer is not None:
            self.writer.release()


# ---------------------------------------------------------------------------------------------
# The loop


def _check_config(config: LiveConfig) -> None:
    if config.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {config.top_k}")
    if config.smooth < 1:
        raise UserError(f"--smooth must be at least 1, got {config.smooth}")
    if config.max_frames is not None and config.max_frames < 1:
        raise UserError(f"--max-frames must be at least 1, got {config.max_frames}")
    if config.batch_frames is not None and config.batch_frames < 1:
        raise UserError(f"--batch-frames must be at least 1, got {config.batch_frames}")
    for name, value in (("--width", config.width), ("--height", config.height)):
        if value is not None and value <= 0:
            raise UserError(f"{name} must be positive, got {value}")


def batch_frames(config: LiveConfig, source: FrameSource) -> int:
    """Frames per forward pass: 1 for a camera, else --batch-frames (default DEFAULT_BATCH_FRAMES)."""
    if source.camera:
        if config.batch_frames and config.batch_frames > 1:
            log.info("camera %s: classifying one frame at a time (--batch-frames applies to files and folders)",
                     source.label)
        return 1
    return config.batch_frames or DEFAULT_BATCH_FRAMES


def run_live(config: LiveConfig, *, source: FrameSource | None = None, display: Display | None = None) -> dict:
    """Classify frames until the source ends, --max-frames, q/Esc or a closed window. Returns a summary.

    Frames are read and classified ``batch_frames(config, source)`` at a time, then handled one by one in
    order. The summary's ``frame_ms`` (wall time per frame, reading and outputs included) and
    ``latencies_ms`` (model time per frame) are per frame; in a batch each frame gets the batch's time
    divided by its frames. ``source`` and ``display`` replace the ones ``config`` describes (benchmarks, tests).
    """
    _check_config(config)
    device = resolve_device(config.device)
    checkpoint = read_checkpoint(config.checkpoint)  # cheap checks before the camera is opened
    wnids, names = list(checkpoint["class_wnids"]), list(checkpoint["class_names"])
    precision = checkpoint.get("precision", "fp32")
    summary = {"frames": 0, "seconds": 0.0, "fps": None, "latency_ms": None, "stopped_by": "end",
               "frame_ms": [], "latencies_ms": []}
    with ExitStack() as stack:
        if source is None:
            source = open_source(config.source, width=config.width, height=config.height)
        stack.callback(source.release)
        model = build_classifier(checkpoint, weights=config.weights, seed=config.seed, device=device)
        preprocess = Preprocess.from_dict(checkpoint["preprocess"])
        batch_size = batch_frames(config, source)
        if config.max_frames:
            batch_size = min(batch_size, config.max_frames)
        if isinstance(source, ImageSource):
            batch_size = min(batch_size, len(source.paths))  # one image: no batch-8 warm-up
        blank = torch.zeros(3, preprocess.image_size, preprocess.image_size, dtype=torch.uint8)
        predict_frames(model, preprocess, [blank] * batch_size,
                       precision=precision)  # warm-up: the first pass builds the CPU kernels' plans for this batch
        log.info("head: %d classes, epoch %s, val top-1 %s; backbone %s on %s", len(wnids), checkpoint.get("epoch", "?"),
                 f"{checkpoint['metrics']['val_top1']:.2f}%" if "val_top1" in checkpoint.get("metrics", {}) else "?",
                 config.weights or checkpoint["weights_spec"], device)

        show = config.display
        if show is None:
            show = display is not None or display_available()
            if not show:
                log.info("no display found (DISPLAY/WAYLAND_DISPLAY unset, or OpenCV without a GUI): running headless; "
                         "pass --no-display to say so")
        if show:
            display = display or Display(config.window)
            stack.callback(display.close)
        output = None
        if config.output:
            output = VideoOutput(config.output, source.fps or DEFAULT_FPS)
            stack.callback(output.release)
        predictions = None
        if config.predictions:
            config.predictions.parent.mkdir(parents=True, exist_ok=True)
            predictions = stack.enter_context(open(config.predictions, "w", buffering=1))  # line-buffered
        status = not show and output is None and predictions is None

        smoother = Smoother(config.smooth)
        fps = None  # shown on each frame: frames per second of wall time, over the batches before it
        seconds_per_frame = None  # its running mean (exponential, 0.9 per frame)
        stream = iter(source)
        index = 0
        start = last_status = time.perf_counter()
        last = None
        while True:
            wanted = batch_size if not config.max_frames else min(batch_size, config.max_frames - index)
            batch = list(islice(stream, wanted))  # fewer at the end of the source
            if not batch:
                break
            t0 = time.perf_counter()
            probs = predict_frames(model, preprocess, [frame.rgb for frame in batch], precision=precision)
            latency = (time.perf_counter() - t0) * 1000 / len(batch)  # the batch's model time, shared by its frames
            done = 0
            for frame, frame_probs in zip(batch, probs):
                best = top_k(smoother(frame_probs), config.top_k, wnids, names)
                if show or output is not None:
                    canvas = annotate(view(frame.bgr), best, fps)
                    if output is not None:
                        output.write(canvas)
                if predictions is not None:
                    predictions.write(json.dumps({"frame": index, "source": frame.label, "topk": best,
                                                  "latency_ms": round(latency, 3)}) + "\n")
                summary["latencies_ms"].append(latency)
                index += 1
                done += 1
                summary["frames"] = index
                if status and time.perf_counter() - last_status >= STATUS_SECONDS:
                    last_status = time.perf_counter()
                    log.info("frame %d: %s %.1f%% (%s fps)", index - 1, best[0]["name"], 100 * best[0]["prob"],
                             f"{fps:.1f}" if fps else "-")
                if show:
                    try:
                        display.show(canvas)
                    except cv2.error as err:
                        log.warning("cannot show a window (%s); continuing headless", _reason(err))
                        show = False
                    if show and (display.key(0 if source.still else 1) in QUIT_KEYS or display.closed()):
                        summary["stopped_by"] = "quit"  # the rest of the batch is dropped unseen
                        break
            now = time.perf_counter()
            per_frame = (now - (last if last is not None else t0)) / done  # batch to batch, reading included
            last = now
            summary["frame_ms"].extend([per_frame * 1000] * done)
            weight = 0.9 ** done
            seconds_per_frame = (per_frame if seconds_per_frame is None
                                 else weight * seconds_per_frame + (1 - weight) * per_frame)
            fps = 1 / max(seconds_per_frame, 1e-9)
            if summary["stopped_by"] == "quit":
                break
            if config.max_frames and index >= config.max_frames:
                summary["stopped_by"] = "max-frames"
                break
        if getattr(source, "stopped", False):
            summary["stopped_by"] = "camera stopped"
        summary["seconds"] = time.perf_counter() - start
    frames = summary["frames"]
    if frames:
        summary["fps"] = frames / summary["seconds"] if summary["seconds"] > 0 else None
        summary["latency_ms"] = float(np.mean(summary["latencies_ms"]))
        log.info("%d frames in %.1f s (%.1f fps), model latency %.1f ms per frame (%s)", frames, summary["seconds"],
                 summary["fps"] or 0, summary["latency_ms"], summary["stopped_by"])
    for path in (config.output, config.predictions):
        if path:
            log.info("wrote %s", path)
    return summary
