"""``run_webcam.py --collect CLASS --into DIR``: frames of a camera (or a video, or a folder) saved as images of
one class, in the ImageFolder layout ``DIR/<CLASS>/``. No checkpoint and no torch.

One run is one burst: its frames are named ``burst-<time>-<random>_<i>.jpg`` (pipeline.datasets.holdout), and
the dataset's ``--val-fraction`` split hashes the burst, so near-duplicate frames of one burst never straddle
train and val. A class therefore needs bursts in both: the closing summary says, per class, where its bursts
fall. Files are saved by pipeline.live.frame_files: never over an existing name, never half-written.
"""
from __future__ import annotations

import errno
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.atomic import sync_folder
from pipeline.common.config import COLLECT_COUNTDOWN, CollectConfig
from pipeline.common.errors import UserError
from pipeline.live.sources import FrameSource, decode_with_opencv, open_source
from pipeline.common.names import VAL_FRACTION
from pipeline.live.frame_files import (check_class_name, check_into, count_classes, pick_burst,
                                       remove_stale_partials, save_jpeg)
from pipeline.live.overlay import Display, draw_lines, view
from pipeline.live.session import QUIT_KEYS, STATUS_SECONDS, stop_on_sigterm, wants_window

log = logging.getLogger(__name__)


@dataclass
class CollectSummary:
    """What one collection did."""

    name: str  # the class
    folder: Path  # DIR/<class>
    burst: str
    saved: int = 0
    frames: int = 0  # frames read from the source, the countdown's included
    stopped_by: str = "end"  # end, count, max-frames, quit, camera stopped, SIGTERM


class Collector:
    """One collection's state: the source, the window, and the frames saved so far."""

    def __init__(self, config: CollectConfig, source: FrameSource, folder: Path, display: Display | None):
        self.config, self.source, self.folder = config, source, folder
        self.every, self.count = config.every, config.count
        self.countdown = countdown_seconds(config, source)
        self.show = wants_window(config.display, display)
        self.display = (display or Display(config.window)) if self.show else None
        burst, self.steered = pick_burst(folder, config.collect)
        self.summary = CollectSummary(config.collect, folder, burst)
        self.started: float | None = None  # when the first frame came: the countdown runs from there
        self.eligible = 0  # frames read after the countdown: every N-th of them is saved
        self.next_index = 0
        self.last_status = time.perf_counter()

    def handle(self, bgr: np.ndarray) -> bool:
        """Save the frame if it is its turn, draw and show it; False when the user quit."""
        now = time.perf_counter()
        self.started = now if self.started is None else self.started
        remaining = self.countdown - (now - self.started)
        self.summary.frames += 1
        if remaining <= 0:
            if self.eligible % self.every == 0:
                self._save(bgr)
            self.eligible += 1
        if self.show:
            return self._show(bgr, remaining)
        if now - self.last_status >= STATUS_SECONDS:
            self.last_status = now
            log.info("%s", f"starting in {remaining:.0f} s" if remaining > 0 else
                     f"saved {self.summary.saved} of {self.count} frames of {self.summary.name}")
        return True

    def _save(self, bgr: np.ndarray) -> None:
        if self.summary.saved == 0:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UserError(f"cannot create {self.folder} ({err.strerror or err}); check the path and its "
                                "permissions") from None
        try:
            _, index = save_jpeg(self.folder, self.summary.burst, self.next_index, bgr)
        except OSError as err:
            kept = (f"the {self.summary.saved} frames saved before it are kept (burst {self.summary.burst})"
                    if self.summary.saved else "no frame was saved")
            what = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
            raise UserError(f"cannot save a frame into {self.folder}: {what}; {kept}, and no partial file is left. "
                            "Free some space (or fix the folder's permissions) and collect again") from None
        self.next_index = index + 1
        self.summary.saved += 1

    def _show(self, bgr: np.ndarray, remaining: float) -> bool:
        lines = [f"collecting {self.summary.name[:32]}: {self.summary.saved}/{self.count}",
                 f"every {self.every} frame{'s' if self.every > 1 else ''}; q/Esc stops"]
        warning = f"starting in {int(remaining) + 1} s" if remaining > 0 else None
        self.display.show(draw_lines(view(bgr), lines, warning))  # drawn after the frame was saved
        if self.display.key(1) in QUIT_KEYS or self.display.closed():  # still images too: no key per image
            self.summary.stopped_by = "quit"
            return False
        return True

    @property
    def done(self) -> str | None:
        """Why the collection stops after this frame, or None."""
        if self.summary.saved >= self.count:
            return "count"
        if self.config.max_frames and self.summary.frames >= self.config.max_frames:
            return "max-frames"
        return None


