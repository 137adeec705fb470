"""Each head's result written into its folder of the staged run, and its rows of the grid's table.

File names and CSV columns are what users and scripts read: ``history.csv`` (one row per epoch), ``path.csv``
(one per penalty, ``PenaltyFit``'s fields), ``knn.csv`` (one per k), ``sweep.csv`` (one per linear head, best
first), ``report.md`` with ``per_class.csv`` and ``confusions.csv``, and ``best.pt`` (a linear head's ``last.pt`` too).
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.common.checkpoint import make_checkpoint, save_checkpoint
from pipeline.common.config import LINEAR_WEIGHT_DECAY, LOGREG_WEIGHT_DECAY, HeadConfig
from pipeline.heads.interface import Predictions
from pipeline.heads.knn import KnnResult
from pipeline.heads.linear import LinearFit, LinearResult, combos
from pipeline.heads.logreg import LogregResult
from pipeline.heads.naming import folder_name, number
from pipeline.heads.publish import report
from pipeline.heads.publish.files import layer_attrs, write_config, write_csv, writing
from pipeline.heads.publish.place import HeadOutcome, Place, Publisher, one_folder
from pipeline.heads.rows import Experiment

SWEEP_COLUMNS = ("name", "lr", "weight_decay", "best_val_top1", "best_val_top5", "best_epoch", "last_val_top1",
                 "epoch_seconds")


def save_head(place: Place, path: Path, state: dict, metrics: dict, epoch: int, record: dict) -> None:
    """A head's checkpoint (pipeline.common.checkpoint), with the classes and attributes of the cache it was trained on."""
    with writing(place.stage, path):
        save_checkpoint(make_checkpoint(state, metrics=metrics, epoch=epoch, cache_attrs=layer_attrs(place.train),
                                        wnids=place.train.wnids, names=place.train.names, config=record), path)


def write_rows(place: Place, path: Path, rows: list[dict]) -> None:
    """One of a head's CSVs, whole."""
    with writing(place.stage, path):
        write_csv(path, rows)


def write_report(place: Place, folder: Path, predictions: Predictions, *, epoch: int, summary: str | None = None,
                 extra: list[str] = ()) -> None:
    """per_class.csv, confusions.csv and report.md; the report names the published folder, not the staging one."""
    with writing(place.stage, folder / "report.md"):
        report.write_class_report(
            folder, labels=place.val.labels, predictions=predictions.classes,
            metrics={"val_top1": predictions.val_top1, "val_top5": predictions.val_top5}, wnids=place.train.wnids,
            names=place.train.names, epoch=epoch, weights_spec=place.train.attrs["weights_spec"],
            title=place.title(folder), summary=summary, extra=extra)


# ---------------------------------------------------------------------------------------------
# linear: one folder per head (a sweep's heads in folders of their own), a sweep's table and best


@dataclass(frozen=True)
class Written:
    """A linear head as published: its name in run.json and sweep.csv, and its folder."""

    name: str
    folder: Path
    fit: LinearFit


def linear_folders(place: Place) -> list[str]:
    """A grid: one combination folder per (lr, weight decay); alone: a sweep's head folders (none for one head)."""
    pairs = combos(place.settings.config)
    if place.grid:
        return [place.folder(lr=lr, weight_decay=wd).name for lr, wd in pairs]
    return [folder_name(lr=lr, weight_decay=wd) for lr, wd in pairs] if len(pairs) > 1 else []


def write_linear(result: LinearResult, place: Place) -> HeadOutcome:
    """Alone: the run folder (a sweep: one folder per head, sweep.csv/.png and the best's best.pt); in a grid,
    each head into its own combination folder."""
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
    return HeadOutcome(rows=rows, names=tuple(head.name for head in ranked),
                       best=max(rows, key=lambda row: row.val_top1), best_name=ranked[0].name)  # max: the first of equals


def _linear_row(place: Place, result: LinearResult, head: Written) -> Experiment:
    """A head's table row: its best epoch's accuracy; its seconds include its share of loading the features."""
    recipe, best = head.fit.recipe, head.fit.trained.best.metrics
    params = f"lr={number(recipe.lr)} wd={number(recipe.weight_decay)}, epoch {best['epoch']}/{recipe.epochs}"
    return place.row(params=params, val_top1=best["val_top1"], val_top5=best["val_top5"],
                     train_images=result.train_images, seconds=head.fit.seconds + result.loading_seconds / len(result.fits),
                     folder=head.folder, checkpoint=head.folder / "best.pt")


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
    """config.json, history.csv, best.pt, last.pt, the plots and the report of one head."""
    fit, folder = head.fit, head.folder
    record = place.record(config, lr=fit.recipe.lr, weight_decay=fit.recipe.weight_decay, lrs=config.lr,
                          weight_decays=config.weight_decays(LINEAR_WEIGHT_DECAY))  # the checkpoint's config equals it
    write_config(place.stage, folder, record)
    write_rows(place, folder / "history.csv", list(fit.trained.history))
    for name, snapshot in (("best.pt", fit.trained.best), ("last.pt", fit.trained.last)):
        save_head(place, folder / name, snapshot.state, snapshot.metrics, snapshot.metrics["epoch"], record)
    with writing(place.stage, folder / "accuracy.png"):
        report.plot_history(list(fit.trained.history), folder, title=title)
    shots = place.settings.shots is not None
    write_report(place, folder, fit.predictions, epoch=fit.trained.best.metrics["epoch"],
                 extra=[f"Trained on {place.drawn(result.train_images)}; val untouched."] if shots else [])


