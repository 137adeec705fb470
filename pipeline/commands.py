"""The three commands, each composed of stages: the only place where one stage's output meets another's.

``run_extract.py`` = data (find, unpack or download) + extract; ``run_train_head.py`` = heads;
``run_webcam.py`` = live (or collection, with its own settings). The stages never import each other; this module hands one's result to the next.
"""
from __future__ import annotations

import gc
import json
import logging
from functools import partial
from pathlib import Path

from pipeline.common.config import CollectConfig, ExtractConfig, HeadConfig, LiveConfig
from pipeline.extract.loading import preprocess_of, settle
from pipeline.backbones.precision import check_choice
from pipeline.backbones.weights import describe_weights, is_random

log = logging.getLogger(__name__)


def warn_random(spec: str, what: str = "these features are for testing only") -> None:
    """The one warning a random backbone gets, from whichever command meets it."""
    if is_random(spec):
        log.warning("NOTE: the backbone has random weights (%s); %s", spec, what)


def run_extract(config: ExtractConfig) -> int:
    """``run_extract.py``: prepare only (``--prepare-only``), or prepare and extract."""
    if config.list_backbones or config.list_layers:
        from pipeline.backbones.backbone import backbone_listing, layer_listing

        print(layer_listing(config.list_layers) if config.list_layers else backbone_listing(config.list_backbones))
        return 0
    if config.pack is not None:
        return pack(config)
    config = settle(config)  # an unknown backbone name is one line before any data is read
    return prepare(config) if config.prepare_only else extract(config)


def pack(config: ExtractConfig) -> int:
    """``--pack OUT``: the dataset written as tar shards and a manifest (pipeline.data.pack); no extraction."""
    from pipeline.common.errors import UserError
    from pipeline.common.config import check_val_fraction
    from pipeline.data.pack import pack_dataset

    if config.out is not None or config.prepare_only:
        raise UserError(f"--pack {config.pack} writes the pack and stops, like --prepare-only: drop "
                        f"{'--out' if config.out is not None else '--prepare-only'}, then extract with --data {config.pack}")
    check_val_fraction(config.val_fraction)
    if config.shard_size < 1:
        raise UserError(f"--shard-size must be 1 or more, got {config.shard_size}")
    manifest = pack_dataset(config)
    for name, split in manifest["splits"].items():
        shards = split["shards"]
        log.info("  %-5s %6d images in %d shards (%.1f MiB), %d skipped", name, sum(s["samples"] for s in shards),
                 len(shards), sum(s["bytes"] for s in shards) / 2**20, len(split["skipped"]))
    log.info("packed %s into %s; extract it with --data %s", manifest["source"]["root"], config.pack, config.pack)
    return 0


def prepare(config: ExtractConfig) -> int:
    """Find, index and check the dataset; log the summary (and write it to ``config.summary_json``)."""
    from pipeline.datasets.jpeg import decode_floor
    from pipeline.data.prepare import prepare_dataset

    summary = prepare_dataset(config, min_side=decode_floor(preprocess_of(config)))
    log.info("%s: %s layout, %d classes", summary["root"], summary["layout"], summary["num_classes"])
    for name, split in summary["splits"].items():
        log.info("  %-5s %6d images, %d-%d per class, %d skipped", name, split["images"],
                 split["per_class_min"], split["per_class_max"], split["skipped"])
    for item in summary["skipped"]:
        log.info("  skipped %s: %s", item["path"], item["reason"])
    if config.summary_json:
        summary_json = Path(config.summary_json)
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def extract(config: ExtractConfig) -> int:
    """Stage one: a rerun onto a finished cache answers torch-free; otherwise the backbone runs."""
    from pipeline.datasets.dataset import index_dataset
    from pipeline.data.prepare import resolve_data
    from pipeline.extract.freshness import log_up_to_date, quick_look_applies, quick_up_to_date, refresh_class_names

    config.check()
    locate = partial(resolve_data, config.data, download=config.download, url=config.url, md5=config.md5,
                     progress=config.progress)
    dataset = None
    if quick_look_applies(config):
        dataset = index_dataset(locate(), config.val_fraction)
        found = quick_up_to_date(config, dataset)  # torch-free: a rerun onto a finished cache answers at once
        if found:
            refresh_class_names(config.out, found, dataset)  # names are no setting: rewritten in place
            warn_random(describe_weights(config.weights, config.seed))
            for path, attrs in found.items():
                log_up_to_date(path, attrs)
            return 0
    from pipeline.extract.extractor import extract as extract_features  # imports torch: only when there is work

    if not gc.isenabled():  # run_extract.py turned collection off while torch imported: back on, the start-up frozen
        gc.freeze()
        gc.enable()
    result = extract_features(config, locate, dataset)
    warn_random(result.weights_spec)
    for split_result in result.splits.values():
        split_result.log()
    return 0


def train_head(config: HeadConfig) -> int:
    """Stage two: train the heads of ``config`` on the cache (one run, or a grid) and log the results table; or, with
    ``--table``, gather the result.json files below folders into one table. Torch only when something is trained."""
    if config.table:
        from pipeline.heads.publish.results import build_table

        build_table(config.table, config.out)
        return 0
    from pipeline.heads.store import already_done

    if already_done(config):  # --skip-existing, decided before torch is imported
        return 0
    from pipeline.heads.experiments.grid import run_experiments

    experiments = run_experiments(config)
    log.info("%-12s %-11s %-7s %-44s %-11s %-6s %8s %8s %7s %8s", "backbone", "layer", "head", "hyper-parameters",
             "selected by", "shots", "top-1", "top-5", "train", "seconds")
    for r in experiments.rows:
        log.info("%-12s %-11s %-7s %-44s %-11s %-6s %7.2f%% %7.2f%% %7d %8.1f", r.backbone, r.layer, r.head, r.params,
                 r.selected_by, r.shots, r.val_top1, r.val_top5, r.train_images, r.seconds)
    if experiments.best:
        log.info("best head: %s", experiments.best)
    warn_random(experiments.weights_spec, "accuracy is not meaningful")
    return 0


def live(config: LiveConfig | CollectConfig) -> int:
    """``run_webcam.py``: collect frames of a class (a CollectConfig), or export the classifier (--export), or run it
    live on the source; torch only when it runs on torch."""
    config.check()
    if isinstance(config, CollectConfig):  # no checkpoint and no torch
        from pipeline.live.collect import collect_frames

        summary = collect_frames(config)
        return 128 + 15 if summary.stopped_by == "SIGTERM" else 0
    config.precision = check_choice(config.precision)
    from pipeline.live.runner import run_live
    from pipeline.live.start import open_classifier

    if config.export is not None:
        from pipeline.live.export import export_classifier

        export_classifier(config)
        return 0
    classifier = open_classifier(config)
    warn_random(classifier.classes.weights_spec, "its predictions are for testing only")
    summary = run_live(config, classifier)
    if summary.frames == 0:
        log.warning("no frames were processed")
    return 128 + 15 if summary.stopped_by == "SIGTERM" else 0  # stopped by SIGTERM: outputs finished, exit as killed
