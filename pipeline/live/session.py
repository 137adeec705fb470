"""What a live run (pipeline.live.runner) and a collection (pipeline.live.collect) share: how a run stops on
SIGTERM, whether a window opens, and the keys and pace of the loop. Torch-free.
"""
from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from pipeline.live.overlay import Display, display_available

log = logging.getLogger(__name__)

STATUS_SECONDS = 2.0  # headless without outputs: how often a status line is logged
QUIT_KEYS = (ord("q"), ord("Q"), 27)  # q or Esc


@contextmanager
def stop_on_sigterm(stop: dict) -> Iterator[None]:
    """While the loop runs, SIGTERM asks it to stop after the current frame (as q does): ``stop`` becomes
    {"signal": "SIGTERM"}, and the outputs (or the frames saved) are finished as on Ctrl-C; a second SIGTERM
    interrupts at once. Off the main thread (where no handler can be set) nothing changes."""
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


def wants_window(setting: bool | None, display: Display | None) -> bool:
    """Whether a window opens: ``setting`` (the config's ``display``: False for --no-display) when given; else
    when a stand-in ``display`` was passed (tests) or a display is present."""
    if setting is not None:
        return setting
    if display is not None or display_available():
        return True
    log.info("no display found (DISPLAY/WAYLAND_DISPLAY unset, or OpenCV without a GUI): running headless; "
             "pass --no-display to say so")
    return False
