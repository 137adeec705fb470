"""run_webcam.py --collect: frames of a source saved as an ImageFolder class, one burst per run.

Driven by generated video files in tmp_path (a camera is faked where its countdown is tested). The faults
(a full disk, a kill) are in tests/test_faults_collect.py.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import run_webcam
from pipeline.common.config import CollectConfig
from pipeline.datasets.holdout import burst_of, frame_name, in_val
from pipeline.live.sources import CaptureSource
from pipeline.live.collect import collect_frames
from pipeline.live.frame_files import burst_in_val
from tests.helpers import ROOT

STEP = 5  # frame i of a generated video is a flat grey of brightness STEP * i: a saved file says which frame it was


def make_video(path: Path, frames: int, size: tuple[int, int] = (64, 48)) -> Path:
    """A video whose i-th frame is a flat grey of STEP * i (MJPG keeps flat greys within a level or two)."""
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (width, height))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((height, width, 3), STEP * i % 256, np.uint8))
    writer.release()
    return path


@pytest.fixture
def clip(tmp_path) -> Path:
    return make_video(tmp_path / "clip.avi", 50)


def collect(clip: Path, into: Path, name: str, *extra: str) -> int:
    return run_webcam.main(["--collect", name, "--into", str(into), "--source", str(clip), "--no-display", *extra])


def saved_frames(folder: Path) -> list[int]:
    """Which source frame each saved file (in name order) holds, read from its brightness."""
    return [round(float(cv2.imread(str(p)).mean()) / STEP) for p in sorted(folder.glob("*.jpg"))]


def bursts(folder: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for p in sorted(folder.iterdir()):
        found.setdefault(burst_of(p.name), []).append(p.name)
    return found


def test_every_and_count(tmp_path, clip):
    assert collect(clip, tmp_path / "desk", "mug", "--every", "3", "--count", "5") == 0
    assert saved_frames(tmp_path / "desk" / "mug") == [0, 3, 6, 9, 12]


def test_max_frames_bounds_the_frames_read(tmp_path, clip):
    assert collect(clip, tmp_path / "desk", "mug", "--every", "2", "--max-frames", "7") == 0
    assert saved_frames(tmp_path / "desk" / "mug") == [0, 2, 4, 6]


def test_the_source_ends_first(tmp_path, clip):
    assert collect(clip, tmp_path / "desk", "mug", "--every", "10", "--count", "100") == 0
    assert saved_frames(tmp_path / "desk" / "mug") == [0, 10, 20, 30, 40]


def test_defaults_every_5_count_60(tmp_path):
    long_clip = make_video(tmp_path / "long.avi", 320, size=(32, 24))
    assert collect(long_clip, tmp_path / "desk", "mug") == 0
    frames = saved_frames(tmp_path / "desk" / "mug")
    assert len(frames) == 60
    assert [f % 51 for f in frames[:10]] == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45]  # brightness wraps at 255


def test_one_burst_named_for_the_split(tmp_path, clip, caplog):
    caplog.set_level("INFO")
    assert collect(clip, tmp_path / "desk", "mug", "--count", "6") == 0
    folder = tmp_path / "desk" / "mug"
    (burst, names), = bursts(folder).items()
    assert names == [frame_name(burst, i) for i in range(6)]
    for fraction in (0.05, 0.2, 0.5, 0.9):  # the whole burst on one side, at any fraction
        assert len({in_val(f"mug/{name}", fraction) for name in names}) == 1
    assert all(cv2.imread(str(folder / name)).shape == (48, 64, 3) for name in names)  # the source's own size
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("saved 6 frames of mug")]
    assert summary and f"(burst {burst}" in summary[0] and "1 class: mug (6 images, 1 burst, 0 in val)" in summary[0]
    assert any("collect at least two bursts per class" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("attempt", range(3))  # the names are random: a few draws
def test_two_runs_two_bursts_one_in_train_one_in_val(tmp_path, clip, caplog, attempt):
    caplog.set_level("INFO")
    desk, folder = tmp_path / "desk", tmp_path / "desk" / "mug"
    assert collect(clip, desk, "mug", "--count", "4") == 0
    first = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert collect(clip, desk, "mug", "--count", "4") == 0
    found = bursts(folder)
    assert len(found) == 2 and all(len(names) == 4 for names in found.values())
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in first} == first  # untouched
    # the first burst is named to fall in train, the second in val: val is never empty after two
    assert {burst_in_val("mug", burst) for burst in found} == {True, False}
    for fraction in (0.05, 0.1, 0.2, 0.3, 0.5):
        assert sum(in_val(f"mug/{frame_name(burst, 0)}", fraction) for burst in found) == 1
    assert not any("collect at least two bursts" in r.getMessage() for r in caplog.records[-3:])


def test_classes_counted_in_the_summary(tmp_path, clip, caplog):
    caplog.set_level("INFO")
    desk = tmp_path / "desk"
    (desk / "cup").mkdir(parents=True)
    (desk / "cup" / "photo.JPG").write_bytes(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    before = (desk / "cup" / "photo.JPG").read_bytes()
    for name in ("mug", "pen"):
        assert collect(clip, desk, name, "--count", "2") == 0
    line = next(r.getMessage() for r in reversed(caplog.records) if r.getMessage().startswith("saved 2 frames of pen"))
    assert re.search(r"now holds 3 classes: cup \(1 images, 0 bursts, [01] in val\), mug \(2 images, 1 burst", line)
    assert (desk / "cup" / "photo.JPG").read_bytes() == before
    assert sorted(p.name for p in desk.iterdir()) == ["cup", "mug", "pen"]


def test_into_a_folder_of_class_folders_with_hidden_files(tmp_path, clip):
    desk = tmp_path / "desk"
    (desk / "cup").mkdir(parents=True)
    (desk / ".DS_Store").write_bytes(b"x")
    (desk / "cup" / "a.webp").write_bytes(b"x")  # a photo the dataset may skip, not a document
    assert collect(clip, desk, "mug", "--count", "1") == 0
    assert (desk / ".DS_Store").read_bytes() == b"x"


class FakeCamera:
    """A camera delivering ``frames`` grey frames (frame i: STEP * i), ``seconds`` apart."""

    def __init__(self, frames: int, seconds: float):
        self.frames, self.seconds, self.read_count = frames, seconds, 0

    def isOpened(self):
        return True

    def get(self, prop):
        return 0

    def read(self):
        if self.read_count >= self.frames:
            return False, None
        if self.read_count:
            time.sleep(self.seconds)
        self.read_count += 1
        return True, np.full((24, 32, 3), STEP * (self.read_count - 1), np.uint8)

    def release(self):
        pass


class FakeDisplay:
    """Records what is shown; answers ``quit_after`` frames with q."""

    def __init__(self, quit_after: int | None = None):
        self.shown, self.quit_after = [], quit_after

    def show(self, image):
        self.shown.append(image.copy())

    def key(self, delay_ms):
        return ord("q") if self.quit_after is not None and len(self.shown) >= self.quit_after else -1

    def closed(self):
        return False

    def close(self):
        pass


def test_camera_countdown_then_every_frame(tmp_path):
    config = CollectConfig(collect="mug", into=tmp_path / "desk", every=1, count=100, countdown=0.3, display=False)
    source = CaptureSource(FakeCamera(12, 0.05), "0", camera=True)
    summary = collect_frames(config, source=source)
    frames = saved_frames(tmp_path / "desk" / "mug")
    assert summary.saved == len(frames) and summary.stopped_by == "camera stopped"
    assert 3 <= frames[0] <= 8 and frames == list(range(frames[0], 12))  # ~0.3 s of frames skipped, then all


def test_window_shows_the_count_and_q_stops(tmp_path):
    config = CollectConfig(collect="mug", into=tmp_path / "desk", every=1, count=100, countdown=0, display=True)
    display = FakeDisplay(quit_after=4)
    summary = collect_frames(config, source=CaptureSource(FakeCamera(20, 0.0), "0", camera=True), display=display)
    assert summary.stopped_by == "quit" and summary.saved == 4 and len(display.shown) == 4
    assert display.shown[0].shape[0] >= 360  # a small frame is enlarged for the window
    saved = cv2.imread(str(sorted((tmp_path / "desk" / "mug").iterdir())[1]))
    assert float(np.abs(saved.astype(int) - STEP).max()) <= 2  # the file is the frame, with no overlay drawn on it


def test_collect_needs_no_torch_and_starts_fast(tmp_path, clip):
    code = ("import sys, time; t = time.perf_counter(); import run_webcam; "
            f"rc = run_webcam.main(['--collect', 'mug', '--into', {str(tmp_path / 'desk')!r}, '--source', "
            f"{str(clip)!r}, '--count', '2', '--no-display']); "
            "print(rc, 'torch' in sys.modules, round(time.perf_counter() - t, 2))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    rc, torch_loaded, seconds = out.stdout.split()
    assert (rc, torch_loaded) == ("0", "False"), out.stderr
    print(f"collect start-up to finish: {seconds} s")
