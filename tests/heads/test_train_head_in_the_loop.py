"""The cache changes nothing but speed: a linear head trained on the cached fc7 equals one trained with the
frozen backbone in the loop (same seed, same batch order). (Split from test_train_head.py.)
"""
from __future__ import annotations

import json

import pytest
import torch

from features.cache import open_split
from models import LinearHead
from pipeline.datasets.dataset import index_dataset
from pipeline.datasets.images import read_rgb
from pipeline.common.preprocess import Preprocess
from pipeline.heads import linear as train_head
from pipeline.heads.linear import Recipe, fit_head
from pipeline.heads.readers import InMemoryFeatures, batch_order
from pipeline.heads.standardize import Standardizer
from tests.helpers import random_backbone
from tests.heads.test_train_head import CPU_DEVICE, data, feats  # noqa: F401 (fixtures)


class BackboneInTheLoop:
    """A FeatureSource that reads and decodes the images and runs the frozen backbone for every batch."""

    def __init__(self, dataset, split: str, backbone, preprocess: Preprocess):
        self.root, self.paths = dataset.root, dataset.splits[split].paths
        self.labels = torch.tensor(dataset.splits[split].labels, dtype=torch.int64)
        self.num_rows = len(self.paths)
        self.backbone, self.preprocess = backbone, preprocess
        self.images_read = 0

    def batches(self, batch_size, generator):
        for idx in batch_order(self.num_rows, batch_size, generator):
            images = [read_rgb(self.root / self.paths[i]) for i in idx.tolist()]
            self.images_read += len(images)
            with torch.inference_mode():
                fc7 = self.backbone(self.preprocess(images))["fc7"]
            yield fc7.clone(), self.labels[idx]


def unfold(state: dict, standardizer) -> tuple[torch.Tensor, torch.Tensor]:
    """A saved (folded) head back in the standardized space it was trained in."""
    return state["weight"] / standardizer.inv_std, state["bias"] + state["weight"] @ standardizer.mean


@pytest.fixture(scope="module")
def live_backbone():
    backbone = random_backbone(layers=("fc7",))  # what --weights random --seed 0 extracted with
    return backbone.module.to(memory_format=torch.channels_last), backbone.fingerprint  # channels_last, like extraction


@pytest.mark.parametrize("standardize", [True, False])
def test_cached_features_train_the_same_head_as_the_backbone_in_the_loop(data, feats, live_backbone, standardize):
    """The cache changes nothing but speed: same seed and batch order give the same head and accuracies."""
    train_split, val_split = open_split(feats / "train.h5"), open_split(feats / "val.h5")
    dataset = index_dataset(data)
    for split, cached in (("train", train_split), ("val", val_split)):
        assert cached.paths == dataset.splits[split].paths  # row i of the cache is image i of the index
        assert cached.labels.tolist() == dataset.splits[split].labels
    backbone, fingerprint = live_backbone
    assert fingerprint == train_split.attrs["weights_fingerprint"]  # the backbone the cache was made with
    preprocess = Preprocess.from_dict(json.loads(train_split.attrs["preprocess"]))
    live_train = BackboneInTheLoop(dataset, "train", backbone, preprocess)
    live_val = BackboneInTheLoop(dataset, "val", backbone, preprocess)
    cached_train = InMemoryFeatures.load(train_split, CPU_DEVICE, progress=False)
    cached_val = InMemoryFeatures.load(val_split, CPU_DEVICE, progress=False)

    # the features themselves agree (up to float32 rounding between batch compositions)
    live = torch.cat([x for x, _ in live_train.batches(18, None)])
    assert torch.allclose(live, cached_train.features, rtol=1e-5, atol=1e-6)

    recipe = Recipe(lr=0.01 if standardize else 0.1, weight_decay=1e-4, momentum=0.9, epochs=3, batch_size=6,
                    val_batch_size=9, seed=0)

    def fit(train_source, val_source):
        standardizer = (Standardizer.fit(train_source, CPU_DEVICE) if standardize
                        else Standardizer.identity(4096, CPU_DEVICE))
        fitted = fit_head(train_source, val_source, recipe, standardizer, num_classes=3, device=CPU_DEVICE,
                          progress=False)
        return {"best": fitted.best, "last": fitted.last, "history": fitted.history, "standardizer": standardizer}

    from_cache = fit(cached_train, cached_val)
    live_train.images_read = live_val.images_read = 0
    in_the_loop = fit(live_train, live_val)
    assert live_train.images_read == (3 + standardize) * 18 and live_val.images_read == 3 * 9  # really in the loop

    assert [h["val_top1"] for h in from_cache["history"]] == [h["val_top1"] for h in in_the_loop["history"]]
    assert [h["train_acc"] for h in from_cache["history"]] == [h["train_acc"] for h in in_the_loop["history"]]
    assert from_cache["best"].metrics["epoch"] == in_the_loop["best"].metrics["epoch"]
    # Same standardizer, and the same head in the space it was trained in. The folded weights are
    # W * inv_std, and units that are nearly dead on 18 images have a tiny std, so there the folded
    # weights are huge and carry the features' float32 rounding amplified: compare before folding.
    std_a, std_b = from_cache["standardizer"], in_the_loop["standardizer"]
    assert torch.allclose(std_a.mean, std_b.mean, rtol=1e-5, atol=1e-8)
    assert torch.allclose(std_a.inv_std, std_b.inv_std, rtol=1e-3)
    for which in ("best", "last"):
        a, b = from_cache[which].state, in_the_loop[which].state
        (wa, ba), (wb, bb) = unfold(a, std_a), unfold(b, std_b)
        assert torch.allclose(wa, wb, rtol=1e-4, atol=1e-5), which
        assert torch.allclose(ba, bb, rtol=1e-4, atol=1e-5), which
    # the heads really trained, so the comparison above is not of two barely moved heads
    if standardize:
        assert from_cache["history"][-1]["train_loss"] < 0.5 * from_cache["history"][0]["train_loss"]
    else:  # raw fc7 of a random backbone barely separates the classes, but the weights move
        torch.manual_seed(0)
        init = LinearHead(3, 4096).weight.detach()
        assert (from_cache["last"].state["weight"] - init).abs().max() > 1e-3
