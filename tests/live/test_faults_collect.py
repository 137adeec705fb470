"""run_webcam.py --collect under bad input and faults: one line, and no image of the user's lost or replaced.

Each test asserts that what the user had is unchanged and that no half-written frame carries a final name.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import run_webcam
from pipeline.datasets.holdout import burst_of, frame_name
from pipeline.live import frame_files
from tests.helpers import ROOT, error_line, one_error_line, tree_bytes
from tests.live.test_collect import make_video



@pytest.fixture
def clip(tmp_path) -> Path:
    return make_video(tmp_path / "clip.avi", 30)


def jpeg(value: int = 0) -> bytes:
    return cv2.imencode(".jpg", np.full((8, 8, 3), value, np.uint8))[1].tobytes()


def complete_jpegs(folder: Path) -> list[str]:
    """The visible files of ``folder``, each asserted to be a whole JPEG (end marker, decodes)."""
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    for name in names:
        data = (folder / name).read_bytes()
        assert data.endswith(b"\xff\xd9") and cv2.imdecode(np.frombuffer(data, np.uint8), 1) is not None, name
    return names


def user_desk(tmp_path: Path) -> Path:
    desk = tmp_path / "desk"
    (desk / "mug").mkdir(parents=True)
    (desk / "mug" / "my_photo.jpg").write_bytes(jpeg(7))
    return desk


def write(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# case: (make the bad input in the user's desk folder, returning (--into, CLASS)), words of the error line
REFUSALS = {
    "into is a file": (lambda d: (d / "mug" / "my_photo.jpg", "mug"), "is a file, not a folder"),
    "documents beside classes": (lambda d: (write(d / "notes.txt").parent, "pen"), "notes.txt"),
    "a document in a class": (lambda d: (write(d / "mug" / "report.pdf").parents[1], "pen"), "report.pdf"),
    "a folder in a class": (lambda d: (write(d / "mug" / "sub" / "a.jpg").parents[2], "pen"), "mug/sub"),
    "class is a file": (lambda d: (write(d.parent / "other" / "pen", b"").parent, "pen"), "the file pen"),
    "train and val": (lambda d: (write(d / "train" / "a" / "b.jpg") and write(d / "val" / "a" / "b.jpg").parents[2],
                                 "pen"), "train/ and val/"),
    "empty class": (lambda d: (d, ""), "class name"),
    "blank class": (lambda d: (d, "  "), "class name"),
    "slash": (lambda d: (d, "a/b"), "not a folder name"),
    "dot dot": (lambda d: (d, ".."), "not a folder name"),
    "hidden": (lambda d: (d, ".mug"), "starts with '.'"),
    "control": (lambda d: (d, "mu\ng"), "control characters"),
    "too long": (lambda d: (d, "m" * 256), "too long"),
    # names the extractor's layouts refuse as a class folder (layouts.class_name_problem)
    "train": (lambda d: (d, "train"), "read as a split folder"),
    "val": (lambda d: (d, "val"), "read as a split folder"),
    "named like an image": (lambda d: (d, "pen.jpg"), "named like an image file"),
    "named like a HEIC photo": (lambda d: (d, "pen.HEIC"), "named like an image file"),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_refused_in_one_line_with_nothing_written(tmp_path, clip, capsys, case):
    make, words = REFUSALS[case]
    into, name = make(user_desk(tmp_path))
    before = tree_bytes(tmp_path), sorted(tmp_path.rglob("*"))
    rc = run_webcam.main(["--collect", name, "--into", str(into), "--source", str(clip), "--no-display"])
    line = one_error_line(capsys)
    assert rc == 2 and words in line, line
    assert (tree_bytes(tmp_path), sorted(tmp_path.rglob("*"))) == before  # no file changed, no folder made


FLAG_CLASHES = {
    "--collect without --into": (["--collect", "mug"], "needs --into"),
    "--into without --collect": (["--into", "d"], "only apply to --collect"),
    "--count without --collect": (["--count", "3"], "only apply to --collect"),
    "--export": (["--collect", "mug", "--into", "d", "--export", "c.onnx"], "drop --export"),
    "--onnx": (["--collect", "mug", "--into", "d", "--onnx", "c.onnx"], "drop --onnx"),
    "--output": (["--collect", "mug", "--into", "d", "--output", "o.mp4"], "drop --output"),
    "--predictions": (["--collect", "mug", "--into", "d", "--predictions", "p.jsonl"], "drop --predictions"),
    "--weights": (["--collect", "mug", "--into", "d", "--weights", "random"], "drop --weights"),
    "--runtime": (["--collect", "mug", "--into", "d", "--runtime", "opencv"], "drop --runtime"),
    "--precision": (["--collect", "mug", "--into", "d", "--precision", "bf16"], "drop --precision"),
    "--checkpoint and --top-k": (["--collect", "mug", "--into", "d", "--checkpoint", "h.pt", "--top-k", "1"],
                                 "drop --checkpoint, --top-k"),
    "--checkpoint at its default": (["--collect", "mug", "--into", "d", "--checkpoint", "runs/head/best.pt"],
                                    "drop --checkpoint"),
    "--seed 0 and --batch-frames": (["--collect", "mug", "--seed", "0", "--into", "d", "--batch-frames", "4"],
                                    "drop --seed, --batch-frames"),
    "--smooth before --collect": (["--smooth", "3", "--collect", "mug", "--into", "d"], "drop --smooth"),
    "--every 0": (["--collect", "mug", "--into", "d", "--every", "0"], "--every must be at least 1"),
    "--count 0": (["--collect", "mug", "--into", "d", "--count", "0"], "--count must be at least 1"),
    "--countdown -1": (["--collect", "mug", "--into", "d", "--countdown", "-1"], "--countdown must be"),
}


@pytest.mark.parametrize("case", FLAG_CLASHES, ids=list(FLAG_CLASHES))
def test_flags_that_make_no_sense_together(tmp_path, clip, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    argv, words = FLAG_CLASHES[case]
    rc = run_webcam.main([*argv, "--source", str(clip), "--no-display"])
    line = one_error_line(capsys)
    assert rc == 2 and words in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.avi"]


def test_the_source_folder_is_not_the_class_folder(tmp_path, capsys):
    desk = user_desk(tmp_path)
    before = tree_bytes(tmp_path)
    rc = run_webcam.main(["--collect", "mug", "--into", str(desk), "--source", str(desk / "mug"), "--no-display"])
    assert rc == 2 and "is the class folder" in one_error_line(capsys)
    assert tree_bytes(tmp_path) == before


class FullDisk:
    """``open`` for frame_files: the ``fail_at``-th file gets half its bytes, then ENOSPC."""

    def __init__(self, fail_at: int, error: type[BaseException] | None = None):
        self.fail_at, self.error, self.calls = fail_at, error, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        self.calls += 1
        file = open(path, mode, *args, **kwargs)
        if self.calls != self.fail_at:
            return file
        real_write, error = file.write, self.error

        def write(data):
            real_write(data[: len(data) // 2])
            file.flush()
            raise error() if error else OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        file.write = write
        return file


def test_a_full_disk_stops_in_one_line_and_keeps_the_frames(tmp_path, clip, capsys, monkeypatch):
    desk = user_desk(tmp_path)
    before = tree_bytes(desk)
    monkeypatch.setattr(frame_files, "open", FullDisk(fail_at=4), raising=False)
    rc = run_webcam.main(["--collect", "mug", "--into", str(desk), "--source", str(clip), "--every", "1",
                          "--no-display"])
    line = error_line(capsys.readouterr().err)
    assert rc == 2 and "the disk is full" in line and "the 3 frames saved before it are kept" in line, line
    names = complete_jpegs(desk / "mug")
    assert len(names) == 4 and sorted(os.listdir(desk / "mug")) == names  # no hidden partial either
    assert {k: v for k, v in tree_bytes(desk).items() if k in before} == before


def test_an_interrupt_mid_write_leaves_no_partial_frame(tmp_path, clip, monkeypatch):
    desk = user_desk(tmp_path)
    monkeypatch.setattr(frame_files, "open", FullDisk(fail_at=3, error=KeyboardInterrupt), raising=False)
    assert run_webcam.main(["--collect", "mug", "--into", str(desk), "--source", str(clip), "--every", "1",
                            "--no-display"]) == 130
    names = complete_jpegs(desk / "mug")
    assert len(names) == 3 and sorted(os.listdir(desk / "mug")) == names


def test_a_taken_name_is_skipped_never_replaced(tmp_path):
    folder = tmp_path / "mug"
    folder.mkdir()
    burst = "burst-20261130-131500-a1b2"
    for i in (0, 1):
        (folder / frame_name(burst, i)).write_bytes(jpeg(i))
    path, index = frame_files.save_jpeg(folder, burst, 0, np.full((8, 8, 3), 200, np.uint8))
    assert (path.name, index) == (frame_name(burst, 2), 2)
    assert [(folder / frame_name(burst, i)).read_bytes() for i in (0, 1)] == [jpeg(0), jpeg(1)]
    assert sorted(os.listdir(folder)) == [frame_name(burst, i) for i in range(3)]


SLOW_COLLECT = """
import os, sys, time
real_fsync = os.fsync
def slow_fsync(fd):
    time.sleep(0.05)
    real_fsync(fd)
