"""A run's own files and record: a grid's config.json, table and best.pt, and what run.json records.

A plain run (one combination) is its head's files alone; a grid adds, at the top of the run folder,
``config.json``, ``experiments.csv``/``.md``/``.png`` (pipeline.heads.publish.table) and ``best.pt``, a copy of
the best head that has a checkpoint.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.common.config import HeadConfig
from pipeline.heads.publish.files import config_record, write_config, writing
from pipeline.heads.publish.place import HeadOutcome
from pipeline.heads.publish.table import write_table
from pipeline.heads.rows import Experiment
from pipeline.heads.run_folder import TOOL, StagedRun

GRID_FILES = ("config.json", "best.pt", "experiments.csv", "experiments.md", "experiments.png")


@dataclass(frozen=True)
class PublishedRun:
    """A run staged whole: what the command reports, and what run.json records."""

    rows: tuple[Experiment, ...]  # every head's rows, in grid order (paths in the staging folder)
    best: Path | None  # the run's best.pt (None when no head saves one: only knn ran)
    record: dict  # run.json's fields besides its files


def write_run(stage: StagedRun, config: HeadConfig, outcomes: list[HeadOutcome], *, grid: bool,
              weights_spec: str) -> PublishedRun:
    """The run's own files (a grid's), once every head is written; returns what run.json will record."""
    rows = tuple(row for outcome in outcomes for row in outcome.rows)
    run = {"tool": TOOL, "kind": "grid" if grid else config.head[0], "features": str(config.features),
           "weights_spec": weights_spec}
    if not grid:
        outcome = outcomes[0]
        best = outcome.best and {"head": outcome.best_name, "val_top1": outcome.best.val_top1}
        return PublishedRun(rows=rows, best=stage.path / "best.pt" if outcome.best else None,
                            record={**run, "heads": list(outcome.names), "best": best})
    root = stage.path
    write_config(stage, root, config_record(config))
    with_checkpoint = [row for row in rows if row.checkpoint is not None]
    best = max(with_checkpoint, key=lambda row: row.val_top1) if with_checkpoint else None  # max: the first of equals
    if best is not None:
        with writing(stage, root / "best.pt"):
            shutil.copyfile(best.checkpoint, root / "best.pt")
    with writing(stage, root / "experiments.csv"):
        write_table(root, rows, best, weights_spec, title=stage.out)
    best_record = None if best is None else {"head": os.path.relpath(best.folder, root), "val_top1": best.val_top1}
    return PublishedRun(rows=rows, best=best and root / "best.pt",
                        record={**run, "heads": sorted({os.path.relpath(row.folder, root) for row in rows}),
                                "best": best_record})
