"""Where one head's result is published, and what publishing it gives the run.

``Place``: the staged run, the head's settings and cache, and how its folders are named (a grid's combination
folder, or the run folder itself). ``Publisher``: what one head writes (its file names, its folders, its writer).
``HeadOutcome``: what a writer returns (the grid's table rows and how run.json names the heads).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from features.cache import CachedSplit
from pipeline.common.config import HeadConfig
from pipeline.heads.interface import HeadResult, HeadSettings
from pipeline.heads.naming import combination_folder, shots_name
from pipeline.heads.plan import dataset_name, result_folders
from pipeline.heads.publish.files import config_record, final_path
from pipeline.heads.rows import Experiment
from pipeline.heads.run_folder import StagedRun


@dataclass(frozen=True)
class Place:
    """One head's settings and cache, and where in the staged run its files go."""

    settings: HeadSettings
    stage: StagedRun  # the run being staged, under --out's lock
    grid: bool  # part of a grid: each combination gets its own folder under ``root``
    train: CachedSplit  # the split it was trained on: the checkpoint's classes and cache attributes
    val: CachedSplit  # the split it was scored on: the report's labels
    source: str | None = None  # the cache's label when several are compared (its folders start with it)
    backbone: str = ""  # the table's backbone column

    @property
    def root(self) -> Path:
        """The staged run folder."""
        return self.stage.path

    def folder(self, **hyper) -> Path:
        """Where a head with hyper-parameters ``hyper`` (lr, weight_decay) writes: in a grid its own combination
        folder; alone, the run folder itself."""
        if not self.grid:
            return self.root
        settings = self.settings
        return self.root / combination_folder(self.source, settings.layer, settings.name, settings.shots, **hyper)

    def title(self, folder: Path) -> Path:
        """The folder a report names: the published one, not the staging one."""
        return final_path(self.stage, folder)

    def drawn(self, count: int) -> str:
        """How the train rows were chosen, for the reports."""
        shots, seed = self.settings.shots, self.settings.config.seed
        return f"{count} train images ({'all of them' if shots is None else f'{shots} per class, drawn with seed {seed}'})"

    def record(self, config: HeadConfig, **extra) -> dict:
        """config.json's record (and the checkpoint's ``config``): ``config``, ``extra``, the device and the weights."""
        return config_record(config, **extra, device=str(self.settings.device),
                             features_weights=self.train.attrs["weights_spec"])

    def row(self, *, params: str, val_top1: float, val_top5: float, train_images: int, seconds: float,
            folder: Path, checkpoint: Path | None, selected_by: str = "none") -> Experiment:
        """One row of the grid's table for this head (``selected_by``: which set chose its hyper-parameters;
        "none" for a head with nothing to choose)."""
        return Experiment(layer=self.settings.layer, head=self.settings.name, params=params,
                          shots=shots_name(self.settings.shots), val_top1=val_top1, val_top5=val_top5,
                          train_images=train_images, seconds=seconds, folder=folder, checkpoint=checkpoint,
                          backbone=self.backbone, dataset=dataset_name(self.train.attrs), selected_by=selected_by)

    def results(self) -> list[Path]:
        """The folders of its result.json files, in the table's order (pipeline.heads.plan.result_folders)."""
        settings = self.settings
        folders = result_folders(settings.config, settings.name, self.folder().name if self.grid else "",
                                 grid=self.grid, source=self.source, layer=settings.layer, shots=settings.shots)
        return [self.root / folder for folder in folders]  # "": the run folder


def one_folder(place: Place) -> list[str]:
    """The folders of a head that writes into one: its combination folder in a grid, none alone."""
    return [place.folder().name] if place.grid else []


def top_folders(place: Place) -> list[str]:
    """The entries of the run its result.json files live in, the run folder itself aside (a plain kNN run's k
    folders; a grid's combination folders)."""
    tops = [folder.relative_to(place.root).parts for folder in place.results()]
    return list(dict.fromkeys(parts[0] for parts in tops if parts))


@dataclass(frozen=True)
class HeadOutcome:
    """What publishing one head's result gives the run."""

    rows: tuple[Experiment, ...]  # one table row per trained head (a kNN run: one per k)
    names: tuple[str, ...]  # the heads run.json lists when this is the whole run (a sweep: one per lr, weight decay)
    best: Experiment | None  # the best row with a checkpoint (None: the head saves none)
    best_name: str | None = None  # how run.json names the best head when this is the whole run


@dataclass(frozen=True)
class Publisher:
    """How one head's result becomes files."""

    files: tuple[str, ...]  # every name it may write into a folder (what a folder without run.json must not hold)
    folders: Callable[[Place], list[str]]  # the folders it makes under the run: checked for clashes before training
    write: Callable[[HeadResult, Place], HeadOutcome]  # writes the result into the staged run
