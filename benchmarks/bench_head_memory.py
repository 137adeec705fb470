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

from features import cache

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARD_ROWS = 10_000


def write_cache(folder: Path, split: str, rows: int, classes: int, rng: np.random.Generator) -> None:
    settings = cache.CacheSettings(backbone="alexnet", layer="fc7", weights_fingerprint="0" * 64, preprocess="{}",
                                   dtype="float32", precision="fp32", dataset_signature=split)
    parts = cache.parts_folder(folder, split)
    cache.start_parts(parts, settings, rows=rows)
    labels = rng.integers(0, classes, rows)
    shards = range(0, rows, SHARD_ROWS)
    for i, start in enumerate(shards):
        n = min(SHARD_ROWS, rows - start)
        features = np.maximum(rng.standard_normal((n, 4096), dtype=np.float32), 0)  # post-ReLU-like
        cache.write_shard(parts, i, {"fc7": features}, np.arange(start, start + n), [])
    wnids = [f"n{i:08d}" for i in range(classes)]
    cache.assemble(cache.Assembly(folder, split, settings, num_shards=len(shards), layers={"fc7": 4096},
                                  layer_order=("fc7",), main="fc7"),
                   cache.SplitRows(paths=[f"{i}.JPEG" for i in range(rows)], labels=labels.tolist(), wnids=wnids,
                                   names=wnids, attrs={"weights_spec": "random:seed=0", "batch_size": 64,
                                                       "shard_size": SHARD_ROWS, "dataset_root": "/synthetic",
                                                       "versions": "{}", "class_full_names": "\n".join(wnids),
                                                       "world_size": 1}))


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
