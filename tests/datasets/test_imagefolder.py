"""Your own datasets: torchvision's ImageFolder layouts, detected, indexed, extracted, trained on and run live.

ROOT/train/<class>/ + ROOT/val/<class>/, and ROOT/<class>/ with val held out by a hash of each path.
"""
from __future__ import annotations

import json
import logging
import shutil
import zipfile

import h5py
import pytest

import run_extract
import run_webcam
from pipeline.datasets.dataset import find_root, index_dataset
from pipeline.datasets.holdout import in_val
from tests.helpers import CPU_ARGS, extract_args, read_jsonl, train_quick_head
from tests.imagefolders import CLASSES, make_flat, make_splits, write_class


def prepare(capsys, data, *extra):
    """``run_extract.py --prepare-only``: (rc, summary, stderr)."""
    summary = data.parent / f"{data.name}-prep.json"
    rc = run_extract.main(["--data", str(data), "--prepare-only", "--no-progress", "--summary-json", str(summary),
                           *map(str, extra)])
    err = capsys.readouterr().err
    return rc, json.loads(summary.read_text()) if rc == 0 else None, err


def test_imagefolder_with_splits_is_detected_and_named_in_the_summary(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    root = make_splits(tmp_path / "pets")
    rc, summary, err = prepare(capsys, root)
    assert rc == 0, err
    assert summary["layout"] == "imagefolder-splits" and "imagefolder-splits layout" in caplog.text
    assert [c["wnid"] for c in summary["classes"]] == list(CLASSES)  # sorted folder names
    assert [c["name"] for c in summary["classes"]] == list(CLASSES)
    assert summary["splits"]["train"]["images"] == 12 and summary["splits"]["val"]["images"] == 6
    assert summary["splits"]["val"]["per_class_min"] == 2 and summary["skipped"] == []
    ds = index_dataset(find_root(root))
    assert ds.layout == "imagefolder-splits" and ds.splits["val"].paths[0] == "val/cat/img_1000.jpg"


def test_one_imagefolder_holds_out_val_by_a_hash_of_each_path(tmp_path, capsys):
    root = make_flat(tmp_path / "desk", per_class=12)
    rc, summary, err = prepare(capsys, root)
    assert rc == 0, err
    assert summary["layout"] == "imagefolder" and summary["val_fraction"] == 0.2
    ds = index_dataset(find_root(root))
    every = sorted(ds.splits["train"].paths + ds.splits["val"].paths)
    assert len(every) == 36 and not set(ds.splits["train"].paths) & set(ds.splits["val"].paths)
    assert ds.splits["val"].paths == [p for p in sorted(every, key=lambda p: (CLASSES.index(p.split("/")[0]), p))
                                      if in_val(p, 0.2)]
    assert summary["splits"]["val"]["images"] == len(ds.splits["val"])
    assert [ds.wnids[label] for label in ds.splits["train"].labels] == [p.split("/")[0] for p in ds.splits["train"].paths]


def test_the_split_is_stable_as_the_dataset_grows(tmp_path):
    root = make_flat(tmp_path / "desk", per_class=10)
    before = index_dataset(root)
    for label, name in enumerate(CLASSES):
        write_class(root / name, label, 15, start=10)  # more images of each class
    write_class(root / "pen", 3, 10)  # and a new class
    after = index_dataset(root)
    assert set(before.splits["val"].paths) <= set(after.splits["val"].paths)  # no image moved
    assert set(before.splits["train"].paths) <= set(after.splits["train"].paths)
    assert after.wnids == ["cat", "dog", "mug", "pen"]
    # a larger fraction only adds to val: the hash threshold moves, no image leaves val
    assert set(after.splits["val"].paths) <= set(index_dataset(root, 0.4).splits["val"].paths)
    # removing images moves none of the others either
    for path in (root / "dog").glob("img_00*.jpg"):
        path.unlink()
    shrunk = index_dataset(root)
    assert set(shrunk.splits["val"].paths) == {p for p in after.splits["val"].paths if (root / p).exists()}


def test_suffixes_in_any_case_webp_png_and_subfolders_are_images(tmp_path, capsys):
    root = tmp_path / "mixed"
    write_class(root / "cat", 0, 2, suffix=".JPG")
    write_class(root / "cat", 0, 2, start=2, suffix=".Jpeg")
    write_class(root / "dog", 1, 2, suffix=".webp")
    write_class(root / "dog" / "garden", 1, 2, start=2, suffix=".PNG")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\x00")
    rc, summary, err = prepare(capsys, root, "--val-fraction", "0.5")
    assert rc == 0, err
    assert summary["skipped"] == [] and summary["ignored_files"] == 1
    ds = index_dataset(root, 0.5)
    assert sorted(ds.splits["train"].paths + ds.splits["val"].paths) == [
        "cat/img_000.JPG", "cat/img_001.JPG", "cat/img_002.Jpeg", "cat/img_003.Jpeg",
        "dog/garden/img_002.PNG", "dog/garden/img_003.PNG", "dog/img_000.webp", "dog/img_001.webp"]
    assert summary["splits"]["train"]["images"] + summary["splits"]["val"]["images"] == 8


@pytest.mark.parametrize("top_folder", [True, False])
def test_a_zip_of_an_imagefolder_is_unpacked_and_detected(tmp_path, capsys, top_folder):
    root = make_splits(tmp_path / "src" / "pets") if top_folder else make_flat(tmp_path / "src" / "pets")
    zip_path = tmp_path / "pets.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:  # with one top folder (as zipping a folder makes), or without
        for path in sorted(root.rglob("*")):
            archive.write(path, path.relative_to(root.parent if top_folder else root))
    shutil.rmtree(tmp_path / "src")
    rc, summary, err = prepare(capsys, zip_path)
    assert rc == 0, err
    assert summary["layout"] == ("imagefolder-splits" if top_folder else "imagefolder")
    assert summary["root"] == str(tmp_path / "pets" / "pets" if top_folder else tmp_path / "pets")
    assert sum(split["images"] for split in summary["splits"].values()) == (18 if top_folder else 30)


@pytest.mark.parametrize("layout", ["imagefolder", "imagefolder-splits"])
def test_extraction_of_an_imagefolder_records_folder_names_and_is_then_up_to_date(tmp_path, caplog, layout):
    root = make_flat(tmp_path / "ds", per_class=6) if layout == "imagefolder" else make_splits(tmp_path / "ds")
    out = tmp_path / "features"
    assert run_extract.main(extract_args(root, out)) == 0
    ds = index_dataset(root)
    for split in ("train", "val"):
        with h5py.File(out / f"{split}.h5", "r") as f:
            assert f.attrs["complete"]
            assert [n.decode() for n in f["class_names"][:]] == list(CLASSES)
            assert [n.decode() for n in f["class_wnids"][:]] == list(CLASSES)
            assert [p.decode() for p in f["paths"][:]] == ds.splits[split].paths
            assert f["labels"][:].tolist() == ds.splits[split].labels
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert run_extract.main(extract_args(root, out)) == 0
    assert "up to date" in caplog.text


def test_a_head_trained_on_imagefolder_classes_runs_live_with_their_names(tmp_path):
    root = make_flat(tmp_path / "desk", per_class=8)
    features = tmp_path / "features"
    assert run_extract.main(extract_args(root, features, "--val-fraction", "0.3")) == 0
    assert train_quick_head(features, tmp_path / "head") == 0
    frames = tmp_path / "frames"
    frames.mkdir()
    for label, name in enumerate(CLASSES):
        shutil.copy(root / name / "img_000.jpg", frames / f"{label}_{name}.jpg")
    jsonl = tmp_path / "preds.jsonl"
    assert run_webcam.main([*CPU_ARGS, "--checkpoint", str(tmp_path / "head" / "best.pt"), "--source", str(frames),
                            "--no-display", "--predictions", str(jsonl)]) == 0
    lines = read_jsonl(jsonl)
    assert len(lines) == 3
    for line in lines:
        assert {entry["name"] for entry in line["topk"]} == set(CLASSES)  # top-3 of 3: every folder name
        assert {entry["wnid"] for entry in line["topk"]} == set(CLASSES)
