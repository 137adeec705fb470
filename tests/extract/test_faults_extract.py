"""Faults injected into stage one (issue #11): each leaves nothing lost and nothing wrong that looks complete,
and the rerun after the fault is removed recovers, equal bit for bit to a run that never saw the fault.

Kills are simulated by raising ``Killed`` (a BaseException, which nothing in the project catches) at the step;
disk full by a patched write raising ENOSPC, and once for real with RLIMIT_FSIZE (HDF5's own write fails).
"""
from __future__ import annotations

import errno
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import run_extract
from features import cache, shards
import features.writer
from features.cache import CacheError, open_split
from pipeline.datasets import images
from pipeline.extract import extractor as extract_module
from pipeline.data.synthetic import make_tiny_imagenet
from tests.helpers import ROOT, TINY_SHARD_ARGS, error_line, extract_args, h5_datasets, one_error_line, tree_bytes

# with TINY_SHARD_ARGS the train split of `data` (8 images) is 4 shards of 2
BAD = "train/n02002724/images/n02002724_1.JPEG"  # in the third train shard


class Killed(BaseException):
    """A kill at this step: nothing after it runs, and nothing in the project catches it."""


def run(data: Path, out: Path, *extra: str) -> int:
    return run_extract.main(extract_args(data, out, *TINY_SHARD_ARGS, *extra))


def cache_content(out: Path) -> dict:
    """Every dataset of both files and the attributes that describe their content."""
    content = {}
    for split in ("train", "val"):
        with h5py.File(out / f"{split}.h5", "r") as f:
            assert f.attrs["complete"]
            content[split] = h5_datasets(f)
            content[split]["attrs"] = {k: f.attrs[k] for k in ("weights_fingerprint", "dataset_signature",
                                                              "files_signature", "num_rows", "num_skipped")}
    return content


def assert_same(out: Path, reference: Path) -> None:
    a, b = cache_content(out), cache_content(reference)
    for split in a:
        assert set(a[split]) == set(b[split]), split
        for name in b[split]:
            if name == "attrs":
                assert a[split][name] == b[split][name], split
            else:
                assert np.array_equal(a[split][name], b[split][name]), f"{split}/{name}"
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".train.parts") or p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def dataset_state(data: Path) -> dict:
    return tree_bytes(data)


@pytest.fixture(scope="module")
def data(generated_dataset) -> Path:
    return generated_dataset(2, 4, 1)  # read-only


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "reference"
    assert run(data, out) == 0
    return out


