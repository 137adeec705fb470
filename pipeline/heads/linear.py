"""The linear head: the SGD seed recipe, a 4096 -> C linear layer trained on cached features. Images are never read.

The features are loaded once as one tensor (on the GPU when asked and it fits) and batches are
indexed from it; a cache larger than memory is streamed block by block instead (pipeline.heads.readers,
which also checks the cache). By default the features are z-scored with train-set statistics, which
are folded into the saved layer, so the checkpoint's head is one ``nn.Linear(4096, C)`` that takes raw
fc7 activations. ``fit`` is this head's entry point (pipeline.heads.interface): one head per (lr, weight
decay), returned as a ``LinearResult``; pipeline.heads.publish writes their folders, a sweep's table and its best.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models import LinearHead
from pipeline.common.checkpoint import load_head
from pipeline.common.config import LINEAR_WEIGHT_DECAY, HeadConfig
from pipeline.common.errors import UserError
from pipeline.heads.interface import HeadResult, HeadSettings, Predictions
from pipeline.heads.naming import folder_name
from pipeline.heads.readers import FeatureReader, FeatureSource
from pipeline.heads.standardize import Standardizer

log = logging.getLogger(__name__)

_DEFAULTS = HeadConfig()
REPORT_BATCH = 1024  # val rows per batch when the saved head is scored for its report


@dataclass(frozen=True)
class Recipe:
    """How one head is trained: SGD with momentum on cross-entropy. The defaults are HeadConfig's (the seed
    recipe), not written again here."""

    lr: float = _DEFAULTS.lr[0]
    weight_decay: float = LINEAR_WEIGHT_DECAY[0]
    momentum: float = _DEFAULTS.momentum
    epochs: int = _DEFAULTS.epochs
    batch_size: int = _DEFAULTS.batch_size
    val_batch_size: int = _DEFAULTS.val_batch_size
    seed: int = _DEFAULTS.seed  # the head's init and every epoch's batch order

    @classmethod
    def from_config(cls, config: HeadConfig, lr: float, weight_decay: float) -> "Recipe":
        return cls(lr=lr, weight_decay=weight_decay, momentum=config.momentum, epochs=config.epochs,
                   batch_size=config.batch_size, val_batch_size=config.val_batch_size, seed=config.seed)


@dataclass(frozen=True)
class Snapshot:
    """The head after one epoch: its state on raw features (the standardization folded in) and the epoch's record."""

    state: dict[str, torch.Tensor]  # {"weight": (C, D), "bias": (C,)}
    metrics: dict  # epoch, train_loss, train_acc, val_loss, val_top1, val_top5, train_seconds, seconds


@dataclass(frozen=True)
class FitResult:
    """One head's training: its best epoch (the first of the best val top-1), its last, and every epoch's record."""

    best: Snapshot
    last: Snapshot
    history: tuple[dict, ...]


@dataclass(frozen=True)
class LinearFit:
    """One trained head of a run: one (lr, weight decay)."""

    recipe: Recipe
    trained: FitResult
    predictions: Predictions  # of the saved (folded) best head on val, as a user will load it
    seconds: float  # its training and scoring

    @property
    def best_top1(self) -> float:
        return self.trained.best.metrics["val_top1"]


@dataclass(frozen=True, kw_only=True)
class LinearResult(HeadResult):
    """Every head of a linear run, in the order of ``combos``; standardized once for all of them."""

    fits: tuple[LinearFit, ...]
    loading_seconds: float  # loading the features and their standardization, shared by the fits


