"""Head experiments (pipeline.heads.experiments.grid, logreg, knn, shots): the optimum, the votes, the draw, the table, fc6 live.

Multi-layer caches are written here with h5py: the fc7 cache as extraction writes it (``features``), plus
``pool5``/``fc6`` datasets named after their layer, which is what ``open_split(path, layer)`` reads.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import run_train_head
import run_webcam
from features.cache import open_split
from pipeline.heads import knn
from pipeline.backbones.precision import place_backbone
from pipeline.common.checkpoint import read_checkpoint
from pipeline.heads.rows import COLUMNS
from pipeline.datasets.images import read_rgb
from pipeline.heads.solvers.path import fit_logreg, objective
from pipeline.common.preprocess import Preprocess
from pipeline.heads.experiments.shots import few_shot_rows
from pipeline.heads.readers import InMemoryFeatures
from pipeline.heads.standardize import Standardizer
from tests.helpers import CPU_ARGS, one_error_line, random_backbone, read_csv, write_synthetic_cache
from tests.heads.test_train_head import PNG_MAGIC, RUN_FILES

DIMS = {"pool5": 9216, "fc6": 4096, "fc7": 4096}


def train(features: Path, out: Path, *extra: str) -> int:
    return run_train_head.main(["--features", str(features), "--out", str(out), *CPU_ARGS, "--no-progress", *extra])


def add_layer(path: Path, layer: str, features: np.ndarray) -> None:
    with h5py.File(path, "a") as f:
        f.create_dataset(layer, data=features, chunks=(min(256, len(features)), features.shape[1]))
        f.attrs["layers"] = json.dumps(json.loads(f.attrs["layers"]) + [layer])  # a cache lists the layers it holds


def write_layered_cache(folder: Path, *, classes: int = 4, train_per_class: int = 10, val_per_class: int = 5) -> Path:
    """fc7 as ``features`` (write_synthetic_cache), plus pool5 and fc6 with their own class structure."""
    write_synthetic_cache(folder, classes=classes, train_per_class=train_per_class, val_per_class=val_per_class)
    for layer, seed in (("pool5", 5), ("fc6", 6)):
        proto = np.random.default_rng(seed).normal(0, 1, (classes, DIMS[layer]))
        for split, per_class in (("train", train_per_class), ("val", val_per_class)):
            labels = np.repeat(np.arange(classes), per_class)
            noise = np.random.default_rng((seed, per_class)).normal(0, 1, (len(labels), DIMS[layer]))
            add_layer(folder / f"{split}.h5", layer, np.maximum(proto[labels] * 0.15 + noise, 0).astype(np.float32))
    return folder


@pytest.fixture(scope="module")
def layered(tmp_path_factory) -> Path:
    return write_layered_cache(tmp_path_factory.mktemp("layered"))


@pytest.fixture(scope="module")
def real(tiny_dataset, tiny_cache, tmp_path_factory) -> dict:
    """Generated images, their fc7 cache from run_extract.py, and fc6 of the same random backbone added to it."""
    root = tmp_path_factory.mktemp("real")
    ds, feats = tiny_dataset, root / "feats"
    shutil.copytree(tiny_cache, feats)  # the session's cache, copied: fc6 is added below
    backbone = random_backbone(layers=("fc6", "fc7")).module  # what --weights random --seed 0 extracted with
    backbone = place_backbone(backbone, torch.device("cpu"), "fp32")
    for split in ("train", "val"):
        cached = open_split(feats / f"{split}.h5")
        preprocess = Preprocess.from_dict(json.loads(cached.attrs["preprocess"]))
        with torch.inference_mode():
            layers = backbone.forward_layers(preprocess([read_rgb(ds / p) for p in cached.paths]), ("fc6", "fc7"))
        # the same computation gives the cached fc7, so the fc6 beside it is what extraction would store
        torch.testing.assert_close(layers["fc7"], torch.from_numpy(cached.read_features()), rtol=1e-4, atol=1e-5)
        add_layer(feats / f"{split}.h5", "fc6", layers["fc6"].numpy())
    return {"ds": ds, "feats": feats, "root": root}


def standardized(folder: Path, layer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and val features of ``layer`` z-scored with train statistics, as logreg trains on them."""
    train_source = InMemoryFeatures.load(open_split(folder / "train.h5", layer), torch.device("cpu"), progress=False)
    val_source = InMemoryFeatures.load(open_split(folder / "val.h5", layer), torch.device("cpu"), progress=False)
    standardizer = Standardizer.fit(train_source, torch.device("cpu"))
    return (standardizer(train_source.features), train_source.labels, standardizer(val_source.features),
            val_source.labels)


