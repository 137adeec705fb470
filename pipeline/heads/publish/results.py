"""One table of many runs (``run_train_head.py --table DIR [DIR ...] --out DIR``): every result.json below the
folders, in results.csv, results.md and results.png. Torch-free.

``results.csv`` has one row per result.json. ``results.md`` and ``results.png`` summarise, per (dataset, backbone,
layer, head, shots), the fit its run chose on its selection set (``chosen``), and mark, per dataset, the fits whose
val top-1 lies within the binomial 95 % interval (Wilson's) of the best: a 0.1-point "win" on 2,000 val images is
inside it, and is not presented as one. A result.json that is damaged, of another format version, or of a cache
that changed since is named in one line and left out: it is never mixed into the table (pipeline.heads.store).
"""
from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure  # the object API, as pipeline.heads.publish.report

from features.atomic import write_atomic
from features.errors import CacheError
from pipeline.common.errors import UserError
from pipeline.heads.naming import shots_name
from pipeline.heads.plan import current_identity
from pipeline.heads.publish.report import shown
from pipeline.heads.publish.table import HEAD_COLOURS
from pipeline.heads.store import BadResult, read_result, result_files, stale

log = logging.getLogger(__name__)

COLUMNS = ["dataset", "backbone", "layer", "head", "shots", "selected_by", "chosen", "hyper_parameters", "top1", "top5",
           "mean_per_class", "within_best", "val_images", "train_images", "seconds", "weights", "version", "result"]
Z95 = 1.959964  # the normal quantile of a two-sided 95 % interval
FILES = ("results.csv", "results.md", "results.png")


@dataclass
class Row:
    """One result.json as the table shows it."""

    path: Path
    record: dict
    dataset: str = ""  # the dataset's name, with its signature where two datasets share a name
    within_best: bool | None = None  # chosen fits only: within the 95 % interval of its dataset's best

    @property
    def group(self) -> tuple:
        cache = self.record["cache"]
        return self.dataset, cache["backbone"], cache["layer"], self.record["head"], shots_name(self.record["shots"])

    def csv(self) -> dict:
        r, cache = self.record, self.record["cache"]
        values = (self.dataset, cache["backbone"], cache["layer"], r["head"], shots_name(r["shots"]), r["selected_by"],
                  r["chosen"], r["hyper_parameters"], round(r["top1"], 4), round(r["top5"], 4),
                  round(r["mean_per_class"], 4), "" if self.within_best is None else self.within_best, r["val_images"],
                  r["train_images"], r["seconds"], cache.get("weights_spec", ""), r["version"], str(self.path))
        return dict(zip(COLUMNS, values))