@pytest.fixture(scope="module")
def reference_seed1(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "seed1"
    assert run(data, out, "--seed", "1") == 0
    return out


def killed_at_assembly(data: Path, out: Path, monkeypatch, *extra: str) -> None:
    """Run until every train shard is on disk, then die as the assembly starts."""
    def kill(*args, **kwargs):
        raise Killed
    monkeypatch.setattr(cache, "assemble", kill)
    with pytest.raises(Killed):
        run(data, out, *extra)
    monkeypatch.undo()
    assert not (out / "train.h5").exists()
    assert cache.done_shards(cache.parts_folder(out, "train")) == {0, 1, 2, 3}


# ---------------------------------------------------------------------------------------------
# 1. A read error is not an undecodable image


@pytest.mark.parametrize("workers", ["0", "1"])
def test_read_error_stops_the_run_naming_the_file_and_the_rerun_reads_it(data, reference, tmp_path, monkeypatch,
                                                                          capfd, workers):
    read_bytes = images.read_bytes

    def failing_read(path):
        if str(path).endswith(BAD):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return read_bytes(path)

    before = dataset_state(data)
    out = tmp_path / "features"
    monkeypatch.setattr(images, "read_bytes", failing_read)  # the extraction's reader; a forked worker inherits it
    capfd.readouterr()
    assert run(data, out, "--workers", workers) == 2
    line = error_line(capfd.readouterr().err)  # also no traceback from the worker
    assert BAD in line and "Input/output error" in line
    assert not (out / "train.h5").exists()  # nothing complete
    done = cache.done_shards(cache.parts_folder(out, "train"))
    assert 2 not in done and done <= {0, 1}  # the bad image's shard was not written with a hole in it
    monkeypatch.undo()

    assert run(data, out) == 0  # the fault is gone: the rerun reads the image
    assert_same(out, reference)
    assert open_split(out / "train.h5").attrs["num_skipped"] == 0
    assert dataset_state(data) == before


# ---------------------------------------------------------------------------------------------
# 2. Shards are tied to the settings that made them


def test_shards_left_by_a_killed_cleanup_are_never_assembled_under_other_settings(data, reference_seed1, tmp_path,
                                                                                 monkeypatch):
    out = tmp_path / "features"
    killed_at_assembly(data, out, monkeypatch)  # seed 0 shards
    parts = cache.parts_folder(out, "train")
    (parts / "settings.json").unlink()  # killed mid-cleanup: the settings file gone, the shards still there
    assert run(data, out, "--seed", "1") == 0
    assert_same(out, reference_seed1)
    assert open_split(out / "train.h5").attrs["weights_spec"] == "random:seed=1"


# ---------------------------------------------------------------------------------------------
# 3. --overwrite always re-extracts; an image changed in place is noticed


def test_overwrite_re_extracts_even_with_equal_settings(data, reference, tmp_path, monkeypatch, caplog):
    out = tmp_path / "features"
    shutil.copytree(reference, out)
    written = []
    write_shard = cache.write_shard
    monkeypatch.setattr(cache, "write_shard", lambda parts, shard, *a, **k: (written.append(shard), write_shard(parts, shard, *a, **k)))
    caplog.set_level(logging.INFO)
    assert run(data, out, "--overwrite") == 0
    assert not any("up to date" in r.getMessage() for r in caplog.records)
    assert written == [0, 1, 2, 3, 0]  # every train shard and the val shard again
    monkeypatch.undo()
    assert_same(out, reference)


def test_an_image_repaired_in_place_is_noticed_and_extracted_again(reference, tmp_path, capsys):
    data = make_tiny_imagenet(tmp_path / "ds", num_classes=2, train_per_class=4, val_per_class=1)
    out = tmp_path / "features"
    assert run(data, out) == 0
    old = open_split(out / "train.h5")
    row = old.paths.index(BAD)
    before = old.read_features()
    other = data / "train/n01443537/images/n01443537_0.JPEG"
    (data / BAD).write_bytes(other.read_bytes())  # the same path, other content
    assert run(data, out) == 0  # an incremental update: only that image passes through the backbone again
    after = open_split(out / "train.h5").read_features()
    assert not np.array_equal(after[row], before[row])
    # computed alone now, in a batch of its own: equal to its twin's row up to fp32 rounding
    np.testing.assert_allclose(after[row], after[old.paths.index("train/n01443537/images/n01443537_0.JPEG")],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.delete(after, row, 0), np.delete(before, row, 0))


# ---------------------------------------------------------------------------------------------
# 4. Disk full


def _fail_nth(monkeypatch, owner, name: str, n: int) -> None:
    """Make ``owner.name`` raise ENOSPC on its n-th call (in this process or a forked writer)."""
    original = getattr(owner, name)
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, failing)


@pytest.mark.parametrize("owner, name, n", [
    (h5py.Group, "create_dataset", 1),  # the first layer dataset
    (h5py.Dataset, "__setitem__", 1),  # the first rows of features
    (h5py.AttributeManager, "__setitem__", 3),  # the attributes
    (h5py.File, "close", 1),  # the final flush
])
def test_disk_full_while_assembling_is_one_line_and_the_rerun_succeeds(data, reference, tmp_path, monkeypatch,
                                                                       capsys, owner, name, n):
    out = tmp_path / "features"
    _fail_nth(monkeypatch, owner, name, n)
    capsys.readouterr()
    assert run(data, out) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "train.h5.tmp" in line
    assert not (out / "train.h5").exists() and not (out / "train.h5.tmp").exists()
    assert cache.done_shards(cache.parts_folder(out, "train")) == {0, 1, 2, 3}  # the work is kept
    monkeypatch.undo()
    assert run(data, out) == 0
    assert_same(out, reference)


def test_disk_full_while_writing_a_shard_is_one_line_and_keeps_the_finished_ones(data, reference, tmp_path,
                                                                                monkeypatch, capsys):
    out = tmp_path / "features"
    savez, calls = np.savez, [0]

    def failing_savez(file, **arrays):
        calls[0] += 1
        if calls[0] == 3:
            file.write(b"half a shard")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return savez(file, **arrays)
    monkeypatch.setattr(shards.np, "savez", failing_savez)
    capsys.readouterr()
    assert run(data, out) == 2
    assert "No space left on device" in one_error_line(capsys)
    parts = cache.parts_folder(out, "train")
    assert cache.done_shards(parts) == {0, 1} and not list(parts.glob("*.tmp"))
    assert not (out / "train.h5").exists()
    monkeypatch.undo()
    assert run(data, out) == 0
    assert_same(out, reference)


