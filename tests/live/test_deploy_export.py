"""``--export NAME.onnx`` replaces no file but an earlier export's (issue 29, finding 1): not a run's run.json or
config.json, not your labels.json, not the checkpoint or the weights (after resolving links), each refused in one line
before anything is built, the file kept byte for byte; an earlier export, of any sidecar format, is replaced.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import run_webcam
from pipeline.live.sidecar import is_export_sidecar
from tests.conftest import COMPAT, CPU, one_error_line

pytest.importorskip("onnx", reason="the deploy extra is not installed: pip install -r requirements-deploy.txt")
pytest.importorskip("onnxscript", reason="the deploy extra is not installed: pip install -r requirements-deploy.txt")


def _head_folder(folder: Path) -> Path:
    """A head's run folder: its checkpoint, its run.json and config.json, and a labels.json of the user's."""
    folder.mkdir()
    shutil.copy(COMPAT, folder / "best.pt")
    (folder / "run.json").write_text(json.dumps({"files": ["best.pt", "config.json"]}))
    (folder / "config.json").write_text(json.dumps({"epochs": 2, "lr": 0.001}))
    (folder / "labels.json").write_text(json.dumps({"n01443537": "goldfish"}))
    return folder


def _symlinked_sidecar(folder: Path) -> Path:
    (folder / "classifier.json").symlink_to(folder / "best.pt")
    return folder / "best.pt"


def _hard_linked_sidecar(folder: Path) -> Path:
    os.link(folder / "best.pt", folder / "classifier.json")
    return folder / "best.pt"


def _checkpoint_named_json(folder: Path) -> Path:
    (folder / "best.pt").rename(folder / "model.json")
    return folder / "model.json"


def _users_onnx(folder: Path) -> Path:
    (folder / "classifier.onnx").write_bytes(b"\x08\x07 someone else's model")
    return folder / "classifier.onnx"


# case -> (the --export name, what sets it up and returns the file that must survive, the checkpoint's name)
CASES = {
    "run.json": ("run.onnx", lambda folder: folder / "run.json", "best.pt"),
    "config.json": ("config.onnx", lambda folder: folder / "config.json", "best.pt"),
    "labels.json": ("labels.onnx", lambda folder: folder / "labels.json", "best.pt"),
    "checkpoint as sidecar": ("model.onnx", _checkpoint_named_json, "model.json"),
    "symlink to the checkpoint": ("classifier.onnx", _symlinked_sidecar, "best.pt"),
    "hard link of the checkpoint": ("classifier.onnx", _hard_linked_sidecar, "best.pt"),
    "a graph not exported here": ("classifier.onnx", _users_onnx, "best.pt"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_export_never_replaces_a_file_that_is_not_an_earlier_exports(tmp_path, capsys, case):
    name, setup, checkpoint = CASES[case]
    folder = _head_folder(tmp_path / "head")
    kept = setup(folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert run_webcam.main([*CPU, "--checkpoint", str(folder / checkpoint), "--export", str(folder / name)]) == 2
    line = one_error_line(capsys)
    named = (folder / name, (folder / name).with_suffix(".json"))  # the graph or the sidecar it would have written
    assert line.startswith("error: --export") and any(str(path) in line for path in named), line
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # byte for byte, nothing added
    assert kept.read_bytes() == before[kept.name]


def test_an_earlier_export_is_replaced_whatever_its_sidecar_format(exported, tmp_path):
    folder = tmp_path / "deploy"
    folder.mkdir()
    onnx_path = folder / exported.name
    os.link(exported, onnx_path) if exported.stat().st_dev == folder.stat().st_dev else shutil.copy(exported, onnx_path)
    old = {**json.loads(exported.with_suffix(".json").read_text()), "format": "fc7-onnx-classifier/1"}
    onnx_path.with_suffix(".json").write_text(json.dumps(old))
    assert run_webcam.main([*CPU, "--checkpoint", str(COMPAT), "--export", str(onnx_path)]) == 0
    assert is_export_sidecar(onnx_path.with_suffix(".json"))
    assert json.loads(onnx_path.with_suffix(".json").read_text())["format"] != old["format"]
    assert exported.read_bytes() == onnx_path.read_bytes()  # the same graph again, written as a new file
    assert sorted(p.name for p in folder.iterdir()) == ["classifier.json", "classifier.onnx"]