# ---------------------------------------------------------------------------------------------
# logreg reaches the optimum


def test_logreg_is_perfect_on_a_separable_set():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]]).repeat(1, 4)  # (3, 12), far apart
    y = torch.arange(3).repeat_interleave(30)
    x = centres[y] + torch.randn(len(y), 12, generator=generator)
    val_y = torch.arange(3).repeat_interleave(10)
    val_x = centres[val_y] + torch.randn(len(val_y), 12, generator=generator)
    result = fit_logreg(x, y, val_x, val_y, num_classes=3, weight_decays=(1e-4,), max_iter=200)
    fit = result.fits[0]
    assert fit.train_acc == 100.0 and fit.val_top1 == 100.0
    assert fit.grad_max < 1e-4  # it stopped at the optimum, not at the iteration limit


def test_logreg_reaches_the_optimum_of_an_independent_solve(real, tmp_path):
    """On real fc6 features: the CLI's float32 L-BFGS objective equals a float64 solve of the same problem in
    another parametrisation (W = A X, the representer form) from a random start."""
    out = tmp_path / "logreg"
    assert train(real["feats"], out, "--head", "logreg", "--layer", "fc6", "--weight-decay", "0.01",
                 "--max-iter", "300", "--select", "val") == 0
    path = read_csv(out / "path.csv")
    assert len(path) == 1 and float(path[0]["weight_decay"]) == 0.01

    x, y, val_x, val_y = (t.double() if t.is_floating_point() else t for t in standardized(real["feats"], "fc6"))
    kernel = x @ x.T  # (N, N)
    torch.manual_seed(1)
    a = torch.randn(3, len(y), dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS([a, b], max_iter=5000, tolerance_grad=1e-12, tolerance_change=1e-16,
                               history_size=50, line_search_fn="strong_wolfe")

    def kernel_objective():
        return F.cross_entropy(kernel @ a.T + b, y) + 0.5 * 0.01 * torch.einsum("cn,nm,cm->", a, kernel, a)

    def closure():
        solver.zero_grad()
        loss = kernel_objective()
        loss.backward()
        return loss

    solver.step(closure)
    with torch.no_grad():
        weight = a @ x  # (C, D)
        best = objective(x, y, weight, b, 0.01).item()
        val_top1 = 100.0 * ((val_x @ weight.T + b).argmax(1) == val_y).double().mean().item()
    assert float(path[0]["objective"]) == pytest.approx(best, rel=1e-4)
    assert float(path[0]["val_top1"]) == val_top1

    # the saved head (standardization folded in) gives the logged val top-1 on the raw cached fc6
    checkpoint = read_checkpoint(out / "best.pt")
    assert checkpoint["layer"] == "fc6" and checkpoint["feature_dim"] == 4096
    raw = torch.from_numpy(open_split(real["feats"] / "val.h5", "fc6").read_features())
    logits = raw @ checkpoint["head"]["weight"].T + checkpoint["head"]["bias"]
    assert 100.0 * (logits.argmax(1) == val_y).double().mean().item() == float(path[0]["val_top1"])


def test_logreg_warm_starts_strongest_first_and_keeps_the_best_val_top1(layered, tmp_path):
    out = tmp_path / "path"
    assert train(layered, out, "--head", "logreg", "--weight-decay", "1e-4,10,0.1", "--max-iter", "50",
                 "--select", "val") == 0
    path = read_csv(out / "path.csv")
    assert [float(r["weight_decay"]) for r in path] == [10.0, 0.1, 1e-4]
    top1 = [float(r["val_top1"]) for r in path]
    best = path[top1.index(max(top1))]
    checkpoint = read_checkpoint(out / "best.pt")
    assert checkpoint["metrics"]["weight_decay"] == float(best["weight_decay"])
    assert checkpoint["metrics"]["val_top1"] == max(top1)
    assert "Trained on 40 train images (all of them)" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# knn gives the votes computed by hand


def test_knn_votes_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])  # unit rows
    labels = torch.tensor([0, 0, 1, 2, 1])
    query = torch.tensor([[2.0, 0.0]])  # not unit: normalised to (1, 0)
    knn.normalize_rows(query)
    # similarities to (1, 0): 1.0, 0.8, 0.0, -1.0, 0.6 -> neighbours in order: rows 0, 1, 4, 2, 3
    t = 0.5
    expected = {
        1: [math.exp(1.0 / t), 0.0, 0.0],
        2: [math.exp(1.0 / t) + math.exp(0.8 / t), 0.0, 0.0],
        3: [math.exp(1.0 / t) + math.exp(0.8 / t), math.exp(0.6 / t), 0.0],
        5: [math.exp(1.0 / t) + math.exp(0.8 / t), math.exp(0.6 / t) + math.exp(0.0), math.exp(-1.0 / t)],
    }
    similarity = query @ train.T
    nearest, index = similarity.topk(5, dim=1)
    for k, scores in expected.items():
        got = knn.class_scores(nearest[:, :k], labels[index[:, :k]], 3, t)
        torch.testing.assert_close(got, torch.tensor([scores]), rtol=1e-6, atol=0)
    # the class ranking follows the scores; with k=5 class 2 still comes last
    ranked = knn.knn_predict(train, labels, query, ks=(1, 3, 5), num_classes=3, temperature=t, chunk_rows=1)
    assert ranked[1][0, 0] == 0 and ranked[3][0].tolist() == [0, 1, 2] and ranked[5][0].tolist() == [0, 1, 2]
    # a class far away wins when its neighbours are many and the temperature is high
    far = torch.tensor([[0.0, 1.0]])
    ranked = knn.knn_predict(train, labels, far, ks=(3,), num_classes=3, temperature=100.0, chunk_rows=8)
    assert ranked[3][0, 0] == 1  # rows 2 (sim 1) and 4 (0.8) of class 1 beat row 1 (0.6) of class 0
    # a tiny temperature cannot overflow into NaN votes: the nearest neighbour's class wins, as it should
    ranked = knn.knn_predict(train, labels, query, ks=(5,), num_classes=3, temperature=1e-9, chunk_rows=1)
    assert ranked[5][0, 0] == 0
    scores = knn.class_scores(nearest, labels[index], 3, 1e-9, shift=True)
    assert torch.isfinite(scores).all() and scores[0].argmax() == 0


