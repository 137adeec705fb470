"""The linear head's result written into the staged run, and its rows of the grid's table.

Chosen on val (``--select val``, the seed recipe's plain head): one folder per (lr, weight decay), each with
``history.csv``, ``best.pt`` and ``last.pt``, the curves, the report and its ``result.json``; alone with several,
a sweep (``sweep.csv``, ``sweep.png``, the best's ``best.pt``). Chosen on held-out train rows (``--select
train-split``): one folder, the chosen head refit on every train row (``history.csv``: its epochs, ``best.pt``),
``select.csv`` (every (lr, weight decay) and epoch on the held-out rows), the chosen one's curves, ``sweep.png`` for
several, the report and one ``result.json``.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.common.config import LINEAR_WEIGHT_DECAY, HeadConfig
from pipeline.heads.linear import LinearFit, LinearResult, combos
from pipeline.heads.naming import folder_name, number
from pipeline.heads.publish import report
from pipeline.heads.publish.files import write_config, writing
from pipeline.heads.publish.heads import save_head, selection_line, write_report, write_rows
from pipeline.heads.publish.place import HeadOutcome, Place, Publisher, one_folder
from pipeline.heads.publish.result import publish_result, result_record
from pipeline.heads.rows import Experiment

SWEEP_COLUMNS = ("name", "lr", "weight_decay", "best_val_top1", "best_val_top5", "best_epoch", "last_val_top1",
                 "epoch_seconds")


@dataclass(frozen=True)
class Written:
    """A linear head as published: its name in run.json and sweep.csv, and its folder."""

    name: str
    folder: Path
    fit: LinearFit


def linear_folders(place: Place) -> list[str]:
    """On val: in a grid one combination folder per (lr, weight decay), alone a sweep's head folders (none for one
    head); on held-out train rows: one folder for the chosen head, as logreg."""
    if place.settings.config.select_for("linear") == "train-split":
        return one_folder(place)
    pairs = combos(place.settings.config)
    if place.grid:
        return [place.folder(lr=lr, weight_decay=wd).name for lr, wd in pairs]
    return [folder_name(lr=lr, weight_decay=wd) for lr, wd in pairs] if len(pairs) > 1 else []


def write_linear(result: LinearResult, place: Place) -> HeadOutcome:
    """Alone: the run folder (a sweep: one folder per head, sweep.csv/.png and the best's best.pt); in a grid,
    each head into its own combination folder. Chosen on held-out rows: the refit head's one folder."""
    if result.selected_by == "train-split":
        return _write_refit(result, place)
    config = place.settings.config
    if place.grid:
        groups = []
        for fit in result.fits:
            lr, weight_decay = fit.recipe.lr, fit.recipe.weight_decay
            folder = place.folder(lr=lr, weight_decay=weight_decay)
            narrowed = replace(config, out=place.title(folder), lr=(lr,), weight_decay=(weight_decay,))
            groups.append((narrowed, folder, (fit,)))
    else:
        groups = [(config, place.root, result.fits)]
    heads = [head for group in groups for head in _write_sweep(place, result, *group)]
    rows = tuple(_linear_row(place, result, head) for head in heads)
    ranked = sorted(heads, key=lambda head: -head.fit.best_top1)
    for head, row in zip(heads, rows):
        publish_result(place, head.folder, _result(place, result, head.fit, row, chosen=head is ranked[0]))
    return HeadOutcome(rows=rows, names=tuple(head.name for head in ranked),
                       best=max(rows, key=lambda row: row.val_top1), best_name=ranked[0].name)  # max: the first of equals


def _result(place: Place, result: LinearResult, fit: LinearFit, row: Experiment, *, chosen: bool) -> dict:
    """A head's result.json record."""
    metrics = fit.trained.best.metrics
    return result_record(place, selected_by=result.selected_by, chosen=chosen, hyper_parameters=row.params,
                         top1=metrics["val_top1"], top5=metrics["val_top5"], mean_per_class=fit.predictions.mean_per_class,
                         train_images=result.train_images, seconds=row.seconds, checkpoint=True,
                         held_images=result.held_images, lr=fit.recipe.lr, weight_decay=fit.recipe.weight_decay,
                         epochs=metrics["epoch"])


def _linear_row(place: Place, result: LinearResult, head: Written) -> Experiment:
    """A head's table row: its best epoch's accuracy; its seconds include its share of loading the features."""
    recipe, best = head.fit.recipe, head.fit.trained.best.metrics
    params = f"lr={number(recipe.lr)} wd={number(recipe.weight_decay)}, epoch {best['epoch']}/{recipe.epochs}"
    if result.selected_by == "train-split":
        params = (f"lr={number(recipe.lr)} wd={number(recipe.weight_decay)}, {recipe.epochs} epochs (chosen of "
                  f"{len(result.candidates)} x {place.settings.config.epochs} on held-out rows), refit")
    return place.row(params=params, val_top1=best["val_top1"], val_top5=best["val_top5"],
                     train_images=result.train_images, seconds=head.fit.seconds + result.loading_seconds / len(result.fits),
                     folder=head.folder, checkpoint=head.folder / "best.pt", selected_by=result.selected_by)


def _write_sweep(place: Place, result: LinearResult, config: HeadConfig, folder: Path,
                 fits: tuple[LinearFit, ...]) -> list[Written]:
    """Every head of ``fits`` into ``folder`` (several: a folder each, and the sweep's files); best first."""
    sweep = len(fits) > 1
    heads = []
    for fit in fits:
        name = folder_name(lr=fit.recipe.lr, weight_decay=fit.recipe.weight_decay) if sweep else place.title(folder).name
        heads.append(Written(name, folder / name if sweep else folder, fit))
        _write_linear_head(place, result, config, heads[-1], title=name if sweep else None)
    heads.sort(key=lambda head: -head.fit.best_top1)
    if sweep:
        with writing(place.stage, folder / "best.pt"):
            shutil.copyfile(heads[0].folder / "best.pt", folder / "best.pt")
        write_rows(place, folder / "sweep.csv", [_sweep_row(head) for head in heads])
        with writing(place.stage, folder / "sweep.png"):
            report.plot_sweep([(head.name, head.fit.trained.history, head.fit.best_top1) for head in heads], folder)
    return heads


def _sweep_row(head: Written) -> dict:
    trained = head.fit.trained
    best = trained.best.metrics
    values = (head.name, head.fit.recipe.lr, head.fit.recipe.weight_decay, best["val_top1"], best["val_top5"],
              best["epoch"], trained.last.metrics["val_top1"],
              float(np.mean([epoch["train_seconds"] for epoch in trained.history])))
    return dict(zip(SWEEP_COLUMNS, values))


def _write_linear_head(place: Place, result: LinearResult, config: HeadConfig, head: Written, title: str | None) -> None:
    """config.json, history.csv, best.pt, last.pt, the plots and the report of one head chosen on val."""
    fit, folder = head.fit, head.folder
    record = place.record(config, lr=fit.recipe.lr, weight_decay=fit.recipe.weight_decay, lrs=config.lr,
                          weight_decays=config.weight_decays(LINEAR_WEIGHT_DECAY),
                          selected_by="val")  # the checkpoint's config equals it
    write_config(place.stage, folder, record)
    write_rows(place, folder / "history.csv", list(fit.trained.history))
    for name, snapshot in (("best.pt", fit.trained.best), ("last.pt", fit.trained.last)):
        save_head(place, folder / name, snapshot.state, snapshot.metrics, snapshot.metrics["epoch"], record)
    with writing(place.stage, folder / "accuracy.png"):
        report.plot_history(list(fit.trained.history), folder, title=title)
    shots = place.settings.shots is not None
    chosen = (f"The seed recipe: {fit.recipe.epochs} epochs, the epoch with the best val top-1 kept "
              f"(epoch {fit.trained.best.metrics['epoch']}).")
    write_report(place, folder, fit.predictions, epoch=fit.trained.best.metrics["epoch"],
                 extra=[*([f"Trained on {place.drawn(result.train_images)}."] if shots else []), chosen,
                        selection_line("val", what="The epoch")])


def _write_refit(result: LinearResult, place: Place) -> HeadOutcome:
    """Chosen on held-out rows: the refit head's folder (its history, best.pt, report, result.json) and select.csv."""
    config, folder, fit = place.settings.config, place.folder(), result.fits[0]
    chosen = result.candidates[result.chosen]
    record = place.record(config, lr=fit.recipe.lr, weight_decay=fit.recipe.weight_decay, epochs_chosen=fit.recipe.epochs,
                          lrs=config.lr, weight_decays=config.weight_decays(LINEAR_WEIGHT_DECAY), selected_by="train-split")
    write_config(place.stage, folder, record)
    write_rows(place, folder / "history.csv", list(fit.trained.history))
    write_rows(place, folder / "select.csv", [{"lr": c.recipe.lr, "weight_decay": c.recipe.weight_decay, **epoch}
                                              for c in result.candidates for epoch in c.trained.history])
    final = fit.trained.last
    save_head(place, folder / "best.pt", final.state, final.metrics, final.metrics["epoch"], record)
    with writing(place.stage, folder / "accuracy.png"):
        report.plot_history(list(chosen.trained.history), folder, title="chosen on held-out rows", scored="held")
    if len(result.candidates) > 1:
        with writing(place.stage, folder / "sweep.png"):
            report.plot_sweep([(folder_name(lr=c.recipe.lr, weight_decay=c.recipe.weight_decay), c.trained.history,
                                c.held_top1) for c in result.candidates], folder, scored="held")
    write_report(place, folder, fit.predictions, epoch=fit.recipe.epochs,
                 summary=f"SGD lr {number(fit.recipe.lr)}, weight decay {number(fit.recipe.weight_decay)}, "
                         f"{fit.recipe.epochs} epochs on all train rows:",
                 extra=[f"Trained on {place.drawn(result.train_images)}.",
                        selection_line("train-split", held=result.held_images, fraction=config.select_fraction,
                                       rows=result.train_images, what="lr, weight decay and the epoch count"),
                        "Each (lr, weight decay) on the held-out rows, every epoch: select.csv."])
    head = Written(place.title(folder).name, folder, fit)
    row = _linear_row(place, result, head)
    publish_result(place, folder, _result(place, result, fit, row, chosen=True))
    return HeadOutcome(rows=(row,), names=(head.name,), best=row, best_name=head.name)


LINEAR = Publisher(files=("config.json", "history.csv", "best.pt", "last.pt", "accuracy.png", "loss.png", "per_class.csv",
                          "confusions.csv", "report.md", "sweep.csv", "sweep.png", "select.csv", "result.json"),
                   folders=linear_folders, write=write_linear)
