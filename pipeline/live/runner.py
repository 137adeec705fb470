"""The live runner: the trained head on the frozen backbone, applied frame by frame to a camera or a file.

The checkpoint written by run_train_head.py holds everything needed: the head (an ``nn.Linear`` on raw
fc7), the class wnids and names, the preprocessing and the backbone's weights spec and fingerprint.
The backbone is rebuilt from that spec (or ``--weights``) and must have the recorded fingerprint, so a
head is never run on features of another backbone. Every frame goes through the same ``Preprocess``
as extraction, and the fc7 -> head split is kept (fc7 under the extraction precision, the head in
fp32), so an image gives the probabilities that ``softmax(head(cached fc7))`` gives for it.

Sources (pipeline.common.sources) are a camera index, a video file, an image file or a folder of images; the
overlay, window and output video are in pipeline.live.overlay.

Frames of a video file, image or folder are classified in batches of ``batch_frames`` (default 8): at
batch 1 fc6/fc7 are memory-bound (218 MB of weights read per frame), a batch reads them once for all its
frames. The results are per frame and in frame order as at batch 1 (smoothing, overlay, video, predictions
line); a frame's ``latency_ms`` is the batch's model time divided by the frames in it. A camera is always
read one frame at a time: there latency matters, and the camera's own frame rate caps the FPS anyway.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch

from models import AlexNetClassifier
from pipeline.common.backbone import load_backbone, place_backbone, resolve_device
from pipeline.common.checkpoint import checkpoint_preprocess, load_head, read_checkpoint
from pipeline.common.config import LiveConfig
from pipeline.common.errors import UserError, first_line
from pipeline.common.hardware import available_memory
from pipeline.common.images import stack_or_list
from pipeline.live.overlay import (Display, PredictionsOutput, VideoOutput, annotate, check_output_paths, display_available,
                              view)
from pipeline.common.preprocess import Preprocess
from pipeline.common.sources import CaptureSource, FrameSource, ImageSource, open_source
from pipeline.common.weights import describe_weights, is_random, weights_file

log = logging.getLogger(__name__)

DEFAULT_FPS = 30.0  # output video frame rate when the source has none (camera without one, images)
STATUS_SECONDS = 2.0  # headless without outputs: how often a status line is logged
QUIT_KEYS = (ord("q"), ord("Q"), 27)  # q or Esc
DEFAULT_BATCH_FRAMES = 8  # frames per forward pass for video files, images and folders (cameras: always 1)
NETWORK_BYTES_PER_FRAME = 8 * 2**20  # activations of one frame through AlexNet at 224 px, with headroom
RANDOM_WARNING = "RANDOM BACKBONE (test only)"  # drawn on every frame when the backbone has random weights


@dataclass
class LiveSummary:
    """What a live run did. Per-frame lists: in a batch each frame gets the batch's time over its frames."""

    frames: int = 0
    seconds: float = 0.0
    fps: float | None = None  # frames per second of wall time
    latency_ms: float | None = None  # mean model time per frame
    stopped_by: str = "end"  # end, quit, max-frames, camera stopped, SIGTERM
    frame_ms: list[float] = field(default_factory=list)  # wall time per frame, reading and outputs included
    latencies_ms: list[float] = field(default_factory=list)  # model time per frame


# ---------------------------------------------------------------------------------------------
# The classifier


def build_classifier(checkpoint: dict, *, weights: str | None = None, seed: int = 0,
                     device: torch.device | str = "cpu") -> AlexNetClassifier:
    """Backbone (from the checkpoint's weights spec, or ``weights``) + head, in eval mode on ``device``.

    The backbone's fingerprint must be the one recorded in the checkpoint, else a UserError. It is placed
    as extraction places it (channels_last, weights cast once to the recorded precision, the same math
    flags), so a frame gives the fc7 the cache holds for it.
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
    backbone.output = checkpoint.get("layer", "fc7")  # the layer the head was trained on
    backbone = place_backbone(backbone, device, checkpoint.get("precision", "fp32"))
    return AlexNetClassifier(backbone, load_head(checkpoint).to(device)).eval()


def load_classifier(checkpoint_path: str | Path, weights: str | None = None, device: torch.device | str = "cpu", *,
                    seed: int = 0) -> tuple[AlexNetClassifier, dict, Preprocess]:
    """(model in eval mode on ``device``, the checked checkpoint dict, its Preprocess)."""
    checkpoint = read_checkpoint(checkpoint_path)
    model = build_classifier(checkpoint, weights=weights, seed=seed, device=device)
    return model, checkpoint, checkpoint_preprocess(checkpoint)


def _batch(images: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """(3, H, W) uint8 images -> a (B, 3, H, W) channels_last batch when they have one size, else a list."""
    if len(images) == 1:
        return images[0][None].to(device, non_blocking=True)  # a view: a frame's (3, H, W) is already HWC in memory
    batch = stack_or_list(list(images), channels_last=True)  # interleaved pixels: the layout Preprocess resizes in
    if isinstance(batch, list):  # mixed sizes (a folder): resized one by one
        return [image.to(device, non_blocking=True) for image in batch]
    return batch.to(device, non_blocking=True)


@torch.inference_mode()
def predict_frames(model: AlexNetClassifier, preprocess: Preprocess, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(3, H, W) RGB uint8 images (any sizes) -> (B, C) float32 class probabilities on the CPU, in order.

    One pass of ``model`` over the batch: fc7 as extraction computed it (same preprocessing, same
    compute dtype), then the head in fp32, as it ran on the cached features.
    """
    if not len(images):
        raise ValueError("predict_frames needs at least one image")
    device = model.head.weight.device
    x = preprocess(_batch(images, device))  # (B, 3, S, S) float32, channels_last
    return torch.softmax(model(x), dim=1).cpu()


