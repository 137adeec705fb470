"""Bad ImageFolder input: one line each (what is wrong, what to do), listed skips, and the user's files untouched."""
from __future__ import annotations

import json
import logging

import h5py
import pytest

import run_extract
from pipeline.datasets.dataset import index_dataset
from pipeline.datasets.holdout import in_val
from pipeline.common.preprocess import Preprocess
from tests.helpers import extract_args, one_error_line, tree_hash
from tests.imagefolders import CLASSES, make_flat, make_splits, write_class, write_strip


def prepare_error(capsys, data, *extra) -> str:
    """The one error line of ``run_extract.py --prepare-only`` on ``data`` (exit code 2)."""
    capsys.readouterr()
    rc = run_extract.main(["--data", str(data), "--prepare-only", "--no-progress", *map(str, extra)])
    line = one_error_line(capsys)
    assert rc == 2
    return line


@pytest.mark.parametrize("case", ["empty", "only images", "train without val", "train, val and a class"])
def test_an_empty_or_ambiguous_layout_says_what_was_found_and_what_is_expected(tmp_path, capsys, case):
    root = tmp_path / "data"
    root.mkdir()
    if case == "only images":
        write_class(root, 0, 3)
    elif case == "train without val":
        make_flat(root / "train")
    elif case == "train, val and a class":
        make_splits(root)
        write_class(root / "cat", 0, 3)
    before = tree_hash(root)
    line = prepare_error(capsys, root)
    assert str(root) in line
    if case == "empty":
        assert "no images and no folders" in line and "ImageFolder" in line and "wnids.txt" in line
    elif case == "only images":
        assert "3 images but no class folders" in line and "<class>/" in line
    else:
        assert "ambiguous" in line and "train/" in line and "train/ and val/" in line
    assert tree_hash(root) == before


def test_an_empty_class_folder_is_an_error(tmp_path, capsys):
    root = make_flat(tmp_path / "desk")
    (root / "pen").mkdir()
    line = prepare_error(capsys, root)
    assert str(root / "pen") in line and "holds no images" in line


def test_a_class_with_fewer_than_two_images_is_an_error(tmp_path, capsys):
    root = make_flat(tmp_path / "desk")
    write_class(root / "pen", 3, 1)
    line = prepare_error(capsys, root)
    assert str(root / "pen") in line and "1 image" in line and "at least 2" in line


