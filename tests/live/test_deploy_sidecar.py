"""The exported graph carries its own classes and preprocessing; the sidecar is a copy that must agree (issue 29,
findings 5 and 8): any disagreement, the input size included, is one line naming the field before a frame is run;
a graph exported before the facts were carried still runs, with one warning.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

import run_webcam
from pipeline.common.names import ONNX_FORMAT
from pipeline.live.onnx_proto import read_graph_header
from pipeline.live.sidecar import FACT_PREFIX, file_sha256, is_export_sidecar
from tests.helpers import error_line, read_jsonl

onnx = pytest.importorskip("onnx", reason="the deploy extra is not installed: pip install -r requirements-deploy.txt")

RUNTIMES = ["opencv", pytest.param("onnxruntime", marks=pytest.mark.skipif(
    not __import__("importlib.util").util.find_spec("onnxruntime"), reason="ONNX Runtime is not installed"))]


def _swap(values: list) -> list:
    return [values[1], values[0], *values[2:]]


# a sidecar field changed -> what the error line says (the graph's own value is 64 / crop / bilinear / ImageNet's)
EDITS = {
    "swapped names": (lambda m: m.update(class_names=_swap(m["class_names"])), "class_names[0]"),
    "swapped wnids": (lambda m: m.update(class_wnids=_swap(m["class_wnids"])), "class_wnids[0]"),
    "another mean": (lambda m: m["preprocess"].update(mean=[0.5, 0.5, 0.5]), "preprocess mean"),
    "another std": (lambda m: m["preprocess"].update(std=[0.25, 0.25, 0.25]), "preprocess std"),
    "resize mode": (lambda m: m["preprocess"].update(mode="resize"),
                    "preprocess mode is 'resize', the graph's is 'crop'"),
    "resize size": (lambda m: m["preprocess"].update(resize_size=96), "preprocess resize_size is 96"),
    "bicubic": (lambda m: m["preprocess"].update(interpolation="bicubic"), "preprocess interpolation"),
    "image size": (lambda m: m["preprocess"].update(image_size=56), "preprocess image_size is 56, the graph's is 64"),
}


def _link_graph(graph: Path, folder: Path) -> Path:
    """The exported graph in ``folder`` (a hard link where it can be: 218 MB), without its sidecar."""
    folder.mkdir()
    onnx_path = folder / graph.name
    try:
        os.link(graph, onnx_path)
    except OSError:
        onnx_path.write_bytes(graph.read_bytes())
    return onnx_path


def _with_sidecar(exported: Path, onnx_path: Path, edit=None, **fields) -> Path:
    meta = {**json.loads(exported.with_suffix(".json").read_text()), **fields}
    if edit is not None:
        edit(meta)
    onnx_path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return onnx_path.with_suffix(".json")


def _image(tmp_path: Path) -> Path:
    image = tmp_path / "frame.png"
    noise = np.random.default_rng(5).integers(0, 256, (90, 120, 3), np.uint8)
    cv2.imwrite(str(image), cv2.GaussianBlur(noise, (0, 0), 3))
    return image


def _run(onnx_path: Path, runtime: str, image: Path, predictions: Path | None = None) -> int:
    out = ["--predictions", str(predictions)] if predictions else []
    return run_webcam.main(["--onnx", str(onnx_path), "--runtime", runtime, "--no-display", "--source", str(image),
                            *out])


def test_the_graph_carries_the_classes_and_the_preprocessing(exported):
    meta = json.loads(exported.with_suffix(".json").read_text())
    carried = {entry.key: entry.value for entry in onnx.load(str(exported), load_external_data=False).metadata_props}
    assert carried[FACT_PREFIX + "format"] == meta["format"] == ONNX_FORMAT
    for key in ("class_wnids", "class_names", "input", "output"):
        assert json.loads(carried[FACT_PREFIX + key]) == meta[key]
    for key in ("image_size", "resize_size", "mode", "interpolation", "mean", "std", "channel_order"):
        assert json.loads(carried[FACT_PREFIX + key]) == meta["preprocess"][key]
    header = read_graph_header(exported)  # the torch-free reader sees what onnx sees
    assert header.metadata == carried
    assert header.inputs == {"input": ("batch", 3, 64, 64)} and header.outputs == {"probabilities": ("batch", 3)}
    assert meta["onnx_sha256"] == file_sha256(exported)  # the digest covers the carried facts


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_a_sidecar_that_disagrees_with_its_graph_is_one_line(exported, tmp_path, capsys, edit, runtime):
    change, says = EDITS[edit]
    onnx_path = _link_graph(exported, tmp_path / "edited")
    sidecar = _with_sidecar(exported, onnx_path, change)  # the sha256 still matches: only the copy was edited
    before = sidecar.read_bytes()
    predictions = tmp_path / "preds.jsonl"
    assert _run(onnx_path, runtime, _image(tmp_path), predictions) == 2
    line = error_line(capsys.readouterr().err)
    assert f"{sidecar} disagrees with its graph classifier.onnx: {says}" in line, line
    assert sidecar.read_bytes() == before and not predictions.exists()


def _earlier_export(exported: Path, folder: Path) -> Path:
    """The export as versions before sidecar format 2 wrote it: a graph without the facts, a format 1 sidecar."""
    model = onnx.load(str(exported), load_external_data=False)
    del model.metadata_props[:]
    folder.mkdir()
    onnx_path = folder / exported.name
    onnx.save(model, str(onnx_path))
    _with_sidecar(exported, onnx_path, format="fc7-onnx-classifier/1", onnx_sha256=file_sha256(onnx_path))
    return onnx_path


@pytest.fixture(scope="module")
def earlier_export(exported, tmp_path_factory) -> Path:
    return _earlier_export(exported, tmp_path_factory.mktemp("earlier") / "export")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_an_earlier_export_runs_with_one_warning_to_re_export(exported, earlier_export, tmp_path, caplog, runtime):
    image = _image(tmp_path)
    answers = {}
    for name, onnx_path in (("now", exported), ("earlier", earlier_export)):
        caplog.clear()
        assert _run(onnx_path, runtime, image, tmp_path / f"{name}.jsonl") == 0
        warnings = [r.getMessage() for r in caplog.records if "cannot be cross-checked" in r.getMessage()]
        assert len(warnings) == (name == "earlier"), caplog.text
        answers[name] = read_jsonl(tmp_path / f"{name}.jsonl")[0]["topk"]
    assert "export it again" in warnings[0]
    assert answers["earlier"] == answers["now"]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("graph", ["carrying its facts", "earlier export"])
def test_a_sidecar_image_size_the_graph_does_not_take_is_one_line(exported, earlier_export, tmp_path, capsys, graph,
                                                                  runtime):
    source = exported if graph == "carrying its facts" else earlier_export
    onnx_path = _link_graph(source, tmp_path / "resized")
    _with_sidecar(source, onnx_path, EDITS["image size"][0])
    assert _run(onnx_path, runtime, _image(tmp_path)) == 2
    line = error_line(capsys.readouterr().err)
    assert "image_size is 56, the graph's is 64" in line or "takes 56x56 images" in line and "takes 3x64x64" in line


NOT_SIDECARS = {  # what is beside the graph as its .json -> what the one line says
    "a run's config.json": (b'{"epochs": 20, "lr": 0.001}', "format 'None'"),
    "another format": (b'{"format": "fc7-onnx-classifier/9"}', "format 'fc7-onnx-classifier/9'"),
    "a JSON list": (b'[1, 2, 3]', "a JSON list, not an object"),
    "not JSON": (b"\x89PNG\r\n", "not JSON"),
}


@pytest.mark.parametrize("case", NOT_SIDECARS, ids=list(NOT_SIDECARS))
def test_a_json_that_is_not_a_sidecar_is_one_line(exported, tmp_path, capsys, case):
    """The one sidecar reader (pipeline.live.sidecar.load_sidecar) refuses it, as --export's check does."""
    content, says = NOT_SIDECARS[case]
    onnx_path = _link_graph(exported, tmp_path / "other")
    onnx_path.with_suffix(".json").write_bytes(content)
    assert not is_export_sidecar(onnx_path.with_suffix(".json"))
    assert _run(onnx_path, "opencv", _image(tmp_path)) == 2
    line = error_line(capsys.readouterr().err)
    assert "is not the sidecar of an exported classifier" in line and says in line, line
