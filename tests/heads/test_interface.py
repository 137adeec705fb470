"""The heads' one interface (pipeline.heads.registry), settings passed whole, checkpoint stamps and fields,
and the smaller head-training refusals of issue #18 (items 5 and 12)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import run_train_head
from pipeline.common.checkpoint import read_checkpoint
from pipeline.common.config import HeadConfig
from pipeline.common.names import CHECKPOINT_FORMAT
from pipeline.heads import registry
from pipeline.heads.interface import HeadResult, HeadSettings, Predictions
from pipeline.heads.publish.files import write_config, write_csv, writing
from pipeline.heads.publish.heads import write_report
from pipeline.heads.publish.place import HeadOutcome, Place, Publisher, one_folder
from pipeline.heads.readers import FeatureReader
from tests.helpers import ROOT, one_error_line, train_quick_head, write_synthetic_cache

COMPAT = ROOT / "tests" / "data" / "compat"
train = train_quick_head


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_synthetic_cache(tmp_path_factory.mktemp("cache") / "feats", classes=3, train_per_class=6,
                                 val_per_class=3, dim=8)


# ---------------------------------------------------------------------------------------------
# One interface, a registry, and a fourth head as one module


def test_every_head_has_the_same_entry_point():
    for name, head in registry.HEADS.items():
        assert callable(head.fit) and callable(head.publisher.folders) and callable(head.publisher.write), name
        assert "config.json" in head.publisher.files and "report.md" in head.publisher.files, name


def test_no_head_module_writes_a_file():
    """Heads return, one publisher writes: a head module (and its solvers) opens nothing for writing."""
    heads = Path(registry.__file__).parent
    writes = ("open(", "write_text", "write_bytes", "savefig", "np.save", "torch.save", "save_checkpoint",
              "write_atomic", "csv.writer", "csv.DictWriter", "shutil", "mkdir")
    for path in [heads / f"{name}.py" for name in registry.HEADS] + sorted((heads / "solvers").glob("*.py")):
        text = path.read_text()
        assert not [call for call in writes if call in text], path


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeanResult(HeadResult):
    means: torch.Tensor  # (C, D) the class means
    predictions: Predictions


class NearestMean:
    """A fourth head written as a test would add one: the nearest class mean, no checkpoint."""

    @staticmethod
    def fit(train: FeatureReader, val: FeatureReader, settings: HeadSettings) -> MeanResult:
        x, y = train.load_float32(settings.device, False)
        vx, vy = val.load_float32(settings.device, False)
        means = torch.stack([x[y == c].mean(0) for c in range(int(y.max()) + 1)])
        predicted = torch.cdist(vx, means).argmin(1)
        top1 = 100.0 * (predicted == vy).float().mean().item()
        return MeanResult(means=means, predictions=Predictions(predicted.numpy(), top1, 100.0),
                          train_images=train.num_rows, seconds=0.0)

    @staticmethod
    def write(result: MeanResult, place: Place) -> HeadOutcome:
        folder = place.folder()
        write_config(place.stage, folder, place.record(place.settings.config))
        with writing(place.stage, folder / "means.csv"):
            write_csv(folder / "means.csv", [{"classes": len(result.means)}])
        write_report(place, folder, result.predictions, epoch=0, summary="Nearest class mean:")
        row = place.row(params="-", val_top1=result.predictions.val_top1, val_top5=100.0,
                        train_images=result.train_images, seconds=result.seconds, folder=folder, checkpoint=None)
        return HeadOutcome(rows=(row,), names=(place.settings.name,), best=None)


def test_a_fourth_head_is_one_module_its_writer_and_one_line_in_the_registry(cache, tmp_path, monkeypatch):
    publisher = Publisher(files=("config.json", "means.csv", "per_class.csv", "confusions.csv", "report.md"),
                          folders=one_folder, write=NearestMean.write)
    monkeypatch.setitem(registry.HEADS, "mean", registry.Head(NearestMean.fit, publisher))
    out = tmp_path / "grid"
    assert train(cache, out, "--head", "knn,mean", "--k", "1") == 0
    assert (out / "fc7_mean_all" / "means.csv").read_text().splitlines() == ["classes", "3"]
    assert (out / "fc7_mean_all" / "report.md").read_text().startswith(f"# Head report: {out / 'fc7_mean_all'}")
    assert "| fc7 | mean |" in (out / "experiments.md").read_text()
    record = json.loads((out / "run.json").read_text())
    assert set(record["contents"]["fc7_mean_all"]) == {"config.json", "means.csv", "per_class.csv", "confusions.csv",
                                                       "report.md"}


# ---------------------------------------------------------------------------------------------
# Settings passed whole


def test_every_flag_is_a_config_field_and_layer_is_an_alias():
    fields = {f.name for f in dataclasses.fields(HeadConfig)}
    args = run_train_head.build_parser().parse_args(["--layer", "fc6,fc7", "--head", "knn"])
    assert set(vars(args)) <= fields
    config = HeadConfig(**vars(args))
    assert config.layers == ("fc6", "fc7") and config.head == ("knn",)
    assert run_train_head.build_parser().parse_args(["--layers", "pool5"]).layers == ("pool5",)
    assert config == HeadConfig(layers=("fc6", "fc7"), head=("knn",))  # the defaults are HeadConfig's


def test_one_weight_decay_list_serves_linear_and_logreg(cache, tmp_path):
    out = tmp_path / "grid"
    assert train(cache, out, "--head", "linear,logreg", "--weight-decay", "0.01,0.001", "--max-iter", "5",
                 "--select", "val") == 0
    assert json.loads((out / "fc7_logreg_all" / "config.json").read_text())["weight_decay"] == [0.01, 0.001]
    assert (out / "fc7_linear_all_lr0.001_wd0.01").is_dir() and (out / "fc7_linear_all_lr0.001_wd0.001").is_dir()


# ---------------------------------------------------------------------------------------------
# Checkpoint stamps and fields


def test_heads_are_stamped_as_linear_heads_and_old_stamps_still_read(cache, tmp_path):
    assert CHECKPOINT_FORMAT == "linear-head/1"
    old = read_checkpoint(COMPAT / "best.pt")  # made by the old code, stamped fc7-linear-head/1
    assert old["format"] == "fc7-linear-head/1" and old["num_classes"] == 3
    assert train(cache, tmp_path / "logreg", "--head", "logreg", "--max-iter", "5") == 0
    assert torch.load(tmp_path / "logreg" / "best.pt", weights_only=True)["format"] == "linear-head/1"


@pytest.mark.parametrize("field, value", [
    ("metrics", {"val_top1": "97.5"}), ("num_classes", 0), ("num_classes", "3"), ("epoch", "2"),
    ("class_wnids", "n01443537"), ("weights_spec", 7), ("head", {"weight": "w", "bias": "b"}),
    ("preprocess", "RGB"), ("feature_dim", True),
])
def test_a_checkpoint_field_of_the_wrong_type_is_one_line(tmp_path, field, value):
    from pipeline.common.errors import UserError

    checkpoint = torch.load(COMPAT / "best.pt", weights_only=True)
    checkpoint[field] = value
    path = tmp_path / "best.pt"
    torch.save(checkpoint, path)
    with pytest.raises(UserError) as err:
        read_checkpoint(path)
    assert str(path) in str(err.value) and repr(field) in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_whose_head_shape_disagrees_is_one_line(tmp_path):
    from pipeline.common.errors import UserError

    checkpoint = torch.load(COMPAT / "best.pt", weights_only=True)
    checkpoint["head"]["weight"] = checkpoint["head"]["weight"][:2]
    torch.save(checkpoint, tmp_path / "best.pt")
    with pytest.raises(UserError, match="inconsistent"):
        read_checkpoint(tmp_path / "best.pt")


# ---------------------------------------------------------------------------------------------
# #18 items 5 and 12


def test_an_out_whose_name_is_not_utf8_gets_its_reports(cache, tmp_path):
    out = Path(os.fsdecode(bytes(tmp_path) + b"/head-\xff"))
    assert train(cache, out, "--head", "linear,knn", "--k", "1") == 0
    assert (out / "fc7_knn_all" / "report.md").read_text().startswith("# Head report: ")
    assert "head-\ufffd" in (out / "experiments.md").read_text()
    assert (out / "fc7_linear_all_lr0.001_wd0" / "best.pt").is_file()


def test_an_infinite_temperature_is_refused_with_the_right_reason(cache, tmp_path, capsys):
    assert train(cache, tmp_path / "out", "--head", "knn", "--temperature", "inf") == 2
    line = one_error_line(capsys)
    assert "--temperature" in line and "finite" in line and "got inf" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("head", ["linear", "logreg", "knn"])
def test_a_cache_of_one_class_is_refused_for_head_training(tmp_path_factory, tmp_path, capsys, head):
    one = write_synthetic_cache(tmp_path / "one", classes=1, train_per_class=4, val_per_class=2, dim=8)
    capsys.readouterr()
    assert train(one, tmp_path / "out", "--head", head) == 2
    line = one_error_line(capsys)
    assert "at least two" in line and str(one / "train.h5") in line
    assert not (tmp_path / "out").exists()


def test_the_compat_cache_still_trains(tmp_path):
    features = tmp_path / "compat"
    shutil.copytree(COMPAT, features)
    assert train(features, tmp_path / "head") == 0
    assert read_checkpoint(tmp_path / "head" / "best.pt")["num_classes"] == 3
