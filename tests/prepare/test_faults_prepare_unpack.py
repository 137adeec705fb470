"""Faults injected into unpacking a zip: killed unpacks (the work folders they leave, a kill at each step),
Ctrl-C and a full disk while unpacking, a damaged member, and too little free space.

Each test builds its fault in tmp_path and checks that nothing the user made is lost, that nothing wrong
looks complete, and that a rerun once the fault is gone recovers. (Split from test_faults_prepare.py.)
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from collections import namedtuple

import pytest

import pipeline.data.unpack
from pipeline.datasets.dataset import index_dataset
from pipeline.data.prepare import resolve_data
from tests.conftest import one_error_line
from tests.datasets.test_dataset import file_md5, prepare, tree_state
from tests.helpers import ROOT
from tests.prepare.test_faults_prepare import NAME, WNIDS3, assert_unpacked, dead_pid, make_zip


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