# ---------------------------------------------------------------------------------------------
# logreg and knn: one folder


def write_logreg(result: LogregResult, place: Place) -> HeadOutcome:
    """config.json, path.csv (every penalty), the best head's best.pt and its report."""
    config, folder, best = place.settings.config, place.folder(), result.best
    record = place.record(replace(config, weight_decay=config.weight_decays(LOGREG_WEIGHT_DECAY)))
    write_config(place.stage, folder, record)
    write_rows(place, folder / "path.csv", [asdict(fit) for fit in result.path.fits])
    # a logreg checkpoint's "epoch": its L-BFGS iterations
    save_head(place, folder / "best.pt", result.state, {"epoch": best.iterations, **asdict(best)}, best.iterations, record)
    penalties = ",".join(number(fit.weight_decay) for fit in result.path.fits)
    write_report(place, folder, result.predictions, epoch=best.iterations,
                 summary=f"Logistic regression (L-BFGS), weight decay {number(best.weight_decay)} (best of "
                         f"{penalties}), {best.iterations} iterations:",
                 extra=[f"Trained on {place.drawn(result.train_images)}{' (streamed)' if result.streamed else ''}; "
                        "val untouched. The penalty path is in path.csv."])
    row = place.row(params=f"wd={number(best.weight_decay)} (best of {penalties}), {best.iterations} it.",
                    val_top1=best.val_top1, val_top5=best.val_top5, train_images=result.train_images,
                    seconds=result.seconds, folder=folder, checkpoint=folder / "best.pt")
    return HeadOutcome(rows=(row,), names=(place.settings.name,), best=row,
                       best_name=place.title(folder).name if place.grid else ".")


def write_knn(result: KnnResult, place: Place) -> HeadOutcome:
    """config.json, knn.csv (one row per k) and the best k's report; no checkpoint."""
    config, folder, count = place.settings.config, place.folder(), result.train_images
    write_config(place.stage, folder, place.record(config))
    write_rows(place, folder / "knn.csv", [{"k": score.k, "k_used": score.k_used, "temperature": result.temperature,
                                            "val_top1": score.val_top1, "val_top5": score.val_top5}
                                           for score in result.scores])
    shown = {score.k: f"{score.k}{'' if score.k_used == score.k else f' (all {count})'}" for score in result.scores}
    lines = ["## Every k", "", "| k | val top-1 | val top-5 |", "|---|---|---|"]
    lines += [f"| {shown[s.k]} | {s.val_top1:.2f}% | {s.val_top5:.2f}% |" for s in result.scores]
    write_report(place, folder, result.predictions, epoch=0,
                 summary=f"Weighted kNN (DINO), k={result.best.k} (best of {','.join(str(s.k) for s in result.scores)}), "
                         f"T={result.temperature:g}:",
                 extra=["", *lines, "", f"Neighbours from {place.drawn(count)}{' (streamed)' if result.streamed else ''}; "
                        "val untouched."])
    rows = tuple(place.row(params=f"k={shown[s.k]} T={result.temperature:g}", val_top1=s.val_top1,
                           val_top5=s.val_top5, train_images=count, seconds=result.seconds, folder=folder, checkpoint=None)
                 for s in result.scores)
    return HeadOutcome(rows=rows, names=(place.settings.name,), best=None)


LINEAR = Publisher(files=("config.json", "history.csv", "best.pt", "last.pt", "accuracy.png", "loss.png", "per_class.csv",
                          "confusions.csv", "report.md", "sweep.csv", "sweep.png"),
                   folders=linear_folders, write=write_linear)
LOGREG = Publisher(files=("config.json", "path.csv", "best.pt", "per_class.csv", "confusions.csv", "report.md"),
                   folders=one_folder, write=write_logreg)
KNN = Publisher(files=("config.json", "knn.csv", "per_class.csv", "confusions.csv", "report.md"),
                folders=one_folder, write=write_knn)
