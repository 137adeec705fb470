"""Quick head experiments on the cache: layers x heads x shots (x hyper-parameters) in one command.

One combination is today's run: its outputs go straight into ``--out`` (a plain linear run, or a linear
lr x weight-decay sweep, is exactly pipeline.heads.linear's). Several make a grid: one folder per
combination, ``<out>/<layer>_<head>_<shots>[_lr.._wd..]/``, one table (experiments.csv and .md), one plot
(experiments.png), and the best head that has a checkpoint (linear or logreg) copied to ``<out>/best.pt``.
Every kind of run is one staged run (pipeline.common.run_folder) under ``--out``'s lock, published whole with
run.json: a grid's combination folders are written inside its staging folder.

- linear: the SGD seed recipe of pipeline.heads.linear, one run per (lr, weight decay);
- logreg: L-BFGS logistic regression (pipeline.heads.logreg), one run per --weight-decay path, best kept;
- knn: DINO's weighted kNN (pipeline.heads.knn), one run answering every --k, one table row per k.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from features.cache import CachedSplit
from models import LAYERS
from pipeline.heads import knn
from pipeline.heads import logreg
from pipeline.heads import report
from pipeline.common.backbone import resolve_device
from pipeline.common.checkpoint import make_checkpoint, save_checkpoint
from pipeline.common.config import HeadConfig
from pipeline.common.errors import UserError
from pipeline.heads.table import Experiment, write_table
from pipeline.common.run_folder import StagedRun, check_clashes, exclusive_run
from pipeline.heads.shots import few_shot_rows, shots_name
from pipeline.heads.linear import (HeadResult, InMemoryFeatures, Standardizer, append_csv, available_memory, commit,
                                 final_path, layer_attrs, open_cache, prepare_out, published, run_name, run_record,
                                 train_heads_staged, writing)

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.7  # logreg and knn hold the features in memory: refuse what would not fit in this share


@dataclass
class ExperimentsResult:
    out: Path
    rows: list[Experiment]  # in grid order
    best: Path | None  # the best checkpoint (None when only knn ran)
    weights_spec: str
    head_result: HeadResult | None = None  # a plain linear run: train_heads' own result


def is_grid(config: HeadConfig) -> bool:
    return len(config.layers) * len(config.heads) * len(config.shots) > 1


def run_experiments(config: HeadConfig) -> ExperimentsResult:
    """Run every (layer, head, shots) combination of ``config``; see the module docstring for the outputs."""
    config.check()
    config = replace(config, **{name: tuple(dict.fromkeys(getattr(config, name)))  # a repeated value runs once
                                for name in ("layers", "heads", "shots", "lrs", "weight_decays", "ks")})
    unknown = [layer for layer in config.layers if layer not in LAYERS]
    if unknown:
        raise UserError(f"--layer {','.join(unknown)}: use {', '.join(LAYERS)} (a comma list compares them)")
    device = resolve_device(config.device)
    splits = {layer: open_cache(Path(config.features), layer) for layer in config.layers}  # every layer there, first
    train_split = splits[config.layers[0]][0]
    train_rows = {shots: None if shots is None else few_shot_rows(train_split.labels, shots, seed=config.seed,
                                                                  wnids=train_split.wnids)
                  for shots in config.shots}
    out = Path(config.out)
    grid = is_grid(config)
    prepare_out(out)  # a --out that cannot be written is one line, before anything runs
    # every kind of run (linear, logreg, knn, a sweep, a grid) is one staged run under --out's lock, published
    # whole with run.json (pipeline.common.run_folder): a rerun replaces exactly the previous run's files, and a kill
    # or a full disk before the publish leaves the previous run as it was
    with exclusive_run(out, "run_train_head.py"), StagedRun(out) as stage:
        if grid:  # a folder of the user's named like a combination: one line now, not after the training
            check_clashes(out, _grid_folders(config))
        result, run = _run_all(config, splits, train_split, train_rows, stage, grid, device)
        commit(stage, run)
    for row in result.rows:
        row.folder = final_path(stage, row.folder)
        row.checkpoint = row.checkpoint and final_path(stage, row.checkpoint)
    result.out = out
    result.best = result.best and final_path(stage, result.best)
    result.head_result = result.head_result and published(stage, result.head_result)
    return result


def _run_all(config: HeadConfig, splits: dict, train_split: CachedSplit, train_rows: dict, stage: StagedRun,
             grid: bool, device: torch.device) -> tuple[ExperimentsResult, dict]:
    """Write every combination into ``stage``'s folder; returns the result (staged paths) and run.json's record."""
    root = stage.path
    if grid:
        with writing(stage, root / "config.json"):
            (root / "config.json").write_text(json.dumps(_plain(asdict(config)), indent=2) + "\n")
    rows, head_result = [], None
    combos = list(itertools.product(config.layers, config.heads, config.shots))
    for number, (layer, head, shots) in enumerate(combos, 1):
        log.info("[%d/%d] %s %s %s", number, len(combos), layer, head, shots_name(shots))
        folder = root / f"{layer}_{head}_{shots_name(shots)}" if grid else root
        rows_of = train_rows[shots]
        if head == "linear":
            result, new_rows = _run_linear(config, splits[layer], shots, rows_of, folder, grid, stage)
            head_result = head_result or result
        elif head == "logreg":
            new_rows = [_run_logreg(config, splits[layer], shots, rows_of, folder, device, stage)]
        else:
            new_rows = _run_knn(config, splits[layer], shots, rows_of, folder, device, stage)
        rows += new_rows
    with_checkpoint = [r for r in rows if r.checkpoint is not None]
    best = max(with_checkpoint, key=lambda r: r.val_top1) if with_checkpoint else None  # max: the first of equals
    weights_spec = train_split.attrs["weights_spec"]
    if grid:
        if best is not None:
            with writing(stage, root / "best.pt"):
                shutil.copyfile(best.checkpoint, root / "best.pt")
        with writing(stage, root / "experiments.csv"):
            write_table(root, rows, best, weights_spec, title=stage.out)
    best_path = (root / "best.pt") if grid and best else (best.checkpoint if best else None)
    result = ExperimentsResult(out=root, rows=rows, best=best_path, weights_spec=weights_spec, head_result=head_result)
    if not grid and config.heads[0] == "linear":
        return result, run_record(config, head_result)  # what train_heads records
    kind = "grid" if grid else config.heads[0]
    run = {"tool": "run_train_head.py", "kind": kind, "features": str(config.features), "weights_spec": weights_spec,
           "heads": sorted({os.path.relpath(r.folder, root) for r in rows}) if grid else [config.heads[0]],
           "best": None if best is None else {"head": os.path.relpath(best.folder, root), "val_top1": best.val_top1}}
    return result, run


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _train_images(split: CachedSplit, rows: np.ndarray | None) -> int:
    return split.num_rows if rows is None else len(rows)


def _drawn(shots: int | None, seed: int) -> str:
    return "all of them" if shots is None else f"{shots} per class, drawn with seed {seed}"


# ---------------------------------------------------------------------------------------------
# linear: pipeline.heads.linear as it is


def _grid_folders(config: HeadConfig) -> list[str]:
    """The combination folders a grid writes (linear: one per lr and weight decay)."""
    names = []
    for layer, head, shots in itertools.product(config.layers, config.heads, config.shots):
        base = f"{layer}_{head}_{shots_name(shots)}"
        names += ([f"{base}_{run_name(lr, wd)}" for lr, wd in itertools.product(config.lrs, config.weight_decays)]
                  if head == "linear" else [base])
    return names


def _run_linear(config: HeadConfig, splits: tuple[CachedSplit, CachedSplit], shots: int | None,
                rows: np.ndarray | None, folder: Path, grid: bool,
                stage: StagedRun) -> tuple[HeadResult, list[Experiment]]:
    """A plain run or sweep into ``folder`` (not a grid), or one folder per (lr, weight decay) (a grid)."""
    layer = splits[0].layer
    single = replace(config, layers=(layer,), heads=("linear",), shots=(shots,))
    runs = [(single, folder)] if not grid else [
        (replace(single, out=final_path(stage, folder.with_name(f"{folder.name}_{run_name(lr, wd)}")), lrs=(lr,),
                 weight_decays=(wd,)), folder.with_name(f"{folder.name}_{run_name(lr, wd)}"))
        for lr, wd in itertools.product(config.lrs, config.weight_decays)]
    count = _train_images(splits[0], rows)
    notes = [] if shots is None else [f"Trained on {count} train images ({_drawn(shots, config.seed)}); val untouched."]
    experiments, first = [], None
    for run_config, run_folder in runs:
        start = time.perf_counter()
        run_folder.mkdir(exist_ok=True)
        result = train_heads_staged(run_config, stage, run_folder, splits, train_rows=rows, notes=notes)
        seconds = (time.perf_counter() - start) / len(result.runs)  # a sweep shares its loading
        first = first or result
        for run in result.runs:
            experiments.append(Experiment(
                layer=layer, head="linear", params=f"lr={run.lr:g} wd={run.weight_decay:g}, epoch "
                f"{run.best_epoch}/{config.epochs}", shots=shots_name(shots), val_top1=run.best_val_top1,
                val_top5=run.best_val_top5, train_images=count, seconds=seconds, folder=run.folder,
                checkpoint=run.folder / "best.pt"))
    return first, experiments


# ---------------------------------------------------------------------------------------------
# Features in memory, for logreg and knn


def load_float32(split: CachedSplit, rows: np.ndarray | None, device: torch.device, progress: bool,
                 extra_bytes: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, labels (N,)) of ``rows`` (None: all) on ``device``; refused if it won't fit."""
    count = _train_images(split, rows)
    need = count * split.feature_dim * 4 + extra_bytes
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = available_memory()
    if free is not None and need > MEMORY_SHARE * free:
        raise UserError(f"{split.path} ({split.layer}, {count} rows) needs {need / 2**30:.1f} GiB in memory for "
                        f"logreg or knn, but {free / 2**30:.1f} GiB is free on {device}; use --shots, or the "
                        "linear head (it streams)")
    source = InMemoryFeatures.load(split, device, progress, rows=rows)
    features = source.features if source.features.dtype == torch.float32 else source.features.float()
    return features, source.labels


