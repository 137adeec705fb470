"""The linear head: the SGD seed recipe, a 4096 -> C linear layer trained on cached features. Images are never read.

The features are loaded once as one tensor (on the GPU when asked and it fits) and batches are
indexed from it; a cache larger than memory is streamed block by block instead (pipeline.heads.readers,
which also checks the cache). By default the features are z-scored with train-set statistics, which
are folded into the saved layer, so the checkpoint's head is one ``nn.Linear(4096, C)`` that takes raw
fc7 activations. Every (lr, weight decay) is trained in one pass over the rows (pipeline.heads.solvers.sgd).

``fit`` is this head's entry point (pipeline.heads.interface), returning a ``LinearResult``:

- ``--select val`` (the seed recipe's plain head, by default): each (lr, weight decay) trained ``--epochs``
  epochs, its best epoch by val top-1 kept, as the mission describes it: its val figure is optimistic;
- ``--select train-split`` (a sweep, by default): every (lr, weight decay) is trained on the fit rows and scored
  on the held-out rows after each epoch (pipeline.heads.selection); the best (lr, weight decay, epoch count) by
  held-out top-1 is refit on all train rows for that many epochs, and val is evaluated once.

pipeline.heads.publish writes their folders, a sweep's table and its best.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.common.checkpoint import load_head
from pipeline.common.config import LINEAR_WEIGHT_DECAY, HeadConfig
from pipeline.heads.interface import HeadResult, HeadSettings, Predictions
from pipeline.heads.naming import folder_name
from pipeline.heads.readers import FeatureReader, FeatureSource
from pipeline.heads.selection import held_out
from pipeline.heads.solvers.sgd import FitResult, Recipe, Snapshot, fit_heads
from pipeline.heads.standardize import Standardizer

log = logging.getLogger(__name__)

REPORT_BATCH = 1024  # val rows per batch when the saved head is scored for its report


@dataclass(frozen=True)
class LinearFit:
    """One trained head of a run: one (lr, weight decay); with train-split, the refit of the chosen one."""

    recipe: Recipe
    trained: FitResult
    predictions: Predictions  # of the saved (folded) best head on val, as a user will load it
    seconds: float  # its share of the pass, and its scoring

    @property
    def best_top1(self) -> float:
        return self.trained.best.metrics["val_top1"]


@dataclass(frozen=True)
class Candidate:
    """train-split: one (lr, weight decay) trained on the fit rows, scored on the held-out rows after each epoch."""

    recipe: Recipe
    trained: FitResult  # best: the first epoch of the best held-out top-1

    @property
    def held_top1(self) -> float:
        return self.trained.best.metrics["held_top1"]

    @property
    def epochs(self) -> int:
        return self.trained.best.metrics["epoch"]


@dataclass(frozen=True, kw_only=True)
class LinearResult(HeadResult):
    """Every head of a linear run (val), or the chosen one refit on all rows (train-split); standardized once."""

    fits: tuple[LinearFit, ...]  # val: one per (lr, weight decay), in the order of ``combos``; train-split: the refit
    loading_seconds: float  # loading the features and their standardization, shared by the fits
    selected_by: str  # "val" or "train-split"
    candidates: tuple[Candidate, ...] = ()  # train-split: every (lr, weight decay), in the order of ``combos``
    chosen: int | None = None  # train-split: the index of the chosen candidate (the first of the best)
    held_images: int = 0  # train-split: the held-out rows


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


def fit_head(train: FeatureSource, val: FeatureSource | None, recipe: Recipe, standardizer: Standardizer, *,
             num_classes: int, device: torch.device, on_epoch: Callable[[dict], None] | None = None,
             progress: bool = True) -> FitResult:
    """Train one head with SGD + cross-entropy on standardized features; the states kept are folded.
    ``on_epoch`` gets each epoch's record as it ends. Deterministic on the CPU for a given seed."""
    return fit_heads(train, val, [recipe], standardizer, num_classes=num_classes, device=device,
                     on_epoch=on_epoch and (lambda head, record: on_epoch(record)), progress=progress)[0]


# ---------------------------------------------------------------------------------------------
# The head's entry point


def combos(config: HeadConfig) -> list[tuple[float, float]]:
    """Every (lr, weight decay) of ``config``: one head each."""
    return list(itertools.product(config.lr, config.weight_decays(LINEAR_WEIGHT_DECAY)))


