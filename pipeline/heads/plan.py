"""What a head run will do, decided without torch: its caches, its combinations, where each combination's result.json
files go, and the cache identity and settings each one records.

``--skip-existing`` decides from this before torch is imported (a bare ``import torch`` takes seconds): a run whose
every result.json is there, readable and of the same identity and settings trains nothing. The grid and the
publisher name their folders with the same functions, so what is planned is what is written.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from features.attrs import read_attrs
from pipeline.backbones.catalog import default_layers, recorded_backbone
from pipeline.common.config import LINEAR_WEIGHT_DECAY, LOGREG_WEIGHT_DECAY, HeadConfig
from pipeline.heads.naming import combination_folder

# how a run goes, not what it computes: neither a result's settings nor what makes a rerun the same run
HOW_FIELDS = ("out", "device", "progress", "stream", "skip_existing", "table", "knn_chunk_rows")
# what a run holds: a result records its own cache, layer, head and shots, and its head's effective --select
RUN_FIELDS = (*HOW_FIELDS, "features", "head", "layers", "shots", "select")
# the settings each head's result depends on (a head not listed: every field but RUN_FIELDS)
HEAD_FIELDS = {
    "linear": ("lr", "weight_decay", "momentum", "epochs", "batch_size", "val_batch_size", "seed", "standardize"),
    "logreg": ("weight_decay", "max_iter", "standardize"),
    "knn": ("k", "temperature"),
}


def normalized(config: HeadConfig) -> HeadConfig:
    """``config`` checked, each repeated value once."""
    config.check()
    wd = config.weight_decay
    return replace(config, **{name: tuple(dict.fromkeys(getattr(config, name)))  # a repeated value runs once
                              for name in ("head", "shots", "lr", "k")},
                   layers=config.layers and tuple(dict.fromkeys(config.layers)),
                   weight_decay=wd if wd is None or isinstance(wd, str) else tuple(dict.fromkeys(wd)))


def feature_folders(features) -> tuple[Path, ...]:
    """``--features``: one folder, or a comma list of folders (a folder whose own name has a comma is one)."""
    if isinstance(features, (tuple, list)):
        return tuple(Path(f) for f in features)
    text = str(features)
    if "," not in text or Path(text).exists():
        return (Path(text),)
    return tuple(Path(part.strip()) for part in text.split(",") if part.strip())


def cache_backbone(folder: Path) -> str:
    """The backbone a cache folder's train.h5 records (a missing file: the reader says what is missing later)."""
    return recorded_backbone(read_attrs(folder / "train.h5") or {})


def cache_layers(config: HeadConfig, backbone: str) -> tuple[str, ...]:
    """--layers, or the backbone's default layer (a layer the cache lacks: open_cache says how to add it)."""
    return tuple(config.layers) if config.layers is not None else default_layers(backbone)[:1]


def cache_labels(folders: list[Path], backbones: list[str]) -> list[str | None]:
    """How a run names each cache: nothing for one cache, its backbone for several, ``backbone-folder`` when two
    share a backbone (two datasets, or two extractions)."""
    if len(folders) == 1:
        return [None]
    unique = len(set(backbones)) == len(backbones)
    labels = [backbone if unique else f"{backbone}-{folder.name}" for folder, backbone in zip(folders, backbones)]
    if len(set(labels)) < len(labels):  # two folders of one name (runs/a/features, runs/b/features): numbered
        labels = [f"{label}-{index}" for index, label in enumerate(labels, 1)]
    return labels


def dataset_name(attrs: dict) -> str:
    """A dataset's name for tables: the folder it was extracted from."""
    return Path(str(attrs.get("dataset_root") or "")).name or "dataset"


def cache_identity(folder: Path, layer: str, train: dict, val: dict) -> dict:
    """What a result was computed from, from the two files' attributes: a cache re-extracted with other weights,
    preprocessing or precision, or updated with other images, no longer matches."""
    def split(attrs: dict) -> dict:
        return {"dataset_signature": attrs.get("dataset_signature"), "files_signature": attrs.get("files_signature"),
                "num_rows": attrs.get("num_rows")}
    preprocess = str(train.get("preprocess", ""))
    return {"features": str(Path(folder).resolve()), "dataset": dataset_name(train),
            "dataset_root": str(train.get("dataset_root", "")), "backbone": train.get("backbone"),
            "weights_spec": train.get("weights_spec"), "weights_fingerprint": train.get("weights_fingerprint"),
            "layer": layer, "precision": train.get("precision"), "dtype": train.get("dtype"),
            "preprocess": hashlib.sha256(preprocess.encode()).hexdigest()[:16], "train": split(train), "val": split(val)}


