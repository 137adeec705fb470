"""Is a cache up to date? The one derivation of a split's cache settings, and the torch-free quick look.

Importing torch takes seconds, so a rerun of run_extract.py first compares what a complete cache
records with what this run would write, using the weights spec and a stamp of the weights file in place
of the weights' fingerprint. Both that quick look and the full check (pipeline.extract, with the
fingerprint) build the expected settings with ``split_settings``: a field added there is compared by both.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, replace
from pathlib import Path

from features import cache
from pipeline.config import ExtractConfig
from pipeline.dataset import TinyImageNet, index_dataset
from pipeline.hardware import guess_precision
from pipeline.prepare import resolve_data
from pipeline.weights_spec import describe_weights, weights_stamp

log = logging.getLogger(__name__)


def split_settings(dataset: TinyImageNet, split: str, config: ExtractConfig,
                   weights_fingerprint: str | None) -> cache.CacheSettings:
    """What decides the content of ``split``'s cache under ``config`` (fingerprint None: not known yet)."""
    return cache.CacheSettings(
        backbone="alexnet", layer="fc7", weights_fingerprint=weights_fingerprint,
        preprocess=config.preprocess.to_json(), dtype=config.dtype, precision=config.precision,
        dataset_signature=dataset.signature(split))


def quick_up_to_date(config: ExtractConfig) -> tuple[TinyImageNet | None, dict[Path, dict] | None]:
    """(the indexed dataset, {cache file: attributes}) when every split's cache is complete with exactly
    these settings; the found part is None otherwise, and both are None when no quick look applies.

    None only means "look properly" (the full check loads the weights and compares fingerprints). Under
    torchrun, or when the data is to be downloaded or arranged first, no quick look is taken.
    """
    if config.download or config.arrange_val or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None, None
    dataset = index_dataset(resolve_data(config.data))
    if config.overwrite:
        return dataset, None
    if config.precision is None:  # the device's default, guessed without torch (see pipeline.hardware)
        config = replace(config, precision=guess_precision(config.device))
    spec = describe_weights(config.weights, config.seed)
    found = {}
    for split in config.splits:
        settings = asdict(split_settings(dataset, split, config, None))
        del settings["weights_fingerprint"]  # stood in for by the spec and the stamp of its file
        expected = {**settings, "weights_spec": spec, "weights_stamp": weights_stamp(spec)}
        path = cache.split_file(config.out, split)
        attrs = cache.quick_up_to_date(path, expected)
        if attrs is None:
            return dataset, None
        found[path] = attrs
    return dataset, found


def log_up_to_date(path: Path, attrs: dict) -> None:
    """The one "up to date" line a split gets."""
    log.info("%s: up to date, %d rows in %s (%.1f MiB)", attrs["split"], attrs["num_rows"], path,
             path.stat().st_size / 2**20)