def test_knn_in_chunks_equals_the_dense_computation():
    """Chunked, with every k from one top-k search: the same rankings as the full (M, N) similarity per k."""
    generator = torch.Generator().manual_seed(0)
    train = knn.normalize_rows(torch.rand(60, 16, generator=generator))
    labels = torch.randint(0, 6, (60,), generator=generator)
    queries = knn.normalize_rows(torch.rand(23, 16, generator=generator))
    ks = (1, 4, 20)
    chunked = knn.knn_predict(train, labels, queries, ks=ks, num_classes=6, temperature=0.07, chunk_rows=5)
    similarity = queries @ train.T  # (M, N): fine at this size
    for k in ks:
        nearest, index = similarity.topk(k, dim=1)
        weights = (nearest / 0.07).exp()
        scores = torch.stack([torch.stack([weights[i][labels[index[i]] == c].sum() for c in range(6)])
                              for i in range(len(queries))])
        assert chunked[k].shape == (23, 5)
        torch.testing.assert_close(scores.gather(1, chunked[k]), scores.topk(5, dim=1).values)
        assert torch.equal(chunked[k][:, 0], scores.argmax(1))


def test_knn_run_reports_every_k(layered, tmp_path):
    out = tmp_path / "knn"
    assert train(layered, out, "--head", "knn", "--k", "1,5,100") == 0
    table = read_csv(out / "knn.csv")
    assert [int(r["k"]) for r in table] == [1, 5, 100]
    assert [int(r["k_used"]) for r in table] == [1, 5, 40]  # k beyond the 40 train images uses them all, and says so
    train_split, val_split = open_split(layered / "train.h5"), open_split(layered / "val.h5")
    train_x = knn.normalize_rows(torch.from_numpy(train_split.read_features()))
    val_x = knn.normalize_rows(torch.from_numpy(val_split.read_features()))
    for row in table:
        k = int(row["k_used"])
        ranked = knn.knn_predict(train_x, torch.from_numpy(train_split.labels), val_x, ks=(k,), num_classes=4,
                                 temperature=0.07, chunk_rows=1000)[k]
        assert float(row["val_top1"]) == knn.accuracy(ranked, torch.from_numpy(val_split.labels))["val_top1"]
    assert not (out / "best.pt").exists()  # nothing trained, no checkpoint
    assert "| 100 (all 40) |" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# --shots: K per class, deterministic, val untouched


def test_few_shot_rows_are_k_per_class_and_deterministic():
    labels = np.repeat(np.arange(5), [7, 9, 8, 10, 7])
    wnids = [f"n{i}" for i in range(5)]
    rows = few_shot_rows(labels, 3, seed=0, wnids=wnids)
    assert np.bincount(labels[rows], minlength=5).tolist() == [3] * 5
    assert len(set(rows.tolist())) == 15 and np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, few_shot_rows(labels, 3, seed=0, wnids=wnids))  # same seed, same rows
    assert not np.array_equal(rows, few_shot_rows(labels, 3, seed=1, wnids=wnids))  # other seed, other rows
    assert set(rows) <= set(few_shot_rows(labels, 5, seed=0, wnids=wnids))  # the 3-shot set is in the 5-shot set
    assert np.array_equal(few_shot_rows(labels, 7, seed=3, wnids=wnids)[:7], np.arange(7))  # all of the smallest class


