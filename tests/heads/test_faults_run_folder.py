"""A run folder and the user's files in it (issue #18 items 1-4): a folder the tool did not make is refused,
a combination folder keeps what the user put there, distinct settings get distinct folders, and run.json is
read by one checked reader. Each test hashes what the user made before and after.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest

from pipeline.heads.naming import folder_name, number
from tests.helpers import one_error_line, train_quick_head, tree_hash, write_synthetic_cache

GRID = ("--head", "linear,knn", "--k", "1,3")


train = train_quick_head


def hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (but the lock file) with the SHA-256 of its bytes."""
    return tree_hash(folder, skip=(".lock",))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_synthetic_cache(tmp_path_factory.mktemp("cache") / "feats", classes=3, train_per_class=6,
                                 val_per_class=3, dim=8)


@pytest.fixture(scope="module")
def finished_sweep(cache, tmp_path_factory) -> Path:
    """A finished lr sweep (two head folders), copied by the tests that damage it."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    assert train(cache, out, "--lr", "0.1,0.01") == 0
    return out


# ---------------------------------------------------------------------------------------------
# 1. A folder the tool did not make is not the tool's to clean


@pytest.mark.parametrize("head", ["linear", "knn"])
def test_a_users_files_of_the_tools_names_without_run_json_are_refused(cache, tmp_path, capsys, head):
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("report.md", "config.json", "history.csv", "notes.txt"):
        (out / name).write_text(f"the user's own {name}")
    before = hashes(out)
    capsys.readouterr()
    assert train(cache, out, "--head", head) == 2
    line = one_error_line(capsys)
    assert all(name in line for name in ("report.md", "config.json", "history.csv")) and "notes.txt" not in line
    assert "another --out" in line and str(out) in line
    assert hashes(out) == before and not list(out.glob(".staging-*"))


def test_a_folder_of_the_users_other_files_still_takes_a_run(cache, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert train(cache, out) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "run.json").is_file()


# ---------------------------------------------------------------------------------------------
# 2. run.json lists each combination folder's files; a rerun removes only those


def test_a_grid_rerun_keeps_a_users_file_in_a_combination_folder(cache, tmp_path, caplog):
    out = tmp_path / "grid"
    assert train(cache, out, *GRID) == 0
    record = json.loads((out / "run.json").read_text())
    assert set(record["contents"]["fc7_knn_all"]) == {"config.json", "knn.csv", "per_class.csv", "confusions.csv",
                                                      "report.md", "k1", "k3"}  # k1/, k3/: each k's result.json
    notes = out / "fc7_knn_all" / "NOTES.txt"
    notes.write_text("the user's notes on the kNN run")
    digest = hashlib.sha256(notes.read_bytes()).hexdigest()
    caplog.set_level(logging.INFO)
    assert train(cache, out, *GRID, "--k", "2") == 0  # the same combination, written again
    assert hashlib.sha256(notes.read_bytes()).hexdigest() == digest
    assert "k,k_used" in (out / "fc7_knn_all" / "knn.csv").read_text() and "\n2," in (out / "fc7_knn_all" / "knn.csv").read_text()
    record = json.loads((out / "run.json").read_text())
    assert "NOTES.txt" not in record["contents"]["fc7_knn_all"]
    assert f"kept {out / 'fc7_knn_all'}" in caplog.text and "NOTES.txt" in caplog.text  # what was left there
    assert train(cache, out) == 0  # a plain run: the combination folder goes, but for the user's file
    assert sorted(p.name for p in (out / "fc7_knn_all").iterdir()) == ["NOTES.txt"]
    assert hashlib.sha256(notes.read_bytes()).hexdigest() == digest
    assert not (out / "fc7_linear_all_lr0.001_wd0").exists() and not (out / "experiments.csv").exists()


def test_an_old_run_json_without_folder_lists_is_read_sensibly(cache, tmp_path):
    """run.json of an older version names each folder whole: the tool's files there go, the user's stay."""
    out = tmp_path / "grid"
    assert train(cache, out, *GRID) == 0
    record = json.loads((out / "run.json").read_text())
    del record["contents"]
    (out / "run.json").write_text(json.dumps(record))
    for older in out.glob("fc7_knn_all/k[0-9]*"):  # an older run wrote no result.json
        shutil.rmtree(older)
    for older in out.glob("*/result.json"):
        older.unlink()
    (out / "fc7_knn_all" / "mine.txt").write_text("mine")
    (out / "notes.txt").write_text("notes")
    before = {k: v for k, v in hashes(out).items() if k in ("fc7_knn_all/mine.txt", "notes.txt")}
    assert train(cache, out) == 0
    assert sorted(p.name for p in (out / "fc7_knn_all").iterdir()) == ["mine.txt"]
    assert not (out / "fc7_linear_all_lr0.001_wd0").exists()
    assert {k: v for k, v in hashes(out).items() if k in before} == before


# ---------------------------------------------------------------------------------------------
# 3. Distinct settings, distinct folders


def test_close_learning_rates_get_their_own_folders(cache, tmp_path):
    out = tmp_path / "sweep"
    assert train(cache, out, "--lr", "0.001,0.0010000001", "--select", "val") == 0
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["lr0.0010000001_wd0", "lr0.001_wd0"]
    configs = {json.loads((out / f / "config.json").read_text())["lr"] for f in folders}
    assert configs == {0.001, 0.0010000001}
    with open(out / "sweep.csv") as f:
        assert sorted(row["name"] for row in csv.DictReader(f)) == folders
    grid = tmp_path / "grid"
    assert train(cache, grid, *GRID, "--lr", "0.001,0.0010000001", "--select", "val") == 0
    with open(grid / "experiments.csv") as f:
        linear = [row["folder"] for row in csv.DictReader(f) if row["head"] == "linear"]
    assert len(set(linear)) == 2 and all((grid / name / "best.pt").is_file() for name in linear)


def test_folder_names_are_distinct_for_distinct_values():
    values = [0.001, 0.0010000001, 0.001 + 1e-18, 1e-5, 1.0000001e-5, 0.1, 0.1 + 2**-56, 0.0, 1e-300, 123456789.0,
              123456780.0, 0.30000000000000004, 0.3]
    values = list(dict.fromkeys(values))
    names = {folder_name(lr=v, weight_decay=0.0) for v in values}
    assert len(names) == len(values)
    assert all(float(number(v)) == v for v in values)
    assert folder_name(lr=0.001, weight_decay=0.0) == "lr0.001_wd0"  # today's names where they were already exact
    assert folder_name(layer="fc7", head="knn", shots=5) == "fc7_knn_5shot"


# ---------------------------------------------------------------------------------------------
# 4. run.json: one checked reader, exact types and ranges


def _damage(record: dict, field: str, value) -> dict:
    if value is KeyError:
        record.pop(field)
    else:
        record[field] = value
    return record


@pytest.mark.parametrize("field, value", [
    ("files", "best.pt"), ("files", ["../escape"]), ("files", ["best.pt", 3]), ("tool", "another_tool.py"),
    ("kind", 3), ("heads", "lr0.1_wd0"), ("best", {"head": "x", "val_top1": "90"}), ("best", {"head": "x", "val_top1": 250}),
    ("contents", {"not_a_file": ["a"]}), ("contents", {"lr0.1_wd0": "a"}), ("published", None), ("files", KeyError),
])
def test_run_json_with_a_field_wrong_is_one_line_and_nothing_changes(cache, finished_sweep, tmp_path, capsys, field,
                                                                    value):
    out = tmp_path / "sweep"
    shutil.copytree(finished_sweep, out)
    record = _damage(json.loads((out / "run.json").read_text()), field, value)
    (out / "run.json").write_text(json.dumps(record))
    before = hashes(out)
    capsys.readouterr()
    assert train(cache, out) == 2
    line = one_error_line(capsys)
    assert str(out / "run.json") in line and repr(field) in line and "another --out" in line
    assert hashes(out) == before


def test_run_json_that_is_not_json_is_one_line(cache, finished_sweep, tmp_path, capsys):
    out = tmp_path / "head"
    shutil.copytree(finished_sweep, out)
    (out / "run.json").write_text('{"files": [')
    before = hashes(out)
    capsys.readouterr()
    assert train(cache, out) == 2
    assert "run.json is not JSON" in one_error_line(capsys)
    assert hashes(out) == before


def test_a_damaged_manifest_of_an_interrupted_publish_is_one_line(cache, finished_sweep, tmp_path, capsys):
    out = tmp_path / "head"
    shutil.copytree(finished_sweep, out)
    staging = out / ".staging-999999"
    staging.mkdir()
    (staging / ".ready").write_text(json.dumps({"files": "best.pt", "run": {}}))
    before = hashes(out)
    capsys.readouterr()
    assert train(cache, out) == 2
    line = one_error_line(capsys)
    assert str(staging / ".ready") in line and "'files'" in line
    assert hashes(out) == before
