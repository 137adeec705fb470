"""Integration checks on the real 10-class Tiny ImageNet subset, after `make run` (see .ci/run).

Skipped unless TINY_IMAGENET_MINI names the zip. FEATURES and HEAD name the folders that `make run`
wrote (default runs/ci/features and runs/ci/head, as in .ci/run).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms

import run_extract
import run_webcam
from features.cache import open_split
from pipeline.data.prepare import resolve_data
from pipeline.datasets.images import read_rgb
from pipeline.common.preprocess import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import CPU

MINI = os.environ.get("TINY_IMAGENET_MINI")
FEATURES = Path(os.environ.get("FEATURES", "runs/ci/features"))
HEAD = Path(os.environ.get("HEAD", "runs/ci/head"))

pytestmark = pytest.mark.skipif(not MINI or not Path(MINI).is_file(), reason="TINY_IMAGENET_MINI is not set")


@pytest.fixture(scope="module")
def root() -> Path:
    return resolve_data(MINI)


def test_prepare_only_reports_the_real_subset(tmp_path):
    summary_path = tmp_path / "prep.json"
    assert run_extract.main([*CPU, "--data", MINI, "--prepare-only", "--summary-json", str(summary_path), "--no-progress"]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["num_classes"] == 10
    assert summary["splits"]["train"]["images"] == 1000
    assert summary["splits"]["val"]["images"] == 500
    assert summary["skipped"] == []
    assert {"wnid": "n01443537", "name": "goldfish"} in summary["classes"]


def test_make_run_wrote_the_caches_and_a_rerun_is_up_to_date(caplog):
    train, val = open_split(FEATURES / "train.h5"), open_split(FEATURES / "val.h5")
    assert (train.num_rows, val.num_rows) == (1000, 500)
    assert train.attrs["weights_spec"] == "random:seed=0"
    mtime = (FEATURES / "train.h5").stat().st_mtime_ns
    caplog.set_level("INFO")
    assert run_extract.main([*CPU, "--data", MINI, "--weights", "random", "--out", str(FEATURES), "--no-progress"]) == 0
    assert "up to date" in caplog.text
    assert (FEATURES / "train.h5").stat().st_mtime_ns == mtime


def test_cached_features_match_the_plain_reference(root):
    """Fidelity on real images: a sample of val rows against PIL + torchvision transforms + seeded AlexNet."""
    val = open_split(FEATURES / "val.h5")
    rows = list(range(0, val.num_rows, 25))  # 20 images, 2 per class
    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    batch = torch.stack([transform(Image.open(root / val.paths[i]).convert("RGB")) for i in rows])
    torch.manual_seed(0)
    alexnet = torchvision.models.alexnet(weights=None).eval()
    fc7 = torch.nn.Sequential(alexnet.features, alexnet.avgpool, torch.nn.Flatten(), alexnet.classifier[:6])
    with torch.inference_mode():
        reference = fc7(batch)
    cached = torch.from_numpy(val.read_features()[rows])
    assert torch.nn.functional.cosine_similarity(cached, reference, dim=1).min() >= 0.9999


def test_make_run_wrote_the_head_outputs():
    for name in ("best.pt", "last.pt", "history.csv", "accuracy.png", "loss.png", "per_class.csv", "report.md"):
        assert (HEAD / name).is_file(), name
    checkpoint = torch.load(HEAD / "best.pt", map_location="cpu", weights_only=True)
    assert checkpoint["num_classes"] == 10 and checkpoint["class_names"][0] == "goldfish"


def test_video_of_val_images_matches_the_cache(root, tmp_path):
    """A video made of val images, run headless: every frame's top-1 equals the cached features' top-1."""
    val = open_split(FEATURES / "val.h5")
    checkpoint = torch.load(HEAD / "best.pt", map_location="cpu", weights_only=True)
    head = torch.nn.Linear(checkpoint["feature_dim"], checkpoint["num_classes"])
    head.load_state_dict(checkpoint["head"])
    rows = list(range(0, val.num_rows, 10))  # 50 frames, 5 per class
    with torch.inference_mode():
        expected = head(torch.from_numpy(val.read_features()[rows])).argmax(1).tolist()
    video = tmp_path / "val.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 10, (64, 64))  # lossless
    assert writer.isOpened()
    for i in rows:
        rgb = read_rgb(root / val.paths[i])  # decoded as extraction decodes it, so the pixels are the same
        writer.write(np.ascontiguousarray(rgb.permute(1, 2, 0).numpy()[:, :, ::-1]))
    writer.release()
    predictions = tmp_path / "preds.jsonl"
    assert run_webcam.main([*CPU, "--checkpoint", str(HEAD / "best.pt"), "--source", str(video), "--no-display",
                            "--predictions", str(predictions)]) == 0
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(lines) == len(rows)
    wnids = checkpoint["class_wnids"]
    assert [wnids.index(line["topk"][0]["wnid"]) for line in lines] == expected
