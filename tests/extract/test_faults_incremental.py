"""Faults during an incremental update: kill -9 midway (the rerun resumes and equals a fresh extraction), a kill
at the assembly (the old file untouched), and a second writer (refused). Nothing the user made is lost, and
nothing wrong looks complete.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run_extract
from features import cache
from features.locking import exclusive_writer
from tests.helpers import ROOT, TINY_SHARD_ARGS, extract_args, file_hash, one_error_line
from tests.extract.test_incremental import SPLITS, add_train_images, assert_equals_fresh, copy_base, read

NEW_WNID = "n02669723"  # the fourth class of the generated dataset's word list: its shards come last


class Killed(BaseException):
    """A kill at this step: nothing after it runs, and nothing in the project catches it."""


def run(data: Path, out: Path, *extra: str) -> int:
    return run_extract.main(extract_args(data, out, *TINY_SHARD_ARGS, *extra))


@pytest.fixture(scope="module")
def base(generated_dataset, tmp_path_factory) -> dict:
    """A 3-class dataset (4 train, 1 val per class) and its cache in shards of 2. Read-only: tests copy both."""
    out = tmp_path_factory.mktemp("faults-incremental") / "features"
    data = generated_dataset(3, 4, 1)
    assert run(data, out) == 0
    return {"data": data, "out": out}


@pytest.fixture
def copy(base, tmp_path) -> dict:
    return copy_base(base, tmp_path)


def add_class(data: Path, count: int) -> None:
    with open(data / "wnids.txt", "a") as f:
        f.write(f"{NEW_WNID}\n")
    add_train_images(data, NEW_WNID, 3, range(count))


def test_kill_9_mid_update_then_the_rerun_resumes_and_equals_a_fresh_extraction(copy, tmp_path):
    add_class(copy["data"], 20)  # 10 shards to compute after the 6 reused ones
    old = file_hash(copy["out"] / "train.h5")
    parts = cache.parts_folder(copy["out"], "train")
    command = [sys.executable, "run_extract.py", *extract_args(copy["data"], copy["out"], *TINY_SHARD_ARGS)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(cache.done_shards(parts)) < 8:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed; add more images"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = cache.done_shards(parts)
    assert 8 <= len(done) < 16
    assert file_hash(copy["out"] / "train.h5") == old  # the old file is untouched until the new one is complete
    assert cache.read_attrs(copy["out"] / "train.h5")["num_rows"] == 12

    written = []
    write_shard = cache.write_shard
    try:
        cache.write_shard = lambda parts, shard, *a, **k: (written.append((parts.name, shard)), write_shard(parts, shard, *a, **k))
        assert run(copy["data"], copy["out"]) == 0
    finally:
        cache.write_shard = write_shard
    resumed = sorted(shard for name, shard in written if name == parts.name)
    assert resumed == sorted(set(range(16)) - done)  # resumed: the finished shards were kept
    assert_equals_fresh(copy, tmp_path, *TINY_SHARD_ARGS)


def test_a_kill_at_the_assembly_leaves_the_old_file_and_the_rerun_finishes(copy, tmp_path, monkeypatch):
    add_class(copy["data"], 3)
    before = {split: file_hash(copy["out"] / f"{split}.h5") for split in SPLITS}

    def kill(*args, **kwargs):
        raise Killed
    monkeypatch.setattr(cache, "assemble", kill)
    with pytest.raises(Killed):
        run(copy["data"], copy["out"])
    monkeypatch.undo()
    assert {split: file_hash(copy["out"] / f"{split}.h5") for split in SPLITS} == before
    assert not (copy["out"] / "train.h5.tmp").exists()
    assert run(copy["data"], copy["out"]) == 0
    assert read(copy["out"] / "train.h5")["attrs"]["num_rows"] == 15
    assert_equals_fresh(copy, tmp_path, *TINY_SHARD_ARGS)


def test_a_second_writer_is_refused_and_touches_nothing(copy, capsys):
    add_class(copy["data"], 2)
    before = {split: file_hash(copy["out"] / f"{split}.h5") for split in SPLITS}
    with exclusive_writer(copy["out"]):
        capsys.readouterr()
        assert run(copy["data"], copy["out"]) == 2
        assert "another extraction" in one_error_line(capsys)
    assert {split: file_hash(copy["out"] / f"{split}.h5") for split in SPLITS} == before
    assert not cache.parts_folder(copy["out"], "train").exists()


def test_a_kill_while_the_content_is_compared_changes_nothing_and_the_rerun_finishes(copy, tmp_path, monkeypatch,
                                                                                      caplog):
    moved = tmp_path / "copied"  # new inodes: every image is read to compare its content with its row
    shutil.copytree(copy["data"], moved)
    before = {split: file_hash(copy["out"] / f"{split}.h5") for split in SPLITS}
    from pipeline.extract import incremental

    def kill(*args, **kwargs):
        raise Killed
    monkeypatch.setattr(incremental, "_read_digests", kill)
    with pytest.raises(Killed):
        run(moved, copy["out"])
    monkeypatch.undo()
    assert {split: file_hash(copy["out"] / f"{split}.h5") for split in SPLITS} == before
    assert not [p.name for p in copy["out"].iterdir() if ".parts" in p.name]
    caplog.set_level("INFO")
    assert run(moved, copy["out"]) == 0
    assert "reused 12, extracted 0, dropped 0" in caplog.text


def test_an_image_unreadable_while_its_content_is_compared_stops_the_update_naming_it(copy, tmp_path, monkeypatch,
                                                                                       capsys):
    import errno

    from pipeline.datasets import images
    from pipeline.extract import incremental

    moved = tmp_path / "copied"
    shutil.copytree(copy["data"], moved)
    bad = "n01443537_1.JPEG"
    before = {split: file_hash(copy["out"] / f"{split}.h5") for split in SPLITS}
    sha256, read_bytes = incremental.file_sha256, images.read_bytes
    monkeypatch.setattr(incremental, "file_sha256", lambda path: None if path.name == bad else sha256(path))

    def failing(path):
        if Path(path).name == bad:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return read_bytes(path)
    monkeypatch.setattr(images, "read_bytes", failing)
    capsys.readouterr()
    assert run(moved, copy["out"]) == 2
    line = one_error_line(capsys)
    assert bad in line and "Input/output error" in line
    assert {split: file_hash(copy["out"] / f"{split}.h5") for split in SPLITS} == before  # nothing wrong is complete
    monkeypatch.undo()
    assert run(moved, copy["out"]) == 0  # the drive is back: the update finishes, every row kept
    assert cache.read_attrs(copy["out"] / "train.h5")["num_rows"] == 12
