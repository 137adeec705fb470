"""Extract only what is new (issue #20 section 2): a rerun on a changed dataset passes only new or changed
images through the backbone, reuses every other row bit for bit, drops the rows of removed images, and
gives the file a fresh extraction of the new dataset would give (rows, order, labels, paths, stamps).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import run_extract
from features import cache
from pipeline.common.errors import UserError
from pipeline.data.synthetic import class_image, make_tiny_imagenet
from pipeline.extract.incremental import plan_reuse
from tests.helpers import extract_args, file_hash, h5_datasets, one_error_line, update_counts

SPLITS = ("train", "val")
NEW_WNID = "n02100000"  # sorts between the second and the third class: every later label moves up by one


def run(data: Path, out: Path, *extra: str) -> int:
    return run_extract.main(extract_args(data, out, *extra))


def read(path: Path) -> dict:
    """Every dataset of a cache file (the ``features`` link resolved; ``identity/...`` by its path) and its attributes."""
    with h5py.File(path, "r") as f:
        content = h5_datasets(f)
        content["attrs"] = dict(f.attrs)
    content["paths"] = [p.decode() for p in content["paths"]]
    return content


def row_of(content: dict) -> dict[str, np.ndarray]:
    return dict(zip(content["paths"], content["fc7"]))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """A 3-class dataset (4 train, 2 val per class) and its fc7 cache. Read-only: tests copy both."""
    root = tmp_path_factory.mktemp("incremental")
    data = make_tiny_imagenet(root / "ds", num_classes=3, train_per_class=4, val_per_class=2)
    out = root / "features"
    assert run(data, out) == 0
    return {"data": data, "out": out}


def copy_base(base: dict, tmp_path: Path) -> dict:
    """This test's copies of ``base``, with the cache's rows as they were ("old"). The copied images have new
    inodes and ctimes: a first run compares their content with the rows and records their new stamps, so the
    copied cache is up to date for the copied dataset."""
    data, out = tmp_path / "ds", tmp_path / "features"
    shutil.copytree(base["data"], data)
    shutil.copytree(base["out"], out)
    assert run(data, out) == 0
    return {"data": data, "out": out, "old": {split: read(out / f"{split}.h5") for split in SPLITS}}


@pytest.fixture
def copy(base, tmp_path) -> dict:
    return copy_base(base, tmp_path)


def add_train_images(data: Path, wnid: str, label: int, indices: range) -> None:
    folder = data / "train" / wnid / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        Image.fromarray(class_image(label, i)).save(folder / f"{wnid}_{i}.JPEG", quality=90)


def add_val_image(data: Path, wnid: str, label: int, name: str) -> None:
    Image.fromarray(class_image(label, 2000 + len(name))).save(data / "val" / "images" / name, quality=90)
    with open(data / "val" / "val_annotations.txt", "a") as f:
        f.write(f"{name}\t{wnid}\t0\t0\t63\t63\n")


def remove_val_image(data: Path, name: str) -> None:
    annotations = data / "val" / "val_annotations.txt"
    lines = [line for line in annotations.read_text().splitlines() if not line.startswith(f"{name}\t")]
    annotations.write_text("\n".join(lines) + "\n")
    (data / "val" / "images" / name).unlink()


def update(copy: dict, caplog, *extra: str) -> dict[str, tuple[int, int, int]]:
    """Rerun the extraction on the changed dataset: {split: (reused, extracted, dropped)} from its log."""
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert run(copy["data"], copy["out"], *extra) == 0
    return update_counts(caplog)


def within_one_bf16_ulp(got: np.ndarray, want: np.ndarray) -> bool:
    """Each value within one bf16 ulp (2**-7 of its power of two) of the other's: what a bf16 row computed in
    another batch composition may differ by (docs/cache-format.md)."""
    magnitude = np.maximum(np.abs(got), np.abs(want)).astype(np.float64)
    ulp = np.exp2(np.floor(np.log2(np.where(magnitude > 0, magnitude, 1.0))) - 7)
    return bool((np.abs(got.astype(np.float64) - want) <= ulp).all())


def assert_equals_fresh(copy: dict, tmp_path: Path, *extra: str, reused: bool = True) -> None:
    """The updated cache equals a fresh extraction of the new dataset into another folder: the same paths, order,
    labels, classes and stamps; reused rows bit for bit the old file's; new rows at cosine >= 0.9999, each value
    within fp32 rounding (bf16: within one bf16 ulp)."""
    fresh = tmp_path / "fresh"
    assert run(copy["data"], fresh, *extra) == 0
    for split in SPLITS:
        got, want = read(copy["out"] / f"{split}.h5"), read(fresh / f"{split}.h5")
        assert got["paths"] == want["paths"], split  # the order a fresh extraction gives
        for name in ("labels", "stamps", "class_wnids", "class_names"):
            if name in got or name != "stamps":  # a file left as it was by an older version has no stamps
                assert np.array_equal(got[name], want[name]), f"{split}/{name}"
        for name in ("num_rows", "num_classes", "dataset_signature", "files_signature", "precision", "layers"):
            assert got["attrs"][name] == want["attrs"][name], f"{split} attribute {name}"
        a, b = got["fc7"].astype(np.float64), want["fc7"].astype(np.float64)
        cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
        assert cosine.min() >= 0.9999, (split, cosine.min())
        if got["attrs"]["precision"] == "bf16":
            assert within_one_bf16_ulp(got["fc7"], want["fc7"]), split
        else:
            np.testing.assert_allclose(got["fc7"], want["fc7"], rtol=1e-4, atol=1e-5)
        if not reused:
            continue
        old = row_of(copy["old"][split])
        old_stamps = dict(zip(copy["old"][split]["paths"], copy["old"][split]["stamps"].tolist()))
        for path, row, stamp in zip(got["paths"], got["fc7"], got["stamps"].tolist()):
            if old_stamps.get(path) == stamp:  # unchanged image: its row is the old file's, bit for bit
                assert np.array_equal(row, old[path]), path
    assert not [p.name for p in copy["out"].iterdir() if ".parts" in p.name or p.name.endswith(".tmp")]


def test_added_images_are_the_only_ones_extracted(copy, tmp_path, caplog):
    add_train_images(copy["data"], "n01443537", 0, range(10, 12))
    add_val_image(copy["data"], "n02231487", 2, "val_new.JPEG")
    assert update(copy, caplog) == {"train": (12, 2, 0), "val": (6, 1, 0)}
    assert_equals_fresh(copy, tmp_path)


def test_an_added_class_relabels_the_rows_and_extracts_only_its_images(copy, tmp_path, caplog):
    data = copy["data"]
    with open(data / "wnids.txt", "a") as f:
        f.write(f"{NEW_WNID}\n")
    with open(data / "words.txt", "a") as f:
        f.write(f"\n{NEW_WNID}\tnew class")
    add_train_images(data, NEW_WNID, 5, range(3))
    add_val_image(data, NEW_WNID, 5, "val_added.JPEG")
    assert update(copy, caplog) == {"train": (12, 3, 0), "val": (6, 1, 0)}
    assert_equals_fresh(copy, tmp_path)
    train = read(copy["out"] / "train.h5")
    assert [w.decode() for w in train["class_wnids"]][2] == NEW_WNID
    moved = train["paths"].index("train/n02231487/images/n02231487_0.JPEG")
    assert train["labels"][moved] == 3  # was 2: labels come from the new class list


def test_removed_images_are_dropped_without_running_the_backbone(copy, tmp_path, caplog, monkeypatch):
    (copy["data"] / "train/n02002724/images/n02002724_1.JPEG").unlink()
    remove_val_image(copy["data"], "val_0.JPEG")
    import pipeline.extract.extractor as extractor

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran")
    monkeypatch.setattr(extractor._Forward, "add", no_backbone)
    assert update(copy, caplog) == {"train": (11, 0, 1), "val": (5, 0, 1)}
    monkeypatch.undo()
    assert_equals_fresh(copy, tmp_path)


def test_an_image_edited_in_place_is_extracted_again(copy, tmp_path, caplog):
    edited = copy["data"] / "train/n01443537/images/n01443537_2.JPEG"
    Image.fromarray(class_image(1, 77)).save(edited, quality=90)
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 10**9))  # a later mtime for sure
    assert update(copy, caplog) == {"train": (11, 1, 1)}  # val is up to date
    assert_equals_fresh(copy, tmp_path)
    new, old = row_of(read(copy["out"] / "train.h5")), row_of(copy["old"]["train"])
    assert not np.array_equal(new["train/n01443537/images/n01443537_2.JPEG"],
                              old["train/n01443537/images/n01443537_2.JPEG"])


def test_a_changed_setting_is_still_refused_with_a_changed_dataset(copy, capsys):
    add_train_images(copy["data"], "n01443537", 0, range(10, 11))
    before = {split: file_hash(copy["out"] / f"{split}.h5") for split in SPLITS}
    capsys.readouterr()
    assert run(copy["data"], copy["out"], "--image-size", "80") == 2
    line = one_error_line(capsys)
    assert "train.h5" in line and "preprocess" in line and "--overwrite" in line
    assert {split: file_hash(copy["out"] / f"{split}.h5") for split in SPLITS} == before


def test_the_recorded_precision_is_used_for_new_rows(base, tmp_path, caplog):
    """A bf16 cache stays bf16 under --precision auto, whatever auto would choose on this machine today."""
    data, out = tmp_path / "ds", tmp_path / "features"
    shutil.copytree(base["data"], data)
    assert run(data, out, "--precision", "bf16") == 0
    copy = {"data": data, "out": out, "old": {split: read(out / f"{split}.h5") for split in SPLITS}}
    add_train_images(data, "n02002724", 1, range(10, 12))
    assert update(copy, caplog, "--precision", "auto") == {"train": (12, 2, 0)}
    assert read(out / "train.h5")["attrs"]["precision"] == "bf16"
    assert_equals_fresh(copy, tmp_path, "--precision", "bf16")


def test_an_older_file_without_stamps_is_up_to_date_and_re_extracted_whole_when_the_dataset_changed(copy, tmp_path,
                                                                                                   caplog):
    for split in SPLITS:  # as made by a version before stamps
        with h5py.File(copy["out"] / f"{split}.h5", "a") as f:
            del f["stamps"], f["identity"], f.attrs["files_identity"]
    caplog.set_level(logging.INFO)
    assert run(copy["data"], copy["out"]) == 0
    assert sum("up to date" in r.getMessage() for r in caplog.records) == 2
    add_train_images(copy["data"], "n01443537", 0, range(10, 11))
    caplog.clear()
    assert run(copy["data"], copy["out"]) == 0
    assert any("records no per-image sizes and times" in r.getMessage() for r in caplog.records)
    assert_equals_fresh(copy, tmp_path, reused=False)
    assert "stamps" in read(copy["out"] / "train.h5")  # the new file records them


def test_under_torchrun_the_update_is_one_line(copy):
    path = copy["out"] / "train.h5"
    attrs = cache.read_attrs(path)
    with pytest.raises(UserError, match="without torchrun"):
        plan_reuse(path, attrs, ("fc7",), copy["data"], copy["old"]["train"]["paths"], copy["old"]["train"]["stamps"],
                   world=2)


def test_new_rows_of_another_backbone_cover_every_layer_of_the_file(base, tmp_path, caplog):
    """resnet18's cache of two layers, updated by a run that asks for one: the new rows hold both."""
    data, out = tmp_path / "ds", tmp_path / "features"
    shutil.copytree(base["data"], data)
    two = ("--backbone", "resnet18", "--layers", "penultimate,layer3")
    assert run(data, out, *two) == 0
    copy = {"data": data, "out": out, "old": {split: read(out / f"{split}.h5") for split in SPLITS}}
    add_train_images(data, "n01443537", 0, range(10, 12))
    assert update(copy, caplog, "--backbone", "resnet18") == {"train": (12, 2, 0)}
    fresh = tmp_path / "fresh"
    assert run(data, fresh, *two) == 0
    got, want = read(out / "train.h5"), read(fresh / "train.h5")
    assert got["paths"] == want["paths"] and got["attrs"]["layers_json"] == want["attrs"]["layers_json"]
    for layer in ("penultimate", "layer3"):
        np.testing.assert_allclose(got[layer], want[layer], rtol=1e-4, atol=1e-5)
        old = dict(zip(copy["old"]["train"]["paths"], copy["old"]["train"][layer]))
        for path, row in zip(got["paths"], got[layer]):
            if path in old:
                assert np.array_equal(row, old[path]), (layer, path)
