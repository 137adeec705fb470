"""Finding the data as a user meets it: paths that do not exist or are not Tiny ImageNet, zips that are not
the dataset, files that are not zips, a zip unpacked next to it once, and a source folder never modified.
(Split from test_dataset.py; downloads are in test_dataset_download.py.)
"""
from __future__ import annotations

import zipfile
from pathlib import Path

from tests.helpers import zip_dataset
from tests.conftest import one_error_line
from tests.datasets.test_dataset import _break_images, file_md5, make, prepare, tree_state


def test_missing_dataset_path_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "tiny-imagenet-200"
    rc, _, err = prepare(capsys, "--data", missing)
    assert rc == 2 and str(missing) in one_error_line(err)
    assert not (tmp_path / "no").exists()


def test_folder_that_is_not_tiny_imagenet_is_a_one_line_error(tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "holiday").mkdir(parents=True)
    rc, _, err = prepare(capsys, "--data", folder)
    assert rc == 2 and str(folder) in one_error_line(err)


def test_zip_that_is_not_tiny_imagenet_is_a_one_line_error(tmp_path, capsys):
    zip_path = tmp_path / "photos.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("photos/readme.txt", "holiday pictures\n")
        archive.writestr("photos/a.JPEG", b"not really")
    before = tree_state(tmp_path)
    rc, _, err = prepare(capsys, "--data", zip_path)
    assert rc == 2 and str(zip_path) in one_error_line(err)
    assert tree_state(tmp_path) == before  # nothing unpacked


def test_file_that_is_not_a_zip_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "tiny-imagenet-200.zip"
    path.write_bytes(b"<html>this is the download page, not the zip</html>")
    rc, _, err = prepare(capsys, "--data", path)
    line = one_error_line(err)
    assert rc == 2 and str(path) in line and "zip" in line


def test_zip_is_unpacked_next_to_it_once_and_never_modified(tmp_path, capsys, monkeypatch):
    src = make(tmp_path / "src")
    zips = tmp_path / "zips"
    zips.mkdir()
    zip_path = zip_dataset(src, zips / "tiny-imagenet-200.zip")
    zip_hash, src_state = file_md5(zip_path), tree_state(src)

    rc, summary, err = prepare(capsys, "--data", zip_path, summary=tmp_path / "prep.json")
    assert rc == 0, err
    target = zips / "tiny-imagenet-200"
    marker = target / ".unpacked"
    assert marker.is_file()
    assert sorted(p.name for p in zips.iterdir()) == ["tiny-imagenet-200", "tiny-imagenet-200.zip"]  # no temp left
    assert Path(summary["root"]) == target / "tiny-imagenet-200"
    assert summary["splits"]["train"]["images"] == 12 and summary["splits"]["val"]["images"] == 6
    marker_mtime, unpacked_state = marker.stat().st_mtime_ns, tree_state(target)

    import pipeline.data.unpack

    def no_second_extract(*args, **kwargs):
        raise AssertionError("the zip was extracted a second time")

    monkeypatch.setattr(pipeline.data.unpack, "_extract", no_second_extract)
    rc, summary2, err = prepare(capsys, "--data", zip_path, summary=tmp_path / "prep2.json")
    assert rc == 0, err
    assert summary2 == summary
    assert marker.stat().st_mtime_ns == marker_mtime and tree_state(target) == unpacked_state
    assert file_md5(zip_path) == zip_hash
    assert tree_state(src) == src_state


def test_prepare_only_never_modifies_the_source_folder(tmp_path, capsys):
    root = make(tmp_path)
    _break_images(root)
    (root / "train" / ".DS_Store").write_bytes(b"\x00")
    before = tree_state(root)
    for extra in ([], ["--strict"]):
        rc, _, err = prepare(capsys, "--data", root, *extra, summary=tmp_path / "prep.json")
        assert rc == (2 if extra else 0), err
    assert tree_state(root) == before
