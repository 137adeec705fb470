"""Extraction's ``--precision auto``: reuse what an earlier run of this cache chose, else measure once.

A run continues an earlier one when the cache folder holds a complete split file (an added layer, a rerun)
or a partial extraction (resume): the precision recorded there is reused, untimed, so the rows of one file
never mix precisions. Otherwise rank 0 times the candidates on the first images of the first split and
the other torchrun ranks follow its choice. The rules, and the timing, are pipeline.backbones.precision's.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from features import cache
from features.atomic import write_atomic
from features.errors import CacheError
from pipeline.backbones.precision import (AUTO, AUTO_ATTR, CPU_SUB_BATCH, choose_precision, decode, describe,
                                          place_backbone, reused)
from pipeline.common.config import ExtractConfig
from pipeline.datasets.dataset import Dataset
from pipeline.datasets.images import ImageDecodeError, read_rgb, stack_or_list
from pipeline.datasets.packs import PackDamaged
from pipeline.common.preprocess import Preprocess

log = logging.getLogger(__name__)

RECORD_FILE = "precision.json"  # auto's record in a parts folder, beside its settings.json


def complete_attrs(config: ExtractConfig, split: str) -> dict | None:
    """The attributes of ``split``'s complete cache file, or None (none, incomplete, or unreadable)."""
    try:
        attrs = cache.read_attrs(cache.split_file(config.out, split))
    except CacheError:  # the full check reports it in its own words
        return None
    return attrs if attrs and attrs.get("complete") is True else None


def recorded_choice(config: ExtractConfig) -> dict | None:
    """The precision an earlier run of this cache computed at: a complete split file's, else a partial
    extraction's. None under --overwrite or when there is none."""
    if config.overwrite:
        return None
    for split in config.splits:
        attrs = complete_attrs(config, split)
        if attrs is not None:
            return reused(attrs["precision"], cache.split_file(config.out, split).name, decode(attrs.get(AUTO_ATTR)))
    for split in config.splits:
        parts = cache.parts_folder(config.out, split)
        try:
            precision = json.loads((parts / "settings.json").read_text())["settings"]["precision"]
            earlier = decode((parts / RECORD_FILE).read_text()) if (parts / RECORD_FILE).exists() else None
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return reused(precision, f"the partial extraction in {parts.name}", earlier)
    return None


def _first_images(dataset: Dataset, split: str, count: int) -> list[torch.Tensor]:
    """The first ``count`` decodable images of ``split`` (an unreadable one is left to the loader to report)."""
    images = []
    for rel in dataset.splits[split].paths[:count * 4]:
        try:
            images.append(read_rgb(rel, read=dataset.read_bytes))
        except (ImageDecodeError, OSError, PackDamaged):
            continue
        if len(images) == count:
            break
    return images


def measure(config: ExtractConfig, dataset: Dataset, backbone, preprocess: Preprocess, device: torch.device,
            batch_size: int) -> dict:
    """Time the candidates on the first real images (a sub-batch on the CPU, a full batch on CUDA)."""
    count = min(batch_size, CPU_SUB_BATCH) if device.type == "cpu" else batch_size
    images = _first_images(dataset, config.splits[0], count)
    if not images:
        record = {"chosen": "fp32", "skipped": {"all": "no decodable image to time"}}
        log.info(describe(record))
        return record
    batch = stack_or_list(images)
    batch = [im.to(device) for im in batch] if isinstance(batch, list) else batch.to(device)
    backbone = place_backbone(backbone, device, "fp32")
    return choose_precision(backbone, lambda dtype: preprocess(batch, dtype), config.layers, device)


def decide_precision(config: ExtractConfig, dataset: Dataset, backbone, preprocess: Preprocess,
                     device: torch.device, batch_size: int, rank: int, world: int) -> tuple[ExtractConfig, dict | None]:
    """(``config`` with its precision resolved, auto's record or None for an explicit precision).

    Rank 0 decides (reused or measured) and the other ranks take its answer.
    """
    if config.precision != AUTO:
        return config, None
    record = None
    if rank == 0:
        record = recorded_choice(config)
        if record is not None:
            log.info(describe(record))
        else:
            record = measure(config, dataset, backbone, preprocess, device, batch_size)
    if world > 1:
        shared = [record]
        dist.broadcast_object_list(shared, src=0)
        record = shared[0]
    return replace(config, precision=record["chosen"]), record


def split_precision(config: ExtractConfig, auto: bool, split: str) -> str:
    """The precision ``split``'s settings are compared at: under auto, a complete file's own (any precision
    auto may choose is up to date, the rerun rule); else the run's."""
    attrs = complete_attrs(config, split) if auto and not config.overwrite else None
    if attrs is not None and set(config.layers) <= set(cache.held_layers(attrs)):
        return attrs["precision"]
    return config.precision


def keep_record(parts: Path, record: dict | None) -> None:
    """Write auto's record into a parts folder, so a resumed run reuses the choice and its measurements."""
    if record is not None:
        write_atomic(parts / RECORD_FILE, json.dumps(record, sort_keys=True))