def test_shots_train_on_the_drawn_rows_only(layered, tmp_path, capsys):
    runs = {name: tmp_path / name for name in ("a", "b", "other")}
    for name, seed in (("a", "0"), ("b", "0"), ("other", "1")):
        assert train(layered, runs[name], "--head", "logreg", "--shots", "3", "--seed", seed, "--weight-decay", "0.1",
                     "--max-iter", "40", "--select", "val") == 0
    heads = {name: read_checkpoint(folder / "best.pt")["head"]["weight"] for name, folder in runs.items()}
    assert torch.equal(heads["a"], heads["b"]) and not torch.equal(heads["a"], heads["other"])
    report = (runs["a"] / "report.md").read_text()
    assert "Trained on 12 train images (3 per class, drawn with seed 0)" in report
    assert "20 val images" in report  # val untouched
    # the head is the optimum on exactly the drawn rows
    split = open_split(layered / "train.h5")
    rows = few_shot_rows(split.labels, 3, seed=0, wnids=split.wnids)
    source = InMemoryFeatures.load(split, torch.device("cpu"), progress=False, rows=rows)
    assert torch.equal(source.labels, torch.from_numpy(split.labels[rows]))
    standardizer = Standardizer.fit(source, torch.device("cpu"))
    _, _, val_x, val_y = standardized(layered, "fc7")
    direct = fit_logreg(standardizer(source.features), source.labels, val_x, val_y, num_classes=4,
                        weight_decays=(0.1,), max_iter=40)
    assert float(read_csv(runs["a"] / "path.csv")[0]["objective"]) == pytest.approx(direct.fits[0].objective, rel=1e-5)

    # linear and knn take the same draw and say so
    assert train(layered, tmp_path / "linear", "--shots", "3", "--epochs", "2", "--batch-size", "4") == 0
    assert "Trained on 12 train images" in (tmp_path / "linear" / "report.md").read_text()
    assert train(layered, tmp_path / "knn", "--head", "knn", "--shots", "3", "--k", "1,20") == 0
    assert [int(r["k_used"]) for r in read_csv(tmp_path / "knn" / "knn.csv")] == [1, 12]

    capsys.readouterr()
    assert train(layered, tmp_path / "too-many", "--shots", "11", "--head", "knn") == 2
    line = one_error_line(capsys)
    assert "--shots 11" in line and "--shots 10" in line


# ---------------------------------------------------------------------------------------------
# One command, one table


