"""Each head's result written into its folder of the staged run, and its rows of the grid's table: logreg and kNN
here, linear in pipeline.heads.publish.linear, with the writers they share.

File names and CSV columns are what users and scripts read: ``path.csv`` (one per penalty, and the refit,
``PenaltyFit``'s fields), ``knn.csv`` (one per k), ``report.md`` with ``per_class.csv`` and ``confusions.csv``,
``best.pt``, and ``result.json`` (pipeline.heads.store) beside every fit's files: a kNN run's in one folder per k.
"""
from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path

from pipeline.common.checkpoint import make_checkpoint, save_checkpoint
from pipeline.common.config import LOGREG_WEIGHT_DECAY
from pipeline.heads.interface import Predictions
from pipeline.heads.knn import KnnResult
from pipeline.heads.logreg import LogregResult
from pipeline.heads.naming import number
from pipeline.heads.publish import report
from pipeline.heads.publish.files import layer_attrs, write_config, write_csv, writing
from pipeline.heads.publish.place import HeadOutcome, Place, Publisher, one_folder, top_folders
from pipeline.heads.publish.result import publish_result, result_record


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


def selection_line(selected_by: str, *, what: str, held: int = 0, fraction: float = 0.0, rows: int = 0) -> str:
    """The report's line saying which set chose the hyper-parameters (``selected_by``)."""
    if selected_by == "train-split":
        return (f"Selected by train-split: {what} chosen on {held} train images held out ({fraction:.0%} of each class, "
                f"by a hash of their paths), then refit on all {rows} train images; val evaluated once.")
    return (f"Selected by val: {what} chosen on val itself, so its val top-1 is optimistic "
            "(--select train-split chooses on held-out train images).")


# ---------------------------------------------------------------------------------------------
# logreg: one folder; kNN: one folder, and one result.json per k


def finite_fields(fit) -> dict:
    """A PenaltyFit's numbers a checkpoint's metrics may hold (a C of 0 penalty is inf; unscored sets are None)."""
    return {name: value for name, value in asdict(fit).items()
            if isinstance(value, (int, float)) and math.isfinite(value)}


def write_logreg(result: LogregResult, place: Place) -> HeadOutcome:
    """config.json, path.csv (every penalty, and the refit), the head's best.pt, its report and its result.json."""
    config, folder, final, chosen = place.settings.config, place.folder(), result.best, result.chosen
    asked = config.weight_decay if config.is_sweep else config.weight_decays(LOGREG_WEIGHT_DECAY)
    record = place.record(replace(config, weight_decay=asked), selected_by=result.selected_by)
    write_config(place.stage, folder, record)
    write_rows(place, folder / "path.csv", [asdict(fit) for fit in (*result.path.fits, *filter(None, [result.path.refit]))])
    # a logreg checkpoint's "epoch": its L-BFGS iterations
    save_head(place, folder / "best.pt", result.state, {"epoch": final.iterations, **finite_fields(final)},
              final.iterations, record)
    values = config.weight_decay if config.is_sweep else ",".join(number(fit.weight_decay) for fit in result.path.fits)
    if result.selected_by == "train-split":
        params = (f"C={chosen.C:.3g} (best of {values} on held-out rows), refit wd={final.weight_decay:.3g}, "
                  f"{final.iterations} it.")
    else:
        params = f"wd={number(final.weight_decay)} (best of {values}), {final.iterations} it."
    write_report(place, folder, result.predictions, epoch=final.iterations,
                 summary=f"Logistic regression (L-BFGS), C {chosen.C:.3g} (weight decay {final.weight_decay:.3g} on "
                         f"{final.rows} rows), {final.iterations} iterations:",
                 extra=[f"Trained on {place.drawn(result.train_images)}{' (streamed)' if result.streamed else ''}.",
                        selection_line(result.selected_by, what=f"C (of {values})", held=result.held_images,
                                       fraction=config.select_fraction, rows=result.train_images),
                        "The penalty path (and the refit) is in path.csv."])
    row = place.row(params=params, val_top1=final.val_top1, val_top5=final.val_top5, train_images=result.train_images,
                    seconds=result.seconds, folder=folder, checkpoint=folder / "best.pt", selected_by=result.selected_by)
    publish_result(place, folder, result_record(
        place, selected_by=result.selected_by, chosen=True, hyper_parameters=params, top1=final.val_top1,
        top5=final.val_top5, mean_per_class=result.predictions.mean_per_class, train_images=result.train_images,
        seconds=result.seconds, checkpoint=True, held_images=result.held_images, chosen_C=chosen.C,
        weight_decay=final.weight_decay, refit_objective=final.objective, iterations=final.iterations,
        stopped=final.stopped))
    return HeadOutcome(rows=(row,), names=(place.settings.name,), best=row,
                       best_name=place.title(folder).name if place.grid else ".")


