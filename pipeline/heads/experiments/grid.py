"""Quick head experiments on the cache: (backbones x) layers x heads x shots (x hyper-parameters) in one command.

Several caches of one dataset (``--features A,B``) compare backbones: their combinations' folders start with
the backbone (``resnet18_penultimate_linear_all``) and the table's backbone column tells their rows apart.

One combination is a plain run: its outputs go straight into ``--out`` (a plain linear run, or a linear
lr x weight-decay sweep). Several make a grid: one folder per combination,
``<out>/<layer>_<head>_<shots>[_lr.._wd..]/`` (pipeline.heads.naming), one table (experiments.csv and .md),
one plot (experiments.png), and the best head that has a checkpoint copied to ``<out>/best.pt``. Every kind
of run is one staged run (pipeline.heads.run_folder) under ``--out``'s lock, published whole with run.json.

The grid is a loop over pipeline.heads.registry: each head's ``fit`` gets the same readers and settings and
returns its result (pipeline.heads.interface); its publisher writes it into the staged run (pipeline.heads.publish).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.common.hardware import resolve_device
from pipeline.common.config import HeadConfig
from pipeline.common.errors import UserError
from pipeline.heads.experiments.shots import few_shot_rows
from pipeline.heads.interface import HeadSettings
from pipeline.heads.naming import shots_name
from pipeline.heads.publish.files import commit, final_path, prepare_out
from pipeline.heads.publish.place import HeadOutcome, Place
from pipeline.heads.publish.run import GRID_FILES, write_run
from pipeline.heads.readers import FeatureReader
from pipeline.heads.registry import HEADS
from pipeline.heads.rows import Experiment
from pipeline.heads.run_folder import MARKER, TOOL, StagedRun, check_clashes, exclusive_run, refuse_foreign
from pipeline.heads.sources import Source, open_sources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentsResult:
    out: Path
    rows: tuple[Experiment, ...]  # in grid order
    best: Path | None  # the best checkpoint (None when only knn ran)
    weights_spec: str


def is_grid(config: HeadConfig, sources: list[Source] | None = None) -> bool:
    layers = sum(len(s.layers) for s in sources) if sources else len(config.layers or (None,))
    return layers * len(config.head) * len(config.shots) > 1


def own_names() -> set[str]:
    """Every name a head run writes at the top of a folder: what a folder without run.json must not hold."""
    return {MARKER, *GRID_FILES, *(name for head in HEADS.values() for name in head.publisher.files)}


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


def _places(config: HeadConfig, sources: list[Source], stage: StagedRun, device) -> list[Place]:
    """Every (cache, layer, head, shots) combination: its settings, and where its files go."""
    grid = is_grid(config, sources)
    return [Place(HeadSettings(replace(config, features=source.folder, layers=(layer,), head=(head,), shots=(shots,)),
                               device), stage=stage, grid=grid, train=source.splits[layer][0], val=source.splits[layer][1],
                  source=source.label, backbone=source.label or source.backbone)  # two caches of one backbone: by folder
            for source in sources for layer, head, shots in itertools.product(source.layers, config.head, config.shots)]


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
    weights_spec = train_split.attrs["weights_spec"]
    out = Path(config.out)
    prepare_out(out)  # a --out that cannot be written is one line, before anything runs
    # every kind of run is one staged run under --out's lock, published whole with run.json: a rerun replaces
    # exactly the previous run's files, and a kill or a full disk before the publish leaves the previous run
    with exclusive_run(out, TOOL), StagedRun(out) as stage:
        refuse_foreign(out, own_names())  # a folder the tool did not make is not the tool's to clean
        places = _places(config, sources, stage, device)
        # a folder of the user's named like a combination or a sweep's head: one line now, not after the training
        check_clashes(out, [name for place in places for name in HEADS[place.settings.name].publisher.folders(place)])
        outcomes = [_run_one(number, place, train_rows, len(places)) for number, place in enumerate(places, 1)]
        published = write_run(stage, config, outcomes, grid=places[0].grid, weights_spec=weights_spec)
        commit(stage, published.record, own_names())
    rows = tuple(replace(row, folder=final_path(stage, row.folder),
                         checkpoint=row.checkpoint and final_path(stage, row.checkpoint)) for row in published.rows)
    return ExperimentsResult(out=out, rows=rows, best=published.best and final_path(stage, published.best),
                             weights_spec=weights_spec)


def _run_one(number: int, place: Place, train_rows: dict, total: int) -> HeadOutcome:
    """One combination: its head's ``fit`` on the cache, then its publisher, into the staging folder."""
    settings = place.settings
    log.info("[%d/%d] %s%s %s %s", number, total, f"{place.source} " if place.source else "", settings.layer,
             settings.name, shots_name(settings.shots))
    head = HEADS[settings.name]
    result = head.fit(FeatureReader(place.train, train_rows[place.source, settings.shots]), FeatureReader(place.val),
                      settings)
    return head.publisher.write(result, place)
