"""Peak memory of head training on a large cache: 100,000 x 4096 float32 rows (1.5 GiB of features).

    python -m benchmarks.bench_head_memory [--rows 100000] [--epochs 1]

Writes a synthetic cache with the cache module itself, runs run_train_head.py on it in a child process,
and compares the child's peak RSS with the target: 1.5 x the feature bytes + 1 GiB.
Writes benchmarks/results/head_memory.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.synthetic_cache import write_synthetic_cache

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARD_ROWS = 10_000


def write_cache(folder: Path, split: str, rows: int, classes: int, rng: np.random.Generator) -> None:
    labels = rng.integers(0, classes, rows)
    write_synthetic_cache(folder, split, labels, lambda start, n: np.maximum(rng.standard_normal((n, 4096), dtype=np.float32), 0),
                          shard_rows=SHARD_ROWS, classes=classes)  # post-ReLU-like rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "features"
        rng = np.random.default_rng(0)
        write_cache(folder, "train", args.rows, args.classes, rng)
        write_cache(folder, "val", 10_000, args.classes, rng)
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "run_train_head.py"), "--features", str(folder), "--out",
                        str(Path(tmp) / "head"), "--epochs", str(args.epochs), "--no-progress"], check=True, cwd=ROOT)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # bytes (Linux reports KiB)
    feature_bytes = args.rows * 4096 * 4
    target = 1.5 * feature_bytes + 2**30
    result = {"rows": args.rows, "feature_gib": feature_bytes / 2**30, "peak_rss_gib": peak / 2**30,
              "target_gib": target / 2**30, "peak_over_target": peak / target, "run_seconds": seconds,
              "epochs": args.epochs}
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "head_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
