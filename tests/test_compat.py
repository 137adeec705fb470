"""Files a user already has keep working: a cache and a head checkpoint made by an earlier main.

The fixtures under tests/data/compat/ were made once by main at 0ae642e (see their README) and are never
regenerated: every later change must still read them, train on them and run live from them.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import run_train_head
import run_webcam
from features.cache import open_split
from tests.helpers import CPU_ARGS

COMPAT = Path(__file__).parent / "data" / "compat"


def _digests() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(COMPAT.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """Copies of the fixtures (a run may take a lock file beside a cache); the originals are checked after."""
    before = _digests()
    root = tmp_path_factory.mktemp("compat")
    features = root / "features"
    features.mkdir()
    for name in ("train.h5", "val.h5"):
        shutil.copy2(COMPAT / name, features / name)
    shutil.copy2(COMPAT / "best.pt", root / "best.pt")
    yield {"root": root, "features": features, "best": root / "best.pt"}
    assert _digests() == before, "a test changed the committed compat fixtures"


def test_the_old_cache_reads(copies):
    train, val = open_split(copies["features"] / "train.h5"), open_split(copies["features"] / "val.h5")
    assert (train.num_rows, val.num_rows) == (12, 6)
    assert train.read_features().shape == (12, 4096)
    assert [int(label) for label in val.labels] == [0, 0, 1, 1, 2, 2]
    assert list(val.wnids) == ["n01443537", "n02002724", "n02231487"] and list(train.wnids) == list(val.wnids)
    assert list(val.names) == ["goldfish", "black stork", "walking stick"]


@pytest.mark.parametrize("head", ["linear", "logreg", "knn"])
def test_the_old_cache_trains_every_head(copies, head):
    out = copies["root"] / f"head-{head}"
    assert run_train_head.main([*CPU_ARGS, "--features", str(copies["features"]), "--out", str(out), "--head", head,
                                "--epochs", "1", "--no-progress"]) == 0
    assert (out / "run.json").is_file()


def test_the_old_checkpoint_runs_live_with_the_cached_answers(copies):
    """Live on the old checkpoint: the same rebuilt backbone (recorded weights spec and preprocessing) gives
    softmax(head(cached fc7)) for each val image."""
    predictions = copies["root"] / "preds.jsonl"
    assert run_webcam.main([*CPU_ARGS, "--checkpoint", str(copies["best"]), "--source", str(COMPAT / "val_images"),
                            "--no-display", "--predictions", str(predictions), "--top-k", "3"]) == 0
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(lines) == 6
    checkpoint = torch.load(copies["best"], map_location="cpu", weights_only=True)
    val = open_split(copies["features"] / "val.h5")
    fc7 = torch.from_numpy(val.read_features()).float()
    cached = torch.softmax(fc7 @ checkpoint["head"]["weight"].T + checkpoint["head"]["bias"], dim=1).numpy()
    names = list(val.names)
    for line, probs in zip(sorted(lines, key=lambda item: item["source"]), cached):
        top = line["topk"][0]
        assert top["name"] == names[int(np.argmax(probs))]
        assert top["prob"] == pytest.approx(float(probs.max()), abs=2e-3)  # the cache stores float16