def test_grid_writes_its_table(layered, tmp_path):
    out = tmp_path / "grid"
    assert train(layered, out, "--layer", "pool5,fc7", "--head", "linear,logreg,knn", "--shots", "2,all",
                 "--k", "1,3", "--lr", "0.01,0.001", "--epochs", "2", "--batch-size", "8", "--max-iter", "20",
                 "--select", "val") == 0
    table = read_csv(out / "experiments.csv")
    assert list(table[0]) == COLUMNS
    per_combo = {"linear": 2, "logreg": 1, "knn": 2}  # two learning rates; two k
    assert len(table) == 2 * 2 * sum(per_combo.values())
    for layer in ("pool5", "fc7"):
        for shots, images in (("2shot", 8), ("all", 40)):
            for head, count in per_combo.items():
                rows = [r for r in table if (r["layer"], r["head"], r["shots"]) == (layer, head, shots)]
                assert len(rows) == count, (layer, head, shots)
                assert all(int(r["train_images"]) == images and float(r["seconds"]) >= 0 for r in rows)
                assert all(0 <= float(r["val_top1"]) <= float(r["val_top5"]) <= 100 for r in rows)
    # every row's folder holds its own record of the same numbers
    for r in table:
        folder = out / r["folder"]
        if r["head"] == "knn":
            k = int(r["hyper_parameters"].split()[0][2:])
            assert float(r["val_top1"]) == pytest.approx(
                float(next(x for x in read_csv(folder / "knn.csv") if int(x["k"]) == k)["val_top1"]))
            continue
        checkpoint = read_checkpoint(folder / "best.pt")  # a valid head for its layer
        assert checkpoint["layer"] == r["layer"] and checkpoint["feature_dim"] == DIMS[r["layer"]]
        assert checkpoint["metrics"]["val_top1"] == pytest.approx(float(r["val_top1"]))
    assert {p.name for p in out.iterdir() if p.is_dir()} == {r["folder"] for r in table}
    assert (out / "fc7_linear_2shot_lr0.01_wd0").is_dir() and (out / "pool5_logreg_all").is_dir()
    # the best head with a checkpoint is the top-level best.pt
    trained = [r for r in table if r["head"] != "knn"]
    best = max(trained, key=lambda r: float(r["val_top1"]))
    assert (out / "best.pt").read_bytes() == (out / best["folder"] / "best.pt").read_bytes()
    markdown = (out / "experiments.md").read_text()
    assert ("| layer | head | hyper-parameters | selected by | shots | val top-1 | val top-5 | train images | seconds |"
            in markdown)
    assert sum(line.startswith(("| pool5 ", "| fc7 ")) for line in markdown.splitlines()) == len(table)
    assert (out / "experiments.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "config.json").read_text())["layers"] == ["pool5", "fc7"]


def test_a_plain_run_writes_todays_outputs_only(layered, tmp_path):
    out = tmp_path / "plain"
    assert train(layered, out, "--epochs", "2", "--batch-size", "8") == 0
    # today's outputs, plus the run's manifest (run.json, written last) and its lock file
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted([*RUN_FILES, "run.json",
                                                                                          "result.json"])
    assert read_checkpoint(out / "best.pt")["layer"] == "fc7"
    single = tmp_path / "logreg"  # one combination of another head also goes straight into --out
    assert train(layered, single, "--head", "logreg", "--layer", "pool5", "--max-iter", "10") == 0
    assert {"best.pt", "path.csv", "report.md", "config.json", "per_class.csv"} <= {p.name for p in single.iterdir()}
    assert not any(p.is_dir() for p in single.iterdir()) and not (single / "experiments.csv").exists()


@pytest.mark.parametrize("flags, message", [
    (("--head", "svm"), "--head svm"),
    (("--layer", "fc8"), "--layers fc8"),
    (("--shots", "0"), "--shots"),
    (("--k", "0"), "--k"),
    (("--head", "logreg", "--weight-decay", "nan"), "--weight-decay"),
])
def test_bad_experiment_options(layered, tmp_path, capsys, flags, message):
    assert train(layered, tmp_path / "out", *flags) == 2
    assert message in one_error_line(capsys)


def test_a_layer_the_cache_lacks_is_named(real, tmp_path, capsys):
    assert train(real["feats"], tmp_path / "out", "--layer", "pool5,fc7", "--head", "knn") == 2
    line = one_error_line(capsys)
    assert "pool5" in line and "--layers pool5" in line
    assert not (tmp_path / "out").exists()  # checked before anything ran


# ---------------------------------------------------------------------------------------------
# Live on a head trained on fc6


def test_webcam_runs_a_head_trained_on_fc6(real, tmp_path):
    head = tmp_path / "head"
    assert train(real["feats"], head, "--layer", "fc6", "--head", "logreg", "--weight-decay", "0.01") == 0
    checkpoint = read_checkpoint(head / "best.pt")
    assert checkpoint["layer"] == "fc6"
    val = open_split(real["feats"] / "val.h5", "fc6")
    fc6 = torch.from_numpy(val.read_features())
    cached = torch.softmax(fc6 @ checkpoint["head"]["weight"].T + checkpoint["head"]["bias"], dim=1)
    expected = {str(real["ds"] / p): probs for p, probs in zip(val.paths, cached)}
    jsonl = tmp_path / "preds.jsonl"
    assert run_webcam.main([*CPU_ARGS, "--checkpoint", str(head / "best.pt"), "--source", str(real["ds"] / "val" / "images"),
                            "--no-display", "--predictions", str(jsonl), "--top-k", "3"]) == 0
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert sorted(line["source"] for line in lines) == sorted(expected)
    for line in lines:
        probs = expected[line["source"]]
        assert line["topk"][0]["wnid"] == checkpoint["class_wnids"][int(probs.argmax())]
        assert [t["prob"] for t in line["topk"]] == pytest.approx(sorted(probs.tolist(), reverse=True),
                                                                  rel=1e-4, abs=1e-5)
    # and the fc6 head is not an fc7 head in disguise: on fc7 it would answer differently
    fc7 = torch.from_numpy(open_split(real["feats"] / "val.h5").read_features())
    on_fc7 = torch.softmax(fc7 @ checkpoint["head"]["weight"].T + checkpoint["head"]["bias"], dim=1)
    assert not torch.allclose(on_fc7, cached, rtol=1e-2, atol=1e-3)
