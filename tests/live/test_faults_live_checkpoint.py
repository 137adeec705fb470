"""Hostile or damaged checkpoints in run_webcam.py: one line each, before any large allocation, the file untouched;
and OpenCV's window as a user meets it (no Qt font warnings)."""
from __future__ import annotations

import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import run_webcam
from pipeline.common.checkpoint import read_checkpoint
from pipeline.common.errors import UserError
from pipeline.live import checks
from tests.conftest import CPU, one_error_line
from tests.helpers import ROOT

COMPAT = ROOT / "tests" / "data" / "compat" / "best.pt"  # a 3-class head on a random backbone, 64 px inputs


@pytest.fixture(scope="module")
def good():
    return torch.load(COMPAT, map_location="cpu", weights_only=True)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "frame.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return path


def _preprocess(good, **changes):
    return {"preprocess": {**good["preprocess"], **changes}}


CASES = {  # case: (edits to the checkpoint, words of the one line)
    "image size below the kernel": (lambda g: _preprocess(g, image_size=8, resize_size=8), "image_size is 8"),
    "image size of 20,000": (lambda g: _preprocess(g, image_size=20000, resize_size=20000), "image_size is 20000"),
    "resize size as a string": (lambda g: _preprocess(g, resize_size="72"), "resize_size is '72'"),
    "mean as a string": (lambda g: _preprocess(g, mean="abc"), "mean is 'abc'"),
    "zero std": (lambda g: _preprocess(g, std=[0.2, 0.0, 0.2]), "std is"),
    "head of wrong shape": (lambda g: {"head": {"weight": torch.zeros(5, 4096), "bias": torch.zeros(5)}}, "inconsistent"),
    "one-dimensional head": (lambda g: {"head": {"weight": torch.zeros(4096), "bias": torch.zeros(3)}}, "inconsistent"),
    "class list as a number": (lambda g: {"class_wnids": 3}, "field 'class_wnids' must be a list of strings, got 3"),
    "metric as a string": (lambda g: {"metrics": {**g["metrics"], "val_top1": "41%"}},
                           "field 'metrics' must be a dict of finite numbers, got 'val_top1': '41%'"),
    "metric inf": (lambda g: {"metrics": {**g["metrics"], "val_top1": float("inf")}}, "got 'val_top1': inf"),
    "metric NaN": (lambda g: {"metrics": {**g["metrics"], "val_loss": float("nan")}}, "got 'val_loss': nan"),
    "epoch as a string": (lambda g: {"epoch": "2"}, "field 'epoch' must be a whole number"),
    "precision fp64": (lambda g: {"precision": "fp64"}, "field 'precision' must be one of"),
    "NaN in the head": (lambda g: {"head": {"weight": torch.full_like(g["head"]["weight"], float("nan")),
                                            "bias": g["head"]["bias"]}}, "NaN or Inf weights"),
    "CMYK input": (lambda g: _preprocess(g, color="CMYK"), "expects 'CMYK' input"),
    "weights spec abc": (lambda g: {"weights_spec": "abc"}, "weights_spec is 'abc'"),
    "weights spec as a number": (lambda g: {"weights_spec": 5}, "field 'weights_spec' must be a string, got 5"),
    "l2_normalize as a string": (lambda g: {"l2_normalize": "yes"}, "field 'l2_normalize' must be true or false"),
    "zero classes": (lambda g: {"num_classes": 0, "class_wnids": [], "class_names": [],
                                "head": {"weight": torch.zeros(0, 4096), "bias": torch.zeros(0)}}, "field 'num_classes' must be"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_checkpoint_is_one_line(good, image, tmp_path, capsys, monkeypatch, case):
    edits, words = CASES[case]
    path = tmp_path / "best.pt"
    torch.save({**good, **edits(good)}, path)
    before = path.read_bytes()
    built = []
    from pipeline.live import torch_classifier
    monkeypatch.setattr(torch_classifier, "build_classifier", lambda *a, **k: built.append(1))  # nothing large is made
    preds = tmp_path / "preds.jsonl"
    assert run_webcam.main([*CPU, "--checkpoint", str(path), "--source", str(image), "--no-display",
                            "--predictions", str(preds)]) == 2
    line = one_error_line(capsys)
    assert words in line and str(path) in line
    assert not built and not preds.exists() and path.read_bytes() == before


@pytest.mark.parametrize("case", list(CASES))
def test_every_rule_is_the_checkpoint_reader_s(good, tmp_path, case):
    """The one validator (pipeline.common.checkpoint) refuses each case itself: the live runner and the export trust
    what read_checkpoint returns, and pipeline.live.checks holds no field rule."""
    edits, words = CASES[case]
    path = tmp_path / "best.pt"
    torch.save({**good, **edits(good)}, path)
    with pytest.raises(UserError) as err:
        read_checkpoint(path)
    assert words in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


class Hostile:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("kind", ["a pickled function", "a plain pickle"])
def test_a_checkpoint_that_is_not_weights_only_is_one_line(good, image, tmp_path, capsys, monkeypatch, kind):
    """Read by the one weights-only loader (pipeline.common.torch_files): refused in its one wording, without torch's
    advice to load it unsafely or its pickle-protocol warning."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "best.pt"
    if kind == "a pickled function":
        torch.save({**good, "config": Hostile()}, path)
    else:
        path.write_bytes(pickle.dumps({"format": "linear-head/1"}, protocol=4))
    with warnings.catch_warnings(record=True) as shown:  # pytest would keep a warning out of stderr
        warnings.simplefilter("always")
        assert run_webcam.main([*CPU, "--checkpoint", str(path), "--source", str(image), "--no-display"]) == 2
    assert not [w for w in shown if "protocol" in str(w.message)]
    err = capsys.readouterr().err
    line = err.strip()
    assert line.count("\n") == 0 and line.startswith("error: ") and str(path) in line, err
    assert ("refused for safety" in line and "posix.system" in line) if kind == "a pickled function" else \
        "not a readable checkpoint" in line
    assert "weights_only" not in err and "protocol" not in err and not (tmp_path / "pwned").exists()


def test_memory_is_checked_before_a_frame_is_allocated(good, image, tmp_path, capsys, monkeypatch):
    path = tmp_path / "best.pt"
    torch.save({**good, **_preprocess(good, image_size=2048, resize_size=2048)}, path)
    monkeypatch.setattr(checks, "available_memory", lambda: 2**30)  # 1 GiB: a 2048 px frame needs more
    assert run_webcam.main([*CPU, "--checkpoint", str(path), "--source", str(image), "--no-display"]) == 2
    line = one_error_line(capsys)
    assert "2048 px" in line and "GiB is available" in line


# ---------------------------------------------------------------------------------------------
# The window as a user meets it: OpenCV's bundled Qt under a real X server


def _free_display() -> int:
    for number in range(90, 140):
        if not os.path.exists(f"/tmp/.X11-unix/X{number}") and not os.path.exists(f"/tmp/.X{number}-lock"):
            return number
    pytest.skip("no free X display number")


@pytest.fixture
def xvfb():
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (apt-get install -y xvfb; .ci/run installs it)")
    if "QT" not in cv2.getBuildInformation().split("GUI:", 1)[-1].splitlines()[0].upper():
        pytest.skip("this OpenCV has no Qt GUI, so there are no Qt font warnings to check")
    number = _free_display()
    server = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "640x480x24", "-nolisten", "tcp"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):  # up to 10 s for the socket
            if os.path.exists(f"/tmp/.X11-unix/X{number}"):
                break
            if server.poll() is not None:
                pytest.skip("Xvfb did not start")
            time.sleep(0.1)
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_real_window_prints_no_qt_font_warnings(xvfb, tmp_path):
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 64))
    for i in range(3):
        writer.write(np.full((64, 64, 3), 60 * i, np.uint8))
    writer.release()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QT_")}
    env.update(DISPLAY=xvfb, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, str(ROOT / "run_webcam.py"), *CPU, "--checkpoint", str(COMPAT),
                          "--source", str(video), "--max-frames", "3"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "QFontDatabase" not in run.stderr and "Traceback" not in run.stderr