def fit(train: FeatureReader, val: FeatureReader, settings: HeadSettings) -> LinearResult:
    """Every (lr, weight decay) in one pass, chosen on val or on held-out train rows (then refit); see the module."""
    config, device = settings.config, settings.device
    start = time.perf_counter()
    recipes = [Recipe.from_config(config, lr, weight_decay) for lr, weight_decay in combos(config)]
    num_classes = len(train.split.wnids)
    val_source = val.source(device, config.stream, config.progress)
    if config.select_for("linear") == "val":
        train_source = train.source(device, config.stream, config.progress)
        standardizer = _standardizer(train_source, train, config, device)
        loading_seconds = time.perf_counter() - start
        fits = _fit_on_val(train_source, val_source, val.labels, standardizer, recipes, num_classes, device,
                           config.progress)
        return LinearResult(fits=fits, loading_seconds=loading_seconds, selected_by="val", train_images=train.num_rows,
                            seconds=time.perf_counter() - start)
    selection = held_out(train.paths, train.labels, config.select_fraction, train.split.wnids)
    whole, fit_rows, held_rows = train.parts(device, config.stream, config.progress, selection)
    standardizer = _standardizer(whole, train, config, device)
    loading_seconds = time.perf_counter() - start
    trained = fit_heads(fit_rows, held_rows, recipes, standardizer, num_classes=num_classes, device=device,
                        scored_on="held", on_epoch=_epoch_logger(recipes), progress=config.progress)
    candidates = tuple(Candidate(recipe, result) for recipe, result in zip(recipes, trained))
    chosen = max(range(len(candidates)), key=lambda index: candidates[index].held_top1)  # max: the first of equals
    recipe = replace(recipes[chosen], epochs=candidates[chosen].epochs)
    log.info("linear: chose %s and %d epochs on %d held-out train rows (top-1 %.2f%%); refitting on all %d",
             folder_name(lr=recipe.lr, weight_decay=recipe.weight_decay), recipe.epochs, len(selection.held),
             candidates[chosen].held_top1, train.num_rows)
    refit_start = time.perf_counter()
    refit = fit_heads(whole, None, [recipe], standardizer, num_classes=num_classes, device=device,
                      on_epoch=_epoch_logger([recipe], "refit "), progress=config.progress)[0]
    scored, predictions = _score_saved(refit.last.state, val_source, val.labels, num_classes, device)
    final = Snapshot(refit.last.state, {**refit.last.metrics, **scored})  # val, evaluated once
    fit_one = LinearFit(recipe=recipe, trained=FitResult(best=final, last=final, history=refit.history),
                        predictions=predictions, seconds=time.perf_counter() - refit_start)
    return LinearResult(fits=(fit_one,), loading_seconds=loading_seconds, selected_by="train-split",
                        candidates=candidates, chosen=chosen, held_images=len(selection.held),
                        train_images=train.num_rows, seconds=time.perf_counter() - start)


def _standardizer(source: FeatureSource, train: FeatureReader, config: HeadConfig, device) -> Standardizer:
    """Train statistics (every train row, held-out ones too: they are labels-free), or none (--no-standardize)."""
    return (Standardizer.fit(source, device) if config.standardize
            else Standardizer.identity(train.split.feature_dim, device))


def _fit_on_val(train: FeatureSource, val: FeatureSource, labels: np.ndarray, standardizer: Standardizer,
                recipes: list[Recipe], num_classes: int, device: torch.device, progress: bool) -> tuple[LinearFit, ...]:
    """Every head in one pass, scored on val after each epoch; each one's best epoch then scored as it is saved."""
    start = time.perf_counter()
    trained = fit_heads(train, val, recipes, standardizer, num_classes=num_classes, device=device,
                        on_epoch=_epoch_logger(recipes), progress=progress)
    share = (time.perf_counter() - start) / len(recipes)
    fits = []
    for recipe, result in zip(recipes, trained):
        scoring = time.perf_counter()
        _, predictions = _score_saved(result.best.state, val, labels, num_classes, device)
        fits.append(LinearFit(recipe=recipe, trained=result, predictions=predictions,
                              seconds=share + time.perf_counter() - scoring))
    return tuple(fits)


def _score_saved(state: dict, val: FeatureSource, labels: np.ndarray, num_classes: int,
                 device) -> tuple[dict, Predictions]:
    """The folded head, as a user will load it, on val (``labels``: its rows' labels, in file order): its loss,
    top-1 and top-5, and its predictions."""
    dim = state["weight"].shape[1]
    head = load_head({"feature_dim": dim, "num_classes": num_classes, "head": state}).to(device)
    scored = evaluate(head, val, Standardizer.identity(dim, device), REPORT_BATCH, device, keep_predictions=True)
    return scored, Predictions.of(scored.pop("predictions"), labels, scored["val_top1"], scored["val_top5"])


def _epoch_logger(recipes: list[Recipe], prefix: str = "") -> Callable[[int, dict], None]:
    names = [prefix + folder_name(lr=recipe.lr, weight_decay=recipe.weight_decay) for recipe in recipes]

    def log_epoch(head: int, metrics: dict) -> None:
        scored = next((key[:-5] for key in metrics if key.endswith("_top1")), None)
        score = (f"  {scored} loss {metrics[scored + '_loss']:.4f} top1 {metrics[scored + '_top1']:5.2f}% "
                 f"top5 {metrics[scored + '_top5']:5.2f}%") if scored else ""
        # extra: the same facts as data (record.head_epoch), for a watcher that must not depend on the wording
        log.info("[%s] epoch %2d/%d  train loss %.4f acc %5.2f%%%s  %.2fs", names[head], metrics["epoch"],
                 recipes[head].epochs, metrics["train_loss"], metrics["train_acc"], score, metrics["seconds"],
                 extra={"head_epoch": {"run": names[head], "epochs": recipes[head].epochs, "scored_on": scored,
                                       **metrics}})
    return log_epoch
