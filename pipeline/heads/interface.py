"""What every head shares: the settings one head run gets, and the outcome it returns.

A head is one module of pipeline.heads with

- ``FILES``: the names it may write into a folder (the run folder code knows none of them by name);
- ``folders(settings) -> list[str]``: the folders it writes under the run folder (a grid's clash check);
- ``fit(train, val, settings) -> HeadOutcome``: train (or index) on the train reader, score on val, write
  its files under ``settings.root``.

pipeline.heads.registry lists them; pipeline.heads.experiments.grid loops over it. A fourth head is one new module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.backbones.catalog import safe_name
from pipeline.common.config import HeadConfig
from pipeline.heads.run_folder import StagedRun
from pipeline.heads.experiments.naming import folder_name
from pipeline.heads.staging import final_path
from pipeline.heads.experiments.table import Experiment


@dataclass
class HeadSettings:
    """One head on one layer and shot count: the config narrowed to them (``config.layers == (layer,)``,
    ``config.head == (name,)``, ``config.shots == (shots,)``), and where its files go."""

    config: HeadConfig
    stage: StagedRun  # the run being staged, under --out's lock
    device: torch.device
    grid: bool  # part of a grid: each combination gets its own folder under ``root``
    source: str | None = None  # the cache's label when several are compared (its folders start with it)
    notes: list[str] = field(default_factory=list)  # lines ending each report.md

    @property
    def root(self) -> Path:
        """The staged run folder."""
        return self.stage.path

    @property
    def name(self) -> str:
        return self.config.head[0]

    @property
    def layer(self) -> str:
        return self.config.layers[0]

    @property
    def shots(self) -> int | None:
        return self.config.shots[0]

    def folder(self, **hyper) -> Path:
        """Where a head with hyper-parameters ``hyper`` (lr, weight_decay) writes: in a grid its own combination
        folder; alone, the run folder itself."""
        if not self.grid:
            return self.root
        name = folder_name(layer=self.layer, head=self.name, shots=self.shots, **hyper)
        # a backbone as one folder name ('open_clip:ViT-B-32/laion2b_s34b_b79k' holds a slash)
        return self.root / (name if self.source is None else f"{safe_name(self.source)}_{name}")

    def title(self, folder: Path) -> Path:
        """The folder a report names: the published one, not the staging one."""
        return final_path(self.stage, folder)

    def drawn(self, count: int) -> str:
        """How the train rows were chosen, for the reports."""
        shots = "all of them" if self.shots is None else f"{self.shots} per class, drawn with seed {self.config.seed}"
        return f"{count} train images ({shots})"


@dataclass
class HeadOutcome:
    """What a head run returns, the same for every head."""

    rows: list[Experiment]  # one table row per trained head (a kNN run: one per k), best first or in order
    names: list[str]  # the heads run.json lists when this is the whole run (a sweep: one per lr, weight decay)
    best: Experiment | None  # the best row with a checkpoint (None: the head saves none)
    best_name: str | None = None  # how run.json names the best head when this is the whole run
    runs: list = field(default_factory=list)  # head-specific detail (linear: its HeadRun records, best first)
