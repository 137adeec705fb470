"""The linear head: the SGD seed recipe, a 4096 -> C linear layer trained on cached features. Images are never read.

The features are loaded once as one tensor (on the GPU when asked and it fits) and batches are
indexed from it; a cache larger than memory is streamed block by block instead (pipeline.heads.readers,
which also checks the cache). By default the features are z-scored with train-set statistics, which
are folded into the saved layer, so the checkpoint's head is one ``nn.Linear(4096, C)`` that takes raw
fc7 activations. ``fit`` is this head's entry point (pipeline.heads.interface): one head per (lr, weight
decay), each in its own folder when there are several (a sweep), with a sweep table and the best copied up.
"""
from __future__ import annotations

import csv
import itertools
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from features.cache import CachedSplit
from models import LinearHead
from pipeline.heads import report
from pipeline.common.checkpoint import load_head, make_checkpoint, save_checkpoint
from pipeline.common.config import LINEAR_WEIGHT_DECAY, HeadConfig
from pipeline.common.errors import UserError
from pipeline.heads.interface import HeadOutcome, HeadSettings
from pipeline.heads.naming import folder_name, number, shots_name
from pipeline.heads.readers import FeatureReader, FeatureSource
from pipeline.heads.staging import append_csv, config_record, layer_attrs, writing, write_config
from pipeline.heads.rows import Experiment
from pipeline.heads.standardize import Standardizer

log = logging.getLogger(__name__)

_DEFAULTS = HeadConfig()


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


@dataclass
class FitResult:
    best: dict  # {"state": head state on raw features, "metrics": the epoch's record}
    last: dict
    history: list[dict]


@dataclass
class HeadRun:
    """One trained head of a run (a sweep has several)."""

    name: str
    lr: float
    weight_decay: float
    folder: Path
    best_epoch: int
    best_val_top1: float
    best_val_top5: float
    best_val_loss: float
    last_val_top1: float
    epoch_seconds: float
    history: list[dict]
    seconds: float = 0.0  # wall time of its training and files


# ---------------------------------------------------------------------------------------------
# Training


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
             num_classes: int, device: torch.device, on_epoch=None, progress: bool = True) -> FitResult:
    """Train one head with SGD + cross-entropy on standardized features; the saved states are folded.

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
        if best is None or record["val_top1"] > best["metrics"]["val_top1"]:
            best = {"state": state, "metrics": record}
        if on_epoch:
            on_epoch(record, state, best)
    return FitResult(best=best, last={"state": state, "metrics": history[-1]}, history=history)


# ---------------------------------------------------------------------------------------------
# The head's entry point: one head per (lr, weight decay), its files, a sweep's table

FILES = ("config.json", "history.csv", "best.pt", "last.pt", "accuracy.png", "loss.png", "per_class.csv",
         "confusions.csv", "report.md", "sweep.csv", "sweep.png")


@dataclass
class LoadedFeatures:
    """What every head of a sweep shares: the feature sources and the standardization, computed once."""

    train: FeatureSource
    val: FeatureSource
    train_split: CachedSplit
    val_split: CachedSplit
    standardizer: Standardizer
    seconds: float  # loading and standardization


@dataclass
class LinearRun:
    """One head of a sweep: its recipe, where it writes and how it is named."""

    recipe: Recipe
    config: HeadConfig  # what its config.json records
    folder: Path
    name: str
    title: str | None  # the plots' title (a sweep's head name)


def _combos(config: HeadConfig) -> list[tuple[float, float]]:
    return list(itertools.product(config.lr, config.weight_decays(LINEAR_WEIGHT_DECAY)))


def folders(settings: HeadSettings) -> list[str]:
    """A grid: one combination folder per (lr, weight decay); alone: a sweep's head folders (none for one head)."""
    combos = _combos(settings.config)
    if settings.grid:
        return [settings.folder(lr=lr, weight_decay=wd).name for lr, wd in combos]
    return [folder_name(lr=lr, weight_decay=wd) for lr, wd in combos] if len(combos) > 1 else []


def fit(train: FeatureReader, val: FeatureReader, settings: HeadSettings) -> HeadOutcome:
    """Train one head per (lr, weight decay): alone, into the run folder (a sweep: one folder each, plus
    sweep.csv/.png and the best head's best.pt); in a grid, each into its own combination folder."""
    config, device = settings.config, settings.device
    if settings.shots is not None and not settings.notes:
        settings = replace(settings, notes=[f"Trained on {settings.drawn(train.num_rows)}; val untouched."])
    start = time.perf_counter()
    sources = (train.source(device, config.stream, config.progress), val.source(device, config.stream, config.progress))
    standardizer = (Standardizer.fit(sources[0], device) if config.standardize
                    else Standardizer.identity(train.split.feature_dim, device))
    combos = _combos(config)
    data = LoadedFeatures(*sources, train.split, val.split, standardizer, time.perf_counter() - start)
    if settings.grid:
        groups = [(replace(config, out=settings.title(settings.folder(lr=lr, weight_decay=wd)), lr=(lr,),
                           weight_decay=(wd,)), settings.folder(lr=lr, weight_decay=wd)) for lr, wd in combos]
    else:
        groups = [(config, settings.root)]
    rows, runs = [], []
    for group_config, folder in groups:
        group_runs = _sweep(settings, data, group_config, folder)
        runs += group_runs
        rows += [Experiment(layer=settings.layer, head=settings.name, params=f"lr={number(run.lr)} wd="
                            f"{number(run.weight_decay)}, epoch {run.best_epoch}/{config.epochs}",
                            shots=shots_name(settings.shots), val_top1=run.best_val_top1,
                            val_top5=run.best_val_top5, train_images=train.num_rows,
                            seconds=run.seconds + data.seconds / len(combos), folder=run.folder,
                            checkpoint=run.folder / "best.pt") for run in group_runs]
    runs.sort(key=lambda r: -r.best_val_top1)
    best = max(rows, key=lambda r: r.val_top1)  # max: the first of equals
    return HeadOutcome(rows=rows, names=[r.name for r in runs], best=best, best_name=runs[0].name, runs=runs)


