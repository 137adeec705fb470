"""The live loop: a classifier applied frame by frame to a camera, a video, an image or a folder. Torch-free.

The classifier is any ``pipeline.live.classifier.Classifier``: the torch backbone + head of a checkpoint
(pipeline.live.torch_classifier), or an exported ONNX graph on ONNX Runtime or OpenCV's DNN module
(pipeline.live.onnx_runtimes). Sources are in pipeline.live.sources; the overlay, window and output files
in pipeline.live.overlay.

Frames of a video file, image or folder are classified in batches of ``frames_per_batch`` (default 8): at
batch 1 fc6/fc7 are memory-bound (218 MB of weights read per frame), a batch reads them once for all its
frames. The results are per frame and in frame order as at batch 1 (smoothing, overlay, video, predictions
line); a frame's ``latency_ms`` is the batch's model time divided by the frames in it. A camera is always
read one frame at a time: there latency matters, and the camera's own frame rate caps the FPS anyway.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import cv2
import numpy as np

from pipeline.common.config import LiveConfig
from pipeline.common.errors import first_line
from pipeline.common.hardware import available_memory
from pipeline.live.sources import CaptureSource, FrameSource, ImageSource, open_source
from pipeline.backbones.weights import is_random
from pipeline.live.classifier import Classifier
from pipeline.live.overlay import Display, PredictionsOutput, VideoOutput, annotate, view
from pipeline.live.session import QUIT_KEYS, STATUS_SECONDS, stop_on_sigterm, wants_window

log = logging.getLogger(__name__)

DEFAULT_FPS = 30.0  # output video frame rate when the source has none (camera without one, images)
DEFAULT_BATCH_FRAMES = 8  # frames per forward pass for video files, images and folders (cameras: always 1)
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


class Smoother:
    """The mean of the last ``n`` probability vectors (n=1: the current frame's)."""

    def __init__(self, n: int):
        self.window: deque[np.ndarray] = deque(maxlen=max(1, n))

    def __call__(self, probs: np.ndarray) -> np.ndarray:
        if self.window.maxlen == 1:
            return probs
        self.window.append(probs)
        return np.mean(np.stack(tuple(self.window)), axis=0, dtype=np.float32)  # (n, C): no drift from a running sum


def top_k(probs: np.ndarray, k: int, wnids: list[str], names: list[str]) -> list[dict]:
    """The k most probable classes, most probable first (ties: the lower index first)."""
    order = np.argsort(-probs, kind="stable")[:min(k, probs.size)]
    return [{"wnid": wnids[i], "name": names[i], "prob": float(probs[i])} for i in order]


def frames_per_batch(config: LiveConfig, source: FrameSource, classifier: Classifier) -> int:
    """Frames per forward pass: 1 for a camera, else --batch-frames (default DEFAULT_BATCH_FRAMES), lowered
    when a batch of the video's frames would not fit in half the available memory, and never more frames
    than --max-frames or the images there are."""
    if source.camera:
        if config.batch_frames and config.batch_frames > 1:
            log.info("camera %s: classifying one frame at a time (--batch-frames applies to files and folders)",
                     source.label)
        return 1
    batch = config.batch_frames or DEFAULT_BATCH_FRAMES
    size = source.frame_size() if isinstance(source, CaptureSource) else None
    available = available_memory()
    if size and available:
        fits = max(1, int(0.5 * available // classifier.per_frame_bytes(*size)))
        if batch > fits:
            log.warning("--batch-frames %d: %d frames of %dx%d do not fit in the memory available (%.1f GiB); "
                        "using %d", batch, batch, *size, available / 2**30, fits)
            batch = fits
    if config.max_frames:
        batch = min(batch, config.max_frames)
    if isinstance(source, ImageSource):
        batch = min(batch, len(source.paths))  # one image: no batch-8 warm-up
    return batch


def _finish(outputs: list) -> list[Path]:
    """Finish every output (the video is checked first); if one fails, the others are discarded too."""
    try:
        return [output.path for output in outputs if output.finish()]
    except BaseException:
        for output in outputs:
            output.discard()
        raise


class Session:
    """One run's state: the outputs, the window, the smoothing and the frame-rate estimate."""

    def __init__(self, config: LiveConfig, classifier: Classifier, source: FrameSource, display: Display | None,
                 stack: ExitStack):
        self.config, self.classifier, self.source = config, classifier, source
        self.show = wants_window(config.display, display)
        self.display = None
        if self.show:
            self.display = display or Display(config.window)
            stack.callback(self.display.close)
        self.video = VideoOutput(config.output, source.fps or DEFAULT_FPS) if config.output else None
        self.predictions = PredictionsOutput(config.predictions) if config.predictions else None
        self.outputs = [o for o in (self.video, self.predictions) if o is not None]  # the video first: checked on finish
        self.status = not self.show and not self.outputs
        self.warning = RANDOM_WARNING if is_random(classifier.classes.weights_spec, config.seed) else None
        self.smoother = Smoother(config.smooth)
        self.summary = LiveSummary()
        self.fps: float | None = None  # shown on each frame: frames per second of wall time, over the batches before
        self.seconds_per_frame: float | None = None  # its running mean (exponential, 0.9 per frame)
        self.last_status = time.perf_counter()

    def handle(self, frame, probs: np.ndarray, latency: float) -> bool:
        """Smooth, draw, write and show one classified frame; False when the user quit."""
        classes = self.classifier.classes
        best = top_k(self.smoother(probs), self.config.top_k, classes.wnids, classes.names)
        index = self.summary.frames
        canvas = None
        if self.show or self.video is not None:
            canvas = annotate(view(frame.bgr), best, self.fps, self.warning)
            if self.video is not None:
                self.video.write(canvas)
        if self.predictions is not None:
            self.predictions.write({"frame": index, "source": frame.source, "topk": best, "latency_ms": round(latency, 3)})
        self.summary.latencies_ms.append(latency)
        self.summary.frames = index + 1
        if self.status and time.perf_counter() - self.last_status >= STATUS_SECONDS:
            self.last_status = time.perf_counter()
            log.info("frame %d: %s %.1f%% (%s fps)", index, best[0]["name"], 100 * best[0]["prob"],
                     f"{self.fps:.1f}" if self.fps else "-")
        return self._show(canvas)

    def _show(self, canvas) -> bool:
        if not self.show:
            return True
        try:
            self.display.show(canvas)
        except cv2.error as err:
            log.warning("cannot show a window (%s); continuing headless", first_line(err))
            self.show = False
            return True
        if self.display.key(0 if self.source.still else 1) in QUIT_KEYS or self.display.closed():
            self.summary.stopped_by = "quit"  # the rest of the batch is dropped unseen
            return False
        return True

    def timed(self, done: int, seconds: float) -> None:
        """Record ``done`` frames that took ``seconds`` of wall time, batch to batch, reading included."""
        per_frame = seconds / done
        self.summary.frame_ms.extend([per_frame * 1000] * done)
        weight = 0.9 ** done
        self.seconds_per_frame = (per_frame if self.seconds_per_frame is None
                                  else weight * self.seconds_per_frame + (1 - weight) * per_frame)
        self.fps = 1 / max(self.seconds_per_frame, 1e-9)


def _loop(session: Session, batch_size: int, stop: dict) -> None:
    """Read, classify and handle frames batch by batch until the source ends, the user quits or a stop."""
    config, summary = session.config, session.summary
    stream = iter(session.source)
    last = None
    while not stop:
        wanted = batch_size if not config.max_frames else min(batch_size, config.max_frames - summary.frames)
        batch = list(islice(stream, wanted))  # fewer at the end of the source
        if not batch:
            break
        t0 = time.perf_counter()
        probs = session.classifier.predict([frame.rgb for frame in batch])
        latency = (time.perf_counter() - t0) * 1000 / len(batch)  # the batch's model time, shared by its frames
        done = 0
        for frame, frame_probs in zip(batch, probs):
            done += 1
            if not session.handle(frame, frame_probs, latency) or stop:
                break  # quit or SIGTERM: the rest of the batch is dropped, the outputs are finished below
        now = time.perf_counter()
        session.timed(done, now - (last if last is not None else t0))
        last = now
        if summary.stopped_by == "quit":
            break
        if config.max_frames and summary.frames >= config.max_frames:
            summary.stopped_by = "max-frames"
            break


def run_live(config: LiveConfig, classifier: Classifier, *, source: FrameSource | None = None,
             display: Display | None = None) -> LiveSummary:
    """Classify frames until the source ends, --max-frames, q/Esc or a closed window. Returns a summary.

    Frames are read and classified ``frames_per_batch`` at a time, then handled one by one in order.
    ``source`` and ``display`` replace the ones ``config`` describes (benchmarks, tests).
    """
    stop: dict = {}  # {"signal": "SIGTERM"} once asked to stop
    with stop_on_sigterm(stop), ExitStack() as stack:
        if source is None:
            source = open_source(config.source, width=config.width, height=config.height, decode=classifier.decode)
        stack.callback(source.release)
        batch_size = frames_per_batch(config, source, classifier)
        side = 224
        classifier.predict([np.zeros((side, side, 3), np.uint8)] * batch_size)  # warm-up: kernel plans for this batch
        log.info("%s", classifier.classes.description)
        session = Session(config, classifier, source, display, stack)
        start = time.perf_counter()
        try:
            _loop(session, batch_size, stop)
        except KeyboardInterrupt:  # Ctrl-C: the frames so far make complete outputs
            _finish(session.outputs)
            raise
        except BaseException:
            for output in session.outputs:
                output.discard()
            raise
        summary = session.summary
        summary.seconds = time.perf_counter() - start
        written = _finish(session.outputs)
        if stop:
            summary.stopped_by = stop["signal"]
            log.warning("stopped by %s after %d frames", stop["signal"], summary.frames)
        elif getattr(source, "stopped", False):
            summary.stopped_by = "camera stopped"
    _log_summary(summary, written)
    return summary


def _log_summary(summary: LiveSummary, written: list[Path]) -> None:
    if summary.frames:
        summary.fps = summary.frames / summary.seconds if summary.seconds > 0 else None
        summary.latency_ms = float(np.mean(summary.latencies_ms))
        log.info("%d frames in %.1f s (%.1f fps), model latency %.1f ms per frame (%s)", summary.frames,
                 summary.seconds, summary.fps or 0, summary.latency_ms, summary.stopped_by)
    for path in written:
        log.info("wrote %s", path)
