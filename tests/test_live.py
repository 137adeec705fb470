"""The live runner: same answers as the cache, every source kind, the window, the outputs and the errors."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import run_extract
import run_train_head
import run_webcam
from features.cache import open_split
from pipeline.live import runner as live
from pipeline.live import torch_classifier
from pipeline.live import overlay
from pipeline.common import sources
from pipeline.common.images import read_rgb
from pipeline.data.synthetic import make_tiny_imagenet
from tests.conftest import CPU, one_error_line

RTOL, ATOL = 1e-4, 1e-5
NO_LOSSLESS = "this OpenCV build has no lossless video codec, so the video's frames are not the images' pixels"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny dataset, its random-backbone fc7 cache, a head trained on it, and the cache's answers."""
    root = tmp_path_factory.mktemp("live")
    ds = make_tiny_imagenet(root / "ds", num_classes=3, train_per_class=4, val_per_class=2)
    feats, head = root / "feats", root / "head"
    assert run_extract.main([*CPU, "--data", str(ds), "--weights", "random", "--seed", "0", "--out", str(feats),
                             "--no-progress", "--precision", "fp32"]) == 0
    assert run_train_head.main([*CPU, "--features", str(feats), "--out", str(head), "--epochs", "2", "--no-progress"]) == 0
    best = head / "best.pt"
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    val = open_split(feats / "val.h5")
    fc7 = torch.from_numpy(val.read_features()).float()
    probs = torch.softmax(fc7 @ checkpoint["head"]["weight"].T + checkpoint["head"]["bias"], dim=1)
    cached = {str(ds / rel): p for rel, p in zip(val.paths, probs)}  # image file -> softmax(head(cached fc7))
    return {"ds": ds, "best": best, "checkpoint": checkpoint, "cached": cached, "root": root}


_BACKBONES: dict = {}


@pytest.fixture(autouse=True)
def reuse_backbones(monkeypatch):
    """Build each (spec, seed) backbone once for the whole file: it is a pure function and takes seconds."""
    real = torch_classifier.load_backbone

    def cached(spec, *, seed=0):
        key = (spec, seed)
        if key not in _BACKBONES:
            _BACKBONES[key] = real(spec, seed=seed)
        return _BACKBONES[key]

    monkeypatch.setattr(torch_classifier, "load_backbone", cached)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def count_frames(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    n = 0
    while capture.read()[0]:
        n += 1
    capture.release()
    return n


def write_video(path: Path, frames: list[np.ndarray]) -> bool:
    """Write BGR frames with the first lossless codec this cv2 build has (else MJPG); True when lossless."""
    h, w = frames[0].shape[:2]
    for fourcc in ("FFV1", "png ", "HFYU", "MJPG"):
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (w, h))
        if not writer.isOpened():
            continue
        for frame in frames:
            writer.write(frame)
        writer.release()
        capture = cv2.VideoCapture(str(path))
        back = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            back.append(frame)
        capture.release()
        if len(back) == len(frames):
            return all(np.array_equal(a, b) for a, b in zip(frames, back))
    raise AssertionError("this cv2 build writes no usable video codec")


@pytest.fixture(scope="module")
def val_video(trained):
    """The val images, each twice, as a lossless video (frames decoded exactly as extraction decodes them)."""
    paths = sorted(trained["cached"])
    order = [p for p in paths for _ in range(2)]
    frames = [cv2.cvtColor(read_rgb(p).permute(1, 2, 0).numpy(), cv2.COLOR_RGB2BGR) for p in order]
    video = trained["root"] / "val.avi"
    lossless = write_video(video, frames)
    return video, order, frames, lossless


# ---------------------------------------------------------------------------------------------
# Same answers as the cache


def test_live_path_gives_the_cached_probabilities(trained):
    model, checkpoint, preprocess = torch_classifier.load_classifier(trained["best"], device="cpu")
    assert not model.training and checkpoint["class_wnids"] == trained["checkpoint"]["class_wnids"]
    for path, expected in trained["cached"].items():
        probs = torch_classifier.predict_frame(model, preprocess, read_rgb(path))
        torch.testing.assert_close(probs, expected, rtol=RTOL, atol=ATOL)
        frame = next(iter(sources.open_source(path)))  # the image-file source decodes it the same way
        assert frame.source == path and frame.bgr.shape == (64, 64, 3)
        torch.testing.assert_close(torch_classifier.predict_frame(model, preprocess, frame.rgb), expected, rtol=RTOL, atol=ATOL)


