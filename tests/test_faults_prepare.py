"""Faults injected into preparation: zips in the way, odd or hostile zips, killed unpacks, a full disk, files
that cannot be read, images in unusual formats and names, and messy class lists.

Each test builds its fault in tmp_path and checks that nothing the user made is lost, that nothing wrong
looks complete, and that a rerun once the fault is gone recovers.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

import pipeline.common.images
import pipeline.data.unpack
from pipeline.common.dataset import index_dataset
from pipeline.data.prepare import resolve_data
from pipeline.data.synthetic import WORDS, make_tiny_imagenet
from pipeline.data.unpack import zip_stem
from tests.conftest import one_error_line
from tests.test_dataset import file_md5, http_server, make, prepare, tree_state  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
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
# 5. killed unpacks: what they leave is removed, work of live processes is not


def test_work_folders_of_dead_processes_are_removed_and_only_those(tmp_path, capsys):
    zip_path = make_zip(tmp_path, tmp_path / "data" / f"{NAME}.zip")
    data = tmp_path / "data"
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead, live = dead_pid(), running.pid
    leftovers = {
        f".{NAME}.unpacking-{dead}": True,  # a killed unpack: removed
        f".{NAME}.old-{dead}": True,  # a killed replacement: removed
        f".{NAME}.zip.download-{dead}": True,  # a killed download (a file): removed
        f".{NAME}.unpacking-{live}": False,  # a running unpack: kept
        f".other.unpacking-{dead}": False,  # another zip's: not this run's business
        f"{NAME}.unpacking-{dead}": False,  # not hidden: not this tool's naming
        f".{NAME}.unpacking-{dead}-x": False,
    }
    for name in leftovers:
        if "download" in name:
            (data / name).write_bytes(b"partial")
        else:
            (data / name).mkdir()
            (data / name / "big.bin").write_bytes(b"\x00" * 1000)
    other_host = data / f".{NAME}.unpacking-{dead_pid()}"
    other_host.mkdir()
    (other_host / pipeline.data.unpack.OWNER).write_text("some-other-host\n")  # maybe alive there: kept

    pipeline.data.unpack.remove_stale(data, f"{NAME}.zip")  # what --download does first (its stem is the file name)
    try:
        rc, _, err = prepare(capsys, "--data", zip_path)
    finally:
        running.kill()
        running.wait()
    assert rc == 0, err
    for name, removed in leftovers.items():
        assert (data / name).exists() != removed, name
    assert other_host.is_dir()
    assert_unpacked(data / NAME, tmp_path / "src3" / NAME)


def test_a_work_folder_left_under_this_process_id_is_not_mixed_into_the_copy(tmp_path, capsys):
    """PIDs are reused: a dead run's work folder may carry this process's id; it is cleared first, not merged."""
    zip_path = make_zip(tmp_path, tmp_path / "data" / f"{NAME}.zip")
    left = tmp_path / "data" / f".{NAME}.unpacking-{os.getpid()}"
    (left / NAME / "train").mkdir(parents=True)
    (left / NAME / "train" / "stray.JPEG").write_bytes(b"half")
    rc, _, err = prepare(capsys, "--data", zip_path)
    assert rc == 0, err
    assert_unpacked(tmp_path / "data" / NAME, tmp_path / "src3" / NAME)
    assert not left.exists()


_KILL_SCRIPT = r"""
import os, signal, sys
import pipeline.data.unpack as unpack
from pipeline.data.prepare import resolve_data

step = sys.argv[2]
def kill():
    os.kill(os.getpid(), signal.SIGKILL)
