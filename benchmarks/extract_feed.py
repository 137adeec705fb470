"""``bench_extract --feed``: does the data path keep up with the forward? (issue #37)

Whole processes, side by side on the same images, alternating within each round (bare, folder, pack, ...), the
median of ``--rounds``:
- the bare whole process of the precision: import torch and torchvision, build the fc7 cut with its weights cast
  once to that precision, forward over one ready channels_last tensor as many images (no decoding, no writing);
- the project's whole process (``bench_extract --child project``: what run_extract does, its forwards stamped),
  on the dataset folder and on its pack (``run_extract --pack``).
Each project run reports its steady rate (images over the time between its first and last forward); the bare
process reports its own the same way. ``auto`` is run as users run it (its measurement included); the bare
process runs what it chose, read from the first project run, which is untimed (it also warms the page cache).

The images: the real 10-class subset's train JPEGs, repeated under new names up to ``--images`` (the bytes, and so
the decoding work, of real photos), else generated 64x64 JPEGs.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def feed_data(images: int, tmp: Path, mini: Path) -> tuple[Path, str]:
    """A dataset folder (official layout) with ``images`` train images, one val image per class, and what they are."""
    from pipeline.data.synthetic import make_tiny_imagenet
    from pipeline.datasets.dataset import index_dataset

    if not mini.is_file():
        root = make_tiny_imagenet(tmp / "generated", num_classes=10, train_per_class=max(1, images // 10),
                                  val_per_class=1)
        return root, f"{images} generated 64x64 JPEGs"
    import zipfile

    with zipfile.ZipFile(mini) as archive:
        archive.extractall(tmp / "mini")
    real = index_dataset(next(p.parent for p in (tmp / "mini").rglob("wnids.txt")))
    root = tmp / "real"
    (root / "val" / "images").mkdir(parents=True)
    shutil.copy(real.root / "wnids.txt", root / "wnids.txt")
    shutil.copy(real.root / "words.txt", root / "words.txt")
    paths, labels = real.splits["train"].paths, real.splits["train"].labels
    order = sorted(range(len(paths)), key=lambda i: (i % 100, labels[i]))  # classes interleaved: any count has all
    for i in range(images):  # the i-th image is a real one, under its own name
        rel = Path(paths[order[i % len(paths)]])
        target = root / rel.parent / f"r{i // len(paths)}_{rel.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(real.root / rel, target)
    for label, wnid in enumerate(real.wnids):  # one val image per class (the runs extract train only)
        shutil.copy(real.root / paths[labels.index(label)], root / "val" / "images" / f"{wnid}.JPEG")
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"{w}.JPEG\t{w}\t0\t0\t64\t64\n" for w in real.wnids))
    return root, f"{images} real Tiny ImageNet JPEGs ({len(paths)} distinct, repeated under new names)"


def pack(folder: Path, out: Path) -> Path:
    done = subprocess.run([sys.executable, str(ROOT / "run_extract.py"), "--data", str(folder), "--pack", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"packing {folder} failed: {done.stderr[-2000:]}")
    return out


def whole_process(mode: str, data: Path, out: Path, device: str, batch: int, workers: int,
                  precision: str | None = None) -> dict:
    """``python -m benchmarks.bench_extract --child MODE``, timed from outside: what it reported, and its wall time."""
    command = [sys.executable, "-m", "benchmarks.bench_extract", "--child", mode, "--data", str(data), "--out", str(out),
               "--device", device, "--batch-size", str(batch), "--workers", str(workers),
               *(["--precision", precision] if precision else [])]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{mode} {precision or ''} failed: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "whole_s": seconds, "whole_img_s": result["images"] / seconds}


def child(mode: str, data: Path, out: Path, precision: str, batch: int, workers: int) -> dict:
    """One whole process (``bench_extract --child``) into an emptied ``out``: its wall time, with what it reported."""
    shutil.rmtree(out, ignore_errors=True)
    found = whole_process(mode, data, out, "cpu", batch, workers, precision)
    return {**found, "whole_s": round(found["whole_s"], 3)}


def chosen_precision(out: Path) -> str:
    from features.cache import read_attrs, split_file

    return read_attrs(split_file(out, "train"))["precision"]


def measure_feed(precisions: list[str], rounds: int, images: int, tmp: Path, mini: Path, batch: int,
                 workers: int) -> dict:
    """The side-by-side runs of every precision in ``precisions`` (``auto`` resolved by a first, untimed run)."""
    if images <= batch:
        raise SystemExit(f"--feed needs more images than one batch for a steady rate: --images {images}, batch {batch}")
    folder, what = feed_data(images, tmp, mini)
    sources = {"folder": folder, "pack": pack(folder, tmp / "pack")}
    print(f"feed: {what}; batch {batch}, {workers} reader thread(s), {rounds} alternating rounds", flush=True)
    found = {}
    for precision in precisions:
        warm = child("project", folder, tmp / "warm", precision, batch, workers)
        bare_precision = chosen_precision(tmp / "warm") if precision == "auto" else precision
        print(f"feed {precision}: chooses {bare_precision} (untimed first run, {warm['whole_s']:.1f} s)", flush=True)
        lanes: dict[str, list[dict]] = {"bare": [], "folder": [], "pack": []}
        for _ in range(rounds):
            lanes["bare"].append(child("bare", folder, tmp / "bare", bare_precision, batch, workers))
            for name, source in sources.items():
                lanes[name].append(child("project", source, tmp / f"out-{name}", precision, batch, workers))
            print(f"  {precision}: " + ", ".join(f"{name} {runs[-1]['whole_s']:.1f} s" for name, runs in lanes.items()),
                  flush=True)
        found[precision] = summarise(lanes, bare_precision)
    return {"images": images, "what": what, "rounds": rounds, "batch_size": batch, "workers": workers,
            "precisions": found}


def summarise(lanes: dict[str, list[dict]], bare_precision: str) -> dict:
    """Medians of each lane and the ratios the issue asks for: the project over the bare process, whole and steady
    (a ratio of speeds: bare seconds over project seconds), per round and of the medians."""
    median = {name: {key: statistics.median(r[key] for r in runs) for key in ("whole_s", "steady_img_s")}
              for name, runs in lanes.items()}
    out = {"bare_precision": bare_precision, "runs": lanes, "median": median}
    for name in ("folder", "pack"):
        pairs = list(zip(lanes["bare"], lanes[name]))
        out[f"{name}_whole_over_bare"] = round(median["bare"]["whole_s"] / median[name]["whole_s"], 3)
        out[f"{name}_steady_over_bare"] = round(median[name]["steady_img_s"] / median["bare"]["steady_img_s"], 3)
        out[f"{name}_whole_over_bare_per_round"] = [round(b["whole_s"] / p["whole_s"], 3) for b, p in pairs]
    return out


def print_feed(feed: dict) -> None:
    for precision, found in feed["precisions"].items():
        m = found["median"]
        print(f"\n{precision} (bare: {found['bare_precision']}), medians of {feed['rounds']}:")
        for name in ("bare", "folder", "pack"):
            line = f"  {name:6s} whole {m[name]['whole_s']:6.2f} s, steady {m[name]['steady_img_s']:6.1f} img/s"
            if name != "bare":
                line += (f"; whole {found[f'{name}_whole_over_bare']:.3f}x the bare process (rounds "
                         f"{found[f'{name}_whole_over_bare_per_round']}), steady {found[f'{name}_steady_over_bare']:.3f}x")
            print(line)


def feed_json(args, results: dict, out_json: Path, mini: Path) -> int:
    """--feed (benchmarks.extract_feed), into ``out_json``."""
    with tempfile.TemporaryDirectory() as tmp:
        results["feed"] = measure_feed(args.precisions.split(","), args.rounds, args.images, Path(tmp), mini,
                                       results["batch_size"], results["workers"])
    results["load_average_after"] = os.getloadavg()[0]
    print_feed(results["feed"])
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_json}")
    return 0
