"""The caches a head run reads: one, or several of one dataset (``--features A,B``) to compare backbones.

Each cache is opened for every layer asked of it, before anything is trained: the layers given with
``--layers``, or the default layer of the cache's backbone (pipeline.backbones.catalog.default_layers). Caches
compared in one grid must hold the same dataset (equal dataset signatures), so their rows are the same images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from features.attrs import read_attrs
from features.cache import CachedSplit
from pipeline.backbones.catalog import default_layers, recorded_backbone
from pipeline.common.config import HeadConfig
from pipeline.common.errors import UserError
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


def feature_folders(features) -> tuple[Path, ...]:
    """``--features``: one folder, or a comma list of folders (a folder whose own name has a comma is one)."""
    if isinstance(features, (tuple, list)):
        return tuple(Path(f) for f in features)
    text = str(features)
    if "," not in text or Path(text).exists():
        return (Path(text),)
    return tuple(Path(part.strip()) for part in text.split(",") if part.strip())


def _backbone(folder: Path) -> str:
    attrs = read_attrs(folder / "train.h5")  # None: open_cache says what is missing
    return recorded_backbone(attrs or {})


def _layers(config: HeadConfig, backbone: str) -> tuple[str, ...]:
    """--layers, or the backbone's default layer (a layer the cache lacks: open_cache says how to add it)."""
    return tuple(config.layers) if config.layers is not None else default_layers(backbone)[:1]


def open_sources(config: HeadConfig) -> list[Source]:
    """Every cache of ``config`` opened for its layers; several must be of one dataset, else one line."""
    folders = list(dict.fromkeys(feature_folders(config.features)))
    backbones = [_backbone(folder) for folder in folders]
    unique = len(set(backbones)) == len(backbones)
    sources = []
    for folder, backbone in zip(folders, backbones):
        layers = _layers(config, backbone)
        label = None if len(folders) == 1 else backbone if unique else f"{backbone}-{folder.name}"
        sources.append(Source(folder, backbone, label, layers, {layer: open_cache(folder, layer) for layer in layers}))
    first = sources[0]
    for source in sources[1:]:
        for index, split in enumerate(("train", "val")):
            mine = source.splits[source.layers[0]][index].attrs.get("dataset_signature")
            theirs = first.splits[first.layers[0]][index].attrs.get("dataset_signature")
            if mine is None or mine != theirs:
                raise UserError(f"{source.folder} and {first.folder} hold different datasets ({split} signatures "
                                "differ); compare caches extracted from the same --data")
    return sources
