"""Rank 0's last step of a split: its shards (plus the rows and layers kept from the file being updated or
extended) assembled into ``<split>.h5`` by features.writer, with everything the file records besides."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from features import cache
from features.errors import NoRows
from pipeline.backbones.catalog import main_layer, order_layers
from pipeline.backbones.precision import AUTO_ATTR, encode
from pipeline.datasets.dataset import Dataset
from pipeline.common.errors import UserError
from pipeline.extract.incremental import Reuse
from pipeline.extract.loading import backbone_attrs


def assemble_split(run, dataset: Dataset, split: str, settings: cache.CacheSettings, num_shards: int,
                   layers: tuple[str, ...], kept: dict | None, reuse: Reuse | None, stamps: np.ndarray) -> dict:
    """Rank 0: the shards (and the layers kept from the file being extended, or the rows reused from the file
    being updated) into ``<split>.h5``. ``run``: the extractor's ``Run``. ``stamps``: each image's (size, mtime_ns), by dataset position."""
    config = run.config
    held = cache.held_layers(kept) if kept is not None else []
    every_layer = order_layers(config.backbone, dict.fromkeys([*held, *layers]))
    main = main_layer(config.backbone, every_layer)  # what ``features`` links to: the backbone's default layer, held
    job = cache.Assembly(out=Path(config.out), split=split, settings=settings, num_shards=num_shards,
                         layers={layer: run.dims[layer] for layer in layers}, layer_order=tuple(every_layer),
                         main=main, compression=config.compression,
                         keep=cache.split_file(config.out, split) if kept is not None else None,
                         reuse=reuse.source if reuse is not None else None)
    rows = cache.SplitRows(
        paths=dataset.splits[split].paths, labels=dataset.splits[split].labels, wnids=dataset.wnids,
        names=dataset.names, skipped_before=list(dataset.splits[split].excluded), stamps=stamps,
        attrs={"weights_spec": run.weights_spec, "batch_size": run.batch_size, "shard_size": config.shard_size,
               "dataset_root": str(dataset.root), "versions": _versions(),
               "class_full_names": "\n".join(dataset.full_names), "world_size": run.world,
               AUTO_ATTR: encode(run.precision_record) if run.precision_record else None,
               **backbone_attrs(run.record, kept, every_layer)})
    try:
        return cache.assemble(job, rows)
    except NoRows:
        raise UserError(f"{split} has no decodable images: all {len(rows.paths)} were skipped as undecodable; "
                        "replace them, or check them with --prepare-only") from None


def _versions() -> str:
    import h5py
    import torchvision
    return json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__,
                       "h5py": h5py.__version__, "numpy": np.__version__})