def test_a_class_whose_photos_the_decoder_cannot_read_says_so(tmp_path, capsys):
    root = make_flat(tmp_path / "desk")
    (root / "pen").mkdir()
    (root / "pen" / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    line = prepare_error(capsys, root)
    assert str(root / "pen") in line and "0 images" in line and "IMG_0001.HEIC" in line


@pytest.mark.parametrize("where", ["root", "train"])
def test_a_class_folder_that_is_a_file_is_an_error(tmp_path, capsys, where):
    root = make_flat(tmp_path / "desk") if where == "root" else make_splits(tmp_path / "pets")
    parent = root if where == "root" else root / "train"
    (parent / "pen").write_bytes(b"a file where a class folder belongs")
    line = prepare_error(capsys, root)
    assert str(parent / "pen") in line and "is a file, not a class folder" in line


def test_a_class_folder_named_like_an_image_is_an_error(tmp_path, capsys):
    root = make_flat(tmp_path / "desk")
    write_class(root / "pen.jpg", 3, 2)
    line = prepare_error(capsys, root)
    assert str(root / "pen.jpg") in line and "named like an image file" in line


@pytest.mark.parametrize("where", ["root", "val"])
def test_images_beside_class_folders_are_an_error(tmp_path, capsys, where):
    root = make_flat(tmp_path / "desk") if where == "root" else make_splits(tmp_path / "pets")
    parent = root if where == "root" else root / "val"
    write_class(parent, 0, 2, start=500)
    line = prepare_error(capsys, root)
    assert str(parent) in line and "2 images beside its class folders" in line and "img_500.jpg" in line


def test_val_classes_missing_from_train_are_an_error(tmp_path, capsys):
    root = make_splits(tmp_path / "pets")
    write_class(root / "val" / "pen", 3, 2)
    line = prepare_error(capsys, root)
    assert "'pen'" in line and str(root / "train") in line


@pytest.mark.parametrize("fraction", ["0", "1", "-0.1", "1.5", "nan"])
def test_val_fraction_outside_zero_one_is_one_line(tmp_path, capsys, fraction):
    root = make_flat(tmp_path / "desk")
    line = prepare_error(capsys, root, "--val-fraction", fraction)
    assert f"--val-fraction {float(fraction)}" in line and "between 0 and 1" in line
    capsys.readouterr()
    assert run_extract.main(extract_args(root, tmp_path / "features", "--val-fraction", fraction)) == 2
    assert "between 0 and 1" in one_error_line(capsys)
    assert not (tmp_path / "features").exists()


def test_a_class_with_no_val_image_is_a_warning_that_lists_it(tmp_path, caplog):
    root = tmp_path / "desk"
    for label, name in enumerate(CLASSES):
        write_class(root / name, label, 3)
    caplog.set_level(logging.WARNING)
    ds = index_dataset(root, 0.2)
    without = [name for i, name in enumerate(CLASSES) if i not in set(ds.splits["val"].labels)]
    assert without  # 3 images each at 0.2: the hash leaves some class without a val image
    assert f"get no val image from --val-fraction 0.2: {', '.join(map(repr, without))}" in caplog.text


def test_photos_the_decoder_cannot_read_are_listed_skips_and_strict_refuses_them(tmp_path, capsys):
    root = make_flat(tmp_path / "desk", per_class=6)
    unread = ["cat/IMG_0001.HEIC", "dog/IMG_0002.heif", "mug/IMG_0003.avif", "mug/scan.TIFF"]
    for rel in unread:
        (root / rel).write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    (root / "dog" / "broken.jpg").write_bytes((root / "dog" / "img_000.jpg").read_bytes()[:200])  # truncated
    before = tree_hash(root)
    summary_path = tmp_path / "prep.json"
    assert run_extract.main(["--data", str(root), "--prepare-only", "--no-progress",
                             "--summary-json", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    skipped = {item["path"]: item["reason"] for item in summary["skipped"]}
    assert set(skipped) == {*unread, "dog/broken.jpg"}
    assert "format the decoder cannot read" in skipped["cat/IMG_0001.HEIC"] and "convert it to JPEG" in skipped["cat/IMG_0001.HEIC"]
    assert sum(split["skipped"] for split in summary["splits"].values()) == 5
    line = prepare_error(capsys, root, "--strict")
    assert "(5 bad images in all)" in line and "--strict" in line
    # extraction lists them in the cache, in the split the hash puts them in
    out = tmp_path / "features"
    assert run_extract.main(extract_args(root, out)) == 0
    recorded = {}
    for split in ("train", "val"):
        with h5py.File(out / f"{split}.h5", "r") as f:
            for item in json.loads(f.attrs["skipped"]):
                recorded[item["path"]] = split
    assert recorded == {rel: "val" if in_val(rel, 0.2) else "train" for rel in [*unread, "dog/broken.jpg"]}
    assert tree_hash(root) == before  # the user's folder is only read


def test_a_fraction_that_leaves_a_split_empty_is_one_line(tmp_path, capsys):
    root = make_flat(tmp_path / "desk", per_class=2)
    line = prepare_error(capsys, root, "--val-fraction", "0.001")
    assert "--val-fraction 0.001 puts none of the 6 images" in line and "in val; raise it" in line


def test_each_skip_is_listed_once_in_words_without_a_build_path(tmp_path, caplog):
    """A format the decoder cannot read was warned about twice (by the index and by the skip policy), and a
    truncated JPEG's reason carried torchvision's C++ source location (/__w/vision/...decode_jpeg.cpp:171)."""
    root = make_flat(tmp_path / "desk", per_class=4)
    (root / "cat" / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    (root / "dog" / "broken.jpg").write_bytes((root / "dog" / "img_000.jpg").read_bytes()[:200])  # truncated
    bad = ("cat/IMG_0001.HEIC", "dog/broken.jpg")
    out = tmp_path / "features"
    for argv in (["--data", str(root), "--prepare-only", "--no-progress"], extract_args(root, out)):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert run_extract.main(argv) == 0
        assert [caplog.text.count(f"skipping {rel}: ") for rel in bad] == [1, 1], caplog.text
        assert ".cpp" not in caplog.text and "/__w/" not in caplog.text
    reasons = {}
    for split in ("train", "val"):
        with h5py.File(out / f"{split}.h5", "r") as f:
            reasons.update((item["path"], item["reason"]) for item in json.loads(f.attrs["skipped"]))
    assert set(reasons) == set(bad)
    truncated = reasons["dog/broken.jpg"]
    assert truncated.startswith("truncated image (") and "truncated" in truncated[len("truncated image ("):], truncated
    assert ".cpp" not in truncated and "/" not in truncated and "decode_jpeg" not in truncated, truncated


@pytest.mark.parametrize("target", [".", "..", "../.."], ids=["itself", "the dataset", "above the dataset"])
def test_a_symlink_loop_in_a_class_folder_is_one_line_and_each_image_is_listed_once(tmp_path, capsys, caplog, target):
    """A link from a class folder back to itself or to a folder above it was followed 40 levels deep, then
    stopped the run with that path and advice to check the free space. Now each real folder is listed once."""
    root = make_flat(tmp_path / "desk", per_class=4)
    write_class(root / "cat" / "more", 0, 2, start=100)
    (root / "cat" / "again").symlink_to(target, target_is_directory=True)
    (root / "cat" / "more too").symlink_to("more", target_is_directory=True)  # a second name, no loop
    with caplog.at_level(logging.WARNING):
        assert run_extract.main(["--data", str(root), "--prepare-only", "--no-progress"]) == 0
    loops = [r.getMessage() for r in caplog.records if r.getMessage().startswith("symlink loop: ")]
    assert loops == [f"symlink loop: {root / 'cat' / 'again'} -> {(root / 'cat' / target).resolve()}, a folder that "
                     "holds the link; not followed (its images are listed once)"], caplog.text
    assert f"{root / 'cat' / 'more too'} links to {root / 'cat' / 'more'}, a folder already listed" in caplog.text
    assert "free space" not in capsys.readouterr().err
    dataset = index_dataset(root)
    paths = sorted(dataset.splits["train"].paths + dataset.splits["val"].paths)
    assert paths == sorted([*(f"{c}/img_{i:03d}.jpg" for c in CLASSES for i in range(4)),
                            "cat/more/img_100.jpg", "cat/more/img_101.jpg"])


def test_an_extremely_elongated_image_is_a_listed_skip_and_never_resized(tmp_path, capsys, monkeypatch):
    """A 1x4000 strip was resized to 256 x 1,024,000 pixels (0.8 GB) to keep a 224 x 224 crop. Beyond 50:1 an
    image is now a listed skip, the same in preparation and extraction; one at 50:1 is used as before."""
    root = make_flat(tmp_path / "desk", per_class=4)
    write_strip(root / "cat" / "strip.png", 1, 4000)
    write_strip(root / "dog" / "column.jpg", 4000, 1)
    write_strip(root / "mug" / "banner.png", 2, 100)  # 50:1: the most elongated image used
    resized = []
    real = Preprocess.resize_crop

    def recording(self, images):
        resized.extend(max(image.shape[-2:]) / min(image.shape[-2:]) for image in images)
        return real(self, images)

    monkeypatch.setattr(Preprocess, "resize_crop", recording)
    summary_path = tmp_path / "prep.json"
    assert run_extract.main(["--data", str(root), "--prepare-only", "--no-progress",
                             "--summary-json", str(summary_path)]) == 0
    prepared = {item["path"]: item["reason"] for item in json.loads(summary_path.read_text())["skipped"]}
    assert set(prepared) == {"cat/strip.png", "dog/column.jpg"}
    assert prepared["cat/strip.png"].startswith("4000x1 pixels (4000:1) is more elongated than the 50:1")
    assert prepared["dog/column.jpg"].startswith("1x4000 pixels (4000:1)") and "crop it" in prepared["dog/column.jpg"]
    out = tmp_path / "features"
    assert run_extract.main(extract_args(root, out)) == 0
    recorded, rows = {}, []
    for split in ("train", "val"):
        with h5py.File(out / f"{split}.h5", "r") as f:
            recorded.update((item["path"], item["reason"]) for item in json.loads(f.attrs["skipped"]))
            rows += [path.decode() for path in f["paths"][:]]
    assert recorded == prepared and "mug/banner.png" in rows  # counted and listed, never silently gone
    assert resized and max(resized) == 50  # the strips never reached the resize
    line = prepare_error(capsys, root, "--strict")
    assert "cat/strip.png: 4000x1 pixels (4000:1)" in line and "(2 bad images in all)" in line
