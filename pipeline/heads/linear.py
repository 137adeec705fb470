"""Stage two: train the 4096 -> C linear head on cached fc7 features. Images are never read here.

The features are loaded once as one tensor (on the GPU when asked and it fits) and batches are
indexed from it; a cache larger than memory is streamed block by block instead (pipeline.heads.readers,
which also checks the cache). By default the features are z-scored with train-set statistics, which
are folded into the saved layer, so the checkpoint's head is one ``nn.Linear(4096, C)`` that takes raw
fc7 activations. A run is written whole or not at all, by one process at a time (pipeline.common.run_folder).
"""
from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from features.cache import CachedSplit
from models import LinearHead
from pipeline.heads import report
from pipeline.common.backbone import resolve_device
from pipeline.common.checkpoint import load_head, make_checkpoint, save_checkpoint
from pipeline.common.config import HeadConfig
from pipeline.common.errors import UserError, first_line
from pipeline.heads.readers import (LOAD_ROWS, FeatureSource, InMemoryFeatures, StreamedFeatures,  # noqa: F401 (public here)
                                available_memory, batch_order, load_source, open_cache)
from pipeline.common.run_folder import StagedRun, exclusive_run

log = logging.getLogger(__name__)

STATS_ROWS = 4096  # rows per step when computing the standardization statistics
STD_FLOOR = 1e-6  # dead ReLU units have std 0: leave them unscaled


_DEFAULTS = HeadConfig()


@dataclass(frozen=True)
class Recipe:
    """How one head is trained: SGD with momentum on cross-entropy. The defaults are HeadConfig's (the seed
    recipe), not written again here."""

    lr: float = _DEFAULTS.lrs[0]
    weight_decay: float = _DEFAULTS.weight_decays[0]
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


@dataclass
class HeadResult:
    out: Path
    best: Path  # the best head's checkpoint
    runs: list[HeadRun]  # best first
    weights_spec: str


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class Standardizer:
    mean: torch.Tensor  # (D,)
    inv_std: torch.Tensor  # (D,)

    @classmethod
    def identity(cls, dim: int, device) -> "Standardizer":
        return cls(torch.zeros(dim, device=device), torch.ones(dim, device=device))

    @classmethod
    def fit(cls, source: FeatureSource, device) -> "Standardizer":
        """Mean and std over the whole train set, accumulated in float64."""
        total = sq = None
        for x, _ in source.batches(STATS_ROWS, None):  # small blocks: float64 copies stay ~100 MiB
            x = x.to(device, torch.float64)
            total = x.sum(0) if total is None else total + x.sum(0)
            sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
        mean = total / source.num_rows
        std = (sq / source.num_rows - mean * mean).clamp_min(0).sqrt()
        inv_std = torch.where(std > STD_FLOOR, 1.0 / std, torch.ones_like(std))
        return cls(mean.float(), inv_std.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) * self.inv_std

    def fold_into(self, head: nn.Linear) -> dict[str, torch.Tensor]:
        """The state of a Linear on raw features equal to ``head`` on standardized ones."""
        weight = head.weight.detach() * self.inv_std  # (C, D)
        bias = head.bias.detach() - weight @ self.mean
        return {"weight": weight.cpu().clone(), "bias": bias.cpu().clone()}


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
# The command: load the cache, train one head per (lr, weight decay), write the run folder


def run_name(lr: float, weight_decay: float) -> str:
    return f"lr{lr:g}_wd{weight_decay:g}"


def prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to --out {out} ({err.strerror}); choose a writable folder") from None


@contextmanager
def writing(stage: StagedRun, path: Path):
    """A failed write (a full disk) is one line naming the file; the folder still holds the previous run."""
    try:
        yield
    except OSError as err:
        raise UserError(f"cannot write {final_path(stage, path)} ({err.strerror or first_line(err)}); {stage.out} still "
                        "holds its previous run, unchanged: free some space (or fix the folder), then rerun") from None


def final_path(stage: StagedRun, path: Path) -> Path:
    """Where ``path`` (in the staging folder) will be once the run is published."""
    path = Path(path)
    return stage.out / path.relative_to(stage.path) if path.is_relative_to(stage.path) else path


