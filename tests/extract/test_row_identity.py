"""What an update trusts (issue #29, findings 2-4, 10, 14): a row is its image's only while the image is the one
it was made from, and a finished cache is never replaced by another dataset's rows without --overwrite.

A row is trusted when its image's size, mtime, inode and ctime all equal what it recorded; when only the size
does, the file is read and its sha256 compared with the row's. So two images of one size and mtime that swap
names, or an image edited with its mtime put back, are extracted again; a dataset copied, moved or freshly
unpacked keeps its rows without passing through the backbone.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import run_extract
from pipeline.data.synthetic import class_image
from tests.helpers import extract_args, h5_datasets, one_error_line, tree_bytes, update_counts, zip_dataset
from tests.imagefolders import CLASSES, make_splits, write_class

T = 1_700_000_000_000_000_000  # one mtime (ns) for every image: sizes and mtimes alone cannot tell them apart
SPLITS = ("train", "val")


def run(data: Path, out: Path, *extra: str) -> int:
    return run_extract.main(extract_args(data, out, *extra))


def stored_png(path: Path, label: int, index: int) -> None:
    """An uncompressed 64x64 PNG: every one has the same size in bytes, whatever its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(class_image(label, index)).save(path, format="PNG", compress_level=0)
    os.utime(path, ns=(T, T))


def rows(out: Path, split: str = "train") -> dict[str, np.ndarray]:
    with h5py.File(out / f"{split}.h5", "r") as f:
        return dict(zip(f["paths"].asstr()[:], f["fc7"][:]))


@pytest.fixture
def pngs(tmp_path) -> dict:
    """An ImageFolder of same-size PNGs (3 classes x 4 train, 2 val), all with one mtime, and its cache."""
    data, out = tmp_path / "pngs", tmp_path / "features"
    for label, name in enumerate(CLASSES):
        for i in range(4):
            stored_png(data / "train" / name / f"img_{i}.png", label, i)
        for i in range(2):
            stored_png(data / "val" / name / f"img_{i}.png", label, 100 + i)
    assert run(data, out) == 0
    return {"data": data, "out": out, "old": rows(out)}


def assert_rows_are_their_images(pngs: dict, tmp_path: Path) -> None:
    """Every row of the updated cache is the row a fresh extraction gives its image (nothing stale looks complete)."""
    fresh = tmp_path / "fresh"
    assert run(pngs["data"], fresh) == 0
    got, want = rows(pngs["out"]), rows(fresh)
    assert list(got) == list(want)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-4, atol=1e-5, err_msg=path)


def test_two_images_of_one_size_and_mtime_that_swap_names_are_extracted_again(pngs, tmp_path, caplog):
    data = pngs["data"]
    a, b, swap = data / "train/cat/img_0.png", data / "train/dog/img_0.png", data / "train/cat/swap.tmp"
    assert a.stat().st_size == b.stat().st_size and a.stat().st_mtime_ns == b.stat().st_mtime_ns
    os.rename(a, swap), os.rename(b, a), os.rename(swap, b)
    caplog.set_level(logging.INFO)
    assert run(data, pngs["out"]) == 0
    assert update_counts(caplog) == {"train": (10, 2, 2)}  # val is untouched: up to date
    new = rows(pngs["out"])
    np.testing.assert_allclose(new["train/cat/img_0.png"], pngs["old"]["train/dog/img_0.png"], rtol=1e-4, atol=1e-5)
    assert_rows_are_their_images(pngs, tmp_path)


def test_an_edit_at_the_same_size_with_the_mtime_put_back_is_extracted_again(pngs, tmp_path, caplog):
    edited = pngs["data"] / "train/mug/img_2.png"
    size = edited.stat().st_size
    Image.fromarray(class_image(0, 77)).save(edited, format="PNG", compress_level=0)  # exiftool -P, touch -r
    os.utime(edited, ns=(T, T))
    assert edited.stat().st_size == size and edited.stat().st_mtime_ns == T
    caplog.set_level(logging.INFO)
    assert run(pngs["data"], pngs["out"]) == 0
    assert update_counts(caplog) == {"train": (11, 1, 1)}
    assert not np.array_equal(rows(pngs["out"])["train/mug/img_2.png"], pngs["old"]["train/mug/img_2.png"])
    assert_rows_are_their_images(pngs, tmp_path)


@pytest.mark.parametrize("how", ["moved", "copied"])
def test_a_dataset_moved_or_copied_keeps_every_row_without_the_backbone(pngs, tmp_path, caplog, monkeypatch, how):
    moved = tmp_path / "elsewhere" / "pngs"
    moved.parent.mkdir()
    shutil.copytree(pngs["data"], moved) if how == "copied" else os.rename(pngs["data"], moved)
    import pipeline.extract.extractor as extractor

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran")
    monkeypatch.setattr(extractor._Forward, "add", no_backbone)
    caplog.set_level(logging.INFO)
    assert run(moved, pngs["out"]) == 0
    if how == "copied":  # new inodes: each image is read once and its digest compared with its row's
        assert update_counts(caplog) == {"train": (12, 0, 0), "val": (6, 0, 0)}
        assert "extracted none" in caplog.text and "interrupted" not in caplog.text
    new = rows(pngs["out"])
    assert all(np.array_equal(new[path], row) for path, row in pngs["old"].items())
    caplog.clear()
    assert run(moved, pngs["out"]) == 0  # the new stamps are recorded: now simply up to date
    assert caplog.text.count("up to date") == 2


