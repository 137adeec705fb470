"""Stage two (run_train_head.py / pipeline.heads.linear): the linear head trained on the fc7 cache.

A tiny generated dataset is extracted once with a seeded random backbone at 64 px (fast on a CPU).
Tests that need training curves with ups and downs use small synthetic caches written with the
cache module itself (write_shard + assemble), so the files are exactly what extraction produces.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import run_extract
import run_train_head
from features.cache import open_split
from pipeline.heads import linear as train_head
from pipeline.common.preprocess import Preprocess
from pipeline.data.synthetic import WORDS
from pipeline.heads import standardize
from pipeline.heads.linear import Recipe, fit_head
from pipeline.heads.solvers import sgd
from pipeline.heads.readers import InMemoryFeatures, batch_order
from pipeline.heads.standardize import Standardizer
from tests.helpers import random_backbone, read_csv, write_synthetic_cache  # noqa: F401 (write_synthetic_cache: others import it from here)

CPU_DEVICE = torch.device("cpu")
NAMES = ["goldfish", "black stork", "walking stick"]  # first synonyms of the generated wnids in words.txt
HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_top1", "val_top5", "seconds"]
RUN_FILES = ["best.pt", "last.pt", "history.csv", "accuracy.png", "loss.png", "per_class.csv", "confusions.csv",
             "report.md", "config.json"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Helpers


def extract(data: Path, out: Path, *extra: str) -> None:
    rc = run_extract.main(["--data", str(data), "--weights", "random", "--seed", "0", "--image-size", "64",
                           "--resize-size", "72", "--no-progress", "--device", "cpu", "--precision", "fp32", "--out", str(out),
                           *extra])
    assert rc == 0


def train(features: Path, out: Path, *extra: str) -> int:
    return run_train_head.main(["--features", str(features), "--out", str(out), "--device", "cpu", "--no-progress",
                                *extra])


def history(folder: Path) -> list[dict]:
    return [{k: float(v) for k, v in row.items()} for row in read_csv(folder / "history.csv")]


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def raw_head(ckpt: dict) -> nn.Linear:
    head = nn.Linear(ckpt["feature_dim"], ckpt["num_classes"])
    head.load_state_dict(ckpt["head"])
    return head


def raw_features(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with h5py.File(path, "r") as f:
        return torch.from_numpy(f["features"][:]).float(), torch.from_numpy(f["labels"][:])


def accuracy_and_loss(ckpt: dict, h5: Path) -> tuple[float, float, np.ndarray]:
    """Val top-1 (%), mean cross-entropy and predictions of a checkpoint's head on the RAW cached features."""
    x, y = raw_features(h5)
    with torch.no_grad():
        logits = raw_head(ckpt)(x)
    predictions = logits.argmax(1)
    return (100.0 * (predictions == y).sum().item() / len(y), F.cross_entropy(logits, y).item(),
            predictions.numpy())


def heads_equal(a: Path, b: Path) -> bool:
    ha, hb = load_ckpt(a)["head"], load_ckpt(b)["head"]
    return all(torch.equal(ha[k], hb[k]) for k in ("weight", "bias"))


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def data(generated_dataset) -> Path:
    return generated_dataset(3, 6, 3)  # 18 train and 9 val images (read-only); tiny18_cache is its cache


@pytest.fixture(scope="module")
def feats(tiny18_cache) -> Path:
    return tiny18_cache  # its fc7 cache (read-only)


