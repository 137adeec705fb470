"""The torch-free runtimes' preprocessing and messages, without the deploy extra: the numpy port of the recorded
preprocessing is within one level per pixel of torch's, shrinking and enlarging; a missing extra is one line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import run_webcam
from pipeline.common.preprocess import Preprocess
from pipeline.live import export, onnx_runtimes
from pipeline.live.numpy_preprocess import preprocess_frames, resize_crop
from tests.conftest import CPU, one_error_line

COMPAT = Path(__file__).resolve().parent / "data" / "compat" / "best.pt"
SIZES = [(480, 640), (1080, 1920), (300, 200), (37, 90), (64, 64), (100, 1000), (256, 256)]  # shrink and enlarge
PREPROCESS = [Preprocess(), Preprocess(image_size=64, resize_size=72), Preprocess(image_size=64, resize_size=64,
                                                                                  mode="resize")]


def _frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Noise over a gradient: every pixel differs from its neighbours, the worst case for a resize."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    return np.clip(ramp + rng.integers(0, 56, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("preprocess", PREPROCESS, ids=["224-crop", "64-crop", "64-resize"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_numpy_preprocessing_is_within_one_level_of_torch(preprocess, size):
    frame = _frame(*size)
    reference = preprocess.resize_crop(torch.from_numpy(frame).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    ported = resize_crop(preprocess, frame)
    assert ported.shape == reference.shape == (preprocess.image_size, preprocess.image_size, 3)
    assert np.abs(ported.astype(int) - reference.astype(int)).max() <= 1
    network_input = preprocess(torch.from_numpy(frame).permute(2, 0, 1)[None]).numpy()  # (1, 3, S, S)
    one_level = 1 / (255 * min(preprocess.std))
    assert np.abs(preprocess_frames(preprocess, [frame]) - network_input).max() <= one_level + 1e-5


def test_shrinking_is_antialiased_unlike_a_plain_cv2_resize():
    """A 1-pixel checkerboard shrunk 3.3x is flat grey under an antialiased filter; cv2.resize's bilinear aliases."""
    import cv2

    board = (np.indices((739, 739)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, 2)
    preprocess = Preprocess(image_size=224, resize_size=224)
    ported = resize_crop(preprocess, board).astype(int)
    plain = cv2.resize(board, (224, 224), interpolation=cv2.INTER_LINEAR).astype(int)
    assert abs(ported.mean() - 127.5) < 2 and ported.std() < 2
    assert plain.std() > 20


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