if step == "mid-unpack":
    real = unpack._extract
    def extract(zip_path, members, folder, *, progress):
        real(zip_path, members[: len(members) // 2], folder, progress=progress)
        kill()
    unpack._extract = extract
elif step == "before-marker":
    unpack._write_marker = lambda folder, identity: kill()
elif step == "before-rename":
    unpack._move_into_place = lambda work, target, identity: kill()
elif step == "mid-replace":  # between moving the old copy aside and moving the new one in
    real_rename = os.rename
    def rename(a, b):
        if ".old-" in str(b):
            real_rename(a, b)
            kill()
        real_rename(a, b)
    os.rename = rename
resolve_data(sys.argv[1], progress=False)
"""


@pytest.mark.parametrize("step", ["mid-unpack", "before-marker", "before-rename", "mid-replace"])
def test_a_kill_at_each_step_of_unpacking_leaves_nothing_complete_and_the_rerun_recovers(tmp_path, step):
    zip_path = make_zip(tmp_path, tmp_path / "data" / f"{NAME}.zip")
    data, target = tmp_path / "data", tmp_path / "data" / NAME
    if step == "mid-replace":  # an old copy of this tool's, from another zip, is being replaced
        os.replace(make_zip(tmp_path, tmp_path / "old.zip", num_classes=4), zip_path)
        resolve_data(zip_path, progress=False)
        os.replace(make_zip(tmp_path, tmp_path / "new.zip", num_classes=3), zip_path)
    zip_md5 = file_md5(zip_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(zip_path), step], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    leftovers = [p.name for p in data.iterdir() if p.name.startswith(".")]
    assert leftovers, "a kill leaves its work folder (removed by the next run)"
    assert not target.exists()  # nothing half-made under the final name (an old copy is moved aside first)
    assert file_md5(zip_path) == zip_md5

    root = resolve_data(zip_path, progress=False)  # the rerun
    assert root == target / NAME
    assert sorted(p.name for p in data.iterdir()) == [NAME, f"{NAME}.zip"]
    assert_unpacked(target, tmp_path / "src3" / NAME)
    assert len(index_dataset(root).wnids) == 3


def test_ctrl_c_or_a_full_disk_while_unpacking_keeps_nothing(tmp_path, capsys, monkeypatch):
    zip_path = make_zip(tmp_path, tmp_path / "data" / f"{NAME}.zip")
    real_extract, calls = zipfile.ZipFile.extract, []

    def full_disk(self, member, path=None, pwd=None):
        calls.append(member)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", full_disk)
    rc, _, err = prepare(capsys, "--data", zip_path)
    line = one_error_line(err)
    assert rc == 2 and str(zip_path) in line and "No space left" in line
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [f"{NAME}.zip"]  # no half copy, no work folder

    def interrupted(self, member, path=None, pwd=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(zipfile.ZipFile, "extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve_data(zip_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [f"{NAME}.zip"]

    monkeypatch.setattr(zipfile.ZipFile, "extract", real_extract)
    rc, summary, err = prepare(capsys, "--data", zip_path, summary=tmp_path / "prep.json")
    assert rc == 0 and summary["splits"]["train"]["images"] == 12, err


def test_a_damaged_member_is_a_one_line_error_and_leaves_nothing(tmp_path, capsys):
    zip_path = make_zip(tmp_path, tmp_path / "data" / f"{NAME}.zip")  # stored: the bytes are plain
    good = zip_path.read_bytes()
    wnids = "\n".join(WNIDS3).encode()
    assert good.count(wnids) == 1
    zip_path.write_bytes(good.replace(wnids, wnids.replace(b"n0", b"x0")))  # the CRC no longer matches
    rc, _, err = prepare(capsys, "--data", zip_path)
    line = one_error_line(err)
    assert rc == 2 and str(zip_path) in line and "damaged" in line
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [f"{NAME}.zip"]
    zip_path.write_bytes(good)
    rc, _, err = prepare(capsys, "--data", zip_path)
    assert rc == 0, err


# ---------------------------------------------------------------------------------------------
# 6. space is checked before unpacking


def test_too_little_free_space_stops_before_writing(tmp_path, capsys, monkeypatch):
    zip_path = make_zip(tmp_path, tmp_path / "data" / f"{NAME}.zip")
    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 20_000, 20_000))
    before = tree_state(tmp_path / "data")
    rc, _, err = prepare(capsys, "--data", zip_path)
    line = one_error_line(err)
    assert rc == 2 and "not enough space" in line and str(zip_path) in line and "MB are free" in line
    assert tree_state(tmp_path / "data") == before

    monkeypatch.setattr(shutil, "disk_usage", real)
    rc, summary, err = prepare(capsys, "--data", zip_path, summary=tmp_path / "prep.json")
    assert rc == 0 and summary["num_classes"] == 3, err


# ---------------------------------------------------------------------------------------------
# 8. every format the decoder takes becomes 8-bit RGB, the same way everywhere

GRAY16 = np.array([[0, 255, 256, 511], [32768, 65280, 65535, 1000]], dtype=np.uint16).repeat(8, 0).repeat(8, 1)