os.fsync = slow_fsync
import run_webcam
raise SystemExit(run_webcam.main(sys.argv[1:]))
"""


def start_slow_collection(tmp_path: Path, desk: Path) -> subprocess.Popen:
    clip = make_video(tmp_path / "long.avi", 300, size=(32, 24))
    return subprocess.Popen([sys.executable, "-c", SLOW_COLLECT, "--collect", "mug", "--into", str(desk), "--source",
                             str(clip), "--every", "1", "--count", "300", "--no-display"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_frames(folder: Path, child: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if folder.is_dir() and sum(1 for p in folder.iterdir() if burst_of(p.name)) >= count:
            return
        time.sleep(0.01)
    child.kill()
    pytest.fail(f"the collection saved fewer than {count} frames: {child.communicate()[1]}")


def test_kill_9_leaves_only_complete_jpegs_and_the_next_run_tidies(tmp_path):
    desk = user_desk(tmp_path)
    child = start_slow_collection(tmp_path, desk)
    wait_for_frames(desk / "mug", child, 5)
    child.kill()
    child.wait()
    names = complete_jpegs(desk / "mug")
    assert "my_photo.jpg" in names and len(names) >= 6
    (burst,) = {burst_of(n) for n in names} - {None}
    assert sorted(n for n in names if burst_of(n)) == [frame_name(burst, i) for i in range(len(names) - 1)]
    partials = [p for p in (desk / "mug").iterdir() if p.name.startswith(".")]
    assert len(partials) <= 1 and all(frame_files.PARTIAL_PATTERN.match(p.name) for p in partials)
    old = time.time() - 2 * frame_files.STALE_PARTIAL_SECONDS
    for p in partials:
        os.utime(p, (old, old))
    clip = make_video(tmp_path / "short.avi", 3)
    assert run_webcam.main(["--collect", "mug", "--into", str(desk), "--source", str(clip), "--no-display"]) == 0
    assert not [p for p in (desk / "mug").iterdir() if p.name.startswith(".")]
    assert len(complete_jpegs(desk / "mug")) == len(names) + 1


def test_sigterm_stops_with_complete_files(tmp_path):
    desk = user_desk(tmp_path)
    child = start_slow_collection(tmp_path, desk)
    wait_for_frames(desk / "mug", child, 3)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + 15, err
    names = complete_jpegs(desk / "mug")
    assert sorted(os.listdir(desk / "mug")) == names
    assert f"saved {len(names) - 1} frames of mug" in err and "stopped by SIGTERM" in err
