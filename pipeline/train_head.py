"""Stage two: train the 4096 -> C linear head on cached fc7 features. Images are never read here.

The features are loaded once as one tensor (on the GPU when asked and it fits) and batches are
indexed from it; a cache larger than memory is streamed block by block instead. By default the
features are z-scored with train-set statistics, which are folded into the saved layer, so the
checkpoint's head is one ``nn.Linear(4096, C)`` that takes raw fc7 activations.
"""
from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Protocol

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from features.cache import ROW_CHUNK, CachedSplit, open_split
from models import LinearHead
from pipeline import report
from pipeline.backbone import resolve_device
from pipeline.checkpoint import load_head, make_checkpoint, save_checkpoint
from pipeline.config import HeadConfig
from pipeline.errors import UserError

log = logging.getLogger(__name__)

LOAD_ROWS = 16384  # rows read from HDF5 at a time
STATS_ROWS = 4096  # rows per step when computing the standardization statistics
STD_FLOOR = 1e-6  # dead ReLU units have std 0: leave them unscaled


@dataclass(frozen=True)
class Recipe:
    """How one head is trained: SGD with momentum on cross-entropy (the seed recipe by default)."""

    lr: float = 0.001
    weight_decay: float = 0.0
    momentum: float = 0.9
    epochs: int = 20
    batch_size: int = 100
    val_batch_size: int = 10
    seed: int = 0  # the head's init and every epoch's batch order

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
# Where batches of features come from


class FeatureSource(Protocol):
    num_rows: int

    def batches(self, batch_size: int, generator: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features (B, D) as stored, labels (B,)); shuffled when a generator is given."""


def batch_order(num_rows: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Row indices of each batch: a seeded permutation, or the natural order without a generator."""
    order = torch.randperm(num_rows, generator=generator) if generator is not None else torch.arange(num_rows)
    return list(order.split(batch_size))


class InMemoryFeatures:
    """All features in one tensor; a batch is one index_select."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels.to(features.device)
        self.num_rows = len(labels)

    @classmethod
    def load(cls, split: CachedSplit, device: torch.device, progress: bool = True,
             rows: np.ndarray | None = None) -> "InMemoryFeatures":
        """The split's features (``rows``: only those rows, in that order) as one tensor on ``device``."""
        if rows is not None:
            with h5py.File(split.path, "r") as f:  # h5py reads a sorted, duplicate-free selection
                order = np.argsort(rows, kind="stable")
                block = np.empty((len(rows), f[split.dataset].shape[1]), dtype=f[split.dataset].dtype)
                block[order] = f[split.dataset][np.asarray(rows)[order]]
            return cls(torch.from_numpy(block).to(device), torch.from_numpy(split.labels[rows]))
        first = split.read_features(0, 1)
        features = torch.empty((split.num_rows, first.shape[1]), dtype=torch.from_numpy(first).dtype, device=device)
        for start in tqdm(range(0, split.num_rows, LOAD_ROWS), desc=f"load {split.path.name}", unit="block",
                          disable=not progress, leave=False):
            block = torch.from_numpy(split.read_features(start, start + LOAD_ROWS))
            features[start:start + len(block)].copy_(block)
        return cls(features, torch.from_numpy(split.labels))

    def batches(self, batch_size, generator):
        for idx in batch_order(self.num_rows, batch_size, generator):
            idx = idx.to(self.features.device)
            yield self.features.index_select(0, idx), self.labels.index_select(0, idx)


