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
from pipeline.backbone import resolve_device
from pipeline.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "fc7-linear-head/1"
LOAD_ROWS = 16384  # rows read from HDF5 at a time
STATS_ROWS = 4096  # rows per step when computing the standardization statistics
STD_FLOOR = 1e-6  # dead ReLU units have std 0: leave them unscaled


@dataclass
class HeadConfig:
    features: Path = Path("runs/features")  # folder with train.h5 and val.h5
    out: Path = Path("runs/head")  # run folder
    lrs: tuple[float, ...] = (0.001,)  # several: one head per (lr, weight decay)
    weight_decays: tuple[float, ...] = (0.0,)
    momentum: float = 0.9
    epochs: int = 20
    batch_size: int = 100
    val_batch_size: int = 10
    seed: int = 0
    device: str = "auto"
    standardize: bool = True  # z-score with train statistics, folded into the saved layer
    stream: bool | None = None  # None: stream only when the features do not fit in memory
    progress: bool = True


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
    def load(cls, split: CachedSplit, device: torch.device, progress: bool = True) -> "InMemoryFeatures":
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
            features = f["features"]
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


def fit_head(train: FeatureSource, val: FeatureSource, *, num_classes: int, feature_dim: int, lr: float,
             weight_decay: float, momentum: float, epochs: int, batch_size: int, val_batch_size: int, seed: int,
             device: torch.device, standardize: bool, standardizer: "Standardizer | None" = None, on_epoch=None,
             progress: bool = True) -> dict:
    """Train one head with SGD + cross-entropy. Returns best/last states, the standardizer and history.

    Deterministic on the CPU for a given seed: the head's init and every epoch's batch order come from it.
    """
    torch.manual_seed(seed)
    head = LinearHead(num_classes, feature_dim).to(device)
    generator = torch.Generator().manual_seed(seed)
    if standardizer is None:  # a sweep passes its one standardizer to every head
        standardizer = Standardizer.fit(train, device) if standardize else Standardizer.identity(feature_dim, device)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
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
            raise UserError(f"training diverged at epoch {epoch} (loss is {loss_sum.item()}); lower --lr (now {lr})")
        record = {"epoch": epoch, "train_loss": loss_sum.item() / train.num_rows,
                  "train_acc": 100.0 * correct.item() / train.num_rows,
                  **evaluate(head, val, standardizer, val_batch_size, device),
                  "train_seconds": round(train_seconds, 3), "seconds": round(time.perf_counter() - start, 3)}
        history.append(record)
        state = standardizer.fold_into(head)
        if best is None or record["val_top1"] > best["metrics"]["val_top1"]:
            best = {"state": state, "metrics": record}
        if on_epoch:
            on_epoch(record, state, best)
    return {"best": best, "last": {"state": state, "metrics": history[-1]}, "history": history,
            "standardizer": standardizer}


# ---------------------------------------------------------------------------------------------
# The command: load the cache, train one head per (lr, weight decay), write the run folder


def open_cache(folder: Path) -> tuple[CachedSplit, CachedSplit]:
    """train.h5 and val.h5, checked complete and consistent with each other."""
    train, val = open_split(Path(folder) / "train.h5"), open_split(Path(folder) / "val.h5")
    checks = [("class_wnids", train.wnids, val.wnids, "different classes"),
              ("weights_fingerprint", train.attrs["weights_fingerprint"], val.attrs["weights_fingerprint"], "different weights"),
              ("preprocess", train.attrs["preprocess"], val.attrs["preprocess"], "different preprocessing"),
              ("layer", train.attrs["layer"], val.attrs["layer"], "different layers"),
              ("precision", train.attrs["precision"], val.attrs["precision"], "different precisions"),
              ("feature_dim", train.attrs["feature_dim"], val.attrs["feature_dim"], "different feature sizes")]
    for _, a, b, what in checks:
        if a != b:
            raise UserError(f"train and val in {folder} were extracted with {what}; re-extract one of them "
                            "with the same run_extract.py settings (--overwrite)")
    return train, val


def _check_config(config: HeadConfig) -> None:
    for name, values in (("--lr", config.lrs), ("--weight-decay", config.weight_decays)):
        if not values:
            raise UserError(f"{name} needs at least one value")
    if any(not (lr > 0 and math.isfinite(lr)) for lr in config.lrs):
        raise UserError(f"--lr must be positive, got {','.join(map(str, config.lrs))}")
    if any(not (wd >= 0 and math.isfinite(wd)) for wd in config.weight_decays):  # NaN fails every comparison
        raise UserError(f"--weight-decay must be zero or positive, got {','.join(map(str, config.weight_decays))}")
    if not (config.momentum >= 0 and math.isfinite(config.momentum)):
        raise UserError(f"--momentum must be zero or positive, got {config.momentum}")
    for name, value in (("--epochs", config.epochs), ("--batch-size", config.batch_size),
                        ("--val-batch-size", config.val_batch_size)):
        if value <= 0:
            raise UserError(f"{name} must be positive, got {value}")


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
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return True
    return num_bytes < 0.7 * available


def load_source(split: CachedSplit, device: torch.device, stream: bool | None, progress: bool) -> FeatureSource:
    itemsize = np.dtype(split.attrs["dtype"]).itemsize
    num_bytes = split.num_rows * int(split.attrs["feature_dim"]) * itemsize
    if stream is None:
        stream = not _fits_in_memory(num_bytes, device) and not (device.type == "cuda" and _fits_in_memory(num_bytes, torch.device("cpu")))
        if stream:
            log.info("%s (%.1f GiB) does not fit in memory: streaming it", split.path, num_bytes / 2**30)
    if stream:
        return StreamedFeatures(split)
    target = device if device.type == "cpu" or _fits_in_memory(num_bytes, device) else torch.device("cpu")
    return InMemoryFeatures.load(split, target, progress)