def test_each_row_records_the_digest_of_the_bytes_it_was_made_from(pngs):
    with h5py.File(pngs["out"] / "train.h5", "r") as f:
        content = h5_datasets(f)
        paths = list(f["paths"].asstr()[:])
    for path, digest, (inode, ctime) in zip(paths, content["identity/sha256"], content["identity/inode_ctime"]):
        image = pngs["data"] / path
        assert bytes(digest) == hashlib.sha256(image.read_bytes()).digest()
        assert (inode, ctime) == (image.stat().st_ino, image.stat().st_ctime_ns)


# ---------------------------------------------------------------------------------------------
# Another dataset into a complete cache (finding 2)


@pytest.fixture
def desk(tmp_path) -> dict:
    data, out = make_splits(tmp_path / "desk"), tmp_path / "features"
    assert run(data, out) == 0
    return {"data": data, "out": out}


def assert_refused(desk: dict, capsys, data: Path) -> None:
    before = tree_bytes(desk["out"], skip=(".lock",))
    capsys.readouterr()
    assert run(data, desk["out"]) == 2
    line = one_error_line(capsys)
    assert "train.h5" in line and "--overwrite" in line and "another --out" in line and "another dataset" in line
    assert tree_bytes(desk["out"], skip=(".lock",)) == before  # the finished cache, byte for byte
    assert not [p.name for p in desk["out"].iterdir() if ".parts" in p.name]  # nothing was started


def test_another_dataset_into_a_complete_cache_is_refused(desk, tmp_path, capsys):
    other = tmp_path / "other"
    for label, name in enumerate(("apple", "pear")):
        write_class(other / "train" / name, label, 5)
        write_class(other / "val" / name, label, 2, start=1000)
    assert_refused(desk, capsys, other)
    assert run(other, desk["out"], "--overwrite") == 0  # asked for: replaced


def test_a_data_path_one_folder_too_deep_is_refused(desk, capsys):
    assert_refused(desk, capsys, desk["data"] / "train")  # ROOT/<class>/: another layout, other paths


def test_an_update_keeping_half_the_rows_is_still_an_update(desk, caplog):
    for name in CLASSES:  # 12 train rows: 6 gone, 6 kept; 2 new
        for i in range(2):
            (desk["data"] / "train" / name / f"img_{i:03d}.jpg").unlink()
    write_class(desk["data"] / "train" / "cat", 0, 2, start=50)
    caplog.set_level(logging.INFO)
    assert run(desk["data"], desk["out"]) == 0
    assert update_counts(caplog) == {"train": (6, 2, 6)}


# ---------------------------------------------------------------------------------------------
# An updated zip of an ImageFolder (finding 14)


def test_an_updated_zip_extracts_only_its_new_images(tmp_path, caplog, monkeypatch):
    folder, zip_path, out = make_splits(tmp_path / "src" / "pets"), tmp_path / "pets.zip", tmp_path / "features"
    zip_dataset(folder, zip_path)
    assert run(zip_path, out) == 0
    old = rows(out)
    write_class(folder / "train" / "dog", 1, 1, start=40)  # one new photo; the zip is made again
    zip_dataset(folder, zip_path)
    caplog.set_level(logging.INFO)
    assert run(zip_path, out) == 0
    assert "unpacking" in caplog.text  # a fresh unpack: every file has a new mtime, inode and ctime
    assert update_counts(caplog) == {"train": (12, 1, 0), "val": (6, 0, 0)}
    new = rows(out)
    assert all(np.array_equal(new[path], row) for path, row in old.items())


# ---------------------------------------------------------------------------------------------
# What an update logs (finding 10)


def test_an_update_that_only_removes_rows_says_so(desk, caplog):
    (desk["data"] / "train" / "dog" / "img_003.jpg").unlink()
    caplog.set_level(logging.INFO)
    assert run(desk["data"], desk["out"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: updated")]
    assert len(lines) == 1 and "reused 11" in lines[0] and "extracted none" in lines[0] and "dropped 1" in lines[0]
    assert "interrupted" not in caplog.text and "img/s" not in caplog.text


def test_an_update_reports_the_rate_of_the_images_it_read_only(desk, caplog):
    write_class(desk["data"] / "train" / "mug", 2, 2, start=60)
    caplog.set_level(logging.INFO)
    assert run(desk["data"], desk["out"]) == 0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("train: updated"))
    assert "14 rows" in line and "reused 12" in line and "extracted 2 in " in line and "img/s" in line