def _run_config(config: HeadConfig, layer: str, head: str, shots: int | None, device: torch.device,
                split: CachedSplit) -> dict:
    return {**_plain(asdict(replace(config, layers=(layer,), heads=(head,), shots=(shots,)))), "device": str(device),
            "features_weights": split.attrs["weights_spec"]}


# ---------------------------------------------------------------------------------------------
# logreg


def _run_logreg(config: HeadConfig, splits: tuple[CachedSplit, CachedSplit], shots: int | None,
                rows: np.ndarray | None, folder: Path, device: torch.device, stage: StagedRun) -> Experiment:
    start = time.perf_counter()
    train_split, val_split = splits
    run_config = _run_config(config, train_split.layer, "logreg", shots, device, train_split)
    with writing(stage, folder / "config.json"):
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    num_classes = len(train_split.wnids)
    train_x, train_y = load_float32(train_split, rows, device, config.progress,
                                    extra_bytes=4 * _train_images(train_split, rows) * num_classes * 4)
    dim = train_x.shape[1]
    source = InMemoryFeatures(train_x, train_y)
    standardizer = Standardizer.fit(source, device) if config.standardize else Standardizer.identity(dim, device)
    train_x.sub_(standardizer.mean).mul_(standardizer.inv_std)  # in place: one copy of the features
    val_x, val_y = load_float32(val_split, None, device, config.progress)
    val_x.sub_(standardizer.mean).mul_(standardizer.inv_std)
    path_csv = folder / "path.csv"

    def on_fit(fit) -> None:
        with writing(stage, path_csv):
            append_csv(path_csv, asdict(fit))

    fitted = logreg.fit_logreg(train_x, train_y, val_x, val_y, num_classes=num_classes,
                               weight_decays=config.logreg_weight_decays, max_iter=config.logreg_max_iter,
                               progress=config.progress, on_fit=on_fit)
    best = fitted.fits[fitted.best]
    head = nn.Linear(dim, num_classes).to(device)
    with torch.no_grad():
        head.weight.copy_(fitted.weight)
        head.bias.copy_(fitted.bias)
    state = standardizer.fold_into(head)
    metrics = {"epoch": best.iterations, **asdict(best)}  # a logreg checkpoint's "epoch": its L-BFGS iterations
    with writing(stage, folder / "best.pt"):
        save_checkpoint(make_checkpoint(state, metrics=metrics, epoch=best.iterations,
                                        cache_attrs=layer_attrs(train_split), wnids=train_split.wnids,
                                        names=train_split.names, config=run_config), folder / "best.pt")
    with torch.no_grad():
        predictions = torch.addmm(fitted.bias, val_x, fitted.weight.T).argmax(1).cpu().numpy()
    penalties = ",".join(f"{f.weight_decay:g}" for f in fitted.fits)
    count = len(train_y)
    with writing(stage, folder / "report.md"):
        report.write_class_report(
            folder, labels=val_split.labels, predictions=predictions,
            metrics={"val_top1": best.val_top1, "val_top5": best.val_top5}, wnids=train_split.wnids,
            names=train_split.names, epoch=best.iterations, weights_spec=train_split.attrs["weights_spec"],
            title=final_path(stage, folder),
            summary=f"Logistic regression (L-BFGS), weight decay {best.weight_decay:g} (best of {penalties}), "
                    f"{best.iterations} iterations:",
            extra=[f"Trained on {count} train images ({_drawn(shots, config.seed)}); val untouched. "
                   "The penalty path is in path.csv."])
    seconds = time.perf_counter() - start
    return Experiment(layer=train_split.layer, head="logreg",
                      params=f"wd={best.weight_decay:g} (best of {penalties}), {best.iterations} it.",
                      shots=shots_name(shots), val_top1=best.val_top1, val_top5=best.val_top5, train_images=count,
                      seconds=seconds, folder=folder, checkpoint=folder / "best.pt")