def make_checkpoint(state: dict, metrics: dict, epoch: int, train: CachedSplit, config: dict) -> dict:
    """A plain dict of tensors and primitives: loads with torch.load(weights_only=True) and is all the live runner needs."""
    attrs = train.attrs
    return {
        "format": CHECKPOINT_FORMAT,
        "head": state,  # nn.Linear(feature_dim, num_classes) state on raw fc7
        "num_classes": len(train.wnids),
        "feature_dim": int(attrs["feature_dim"]),
        "class_wnids": list(train.wnids),
        "class_names": list(train.names),
        "backbone": attrs["backbone"],
        "layer": attrs["layer"],
        "weights_spec": attrs["weights_spec"],
        "weights_fingerprint": attrs["weights_fingerprint"],
        "preprocess": json.loads(attrs["preprocess"]),
        "precision": attrs["precision"],
        "config": config,
        "epoch": epoch,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write to a temporary name, then rename: a kill mid-write never leaves a truncated best.pt."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def run_name(lr: float, weight_decay: float) -> str:
    return f"lr{lr:g}_wd{weight_decay:g}"


def train_heads(config: HeadConfig) -> dict:
    """Train one head per (lr, weight decay) over the same in-memory features; write the run folder."""
    from pipeline import report

    _check_config(config)
    device = resolve_device(config.device)
    train_split, val_split = open_cache(Path(config.features))
    out = Path(config.out)
    _prepare_out(out)
    train = load_source(train_split, device, config.stream, config.progress)
    val = load_source(val_split, device, config.stream, config.progress)
    feature_dim = int(train_split.attrs["feature_dim"])
    standardizer = Standardizer.fit(train, device) if config.standardize else Standardizer.identity(feature_dim, device)
    combos = list(itertools.product(config.lrs, config.weight_decays))
    sweep = len(combos) > 1
    results = []
    for lr, weight_decay in combos:
        folder = out / run_name(lr, weight_decay) if sweep else out
        folder.mkdir(parents=True, exist_ok=True)
        run_config = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
                      "lr": lr, "weight_decay": weight_decay, "lrs": list(config.lrs),
                      "weight_decays": list(config.weight_decays), "device": str(device),
                      "features_weights": train_split.attrs["weights_spec"]}
        (folder / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")
        history_path = folder / "history.csv"
        history_path.unlink(missing_ok=True)

        def on_epoch(record, state, best, folder=folder, history_path=history_path, run_config=run_config):
            _append_csv(history_path, record)
            log.info("[%s] epoch %2d/%d  train loss %.4f acc %5.2f%%  val loss %.4f top1 %5.2f%% top5 %5.2f%%  %.2fs",
                     folder.name, record["epoch"], config.epochs, record["train_loss"], record["train_acc"],
                     record["val_loss"], record["val_top1"], record["val_top5"], record["seconds"])
            if best["metrics"] is record:
                save_checkpoint(make_checkpoint(state, record, record["epoch"], train_split, run_config), folder / "best.pt")

        result = fit_head(train, val, num_classes=len(train_split.wnids), feature_dim=feature_dim,
                          lr=lr, weight_decay=weight_decay, momentum=config.momentum, epochs=config.epochs,
                          batch_size=config.batch_size, val_batch_size=config.val_batch_size, seed=config.seed,
                          device=device, standardize=config.standardize, standardizer=standardizer, on_epoch=on_epoch,
                          progress=config.progress)
        last = result["last"]
        save_checkpoint(make_checkpoint(last["state"], last["metrics"], last["metrics"]["epoch"], train_split, run_config),
                        folder / "last.pt")
        report.plot_history(result["history"], folder, title=folder.name if sweep else None)
        report.write_class_report(folder / "best.pt", val, val_split, device, folder)
        results.append({"name": folder.name, "lr": lr, "weight_decay": weight_decay, "folder": str(folder),
                        "best_epoch": result["best"]["metrics"]["epoch"], **_best_metrics(result)})
    results.sort(key=lambda r: -r["best_val_top1"])
    if sweep:
        shutil.copyfile(Path(results[0]["folder"]) / "best.pt", out / "best.pt")
        _write_table(out / "sweep.csv", results)
        report.plot_sweep(results, out)
    return {"out": str(out), "best": str(out / "best.pt"), "runs": results,
            "weights_spec": train_split.attrs["weights_spec"]}


def _best_metrics(result: dict) -> dict:
    best = result["best"]["metrics"]
    return {"best_val_top1": best["val_top1"], "best_val_top5": best["val_top5"], "best_val_loss": best["val_loss"],
            "last_val_top1": result["last"]["metrics"]["val_top1"],
            "epoch_seconds": float(np.mean([h["train_seconds"] for h in result["history"]])),
            "history": result["history"]}


def _append_csv(path: Path, record: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(record))
        if new:
            writer.writeheader()
        writer.writerow(record)


def _write_table(path: Path, rows: list[dict]) -> None:
    columns = ["name", "lr", "weight_decay", "best_val_top1", "best_val_top5", "best_epoch", "last_val_top1", "epoch_seconds"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
