"""Distributed extraction under torchrun: 2 CPU processes (gloo) build the same cache as one process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.data.synthetic import make_tiny_imagenet
from tests.helpers import ROOT

pytestmark = pytest.mark.multiprocess  # make test leaves it out; .ci/run runs it

# small input and tiny shards: many resumable units, each quick on the CPU. --precision fp32: auto times its
# candidates, and on a loaded machine the single process and the ranks could choose differently (bf16 vs fp32)
# and differ for that reason alone; auto under torchrun is tests/test_precision_auto.py's.
COMMON = ["--weights", "random", "--seed", "0", "--image-size", "64", "--resize-size", "72",
          "--shard-size", "4", "--batch-size", "2", "--workers", "0", "--no-progress", "--device", "cpu",
          "--precision", "fp32"]


def _env() -> dict:
    # one thread per process in both runs: oneDNN's results may depend on the thread count
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun(data: Path, out: Path, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "run_extract.py"), "--data", str(data), "--out", str(out), *COMMON]
    return subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, **popen)


def _single(data: Path, out: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "run_extract.py"), "--data", str(data), "--out", str(out), *COMMON],
                   cwd=ROOT, env=_env(), check=True, capture_output=True)


def _assert_same_cache(a: Path, b: Path) -> None:
    for split in ("train", "val"):
        with h5py.File(a / f"{split}.h5", "r") as fa, h5py.File(b / f"{split}.h5", "r") as fb:
            assert fa.attrs["complete"] and fb.attrs["complete"]
            for key in ("features", "labels", "paths", "class_wnids", "class_names"):
                assert np.array_equal(fa[key][:], fb[key][:]), f"{split}/{key} differs"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_tiny_imagenet(tmp_path_factory.mktemp("ds") / "tiny", num_classes=3, train_per_class=10, val_per_class=3)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    _single(dataset, out)
    return out


def test_torchrun_two_ranks_resume_after_kill_and_equal_a_single_process(dataset, reference, tmp_path):
    """One launch killed mid-run, one that resumes it: the finished cache is a single process's, bit for bit.

    (The resumed launch runs both ranks to the end, so this also proves an uninterrupted two-rank run: one
    torchrun launch fewer than testing the two apart.)"""
    out = tmp_path / "dist"
    parts = out / ".train.parts"
    proc = _torchrun(dataset, out)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(list(parts.glob("shard-*.npz"))) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; make the dataset larger"
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, at once
    proc.wait()
    assert not (out / "train.h5").exists(), "a killed run must not leave a file that looks complete"
    done_before = len(list(parts.glob("shard-*.npz")))
    assert done_before >= 2

    proc = _torchrun(dataset, out)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output.decode()[-3000:]
    _assert_same_cache(out, reference)
    assert not parts.exists()
    with h5py.File(out / "train.h5", "r") as f:
        assert f.attrs["world_size"] == 2


def test_failing_rank_fails_the_run(tmp_path):
    proc = _torchrun(tmp_path / "no-such-dataset", tmp_path / "dist")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert b"dataset not found" in output
    assert not (tmp_path / "dist" / "train.h5").exists()
