"""The results store (pipeline.heads.store): a result.json beside every fit, --skip-existing decided from them
before torch is imported, one table of many runs (--table) with the binomial interval, and bad results named,
recomputed and never mixed into a table."""
from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import run_train_head
from pipeline.heads import registry
from pipeline.heads.publish.results import Row, summary, wilson
from pipeline.heads.store import RESULT_FORMAT, read_result, stale, write_result
from tests.helpers import CPU_ARGS, ROOT, write_synthetic_cache

GRID = ("--head", "linear,logreg,knn", "--k", "1,3", "--epochs", "2", "--batch-size", "8", "--max-iter", "50")


def train(features, out: Path, *extra: str) -> int:
    return run_train_head.main(["--features", str(features), "--out", str(out), *CPU_ARGS, "--no-progress", *extra])


def table(*folders: Path, out: Path) -> list[dict]:
    assert run_train_head.main(["--table", *map(str, folders), "--out", str(out)]) == 0
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def make_cache(root: Path, dataset: str = "synthetic", backbone: str = "alexnet") -> Path:
    return write_synthetic_cache(root / f"{dataset}-{backbone}", classes=3, train_per_class=8, val_per_class=4, dim=16,
                                 signal=0.5, dataset=dataset, backbone=backbone)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A cache and a finished grid of the three heads on it (read-only: copy it to change it)."""
    root = tmp_path_factory.mktemp("store")
    features = make_cache(root)
    assert train(features, root / "grid", *GRID) == 0
    return features, root / "grid"


def test_every_fit_writes_a_result_json(finished):
    _, grid = finished
    records = {str(path.parent.relative_to(grid)): read_result(path) for path in grid.rglob("result.json")}
    assert set(records) == {"fc7_linear_all_lr0.001_wd0", "fc7_logreg_all", "fc7_knn_all/k1", "fc7_knn_all/k3"}
    for record in records.values():
        assert record["format"] == RESULT_FORMAT and record["version"] and record["seconds"] >= 0
        assert {"dataset_signature", "files_signature", "num_rows"} <= set(record["cache"]["train"])
        assert {"features", "dataset_root", "backbone", "weights_fingerprint", "layer", "precision"} <= set(record["cache"])
        assert record["shots"] is None and 0 <= record["mean_per_class"] <= 100 and record["val_images"] == 12
    logreg = records["fc7_logreg_all"]
    assert {"chosen_C", "weight_decay", "refit_objective"} <= set(logreg) and logreg["settings"]["select"] == "train-split"
    assert logreg["weight_decay"] == pytest.approx(1 / (24 * logreg["chosen_C"]))  # the refit's lambda: 1/(n_all C)
    assert records["fc7_linear_all_lr0.001_wd0"]["selected_by"] == "val"  # the seed recipe's plain head
    assert sum(records[f"fc7_knn_all/k{k}"]["chosen"] for k in (1, 3)) == 1
    experiments = (grid / "experiments.csv").read_text().splitlines()
    assert experiments[0].startswith("dataset,backbone,layer,head,hyper_parameters,selected_by,")


def test_a_rerun_with_skip_existing_trains_nothing_and_imports_no_torch(finished, tmp_path):
    features, grid = finished
    before = {path: path.stat().st_mtime_ns for path in grid.rglob("*")}
    code = ("import sys, run_train_head\n"
            f"code = run_train_head.main({['--features', str(features), '--out', str(grid), *CPU_ARGS, '--no-progress', *GRID]!r})\n"
            "sys.exit(99 if 'torch' in sys.modules else code)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "is up to date" in done.stderr and "[1/" not in done.stderr
    assert {path: path.stat().st_mtime_ns for path in grid.rglob("*")} == before  # not a file touched


def test_a_finished_sweep_of_linear_heads_is_skipped_by_default_and_one_head_is_not(tmp_path, caplog):
    features = make_cache(tmp_path)
    sweep = ("--lr", "0.1,0.01", "--weight-decay", "0,0.01", "--epochs", "2", "--batch-size", "8")
    assert train(features, tmp_path / "sweep", *sweep) == 0
    assert train(features, tmp_path / "one", "--epochs", "2", "--batch-size", "8") == 0
    before = {path: path.stat().st_mtime_ns for path in (tmp_path / "sweep").rglob("*")}
    caplog.set_level(logging.INFO)
    assert train(features, tmp_path / "sweep", *sweep) == 0  # a sweep is a grid of heads: --skip-existing is on
    assert "is up to date" in caplog.text
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "sweep").rglob("*")} == before
    caplog.clear()
    assert train(features, tmp_path / "one", "--epochs", "2", "--batch-size", "8") == 0  # one head: trained again
    assert "is up to date" not in caplog.text


def test_a_changed_setting_retrains_only_its_combinations(finished, tmp_path, monkeypatch):
    features, grid = finished
    out = shutil.copytree(grid, tmp_path / "grid")
    for head in ("linear", "logreg"):  # kept, not trained: their fit would fail
        monkeypatch.setitem(registry.HEADS, head, registry.Head(None, registry.HEADS[head].publisher))
    assert train(features, out, *GRID[:2], "--k", "2", *GRID[4:]) == 0  # --k 2: only kNN changes
    assert read_result(out / "fc7_knn_all" / "k2" / "result.json")["k"] == 2 and not (out / "fc7_knn_all" / "k1").exists()
    assert read_result(out / "fc7_logreg_all" / "result.json") == read_result(grid / "fc7_logreg_all" / "result.json")
    assert (out / "fc7_linear_all_lr0.001_wd0" / "best.pt").read_bytes() == \
        (grid / "fc7_linear_all_lr0.001_wd0" / "best.pt").read_bytes()
    rows = list(csv.DictReader(open(out / "experiments.csv")))
    assert [r["head"] for r in rows] == ["linear", "logreg", "knn"] and json.loads((out / "run.json").read_text())["best"]


@pytest.mark.parametrize("bad", ["damaged", "another format", "stale cache"])
def test_a_bad_result_json_is_named_recomputed_and_never_mixed_into_a_table(finished, tmp_path, caplog, bad):
    features, grid = finished[0], shutil.copytree(finished[1], tmp_path / "grid")
    path = grid / "fc7_logreg_all" / "result.json"
    record = json.loads(path.read_text())
    if bad == "damaged":
        path.write_text(path.read_text()[:40])
    elif bad == "another format":
        path.write_text(json.dumps({**record, "format": "fc7-transfer-result/0"}))
    else:  # computed from the cache as it was before an update (other images): its files' signature differs now
        record["cache"]["train"]["files_signature"] = "0" * 64
        path.write_text(json.dumps(record))
    caplog.set_level(logging.INFO)
    rows = table(grid, out=tmp_path / "table")
    named = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(named) == 1 and "left out of the table" in named[0]  # named, in one line
    assert str(path) not in {r["result"] for r in rows} and len(rows) == 3
    caplog.clear()
    assert train(features, grid, *GRID) == 0  # recomputed; the others kept
    assert sum(str(path) in r.getMessage() and "recomputing" in r.getMessage() for r in caplog.records) == 1
    assert read_result(path)["head"] == "logreg" and "kept, not trained again" in caplog.text


def test_a_table_across_two_datasets_and_two_backbones(tmp_path):
    caches = [make_cache(tmp_path, dataset, backbone) for dataset in ("birds", "cars")
              for backbone in ("alexnet", "resnet18")]
    out = tmp_path / "study"
    assert train(",".join(map(str, caches)), out, "--head", "logreg,knn", "--layers", "fc7", "--k", "3",
                 "--max-iter", "30") == 0  # four caches, two datasets: each head on its own cache
    experiments = list(csv.DictReader(open(out / "experiments.csv")))
    assert {(r["dataset"], r["backbone"]) for r in experiments} == {
        ("birds", "alexnet-birds-alexnet"), ("birds", "resnet18-birds-resnet18"),
        ("cars", "alexnet-cars-alexnet"), ("cars", "resnet18-cars-resnet18")}
    rows = table(out, out=tmp_path / "table")
    assert {(r["dataset"], r["backbone"]) for r in rows} == {(d, b) for d in ("birds", "cars")
                                                             for b in ("alexnet", "resnet18")}
    assert len(rows) == 4 * 2 and all(r["chosen"] == "True" for r in rows)
    markdown = (tmp_path / "table" / "results.md").read_text()
    assert "## birds" in markdown and "## cars" in markdown and "| ≈ best | backbone |" in markdown
    assert (tmp_path / "table" / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_fits_within_the_binomial_interval_of_the_best_are_marked():
    low, high = wilson(80.0, 2000)
    assert low == pytest.approx(78.19, abs=0.01) and high == pytest.approx(81.70, abs=0.01)

    def row(top1: float, head: str) -> Row:
        cache = {"backbone": "b", "layer": "l", "dataset": "d", "val": {}}
        return Row(Path(f"/{head}/result.json"), {"cache": cache, "head": head, "shots": None, "chosen": True,
                                                  "top1": top1, "val_images": 2000}, dataset="d")
    rows = [row(79.9, "logreg"), row(80.0, "linear"), row(75.0, "knn"), row(78.2, "svm")]
    chosen, interval = summary(rows)["d"]
    assert [(r.record["head"], r.within_best) for r in chosen] == [("linear", True), ("logreg", True), ("svm", True),
                                                                   ("knn", False)]
    assert interval == (low, high)


def test_a_zero_shot_result_fits_the_store_as_it_is(finished, tmp_path):
    """A head with nothing to choose (zero-shot: 0 shots, selected_by none) is read and tabled with no change."""
    _, grid = finished
    record = read_result(grid / "fc7_logreg_all" / "result.json")
    zero = {key: value for key, value in record.items() if key not in ("chosen_C", "weight_decay", "refit_objective")}
    zero.update(head="zeroshot", shots=0, selected_by="none", settings={"templates": 80}, checkpoint=None,
                hyper_parameters="80 prompt templates", train_images=0, select_fraction=None, held_out_images=None)
    (tmp_path / "zeroshot").mkdir()
    write_result(tmp_path / "zeroshot" / "result.json", zero)
    rows = table(tmp_path / "zeroshot", grid, out=tmp_path / "table")
    assert [(r["head"], r["shots"], r["selected_by"]) for r in rows if r["head"] == "zeroshot"] == [("zeroshot", "0shot",
                                                                                                       "none")]
    assert "| zeroshot | 0shot | none |" in (tmp_path / "table" / "results.md").read_text()


def test_a_cache_extracted_again_from_other_images_makes_its_results_stale(tmp_path):
    features = make_cache(tmp_path)
    assert train(features, tmp_path / "run", "--head", "knn", "--k", "1") == 0
    path = tmp_path / "run" / "k1" / "result.json"
    assert stale(path, read_result(path)) is None
    for split in ("train.h5", "val.h5"):
        (features / split).unlink()
    write_synthetic_cache(features, classes=3, train_per_class=9, val_per_class=4, dim=16, dataset="synthetic-v2")
    reason = stale(path, read_result(path))
    assert str(path) in reason and str(features) in reason and "dataset" in reason and "\n" not in reason


def test_each_epoch_log_record_carries_its_facts_as_data(tmp_path, caplog):
    """The page's curves read an epoch from ``record.head_epoch``, not from the message's wording."""
    caplog.set_level(logging.INFO, logger="pipeline.heads.linear")
    assert train(make_cache(tmp_path), tmp_path / "one", "--epochs", "2", "--batch-size", "8") == 0
    facts = [r.head_epoch for r in caplog.records if hasattr(r, "head_epoch")]
    assert [f["epoch"] for f in facts] == [1, 2] and all(f["epochs"] == 2 and f["scored_on"] == "val" for f in facts)
    assert facts[-1]["run"] == "lr0.001_wd0" and 0 <= facts[-1]["val_top1"] <= 100 and facts[-1]["train_loss"] > 0
    history = list(csv.DictReader(open(tmp_path / "one" / "history.csv")))
    assert float(history[-1]["val_top1"]) == pytest.approx(facts[-1]["val_top1"], abs=1e-3)