def test_headless_video_run_writes_predictions_and_video(trained, val_video, tmp_path):
    video, order, frames, lossless = val_video
    jsonl, out = tmp_path / "preds.jsonl", tmp_path / "out.mp4"
    rc = run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--source", str(video), "--no-display",
                          "--predictions", str(jsonl), "--output", str(out)])
    assert rc == 0
    lines = read_jsonl(jsonl)
    assert [line["frame"] for line in lines] == list(range(len(order)))
    assert all(line["source"] == str(video) and line["latency_ms"] > 0 and len(line["topk"]) == 3 for line in lines)
    assert count_frames(out) == len(order)
    names = dict(zip(trained["checkpoint"]["class_wnids"], trained["checkpoint"]["class_names"]))
    if not lossless:  # only a lossy codec: compare with the live path on the decoded frames, then say so
        model, _, preprocess = torch_classifier.load_classifier(trained["best"])
        capture = cv2.VideoCapture(str(video))
        for line in lines:
            frame = sources.bgr_to_frame("", capture.read()[1])
            probs = torch_classifier.predict_frame(model, preprocess, frame.rgb)
            assert line["topk"][0]["wnid"] == trained["checkpoint"]["class_wnids"][int(probs.argmax())]
        capture.release()
        pytest.skip(f"live equals the cache not checked: {NO_LOSSLESS}")
    for line, path in zip(lines, order):  # the decoded frames are the images' pixels: the cache's answers exactly
        expected = trained["cached"][path]
        top = line["topk"][0]
        assert top["wnid"] == trained["checkpoint"]["class_wnids"][int(expected.argmax())]
        assert top["name"] == names[top["wnid"]]
        assert top["prob"] == pytest.approx(float(expected.max()), rel=RTOL, abs=ATOL)


def test_folder_source_records_each_image_path(trained, tmp_path):
    folder = trained["ds"] / "val" / "images"
    jsonl = tmp_path / "preds.jsonl"
    rc = run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--source", str(folder), "--no-display",
                          "--predictions", str(jsonl), "--top-k", "10"])
    assert rc == 0
    lines = read_jsonl(jsonl)
    expected_paths = sorted(str(p) for p in folder.iterdir())
    assert [line["source"] for line in lines] == expected_paths
    for line in lines:
        expected = trained["cached"][line["source"]]
        assert len(line["topk"]) == 3  # top-k is capped at the number of classes
        assert line["topk"][0]["wnid"] == trained["checkpoint"]["class_wnids"][int(expected.argmax())]
        assert [t["prob"] for t in line["topk"]] == pytest.approx(sorted(expected.tolist(), reverse=True),
                                                                  rel=RTOL, abs=ATOL)


def test_max_frames_and_smoothing(trained, val_video, tmp_path):
    video, order, _, lossless = val_video
    jsonl = tmp_path / "preds.jsonl"
    rc = run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--source", str(video), "--no-display",
                          "--predictions", str(jsonl), "--max-frames", "4", "--smooth", "3"])
    assert rc == 0
    lines = read_jsonl(jsonl)
    assert len(lines) == 4
    if not lossless:
        pytest.skip(f"smoothing against the cache not checked: {NO_LOSSLESS}")
    wnids = trained["checkpoint"]["class_wnids"]  # frame 3 shows the mean of frames 1..3
    mean = torch.stack([trained["cached"][p] for p in order[1:4]]).mean(0)
    got = {t["wnid"]: t["prob"] for t in lines[3]["topk"]}
    assert [got[w] for w in wnids] == pytest.approx(mean.tolist(), rel=RTOL, abs=ATOL)


# ---------------------------------------------------------------------------------------------
# Frame batching (files and folders)


def probs_by_class(line: dict, wnids: list[str]) -> list[float]:
    got = {t["wnid"]: t["prob"] for t in line["topk"]}
    return [got[w] for w in wnids]


@pytest.fixture
def batch_sizes(monkeypatch):
    """The sizes of the batches run_live hands to predict_frames (the warm-up pass first)."""
    sizes = []
    real = torch_classifier.predict_frames

    def recording(model, preprocess, images, **kwargs):
        sizes.append(len(images))
        return real(model, preprocess, images, **kwargs)

    monkeypatch.setattr(torch_classifier, "predict_frames", recording)
    return sizes


def test_predict_frames_equals_predict_frame_one_by_one(trained):
    model, _, preprocess = torch_classifier.load_classifier(trained["best"], device="cpu")
    paths = sorted(trained["cached"])
    images = [read_rgb(p) for p in paths]
    images.append(torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 90, 50), dtype=np.uint8)))
    batched = torch_classifier.predict_frames(model, preprocess, images)  # mixed sizes: resized one by one, one forward
    assert batched.shape == (len(images), len(trained["checkpoint"]["class_wnids"])) and batched.dtype == torch.float32
    for image, probs in zip(images, batched):
        torch.testing.assert_close(probs, torch_classifier.predict_frame(model, preprocess, image), rtol=RTOL, atol=ATOL)
    for path, probs in zip(paths, batched):
        torch.testing.assert_close(probs, trained["cached"][path], rtol=RTOL, atol=ATOL)


