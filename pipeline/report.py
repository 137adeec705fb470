"""Reports of a head run: the accuracy and loss curves, the sweep plot, and the per-class report."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

log = logging.getLogger(__name__)
TOP_CONFUSIONS = 20


def plot_history(history: list[dict], folder: Path, title: str | None = None) -> None:
    """accuracy.png and loss.png: train vs val over the epochs."""
    epochs = [h["epoch"] for h in history]
    for name, train_key, val_key, ylabel in (("accuracy", "train_acc", "val_top1", "accuracy (%)"),
                                             ("loss", "train_loss", "val_loss", "cross-entropy loss")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(epochs, [h[train_key] for h in history], marker="o", label="train")
        ax.plot(epochs, [h[val_key] for h in history], marker="o", label="val" + (" top-1" if name == "accuracy" else ""))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title + ': ' if title else ''}{name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=100)
        plt.close(fig)


def plot_sweep(results: list[dict], folder: Path) -> None:
    """sweep.png: val top-1 over the epochs, one line per head."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot([h["epoch"] for h in r["history"]], [h["val_top1"] for h in r["history"]], marker=".",
                label=f"{r['name']} (best {r['best_val_top1']:.1f}%)")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("val top-1 (%)")
    ax.set_title("head sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "sweep.png", dpi=100)
    plt.close(fig)


def write_class_report(checkpoint_path: Path, val, val_split, device, folder: Path) -> dict:
    """per_class.csv (accuracy per class, with names), confusions.csv (most-confused pairs), report.md."""
    from pipeline.train_head import Standardizer, evaluate

    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    head = nn.Linear(checkpoint["feature_dim"], checkpoint["num_classes"])
    head.load_state_dict(checkpoint["head"])
    head.to(device)
    metrics = evaluate(head, val, Standardizer.identity(checkpoint["feature_dim"], device), 1024, device,
                       keep_predictions=True)
    labels, predictions = val_split.labels, metrics["predictions"]
    num_classes = checkpoint["num_classes"]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    wnids, names = checkpoint["class_wnids"], checkpoint["class_names"]
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
    lines = [f"# Head report: {folder}", "",
             f"Best epoch {checkpoint['epoch']}: val top-1 {metrics['val_top1']:.2f}%, top-5 {metrics['val_top5']:.2f}%, "
             f"{len(labels)} val images, {num_classes} classes.", "",
             f"Backbone weights: `{checkpoint['weights_spec']}`"
             + (" (RANDOM: for testing only)" if str(checkpoint['weights_spec']).startswith("random") else ""), "",
             "## Best classes", "", "| class | accuracy |", "|---|---|"]
    lines += [f"| {names[i]} ({wnids[i]}) | {accuracy[i]:.1f}% |" for i in order[:5]]
    lines += ["", "## Worst classes", "", "| class | accuracy |", "|---|---|"]
    lines += [f"| {names[i]} ({wnids[i]}) | {accuracy[i]:.1f}% |" for i in order[::-1][:5]]
    lines += ["", "## Most confused pairs", "", "| true | predicted as | images |", "|---|---|---|"]
    lines += [f"| {names[t]} | {names[p]} | {count} |" for count, t, p in pairs[:10]]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    return {"val_top1": metrics["val_top1"], "per_class_accuracy": accuracy}