# ---------------------------------------------------------------------------------------------
# knn


def _run_knn(config: HeadConfig, splits: tuple[CachedSplit, CachedSplit], shots: int | None,
             rows: np.ndarray | None, folder: Path, device: torch.device, stage: StagedRun) -> list[Experiment]:
    start = time.perf_counter()
    train_split, val_split = splits
    run_config = _run_config(config, train_split.layer, "knn", shots, device, train_split)
    with writing(stage, folder / "config.json"):
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(run_config, indent=2) + "\n")
    count = _train_images(train_split, rows)
    train_x, train_y = load_float32(train_split, rows, device, config.progress,
                                    extra_bytes=config.knn_chunk_rows * count * 4 * 2)
    val_x, val_y = load_float32(val_split, None, device, config.progress)
    knn.normalize_rows(train_x)
    knn.normalize_rows(val_x)
    used = {k: min(k, count) for k in config.ks}
    for k, k_used in used.items():
        if k_used < k:
            log.warning("knn: k=%d is more than the %d train images; it uses all %d", k, count, count)
    ranked = knn.knn_predict(train_x, train_y, val_x, ks=tuple(sorted(set(used.values()))),
                             num_classes=len(train_split.wnids), temperature=config.knn_temperature,
                             chunk_rows=config.knn_chunk_rows, progress=config.progress)
    results = {k: knn.accuracy(ranked[used[k]], val_y) for k in config.ks}
    seconds = time.perf_counter() - start
    table = folder / "knn.csv"
    with writing(stage, table):
        for k in config.ks:
            append_csv(table, {"k": k, "k_used": used[k], "temperature": config.knn_temperature, **results[k]})
    best_k = max(config.ks, key=lambda k: results[k]["val_top1"])
    lines = ["## Every k", "", "| k | val top-1 | val top-5 |", "|---|---|---|"]
    lines += [f"| {k}{'' if used[k] == k else f' (all {count})'} | {results[k]['val_top1']:.2f}% | "
              f"{results[k]['val_top5']:.2f}% |" for k in config.ks]
    with writing(stage, folder / "report.md"):
        report.write_class_report(
            folder, labels=val_split.labels, predictions=ranked[used[best_k]][:, 0].cpu().numpy(),
            metrics=results[best_k], wnids=train_split.wnids, names=train_split.names, epoch=0,
            weights_spec=train_split.attrs["weights_spec"], title=final_path(stage, folder),
            summary=f"Weighted kNN (DINO), k={best_k} (best of {','.join(map(str, config.ks))}), "
                    f"T={config.knn_temperature:g}:",
            extra=["", *lines, "", f"Neighbours from {count} train images ({_drawn(shots, config.seed)}); val untouched."])
    return [Experiment(layer=train_split.layer, head="knn",
                       params=f"k={k}{'' if used[k] == k else f' (all {count})'} T={config.knn_temperature:g}",
                       shots=shots_name(shots), val_top1=results[k]["val_top1"], val_top5=results[k]["val_top5"],
                       train_images=count, seconds=seconds, folder=folder, checkpoint=None) for k in config.ks]
