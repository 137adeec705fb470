"""Faults injected into preparation: zips in the way, odd or hostile zips, stale unpacked copies (killed
unpacks, a full disk: test_faults_prepare_unpack.py; unreadable files, unusual formats and names, messy class
lists: test_faults_prepare_inputs.py).

Each test builds its fault in tmp_path and checks that nothing the user made is lost, that nothing wrong
looks complete, and that a rerun once the fault is gone recovers.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import pipeline.datasets.images
import pipeline.data.unpack
from pipeline.data.synthetic import WORDS, make_tiny_imagenet
from pipeline.data.unpack import zip_stem
from tests.conftest import one_error_line
from tests.datasets.test_dataset import file_md5, http_server, make, prepare, tree_state  # noqa: F401 (a fixture)

WNIDS3 = sorted(WORDS)[:3]
NAME = "tiny-imagenet-200"


# ---------------------------------------------------------------------------------------------
# helpers


def make_zip(tmp_path: Path, zip_path: Path, *, num_classes: int = 3, compression: int = zipfile.ZIP_STORED) -> Path:
    """A dataset in the official zip layout (top folder tiny-imagenet-200/) at ``zip_path``."""
    src = make_tiny_imagenet(tmp_path / f"src{num_classes}" / NAME, num_classes=num_classes)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", compression) as archive:
        for path in sorted(src.rglob("*")):
            archive.write(path, Path(NAME) / path.relative_to(src))
    return zip_path


def files_of(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file, this tool's marker left out."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != pipeline.data.unpack.MARKER}


def assert_unpacked(folder: Path, src: Path) -> None:
    """``folder`` is a finished unpack of the dataset at ``src``: the marker, and every file byte for byte."""
    assert (folder / pipeline.data.unpack.MARKER).is_file()
    assert files_of(folder / NAME) == files_of(src)


def patch_headers(zip_path: Path, *, flag_bits: int = 0, compress_type: int | None = None) -> None:
    """Set bits in the general-purpose flags (and optionally the method) of every local and central header."""
    data = bytearray(zip_path.read_bytes())
    for signature, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        start = 0
        while (i := data.find(signature, start)) >= 0:
            flags = int.from_bytes(data[i + flag_at:i + flag_at + 2], "little") | flag_bits
            data[i + flag_at:i + flag_at + 2] = flags.to_bytes(2, "little")
            if compress_type is not None:
                data[i + method_at:i + method_at + 2] = compress_type.to_bytes(2, "little")
            start = i + 4
    zip_path.write_bytes(bytes(data))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def no_extract(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the zip was unpacked again")

    monkeypatch.setattr(pipeline.data.unpack, "_extract", fail)


# ---------------------------------------------------------------------------------------------
# 1. a folder beside the zip that the tool did not make is never deleted


def test_a_user_folder_beside_the_zip_survives_and_the_zip_goes_elsewhere(tmp_path, capsys, caplog, monkeypatch):
    zip_path = make_zip(tmp_path, tmp_path / "data" / f"{NAME}.zip")
    mine = tmp_path / "data" / NAME  # the user's, not a dataset
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "todo.txt").write_text("my notes\n")
    (mine / "wnids.txt.bak").write_bytes(b"\x00keep me")
    before, zip_md5 = tree_state(mine), file_md5(zip_path)

    with caplog.at_level(logging.INFO):
        rc, summary, err = prepare(capsys, "--data", zip_path, summary=tmp_path / "prep.json")
    assert rc == 0, err
    assert tree_state(mine) == before and file_md5(zip_path) == zip_md5
    assert Path(summary["root"]) == tmp_path / "data" / f"{NAME}.unpacked" / NAME
    assert "in the way" in caplog.text
    assert (tmp_path / "data" / f"{NAME}.unpacked" / pipeline.data.unpack.MARKER).is_file()

    assert_unpacked(tmp_path / "data" / f"{NAME}.unpacked", tmp_path / "src3" / NAME)
    no_extract(monkeypatch)  # the rerun reuses that copy
    rc, summary2, err = prepare(capsys, "--data", zip_path, summary=tmp_path / "prep2.json")
    assert rc == 0 and summary2 == summary
    assert tree_state(mine) == before


def test_a_user_dataset_beside_the_zip_is_used_as_it_is(tmp_path, capsys, caplog, monkeypatch):
    zip_path = make_zip(tmp_path, tmp_path / "data" / f"{NAME}.zip")
    mine = make(tmp_path / "data")  # data/tiny-imagenet-200 holding wnids.txt: the README's layout
    (mine / "my-notes.txt").write_text("unpacked by hand\n")
    before = tree_state(mine)
    no_extract(monkeypatch)
    with caplog.at_level(logging.INFO):
        rc, summary, err = prepare(capsys, "--data", zip_path, summary=tmp_path / "prep.json")
    assert rc == 0, err
    assert Path(summary["root"]) == mine
    assert "using the dataset already in" in caplog.text
    assert tree_state(mine) == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [NAME, f"{NAME}.zip"]


def test_when_both_places_are_taken_it_stops_and_touches_neither(tmp_path, capsys):
    zip_path = make_zip(tmp_path, tmp_path / "data" / f"{NAME}.zip")
    for name in (NAME, f"{NAME}.unpacked"):
        (tmp_path / "data" / name).mkdir()
        (tmp_path / "data" / name / "mine.txt").write_text(name)
    before = tree_state(tmp_path / "data")
    rc, _, err = prepare(capsys, "--data", zip_path)
    line = one_error_line(err)
    assert rc == 2 and str(zip_path) in line and "move one away" in line
    assert tree_state(tmp_path / "data") == before

    shutil.rmtree(tmp_path / "data" / f"{NAME}.unpacked")  # the fault gone: the rerun unpacks there
    rc, summary, err = prepare(capsys, "--data", zip_path, summary=tmp_path / "prep.json")
    assert rc == 0, err
    assert Path(summary["root"]) == tmp_path / "data" / f"{NAME}.unpacked" / NAME
    assert (tmp_path / "data" / NAME / "mine.txt").read_text() == NAME


# ---------------------------------------------------------------------------------------------
# 2. a zip is known by its content


@pytest.mark.parametrize("name, folder", [(f"{NAME}.ZIP", NAME), (f"{NAME}.zip.1", NAME), (NAME, f"{NAME}.unpacked"),
                                          ("download", "download.unpacked")])
def test_a_zip_is_recognised_by_content_whatever_its_name(tmp_path, capsys, name, folder):
    zip_path = make_zip(tmp_path, tmp_path / "data" / name)
    rc, summary, err = prepare(capsys, "--data", zip_path, summary=tmp_path / "prep.json")
    assert rc == 0, err
    assert Path(summary["root"]) == tmp_path / "data" / folder / NAME
    assert summary["splits"]["train"]["images"] == 12 and summary["splits"]["val"]["images"] == 6
    assert zip_path.is_file()


def test_zip_stem():
    assert zip_stem(Path("a/tiny-imagenet-200.zip")) == "tiny-imagenet-200"
    assert zip_stem(Path("tiny-imagenet-200.ZIP")) == "tiny-imagenet-200"
    assert zip_stem(Path("tiny-imagenet-200.zip.12")) == "tiny-imagenet-200"
    assert zip_stem(Path("tiny-imagenet-200")) == "tiny-imagenet-200"
    assert zip_stem(Path("tiny.v2.Zip")) == "tiny.v2"


# ---------------------------------------------------------------------------------------------
# 3. zips Python cannot unpack, and zips far too large: stopped before anything is written


@pytest.mark.parametrize("fault, words", [("encrypted", ["encrypted", "password"]),
                                          ("deflate64", ["Deflate64", "7z"]),
                                          ("huge", ["not the Tiny ImageNet zip"])])
def test_zips_that_cannot_be_unpacked_stop_before_writing(tmp_path, capsys, fault, words):
    zip_path = make_zip(tmp_path, tmp_path / "data" / f"{NAME}.zip")
    good = zip_path.read_bytes()
    if fault == "encrypted":
        patch_headers(zip_path, flag_bits=0x1)
    elif fault == "deflate64":
        patch_headers(zip_path, compress_type=9)
    else:  # two members claim 4 GB each in the central directory
        data = bytearray(zip_path.read_bytes())
        for i in (data.find(b"PK\x01\x02"), data.find(b"PK\x01\x02", data.find(b"PK\x01\x02") + 4)):
            data[i + 24:i + 28] = (0xF0000000).to_bytes(4, "little")
        zip_path.write_bytes(bytes(data))
    before = tree_state(tmp_path / "data")
    rc, _, err = prepare(capsys, "--data", zip_path)
    line = one_error_line(err)
    assert rc == 2 and str(zip_path) in line
    for word in words:
        assert word in line, line
    assert tree_state(tmp_path / "data") == before  # nothing written

    zip_path.write_bytes(good)  # the right zip: the rerun unpacks it
    rc, summary, err = prepare(capsys, "--data", zip_path, summary=tmp_path / "prep.json")
    assert rc == 0 and summary["num_classes"] == 3, err


# ---------------------------------------------------------------------------------------------
# 4. another zip at the same path is unpacked afresh


def test_another_zip_at_the_same_path_is_not_served_from_the_old_copy(tmp_path, capsys, caplog, monkeypatch):
    zip_path = make_zip(tmp_path, tmp_path / "data" / f"{NAME}.zip", num_classes=3)
    rc, summary, err = prepare(capsys, "--data", zip_path, summary=tmp_path / "prep.json")
    assert rc == 0 and summary["num_classes"] == 3, err

    other = make_zip(tmp_path, tmp_path / "other.zip", num_classes=4)
    os.replace(other, zip_path)  # a new download under the same name
    with caplog.at_level(logging.INFO):
        rc, summary, err = prepare(capsys, "--data", zip_path, summary=tmp_path / "prep.json")
    assert rc == 0, err
    assert summary["num_classes"] == 4 and Path(summary["root"]) == tmp_path / "data" / NAME / NAME
    assert "afresh" in caplog.text
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [NAME, f"{NAME}.zip"]  # the old copy is gone
    marker = json.loads((tmp_path / "data" / NAME / pipeline.data.unpack.MARKER).read_text())
    assert marker["size"] == zip_path.stat().st_size

    # the same zip copied again (a new mtime, same content) is not unpacked again
    no_extract(monkeypatch)
    os.utime(zip_path, ns=(1_000_000_000, 1_000_000_000))
    rc, summary2, err = prepare(capsys, "--data", zip_path, summary=tmp_path / "prep2.json")
    assert rc == 0 and summary2 == summary, err
    marker = json.loads((tmp_path / "data" / NAME / pipeline.data.unpack.MARKER).read_text())
    assert marker["mtime_ns"] == 1_000_000_000  # noted for the quick look


def test_a_copy_from_an_older_version_is_unpacked_afresh(tmp_path, capsys):
    zip_path = make_zip(tmp_path, tmp_path / "data" / f"{NAME}.zip")
    rc, _, err = prepare(capsys, "--data", zip_path)
    assert rc == 0, err
    target = tmp_path / "data" / NAME
    (target / pipeline.data.unpack.MARKER).write_text(f"{zip_path.resolve()}\n")  # the old marker: which zip is unknown
    (target / NAME / "wnids.txt").write_text("n00000001\n")  # and a copy that no longer matches
    rc, summary, err = prepare(capsys, "--data", zip_path, summary=tmp_path / "prep.json")
    assert rc == 0 and summary["num_classes"] == 3, err
    assert json.loads((target / pipeline.data.unpack.MARKER).read_text())["members"]


# ---------------------------------------------------------------------------------------------
# 8. every format the decoder takes becomes 8-bit RGB, the same way everywhere

GRAY16 = np.array([[0, 255, 256, 511], [32768, 65280, 65535, 1000]], dtype=np.uint16).repeat(8, 0).repeat(8, 1)
