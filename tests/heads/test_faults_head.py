"""Faults injected into head training (run_train_head.py): each leaves nothing lost, nothing wrong-but-complete,
and a rerun recovers.

Caches are small synthetic files (8-d "features") written with the cache module, then damaged with h5py.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import run_train_head
from features import atomic
from pipeline.common import checkpoint as checkpoint_module
from pipeline.heads import registry, run_folder
from pipeline.heads.publish import heads as publish, report, run as publish_run
from tests.helpers import HEAD_BATCH_ARGS, ROOT, one_error_line, tree_bytes, write_synthetic_cache



def train(features: Path, out: Path, *extra: str) -> int:
    return run_train_head.main(["--features", str(features), "--out", str(out), "--device", "cpu", "--no-progress",
                                *HEAD_BATCH_ARGS, *extra])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (but the lock file) with its bytes."""
    return tree_bytes(folder, skip=(".lock",))


def run_is_whole(out: Path) -> dict:
    """Assert ``out`` holds one complete run, every file from the same run; returns its config."""
    marker = json.loads((out / "run.json").read_text())
    config = json.loads((out / "config.json").read_text())
    for name in ("best.pt", "last.pt"):
        assert torch.load(out / name, weights_only=True)["config"] == config, name
    assert len((out / "history.csv").read_text().splitlines()) == config["epochs"] + 1
    for name in marker["files"]:
        assert (out / name).exists(), name
    assert not list(out.glob(".staging-*")) and not list(out.glob(".trash-*"))
    return config


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_synthetic_cache(tmp_path_factory.mktemp("cache") / "feats", dim=8)