@pytest.fixture(scope="module")
def run(feats, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "head"
    assert train(feats, out, "--epochs", "3", "--lr", "0.01", "--batch-size", "4", "--seed", "0") == 0
    return out


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    return write_synthetic_cache(tmp_path_factory.mktemp("noisy"))


# ---------------------------------------------------------------------------------------------
# The run folder


def test_run_folder_holds_every_artifact(run, feats):
    for name in RUN_FILES:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    for name in ("accuracy.png", "loss.png"):
        assert (run / name).read_bytes()[:8] == PNG_MAGIC
        with Image.open(run / name) as image:
            image.verify()

    rows = read_csv(run / "history.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]  # one row per epoch
    assert set(HISTORY_COLUMNS) <= set(rows[0])
    for row in rows:
        assert 0 <= float(row["train_acc"]) <= 100 and 0 <= float(row["val_top1"]) <= float(row["val_top5"]) <= 100
        assert float(row["train_loss"]) >= 0 and float(row["val_loss"]) >= 0 and float(row["seconds"]) >= 0

    per_class = read_csv(run / "per_class.csv")
    assert sorted((r["wnid"], r["name"]) for r in per_class) == list(zip(sorted(WORDS)[:3], NAMES))
    assert sum(int(r["images"]) for r in per_class) == 9
    assert (run / "confusions.csv").read_text().splitlines()[0].startswith("true_wnid,true_name,predicted_wnid")
    report = (run / "report.md").read_text()
    assert "goldfish" in report and "random:seed=0" in report

    config = json.loads((run / "config.json").read_text())
    assert config["lr"] == 0.01 and config["epochs"] == 3 and config["batch_size"] == 4 and config["seed"] == 0
    assert Path(config["features"]) == feats


def test_best_checkpoint_contents(run, feats):
    ckpt = load_ckpt(run / "best.pt")  # weights_only: a plain dict, safe to load
    train_split = open_split(feats / "train.h5")
    assert ckpt["head"]["weight"].shape == (3, 4096) and ckpt["head"]["bias"].shape == (3,)
    assert ckpt["head"]["weight"].dtype == torch.float32
    assert ckpt["feature_dim"] == 4096 and ckpt["num_classes"] == 3
    assert ckpt["class_wnids"] == sorted(WORDS)[:3] == train_split.wnids
    assert ckpt["class_names"] == NAMES
    assert ckpt["weights_spec"] == "random:seed=0"
    assert ckpt["weights_fingerprint"] == train_split.attrs["weights_fingerprint"] == random_backbone().fingerprint
    assert ckpt["preprocess"] == json.loads(train_split.attrs["preprocess"])
    assert Preprocess.from_dict(ckpt["preprocess"]) == Preprocess(image_size=64, resize_size=72)
    assert ckpt["config"]["lr"] == 0.01 and ckpt["config"]["epochs"] == 3

    rows = history(run)
    top1 = [r["val_top1"] for r in rows]
    assert ckpt["epoch"] == 1 + top1.index(max(top1))
    best_row = rows[ckpt["epoch"] - 1]
    for key in ("epoch", "train_loss", "train_acc", "val_loss", "val_top1", "val_top5"):
        assert ckpt["metrics"][key] == best_row[key], key
    last = load_ckpt(run / "last.pt")
    assert last["epoch"] == 3 and last["metrics"]["val_top1"] == rows[-1]["val_top1"]
    assert last["class_wnids"] == ckpt["class_wnids"]


def test_report_matches_the_best_head(run, feats):
    """per_class.csv counts are what best.pt predicts on the raw val features."""
    ckpt = load_ckpt(run / "best.pt")
    top1, _, predictions = accuracy_and_loss(ckpt, feats / "val.h5")
    labels = open_split(feats / "val.h5").labels
    per_class = {r["wnid"]: r for r in read_csv(run / "per_class.csv")}
    for c, wnid in enumerate(ckpt["class_wnids"]):
        assert int(per_class[wnid]["images"]) == (labels == c).sum()
        assert int(per_class[wnid]["correct"]) == ((labels == c) & (predictions == c)).sum()
    assert f"val top-1 {top1:.2f}%" in (run / "report.md").read_text()


def test_best_epoch_is_the_first_maximum_and_its_weights(noisy, tmp_path, monkeypatch):
    """A tie for the best val top-1 keeps the earlier epoch, and best.pt holds that epoch's weights."""
    scripted = iter([40.0, 70.0, 70.0, 60.0])
    real_evaluate = sgd.evaluate_heads

    def evaluate(*args, **kwargs):  # the per-epoch val pass (one head), not the final report
        return [{**metrics, "val_top1": next(scripted)} for metrics in real_evaluate(*args, **kwargs)]

    monkeypatch.setattr(sgd, "evaluate_heads", evaluate)
    args = ("--lr", "0.001", "--batch-size", "10")
    assert train(noisy, tmp_path / "four", "--epochs", "4", *args) == 0
    monkeypatch.undo()
    assert [r["val_top1"] for r in history(tmp_path / "four")] == [40.0, 70.0, 70.0, 60.0]
    best = load_ckpt(tmp_path / "four" / "best.pt")
    assert best["epoch"] == 2 and best["metrics"]["val_top1"] == 70.0
    # an identical run stopped after epoch 2 ends with exactly the weights best.pt must hold
    assert train(noisy, tmp_path / "two", "--epochs", "2", *args) == 0
    assert heads_equal(tmp_path / "four" / "best.pt", tmp_path / "two" / "last.pt")
    assert not heads_equal(tmp_path / "four" / "best.pt", tmp_path / "four" / "last.pt")


@pytest.mark.parametrize("standardize", [True, False])
def test_saved_head_works_on_raw_features(noisy, tmp_path, standardize):
    """Standardization is folded into the saved layer: on raw val.h5 it scores exactly what was logged."""
    out = tmp_path / "run"
    extra = () if standardize else ("--no-standardize",)
    assert train(noisy, out, "--epochs", "6", "--lr", "0.001" if standardize else "1e-5", "--batch-size", "10",
                 *extra) == 0
    rows = history(out)
    assert len({r["val_top1"] for r in rows}) > 1, "fixture should give a history that moves"
    assert max(r["val_top1"] for r in rows) > 25.0  # better than chance with 4 classes
    for name in ("best.pt", "last.pt"):
        ckpt = load_ckpt(out / name)
        row = rows[ckpt["epoch"] - 1]
        top1, loss, predictions = accuracy_and_loss(ckpt, noisy / "val.h5")
        assert top1 == row["val_top1"], name
        assert loss == pytest.approx(row["val_loss"], rel=1e-4), name
    # the report is computed from the same raw-feature head
    best = load_ckpt(out / "best.pt")
    _, _, predictions = accuracy_and_loss(best, noisy / "val.h5")
    labels = open_split(noisy / "val.h5").labels
    confusion = np.zeros((4, 4), dtype=int)
    np.add.at(confusion, (labels, predictions), 1)
    for r in read_csv(out / "confusions.csv"):
        t, p = best["class_wnids"].index(r["true_wnid"]), best["class_wnids"].index(r["predicted_wnid"])
        assert t != p and int(r["count"]) == confusion[t, p]
    assert sum(int(r["correct"]) for r in read_csv(out / "per_class.csv")) == np.trace(confusion)


# ---------------------------------------------------------------------------------------------
# Determinism and equivalence


def test_standardizer_z_scores_with_train_statistics(feats):
    """Mean and population std over all train rows; dead units (std 0) are left unscaled."""
    source = InMemoryFeatures.load(open_split(feats / "train.h5"), CPU_DEVICE, progress=False)
    standardizer = Standardizer.fit(source, CPU_DEVICE)
    x = source.features.double()
    std = x.std(0, unbiased=False)
    live = std > standardize.STD_FLOOR
    assert 0 < live.sum() < len(live)  # random fc7 on 18 images: many units are dead
    assert torch.allclose(standardizer.mean.double(), x.mean(0), rtol=1e-5, atol=1e-9)
    assert torch.allclose(standardizer.inv_std.double()[live], 1 / std[live], rtol=1e-4)
    assert torch.all(standardizer.inv_std[~live] == 1)
    z = standardizer(source.features)[:, live].double()
    assert torch.allclose(z.mean(0), torch.zeros(1, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(1, dtype=torch.float64), atol=1e-3)


def test_same_seed_same_head_other_seed_other_head(feats, run, tmp_path):
    args = ("--epochs", "3", "--lr", "0.01", "--batch-size", "4")
    assert train(feats, tmp_path / "again", *args, "--seed", "0") == 0
    assert heads_equal(run / "best.pt", tmp_path / "again" / "best.pt")
    assert heads_equal(run / "last.pt", tmp_path / "again" / "last.pt")
    without_times = [[{k: v for k, v in r.items() if "seconds" not in k} for r in history(folder)]
                     for folder in (run, tmp_path / "again")]
    assert without_times[0] == without_times[1]
    assert train(feats, tmp_path / "other", *args, "--seed", "1") == 0
    assert not torch.allclose(load_ckpt(run / "last.pt")["head"]["weight"],
                              load_ckpt(tmp_path / "other" / "last.pt")["head"]["weight"])


def test_batch_order_is_drawn_on_the_cpu_and_moved_once():
    """The same seeded permutation on every device; on the GPU it is moved once per epoch, not per step."""
    expected = torch.randperm(23, generator=torch.Generator().manual_seed(5)).split(4)
    got = batch_order(23, 4, torch.Generator().manual_seed(5), CPU_DEVICE)
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and len(got) == len(expected)
    if torch.cuda.is_available():
        on_gpu = batch_order(23, 4, torch.Generator().manual_seed(5), torch.device("cuda"))
        assert all(b.is_cuda and torch.equal(a, b.cpu()) for a, b in zip(expected, on_gpu))


# ---------------------------------------------------------------------------------------------
# Sweeps


def test_sweep_trains_one_head_per_setting(noisy, tmp_path):
    out = tmp_path / "sweep"
    # the better learning rate (0.1 here) is listed last, so the table's order comes from sorting alone
    assert train(noisy, out, "--lr", "0.01,0.1", "--weight-decay", "0,1e-4", "--epochs", "2", "--batch-size", "40",
                 "--select", "val") == 0
    settings = {"lr0.1_wd0": (0.1, 0.0), "lr0.1_wd0.0001": (0.1, 1e-4), "lr0.01_wd0": (0.01, 0.0),
                "lr0.01_wd0.0001": (0.01, 1e-4)}
    names = set(settings)
    assert {p.name for p in out.iterdir() if p.is_dir()} == names
    for name, (lr, weight_decay) in settings.items():
        for file in RUN_FILES:
            assert (out / name / file).is_file(), (name, file)
        configs = (load_ckpt(out / name / "best.pt")["config"], json.loads((out / name / "config.json").read_text()))
        for source in configs:
            assert (source["lr"], source["weight_decay"]) == (lr, weight_decay), name
        assert len(history(out / name)) == 2

    table = read_csv(out / "sweep.csv")
    assert {r["name"] for r in table} == names
    top1 = [float(r["best_val_top1"]) for r in table]
    assert top1 == sorted(top1, reverse=True) and top1[0] > top1[-1]
    for r in table:
        assert float(r["best_val_top1"]) == max(h["val_top1"] for h in history(out / r["name"]))
    assert top1[0] == max(max(h["val_top1"] for h in history(out / n)) for n in names)
    assert (out / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "best.pt").read_bytes() == (out / table[0]["name"] / "best.pt").read_bytes()

    # each head of the sweep is the head a single run with its settings trains: runs do not leak into each other
    train_source = InMemoryFeatures.load(open_split(noisy / "train.h5"), CPU_DEVICE, progress=False)
    single = fit_head(train_source, InMemoryFeatures.load(open_split(noisy / "val.h5"), CPU_DEVICE, progress=False),
                      Recipe(lr=0.01, weight_decay=1e-4, momentum=0.9, epochs=2, batch_size=40, val_batch_size=10, seed=0),
                      Standardizer.fit(train_source, CPU_DEVICE), num_classes=4, device=CPU_DEVICE, progress=False)
    swept = load_ckpt(out / "lr0.01_wd0.0001" / "last.pt")["head"]
    assert all(torch.equal(swept[k], single.last.state[k]) for k in ("weight", "bias"))