def write_knn(result: KnnResult, place: Place) -> HeadOutcome:
    """config.json, knn.csv (one row per k), the chosen k's report, and one folder per k with its result.json."""
    config, folder, count = place.settings.config, place.folder(), result.train_images
    write_config(place.stage, folder, place.record(config, selected_by=result.selected_by))
    write_rows(place, folder / "knn.csv", [{"k": s.k, "k_used": s.k_used, "temperature": result.temperature,
                                            "val_top1": s.val_top1, "val_top5": s.val_top5, "held_top1": s.held_top1,
                                            "held_top5": s.held_top5, "mean_per_class": s.mean_per_class}
                                           for s in result.scores])
    shown = {s.k: f"{s.k}{'' if s.k_used == s.k else f' (all {count})'}" for s in result.scores}
    held = result.selected_by == "train-split"
    lines = ["## Every k", "", f"| k |{' held-out top-1 |' if held else ''} val top-1 | val top-5 |",
             f"|---|{'---|' if held else ''}---|---|"]
    lines += [f"| {shown[s.k]} |{f' {s.held_top1:.2f}% |' if held else ''} {s.val_top1:.2f}% | {s.val_top5:.2f}% |"
              for s in result.scores]
    ks = ",".join(str(s.k) for s in result.scores)
    write_report(place, folder, result.predictions, epoch=0,
                 summary=f"Weighted kNN (DINO), k={result.best.k} (chosen of {ks}), T={result.temperature:g}:",
                 extra=["", *lines, "", f"Neighbours from {place.drawn(count)}{' (streamed)' if result.streamed else ''}.",
                        selection_line(result.selected_by, what="k", held=result.held_images,
                                       fraction=config.select_fraction, rows=count)])
    rows = []
    for s, where in zip(result.scores, place.results()):
        chosen = s.k == result.best.k
        params = f"k={shown[s.k]} T={result.temperature:g}{', chosen' if chosen else ''}"
        rows.append(place.row(params=params, val_top1=s.val_top1, val_top5=s.val_top5, train_images=count,
                              seconds=result.seconds, folder=folder, checkpoint=None, selected_by=result.selected_by))
        publish_result(place, where, result_record(
            place, selected_by=result.selected_by, chosen=chosen, hyper_parameters=params, top1=s.val_top1,
            top5=s.val_top5, mean_per_class=s.mean_per_class, train_images=count, seconds=result.seconds,
            checkpoint=False, held_images=result.held_images, k=s.k, k_used=s.k_used, temperature=result.temperature,
            held_top1=s.held_top1))
    return HeadOutcome(rows=tuple(rows), names=(place.settings.name,), best=None)


def knn_folders(place: Place) -> list[str]:
    """Its combination folder in a grid; alone, the folder of each k's result.json."""
    return one_folder(place) if place.grid else top_folders(place)


LOGREG = Publisher(files=("config.json", "path.csv", "best.pt", "per_class.csv", "confusions.csv", "report.md",
                          "result.json"), folders=one_folder, write=write_logreg)
KNN = Publisher(files=("config.json", "knn.csv", "per_class.csv", "confusions.csv", "report.md"),
                folders=knn_folders, write=write_knn)