def test_batched_video_run_equals_the_cache_and_the_batch_1_path(trained, val_video, tmp_path, batch_sizes):
    video, order, _, lossless = val_video
    wnids = trained["checkpoint"]["class_wnids"]
    runs = {}
    for batch in (None, "5", "1"):  # the default (8), 5 (batches of 5, 5, 2) and one frame at a time
        jsonl = tmp_path / f"preds-{batch}.jsonl"
        extra = ["--batch-frames", batch] if batch else []
        rc = run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--source", str(video), "--no-display",
                              "--predictions", str(jsonl), *extra])
        assert rc == 0
        runs[batch] = read_jsonl(jsonl)
    assert batch_sizes == [8, 8, 4] + [5, 5, 5, 2] + [1] * (1 + len(order))  # warm-up, then the video
    single = runs["1"]
    for batch in (None, "5"):
        lines = runs[batch]
        assert [line["frame"] for line in lines] == list(range(len(order)))
        assert all(line["source"] == str(video) and line["latency_ms"] > 0 for line in lines)
        for line, one in zip(lines, single):
            assert line["topk"][0]["wnid"] == one["topk"][0]["wnid"]
            assert probs_by_class(line, wnids) == pytest.approx(probs_by_class(one, wnids), rel=RTOL, abs=ATOL)
    # the frames of a batch share its model time
    assert len({line["latency_ms"] for line in runs["5"][:5]}) == 1
    if not lossless:
        pytest.skip(f"batched live equals the cache not checked: {NO_LOSSLESS}")
    for batch in (None, "5"):
        for line, path in zip(runs[batch], order):
            expected = trained["cached"][path]
            assert line["topk"][0]["wnid"] == wnids[int(expected.argmax())]
            assert probs_by_class(line, wnids) == pytest.approx(expected.tolist(), rel=RTOL, abs=ATOL)


def test_batched_max_frames_is_exact_and_smoothing_follows_frame_order(trained, val_video, tmp_path, batch_sizes):
    _, order, frames, _ = val_video
    video = tmp_path / "ten.avi"
    write_video(video, frames[:10])
    assert count_frames(video) == 10
    wnids = trained["checkpoint"]["class_wnids"]
    runs = {}
    for batch in ("3", "1"):
        jsonl = tmp_path / f"preds-{batch}.jsonl"
        rc = run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--source", str(video), "--no-display",
                              "--predictions", str(jsonl), "--batch-frames", batch, "--max-frames", "7",
                              "--smooth", "3"])
        assert rc == 0
        runs[batch] = read_jsonl(jsonl)
    assert batch_sizes == [3, 3, 3, 1] + [1] * 8  # 3 + 3 + 1 = 7 frames read, no more
    lines = runs["3"]
    assert len(lines) == 7 and [line["frame"] for line in lines] == list(range(7))
    for line, one in zip(lines, runs["1"]):  # smoothed over the same frames, across batch boundaries
        assert probs_by_class(line, wnids) == pytest.approx(probs_by_class(one, wnids), rel=RTOL, abs=ATOL)


def test_batched_folder_with_mixed_image_sizes(trained, tmp_path, batch_sizes):
    folder = tmp_path / "mixed"
    folder.mkdir()
    val = sorted(trained["cached"])
    sizes = [(64, 64), (80, 60), (50, 90), (64, 64), (300, 200), (41, 77), (64, 64)]
    for i, (w, h) in enumerate(sizes):
        bgr = cv2.cvtColor(read_rgb(val[i % len(val)]).permute(1, 2, 0).numpy(), cv2.COLOR_RGB2BGR)
        if (w, h) != (64, 64):
            bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_LINEAR)
        assert cv2.imwrite(str(folder / f"{i:02d}.png"), bgr)
    jsonl = tmp_path / "preds.jsonl"
    rc = run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--source", str(folder), "--no-display",
                          "--predictions", str(jsonl), "--batch-frames", "4"])
    assert rc == 0
    assert batch_sizes[1:] == [4, 3]
    lines = read_jsonl(jsonl)
    paths = sorted(str(p) for p in folder.iterdir())
    assert [line["source"] for line in lines] == paths
    model, _, preprocess = torch_classifier.load_classifier(trained["best"], device="cpu")
    wnids = trained["checkpoint"]["class_wnids"]
    for line, path in zip(lines, paths):
        expected = torch_classifier.predict_frame(model, preprocess, read_rgb(path))  # the batch-1 path
        assert line["topk"][0]["wnid"] == wnids[int(expected.argmax())]
        assert probs_by_class(line, wnids) == pytest.approx(expected.tolist(), rel=RTOL, abs=ATOL)


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

    monkeypatch.setattr(live, "display_available", lambda: True)
    monkeypatch.setattr(overlay.cv2, "imshow", imshow)
    monkeypatch.setattr(overlay.cv2, "waitKey", wait_key)
    monkeypatch.setattr(overlay.cv2, "destroyAllWindows", destroy)
    monkeypatch.setattr(overlay.cv2, "getWindowProperty", lambda window, prop: 1.0)
    video = val_video[0]
    jsonl = tmp_path / "preds.jsonl"
    rc = run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--source", str(video), "--predictions", str(jsonl)])
    assert rc == 0
    assert len(calls["imshow"]) == 2 and len(read_jsonl(jsonl)) == 2  # stopped at q on the 2nd frame
    assert calls["imshow"][0][1] == (overlay.MIN_VIEW_SIDE, overlay.MIN_VIEW_SIDE, 3)  # 64x64 enlarged to be legible
    assert calls["destroy"] == 1


