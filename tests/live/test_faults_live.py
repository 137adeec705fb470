"""Faults injected into the live runner (run_webcam.py): outputs never destroy inputs, a full disk or a SIGTERM
never leaves a complete-looking broken output, and a rerun recovers."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import run_webcam
from pipeline.live import runner as live
from pipeline.live import torch_classifier
from pipeline.live import checks, overlay, session
from pipeline.common.errors import UserError
from tests.conftest import CPU, one_error_line
from tests.live.test_live import count_frames, read_jsonl, trained, val_video, write_video  # noqa: F401
from tests.helpers import ROOT



def webcam(trained, *extra: str) -> int:
    return run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--no-display", *extra])


def no_partials(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".partial" in p.name]


@pytest.fixture
def video(val_video, tmp_path) -> tuple[Path, int]:
    """A copy of the 12-frame val video the test may point outputs at."""
    path = tmp_path / "clip.avi"
    path.write_bytes(val_video[0].read_bytes())
    return path, len(val_video[1])


# ---------------------------------------------------------------------------------------------
# Outputs never overwrite inputs


@pytest.mark.parametrize("case", ["output-is-source", "output-is-source-relative", "output-symlinks-source",
                                  "output-hardlinks-source", "predictions-is-checkpoint", "predictions-is-weights",
                                  "output-is-predictions", "predictions-is-an-image-of-the-folder",
                                  "output-new-image-in-the-folder", "output-is-a-folder"])
def test_an_output_that_is_an_input_is_refused(trained, video, tmp_path, monkeypatch, capsys, case):
    clip, _ = video
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(trained["best"].read_bytes())
    folder = tmp_path / "images"
    folder.mkdir()
    image = folder / "a.png"
    image.write_bytes(Path(next(iter(trained["cached"]))).read_bytes())
    weights = tmp_path / "alexnet.pth"
    weights.write_bytes(b"weights")
    source, extra = str(clip), []
    if case == "output-is-source":
        extra = ["--output", str(clip)]
    elif case == "output-is-source-relative":
        monkeypatch.chdir(tmp_path)
        extra = ["--output", "./sub/../clip.avi"]
        (tmp_path / "sub").mkdir()
    elif case == "output-symlinks-source":
        (tmp_path / "link.avi").symlink_to(clip)
        extra = ["--output", str(tmp_path / "link.avi")]
    elif case == "output-hardlinks-source":
        os.link(clip, tmp_path / "hard.avi")
        extra = ["--output", str(tmp_path / "hard.avi")]
    elif case == "predictions-is-checkpoint":
        extra = ["--predictions", str(checkpoint)]
    elif case == "predictions-is-weights":
        extra = ["--predictions", str(weights), "--weights", str(weights)]
    elif case == "output-is-predictions":
        extra = ["--output", str(tmp_path / "x.mp4"), "--predictions", str(tmp_path / "x.mp4")]
    elif case == "predictions-is-an-image-of-the-folder":
        source, extra = str(folder), ["--predictions", str(image)]
    elif case == "output-new-image-in-the-folder":
        source, extra = str(folder), ["--predictions", str(folder / "b.jpg")]
    else:
        extra = ["--output", str(folder)]
    before = {p: p.read_bytes() for p in (clip, checkpoint, image, weights)}
    capsys.readouterr()
    assert run_webcam.main([*CPU, "--checkpoint", str(checkpoint), "--no-display", "--source", source, *extra]) == 2
    line = one_error_line(capsys)
    assert "--output" in line or "--predictions" in line, line
    assert {p: p.read_bytes() for p in before} == before  # every input intact
    assert sorted(p.name for p in folder.iterdir()) == ["a.png"]
    assert no_partials(tmp_path)


def test_outputs_beside_the_inputs_are_fine(trained, video, tmp_path):
    clip, frames = video
    (tmp_path / "images").mkdir()
    assert webcam(trained, "--source", str(clip), "--output", str(tmp_path / "clip.mp4"),
                  "--predictions", str(tmp_path / "images" / "preds.jsonl")) == 0
    assert count_frames(tmp_path / "clip.mp4") == frames and len(read_jsonl(tmp_path / "images" / "preds.jsonl")) == frames


# ---------------------------------------------------------------------------------------------
# A full disk


class TruncatingWriter:
    """cv2.VideoWriter as on a full disk: it accepts every frame and reports nothing, but the file is cut short."""

    def __init__(self, path, *args):
        self.path = Path(path)
        self.real = overlay_cv2_writer(path, *args)

    def isOpened(self):
        return self.real.isOpened()

    def write(self, frame):
        self.real.write(frame)

    def release(self):
        self.real.release()
        with open(self.path, "r+b") as f:
            f.truncate(self.path.stat().st_size // 3)


overlay_cv2_writer = overlay.cv2.VideoWriter


def test_disk_full_while_writing_the_video(trained, video, tmp_path, monkeypatch, capsys):
    clip, frames = video
    out, preds = tmp_path / "out.mp4", tmp_path / "preds.jsonl"
    out.write_bytes(b"an older video the user keeps")
    monkeypatch.setattr(overlay.cv2, "VideoWriter", TruncatingWriter)
    capsys.readouterr()
    assert webcam(trained, "--source", str(clip), "--output", str(out), "--predictions", str(preds)) == 2
    line = one_error_line(capsys)
    assert str(out) in line and "not written completely" in line and f"of {frames} frames" in line
    assert out.read_bytes() == b"an older video the user keeps"  # not replaced by a broken one
    assert not preds.exists() and no_partials(tmp_path)  # nothing that looks complete
    monkeypatch.undo()  # space freed
    assert webcam(trained, "--source", str(clip), "--output", str(out), "--predictions", str(preds)) == 0
    assert count_frames(out) == frames and len(read_jsonl(preds)) == frames and no_partials(tmp_path)


class FullFile:
    """A predictions file on a full disk: every write fails with ENOSPC."""

    def __init__(self, *args, **kwargs):
        self.name = args[0]

    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    flush = write

    def fileno(self):
        raise OSError(errno.EBADF, "closed")

    def close(self):
        pass


def test_disk_full_while_writing_predictions(trained, video, tmp_path, monkeypatch, capsys):
    clip, frames = video
    out, preds = tmp_path / "out.mp4", tmp_path / "preds.jsonl"
    monkeypatch.setattr(overlay, "open", FullFile, raising=False)
    capsys.readouterr()
    assert webcam(trained, "--source", str(clip), "--output", str(out), "--predictions", str(preds)) == 2
    line = one_error_line(capsys)
    assert str(preds) in line and "No space left on device" in line
    assert not out.exists() and not preds.exists() and no_partials(tmp_path)
    monkeypatch.undo()
    assert webcam(trained, "--source", str(clip), "--output", str(out), "--predictions", str(preds)) == 0
    assert count_frames(out) == frames and len(read_jsonl(preds)) == frames


# ---------------------------------------------------------------------------------------------
# SIGTERM finishes the outputs as Ctrl-C does


def test_sigterm_in_process_finishes_the_outputs(trained, video, tmp_path, monkeypatch):
    clip, _ = video
    out, preds = tmp_path / "out.mp4", tmp_path / "preds.jsonl"
    real, calls = torch_classifier.predict_frames, []

    def predict(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the warm-up, then three frames
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch_classifier, "predict_frames", predict)
    before = signal.getsignal(signal.SIGTERM)
    assert webcam(trained, "--source", str(clip), "--output", str(out), "--predictions", str(preds),
                  "--batch-frames", "1") == 143
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    lines = read_jsonl(preds)
    assert [line["frame"] for line in lines] == [0, 1, 2]
    assert count_frames(out) == 3 and no_partials(tmp_path)


def test_sigterm_to_a_running_process(trained, val_video, tmp_path):
    """A real SIGTERM while a long video is written: a readable video and whole JSON lines, frame for frame."""
    _, _, frames, _ = val_video
    long_video = tmp_path / "long.avi"
    write_video(long_video, frames * 100)  # 1200 frames: far more than the run gets through
    out, preds = tmp_path / "out.mp4", tmp_path / "preds.jsonl"
    partial = overlay.partial_path(preds)
    child = subprocess.Popen([sys.executable, str(ROOT / "run_webcam.py"), *CPU, "--checkpoint", str(trained["best"]),
                              "--no-display", "--source", str(long_video), "--output", str(out), "--predictions",
                              str(preds), "--batch-frames", "2"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (partial.is_file() and partial.read_text().count("\n") >= 3):
            assert child.poll() is None and time.time() < deadline, child.stderr.read() if child.poll() is not None else ""
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 143, err
    assert "Traceback" not in err and "stopped by SIGTERM" in err
    lines = [json.loads(line) for line in preds.read_text().splitlines()]  # every line whole JSON
    assert len(lines) >= 3 and [line["frame"] for line in lines] == list(range(len(lines)))
    assert count_frames(out) == len(lines) < 1200
    assert no_partials(tmp_path)


# ---------------------------------------------------------------------------------------------
# Smaller edges


def test_empty_source_is_an_error(trained, capsys):
    assert webcam(trained, "--source", "") == 2
    assert "--source is empty" in one_error_line(capsys)
    assert webcam(trained, "--source", "  ") == 2
    assert "--source" in one_error_line(capsys)


def test_huge_batch_frames_is_an_error(trained, video, capsys):
    assert webcam(trained, "--source", str(video[0]), "--batch-frames", str(10**9)) == 2
    assert "--batch-frames" in one_error_line(capsys)


def test_batch_frames_is_lowered_to_fit_memory(trained, video, tmp_path, monkeypatch, caplog):
    clip, frames = video
    sizes = []
    real = torch_classifier.predict_frames
    monkeypatch.setattr(torch_classifier, "predict_frames", lambda m, p, images: sizes.append(len(images)) or real(m, p, images))
    monkeypatch.setattr(live, "available_memory", lambda: 2 * 3 * checks.NETWORK_BYTES_PER_FRAME)  # room for 3 frames
    assert webcam(trained, "--source", str(clip), "--predictions", str(tmp_path / "p.jsonl"), "--batch-frames", "8") == 0
    assert sizes[0] == 2 and max(sizes) == 2 and "do not fit in the memory" in caplog.text
    assert len(read_jsonl(tmp_path / "p.jsonl")) == frames


def test_qt_is_pointed_at_fonts_before_the_window_opens(trained, video, monkeypatch):
    monkeypatch.delenv("QT_QPA_FONTDIR", raising=False)
    monkeypatch.delenv("QT_LOGGING_RULES", raising=False)
    seen = []
    monkeypatch.setattr(session, "display_available", lambda: True)
    monkeypatch.setattr(overlay.cv2, "imshow", lambda window, image: seen.append(
        (os.environ.get("QT_LOGGING_RULES"), os.environ.get("QT_QPA_FONTDIR"))))
    monkeypatch.setattr(overlay.cv2, "waitKey", lambda delay: ord("q"))
    monkeypatch.setattr(overlay.cv2, "destroyAllWindows", lambda: None)
    monkeypatch.setattr(overlay.cv2, "getWindowProperty", lambda window, prop: 1.0)
    assert run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--source", str(video[0])]) == 0
    rules, fonts = seen[0]
    assert rules == "qt.qpa.fonts=false"
    assert fonts is None or Path(fonts).is_dir()
    monkeypatch.setenv("QT_LOGGING_RULES", "mine")  # a user's own setting is kept
    overlay.quiet_qt()
    assert os.environ["QT_LOGGING_RULES"] == "mine"


def test_random_backbone_is_said_on_every_frame(trained, video, tmp_path, monkeypatch):
    warnings = []
    real = live.annotate
    monkeypatch.setattr(live, "annotate", lambda bgr, topk, fps, warning=None: warnings.append(warning)
                        or real(bgr, topk, fps, warning))
    assert webcam(trained, "--source", str(video[0]), "--output", str(tmp_path / "out.mp4")) == 0
    assert warnings and set(warnings) == {live.RANDOM_WARNING}  # the checkpoint's backbone is random:seed=0
    plain = overlay.annotate(np.full((480, 640, 3), 200, np.uint8), [{"name": "goldfish", "prob": 0.5}], 30.0)
    marked = overlay.annotate(np.full((480, 640, 3), 200, np.uint8), [{"name": "goldfish", "prob": 0.5}], 30.0,
                              live.RANDOM_WARNING)
    colored = (marked == overlay.WARNING_COLOR).all(-1)
    assert colored.any() and not (plain == overlay.WARNING_COLOR).all(-1).any()


def test_checkpoint_with_a_nan_head_writes_no_jsonl(trained, tmp_path, capsys):
    checkpoint = torch.load(trained["best"], weights_only=True)
    checkpoint["head"]["bias"][0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(checkpoint, bad)
    preds = tmp_path / "preds.jsonl"
    assert run_webcam.main([*CPU, "--checkpoint", str(bad), "--no-display", "--source", next(iter(trained["cached"])),
                            "--predictions", str(preds)]) == 2
    assert "NaN or Inf" in one_error_line(capsys)
    assert not preds.exists() and no_partials(tmp_path)


def test_non_finite_probabilities_are_never_written_as_json(tmp_path):
    output = overlay.PredictionsOutput(tmp_path / "p.jsonl")
    with pytest.raises(UserError, match="non-finite"):
        output.write({"frame": 0, "topk": [{"prob": float("nan")}]})
    output.discard()
    assert not list(tmp_path.iterdir())


def test_outputs_through_a_symlink_and_to_a_pipe(trained, video, tmp_path):
    clip, frames = video
    target = tmp_path / "real" / "preds.jsonl"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "preds.jsonl"
    link.symlink_to(target)
    assert webcam(trained, "--source", str(clip), "--predictions", str(link)) == 0
    assert link.is_symlink() and len(read_jsonl(target)) == frames  # the link's target was replaced, the link kept
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE, text=True)
    assert webcam(trained, "--source", str(clip), "--predictions", str(fifo)) == 0  # written directly, not renamed
    lines = reader.communicate(timeout=60)[0].splitlines()
    assert len(lines) == frames and fifo.exists() and not fifo.is_file() and no_partials(tmp_path)


def test_unreadable_image_in_a_folder_stops_the_run(tmp_path, monkeypatch):
    """An image that cannot be read (I/O error) is not skipped like an undecodable one: the run stops, naming it."""
    import errno

    import numpy as np
    from PIL import Image

    from pipeline.datasets import images
    from pipeline.live import sources
    from pipeline.common.errors import UserError

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    real = images.read_bytes

    def failing(path):
        if str(path).endswith("1.png"):
            raise images.ImageReadError(errno.EIO, "Input/output error", str(path))
        return real(path)

    monkeypatch.setattr(images, "read_bytes", failing)
    with pytest.raises(UserError, match=r"cannot read .*1\.png \(Input/output error\)"):
        list(sources.open_source(str(folder)))