@torch.inference_mode()
def evaluate(head: nn.Module, source: FeatureSource, standardize: Standardizer, batch_size: int,
             device: torch.device, *, keep_predictions: bool = False) -> dict:
    """Val loss, top-1 and top-5 (in %); with keep_predictions also the top-1 class of every row."""
    head.eval()
    zero = torch.zeros((), device=device)
    loss_sum, top1, top5, predictions = zero.clone(), zero.clone(), zero.clone(), []
    for x, y in source.batches(batch_size, None):
        x, y = standardize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        logits = head(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")  # summed on the device: no sync per batch
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        top1 += (ranked[:, 0] == y).sum()
        top5 += (ranked == y[:, None]).any(1).sum()
        if keep_predictions:
            predictions.append(ranked[:, 0].cpu())
    loss_sum, top1, top5 = loss_sum.item(), top1.item(), top5.item()
    n = source.num_rows
    metrics = {"val_loss": loss_sum / n, "val_top1": 100.0 * top1 / n, "val_top5": 100.0 * top5 / n}
    if keep_predictions:
        metrics["predictions"] = torch.cat(predictions).numpy()
    return metrics


def fit_head(train: FeatureSource, val: FeatureSource, recipe: Recipe, standardizer: Standardizer, *,
             num_classes: int, device: torch.device, on_epoch: Callable[[dict], None] | None = None,
             progress: bool = True) -> FitResult:
    """Train one head with SGD + cross-entropy on standardized features; the states kept are folded.
    ``on_epoch`` gets each epoch's record as it ends.

    Deterministic on the CPU for a given seed: the head's init and every epoch's batch order come from it.
    """
    torch.manual_seed(recipe.seed)
    head = LinearHead(num_classes, len(standardizer.mean)).to(device)
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.SGD(head.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    epochs, batch_size = recipe.epochs, recipe.batch_size
    history, best = [], None
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        head.train()
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
        batches = tqdm(train.batches(batch_size, generator), total=math.ceil(train.num_rows / batch_size),
                       desc=f"epoch {epoch}/{epochs}", unit="batch", leave=False, disable=not progress)
        for x, y in batches:
            x, y = standardizer(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            logits = head(x)  # (B, C)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)  # no .item() here: it would sync the GPU every step
            correct += (logits.detach().argmax(1) == y).sum()
        train_seconds = time.perf_counter() - start
        if not math.isfinite(loss_sum.item()):
            also = f" or --weight-decay (now {recipe.weight_decay:g})" if recipe.weight_decay else ""
            raise UserError(f"training diverged at epoch {epoch} (loss is {loss_sum.item()}); "
                            f"lower --lr (now {recipe.lr:g}){also}")
        record = {"epoch": epoch, "train_loss": loss_sum.item() / train.num_rows,
                  "train_acc": 100.0 * correct.item() / train.num_rows,
                  **evaluate(head, val, standardizer, recipe.val_batch_size, device),
                  "train_seconds": round(train_seconds, 3), "seconds": round(time.perf_counter() - start, 3)}
        history.append(record)
        state = standardizer.fold_into(head)
        if best is None or record["val_top1"] > best.metrics["val_top1"]:
            best = Snapshot(state, record)
        if on_epoch:
            on_epoch(record)
    return FitResult(best=best, last=Snapshot(state, history[-1]), history=tuple(history))


# ---------------------------------------------------------------------------------------------
# The head's entry point


def combos(config: HeadConfig) -> list[tuple[float, float]]:
    """Every (lr, weight decay) of ``config``: one head each."""
    return list(itertools.product(config.lr, config.weight_decays(LINEAR_WEIGHT_DECAY)))


def fit(train: FeatureReader, val: FeatureReader, settings: HeadSettings) -> LinearResult:
    """Train one head per (lr, weight decay) on features standardized once; each is scored as it is saved."""
    config, device = settings.config, settings.device
    start = time.perf_counter()
    train_source = train.source(device, config.stream, config.progress)
    val_source = val.source(device, config.stream, config.progress)
    standardizer = (Standardizer.fit(train_source, device) if config.standardize
                    else Standardizer.identity(train.split.feature_dim, device))
    loading_seconds = time.perf_counter() - start
    fits = tuple(_fit_one(train_source, val_source, standardizer, Recipe.from_config(config, lr, weight_decay),
                          num_classes=len(train.split.wnids), device=device, progress=config.progress)
                 for lr, weight_decay in combos(config))
    return LinearResult(fits=fits, loading_seconds=loading_seconds, train_images=train.num_rows,
                        seconds=time.perf_counter() - start)


def _fit_one(train: FeatureSource, val: FeatureSource, standardizer: Standardizer, recipe: Recipe, *,
             num_classes: int, device: torch.device, progress: bool) -> LinearFit:
    """Train one head, then score its saved (folded) best state on val for the report."""
    start = time.perf_counter()
    trained = fit_head(train, val, recipe, standardizer, num_classes=num_classes, device=device,
                       on_epoch=_epoch_logger(folder_name(lr=recipe.lr, weight_decay=recipe.weight_decay), recipe.epochs),
                       progress=progress)
    dim = len(standardizer.mean)
    head = load_head({"feature_dim": dim, "num_classes": num_classes, "head": trained.best.state}).to(device)
    scored = evaluate(head, val, Standardizer.identity(dim, device), REPORT_BATCH, device, keep_predictions=True)
    predictions = Predictions(scored["predictions"], scored["val_top1"], scored["val_top5"])
    return LinearFit(recipe=recipe, trained=trained, predictions=predictions, seconds=time.perf_counter() - start)


def _epoch_logger(name: str, epochs: int) -> Callable[[dict], None]:
    def log_epoch(metrics: dict) -> None:
        log.info("[%s] epoch %2d/%d  train loss %.4f acc %5.2f%%  val loss %.4f top1 %5.2f%% top5 %5.2f%%  %.2fs",
                 name, metrics["epoch"], epochs, metrics["train_loss"], metrics["train_acc"],
                 metrics["val_loss"], metrics["val_top1"], metrics["val_top5"], metrics["seconds"])
    return log_epoch
