"""The caches a head run reads: one, or several (``--features A,B``) to compare backbones or datasets.

Each cache is opened for every layer asked of it, before anything is trained: the layers given with
``--layers``, or the default layer of the cache's backbone (pipeline.backbones.catalog.default_layers). Each head is
trained and scored on its own cache: caches of different datasets may share a run, and the tables say which
dataset each row is of. Which caches, and how a run names them, is pipeline.heads.plan's (torch-free).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from features.cache import CachedSplit
from pipeline.common.config import HeadConfig
from pipeline.common.errors import UserError
from pipeline.heads.plan import cache_backbone, cache_labels, cache_layers, feature_folders
from pipeline.heads.readers import open_cache


@dataclass
class Source:
    """One cache of the run: the label its rows and folders carry, and its splits per layer."""

    folder: Path
    backbone: str
    label: str | None  # None when the run reads one cache: folders and tables are named as before
    layers: tuple[str, ...]
    splits: dict[str, tuple[CachedSplit, CachedSplit]]  # layer -> (train, val)

    @property
    def train(self) -> CachedSplit:
        return self.splits[self.layers[0]][0]


def open_sources(config: HeadConfig) -> list[Source]:
    """Every cache of ``config`` opened for its layers; each must hold at least two classes, else one line."""
    folders = list(dict.fromkeys(feature_folders(config.features)))
    backbones = [cache_backbone(folder) for folder in folders]
    sources = []
    for folder, backbone, label in zip(folders, backbones, cache_labels(folders, backbones)):
        layers = cache_layers(config, backbone)
        sources.append(Source(folder, backbone, label, layers, {layer: open_cache(folder, layer) for layer in layers}))
    for source in sources:
        train = source.train
        if len(train.wnids) < 2:
            raise UserError(f"{train.path} holds {len(train.wnids)} class ({', '.join(train.wnids)}): a classifier "
                            "needs at least two; extract a dataset with two or more classes")
    return sources
