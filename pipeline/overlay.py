"""What the live runner shows and writes: the annotated frame, the window, and the output video."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import cv2
import numpy as np

from pipeline.errors import UserError
from pipeline.sources import quiet_opencv

log = logging.getLogger(__name__)

MIN_VIEW_SIDE = 360  # smaller frames (Tiny ImageNet's 64x64) are enlarged for display and the output video



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
            with quiet_opencv():
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
