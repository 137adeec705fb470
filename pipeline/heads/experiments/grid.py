"""Quick head experiments on the cache: (caches x) layers x heads x shots (x hyper-parameters) in one command.

Several caches (``--features A,B``: other backbones, or other datasets) are compared in one grid: their
combinations' folders start with the cache's label (``resnet18_penultimate_linear_all``), each head is trained and
scored on its own cache, and the table's dataset and backbone columns tell their rows apart.

One combination is a plain run: its outputs go straight into ``--out`` (a plain linear run, or a linear
lr x weight-decay sweep). Several make a grid: one folder per combination,
``<out>/<layer>_<head>_<shots>[_lr.._wd..]/`` (pipeline.heads.naming), one table (experiments.csv and .md),
one plot (experiments.png), and the best head that has a checkpoint copied to ``<out>/best.pt``. Every kind
of run is one staged run (pipeline.heads.run_folder) under ``--out``'s lock, published whole with run.json.

The grid is a loop over pipeline.heads.registry: each head's ``fit`` gets the same readers and settings and
returns its result (pipeline.heads.interface); its publisher writes it into the staged run (pipeline.heads.publish).
With ``--skip-existing`` (on in grids and sweeps) a combination whose every result.json in ``--out`` is fresh
(pipeline.heads.store) is not trained again: its folders are copied into the new run as they are.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.common.config import ZERO_SHOT, HeadConfig
from pipeline.common.errors import UserError
from pipeline.common.hardware import resolve_device
from pipeline.heads.experiments.shots import few_shot_rows
from pipeline.heads.interface import HeadSettings
from pipeline.heads.naming import shots_name
from pipeline.heads.plan import check_zero_shot, head_shots, is_grid as grid_of, normalized, plan_run
from pipeline.heads.prompts import class_names
from pipeline.heads.publish.files import commit, final_path, prepare_out
from pipeline.heads.publish.place import HeadOutcome, Place
from pipeline.heads.publish.run import GRID_FILES, write_run
from pipeline.heads.readers import FeatureReader
from pipeline.heads.registry import HEADS
from pipeline.heads.rows import Experiment
from pipeline.heads.run_folder import MARKER, TOOL, StagedRun, check_clashes, exclusive_run, read_run_record, refuse_foreign
from pipeline.heads.selection import held_out
from pipeline.heads.sources import Source, open_sources
from pipeline.heads.store import fresh

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExperimentsResult:
    out: Path
    rows: tuple[Experiment, ...]  # in grid order
    best: Path | None  # the best checkpoint (None when only knn ran)
    weights_spec: str
    kept: int = 0  # combinations not trained again (--skip-existing): their fresh results kept


def is_grid(config: HeadConfig, sources: list[Source]) -> bool:
    return grid_of(sum(len(s.layers) * len(head_shots(config, s.backbone)) for s in sources))


def own_names() -> set[str]:
    """Every name a head run writes at the top of a folder: what a folder without run.json must not hold."""
    return {MARKER, *GRID_FILES, *(name for head in HEADS.values() for name in head.publisher.files)}


def checked(config: HeadConfig) -> HeadConfig:
    """``config`` checked, each repeated value once, its heads known."""
    config = normalized(config)
    unknown = [head for head in config.head if head not in HEADS]
    if unknown:
        raise UserError(f"--head {','.join(unknown)}: use {', '.join(HEADS)} (a comma list compares them)")
    return config


def _places(config: HeadConfig, sources: list[Source], stage: StagedRun, device) -> list[Place]:
    """Every (cache, layer, head, shots) combination: its settings, and where its files go."""
    grid = is_grid(config, sources)
    for source in sources:
        if ZERO_SHOT in config.head and not any(head == ZERO_SHOT for head, _ in head_shots(config, source.backbone)):
            log.info("%s: skipped on %s, whose %s features have no text tower to build it from (a CLIP cache has one)",
                     ZERO_SHOT, source.folder, source.backbone)
    return [Place(HeadSettings(replace(config, features=source.folder, layers=(layer,), head=(head,), shots=(shots,)),
                               device), stage=stage, grid=grid, train=source.splits[layer][0], val=source.splits[layer][1],
                  source=source.label, backbone=source.label or source.backbone)  # two caches of one backbone: by folder
            for source in sources for layer in source.layers for head, shots in head_shots(config, source.backbone)]


def _check_selections(places: list[Place], train_rows: dict) -> None:
    """A head choosing on held-out train rows needs two rows of every class, a zero-shot head a name for each class:
    one line now, not after the training."""
    for place in places:
        config = place.settings.config
        if place.settings.name == ZERO_SHOT:
            class_names(place.train.wnids, place.train.names, config.class_prompts)
        if config.select_for(place.settings.name) == "train-split":
            reader = FeatureReader(place.train, train_rows[place.source, place.settings.shots])
            held_out(reader.paths, reader.labels, config.select_fraction, place.train.wnids)


def run_experiments(config: HeadConfig) -> ExperimentsResult:
    """Run every (layer, head, shots) combination of ``config``; see the module docstring for the outputs."""
    config = checked(config)
    device = resolve_device(config.device)
    sources = open_sources(config)  # every cache and layer there, first
    check_zero_shot(config, [s.folder for s in sources], [s.backbone for s in sources])
    train_rows = {(s.label, shots): None if shots is None else few_shot_rows(s.train.labels, shots, seed=config.seed,
                                                                             wnids=s.train.wnids)
                  for s in sources for shots in config.shots}  # per cache: its own rows
    weights_spec = sources[0].train.attrs["weights_spec"]
    out = Path(config.out)
    prepare_out(out)  # a --out that cannot be written is one line, before anything runs
    # every kind of run is one staged run under --out's lock, published whole with run.json: a rerun replaces
    # exactly the previous run's files, and a kill or a full disk before the publish leaves the previous run
    with exclusive_run(out, TOOL), StagedRun(out) as stage:
        refuse_foreign(out, own_names())  # a folder the tool did not make is not the tool's to clean
        places = _places(config, sources, stage, device)
        # a folder of the user's named like a combination or a sweep's head: one line now, not after the training
        check_clashes(out, [name for place in places for name in HEADS[place.settings.name].publisher.folders(place)])
        _check_selections(places, train_rows)
        kept = _fresh(config, out, places[0].grid)
        outcomes = [_carry(place, kept[_key(place)], out, stage) if _key(place) in kept
                    else _run_one(number, place, train_rows, len(places)) for number, place in enumerate(places, 1)]
        published = write_run(stage, config, outcomes, grid=places[0].grid, weights_spec=weights_spec)
        commit(stage, published.record, own_names())
    rows = tuple(replace(row, folder=final_path(stage, row.folder),
                         checkpoint=row.checkpoint and final_path(stage, row.checkpoint)) for row in published.rows)
    return ExperimentsResult(out=out, rows=rows, best=published.best and final_path(stage, published.best),
                             weights_spec=weights_spec, kept=sum(_key(place) in kept for place in places))


def _key(place: Place) -> tuple:
    settings = place.settings
    return place.source, settings.layer, settings.name, settings.shots


def _fresh(config: HeadConfig, out: Path, grid: bool) -> dict:
    """--skip-existing (on in grids and sweeps): the combinations of a grid whose every result.json in ``out`` is fresh."""
    if not (config.skips_existing(grid) and grid):  # one combination is the whole run: kept only when nothing is to do (store.already_done)
        return {}
    kept = fresh(out, plan_run(config)[1])
    if kept:
        log.info("--skip-existing: %d combination%s in %s already done with these caches and settings: kept, not "
                 "trained again", len(kept), "" if len(kept) == 1 else "s", out)
    return kept


def _carry(place: Place, results: list[tuple[str, dict]], out: Path, stage: StagedRun) -> HeadOutcome:
    """A fresh combination of the previous run: its folders copied into the staged run as the previous run recorded
    them (the user's files there stay out), and its table rows from its result.json files."""
    contents = (read_run_record(out) or {}).get("contents") or {}
    for top in dict.fromkeys(Path(folder).parts[0] for folder, _ in results):
        (stage.path / top).mkdir()
        for name in contents.get(top, ()):
            source, target = out / top / name, stage.path / top / name
            if source.is_dir():
                shutil.copytree(source, target)
            else:
                shutil.copy2(source, target)
    rows = tuple(Experiment.from_result(record, place.folder() if place.settings.name == "knn" else stage.path / folder,
                                        place.backbone) for folder, record in results)
    with_checkpoint = [row for row in rows if row.checkpoint is not None]
    return HeadOutcome(rows=rows, names=tuple(dict.fromkeys(Path(folder).parts[0] for folder, _ in results)),
                       best=max(with_checkpoint, key=lambda row: row.val_top1) if with_checkpoint else None)


def _run_one(number: int, place: Place, train_rows: dict, total: int) -> HeadOutcome:
    """One combination: its head's ``fit`` on the cache, then its publisher, into the staging folder."""
    settings = place.settings
    log.info("[%d/%d] %s%s %s %s", number, total, f"{place.source} " if place.source else "", settings.layer,
             settings.name, shots_name(settings.shots))
    head = HEADS[settings.name]
    rows = train_rows.get((place.source, settings.shots))  # zero-shot (0 shots) reads no train row
    result = head.fit(FeatureReader(place.train, rows), FeatureReader(place.val), settings)
    return head.publisher.write(result, place)
