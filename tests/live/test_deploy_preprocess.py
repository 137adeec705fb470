"""The torch-free runtimes' preprocessing and messages, without the deploy extra: the numpy port of the recorded
preprocessing gives torch's bytes exactly, shrinking and enlarging; a missing extra is one line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import run_webcam
from pipeline.datasets.images import read_rgb
from pipeline.datasets.jpeg import decode_floor
from pipeline.common.preprocess import Preprocess
from pipeline.live.sources import opencv_decoder
from pipeline.data.photos import photo_array, save_jpeg
from pipeline.live import export, onnx_runtimes
from pipeline.live.numpy_preprocess import preprocess_frames, resize_crop
from tests.conftest import CPU, one_error_line
from tests.helpers import ROOT

COMPAT = ROOT / "tests" / "data" / "compat" / "best.pt"
# (height, width): a webcam frame and Tiny ImageNet's 64x64 (the two cases that matter), shrink and enlarge, odd and
# prime sides, one-pixel edges, very wide and very tall, a side that keeps its size (that pass is skipped)
SIZES = [(480, 640), (64, 64), (1080, 1920), (300, 200), (37, 90), (1, 1), (1, 300), (299, 1), (2, 3), (100, 1000),
         (999, 17), (256, 256), (255, 257), (224, 224), (333, 444), (701, 523)]
PREPROCESS = {"224-crop": Preprocess(), "64-crop": Preprocess(image_size=64, resize_size=72),
              "64-resize": Preprocess(image_size=64, resize_size=64, mode="resize"),
              "224-resize": Preprocess(image_size=224, resize_size=224, mode="resize"),
              "224-crop-bicubic": Preprocess(interpolation="bicubic"),
              # the zoo's records: timm's crop_pct (resnet18.a1_in1k: floor(224 / 0.95) = 235), a resize to the crop
              # itself (crop_pct 1.0; open_clip's resize_mode shortest), with their means
              "timm-crop_pct-0.95": Preprocess(image_size=224, resize_size=235, interpolation="bicubic"),
              "open_clip-224": Preprocess(image_size=224, resize_size=224, interpolation="bicubic",
                                          mean=(0.48145466, 0.4578275, 0.40821073),
                                          std=(0.26862954, 0.26130258, 0.27577711))}


def _frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Noise over a gradient: every pixel differs from its neighbours, the worst case for a resize."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    return np.clip(ramp + rng.integers(0, 56, (height, width, 3)), 0, 255).astype(np.uint8)


def _torch_input(frame: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frame).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8, as the live runner hands frames


@pytest.mark.parametrize("preprocess", PREPROCESS.values(), ids=PREPROCESS.keys())
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_numpy_preprocessing_equals_torch_bit_for_bit(preprocess, size):
    frame = _frame(*size, seed=size[0] * 7919 + size[1])
    reference = preprocess.resize_crop(_torch_input(frame))[0].permute(1, 2, 0).numpy()
    ported = resize_crop(preprocess, frame)
    assert ported.shape == reference.shape == (preprocess.image_size, preprocess.image_size, 3)
    assert np.array_equal(ported, reference)
    network_input = preprocess(_torch_input(frame)).numpy()  # (1, 3, S, S) float32
    assert np.abs(preprocess_frames(preprocess, [frame]) - network_input).max() <= 1e-6


def test_random_sizes_and_settings_equal_torch_bit_for_bit():
    """Random frames, sides 1..700, crop and resize modes, both filters: not one byte differs."""
    rng = np.random.default_rng(22)
    for _ in range(40):
        height, width = (int(v) for v in rng.integers(1, 700, 2))
        side = int(rng.integers(1, 260))
        preprocess = Preprocess(image_size=side, resize_size=side + int(rng.integers(0, 60)),
                                mode=str(rng.choice(["crop", "resize"])),
                                interpolation=str(rng.choice(["bilinear", "bicubic"])))
        if preprocess.mode == "crop" and int(preprocess.resize_size * max(height, width) / min(height, width)) < side:
            continue  # torchvision's centre crop would pad: not a shape the runner ever sees
        frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        reference = preprocess.resize_crop(_torch_input(frame))[0].permute(1, 2, 0).numpy()
        assert np.array_equal(resize_crop(preprocess, frame), reference), (height, width, preprocess)


def test_a_batch_of_frames_of_mixed_sizes_is_each_frame_alone():
    preprocess = Preprocess()
    frames = [_frame(480, 640), _frame(64, 64, seed=1), _frame(300, 200, seed=2)]
    batch = preprocess_frames(preprocess, frames)
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == np.float32 and batch.flags.c_contiguous
    for frame, row in zip(frames, batch):
        assert np.array_equal(row, preprocess(_torch_input(frame))[0].numpy())


def test_shrinking_is_antialiased_unlike_a_plain_cv2_resize():
    """A 1-pixel checkerboard shrunk 3.3x is flat grey under an antialiased filter; cv2.resize's bilinear aliases."""
    import cv2

    board = (np.indices((739, 739)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, 2)
    preprocess = Preprocess(image_size=224, resize_size=224)
    ported = resize_crop(preprocess, board).astype(int)
    plain = cv2.resize(board, (224, 224), interpolation=cv2.INTER_LINEAR).astype(int)
    assert abs(ported.mean() - 127.5) < 2 and ported.std() < 2
    assert plain.std() > 20


# (width, height, EXIF orientation) at a floor of 144: 1/4 (turned), 1/8, 1/8 asked on odd sides (PIL's draft takes
# 1/4 there), 1/4 on a portrait photo, 1/2, 1/2 asked where PIL's draft decodes in full, a small one
LARGE_JPEGS = [(1200, 900, 6), (1160, 1208, None), (1161, 1213, 3), (600, 800, 8), (400, 300, 2), (287, 400, None),
               (64, 64, None)]


def test_opencv_decodes_a_large_jpeg_to_the_pixels_extraction_reads(tmp_path):
    """The torch-free runtimes read a large photo reduced by libjpeg at extraction's scale: byte for byte what
    extraction (and the torch runtime) decode, turned by its EXIF tag; a small one in full."""
    preprocess = Preprocess(image_size=64, resize_size=72)  # the floor is 144
    decode = opencv_decoder(min_side=decode_floor(preprocess))
    shapes = []
    for i, (width, height, orientation) in enumerate(LARGE_JPEGS):
        path = save_jpeg(photo_array(width, height, seed=i), tmp_path / f"{i}.jpg", orientation=orientation)
        mine, theirs = decode(path), read_rgb(path, min_side=144).permute(1, 2, 0).numpy()
        assert mine.shape == theirs.shape and np.array_equal(mine, theirs), (width, height, orientation)
        shapes.append(mine.shape[:2])
    assert shapes == [(300, 225), (151, 145), (304, 291), (150, 200), (150, 200), (400, 287), (64, 64)]


def test_an_onnx_classifier_reads_image_files_as_extraction_did(tmp_path):
    """The exported classifier's decoder takes its floor from the sidecar's preprocessing: at 64 px (resize 72,
    floor 144) a 1200x900 photo is read at 1/4, as extraction read it for that cache."""
    meta = {"class_wnids": ["a", "b"], "class_names": ["a", "b"], "num_classes": 2, "weights_spec": "random"}
    classifier = onnx_runtimes.OnnxClassifier(tmp_path / "c.onnx", meta, Preprocess(image_size=64, resize_size=72))
    path = save_jpeg(photo_array(1200, 900, seed=1), tmp_path / "big.jpg")
    assert classifier.decode(path).shape == (225, 300, 3)
    assert np.array_equal(classifier.decode(path), read_rgb(path, min_side=144).permute(1, 2, 0).numpy())


def test_runtime_onnxruntime_without_it_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(onnx_runtimes, "onnxruntime_installed", lambda: False)
    assert run_webcam.main(["--onnx", str(tmp_path / "classifier.onnx"), "--runtime", "onnxruntime",
                            "--no-display"]) == 2
    assert "pip install -r requirements-deploy.txt" in one_error_line(capsys)


def test_export_without_the_exporter_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "_importable", lambda name: name != "onnxscript")
    out = tmp_path / "classifier.onnx"
    assert run_webcam.main([*CPU, "--checkpoint", str(COMPAT), "--export", str(out)]) == 2
    assert "onnxscript" in (line := one_error_line(capsys)) and "requirements-deploy.txt" in line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, words", [
    (["--runtime", "opencv"], "--runtime opencv runs an exported graph"),
    (["--onnx", "x.onnx", "--runtime", "torch"], "--runtime torch runs a --checkpoint"),
    (["--export", "x.pt"], "name the file *.onnx"),
])
def test_runtime_and_file_mismatches_are_one_line(args, words, capsys):
    assert run_webcam.main([*CPU, "--checkpoint", str(COMPAT), "--no-display", *args]) == 2
    assert words in one_error_line(capsys)