def commit(stage: StagedRun, run: dict) -> None:
    """Publish the staged run (pipeline.common.run_folder); a failure is one line saying what ``out`` holds now."""
    try:
        stage.commit(run)
    except OSError as err:
        state = ("the next run completes it" if stage.publishing() else f"{stage.out} still holds its previous run, unchanged")
        raise UserError(f"cannot finish writing the run into {stage.out} ({err.strerror or first_line(err)}); "
                        f"free some space, then rerun ({state})") from None


def train_heads(config: HeadConfig, *, layer: str = "fc7", train_rows: np.ndarray | None = None) -> HeadResult:
    """Train one head per (lr, weight decay) over the same in-memory features; write the run folder.

    Everything is written into a staging folder inside ``out`` and published when complete (see
    pipeline.common.run_folder), under ``out``'s lock: a kill, a full disk or a concurrent run never leaves
    ``out`` holding a mix of two runs.
    """
    config.check()
    resolve_device(config.device)  # a bad --device is one line before anything is written
    splits = open_cache(Path(config.features), layer)
    out = Path(config.out)
    prepare_out(out)
    with exclusive_run(out, "run_train_head.py"), StagedRun(out) as stage:
        result = train_heads_staged(config, stage, stage.path, splits, train_rows=train_rows)
        commit(stage, run_record(config, result))
    return published(stage, result)


def run_record(config: HeadConfig, result: HeadResult) -> dict:
    """What run.json records of a linear run (or sweep)."""
    return {"tool": "run_train_head.py", "kind": "linear", "features": str(config.features),
            "weights_spec": result.weights_spec, "heads": [r.name for r in result.runs],
            "best": {"head": result.runs[0].name, "val_top1": result.runs[0].best_val_top1}}


def published(stage: StagedRun, result: HeadResult) -> HeadResult:
    """``result`` with its paths where the published run has them."""
    for run in result.runs:
        run.folder = final_path(stage, run.folder)
    return HeadResult(out=final_path(stage, result.out), best=final_path(stage, result.best), runs=result.runs,
                      weights_spec=result.weights_spec)


def train_heads_staged(config: HeadConfig, stage: StagedRun, folder: Path, splits: tuple[CachedSplit, CachedSplit], *,
                       train_rows: np.ndarray | None = None, notes: list[str] = ()) -> HeadResult:
    """train_heads' work, written into ``folder`` inside ``stage`` (a run being staged, under its lock); no publish.

    ``notes``: lines added at the end of every head's report.md.
    """
    device = resolve_device(config.device)
    train_split, val_split = splits
    train = (load_source(train_split, device, config.stream, config.progress) if train_rows is None
             else InMemoryFeatures.load(train_split, device, config.progress, rows=train_rows))  # few-shot
    val = load_source(val_split, device, config.stream, config.progress)
    feature_dim = train_split.feature_dim
    standardizer = Standardizer.fit(train, device) if config.standardize else Standardizer.identity(feature_dim, device)
    combos = list(itertools.product(config.lrs, config.weight_decays))
    sweep = len(combos) > 1
    runs = []
    for lr, weight_decay in combos:
        name = run_name(lr, weight_decay) if sweep else final_path(stage, folder).name
        head_folder = folder / name if sweep else folder
        runs.append(_train_one(config, Recipe.from_config(config, lr, weight_decay), head_folder, train, val,
                               train_split, val_split, standardizer, device, stage=stage, name=name,
                               title=name if sweep else None, notes=list(notes)))
    runs.sort(key=lambda r: -r.best_val_top1)
    if sweep:
        with writing(stage, folder / "best.pt"):
            shutil.copyfile(runs[0].folder / "best.pt", folder / "best.pt")
        with writing(stage, folder / "sweep.csv"):
            _write_table(folder / "sweep.csv", runs)
            report.plot_sweep([(r.name, r.history, r.best_val_top1) for r in runs], folder)
    return HeadResult(out=folder, best=folder / "best.pt", runs=runs, weights_spec=train_split.attrs["weights_spec"])


