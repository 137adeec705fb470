"""Shards across nodes (issue #36): a pack extracted by torchrun with two nodes of one process each (--nnodes 2
over loopback, gloo), each rank taking whole pack shards and writing its own parts, rank 0 merging them: the
single process's cache, bit for bit. A node killed mid-run: the rerun redoes its shards and keeps the finished
ones. Marked ``multiprocess``: ``make test`` leaves it out, .ci/run runs it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.data.synthetic import make_tiny_imagenet
from tests.helpers import ROOT

pytestmark = pytest.mark.multiprocess

# --precision fp32 and one thread per process: the ranks and the single process compute alike
COMMON = ["--weights", "random", "--seed", "0", "--image-size", "64", "--resize-size", "72", "--batch-size", "2",
          "--workers", "0", "--no-progress", "--device", "cpu", "--precision", "fp32"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "FC7_DIST_TIMEOUT_MIN": "0.5"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(pack: Path, out: Path) -> list[subprocess.Popen]:
    """Two torchrun launches, one per node, meeting at 127.0.0.1 (static rendezvous)."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                              f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
                              str(ROOT / "run_extract.py"), "--data", str(pack), "--out", str(out), *COMMON],
                             cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True) for node in (0, 1)]


def _wait(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output.decode()[-3000:]


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nodes")
    data = make_tiny_imagenet(root / "tiny", num_classes=3, train_per_class=10, val_per_class=2)
    subprocess.run([sys.executable, str(ROOT / "run_extract.py"), "--data", str(data), "--pack", str(root / "pack"),
                    "--shard-size", "3"], cwd=ROOT, env=_env(), check=True, capture_output=True)
    return root / "pack"  # train: 30 images in 10 shards of 3


@pytest.fixture(scope="module")
def reference(pack, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    subprocess.run([sys.executable, str(ROOT / "run_extract.py"), "--data", str(pack), "--out", str(out), *COMMON],
                   cwd=ROOT, env=_env(), check=True, capture_output=True)
    return out


def _assert_same_cache(a: Path, b: Path) -> None:
    for split in ("train", "val"):
        with h5py.File(a / f"{split}.h5", "r") as fa, h5py.File(b / f"{split}.h5", "r") as fb:
            assert fa.attrs["complete"] and fb.attrs["complete"]
            for key in ("features", "labels", "paths", "class_wnids", "class_names"):
                assert np.array_equal(fa[key][:], fb[key][:]), f"{split}/{key} differs"


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it (torchrun starts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _rank1_shards(parts: Path) -> list[Path]:
    """Rank 1's finished shards: of two ranks, it takes the odd ones (1, 3, ..., 9 of 10)."""
    return [p for p in parts.glob("shard-*.npz") if int(p.stem.rsplit("-", 1)[1]) % 2 == 1]


def _watch(parts: Path, seen: dict, stop: threading.Event) -> None:
    """Record every inode each shard file of ``parts`` has while the rerun runs (a rewritten shard gets a new one)."""
    while not stop.is_set():
        for path in parts.glob("shard-*.npz"):
            try:
                seen.setdefault(path.name, set()).add(path.stat().st_ino)
            except OSError:
                pass
        time.sleep(0.005)


def test_two_nodes_take_whole_shards_resume_a_killed_node_and_equal_a_single_process(pack, reference, tmp_path):
    out = tmp_path / "dist"
    parts = out / ".train.parts"
    nodes = _nodes(pack, out)
    deadline = time.time() + 240
    while time.time() < deadline and nodes[1].poll() is None and not _rank1_shards(parts):
        time.sleep(0.01)
    assert nodes[1].poll() is None, "the run ended before it could be killed; make the dataset larger"
    _kill_tree(nodes[1].pid)  # node 1 dies: its torchrun and its rank
    nodes[1].wait()
    try:
        nodes[0].wait(timeout=90)  # rank 0 loses its peer and stops
    except subprocess.TimeoutExpired:
        _kill_tree(nodes[0].pid)
        nodes[0].wait()
    assert not (out / "train.h5").exists(), "a killed run must not leave a file that looks complete"
    finished = {p.name: p.stat().st_ino for p in parts.glob("shard-*.npz")}
    assert 1 <= len(_rank1_shards(parts)) < 5, "kill node 1 after its first shard, before its last"
    seen: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(parts, seen, stop), daemon=True)
    watcher.start()
    try:
        _wait(_nodes(pack, out))
    finally:
        stop.set()
        watcher.join()
    assert all(seen.get(name, {inode}) == {inode} for name, inode in finished.items()), "a finished shard was redone"
    assert len(seen) == 10  # every train shard was there before the merge
    _assert_same_cache(out, reference)
    assert not parts.exists()
    with h5py.File(out / "train.h5", "r") as f:
        assert f.attrs["world_size"] == 2
        assert f["paths"][0].decode().startswith("train/000000.tar/")


def test_an_out_folder_a_node_cannot_see_is_one_line(pack, tmp_path):
    """Every node must see --out: here node 1's is another folder, as an unshared local disk would be."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
                               str(ROOT / "run_extract.py"), "--data", str(pack),
                               "--out", str(tmp_path / ("shared" if node == 0 else "local")), *COMMON],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True) for node in (0, 1)]
    outputs = [proc.communicate(timeout=300)[0].decode() for proc in procs]
    assert procs[1].returncode != 0
    assert "must be on one filesystem that every node shares" in outputs[1]
    assert not (tmp_path / "shared" / "train.h5").exists()
