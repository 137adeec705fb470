"""A head on a backbone whose weights resize bicubic (Swin, EfficientNet) exports and runs torch-free: the numpy
port resizes bicubic bit for bit too, so each runtime answers as torch does on the same frames."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import run_webcam
from tests.conftest import CPU
from tests.helpers import ROOT

pytest.importorskip("onnx", reason="the deploy extra is not installed: pip install -r requirements-deploy.txt")
pytest.importorskip("onnxruntime", reason="the deploy extra is not installed: pip install -r requirements-deploy.txt")

COMPAT = ROOT / "tests" / "data" / "compat" / "best.pt"


def test_a_bicubic_head_exports_and_answers_as_torch(tmp_path):
    checkpoint = torch.load(COMPAT, weights_only=True)
    checkpoint["preprocess"] = {**checkpoint["preprocess"], "interpolation": "bicubic"}
    bicubic = tmp_path / "bicubic.pt"
    torch.save(checkpoint, bicubic)
    graph = tmp_path / "bicubic.onnx"
    assert run_webcam.main([*CPU, "--checkpoint", str(bicubic), "--export", str(graph)]) == 0
    assert json.loads(graph.with_suffix(".json").read_text())["preprocess"]["interpolation"] == "bicubic"
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # smooth content, so bicubic and bilinear resizes differ in the answers' last digits
        image = cv2.GaussianBlur(rng.integers(0, 256, (90 + 10 * i, 120, 3), dtype=np.uint8), (7, 7), 2)
        cv2.imwrite(str(frames / f"{i}.png"), image)
    lines = {}
    for name, args in (("torch", ["--checkpoint", str(bicubic)]), ("onnx", ["--onnx", str(graph), "--runtime", "onnxruntime"])):
        preds = tmp_path / f"{name}.jsonl"
        assert run_webcam.main([*CPU, *args, "--source", str(frames), "--no-display", "--predictions", str(preds)]) == 0
        lines[name] = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(lines["torch"]) == len(lines["onnx"]) == 4
    for ours, theirs in zip(lines["torch"], lines["onnx"]):
        assert [k["wnid"] for k in ours["topk"]] == [k["wnid"] for k in theirs["topk"]]
        assert ours["topk"][0]["prob"] == pytest.approx(theirs["topk"][0]["prob"], abs=1e-4)