class StreamedFeatures:
    """For caches larger than memory: blocks of rows read from HDF5 one at a time.

    Rows are stored in class order, so a shuffled block is gathered from ``block_rows / 256`` random
    256-row chunks (the HDF5 chunk size) across the whole file, then shuffled row by row: every batch
    sees the classes mixed, and each row comes once per epoch.
    """

    def __init__(self, split: CachedSplit, block_rows: int = 8 * LOAD_ROWS):
        self.split, self.block_rows = split, block_rows
        self.chunk_rows = min(ROW_CHUNK, block_rows)
        self.labels = torch.from_numpy(split.labels)
        self.num_rows = split.num_rows

    def batches(self, batch_size, generator):
        if generator is None:  # evaluation and statistics: plain order
            for start in range(0, self.num_rows, self.block_rows):
                block = torch.from_numpy(self.split.read_features(start, start + self.block_rows))
                for idx in batch_order(len(block), batch_size, None):
                    yield block[idx], self.labels[start:start + len(block)][idx]
            return
        chunks = torch.arange(0, self.num_rows, self.chunk_rows)
        chunks = chunks[torch.randperm(len(chunks), generator=generator)]
        per_block = max(1, self.block_rows // self.chunk_rows)
        with h5py.File(self.split.path, "r") as f:
            features = f[self.split.dataset]
            for group in chunks.split(per_block):
                starts = sorted(group.tolist())  # read in file order
                block = torch.from_numpy(np.concatenate([features[s:s + self.chunk_rows] for s in starts]))
                labels = torch.cat([self.labels[s:s + self.chunk_rows] for s in starts])
                for idx in batch_order(len(block), batch_size, generator):
                    yield block[idx], labels[idx]


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
            raise UserError(f"training diverged at epoch {epoch} (loss is {loss_sum.item()}); lower --lr (now {recipe.lr})")
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


def open_cache(folder: Path, layer: str = "fc7") -> tuple[CachedSplit, CachedSplit]:
    """train.h5 and val.h5 (their ``layer`` features), checked complete and consistent with each other."""
    train, val = open_split(Path(folder) / "train.h5", layer), open_split(Path(folder) / "val.h5", layer)
    checks = [("class_wnids", train.wnids, val.wnids, "different classes"),
              ("weights_fingerprint", train.attrs["weights_fingerprint"], val.attrs["weights_fingerprint"], "different weights"),
              ("preprocess", train.attrs["preprocess"], val.attrs["preprocess"], "different preprocessing"),
              ("layer", train.attrs["layer"], val.attrs["layer"], "different layers"),
              ("precision", train.attrs["precision"], val.attrs["precision"], "different precisions"),
              ("feature_dim", train.feature_dim, val.feature_dim, "different feature sizes")]
    for _, a, b, what in checks:
        if a != b:
            raise UserError(f"train and val in {folder} were extracted with {what}; re-extract one of them "
                            "with the same run_extract.py settings (--overwrite)")
    return train, val


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to --out {out} ({err.strerror}); choose a writable folder") from None


def _fits_in_memory(num_bytes: int, device: torch.device) -> bool:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return num_bytes < 0.8 * free
    available = available_memory()
    return available is None or num_bytes < 0.7 * available


def available_memory() -> int | None:
    """Bytes the kernel can give without swapping: MemAvailable (free pages plus reclaimable cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def load_source(split: CachedSplit, device: torch.device, stream: bool | None, progress: bool) -> FeatureSource:
    itemsize = np.dtype(split.attrs["dtype"]).itemsize
    num_bytes = split.num_rows * split.feature_dim * itemsize
    if stream is None:
        stream = not _fits_in_memory(num_bytes, device) and not (device.type == "cuda" and _fits_in_memory(num_bytes, torch.device("cpu")))
        if stream:
            log.info("%s (%.1f GiB) does not fit in memory: streaming it", split.path, num_bytes / 2**30)
    if stream:
        return StreamedFeatures(split)
    target = device if device.type == "cpu" or _fits_in_memory(num_bytes, device) else torch.device("cpu")
    return InMemoryFeatures.load(split, target, progress)


def run_name(lr: float, weight_decay: float) -> str:
    return f"lr{lr:g}_wd{weight_decay:g}"


def train_heads(config: HeadConfig, *, layer: str = "fc7", train_rows: np.ndarray | None = None) -> HeadResult:
    """Train one head per (lr, weight decay) over the same in-memory features; write the run folder.

    ``layer``: the cached layer to train on; ``train_rows``: train on these rows only (few-shot).
    """
    config.check()
    device = resolve_device(config.device)
    train_split, val_split = open_cache(Path(config.features), layer)
    out = Path(config.out)
    _prepare_out(out)
    train = (load_source(train_split, device, config.stream, config.progress) if train_rows is None
             else InMemoryFeatures.load(train_split, device, config.progress, rows=train_rows))
    val = load_source(val_split, device, config.stream, config.progress)
    feature_dim = train_split.feature_dim
    standardizer = Standardizer.fit(train, device) if config.standardize else Standardizer.identity(feature_dim, device)
    combos = list(itertools.product(config.lrs, config.weight_decays))
    sweep = len(combos) > 1
    runs = []
    for lr, weight_decay in combos:
        folder = out / run_name(lr, weight_decay) if sweep else out
        runs.append(_train_one(config, Recipe.from_config(config, lr, weight_decay), folder, train, val, train_split,
                               val_split, standardizer, device, title=folder.name if sweep else None))
    runs.sort(key=lambda r: -r.best_val_top1)
    if sweep:
        shutil.copyfile(runs[0].folder / "best.pt", out / "best.pt")
        _write_table(out / "sweep.csv", runs)
        report.plot_sweep([(r.name, r.history, r.best_val_top1) for r in runs], out)
    return HeadResult(out=out, best=out / "best.pt", runs=runs, weights_spec=train_split.attrs["weights_spec"])


def _train_one(config: HeadConfig, recipe: Recipe, folder: Path, train: FeatureSource, val: FeatureSource,
               train_split: CachedSplit, val_split: CachedSplit, standardizer: Standardizer, device: torch.device,
               title: str | None) -> HeadRun:
    """Train one head and write its folder: config.json, history.csv, best.pt, last.pt, plots and report."""
    folder.mkdir(parents=True, exist_ok=True)
    run_config = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
                  "lr": recipe.lr, "weight_decay": recipe.weight_decay, "lrs": list(config.lrs),
                  "weight_decays": list(config.weight_decays), "device": str(device),
                  "features_weights": train_split.attrs["weights_spec"]}
    (folder / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    history_path = folder / "history.csv"
    history_path.unlink(missing_ok=True)

    def checkpoint(state: dict, record: dict) -> dict:
        return make_checkpoint(state, metrics=record, epoch=record["epoch"], cache_attrs=layer_attrs(train_split),
                               wnids=train_split.wnids, names=train_split.names, config=run_config)

    def on_epoch(record, state, best):
        _append_csv(history_path, record)
        log.info("[%s] epoch %2d/%d  train loss %.4f acc %5.2f%%  val loss %.4f top1 %5.2f%% top5 %5.2f%%  %.2fs",
                 folder.name, record["epoch"], recipe.epochs, record["train_loss"], record["train_acc"],
                 record["val_loss"], record["val_top1"], record["val_top5"], record["seconds"])
        if best["metrics"] is record:
            save_checkpoint(checkpoint(state, record), folder / "best.pt")

    result = fit_head(train, val, recipe, standardizer, num_classes=len(train_split.wnids), device=device,
                      on_epoch=on_epoch, progress=config.progress)
    save_checkpoint(checkpoint(result.last["state"], result.last["metrics"]), folder / "last.pt")
    report.plot_history(result.history, folder, title=title)
    best = result.best["metrics"]
    head = load_head({"feature_dim": len(standardizer.mean), "num_classes": len(train_split.wnids),
                      "head": result.best["state"]}).to(device)
    metrics = evaluate(head, val, Standardizer.identity(len(standardizer.mean), device), 1024, device,
                       keep_predictions=True)  # the saved (folded) head, as a user will load it
    report.write_class_report(folder, labels=val_split.labels, predictions=metrics.pop("predictions"), metrics=metrics,
                              wnids=train_split.wnids, names=train_split.names, epoch=best["epoch"],
                              weights_spec=train_split.attrs["weights_spec"])
    return HeadRun(name=folder.name, lr=recipe.lr, weight_decay=recipe.weight_decay, folder=folder,
                   best_epoch=best["epoch"], best_val_top1=best["val_top1"], best_val_top5=best["val_top5"],
                   best_val_loss=best["val_loss"], last_val_top1=result.last["metrics"]["val_top1"],
                   epoch_seconds=float(np.mean([h["train_seconds"] for h in result.history])),
                   history=result.history)


def _append_csv(path: Path, record: dict) -> None:
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
