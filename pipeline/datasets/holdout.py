"""The stable val split of a dataset without one, and the names of collected webcam bursts.

An image is held out for val by a hash of its path relative to the dataset root, not by a random draw
over the list: adding or removing other images never moves it between train and val. Frames collected
from the webcam (``run_webcam.py --collect``) are named after their burst (one run of ``--collect``), and
the burst is hashed instead of the file, so near-duplicate consecutive frames never straddle train and val.

Torch-free: the collector (pipeline.live) and the dataset index (pipeline.datasets.dataset) both use it.
"""
from __future__ import annotations

import hashlib
import os
import re
import time

BURST_PATTERN = re.compile(r"^(burst-\d{8}-\d{6}-[0-9a-f]{4})_\d+\.jpg$")
FRAME_DIGITS = 5


def new_burst(now: float | None = None) -> str:
    """A new burst's name: its start time and four random hex digits (two bursts in one second differ)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    return f"burst-{stamp}-{os.urandom(2).hex()}"


def frame_name(burst: str, index: int) -> str:
    """The file name of a burst's ``index``-th saved frame (``burst-20261130-131500-a1b2_00007.jpg``)."""
    return f"{burst}_{index:0{FRAME_DIGITS}d}.jpg"


def burst_of(rel_path: str) -> str | None:
    """The burst a collected frame belongs to, or None for any other file."""
    match = BURST_PATTERN.match(rel_path.rsplit("/", 1)[-1])
    return match.group(1) if match else None


def split_key(rel_path: str) -> str:
    """What decides an image's split: its burst within its folder for a collected frame, else its path."""
    burst = burst_of(rel_path)
    return f"{rel_path.rsplit('/', 1)[0]}/{burst}" if burst and "/" in rel_path else burst or rel_path


def hash_share(key: str) -> float:
    """A stable number in [0, 1) for ``key``: the first 8 bytes of its sha256. The same key gives the same number
    on every machine and in every run, whatever else the dataset holds."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_val(rel_path: str, fraction: float) -> bool:
    """Whether the image at ``rel_path`` (relative to the dataset root, with '/') is held out for val."""
    return hash_share(split_key(rel_path)) < fraction
