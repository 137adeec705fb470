"""Export and the torch-free runtimes (issue 22): the graph and its sidecar, the same answers under every installed
runtime, a mismatched sidecar refused, a run with torch, torchvision and h5py unimportable, and the docs' example.

Needs the deploy extra (requirements-deploy.txt) for the export; skipped, saying so, where it is not installed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import run_webcam
from pipeline.common.names import ONNX_FORMAT, VERSION
from pipeline.live.torch_classifier import load_classifier
from tests.conftest import COMPAT, CPU, one_error_line
from tests.helpers import ROOT, torch_free_env

pytest.importorskip("onnx", reason="the deploy extra is not installed: pip install -r requirements-deploy.txt")
pytest.importorskip("onnxscript", reason="the deploy extra is not installed: pip install -r requirements-deploy.txt")



def _frames(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (48 + 8 * i, 64 + 16 * i, 3), dtype=np.uint8) for i in range(count)]


def _video(path: Path, frames: int = 6) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (160, 120))
    for i in range(frames):
        writer.write(cv2.GaussianBlur(np.random.default_rng(i).integers(0, 256, (120, 160, 3), dtype=np.uint8), (9, 9), 3))
    writer.release()
    return path


def test_export_writes_one_graph_and_its_sidecar(exported):
    meta = json.loads(exported.with_suffix(".json").read_text())
    checkpoint = torch.load(COMPAT, weights_only=True)
    assert meta["format"] == ONNX_FORMAT and meta["version"] == VERSION
    assert meta["onnx_sha256"] == hashlib.sha256(exported.read_bytes()).hexdigest()
    assert meta["class_wnids"] == checkpoint["class_wnids"] and meta["class_names"] == checkpoint["class_names"]
    assert meta["weights_fingerprint"] == checkpoint["weights_fingerprint"] and meta["layer"] == "fc7"
    assert {"resize_size", "image_size", "mode", "interpolation", "mean", "std", "channel_order"} <= set(meta["preprocess"])
    assert sorted(p.name for p in exported.parent.iterdir()) == ["classifier.json", "classifier.onnx"]  # no partials
    import onnx

    model = onnx.load(str(exported), load_external_data=False)
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch


def _runtimes():
    found = ["opencv"]
    try:
        import onnxruntime  # noqa: F401

        found.append("onnxruntime")
    except ImportError:
        pass
    return found


@pytest.mark.parametrize("runtime", ["opencv", "onnxruntime"])
def test_each_runtime_gives_the_torch_answers_on_identical_inputs(exported, runtime):
    if runtime not in _runtimes():
        pytest.skip(f"{runtime} is not installed")
    from pipeline.live.onnx_runtimes import onnx_classifier

    model, _, preprocess = load_classifier(COMPAT, device="cpu")
    classifier, _ = onnx_classifier(exported, runtime)
    for batch in (1, 3):  # the dynamic batch
        frames = _frames(batch)
        x = torch.cat([preprocess(torch.from_numpy(f).permute(2, 0, 1)[None]) for f in frames])
        with torch.inference_mode():
            expected = torch.softmax(model(x), dim=1).numpy()
        got = classifier.forward(np.ascontiguousarray(x.numpy()))
        assert got.shape == expected.shape
        assert (got.argmax(1) == expected.argmax(1)).all()
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("runtime", ["opencv", "onnxruntime"])
def test_the_live_loop_runs_on_each_runtime(exported, tmp_path, runtime):
    if runtime not in _runtimes():
        pytest.skip(f"{runtime} is not installed")
    video = _video(tmp_path / "clip.mp4")
    lines = {}
    for name, args in (("torch", ["--checkpoint", str(COMPAT)]), (runtime, ["--onnx", str(exported), "--runtime", runtime])):
        preds = tmp_path / f"{name}.jsonl"
        assert run_webcam.main([*CPU, *args, "--source", str(video), "--no-display", "--predictions", str(preds),
                                "--output", str(tmp_path / f"{name}.mp4")]) == 0
        lines[name] = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(lines["torch"]) == len(lines[runtime]) == 6
    for ours, theirs in zip(lines["torch"], lines[runtime]):  # the same input bytes: only the graphs' arithmetic differs
        assert ours["topk"][0]["wnid"] == theirs["topk"][0]["wnid"]
        assert ours["topk"][0]["prob"] == pytest.approx(theirs["topk"][0]["prob"], abs=1e-4)


def _copy_graph(exported: Path, folder: Path) -> Path:
    folder.mkdir()
    onnx_path = folder / exported.name
    os.link(exported, onnx_path) if exported.stat().st_dev == folder.stat().st_dev else shutil.copy(exported, onnx_path)
    return onnx_path


def test_a_sidecar_of_another_graph_is_refused(exported, tmp_path, capsys):
    onnx_path = _copy_graph(exported, tmp_path / "other")
    meta = json.loads(exported.with_suffix(".json").read_text())
    other = {**meta, "onnx_sha256": "0" * 64, "class_names": ["cat", "dog", "bird"]}  # another head's sidecar
    onnx_path.with_suffix(".json").write_text(json.dumps(other))
    before = onnx_path.with_suffix(".json").read_bytes()
    assert run_webcam.main(["--onnx", str(onnx_path), "--runtime", "opencv", "--no-display"]) == 2
    assert "sha256 differs" in one_error_line(capsys)
    assert onnx_path.with_suffix(".json").read_bytes() == before


def test_a_sidecar_whose_classes_disagree_with_the_graph_is_refused(exported, tmp_path, capsys):
    onnx_path = _copy_graph(exported, tmp_path / "other")
    meta = json.loads(exported.with_suffix(".json").read_text())
    meta.update(num_classes=4, class_wnids=meta["class_wnids"] + ["n0"], class_names=meta["class_names"] + ["extra"])
    onnx_path.with_suffix(".json").write_text(json.dumps(meta))  # the sha256 still matches: the outputs do not
    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), _frames(1)[0])
    assert run_webcam.main(["--onnx", str(onnx_path), "--runtime", "opencv", "--no-display", "--source", str(image)]) == 2
    assert "another head's" in one_error_line(capsys)


def _graph_beside(exported: Path, folder: Path, graph: bytes) -> Path:
    """``graph`` as folder/classifier.onnx, with the exported sidecar re-stamped with its sha256."""
    folder.mkdir()
    onnx_path = folder / "classifier.onnx"
    onnx_path.write_bytes(graph)
    meta = json.loads(exported.with_suffix(".json").read_text())
    meta["onnx_sha256"] = hashlib.sha256(graph).hexdigest()
    onnx_path.with_suffix(".json").write_text(json.dumps(meta))
    return onnx_path


def test_a_graph_opencv_cannot_run_names_the_runtime_that_can(exported, tmp_path, capsys):
    """A valid graph, carrying the classifier's facts, with an operator OpenCV's DNN module does not have."""
    import onnx
    from onnx import TensorProto, helper

    from pipeline.live.sidecar import graph_metadata

    meta = json.loads(exported.with_suffix(".json").read_text())
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 64, 64])]
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])]
    node = helper.make_node("NoSuchOp", ["input"], ["probabilities"], domain="com.example")
    model = helper.make_model(helper.make_graph([node], "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)])
    helper.set_model_props(model, graph_metadata(meta))
    onnx_path = _graph_beside(exported, tmp_path / "unknown-op", model.SerializeToString())
    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), _frames(1)[0])
    args = ["--onnx", str(onnx_path), "--runtime", "opencv", "--no-display", "--source", str(image)]
    assert run_webcam.main(args) == 2
    assert "--runtime onnxruntime" in one_error_line(capsys)


class _GeluClassifier(torch.nn.Module):
    """A tiny classifier of 64 px frames into 3 classes whose export holds torch's exact GELU, as every ViT's does."""

    def __init__(self):
        super().__init__()
        self.gelu, self.linear = torch.nn.GELU(), torch.nn.Linear(3, 3)

    def forward(self, x):
        return torch.softmax(self.linear(self.gelu(x.mean((2, 3)))), dim=1)


def test_a_graph_with_exact_gelu_is_refused_before_opencv_reads_it(exported, tmp_path):
    """OpenCV 5.1's ONNX reader ends the process (SIGSEGV) on the exact GELU torch exports (Div, Erf, Add, Mul, Mul),
    which every ViT, Swin and ConvNeXt export holds: the graph's operators are read first, and the run is one line
    (in a child, so that a crash shows as one and does not take the test runner with it)."""
    import contextlib
    import io

    import onnx
    from onnx import helper

    from pipeline.live.sidecar import graph_metadata

    batch = torch.export.Dim("batch", min=1, max=1024)
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(_GeluClassifier().eval(), (torch.zeros(2, 3, 64, 64),), dynamo=True, opset_version=18,
                                    input_names=["input"], output_names=["probabilities"], dynamic_shapes=({0: batch},))
    model = onnx.load_from_string(program.model_proto.SerializeToString())
    assert "Erf" in {node.op_type for node in model.graph.node}
    helper.set_model_props(model, graph_metadata(json.loads(exported.with_suffix(".json").read_text())))
    onnx_path = _graph_beside(exported, tmp_path / "gelu", model.SerializeToString())
    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), _frames(1)[0])
    done = subprocess.run([sys.executable, "run_webcam.py", "--onnx", str(onnx_path), "--runtime", "opencv",
                           "--no-display", "--source", str(image)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2, (done.returncode, done.stderr[-500:])  # -11: OpenCV read it and crashed
    line = one_error_line(done.stderr)
    assert "Erf" in line and "--runtime onnxruntime" in line


def test_a_file_that_is_not_an_onnx_graph_is_one_line(exported, tmp_path, capsys):
    onnx_path = _graph_beside(exported, tmp_path / "broken", b"\x08\x07" + b"not a graph at all" * 10)
    assert run_webcam.main(["--onnx", str(onnx_path), "--runtime", "opencv", "--no-display"]) == 2
    assert "is not a readable ONNX graph" in one_error_line(capsys)


def test_runtime_opencv_runs_with_torch_torchvision_and_h5py_unimportable(exported, tmp_path):
    video = _video(tmp_path / "clip.mp4")
    preds = tmp_path / "preds.jsonl"
    run = subprocess.run([sys.executable, str(ROOT / "run_webcam.py"), "--onnx", str(exported), "--runtime", "opencv",
                          "--source", str(video), "--no-display", "--predictions", str(preds)],
                         env=torch_free_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert len(preds.read_text().splitlines()) == 6


def test_the_docs_example_classifies_with_opencv_and_numpy_only(exported, tmp_path):
    text = (ROOT / "docs" / "deploy.md").read_text()
    code = re.search(r"<!-- example: begin -->\s*```python\n(.*?)```\s*<!-- example: end -->", text, re.S).group(1)
    script = tmp_path / "classify.py"
    script.write_text(code)
    image = tmp_path / "photo.jpg"
    smooth = cv2.GaussianBlur(np.random.default_rng(3).integers(0, 256, (240, 320, 3), dtype=np.uint8), (0, 0), 8)
    cv2.imwrite(str(image), smooth)
    run = subprocess.run([sys.executable, str(script), str(exported), str(image)], env=torch_free_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines()]
    model, checkpoint, preprocess = load_classifier(COMPAT, device="cpu")
    rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
    with torch.inference_mode():
        expected = torch.softmax(model(preprocess(torch.from_numpy(rgb).permute(2, 0, 1)[None])), 1)[0]
    assert len(rows) == 3 and rows[0][0] == checkpoint["class_wnids"][int(expected.argmax())]
    assert float(rows[0][-1]) == pytest.approx(float(expected.max()), abs=0.02)