def _train_one(config: HeadConfig, recipe: Recipe, folder: Path, train: FeatureSource, val: FeatureSource,
               train_split: CachedSplit, val_split: CachedSplit, standardizer: Standardizer, device: torch.device,
               *, stage: StagedRun, name: str, title: str | None, notes: list[str]) -> HeadRun:
    """Train one head and write its (staged) folder: config.json, history.csv, best.pt, last.pt, plots, report."""
    folder.mkdir(parents=True, exist_ok=True)
    # plain JSON values (paths as str, tuples as lists): the checkpoint's config equals config.json's
    run_config = {**{k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                     for k, v in asdict(config).items()},
                  "lr": recipe.lr, "weight_decay": recipe.weight_decay, "lrs": list(config.lrs),
                  "weight_decays": list(config.weight_decays), "device": str(device),
                  "features_weights": train_split.attrs["weights_spec"]}
    with writing(stage, folder / "config.json"):
        (folder / "config.json").write_text(json.dumps(run_config, indent=2, allow_nan=False) + "\n")
    history_path = folder / "history.csv"

    def checkpoint(state: dict, record: dict) -> dict:
        return make_checkpoint(state, metrics=record, epoch=record["epoch"], cache_attrs=layer_attrs(train_split),
                               wnids=train_split.wnids, names=train_split.names, config=run_config)

    def on_epoch(record, state, best):
        with writing(stage, history_path):
            append_csv(history_path, record)
        log.info("[%s] epoch %2d/%d  train loss %.4f acc %5.2f%%  val loss %.4f top1 %5.2f%% top5 %5.2f%%  %.2fs",
                 name, record["epoch"], recipe.epochs, record["train_loss"], record["train_acc"],
                 record["val_loss"], record["val_top1"], record["val_top5"], record["seconds"])
        if best["metrics"] is record:
            with writing(stage, folder / "best.pt"):
                save_checkpoint(checkpoint(state, record), folder / "best.pt")

    result = fit_head(train, val, recipe, standardizer, num_classes=len(train_split.wnids), device=device,
                      on_epoch=on_epoch, progress=config.progress)
    with writing(stage, folder / "last.pt"):
        save_checkpoint(checkpoint(result.last["state"], result.last["metrics"]), folder / "last.pt")
    with writing(stage, folder / "accuracy.png"):
        report.plot_history(result.history, folder, title=title)
    best = result.best["metrics"]
    head = load_head({"feature_dim": len(standardizer.mean), "num_classes": len(train_split.wnids),
                      "head": result.best["state"]}).to(device)
    metrics = evaluate(head, val, Standardizer.identity(len(standardizer.mean), device), 1024, device,
                       keep_predictions=True)  # the saved (folded) head, as a user will load it
    with writing(stage, folder / "report.md"):  # its title names the final folder, not the staging one
        report.write_class_report(folder, labels=val_split.labels, predictions=metrics.pop("predictions"),
                                  metrics=metrics, wnids=train_split.wnids, names=train_split.names,
                                  epoch=best["epoch"], weights_spec=train_split.attrs["weights_spec"],
                                  title=final_path(stage, folder), extra=notes)
    return HeadRun(name=name, lr=recipe.lr, weight_decay=recipe.weight_decay, folder=folder,
                   best_epoch=best["epoch"], best_val_top1=best["val_top1"], best_val_top5=best["val_top5"],
                   best_val_loss=best["val_loss"], last_val_top1=result.last["metrics"]["val_top1"],
                   epoch_seconds=float(np.mean([h["train_seconds"] for h in result.history])),
                   history=result.history)


def append_csv(path: Path, record: dict) -> None:
    """Add ``record`` as a row of the CSV at ``path`` (with a header when the file is new)."""
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(record))
        if new:
            writer.writeheader()
        writer.writerow(record)


def _write_table(path: Path, runs: list[HeadRun]) -> None:
    columns = ["name", "lr", "weight_decay", "best_val_top1", "best_val_top5", "best_epoch", "last_val_top1", "epoch_seconds"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(asdict(run) for run in runs)


def layer_attrs(split: CachedSplit) -> dict:
    """The split's attributes as a checkpoint records them: the layer read and its width."""
    return {**split.attrs, "layer": split.layer, "feature_dim": split.feature_dim}
