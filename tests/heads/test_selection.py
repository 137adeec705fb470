"""Hyper-parameters chosen on held-out train rows (pipeline.heads.selection, --select): the split, choose then refit
with val scored once, logreg's C sweep, and the seed recipe's plain linear head, which keeps choosing on val."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import run_train_head
from features.cache import open_split
from pipeline.common.checkpoint import read_checkpoint
from pipeline.common.config import HeadConfig, sweep_values
from pipeline.common.errors import UserError
from pipeline.datasets.holdout import in_val
from pipeline.heads.linear import Recipe, fit_head
from pipeline.heads.readers import FeatureReader, InMemoryFeatures
from pipeline.heads.selection import held_out
from pipeline.heads.solvers.path import fit_logreg
from pipeline.heads.standardize import Standardizer
from tests.helpers import CPU_ARGS, one_error_line, read_csv, write_synthetic_cache

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """4 classes x 10 train rows (1 held out of each), 5 val rows, 32 columns."""
    return write_synthetic_cache(tmp_path_factory.mktemp("cache") / "feats", classes=4, train_per_class=10,
                                 val_per_class=5, dim=32, signal=0.4)


def train(features: Path, out: Path, *extra: str) -> int:
    return run_train_head.main(["--features", str(features), "--out", str(out), *CPU_ARGS, "--no-progress", *extra])


def result(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


# ---------------------------------------------------------------------------------------------
# The held-out rows


def test_the_held_out_rows_are_stratified_stable_and_leave_every_class_rows_to_fit():
    sizes = {0: 40, 1: 5, 2: 2}  # 10 % of each: 4; 0.5 -> 1; and at least one fit row in a class of two
    rows = [(f"train/c{label}/{i}.JPEG", label) for label, count in sizes.items() for i in range(count)]
    paths, labels = [p for p, _ in rows], np.array([label for _, label in rows])
    selection = held_out(paths, labels, 0.1, ["a", "b", "c"])
    assert np.bincount(labels[selection.held]).tolist() == [4, 1, 1]
    assert sorted([*selection.fit, *selection.held]) == list(range(len(rows)))
    held = {paths[i] for i in selection.held}
    random.Random(0).shuffle(rows)  # another order, another class added: the same rows are held out
    rows.append(("train/c3/0.JPEG", 3))
    rows.append(("train/c3/1.JPEG", 3))
    again = held_out([p for p, _ in rows], np.array([label for _, label in rows]), 0.1, ["a", "b", "c", "d"])
    assert {rows[i][0] for i in again.held} - {"train/c3/0.JPEG", "train/c3/1.JPEG"} == held
    # the ImageFolder val split hashes the same paths, but another key: its train rows are not all kept to fit
    train_paths = [f"img/{i}.jpg" for i in range(400) if not in_val(f"img/{i}.jpg", 0.2)]
    spread = held_out(train_paths, np.zeros(len(train_paths), dtype=int), 0.1, ["a"])
    assert len(spread.held) == round(0.1 * len(train_paths))


def test_one_train_row_of_a_class_cannot_choose_and_says_select_val(cache, tmp_path, capsys):
    with pytest.raises(UserError, match="--select val"):
        held_out(["a.JPEG", "b.JPEG", "c.JPEG"], np.array([0, 0, 1]), 0.1, ["a", "b"])
    capsys.readouterr()
    assert train(cache, tmp_path / "one", "--head", "logreg", "--shots", "1") == 2
    line = one_error_line(capsys)
    assert "--select val" in line and "--shots 1" in line
    assert not (tmp_path / "one" / "run.json").exists()
    assert train(cache, tmp_path / "val", "--head", "logreg", "--shots", "1", "--select", "val", "--max-iter", "20") == 0


# ---------------------------------------------------------------------------------------------
# Choose on the held-out rows, refit on all, score val once


def test_logreg_chooses_c_on_held_out_rows_and_refits_on_every_train_row(cache, tmp_path):
    out = tmp_path / "probe"
    assert train(cache, out, "--head", "logreg", "--weight-decay", "logspace:-3:1:5", "--max-iter", "300") == 0
    rows = read_csv(out / "path.csv")
    path, refit = rows[:-1], rows[-1]
    cs = sweep_values("logspace:-3:1:5")
    assert [r["step"] for r in rows] == ["path"] * 5 + ["refit"]
    assert [float(r["C"]) for r in path] == pytest.approx(cs, rel=1e-12)  # strongest penalty (smallest C) first
    assert all(int(r["rows"]) == 36 and r["val_top1"] == "" and r["held_top1"] != "" for r in path)  # val not scored
    assert [float(r["weight_decay"]) for r in path] == pytest.approx([1 / (36 * c) for c in cs], rel=1e-12)
    held = [float(r["held_top1"]) for r in path]
    chosen = path[held.index(max(held))]  # the first of equals: the stronger penalty
    assert int(refit["rows"]) == 40 and refit["held_top1"] == "" and refit["val_top1"] != ""
    assert float(refit["weight_decay"]) == pytest.approx(1 / (40 * float(chosen["C"])), rel=1e-9)  # the chosen C kept
    record = result(out)
    assert record["selected_by"] == "train-split" and record["held_out_images"] == 4 and record["chosen"]
    assert record["chosen_C"] == pytest.approx(float(chosen["C"])) and record["top1"] == float(refit["val_top1"])
    assert record["weight_decay"] == float(refit["weight_decay"]) and record["refit_objective"] == float(refit["objective"])
    # the refit is the optimum on every train row at that penalty: an independent solve from zero agrees
    train_source = InMemoryFeatures.load(open_split(cache / "train.h5"), CPU, progress=False)
    val_source = InMemoryFeatures.load(open_split(cache / "val.h5"), CPU, progress=False)
    standardizer = Standardizer.fit(train_source, CPU)
    direct = fit_logreg(standardizer(train_source.features), train_source.labels, standardizer(val_source.features),
                        val_source.labels, num_classes=4, weight_decays=(float(refit["weight_decay"]),), max_iter=300)
    assert record["refit_objective"] == pytest.approx(direct.fits[0].objective, rel=1e-4)
    assert read_checkpoint(out / "best.pt")["config"]["selected_by"] == "train-split"
    assert "Selected by train-split: C (of logspace:-3:1:5) chosen on 4 train images held out" in \
        (out / "report.md").read_text()


def test_knn_chooses_k_on_held_out_rows_and_every_k_has_its_result(cache, tmp_path):
    out = tmp_path / "knn"
    assert train(cache, out, "--head", "knn", "--k", "1,3,50") == 0
    table = read_csv(out / "knn.csv")
    held = [float(r["held_top1"]) for r in table]
    chosen = int(table[held.index(max(held))]["k"])
    records = {k: result(out / f"k{k}") for k in (1, 3, 50)}
    assert [k for k, r in records.items() if r["chosen"]] == [chosen]
    assert all(r["selected_by"] == "train-split" and r["k"] == k and r["checkpoint"] is None
               for k, r in records.items())
    assert records[50]["k_used"] == 40  # the refit's neighbours: every train row
    assert "Selected by train-split: k chosen on 4 train images" in (out / "report.md").read_text()


def test_a_linear_sweep_chooses_lr_weight_decay_and_epochs_on_held_out_rows_then_refits(cache, tmp_path):
    out = tmp_path / "sweep"
    assert train(cache, out, "--lr", "0.1,0.001", "--weight-decay", "0,0.01", "--epochs", "3",
                 "--batch-size", "8") == 0
    candidates = read_csv(out / "select.csv")
    assert len(candidates) == 4 * 3 and "val_top1" not in candidates[0]  # every (lr, wd) and epoch, on held-out rows
    best = max(candidates, key=lambda r: float(r["held_top1"]))  # max: the first of equals
    lr, weight_decay, epochs = float(best["lr"]), float(best["weight_decay"]), int(best["epoch"])
    history = read_csv(out / "history.csv")
    assert len(history) == epochs and "val_top1" not in history[0]  # the refit: no val pass per epoch
    record = result(out)
    assert (record["lr"], record["weight_decay"], record["epochs"]) == (lr, weight_decay, epochs)
    assert record["selected_by"] == "train-split" and not (out / "last.pt").exists()
    # the refit is the recipe trained alone on every train row for that many epochs
    train_source = InMemoryFeatures.load(open_split(cache / "train.h5"), CPU, progress=False)
    refit = fit_head(train_source, None, Recipe(lr=lr, weight_decay=weight_decay, epochs=epochs, batch_size=8),
                     Standardizer.fit(train_source, CPU), num_classes=4, device=CPU, progress=False)
    saved = read_checkpoint(out / "best.pt")
    assert torch.equal(saved["head"]["weight"], refit.last.state["weight"])
    assert saved["config"]["selected_by"] == "train-split"


def test_the_plain_linear_head_keeps_its_best_epoch_by_val_and_says_so(cache, tmp_path):
    out = tmp_path / "plain"
    assert train(cache, out, "--epochs", "2", "--batch-size", "8") == 0
    record = result(out)
    assert record["selected_by"] == "val" and record["chosen"] and record["select_fraction"] is None
    report = (out / "report.md").read_text()
    assert "The seed recipe: 2 epochs, the epoch with the best val top-1 kept" in report
    assert "Selected by val" in report and (out / "last.pt").is_file()


# ---------------------------------------------------------------------------------------------
# The C sweep


def test_the_paper_sweep_is_45_log_spaced_values_of_c_for_logreg_only(cache, tmp_path, capsys):
    values = sweep_values("sweep:45")
    assert len(values) == 45 and values[0] == pytest.approx(1e-6) and values[-1] == pytest.approx(1e5)
    assert np.diff(np.log10(values)) == pytest.approx(np.full(44, 11 / 44))
    assert sweep_values("logspace:-2:2:5") == pytest.approx([0.01, 0.1, 1, 10, 100])
    for bad in ("sweep:0", "sweep:x", "logspace:2:1:3", "logspace:1:2", "sweeps:4"):
        with pytest.raises(UserError, match="--weight-decay"):
            HeadConfig(head=("logreg",), weight_decay=bad).check()
    HeadConfig(head=("logreg",), weight_decay="sweep:3").check()  # the 0..1000 bound is for explicit values
    capsys.readouterr()
    assert train(cache, tmp_path / "linear", "--head", "linear,logreg", "--weight-decay", "sweep:45") == 2
    assert "logreg's C sweep" in one_error_line(capsys)
    reader = FeatureReader(open_split(cache / "train.h5"))
    assert math.isclose(1 / (len(reader.labels) * values[0]), 1e6 / 40)  # lambda = 1/(n C): far above 1000 here
