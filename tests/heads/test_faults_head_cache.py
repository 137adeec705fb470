"""Head training on invalid caches (each one line naming the file), and heads with NaN weights never saved."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from features.cache import exclusive_writer
from pipeline.common import checkpoint as checkpoint_module
from pipeline.common.errors import UserError
from tests.helpers import one_error_line
from tests.heads.test_faults_head import cache, old_run, snapshot, train  # noqa: F401


# ---------------------------------------------------------------------------------------------
# Invalid caches: each one a line naming the file


def _rewrite(path: Path, name: str, change) -> None:
    """Replace dataset ``name`` (through the ``features`` link, the layer's own dataset) with ``change(its data)``."""
    with h5py.File(path, "a") as f:
        link = f.get(name, getlink=True)
        if isinstance(link, h5py.SoftLink):
            name = link.path.lstrip("/")
        data = change(f[name][:])
        del f[name]
        f.create_dataset(name, data=data)


# case: (the file to damage, its dataset, the change, a phrase the error must contain)
REWRITES = {
    "fewer-features-than-labels": ("train.h5", "features", lambda data: data[:-5], "shape"),
    "features-float64": ("val.h5", "features", lambda data: data.astype(np.float64), "dtype"),
    "features-1d": ("train.h5", "features", lambda data: data[:, 0], "shape"),
    "labels-float": ("train.h5", "labels", lambda data: data.astype(np.float32), "labels"),
}


def _damage(folder: Path, case: str) -> tuple[str, str]:
    """Damage the cache in ``folder``; return (the file the error must name, a phrase it must contain)."""
    train_h5, val_h5 = folder / "train.h5", folder / "val.h5"
    if case in REWRITES:
        file, name, change, words = REWRITES[case]
        _rewrite(folder / file, name, change)
        return file, words
    if case in ("label-too-large", "label-negative"):
        with h5py.File(val_h5, "a") as f:
            f["labels"][3] = 4 if case == "label-too-large" else -1
        return "val.h5", "row 3"
    if case in ("no-labels", "no-paths", "no-class-wnids"):
        with h5py.File(train_h5, "a") as f:
            del f[{"no-labels": "labels", "no-paths": "paths", "no-class-wnids": "class_wnids"}[case]]
        return "train.h5", "re-extract"
    if case in ("no-split-attr", "no-feature-dim-attr"):
        with h5py.File(val_h5, "a") as f:
            del f.attrs["split" if case == "no-split-attr" else "feature_dim"]
        return "val.h5", "lacks the attribute"
    if case == "empty-split":
        with h5py.File(val_h5, "a") as f:
            for name in ("fc7" if "fc7" in f else "features", "labels", "paths"):
                data = f[name][:0]
                del f[name]
                f.create_dataset(name, data=data, maxshape=(None,) * data.ndim,
                                 dtype=h5py.string_dtype("utf-8") if name == "paths" else data.dtype)
            f.attrs["num_rows"] = 0
        return "val.h5", "empty split"
    if case == "swapped":
        os.replace(train_h5, folder / "tmp.h5")
        os.replace(val_h5, train_h5)
        os.replace(folder / "tmp.h5", val_h5)
        return "train.h5", "swapped"
    if case == "val-is-train":
        shutil.copy(train_h5, val_h5)
        return "val.h5", "'train' split"
    raise AssertionError(case)


BAD_CACHES = ["fewer-features-than-labels", "features-float64", "features-1d", "labels-float", "label-too-large",
              "label-negative", "no-labels", "no-paths", "no-class-wnids", "no-split-attr", "no-feature-dim-attr",
              "empty-split", "swapped", "val-is-train"]


@pytest.mark.parametrize("case", BAD_CACHES)
def test_invalid_cache_is_a_line_naming_the_file(cache, tmp_path, capsys, case):
    folder = tmp_path / "feats"
    shutil.copytree(cache, folder)
    name, phrase = _damage(folder, case)
    damaged = snapshot(folder)
    out = tmp_path / "head"
    capsys.readouterr()
    assert train(folder, out, "--epochs", "1") == 2
    line = one_error_line(capsys)
    assert str(folder / name) in line and phrase in line, line
    assert snapshot(folder) == damaged  # the cache is only read
    assert not (out / "best.pt").exists() and not list(out.glob(".staging-*"))
    shutil.rmtree(folder)
    shutil.copytree(cache, folder)  # re-extracted
    assert train(folder, out, "--epochs", "1") == 0


@pytest.mark.parametrize("split, row, value, stream", [
    ("train", 7, np.nan, False), ("val", 3, np.inf, False), ("train", 11, -np.inf, True), ("val", 0, np.nan, True),
])
def test_nan_or_inf_features_name_the_file_and_row(cache, tmp_path, capsys, split, row, value, stream):
    folder = tmp_path / "feats"
    shutil.copytree(cache, folder)
    with h5py.File(folder / f"{split}.h5", "a") as f:
        f["features"][row, 5] = value
    out = tmp_path / "head"
    capsys.readouterr()
    assert train(folder, out, "--epochs", "1", *(["--stream"] if stream else [])) == 2
    line = one_error_line(capsys)
    assert str(folder / f"{split}.h5") in line and f"row {row}" in line and "NaN or Inf" in line, line
    assert "top-1" not in line and "--lr" not in line  # neither scored nor blamed on the learning rate
    assert not (out / "best.pt").exists()


def test_nan_found_with_no_standardize_while_streaming(cache, tmp_path, capsys):
    folder = tmp_path / "feats"
    shutil.copytree(cache, folder)
    with h5py.File(folder / "train.h5", "a") as f:
        f["features"][40, 0] = np.nan
    assert train(folder, tmp_path / "head", "--epochs", "1", "--stream", "--no-standardize") == 2
    assert "row 40" in one_error_line(capsys)


def test_training_while_the_cache_is_being_extracted_says_so(cache, tmp_path, capsys):
    folder = tmp_path / "feats"
    shutil.copytree(cache, folder)
    (folder / "val.h5").unlink()  # not written yet
    with exclusive_writer(folder):
        assert train(folder, tmp_path / "head", "--epochs", "1") == 2
        line = one_error_line(capsys)
        assert "an extraction" in line and "wait for it" in line and "interrupted" not in line
    shutil.copy(cache / "val.h5", folder / "val.h5")  # the extraction finished
    assert train(folder, tmp_path / "head", "--epochs", "1") == 0


# ---------------------------------------------------------------------------------------------
# A head with NaN weights


def test_a_head_with_nan_weights_is_never_saved(old_run, tmp_path):
    out, _ = old_run
    checkpoint = torch.load(out / "best.pt", weights_only=True)
    checkpoint["head"]["weight"][1, 2] = float("nan")
    with pytest.raises(UserError, match="NaN or Inf"):
        checkpoint_module.save_checkpoint(checkpoint, tmp_path / "never.pt")
    assert not (tmp_path / "never.pt").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_head_with_a_nan_or_inf_metric_is_never_saved(old_run, tmp_path, value):
    """What read_checkpoint would refuse is never written: a diverged val loss is one line, and no file."""
    out, _ = old_run
    checkpoint = torch.load(out / "best.pt", weights_only=True)
    checkpoint["metrics"]["val_loss"] = value
    with pytest.raises(UserError, match="NaN or Inf val_loss"):
        checkpoint_module.save_checkpoint(checkpoint, tmp_path / "never.pt")
    assert not (tmp_path / "never.pt").exists()
