"""Reports of a head run: the accuracy and loss curves, the sweep plot, and the per-class report."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API: no global backend, no pyplot state
from matplotlib.ticker import MaxNLocator

log = logging.getLogger(__name__)
TOP_CONFUSIONS = 20


def shown(path: Path | str) -> str:
    """A path as text a UTF-8 file can hold: bytes of a name that is not UTF-8 show as U+FFFD."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


SCORED = {"val": "val", "held": "held-out"}  # a history's scored set: its keys' prefix, and its name on a plot


def plot_history(history: list[dict], folder: Path, title: str | None = None, scored: str = "val") -> None:
    """accuracy.png and loss.png: train vs the scored set (val, or the held-out train rows) over the epochs."""
    epochs = [h["epoch"] for h in history]
    for name, train_key, val_key, ylabel in (("accuracy", "train_acc", f"{scored}_top1", "accuracy (%)"),
                                             ("loss", "train_loss", f"{scored}_loss", "cross-entropy loss")):
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        ax.plot(epochs, [h[train_key] for h in history], marker="o", label="train")
        ax.plot(epochs, [h[val_key] for h in history], marker="o",
                label=SCORED[scored] + (" top-1" if name == "accuracy" else ""))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title + ': ' if title else ''}{name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=100)


def plot_sweep(runs: list[tuple[str, list[dict], float]], folder: Path, scored: str = "val") -> None:
    """sweep.png: the scored set's top-1 over the epochs, one line per head; ``runs`` holds (name, history, best top-1)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, history, best in runs:
        ax.plot([h["epoch"] for h in history], [h[f"{scored}_top1"] for h in history], marker=".",
                label=f"{name} (best {best:.1f}%)")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{SCORED[scored]} top-1 (%)")
    ax.set_title("head sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "sweep.png", dpi=100)


def write_class_report(folder: Path, *, labels: np.ndarray, predictions: np.ndarray, metrics: dict,
                       wnids: list[str], names: list[str], epoch: int, weights_spec: str, title: Path | str | None = None,
                       summary: str | None = None, extra: list[str] = ()) -> None:
    """per_class.csv (accuracy per class, with names), confusions.csv (most-confused pairs), report.md.

    ``labels`` and ``predictions`` are the val classes and the head's top-1 for each val row; ``metrics``
    holds its val_top1 and val_top5 (in %). ``title``: the folder the report names (default ``folder``; a
    staged run names its final folder); ``summary`` replaces "Best epoch N:" (a head without epochs);
    ``extra`` lines end the report.
    """
    num_classes = len(wnids)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    totals = confusion.sum(1)
    accuracy = np.where(totals > 0, 100.0 * np.diag(confusion) / np.maximum(totals, 1), np.nan)
    with open(folder / "per_class.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["wnid", "name", "images", "correct", "accuracy"])
        for i in np.argsort(-np.nan_to_num(accuracy, nan=-1.0), kind="stable"):
            writer.writerow([wnids[i], names[i], int(totals[i]), int(confusion[i, i]), f"{accuracy[i]:.2f}"])
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    pairs = [(int(off[t, p]), t, p) for t, p in zip(*np.nonzero(off))]
    pairs.sort(key=lambda x: (-x[0], x[1], x[2]))
    with open(folder / "confusions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true_wnid", "true_name", "predicted_wnid", "predicted_name", "count", "share_of_true_class"])
        for count, t, p in pairs[:TOP_CONFUSIONS]:
            writer.writerow([wnids[t], names[t], wnids[p], names[p], count, f"{100.0 * count / totals[t]:.1f}"])
    order = np.argsort(-np.nan_to_num(accuracy, nan=-1.0), kind="stable")
    lines = [f"# Head report: {shown(title or folder)}", "",
             f"{summary or f'Best epoch {epoch}:'} val top-1 {metrics['val_top1']:.2f}%, top-5 {metrics['val_top5']:.2f}%, "
             f"{len(labels)} val images, {num_classes} classes.", "",
             f"Backbone weights: `{weights_spec}`"
             + (" (RANDOM: for testing only)" if str(weights_spec).startswith("random") else ""), "",
             "## Best classes", "", "| class | accuracy |", "|---|---|"]
    lines += [f"| {names[i]} ({wnids[i]}) | {accuracy[i]:.1f}% |" for i in order[:5]]
    lines += ["", "## Worst classes", "", "| class | accuracy |", "|---|---|"]
    lines += [f"| {names[i]} ({wnids[i]}) | {accuracy[i]:.1f}% |" for i in order[::-1][:5]]
    lines += ["", "## Most confused pairs", "", "| true | predicted as | images |", "|---|---|---|"]
    lines += [f"| {names[t]} | {names[p]} | {count} |" for count, t, p in pairs[:10]]
    if extra:
        lines += ["", *extra]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
