"""The grid's comparison: experiments.csv, experiments.md and experiments.png, one row per combination."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from matplotlib.figure import Figure  # the object API, as pipeline.heads.publish.report

from features.atomic import write_atomic
from pipeline.heads.publish.report import shown
from pipeline.heads.rows import COLUMNS, Experiment

HEAD_COLOURS = {"linear": "tab:blue", "logreg": "tab:orange", "knn": "tab:green"}


def write_table(out: Path, rows: list[Experiment], best: Experiment | None, weights_spec: str, *,
                title: Path | None = None) -> None:
    """experiments.csv, experiments.md and experiments.png in ``out``; each written whole, then renamed.

    ``title``: the folder experiments.md names (default ``out``; a staged grid names its final folder).
    """
    records = [row.record(out) for row in rows]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(records)
    write_atomic(out / "experiments.csv", table.getvalue())

    lines = [f"# Head experiments: {shown(title or out)}", ""]
    if best is not None:
        lines += [f"Best head with a checkpoint: `{os.path.relpath(best.folder, out)}` (val top-1 {best.val_top1:.2f}%), "
                  "copied to `best.pt`.", ""]
    if str(weights_spec).startswith("random"):
        lines += [f"Backbone weights: `{weights_spec}` (RANDOM: for testing only, accuracy is not meaningful).", ""]
    several = len({r.backbone for r in rows}) > 1  # a backbone column only where backbones are compared
    datasets = len({r.dataset for r in rows}) > 1  # a dataset column only where datasets are
    lead = ("| dataset " if datasets else "") + ("| backbone " if several else "")
    lines += [lead + "| layer | head | hyper-parameters | selected by | shots | val top-1 | val top-5 | train images | "
              "seconds |", "|---" * (datasets + several) + "|---|---|---|---|---|---:|---:|---:|---:|"]
    lines += [(f"| {r['dataset']} " if datasets else "") + (f"| {r['backbone']} " if several else "")
              + f"| {r['layer']} | {r['head']} | {r['hyper_parameters']} | {r['selected_by']} | {r['shots']} | "
              f"{r['val_top1']:.2f}% | {r['val_top5']:.2f}% | {r['train_images']} | {r['seconds']:.1f} |" for r in records]
    lines += ["", "Seconds include loading the features; the rows of one kNN run (one per k) share one search. "
              "Selected by train-split: the hyper-parameters (weight decay or C, k, lr and epochs) were chosen on "
              "held-out train images, then refit on all train images; val: chosen on val itself (the plain linear "
              "head's best epoch), so that val top-1 is optimistic."]
    write_atomic(out / "experiments.md", "\n".join(lines) + "\n")
    plot_experiments(rows, out / "experiments.png")


def plot_experiments(rows: list[Experiment], path: Path) -> None:
    """One horizontal bar per row: val top-1 (solid) over val top-5 (pale), coloured by head."""
    fig = Figure(figsize=(9, 1.2 + 0.32 * len(rows)))
    ax = fig.subplots()
    positions = list(range(len(rows)))[::-1]  # first row on top
    colours = [HEAD_COLOURS.get(r.head, "tab:gray") for r in rows]
    ax.barh(positions, [r.val_top5 for r in rows], color=colours, alpha=0.3, label="val top-5")
    ax.barh(positions, [r.val_top1 for r in rows], color=colours, label="val top-1")
    for y, r in zip(positions, rows):
        ax.text(r.val_top1 + 0.5, y, f"{r.val_top1:.1f}", va="center", fontsize=7)
    several = len({r.backbone for r in rows}) > 1
    ax.set_yticks(positions, [f"{r.backbone + ' ' if several else ''}{r.layer} {r.head} {r.shots} {r.params}" for r in rows], fontsize=7)
    ax.set_xlabel("val accuracy (%)  (solid: top-1, pale: top-5)")
    ax.set_xlim(0, 100)
    ax.set_title("head experiments")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    write_atomic(path, write=lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