def test_too_little_free_space_is_refused_before_writing(data, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "features"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    capsys.readouterr()
    assert run(data, out) == 2
    line = one_error_line(capsys)
    assert "MiB free" in line and "shards are kept" in line
    assert not (out / "train.h5").exists() and not (out / "train.h5.tmp").exists()
    monkeypatch.undo()
    assert run(data, out) == 0
    assert_same(out, reference)


def test_a_real_hdf5_write_failure_is_one_line_not_a_segfault(data, reference, tmp_path):
    """HDF5's own write fails (a file size limit, as a full disk would): before, a traceback then exit 139."""
    out = tmp_path / "features"

    def limit_file_size():  # shards (32 KiB) fit, train.h5 (8 rows of 16 KiB) does not
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    done = subprocess.run([sys.executable, "run_extract.py", *extract_args(data, out, *TINY_SHARD_ARGS)], cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=limit_file_size, timeout=300)
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    line = error_line(done.stderr)
    assert "File too large" in line and "train.h5.tmp" in line
    assert not (out / "train.h5").exists() and not (out / "train.h5.tmp").exists()
    assert cache.done_shards(cache.parts_folder(out, "train")) == {0, 1, 2, 3}
    assert run(data, out) == 0
    assert_same(out, reference)


# ---------------------------------------------------------------------------------------------
# 5. A kill at each step of assembly and cleanup


def test_kill_after_the_file_is_written_before_its_rename(data, reference, tmp_path, monkeypatch):
    out = tmp_path / "features"
    replace = os.replace

    def killed_replace(src, dst, *args, **kwargs):
        if str(dst).endswith("train.h5"):
            raise Killed
        return replace(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", killed_replace)
    with pytest.raises(Killed):
        run(data, out)
    monkeypatch.undo()
    assert (out / "train.h5.tmp").exists() and not (out / "train.h5").exists()
    with pytest.raises(CacheError, match="interrupted"):
        open_split(out / "train.h5")
    assert run(data, out) == 0
    assert_same(out, reference)


def test_kill_after_the_rename_before_the_parts_are_removed(data, reference, tmp_path, monkeypatch, caplog):
    out = tmp_path / "features"

    def killed_discard(folder):
        raise Killed
    monkeypatch.setattr(features.writer, "discard", killed_discard)  # assembly drops the parts
    with pytest.raises(Killed):
        run(data, out)
    monkeypatch.undo()
    assert open_split(out / "train.h5").attrs["complete"] and cache.parts_folder(out, "train").exists()
    caplog.set_level(logging.INFO)
    assert run(data, out) == 0  # val is still to do; train is up to date
    assert any(m.getMessage().startswith("train: up to date") for m in caplog.records)
    # the leftover shards are harmless: another --overwrite run does not take them
    assert run(data, out, "--overwrite") == 0
    assert_same(out, reference)


def test_kill_while_the_parts_are_being_deleted(data, reference, tmp_path, monkeypatch):
    out = tmp_path / "features"
    rmtree = shutil.rmtree

    def killed_rmtree(path, *args, **kwargs):
        files = sorted(Path(path).glob("*"))
        for p in files[: len(files) // 2]:  # settings.json and some shards gone, the rest not
            p.unlink()
        raise Killed
    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(Killed):
        run(data, out)
    monkeypatch.undo()
    assert open_split(out / "train.h5").attrs["complete"]
    assert not cache.parts_folder(out, "train").exists()  # renamed away before deletion: never half-deleted
    assert list(out.glob(".train.parts.trash-*"))
    assert run(data, out) == 0
    assert run(data, out, "--overwrite") == 0  # the next writer finishes the deletion
    assert_same(out, reference)
    assert not list(out.glob(".train.parts.trash-*"))


def test_shards_from_another_cpu_capability_are_discarded(data, reference, tmp_path, monkeypatch):
    """The capability is patched where the shards' layout records it: patching torch's own would also switch
    torchvision's uint8 resize to another kernel, whose features differ in the last digits (measured)."""
    out = tmp_path / "features"
    killed_at_assembly(data, out, monkeypatch)
    written = []
    write_shard = cache.write_shard
    monkeypatch.setattr(cache, "write_shard", lambda parts, shard, *a, **k: (written.append((parts.name, shard)),
                                                                              write_shard(parts, shard, *a, **k)))
    device_detail = extract_module.device_detail
    monkeypatch.setattr(extract_module, "device_detail", lambda device: {**device_detail(device), "cpu_capability": "OTHER"})
    assert run(data, out) == 0
    assert sorted(s for name, s in written if name == ".train.parts") == [0, 1, 2, 3]  # none resumed
    monkeypatch.undo()
    assert_same(out, reference)
