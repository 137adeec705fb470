"""Extraction faults around shards and locks: renamed shards, read-only storage, a cache being written, numbers out of range."""
from __future__ import annotations

import errno
import logging
import os

import h5py
import numpy as np
import pytest

from features import cache, shards
from features.cache import CacheError, exclusive_writer, open_split
from tests.helpers import one_error_line
from tests.extract.test_faults_extract import data, killed_at_assembly, run  # noqa: F401


def test_a_shard_renamed_under_other_settings_is_refused_at_assembly(data, tmp_path, monkeypatch):
    out = tmp_path / "features"
    killed_at_assembly(data, out, monkeypatch)
    parts = cache.parts_folder(out, "train")
    foreign = cache.shard_file(parts, 1)
    with np.load(foreign) as shard:
        arrays = dict(shard)
    arrays["digest"] = np.array("0" * 12)  # content made under other settings, under this folder's name
    with open(foreign, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(CacheError, match="other settings"):
        shards.read_shard(foreign, cache.parts_digest(parts))
    assert not foreign.exists()  # discarded, so the rerun recomputes it


# ---------------------------------------------------------------------------------------------
# 6. A complete cache on read-only storage needs no lock


def test_full_check_of_a_complete_cache_takes_no_lock(data, tmp_path, monkeypatch, caplog, capsys):
    import torch
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), weights)
    out = tmp_path / "features"
    assert run(data, out, "--weights", str(weights)) == 0
    os.utime(weights, ns=(1, 10**18))  # the stamp differs: the quick check cannot vouch, the full one runs

    def read_only(folder):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder / ".lock"))
    monkeypatch.setattr(cache, "exclusive_writer", read_only)
    caplog.set_level(logging.INFO)
    assert run(data, out, "--weights", str(weights)) == 0
    assert any(r.getMessage().startswith("train: up to date") for r in caplog.records)
    (out / "val.h5").unlink()  # now something must be written: the lock is needed, and it fails in one line
    capsys.readouterr()
    assert run(data, out, "--weights", str(weights)) == 2
    assert "Read-only file system" in one_error_line(capsys)


# ---------------------------------------------------------------------------------------------
# 7. A cache being written is not reported as interrupted


def test_reading_a_cache_while_it_is_written_says_so(tmp_path):
    out = tmp_path / "features"
    cache.parts_folder(out, "train").mkdir(parents=True)
    with exclusive_writer(out):
        with pytest.raises(CacheError, match=f"being written by pid {os.getpid()} right now"):
            open_split(out / "train.h5")
    with pytest.raises(CacheError, match="interrupted"):  # the writer is gone: then it was interrupted
        open_split(out / "train.h5")


# ---------------------------------------------------------------------------------------------
# 8. Numbers out of range, and #14: shards from another CPU are not resumed


@pytest.mark.parametrize("option, value", [("--seed", str(2**70)), ("--seed", "-1"), ("--workers", "-1")])
def test_out_of_range_numbers_are_one_line_errors(data, tmp_path, capsys, option, value):
    capsys.readouterr()
    assert run(data, tmp_path / "features", option, value) == 2
    assert option in one_error_line(capsys)
    assert not (tmp_path / "features").exists()


def test_the_child_writing_the_file_keeps_the_writer_lock(tmp_path):
    """A parent killed while its child writes the file leaves the lock held until the child is done (a DataLoader
    worker, in contrast, lets go of it at once)."""
    from features import locking

    with exclusive_writer(tmp_path):
        fd = next(iter(locking._held_locks))

        def fill(f):
            f.attrs["lock"] = os.readlink(f"/proc/self/fd/{fd}")
        cache._write_isolated(tmp_path / "x.h5", fill)
    with h5py.File(tmp_path / "x.h5", "r") as f:
        assert f.attrs["lock"] == str(tmp_path / ".lock")
