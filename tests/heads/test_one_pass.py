"""Many linear heads in one pass over the cache (pipeline.heads.solvers.sgd): each is the head trained alone with
the same seed, and the cache is read once per epoch for all of them, a block at a time."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from features.cache import open_split
from models import LinearHead
from pipeline.heads import readers
from pipeline.heads.linear import Recipe, evaluate
from pipeline.heads.readers import InMemoryFeatures, StreamedFeatures
from pipeline.heads.solvers.sgd import fit_heads
from pipeline.heads.standardize import Standardizer
from tests.helpers import write_synthetic_cache

CPU = torch.device("cpu")
GRID = [Recipe(lr=lr, weight_decay=wd, epochs=3, batch_size=10) for lr in (0.3, 0.1, 0.01, 0.001)
        for wd in (0.0, 1e-4, 1e-2)]  # 12 heads


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_synthetic_cache(tmp_path_factory.mktemp("cache") / "feats", classes=4, train_per_class=25,
                                 val_per_class=10, dim=48, signal=0.3)


def trained_alone(train, val, recipe: Recipe, standardizer: Standardizer, num_classes: int):
    """The seed recipe as one head trains it: nn.Linear and torch.optim.SGD, every epoch scored on val."""
    torch.manual_seed(recipe.seed)
    head = LinearHead(num_classes, len(standardizer.mean))
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.SGD(head.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    history = []
    for epoch in range(1, recipe.epochs + 1):
        loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.long)
        for x, y in train.batches(recipe.batch_size, generator):
            logits = head(standardizer(x))
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
        history.append({"epoch": epoch, "train_loss": loss_sum.item() / train.num_rows,
                        "train_acc": 100.0 * correct.item() / train.num_rows,
                        **evaluate(head, val, standardizer, recipe.val_batch_size, CPU)})
    return standardizer.fold_into(head), history


def assert_same_heads(together, sources, standardizer) -> None:
    train, val = sources
    for recipe, result in zip(GRID, together):
        state, history = trained_alone(train, val, recipe, standardizer, 4)
        for name in ("weight", "bias"):
            assert torch.allclose(result.last.state[name], state[name], rtol=0, atol=1e-6), (recipe, name)
        timeless = [{k: v for k, v in epoch.items() if "seconds" not in k} for epoch in result.history]
        assert timeless == history, recipe  # the same history, number for number


def test_a_grid_of_linear_heads_in_one_pass_equals_each_head_trained_alone(cache):
    train = InMemoryFeatures.load(open_split(cache / "train.h5"), CPU, progress=False)
    val = InMemoryFeatures.load(open_split(cache / "val.h5"), CPU, progress=False)
    standardizer = Standardizer.fit(train, CPU)
    together = fit_heads(train, val, GRID, standardizer, num_classes=4, device=CPU, progress=False)
    assert_same_heads(together, (train, val), standardizer)
    best = together[0].best.metrics  # each head keeps its own best epoch
    assert best["val_top1"] == max(epoch["val_top1"] for epoch in together[0].history)


def test_streamed_the_cache_is_read_once_per_epoch_for_every_head(cache, monkeypatch):
    """A block at a time (here 32 of 100 rows): the reads are those of one head, however many heads train."""
    reads = []
    real = StreamedFeatures._read
    monkeypatch.setattr(StreamedFeatures, "_read", lambda self, *args: reads.append(args[-1]) or real(self, *args))
    split = open_split(cache / "train.h5")
    train, val = StreamedFeatures(split, block_rows=32), InMemoryFeatures.load(open_split(cache / "val.h5"), CPU, False)
    standardizer = Standardizer.fit(InMemoryFeatures.load(split, CPU, progress=False), CPU)
    together = fit_heads(train, val, GRID, standardizer, num_classes=4, device=CPU, progress=False)
    epochs, blocks = GRID[0].epochs, -(-split.num_rows // 32)
    assert len(reads) == epochs * blocks and max(reads) <= readers.ROW_CHUNK  # one pass per epoch, block by block
    reads.clear()
    assert_same_heads(together, (train, val), standardizer)  # alone: the same batches from the same blocks
    assert len(reads) == len(GRID) * epochs * blocks