def _sweep(settings: HeadSettings, data: LoadedFeatures, config: HeadConfig, folder: Path) -> list[HeadRun]:
    """Every (lr, weight decay) of ``config`` into ``folder`` (one: the folder itself); best first."""
    combos = _combos(config)
    sweep = len(combos) > 1
    runs = []
    for lr, weight_decay in combos:
        name = folder_name(lr=lr, weight_decay=weight_decay) if sweep else settings.title(folder).name
        run = LinearRun(recipe=Recipe.from_config(config, lr, weight_decay), config=config,
                        folder=folder / name if sweep else folder, name=name, title=name if sweep else None)
        runs.append(_train_one(settings, data, run))
    runs.sort(key=lambda r: -r.best_val_top1)
    if sweep:
        with writing(settings.stage, folder / "best.pt"):
            shutil.copyfile(runs[0].folder / "best.pt", folder / "best.pt")
        with writing(settings.stage, folder / "sweep.csv"):
            _write_table(folder / "sweep.csv", runs)
            report.plot_sweep([(r.name, r.history, r.best_val_top1) for r in runs], folder)
    return runs


def _train_one(settings: HeadSettings, data: LoadedFeatures, run: LinearRun) -> HeadRun:
    """Train one head and write its (staged) folder: config.json, history.csv, best.pt, last.pt, plots, report."""
    start = time.perf_counter()
    stage, recipe, folder, device = settings.stage, run.recipe, run.folder, settings.device
    # the checkpoint's config equals config.json's
    record = config_record(run.config, lr=recipe.lr, weight_decay=recipe.weight_decay, lrs=run.config.lr,
                           weight_decays=run.config.weight_decays(LINEAR_WEIGHT_DECAY), device=str(device),
                           features_weights=data.train_split.attrs["weights_spec"])
    write_config(stage, folder, record)
    history_path = folder / "history.csv"
    train_split, val_split = data.train_split, data.val_split

    def checkpoint(state: dict, metrics: dict) -> dict:
        return make_checkpoint(state, metrics=metrics, epoch=metrics["epoch"], cache_attrs=layer_attrs(train_split),
                               wnids=train_split.wnids, names=train_split.names, config=record)

    def on_epoch(metrics, state, best):
        with writing(stage, history_path):
            append_csv(history_path, metrics)
        log.info("[%s] epoch %2d/%d  train loss %.4f acc %5.2f%%  val loss %.4f top1 %5.2f%% top5 %5.2f%%  %.2fs",
                 run.name, metrics["epoch"], recipe.epochs, metrics["train_loss"], metrics["train_acc"],
                 metrics["val_loss"], metrics["val_top1"], metrics["val_top5"], metrics["seconds"])
        if best["metrics"] is metrics:
            with writing(stage, folder / "best.pt"):
                save_checkpoint(checkpoint(state, metrics), folder / "best.pt")

    result = fit_head(data.train, data.val, recipe, data.standardizer, num_classes=len(train_split.wnids),
                      device=device, on_epoch=on_epoch, progress=run.config.progress)
    with writing(stage, folder / "last.pt"):
        save_checkpoint(checkpoint(result.last["state"], result.last["metrics"]), folder / "last.pt")
    with writing(stage, folder / "accuracy.png"):
        report.plot_history(result.history, folder, title=run.title)
    best = result.best["metrics"]
    dim = len(data.standardizer.mean)
    head = load_head({"feature_dim": dim, "num_classes": len(train_split.wnids), "head": result.best["state"]}).to(device)
    metrics = evaluate(head, data.val, Standardizer.identity(dim, device), 1024, device,
                       keep_predictions=True)  # the saved (folded) head, as a user will load it
    with writing(stage, folder / "report.md"):  # its title names the final folder, not the staging one
        report.write_class_report(folder, labels=val_split.labels, predictions=metrics.pop("predictions"),
                                  metrics=metrics, wnids=train_split.wnids, names=train_split.names,
                                  epoch=best["epoch"], weights_spec=train_split.attrs["weights_spec"],
                                  title=settings.title(folder), extra=settings.notes)
    return HeadRun(name=run.name, lr=recipe.lr, weight_decay=recipe.weight_decay, folder=folder,
                   best_epoch=best["epoch"], best_val_top1=best["val_top1"], best_val_top5=best["val_top5"],
                   best_val_loss=best["val_loss"], last_val_top1=result.last["metrics"]["val_top1"],
                   epoch_seconds=float(np.mean([h["train_seconds"] for h in result.history])),
                   history=result.history, seconds=time.perf_counter() - start)


def _write_table(path: Path, runs: list[HeadRun]) -> None:
    columns = ["name", "lr", "weight_decay", "best_val_top1", "best_val_top5", "best_epoch", "last_val_top1", "epoch_seconds"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(run) for run in runs)
