"""The live runner: same answers as the cache, every source kind, the window, the outputs and the errors."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import run_webcam
from features.cache import open_split
from pipeline.live import torch_classifier
from pipeline.live import sources
from pipeline.datasets.images import read_rgb
from tests.helpers import CPU_ARGS, read_jsonl

RTOL, ATOL = 1e-4, 1e-5
NO_LOSSLESS = "this OpenCV build has no lossless video codec, so the video's frames are not the images' pixels"


@pytest.fixture(scope="module")
def trained(tiny_dataset, tiny_cache, tiny_head, tmp_path_factory):
    """A tiny dataset, its random-backbone fc7 cache, a head trained on it, and the cache's answers."""
    root = tmp_path_factory.mktemp("live")
    ds, feats, best = tiny_dataset, tiny_cache, tiny_head / "best.pt"
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    val = open_split(feats / "val.h5")
    fc7 = torch.from_numpy(val.read_features()).float()
    probs = torch.softmax(fc7 @ checkpoint["head"]["weight"].T + checkpoint["head"]["bias"], dim=1)
    cached = {str(ds / rel): p for rel, p in zip(val.paths, probs)}  # image file -> softmax(head(cached fc7))
    return {"ds": ds, "best": best, "checkpoint": checkpoint, "cached": cached, "root": root}


def predictions(trained: dict, source: Path, jsonl: Path, *extra: str) -> list[dict]:
    """Run the live loop headless on ``source`` with the trained head; its prediction lines."""
    assert run_webcam.main([*CPU_ARGS, "--checkpoint", str(trained["best"]), "--source", str(source), "--no-display",
                            "--predictions", str(jsonl), *extra]) == 0
    return read_jsonl(jsonl)


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
        probs = torch_classifier.predict_frames(model, preprocess, [read_rgb(path)])[0]
        torch.testing.assert_close(probs, expected, rtol=RTOL, atol=ATOL)
        frame = next(iter(sources.open_source(path)))  # the image-file source decodes it the same way
        assert frame.source == path and frame.bgr.shape == (64, 64, 3)
        one = torch_classifier.predict_frames(model, preprocess, [frame.rgb])[0]
        torch.testing.assert_close(one, expected, rtol=RTOL, atol=ATOL)


def test_a_head_on_l2_normalised_features_is_run_on_them_and_one_without_the_field_on_raw_ones(trained, tmp_path):
    """``l2_normalize`` (a zero-shot head's): live normalises the layer before the head; a checkpoint without it
    (every earlier one) reads raw features, as before."""
    checkpoint = {**trained["checkpoint"], "l2_normalize": True}
    path = tmp_path / "normalized.pt"
    torch.save(checkpoint, path)
    model, _, preprocess = torch_classifier.load_classifier(path, device="cpu")
    head = checkpoint["head"]
    for image, raw in list(trained["cached"].items())[:2]:
        fc7 = model.backbone(preprocess(read_rgb(image)[None]))["fc7"].float()
        expected = torch.softmax(torch.nn.functional.normalize(fc7, dim=1) @ head["weight"].T + head["bias"], dim=1)[0]
        probs = torch_classifier.predict_frames(model, preprocess, [read_rgb(image)])[0]
        torch.testing.assert_close(probs, expected, rtol=RTOL, atol=ATOL)
        assert not torch.allclose(probs, raw, atol=1e-3)  # raw fc7 gives other answers