def countdown_seconds(config: CollectConfig, source: FrameSource) -> float:
    """--countdown on a camera (default COLLECT_COUNTDOWN); a video or folder starts at once."""
    if source.camera:
        return COLLECT_COUNTDOWN if config.countdown is None else config.countdown
    if config.countdown:
        log.warning("--countdown applies to cameras only; ignored for %s", source.label)
    return 0.0


def _refuse_source_inside(config: CollectConfig, folder: Path) -> None:
    """Reading the class folder while saving into it would feed the collection its own frames."""
    text = str(config.source).strip()
    if not text.isdigit() and Path(text).expanduser().is_dir() and folder.is_dir():
        if Path(text).expanduser().resolve() == folder.resolve():
            raise UserError(f"--source {text} is the class folder the frames go to; collect from another folder")


def collect_frames(config: CollectConfig, *, source: FrameSource | None = None,
                   display: Display | None = None) -> CollectSummary:
    """Save every --every-th frame of the source into --into/--collect until --count, --max-frames, the
    source's end, q/Esc or SIGTERM. ``source`` and ``display`` replace the ones ``config`` names (tests)."""
    check_class_name(config.collect)
    into = Path(config.into).expanduser()
    folder = check_into(into, config.collect)
    _refuse_source_inside(config, folder)
    stop: dict = {}
    with stop_on_sigterm(stop), ExitStack() as stack:
        if source is None:
            source = open_source(config.source, width=config.width, height=config.height, decode=decode_with_opencv)
        stack.callback(source.release)
        remove_stale_partials(folder)
        collector = Collector(config, source, folder, display)
        if collector.display is not None:
            stack.callback(collector.display.close)
        log.info("collecting %d frames of %s into %s (every %d, burst %s%s%s)", collector.count, config.collect,
                 folder, collector.every, collector.summary.burst,
                 f", named to fall in {collector.steered}" if collector.steered else "",
                 f", after a {collector.countdown:g} s countdown" if collector.countdown else "")
        try:
            for frame in source:
                if not collector.handle(frame.bgr) or stop:
                    break
                reason = collector.done
                if reason:
                    collector.summary.stopped_by = reason
                    break
        except KeyboardInterrupt:  # Ctrl-C: the frames so far are complete files; say where they are
            log_summary(collector.summary, into)
            raise
        finally:
            if collector.summary.saved:
                sync_folder(folder)
        summary = collector.summary
        if stop:
            summary.stopped_by = stop["signal"]
        elif getattr(source, "stopped", False):
            summary.stopped_by = "camera stopped"
    log_summary(summary, into)
    return summary


def log_summary(summary: CollectSummary, into: Path) -> None:
    """The closing lines: what was saved, the image folder's classes, and what to collect next."""
    if not summary.saved:
        log.warning("saved no frame of %s (%d frames read, stopped by %s)", summary.name, summary.frames,
                    summary.stopped_by)
    classes = count_classes(into, VAL_FRACTION) if into.is_dir() else []
    listing = ", ".join(f"{c.name} ({c.images} images, {len(c.bursts)} burst{'s' if len(c.bursts) != 1 else ''}, "
                        f"{c.val} in val)" for c in classes)
    if summary.saved:
        log.info("saved %d frames of %s to %s (burst %s, stopped by %s); %s now holds %d class%s: %s", summary.saved,
                 summary.name, summary.folder, summary.burst, summary.stopped_by, into, len(classes),
                 "" if len(classes) == 1 else "es", listing)
    for line in advice(classes):
        log.warning("%s", line)


def advice(classes: list) -> list[str]:
    """What the image folder still needs before a head can be trained and validated on it."""
    lines = []
    single = [c.name for c in classes if len(c.bursts) == 1 and not c.others]
    if single:
        lines.append(f"collect at least two bursts per class so val is not empty: {', '.join(single)} "
                     f"{'has' if len(single) == 1 else 'have'} one (run --collect again for each)")
    no_val = [c.name for c in classes if c.images and not c.val and c.name not in single]
    if no_val:
        lines.append(f"at --val-fraction {VAL_FRACTION:g} no image of {', '.join(no_val)} is held out for val yet "
                     "(a burst goes to val whole, about one in five): collect another burst of each")
    no_train = [c.name for c in classes if c.images and c.val == c.images and c.name not in single]
    if no_train:
        lines.append(f"every image of {', '.join(no_train)} falls in val at --val-fraction {VAL_FRACTION:g}: "
                     "collect another burst of each")
    if len(classes) == 1:
        lines.append("collect a second class: a classifier needs at least two")
    return lines
