"""The live runner's window, cameras, unreadable sources, bad checkpoints and bad options."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import run_webcam
from pipeline.live import overlay, session
from pipeline.live import sources
from tests.helpers import CPU_ARGS, one_error_line, read_jsonl
from tests.live.test_live import FakeCamera, batch_sizes, trained, val_video  # noqa: F401


# ---------------------------------------------------------------------------------------------
# The window


def test_display_stops_on_q_and_destroys_windows(trained, val_video, tmp_path, monkeypatch):
    calls = {"imshow": [], "waitKey": 0, "destroy": 0}

    def imshow(window, image):
        calls["imshow"].append((window, image.shape))

    def wait_key(delay):
        calls["waitKey"] += 1
        return ord("q") if calls["waitKey"] == 2 else -1

    def destroy():
        calls["destroy"] += 1

    monkeypatch.setattr(session, "display_available", lambda: True)
    monkeypatch.setattr(overlay.cv2, "imshow", imshow)
    monkeypatch.setattr(overlay.cv2, "waitKey", wait_key)
    monkeypatch.setattr(overlay.cv2, "destroyAllWindows", destroy)
    monkeypatch.setattr(overlay.cv2, "getWindowProperty", lambda window, prop: 1.0)
    video = val_video[0]
    jsonl = tmp_path / "preds.jsonl"
    rc = run_webcam.main([*CPU_ARGS, "--checkpoint", str(trained["best"]), "--source", str(video), "--predictions", str(jsonl)])
    assert rc == 0
    assert len(calls["imshow"]) == 2 and len(read_jsonl(jsonl)) == 2  # stopped at q on the 2nd frame
    assert calls["imshow"][0][1] == (overlay.MIN_VIEW_SIDE, overlay.MIN_VIEW_SIDE, 3)  # 64x64 enlarged to be legible
    assert calls["destroy"] == 1


def test_window_is_destroyed_when_the_run_fails(trained, tmp_path, monkeypatch):
    destroyed = []
    monkeypatch.setattr(session, "display_available", lambda: True)
    monkeypatch.setattr(overlay.cv2, "imshow", lambda window, image: None)
    monkeypatch.setattr(overlay.cv2, "waitKey", lambda delay: -1)
    monkeypatch.setattr(overlay.cv2, "getWindowProperty", lambda window, prop: 1.0)
    monkeypatch.setattr(overlay.cv2, "destroyAllWindows", lambda: destroyed.append(True))
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "bad.png").write_bytes(b"not an image")
    rc = run_webcam.main([*CPU_ARGS, "--checkpoint", str(trained["best"]), "--source", str(folder)])
    assert rc == 2 and destroyed


def test_annotate_draws_on_a_dark_box():
    frame = np.full((480, 640, 3), 200, np.uint8)
    topk = [{"wnid": "n1", "name": "goldfish", "prob": 0.75}, {"wnid": "n2", "name": "teapot", "prob": 0.25}]
    out = overlay.annotate(frame, topk, 42.0)
    assert out is frame
    assert frame[2, 2].max() < 100 and frame[-1, -1].tolist() == [200, 200, 200]  # box top-left, frame untouched elsewhere
    assert (frame[:80, :200] == 255).any()  # white text


def test_display_detection(monkeypatch):
    monkeypatch.setattr(overlay.sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert not overlay.display_available()
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    monkeypatch.setattr(overlay, "_opencv_has_gui", lambda: True)
    assert overlay.display_available()


def test_camera_that_stops_ends_cleanly(trained, tmp_path, monkeypatch, caplog, batch_sizes):
    camera = FakeCamera(3)
    monkeypatch.setattr(sources, "open_capture", lambda target: camera)
    jsonl = tmp_path / "preds.jsonl"
    rc = run_webcam.main([*CPU_ARGS, "--checkpoint", str(trained["best"]), "--source", "0", "--no-display",
                          "--predictions", str(jsonl), "--batch-frames", "8"])
    assert rc == 0 and camera.released
    assert [line["source"] for line in read_jsonl(jsonl)] == ["0", "0", "0"]
    assert "camera 0 stopped delivering frames after 3 frames" in caplog.text
    assert batch_sizes == [1, 1, 1, 1]  # a camera is never batched, whatever --batch-frames says


def test_camera_without_frames_is_an_error(trained, monkeypatch, capsys):
    camera = FakeCamera(0)
    monkeypatch.setattr(sources, "open_capture", lambda target: camera)
    assert run_webcam.main([*CPU_ARGS, "--checkpoint", str(trained["best"]), "--source", "3", "--no-display"]) == 2
    assert "camera 3" in one_error_line(capsys) and camera.released


def test_camera_that_will_not_open(trained, capsys):
    assert run_webcam.main([*CPU_ARGS, "--checkpoint", str(trained["best"]), "--source", "7", "--no-display"]) == 2
    line = one_error_line(capsys)
    assert "camera 7" in line and "--source" in line


@pytest.mark.parametrize("name, content, message", [
    ("broken.mp4", b"\x00garbage" * 500, "cannot open video"),
    ("broken.jpg", b"\xff\xd8 not a jpeg", "cannot read image"),
    ("nothing-here.mp4", None, "no such file or folder"),
])
def test_unreadable_sources(trained, tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert run_webcam.main([*CPU_ARGS, "--checkpoint", str(trained["best"]), "--source", str(path), "--no-display"]) == 2
    assert message in one_error_line(capsys)


def _edit(checkpoint: dict, **changes) -> dict:
    edited = dict(checkpoint)
    for key, value in changes.items():
        if value is None:
            del edited[key]
        else:
            edited[key] = value
    return edited


@pytest.mark.parametrize("case, message", [
    ("missing", "no checkpoint at"),
    ("garbage", "not a readable checkpoint"),
    ("truncated", "not a readable checkpoint"),
    ("not-a-dict", "not a head checkpoint"),
    ("format", "checkpoint format"),
    ("no-head", "lacks head"),
    ("wrong-shape", "inconsistent"),
    ("fingerprint", "fingerprint"),
])
def test_bad_checkpoints(trained, tmp_path, capsys, case, message):
    path = tmp_path / "best.pt"
    good = trained["checkpoint"]
    if case == "garbage":
        path.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    elif case == "truncated":
        path.write_bytes(trained["best"].read_bytes()[:5000])
    elif case == "not-a-dict":
        torch.save([1, 2, 3], path)
    elif case != "missing":
        edits = {"format": {"format": "something-else/9"}, "no-head": {"head": None},
                 "wrong-shape": {"head": {"weight": torch.zeros(5, 4096), "bias": torch.zeros(5)}},
                 "fingerprint": {"weights_fingerprint": "0" * 64}}[case]
        torch.save(_edit(good, **edits), path)
    source = str(next(iter(trained["cached"])))
    assert run_webcam.main([*CPU_ARGS, "--checkpoint", str(path), "--source", source, "--no-display"]) == 2
    assert message in one_error_line(capsys)


def test_weights_override_must_match_the_fingerprint(trained, capsys):
    source = str(next(iter(trained["cached"])))
    assert run_webcam.main([*CPU_ARGS, "--checkpoint", str(trained["best"]), "--source", source, "--no-display",
                            "--weights", "random", "--seed", "1"]) == 2
    line = one_error_line(capsys)
    assert "--weights random:seed=1" in line and "random:seed=0" in line
    assert run_webcam.main([*CPU_ARGS, "--checkpoint", str(trained["best"]), "--source", source, "--no-display",
                            "--weights", "random", "--seed", "0"]) == 0  # the right backbone, named explicitly


def test_bad_options(trained, capsys):
    assert run_webcam.main([*CPU_ARGS, "--checkpoint", str(trained["best"]), "--top-k", "0", "--no-display"]) == 2
    assert "--top-k" in one_error_line(capsys)
    assert run_webcam.main([*CPU_ARGS, "--checkpoint", str(trained["best"]), "--batch-frames", "0", "--no-display"]) == 2
    assert "--batch-frames" in one_error_line(capsys)
