"""A generated cache file for the stage-two benchmarks, written with ``features.cache``'s own functions (shards,
then the assembly), so the heads read it exactly as they read an extracted one."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from features import cache
from pipeline.common.preprocess import Preprocess


def write_synthetic_cache(folder: Path, split: str, labels: np.ndarray, block: Callable[[int, int], np.ndarray], *,
                          dtype: str = "float32", shard_rows: int = 10_000, dim: int = 4096,
                          classes: int | None = None) -> Path:
    """A complete ``<folder>/<split>.h5`` of ``len(labels)`` fc7 rows; ``block(start, n)`` gives rows
    ``start:start + n`` (n x dim, cast to ``dtype``). Returns the file's path."""
    rows = len(labels)
    classes = classes or int(labels.max()) + 1
    # a real preprocessing record: a head trained on the cache is a checkpoint the validator accepts
    preprocess = Preprocess(image_size=64, resize_size=72).to_json()
    settings = cache.CacheSettings(backbone="alexnet", layer="fc7", weights_fingerprint="0" * 64, preprocess=preprocess,
                                   dtype=dtype, precision="fp32", dataset_signature=f"synthetic-{split}-{rows}")
    parts = cache.parts_folder(folder, split)
    cache.start_parts(parts, settings, batch_size=64, shard_size=shard_rows, num_rows=rows)
    starts = range(0, rows, shard_rows)
    for i, start in enumerate(starts):
        n = min(shard_rows, rows - start)
        cache.write_shard(parts, i, {"fc7": block(start, n).astype(dtype, copy=False)}, np.arange(start, start + n), [])
    wnids = [f"n{i:08d}" for i in range(classes)]
    cache.assemble(cache.Assembly(folder, split, settings, num_shards=len(starts), layers={"fc7": dim},
                                  layer_order=("fc7",), main="fc7"),
                   cache.SplitRows(paths=[f"{i}.JPEG" for i in range(rows)], labels=labels.tolist(), wnids=wnids,
                                   names=wnids, attrs={"weights_spec": "random:seed=0", "batch_size": 64,
                                                       "shard_size": shard_rows, "dataset_root": "/synthetic",
                                                       "versions": "{}", "class_full_names": "\n".join(wnids),
                                                       "world_size": 1}))
    return cache.split_file(folder, split)


def add_shape_args(parser, *, rows_flag: str, rows: int, val_rows: int, classes: int, signal: float) -> None:
    """The generated features' shape flags, shared by the head benchmarks: train rows (``rows_flag``), val rows,
    classes, width, and how far the class prototypes stand out of the unit noise."""
    parser.add_argument(rows_flag, type=int, default=rows, help="train rows")
    parser.add_argument("--val-rows", type=int, default=val_rows)
    parser.add_argument("--classes", type=int, default=classes)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--signal", type=float, default=signal, help="prototype scale against unit noise")