def wilson(top1: float, count: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (in %) of a top-1 of ``top1`` % on ``count`` images."""
    if count <= 0:
        return 0.0, 100.0
    p = top1 / 100.0
    centre = (p + z * z / (2 * count)) / (1 + z * z / count)
    half = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / (1 + z * z / count)
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def gather(folders: list[Path]) -> tuple[list[Row], int]:
    """Every trustworthy result.json below ``folders``, and how many were left out (each named in one line)."""
    rows, left_out, now = [], 0, {}
    for path in result_files(folders):
        try:
            record = read_result(path)
            cache = record["cache"]
            where = (cache["features"], cache["layer"])
            if where not in now:
                now[where] = current_identity(Path(cache["features"]), cache["layer"])
            reason = stale(path, record, now[where])
            if reason:
                raise BadResult(reason)
        except (BadResult, CacheError) as err:
            log.warning("%s; left out of the table (rerun its head to recompute it)", err)
            left_out += 1
            continue
        rows.append(Row(path, record))
    _name_datasets(rows)
    return rows, left_out


def _name_datasets(rows: list[Row]) -> None:
    """Each row's dataset name: the folder's name, with its val signature where two datasets share that name."""
    signatures: dict[str, set] = {}
    for row in rows:
        cache = row.record["cache"]
        signatures.setdefault(cache["dataset"], set()).add(cache["val"].get("dataset_signature"))
    for row in rows:
        cache = row.record["cache"]
        shared = len(signatures[cache["dataset"]]) > 1
        row.dataset = f"{cache['dataset']} ({str(cache['val'].get('dataset_signature'))[:8]})" if shared else cache["dataset"]


def summary(rows: list[Row]) -> dict[str, tuple[list[Row], tuple[float, float]]]:
    """Per dataset: its chosen fits, best top-1 first, each marked within the best's 95 % interval or not, and the
    interval."""
    datasets: dict[str, list[Row]] = {}
    for row in rows:
        if row.record["chosen"]:
            datasets.setdefault(row.dataset, []).append(row)
    result = {}
    for dataset, chosen in sorted(datasets.items()):
        chosen.sort(key=lambda row: (-row.record["top1"], row.group))
        best = chosen[0].record
        low, high = wilson(best["top1"], best["val_images"])
        for row in chosen:
            row.within_best = row.record["top1"] >= low - 1e-9
        result[dataset] = (chosen, (low, high))
    return result


def build_table(folders, out: Path) -> list[Row]:
    """results.csv, results.md and results.png in ``out`` from every result.json below ``folders``."""
    folders, out = [Path(folder) for folder in folders], Path(out)
    missing = [str(folder) for folder in folders if not folder.is_dir()]
    if missing:
        raise UserError(f"--table {' '.join(missing)}: no such folder; name the folders that hold the runs")
    rows, left_out = gather(folders)
    if not rows:
        raise UserError(f"no usable result.json below {' '.join(map(str, folders))}: train heads there first "
                        "(run_train_head.py --out DIR), or name the folders that hold their runs")
    grouped = summary(rows)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "results.csv", rows)
        write_atomic(out / "results.md", markdown(grouped, len(rows), left_out, folders, out))
        plot_summary(grouped, out / "results.png")
    except OSError as err:
        raise UserError(f"cannot write the table into {out} ({err.strerror or err}); choose a writable --out") from None
    log.info("%d results (%d chosen fits in %d dataset%s) -> %s/results.csv, .md, .png%s", len(rows),
             sum(len(chosen) for chosen, _ in grouped.values()), len(grouped), "" if len(grouped) == 1 else "s", out,
             f"; {left_out} left out (above)" if left_out else "")
    return rows


def _write_csv(path: Path, rows: list[Row]) -> None:
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(row.csv() for row in rows)
    write_atomic(path, table.getvalue())


def markdown(grouped: dict, count: int, left_out: int, folders: list[Path], out: Path) -> str:
    """results.md: per dataset, its chosen fits, those within the best's 95 % interval marked."""
    skipped = (f" {left_out} left out (damaged, of another format, or of a cache that changed since: named in the "
               "log)." if left_out else "")
    lines = [f"# Results: {shown(out)}", "",
             f"{count} result.json from {', '.join(shown(f) for f in folders)} (every one in results.csv); below, per "
             f"dataset, the fit each run chose on its selection set.{skipped}", ""]
    for dataset, (chosen, (low, high)) in grouped.items():
        best = chosen[0].record
        lines += [f"## {dataset}", "",
                  f"Best val top-1 {best['top1']:.2f}% on {best['val_images']} val images; its binomial 95 % interval "
                  f"(Wilson) is {low:.2f}-{high:.2f}%. Fits marked ≈ lie within it: their difference from the best is "
                  "within the noise of this val set.", "",
                  "| ≈ best | backbone | layer | head | shots | selected by | hyper-parameters | val top-1 | top-5 | "
                  "mean per class | train images | folder |", "|---|---|---|---|---|---|---|---:|---:|---:|---:|---|"]
        for row in chosen:
            r, cache = row.record, row.record["cache"]
            weights = " (random weights)" if str(cache.get("weights_spec", "")).startswith("random") else ""
            lines.append(f"| {'≈' if row.within_best else ''} | {cache['backbone']}{weights} | {cache['layer']} | "
                         f"{r['head']} | {shots_name(r['shots'])} | {r['selected_by']} | {r['hyper_parameters']} | "
                         f"{r['top1']:.2f}% | {r['top5']:.2f}% | {r['mean_per_class']:.2f}% | {r['train_images']} | "
                         f"{shown(row.path.parent)} |")
        lines.append("")
    lines.append("Selected by train-split: chosen on held-out train images, then refit on all; val: chosen on val "
                 "itself (optimistic); none: nothing to choose (zero-shot).")
    return "\n".join(lines) + "\n"


def plot_summary(grouped: dict, path: Path) -> None:
    """results.png: per dataset, one bar per chosen fit (val top-1), the best's 95 % interval shaded; fits outside
    it are pale."""
    heights = [0.9 + 0.3 * len(chosen) for chosen, _ in grouped.values()]
    fig = Figure(figsize=(9, 0.6 + sum(heights)))
    axes = fig.subplots(len(grouped), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (dataset, (chosen, (low, high))) in zip(axes, grouped.items()):
        positions = list(range(len(chosen)))[::-1]
        for y, row in zip(positions, chosen):
            r = row.record
            ax.barh(y, r["top1"], color=HEAD_COLOURS.get(r["head"], "tab:gray"), alpha=1.0 if row.within_best else 0.35)
            ax.text(r["top1"] + 0.5, y, f"{r['top1']:.1f}", va="center", fontsize=7)
        ax.axvspan(low, high, color="black", alpha=0.08, label="best's 95 % interval")
        labels = [f"{row.record['cache']['backbone']} {row.record['cache']['layer']} {row.record['head']} "
                  f"{shots_name(row.record['shots'])} ({row.record['selected_by']})" for row in chosen]
        ax.set_yticks(positions, labels, fontsize=7)
        ax.set_xlim(0, 100)
        ax.set_title(dataset, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("val top-1 (%)  (pale: outside the best's 95 % interval)")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    write_atomic(path, write=lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