def predict_frame(model: AlexNetClassifier, preprocess: Preprocess, rgb: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB uint8 -> (C,) float32 class probabilities on the CPU: ``predict_frames`` on one image."""
    return predict_frames(model, preprocess, [rgb])[0]


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
# The loop


def batch_frames(config: LiveConfig, source: FrameSource) -> int:
    """Frames per forward pass: 1 for a camera, else --batch-frames (default DEFAULT_BATCH_FRAMES), lowered
    when a batch of the video's frames would not fit in half the available memory."""
    if source.camera:
        if config.batch_frames and config.batch_frames > 1:
            log.info("camera %s: classifying one frame at a time (--batch-frames applies to files and folders)",
                     source.label)
        return 1
    batch = config.batch_frames or DEFAULT_BATCH_FRAMES
    size = source.frame_size() if isinstance(source, CaptureSource) else None
    available = available_memory()
    if size and available:
        per_frame = size[0] * size[1] * 3 * 4 + NETWORK_BYTES_PER_FRAME  # BGR, RGB, canvas and output copies
        fits = max(1, int(0.5 * available // per_frame))
        if batch > fits:
            log.warning("--batch-frames %d: %d frames of %dx%d do not fit in the memory available (%.1f GiB); "
                        "using %d", batch, batch, *size, available / 2**30, fits)
            batch = fits
    return batch


def _input_files(config: LiveConfig, checkpoint: dict) -> tuple[dict[str, Path | None], Path | None]:
    """The files a run reads ({option: path}) and the --source folder, for check_output_paths."""
    weights = weights_file(describe_weights(config.weights or checkpoint["weights_spec"], config.seed))
    text = str(config.source).strip()
    source = None if text.isdigit() else Path(text).expanduser()
    folder = source if source is not None and source.is_dir() else None
    return {"--source": None if folder else source, "--checkpoint": Path(config.checkpoint), "--weights": weights}, folder


@contextmanager
def _stop_on_sigterm(stop: dict):
    """While the runner loops, SIGTERM asks it to stop after the current frame (as q does), so the video and the
    predictions are finished as on Ctrl-C; a second SIGTERM interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.get("signal"):
            raise KeyboardInterrupt
        stop["signal"] = "SIGTERM"

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_live(config: LiveConfig, *, source: FrameSource | None = None, display: Display | None = None) -> LiveSummary:
    """Classify frames until the source ends, --max-frames, q/Esc or a closed window. Returns a summary.

    Frames are read and classified ``batch_frames(config, source)`` at a time, then handled one by one in
    order. The summary's ``frame_ms`` (wall time per frame, reading and outputs included) and
    ``latencies_ms`` (model time per frame) are per frame; in a batch each frame gets the batch's time
    divided by its frames. ``source`` and ``display`` replace the ones ``config`` describes (benchmarks, tests).
    """
    config.check()
    device = resolve_device(config.device)
    checkpoint = read_checkpoint(config.checkpoint)  # cheap checks before the camera is opened
    inputs, source_folder = _input_files(config, checkpoint)
    check_output_paths({"--output": config.output, "--predictions": config.predictions}, inputs, source_folder)
    wnids, names = list(checkpoint["class_wnids"]), list(checkpoint["class_names"])
    warning = RANDOM_WARNING if is_random(config.weights or checkpoint["weights_spec"], config.seed) else None
    summary = LiveSummary()
    stop: dict = {}  # {"signal": "SIGTERM"} once asked to stop
    with _stop_on_sigterm(stop), ExitStack() as stack:
        if source is None:
            source = open_source(config.source, width=config.width, height=config.height)
        stack.callback(source.release)
        model = build_classifier(checkpoint, weights=config.weights, seed=config.seed, device=device)
        preprocess = checkpoint_preprocess(checkpoint)
        batch_size = batch_frames(config, source)
        if config.max_frames:
            batch_size = min(batch_size, config.max_frames)
        if isinstance(source, ImageSource):
            batch_size = min(batch_size, len(source.paths))  # one image: no batch-8 warm-up
        blank = torch.zeros(3, preprocess.image_size, preprocess.image_size, dtype=torch.uint8)
        predict_frames(model, preprocess, [blank] * batch_size)  # warm-up: the first pass builds the CPU kernels' plans for this batch
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
        output = VideoOutput(config.output, source.fps or DEFAULT_FPS) if config.output else None
        predictions = PredictionsOutput(config.predictions) if config.predictions else None
        outputs = [o for o in (output, predictions) if o is not None]  # the video first: it is checked on finish
        status = not show and not outputs

        smoother = Smoother(config.smooth)
        fps = None  # shown on each frame: frames per second of wall time, over the batches before it
        seconds_per_frame = None  # its running mean (exponential, 0.9 per frame)
        stream = iter(source)
        index = 0
        start = last_status = time.perf_counter()
        last = None
        try:
            while not stop:
                wanted = batch_size if not config.max_frames else min(batch_size, config.max_frames - index)
                batch = list(islice(stream, wanted))  # fewer at the end of the source
                if not batch:
                    break
                t0 = time.perf_counter()
                probs = predict_frames(model, preprocess, [frame.rgb for frame in batch])
                latency = (time.perf_counter() - t0) * 1000 / len(batch)  # the batch's model time, shared by its frames
                done = 0
                for frame, frame_probs in zip(batch, probs):
                    best = top_k(smoother(frame_probs), config.top_k, wnids, names)
                    if show or output is not None:
                        canvas = annotate(view(frame.bgr), best, fps, warning)
                        if output is not None:
                            output.write(canvas)
                    if predictions is not None:
                        predictions.write({"frame": index, "source": frame.label, "topk": best,
                                           "latency_ms": round(latency, 3)})
                    summary.latencies_ms.append(latency)
                    index += 1
                    done += 1
                    summary.frames = index
                    if status and time.perf_counter() - last_status >= STATUS_SECONDS:
                        last_status = time.perf_counter()
                        log.info("frame %d: %s %.1f%% (%s fps)", index - 1, best[0]["name"], 100 * best[0]["prob"],
                                 f"{fps:.1f}" if fps else "-")
                    if show:
                        try:
                            display.show(canvas)
                        except cv2.error as err:
                            log.warning("cannot show a window (%s); continuing headless", first_line(err))
                            show = False
                        if show and (display.key(0 if source.still else 1) in QUIT_KEYS or display.closed()):
                            summary.stopped_by = "quit"  # the rest of the batch is dropped unseen
                            break
                    if stop:
                        break  # SIGTERM: the rest of the batch is dropped, the outputs are finished below
                now = time.perf_counter()
                per_frame = (now - (last if last is not None else t0)) / done  # batch to batch, reading included
                last = now
                summary.frame_ms.extend([per_frame * 1000] * done)
                weight = 0.9 ** done
                seconds_per_frame = (per_frame if seconds_per_frame is None
                                     else weight * seconds_per_frame + (1 - weight) * per_frame)
                fps = 1 / max(seconds_per_frame, 1e-9)
                if summary.stopped_by == "quit":
                    break
                if config.max_frames and index >= config.max_frames:
                    summary.stopped_by = "max-frames"
                    break
        except KeyboardInterrupt:  # Ctrl-C: the frames so far make complete outputs
            _finish(outputs)
            raise
        except BaseException:
            for o in outputs:
                o.discard()
            raise
        summary.seconds = time.perf_counter() - start
        written = _finish(outputs)
        if stop:
            summary.stopped_by = stop["signal"]
            log.warning("stopped by %s after %d frames", stop["signal"], summary.frames)
        elif getattr(source, "stopped", False):
            summary.stopped_by = "camera stopped"
    frames = summary.frames
    if frames:
        summary.fps = frames / summary.seconds if summary.seconds > 0 else None
        summary.latency_ms = float(np.mean(summary.latencies_ms))
        log.info("%d frames in %.1f s (%.1f fps), model latency %.1f ms per frame (%s)", frames, summary.seconds,
                 summary.fps or 0, summary.latency_ms, summary.stopped_by)
    for path in written:
        log.info("wrote %s", path)
    return summary


def _finish(outputs: list) -> list[Path]:
    """Finish every output (the video is checked first); if one fails, the others are discarded too."""
    try:
        return [output.path for output in outputs if output.finish()]
    except BaseException:
        for output in outputs:
            output.discard()
        raise
