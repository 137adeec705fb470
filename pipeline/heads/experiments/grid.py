"""Quick head experiments on the cache: (backbones x) layers x heads x shots (x hyper-parameters) in one command.

Several caches of one dataset (``--features A,B``) compare backbones: their combinations' folders start with
the backbone (``resnet18_penultimate_linear_all``) and the table's backbone column tells their rows apart.

One combination is a plain run: its outputs go straight into ``--out`` (a plain linear run, or a linear
lr x weight-decay sweep). Several make a grid: one folder per combination,
``<out>/<layer>_<head>_<shots>[_lr.._wd..]/`` (pipeline.heads.naming), one table (experiments.csv and .md),
one plot (experiments.png), and the best head that has a checkpoint copied to ``<out>/best.pt``. Every kind
of run is one staged run (pipeline.heads.run_folder) under ``--out``'s lock, published whole with run.json.

The grid is a loop over pipeline.heads.registry: each head's ``fit`` gets the same readers and settings and
returns the same HeadOutcome (pipeline.heads.interface).
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.common.hardware import resolve_device
from pipeline.common.config import HeadConfig
from pipeline.common.errors import UserError
from pipeline.heads.run_folder import MARKER, StagedRun, check_clashes, exclusive_run, refuse_foreign
from pipeline.heads.interface import HeadOutcome, HeadSettings
from pipeline.heads.readers import FeatureReader
from pipeline.heads.sources import Source, open_sources
from pipeline.heads.registry import HEADS
from pipeline.heads.experiments.shots import few_shot_rows
from pipeline.heads.naming import shots_name
from pipeline.heads.staging import commit, config_record, final_path, prepare_out, write_config, writing
from pipeline.heads.experiments.table import write_table
from pipeline.heads.rows import Experiment

log = logging.getLogger(__name__)

GRID_FILES = ("config.json", "best.pt", "experiments.csv", "experiments.md", "experiments.png")


@dataclass
class ExperimentsResult:
    out: Path
    rows: list[Experiment]  # in grid order
    best: Path | None  # the best checkpoint (None when only knn ran)
    weights_spec: str
    outcome: HeadOutcome | None = None  # a plain run (one combination): its head's own outcome


def is_grid(config: HeadConfig, sources: list[Source] | None = None) -> bool:
    layers = sum(len(s.layers) for s in sources) if sources else len(config.layers or (None,))
    return layers * len(config.head) * len(config.shots) > 1


def own_names() -> set[str]:
    """Every name a head run writes at the top of a folder: what a folder without run.json must not hold."""
    return {MARKER, *GRID_FILES, *(name for head in HEADS.values() for name in head.FILES)}


def checked(config: HeadConfig) -> HeadConfig:
    """``config`` checked, each repeated value once."""
    config.check()
    unknown = [head for head in config.head if head not in HEADS]
    if unknown:
        raise UserError(f"--head {','.join(unknown)}: use {', '.join(HEADS)} (a comma list compares them)")
    return replace(config, **{name: tuple(dict.fromkeys(getattr(config, name)))  # a repeated value runs once
                              for name in ("head", "shots", "lr", "k")},
                   layers=config.layers and tuple(dict.fromkeys(config.layers)),
                   weight_decay=config.weight_decay and tuple(dict.fromkeys(config.weight_decay)))


def _narrow(config: HeadConfig, source: Source, layer: str, head: str, shots: int | None) -> HeadConfig:
    return replace(config, features=source.folder, layers=(layer,), head=(head,), shots=(shots,))


def run_experiments(config: HeadConfig) -> ExperimentsResult:
    """Run every (layer, head, shots) combination of ``config``; see the module docstring for the outputs."""
    config = checked(config)
    device = resolve_device(config.device)
    sources = open_sources(config)  # every cache and layer there, first
    train_split = sources[0].train
    if len(train_split.wnids) < 2:
        raise UserError(f"{train_split.path} holds {len(train_split.wnids)} class ({', '.join(train_split.wnids)}): a "
                        "classifier needs at least two; extract a dataset with two or more classes")
    train_rows = {(s.label, shots): None if shots is None else few_shot_rows(s.train.labels, shots, seed=config.seed,
                                                                             wnids=s.train.wnids)
                  for s in sources for shots in config.shots}  # per cache: one dataset, but its own skips
    out = Path(config.out)
    prepare_out(out)  # a --out that cannot be written is one line, before anything runs
    # every kind of run is one staged run under --out's lock, published whole with run.json: a rerun replaces
    # exactly the previous run's files, and a kill or a full disk before the publish leaves the previous run
    with exclusive_run(out, "run_train_head.py"), StagedRun(out) as stage:
        refuse_foreign(out, own_names())  # a folder the tool did not make is not the tool's to clean
        grid = is_grid(config, sources)
        settings = [HeadSettings(config=_narrow(config, source, layer, head, shots), stage=stage, device=device,
                                 grid=grid, source=source.label)
                    for source in sources for layer, head, shots in
                    itertools.product(source.layers, config.head, config.shots)]
        # a folder of the user's named like a combination or a sweep's head: one line now, not after the training
        check_clashes(out, [name for s in settings for name in HEADS[s.name].folders(s)])
        result, run = _run_all(config, {s.label: s for s in sources}, train_rows, settings)
        commit(stage, run, own_names())
    for row in result.rows:
        row.folder = final_path(stage, row.folder)
        row.checkpoint = row.checkpoint and final_path(stage, row.checkpoint)
    for head_run in result.outcome.runs if result.outcome else ():
        head_run.folder = final_path(stage, head_run.folder)
    result.out = out
    result.best = result.best and final_path(stage, result.best)
    return result


def _run_all(config: HeadConfig, sources: dict[str | None, Source], train_rows: dict,
             settings: list[HeadSettings]) -> tuple[ExperimentsResult, dict]:
    """Every combination's ``fit``, into the staging folder; returns the result (staged paths) and run.json's record."""
    stage, grid = settings[0].stage, settings[0].grid
    root = stage.path
    if grid:
        write_config(stage, root, config_record(config))
    rows, outcomes = [], []
    for number, head_settings in enumerate(settings, 1):
        layer, shots, source = head_settings.layer, head_settings.shots, sources[head_settings.source]
        log.info("[%d/%d] %s%s %s %s", number, len(settings), f"{source.label} " if source.label else "", layer,
                 head_settings.name, shots_name(shots))
        train_split, val_split = source.splits[layer]
        train = FeatureReader(train_split, train_rows[source.label, shots])
        outcome = HEADS[head_settings.name].fit(train, FeatureReader(val_split), head_settings)
        for row in outcome.rows:
            row.backbone = source.label or source.backbone  # two caches of one backbone: told apart by folder
        rows += outcome.rows
        outcomes.append(outcome)
    with_checkpoint = [r for r in rows if r.checkpoint is not None]
    best = max(with_checkpoint, key=lambda r: r.val_top1) if with_checkpoint else None  # max: the first of equals
    weights_spec = next(iter(sources.values())).train.attrs["weights_spec"]
    run = {"tool": "run_train_head.py", "kind": "grid" if grid else config.head[0], "features": str(config.features),
           "weights_spec": weights_spec}
    if not grid:
        outcome = outcomes[0]
        best_record = outcome.best and {"head": outcome.best_name, "val_top1": outcome.best.val_top1}
        best_path = best and (root / "best.pt" if (root / "best.pt").is_file() else best.checkpoint)  # a sweep's copy
        result = ExperimentsResult(out=root, rows=rows, best=best_path, weights_spec=weights_spec, outcome=outcome)
        return result, {**run, "heads": outcome.names, "best": best_record}
    if best is not None:
        with writing(stage, root / "best.pt"):
            shutil.copyfile(best.checkpoint, root / "best.pt")
    with writing(stage, root / "experiments.csv"):
        write_table(root, rows, best, weights_spec, title=stage.out)
    result = ExperimentsResult(out=root, rows=rows, best=best and root / "best.pt", weights_spec=weights_spec)
    return result, {**run, "heads": sorted({os.path.relpath(r.folder, root) for r in rows}),
                    "best": None if best is None else {"head": os.path.relpath(best.folder, root),
                                                       "val_top1": best.val_top1}}
