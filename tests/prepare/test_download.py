"""Downloading the dataset from a (loopback) mirror, and arranging val by class."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.datasets.dataset import arrange_val, index_dataset
from tests.helpers import one_error_line
from tests.helpers import zip_dataset
from tests.datasets.test_dataset import _annotations, file_md5, http_server, make, prepare, tree_state, val_label_by_file  # noqa: F401


def _serve_tiny_zip(tmp_path: Path, http_server) -> tuple[str, str]:
    src = make(tmp_path / "src", name="tiny")
    zip_path = zip_dataset(src, http_server.folder / "tiny.zip")
    return f"{http_server.url}/tiny.zip", file_md5(zip_path)


def test_download_from_a_mirror(tmp_path, capsys, http_server):
    url, md5 = _serve_tiny_zip(tmp_path, http_server)
    dl = tmp_path / "dl"
    args = ["--download", "--url", url, "--md5", md5, "--data", dl]
    rc, summary, err = prepare(capsys, *args, summary=tmp_path / "prep.json")
    assert rc == 0, err
    assert file_md5(dl / "tiny.zip") == md5
    assert (dl / "tiny" / ".unpacked").is_file()
    assert Path(summary["root"]) == dl / "tiny" / "tiny"
    assert summary["num_classes"] == 3
    assert summary["splits"]["train"]["images"] == 12 and summary["splits"]["val"]["images"] == 6
    assert "/tiny.zip" in http_server.requests

    fetched = len(http_server.requests)
    rc, summary2, err = prepare(capsys, *args, summary=tmp_path / "prep2.json")
    assert rc == 0, err
    assert summary2 == summary
    assert len(http_server.requests) == fetched  # a good zip already there is not fetched again


def test_download_with_wrong_md5_fails_and_removes_the_file(tmp_path, capsys, http_server):
    url, md5 = _serve_tiny_zip(tmp_path, http_server)
    dl = tmp_path / "dl"
    rc, summary, err = prepare(capsys, "--download", "--url", url, "--md5", "0" * 32, "--data", dl,
                               summary=tmp_path / "prep.json")
    line = one_error_line(err, allow_progress=True)  # the download's progress bar may come first
    assert rc == 2 and summary is None
    assert "md5" in line and url in line
    assert http_server.requests  # it was fetched ...
    assert list(dl.iterdir()) == []  # ... and the bad file removed, nothing unpacked


def test_download_of_a_missing_file_is_a_one_line_error(tmp_path, capsys, http_server):
    dl = tmp_path / "dl"
    url = f"{http_server.url}/nothing-here.zip"
    rc, _, err = prepare(capsys, "--download", "--url", url, "--md5", "0" * 32, "--data", dl)
    line = one_error_line(err, allow_progress=True)
    assert rc == 2 and url in line and "404" in line
    assert list(dl.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# --arrange-val


def test_arrange_val_links_by_class_and_is_idempotent(tmp_path, capsys):
    root = make(tmp_path)
    before = index_dataset(root)
    images_state = tree_state(root / "val" / "images")
    annotations = _annotations(root).read_bytes()

    assert arrange_val(before) == 6
    for rel, label in zip(before.splits["val"].paths, before.splits["val"].labels):
        link = root / "val" / before.wnids[label] / "images" / Path(rel).name
        assert link.is_file() and os.path.samefile(link, root / rel), link
    assert tree_state(root / "val" / "images") == images_state
    assert _annotations(root).read_bytes() == annotations
    assert not list(root.rglob(".*.tmp"))

    assert arrange_val(index_dataset(root)) == 0  # idempotent
    after = index_dataset(root)
    assert after.splits["val"].paths == before.splits["val"].paths
    assert after.splits["val"].labels == before.splits["val"].labels
    assert after.signature("val") == before.signature("val")

    rc, summary, err = prepare(capsys, "--data", root, "--arrange-val", summary=tmp_path / "prep.json")
    assert rc == 0, err
    assert summary["splits"]["val"]["images"] == 6 and summary["skipped"] == []

    # the arranged folders alone (as the old script left them) index to the same labels
    arranged_only = tmp_path / "arranged-only"
    arranged_only.mkdir()
    for name in ("wnids.txt", "words.txt"):
        os.link(root / name, arranged_only / name)
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] in ("train", "val") and rel.parts[1] not in ("images", "val_annotations.txt"):
            (arranged_only / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(path, arranged_only / rel)
    assert val_label_by_file(index_dataset(arranged_only)) == val_label_by_file(before)


@pytest.mark.parametrize("val_layout", ["arranged", "flat-arranged"])
def test_arrange_val_on_an_already_arranged_val_changes_nothing(tmp_path, capsys, val_layout):
    root = make(tmp_path, val_layout=val_layout)
    before, state = index_dataset(root), tree_state(root)
    assert arrange_val(before) == 0
    rc, summary, err = prepare(capsys, "--data", root, "--arrange-val", summary=tmp_path / "prep.json")
    assert rc == 0, err
    assert summary["splits"]["val"]["images"] == 6  # not doubled by links next to the images
    assert tree_state(root) == state
    assert index_dataset(root).signature("val") == before.signature("val")