def test_window_is_destroyed_when_the_run_fails(trained, tmp_path, monkeypatch):
    destroyed = []
    monkeypatch.setattr(live, "display_available", lambda: True)
    monkeypatch.setattr(overlay.cv2, "imshow", lambda window, image: None)
    monkeypatch.setattr(overlay.cv2, "waitKey", lambda delay: -1)
    monkeypatch.setattr(overlay.cv2, "getWindowProperty", lambda window, prop: 1.0)
    monkeypatch.setattr(overlay.cv2, "destroyAllWindows", lambda: destroyed.append(True))
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "bad.png").write_bytes(b"not an image")
    rc = run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--source", str(folder)])
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


# ---------------------------------------------------------------------------------------------
# Cameras (faked) and errors


class FakeCamera:
    """A capture that delivers ``frames`` frames, then (False, None) for ever."""

    def __init__(self, frames: int):
        self.left, self.released = frames, False

    def isOpened(self):
        return True

    def get(self, prop):
        return {cv2.CAP_PROP_FRAME_WIDTH: 64, cv2.CAP_PROP_FRAME_HEIGHT: 48}.get(prop, 0)

    def set(self, prop, value):
        return False

    def read(self):
        if self.left <= 0:
            return False, None
        self.left -= 1
        return True, np.random.default_rng(self.left).integers(0, 255, (48, 64, 3), dtype=np.uint8)

    def release(self):
        self.released = True


def test_camera_that_stops_ends_cleanly(trained, tmp_path, monkeypatch, caplog, batch_sizes):
    camera = FakeCamera(3)
    monkeypatch.setattr(sources, "open_capture", lambda target: camera)
    jsonl = tmp_path / "preds.jsonl"
    rc = run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--source", "0", "--no-display",
                          "--predictions", str(jsonl), "--batch-frames", "8"])
    assert rc == 0 and camera.released
    assert [line["source"] for line in read_jsonl(jsonl)] == ["0", "0", "0"]
    assert "camera 0 stopped delivering frames after 3 frames" in caplog.text
    assert batch_sizes == [1, 1, 1, 1]  # a camera is never batched, whatever --batch-frames says


def test_camera_without_frames_is_an_error(trained, monkeypatch, capsys):
    camera = FakeCamera(0)
    monkeypatch.setattr(sources, "open_capture", lambda target: camera)
    assert run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--source", "3", "--no-display"]) == 2
    assert "camera 3" in one_error_line(capsys) and camera.released


def test_camera_that_will_not_open(trained, capsys):
    assert run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--source", "7", "--no-display"]) == 2
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
    assert run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--source", str(path), "--no-display"]) == 2
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
    assert run_webcam.main([*CPU, "--checkpoint", str(path), "--source", source, "--no-display"]) == 2
    assert message in one_error_line(capsys)


def test_weights_override_must_match_the_fingerprint(trained, capsys):
    source = str(next(iter(trained["cached"])))
    assert run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--source", source, "--no-display",
                            "--weights", "random", "--seed", "1"]) == 2
    line = one_error_line(capsys)
    assert "--weights random:seed=1" in line and "random:seed=0" in line
    assert run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--source", source, "--no-display",
                            "--weights", "random", "--seed", "0"]) == 0  # the right backbone, named explicitly


def test_bad_options(trained, capsys):
    assert run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--top-k", "0", "--no-display"]) == 2
    assert "--top-k" in one_error_line(capsys)
    assert run_webcam.main([*CPU, "--checkpoint", str(trained["best"]), "--batch-frames", "0", "--no-display"]) == 2
    assert "--batch-frames" in one_error_line(capsys)