def current_identity(folder: Path, layer: str) -> dict | None:
    """The identity of the cache in ``folder`` now; None when its files are gone."""
    train, val = read_attrs(Path(folder) / "train.h5"), read_attrs(Path(folder) / "val.h5")
    return None if train is None or val is None else cache_identity(folder, layer, train, val)


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def head_settings(config: HeadConfig, head: str, shots: int | None) -> dict:
    """The settings a head's result depends on, as result.json records them (defaults written out)."""
    names = HEAD_FIELDS.get(head) or [name for name in asdict(config) if name not in RUN_FIELDS]
    settings = {name: _plain(getattr(config, name)) for name in names}
    if "weight_decay" in settings and config.weight_decay is None:
        settings["weight_decay"] = list(LINEAR_WEIGHT_DECAY if head == "linear" else LOGREG_WEIGHT_DECAY)
    select = config.select_for(head)
    settings["select"] = select
    settings["select_fraction"] = config.select_fraction if select == "train-split" else None
    if shots is not None:
        settings["seed"] = config.seed  # the few-shot draw
    return settings


def result_folders(config: HeadConfig, head: str, place: str, *, grid: bool, source: str | None, layer: str,
                   shots: int | None) -> list[str]:
    """The folders (relative to --out, "" for --out itself) that each hold one result.json of this combination, in
    the table's order: a linear head chosen on val has one per (lr, weight decay), kNN one per k, others one."""
    if head == "linear" and config.select_for(head) == "val":
        pairs = [(lr, wd) for lr in config.lr for wd in config.weight_decays(LINEAR_WEIGHT_DECAY)]
        if grid:
            return [combination_folder(source, layer, head, shots, lr=lr, weight_decay=wd) for lr, wd in pairs]
        return [combination_folder(None, None, None, None, lr=lr, weight_decay=wd) for lr, wd in pairs] \
            if len(pairs) > 1 else [place]
    if head == "knn":
        return [str(Path(place) / knn_folder(k)) for k in config.k]
    return [place]


def knn_folder(k: int) -> str:
    """The folder of one k's result.json inside a kNN run's folder."""
    return f"k{k}"


@dataclass(frozen=True)
class PlannedPlace:
    """One (cache, layer, head, shots) of the run: where its results go and what they must record."""

    folder: Path  # the cache
    label: str | None  # the cache's label in a run of several (None: one cache)
    layer: str
    head: str
    shots: int | None
    place: str  # its combination folder ("" alone: the run folder)
    results: tuple[str, ...]  # folders of its result.json files, relative to --out
    identity: dict
    settings: dict

    @property
    def key(self) -> tuple:
        return self.label, self.layer, self.head, self.shots

    @property
    def tops(self) -> list[str]:
        """The entries of --out its results live in (carried into a rerun whole when fresh)."""
        return list(dict.fromkeys(Path(folder).parts[0] if folder else "" for folder in self.results))


def is_grid(config: HeadConfig, layer_count: int) -> bool:
    """Several (cache, layer) x heads x shots make a grid: a folder per combination, and one table."""
    return layer_count * len(config.head) * len(config.shots) > 1


def plan_run(config: HeadConfig) -> tuple[bool, list[PlannedPlace]]:
    """(is it a grid, every combination) of a normalized ``config``, from the caches' attributes only.
    A cache that is missing or damaged raises features' CacheError (the training run then says what is wrong)."""
    folders = list(dict.fromkeys(feature_folders(config.features)))
    backbones = [cache_backbone(folder) for folder in folders]
    labels = cache_labels(folders, backbones)
    caches = [(folder, label, cache_layers(config, backbone)) for folder, backbone, label in zip(folders, backbones, labels)]
    grid = is_grid(config, sum(len(layers) for _, _, layers in caches))
    places = []
    for folder, label, layers in caches:
        train, val = read_attrs(folder / "train.h5") or {}, read_attrs(folder / "val.h5") or {}
        for layer in layers:
            for head in config.head:
                for shots in config.shots:
                    place = combination_folder(label, layer, head, shots) if grid else ""
                    results = result_folders(config, head, place, grid=grid, source=label, layer=layer, shots=shots)
                    places.append(PlannedPlace(folder, label, layer, head, shots, place, tuple(results),
                                               cache_identity(folder, layer, train, val),
                                               head_settings(config, head, shots)))
    return grid, places


def comparable(record: dict) -> dict:
    """A run's config.json record without the fields that say how it ran: equal for a rerun of the same run."""
    return {name: value for name, value in record.items() if name not in HOW_FIELDS}