@pytest.fixture
def old_run(cache, tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A finished run in tmp_path/head (lr 0.01, 2 epochs), with a file of the user's beside it."""
    out = tmp_path / "head"
    assert train(cache, out, "--lr", "0.01", "--epochs", "2") == 0
    (out / "notes.txt").write_text("the user's own notes")
    return out, snapshot(out)


# ---------------------------------------------------------------------------------------------
# One run at a time, and never a mix of two


def test_second_training_into_the_same_out_is_refused(cache, old_run, capsys):
    out, before = old_run
    capsys.readouterr()
    with run_folder.exclusive_run(out, "run_train_head.py"):  # another run holds the folder
        assert train(cache, out, "--lr", "0.1", "--epochs", "1") == 2
        line = one_error_line(capsys)
        assert "in use by another run" in line and str(out) in line and f"pid {os.getpid()}" in line
    assert snapshot(out) == before
    assert train(cache, out, "--lr", "0.1", "--epochs", "1") == 0  # released: the rerun works
    assert run_is_whole(out)["lr"] == 0.1


def test_kill_after_the_new_best_pt_leaves_the_old_run_untouched(cache, old_run, monkeypatch):
    out, before = old_run
    real = publish.save_checkpoint

    def killed_at_last(checkpoint, path):
        if Path(path).name == "last.pt":
            raise KeyboardInterrupt  # the new best.pt is written (in staging) by now
        real(checkpoint, path)

    monkeypatch.setattr(publish, "save_checkpoint", killed_at_last)
    assert train(cache, out, "--lr", "0.1", "--epochs", "3") == 130
    assert snapshot(out) == before  # the complete old run, byte for byte; nothing new beside it
    monkeypatch.undo()
    assert train(cache, out, "--lr", "0.1", "--epochs", "3") == 0
    assert run_is_whole(out)["lr"] == 0.1
    assert (out / "notes.txt").read_text() == "the user's own notes"


def test_sigkill_mid_run_then_rerun(cache, old_run, tmp_path):
    """A real kill -9 while the new run trains: the old run stays whole; the rerun clears the stale staging."""
    out, before = old_run
    child_log = tmp_path / "child.log"
    with open(child_log, "wb") as stderr:
        child = subprocess.Popen([sys.executable, str(ROOT / "run_train_head.py"), "--features", str(cache), "--out",
                                  str(out), "--device", "cpu", "--no-progress", *HEAD_BATCH_ARGS, "--lr", "0.1",
                                  "--epochs", "100000"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.time() + 120
        while "epoch  2/100000" not in child_log.read_text():  # training, its staging folder made
            assert child.poll() is None and time.time() < deadline, "the child never logged its second epoch"
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert list(out.glob(".staging-*"))  # left behind by the killed run...
    assert {k: v for k, v in snapshot(out).items() if not k.startswith(".staging-")} == before  # ...beside the old run
    assert train(cache, out, "--lr", "0.1", "--epochs", "2") == 0
    assert run_is_whole(out)["lr"] == 0.1


@pytest.mark.parametrize("replaces", [0, 1, 3, 5])  # 5: all in place, run.json not yet
def test_kill_during_publish_is_finished_by_the_next_run(cache, old_run, monkeypatch, replaces):
    """A kill after ``replaces`` of the publish's renames: no run.json meanwhile; the next start completes it."""
    out, _ = old_run
    real, calls = os.replace, []

    def replace(src, dst):
        if Path(dst).parent == out and not Path(dst).name.endswith(".tmp"):
            if len(calls) == replaces:
                raise KeyboardInterrupt
            calls.append(dst)
        real(src, dst)

    monkeypatch.setattr(run_folder.os, "replace", replace)
    assert train(cache, out, "--lr", "0.1", "--weight-decay", "0,0.001", "--epochs", "2", "--select", "val") == 130
    monkeypatch.undo()
    assert not (out / "run.json").exists()  # the folder does not claim to be complete
    run_folder.recover(out)  # what the next run does first, under the lock
    marker = json.loads((out / "run.json").read_text())
    assert set(marker["heads"]) == {"lr0.1_wd0", "lr0.1_wd0.001"}
    for head in marker["heads"]:
        config = json.loads((out / head / "config.json").read_text())
        assert config["lr"] == 0.1 and torch.load(out / head / "best.pt", weights_only=True)["config"] == config
    assert not (out / "config.json").exists() and not (out / "last.pt").exists()  # nothing of the old single run
    assert (out / "sweep.csv").is_file() and (out / "notes.txt").read_text() == "the user's own notes"
    assert train(cache, out, "--lr", "0.01", "--epochs", "2") == 0  # and a plain rerun replaces the sweep
    assert run_is_whole(out)["lr"] == 0.01 and not (out / "lr0.1_wd0").exists()


# ---------------------------------------------------------------------------------------------
# A full disk


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullFile:
    """A file object whose writes fail with ENOSPC (what a full disk does)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    write = flush = _no_space


@pytest.mark.parametrize("step", ["best.pt", "last.pt", "history", "plots", "report", "manifest"])
def test_disk_full_while_writing_the_run(cache, old_run, monkeypatch, capsys, step):
    out, before = old_run
    if step in ("best.pt", "last.pt"):
        real = publish.save_checkpoint

        def save(checkpoint, path):
            if Path(path).name == step:
                monkeypatch.setattr(atomic, "open", FullFile, raising=False)  # the real write path fails
            real(checkpoint, path)

        monkeypatch.setattr(publish, "save_checkpoint", save)
    elif step == "history":  # the first CSV a linear run writes
        monkeypatch.setattr(publish, "write_csv", _no_space)
    elif step == "plots":
        monkeypatch.setattr(report, "plot_history", _no_space)
    elif step == "manifest":  # the staged run's manifest, the last write before the publish
        monkeypatch.setattr(run_folder, "_write_json", _no_space)
    else:
        monkeypatch.setattr(report, "write_class_report", _no_space)
    capsys.readouterr()
    assert train(cache, out, "--lr", "0.1", "--epochs", "2") == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and str(out) in line and "previous run" in line
    assert snapshot(out) == before  # the old run, whole; no staging left, no new file
    monkeypatch.undo()  # space freed
    assert train(cache, out, "--lr", "0.1", "--epochs", "2") == 0
    assert run_is_whole(out)["lr"] == 0.1


# ---------------------------------------------------------------------------------------------
# Numbers that overflow


@pytest.mark.parametrize("flags, flag", [
    (("--lr", "1e300"), "--lr"),
    (("--weight-decay", "1e300"), "--weight-decay"),
    (("--momentum", "1e300"), "--momentum"),
    (("--seed", str(2**70)), "--seed"),
    (("--seed", "-1"), "--seed"),
])
def test_huge_numbers_are_one_line_errors(cache, tmp_path, capsys, flags, flag):
    assert train(cache, tmp_path / "out", *flags) == 2
    assert flag in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_largest_seed_trains(cache, tmp_path):
    assert train(cache, tmp_path / "out", "--seed", str(2**63 - 1), "--epochs", "1") == 0


# ---------------------------------------------------------------------------------------------
# Every kind of run (linear, logreg, knn, a grid) is published whole into one --out, replacing exactly the previous


def holds_one_run(out: Path, kind: str) -> dict:
    """``out`` holds exactly the run named by its run.json (of ``kind``), the user's notes.txt and the lock."""
    marker = json.loads((out / "run.json").read_text())
    assert marker["kind"] == kind
    assert {p.name for p in out.iterdir()} == {*marker["files"], "notes.txt", ".lock"}
    assert (out / "notes.txt").read_text() == "the user's own notes"
    return marker


def test_linear_then_logreg_then_grid_then_linear_into_one_out(cache, old_run):
    out, _ = old_run
    holds_one_run(out, "linear")
    assert train(cache, out, "--head", "logreg", "--weight-decay", "0.1,0.01", "--max-iter", "10") == 0
    marker = holds_one_run(out, "logreg")
    assert set(marker["files"]) == {"best.pt", "config.json", "path.csv", "per_class.csv", "confusions.csv",
                                    "report.md", "result.json", "run.json"}  # nothing of the linear run (last.pt...)
    assert json.loads((out / "config.json").read_text())["head"] == ["logreg"]
    assert torch.load(out / "best.pt", weights_only=True)["config"]["head"] == ["logreg"]
    assert (out / "report.md").read_text().startswith(f"# Head report: {out}\n")  # not the staging folder
    assert train(cache, out, "--head", "linear,knn", "--k", "1,3", "--epochs", "2") == 0
    marker = holds_one_run(out, "grid")
    assert set(marker["files"]) == {"best.pt", "config.json", "experiments.csv", "experiments.md", "experiments.png",
                                    "fc7_linear_all_lr0.001_wd0", "fc7_knn_all", "run.json"}
    assert marker["best"]["head"] == "fc7_linear_all_lr0.001_wd0"
    assert (out / "best.pt").read_bytes() == (out / "fc7_linear_all_lr0.001_wd0" / "best.pt").read_bytes()
    assert (out / "fc7_knn_all" / "report.md").read_text().startswith(f"# Head report: {out / 'fc7_knn_all'}\n")
    assert not (out / "path.csv").exists() and not (out / "per_class.csv").exists()  # the logreg run is gone
    assert train(cache, out, "--head", "knn", "--k", "2") == 0
    assert set(holds_one_run(out, "knn")["files"]) == {"config.json", "knn.csv", "per_class.csv", "confusions.csv",
                                                      "report.md", "k2", "run.json"}  # k2/result.json
    assert train(cache, out, "--lr", "0.01", "--epochs", "2") == 0  # and a plain linear run replaces it all
    holds_one_run(out, "linear")
    assert run_is_whole(out)["lr"] == 0.01


def test_a_grid_before_run_json_is_refused_not_cleaned(cache, tmp_path, capsys):
    """A folder with a grid's files and no run.json (an older version, or the user's): not the tool's to clean."""
    out = tmp_path / "head"
    assert train(cache, out, "--head", "linear,knn", "--epochs", "1") == 0
    (out / "run.json").unlink()
    (out / "notes.txt").write_text("the user's own notes")
    before = snapshot(out)
    capsys.readouterr()
    assert train(cache, out, "--epochs", "1") == 2
    line = one_error_line(capsys)
    assert "experiments.csv" in line and "no run.json" in line and "another --out" in line
    assert snapshot(out) == before


@pytest.mark.parametrize("where", ["fit", "checkpoint", "report"])
def test_kill_in_the_middle_of_a_logreg_run_leaves_the_previous_run(cache, old_run, monkeypatch, where):
    out, before = old_run
    from pipeline.heads import logreg

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    target = {"fit": (logreg, "fit_logreg"), "checkpoint": (publish, "save_checkpoint"),
              "report": (report, "write_class_report")}[where]
    monkeypatch.setattr(*target, killed)
    assert train(cache, out, "--head", "logreg", "--max-iter", "10") == 130
    assert snapshot(out) == before  # the old linear run, byte for byte; no staging left
    monkeypatch.undo()
    assert train(cache, out, "--head", "logreg", "--max-iter", "10") == 0
    holds_one_run(out, "logreg")


@pytest.mark.parametrize("previous", ["linear", "grid"])
@pytest.mark.parametrize("where", ["second combination", "table", "disk full at the table"])
def test_kill_in_the_middle_of_a_grid_leaves_the_previous_run(cache, tmp_path, monkeypatch, capsys, previous, where):
    out = tmp_path / "head"
    grid = ("--head", "linear,logreg", "--max-iter", "10", "--epochs", "2", "--no-skip-existing")  # train each time
    assert train(cache, out, *(grid if previous == "grid" else ("--epochs", "2"))) == 0
    (out / "notes.txt").write_text("the user's own notes")
    before = snapshot(out)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "second combination":  # the linear combination is written (in staging) by now
        monkeypatch.setitem(registry.HEADS, "logreg", dataclasses.replace(registry.HEADS["logreg"], fit=killed))
    elif where == "table":
        monkeypatch.setattr(publish_run, "write_table", killed)
    else:
        monkeypatch.setattr(publish_run, "write_table", _no_space)
    capsys.readouterr()
    code = train(cache, out, *grid, "--lr", "0.1")
    if where == "disk full at the table":
        assert code == 2
        line = one_error_line(capsys)
        assert "No space left on device" in line and "previous run" in line and str(out) in line
    else:
        assert code == 130
    assert snapshot(out) == before  # the previous run, byte for byte (its table and best.pt too); no staging left
    monkeypatch.undo()
    assert train(cache, out, *grid, "--lr", "0.1") == 0
    marker = holds_one_run(out, "grid")
    assert set(marker["heads"]) == {"fc7_linear_all_lr0.1_wd0", "fc7_logreg_all"}
    assert json.loads((out / "fc7_linear_all_lr0.1_wd0" / "config.json").read_text())["lr"] == 0.1


def test_a_users_folder_named_like_a_grid_combination_is_one_line_before_training(cache, tmp_path, capsys):
    """A grid into an --out that holds a user's folder of a combination's name: refused at once, nothing written;
    and a publish that meets such a folder moves nothing."""
    out = tmp_path / "grid"
    mine = out / "fc7_knn_all"
    mine.mkdir(parents=True)
    (mine / "mine.txt").write_text("mine")
    capsys.readouterr()
    assert train(cache, out, "--head", "knn,linear", "--epochs", "1") == 2
    line = one_error_line(capsys)
    assert str(mine) in line and "in the way" in line
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["fc7_knn_all"]
    assert (mine / "mine.txt").read_text() == "mine"
    shutil.rmtree(mine)
    assert train(cache, out, "--head", "knn,linear", "--epochs", "1") == 0  # moved away: the grid runs
    assert (out / "experiments.csv").is_file() and (out / "run.json").is_file()