def test_headless_video_run_writes_predictions_and_video(trained, val_video, tmp_path):
    video, order, frames, lossless = val_video
    jsonl, out = tmp_path / "preds.jsonl", tmp_path / "out.mp4"
    rc = run_webcam.main([*CPU_ARGS, "--checkpoint", str(trained["best"]), "--source", str(video), "--no-display",
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
            probs = torch_classifier.predict_frames(model, preprocess, [frame.rgb])[0]
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
    lines = predictions(trained, folder, tmp_path / "preds.jsonl", "--top-k", "10")
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
    rc = run_webcam.main([*CPU_ARGS, "--checkpoint", str(trained["best"]), "--source", str(video), "--no-display",
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


def test_predict_frames_equals_one_frame_at_a_time(trained):
    model, _, preprocess = torch_classifier.load_classifier(trained["best"], device="cpu")
    paths = sorted(trained["cached"])
    images = [read_rgb(p) for p in paths]
    images.append(torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 90, 50), dtype=np.uint8)))
    batched = torch_classifier.predict_frames(model, preprocess, images)  # mixed sizes: resized one by one, one forward
    assert batched.shape == (len(images), len(trained["checkpoint"]["class_wnids"])) and batched.dtype == torch.float32
    for image, probs in zip(images, batched):
        one = torch_classifier.predict_frames(model, preprocess, [image])[0]
        torch.testing.assert_close(probs, one, rtol=RTOL, atol=ATOL)
    for path, probs in zip(paths, batched):
        torch.testing.assert_close(probs, trained["cached"][path], rtol=RTOL, atol=ATOL)


def test_batched_video_run_equals_the_cache_and_the_batch_1_path(trained, val_video, tmp_path):
    video, order, _, lossless = val_video
    wnids = trained["checkpoint"]["class_wnids"]
    runs = {}
    for batch in (None, "5", "1"):  # the default (8), 5 (batches of 5, 5, 2) and one frame at a time
        jsonl = tmp_path / f"preds-{batch}.jsonl"
        extra = ["--batch-frames", batch] if batch else []
        rc = run_webcam.main([*CPU_ARGS, "--checkpoint", str(trained["best"]), "--source", str(video), "--no-display",
                              "--predictions", str(jsonl), *extra])
        assert rc == 0
        runs[batch] = read_jsonl(jsonl)
    single = runs["1"]
    assert [line["frame"] for line in single] == list(range(len(order)))  # every frame, once, in order
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


def test_batched_max_frames_is_exact_and_smoothing_follows_frame_order(trained, val_video, tmp_path):
    _, order, frames, _ = val_video
    video = tmp_path / "ten.avi"
    write_video(video, frames[:10])
    assert count_frames(video) == 10
    wnids = trained["checkpoint"]["class_wnids"]
    runs = {}
    for batch in ("3", "1"):
        jsonl = tmp_path / f"preds-{batch}.jsonl"
        rc = run_webcam.main([*CPU_ARGS, "--checkpoint", str(trained["best"]), "--source", str(video), "--no-display",
                              "--predictions", str(jsonl), "--batch-frames", batch, "--max-frames", "7",
                              "--smooth", "3"])
        assert rc == 0
        runs[batch] = read_jsonl(jsonl)
    lines = runs["3"]
    for run in runs.values():  # batches of 3 stop at 7 frames, as one frame at a time does
        assert [line["frame"] for line in run] == list(range(7))
    for line, one in zip(lines, runs["1"]):  # smoothed over the same frames, across batch boundaries
        assert probs_by_class(line, wnids) == pytest.approx(probs_by_class(one, wnids), rel=RTOL, abs=ATOL)


def test_batched_folder_with_mixed_image_sizes(trained, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    val = sorted(trained["cached"])
    sizes = [(64, 64), (80, 60), (50, 90), (64, 64), (300, 200), (41, 77), (64, 64)]
    for i, (w, h) in enumerate(sizes):
        bgr = cv2.cvtColor(read_rgb(val[i % len(val)]).permute(1, 2, 0).numpy(), cv2.COLOR_RGB2BGR)
        if (w, h) != (64, 64):
            bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_LINEAR)
        assert cv2.imwrite(str(folder / f"{i:02d}.png"), bgr)
    lines = predictions(trained, folder, tmp_path / "preds.jsonl", "--batch-frames", "4")
    paths = sorted(str(p) for p in folder.iterdir())
    assert [line["source"] for line in lines] == paths
    model, _, preprocess = torch_classifier.load_classifier(trained["best"], device="cpu")
    wnids = trained["checkpoint"]["class_wnids"]
    for line, path in zip(lines, paths):
        expected = torch_classifier.predict_frames(model, preprocess, [read_rgb(path)])[0]  # the batch-1 path
        assert line["topk"][0]["wnid"] == wnids[int(expected.argmax())]
        assert probs_by_class(line, wnids) == pytest.approx(expected.tolist(), rel=RTOL, abs=ATOL)


def test_a_large_photo_is_classified_from_the_pixels_extraction_reads(trained, tmp_path):
    """A 1200x900 JPEG in a folder: live decodes it reduced as extraction would (the checkpoint's preprocessing
    sets the floor), so its prediction is the one the cached row's would be, not a full decode's."""
    from pipeline.datasets.jpeg import decode_floor
    from pipeline.data.photos import photo_array, save_jpeg

    folder = tmp_path / "photos"
    folder.mkdir()
    big = save_jpeg(photo_array(1200, 900, seed=3), folder / "big.jpg")
    model, _, preprocess = torch_classifier.load_classifier(trained["best"], device="cpu")
    floor = decode_floor(preprocess)
    classifier = torch_classifier.TorchClassifier(trained["checkpoint"], device="cpu", precision="fp32")
    decoded = classifier.decode(big)
    assert decoded.shape[:2] == tuple(read_rgb(big, min_side=floor).shape[1:]) != (900, 1200)  # reduced
    [line] = predictions(trained, folder, tmp_path / "preds.jsonl", "--precision", "fp32")
    expected = torch_classifier.predict_frames(model, preprocess, [read_rgb(big, min_side=floor)])[0]
    wnids = trained["checkpoint"]["class_wnids"]
    assert probs_by_class(line, wnids) == pytest.approx(expected.tolist(), rel=RTOL, abs=ATOL)


def test_an_extremely_elongated_image_in_a_folder_is_skipped_by_every_runtime(trained, tmp_path, caplog):
    """A 1x4000 strip is a listed skip in extraction; live, each runtime's decoder skips it with the same reason
    (the torch runtime's run is shown; the OpenCV decoder of the torch-free runtimes says the same) and
    classifies the rest."""
    from pipeline.datasets.images import ImageDecodeError
    from tests.imagefolders import write_strip

    folder = tmp_path / "frames"
    folder.mkdir()
    val = sorted(trained["cached"])[:2]
    for path in val:
        (folder / Path(path).name).write_bytes(Path(path).read_bytes())
    strip = write_strip(folder / "strip.png", 1, 4000)
    caplog.set_level("INFO")
    lines = predictions(trained, folder, tmp_path / "preds.jsonl")
    assert [line["source"] for line in lines] == sorted(str(folder / Path(path).name) for path in val)
    with pytest.raises(ImageDecodeError) as torch_side:
        read_rgb(strip)
    assert f"skipping {strip}: {torch_side.value}" in caplog.text
    with pytest.raises(sources.DecodeError) as opencv_side:
        sources.opencv_decoder(min_side=144)(strip)
    assert str(opencv_side.value) == str(torch_side.value) and "4000:1" in str(torch_side.value)


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
