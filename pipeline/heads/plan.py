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
from pipeline.backbones.catalog import default_layers, has_text_tower, recorded_backbone
from pipeline.common.config import (LINEAR_WEIGHT_DECAY, LOGREG_WEIGHT_DECAY, ZERO_SHOT, ZERO_SHOT_TEMPLATES,
                                    HeadConfig)
from pipeline.common.errors import UserError
from pipeline.heads.naming import combination_folder
from pipeline.heads.prompts import prompts_digest

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
    if head == ZERO_SHOT:  # its class names (a --class-prompts file by its bytes) and its text tower's weights
        seed = config.seed if config.weights == "random" else None
        return {"templates": ZERO_SHOT_TEMPLATES, "class_prompts": prompts_digest(config.class_prompts),
                "weights": config.weights, **({"seed": seed} if seed is not None else {}), "select": "none",
                "select_fraction": None}
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


def head_shots(config: HeadConfig, backbone: str) -> list[tuple[str, int | None]]:
    """The (head, shots) pairs run on each layer of a cache of ``backbone``: every head at every --shots; zero-shot
    once, at 0 shots (it uses no train image), and only on a CLIP cache (its text tower is the backbone's)."""
    pairs = []
    for head in config.head:
        if head != ZERO_SHOT:
            pairs += [(head, shots) for shots in config.shots]
        elif has_text_tower(backbone):
            pairs.append((head, 0))
    return pairs


def check_zero_shot(config: HeadConfig, folders: list[Path], backbones: list[str]) -> None:
    """--head zeroshot needs a CLIP cache among the caches (on others it is skipped): none is one line."""
    if not all((Path(folder) / "train.h5").is_file() for folder in folders):
        return  # a missing cache: its reader says so
    if ZERO_SHOT in config.head and not any(map(has_text_tower, backbones)):
        held = ", ".join(f"{folder} holds {backbone} features" for folder, backbone in zip(folders, backbones))
        raise UserError(f"--head {ZERO_SHOT} needs a CLIP cache (its text tower makes the head), but {held}; extract "
                        "one with run_extract.py --backbone open_clip:ARCH/TAG (such as open_clip:ViT-B-32/"
                        "laion2b_s34b_b79k)")


def is_grid(combinations: int) -> bool:
    """Several (cache, layer, head, shots) combinations make a grid: a folder per combination, and one table."""
    return combinations > 1


def plan_run(config: HeadConfig) -> tuple[bool, list[PlannedPlace]]:
    """(is it a grid, every combination) of a normalized ``config``, from the caches' attributes only.
    A cache that is missing or damaged raises features' CacheError (the training run then says what is wrong)."""
    folders = list(dict.fromkeys(feature_folders(config.features)))
    backbones = [cache_backbone(folder) for folder in folders]
    check_zero_shot(config, folders, backbones)
    labels = cache_labels(folders, backbones)
    caches = [(folder, label, [(layer, *pair) for layer in cache_layers(config, backbone)
                               for pair in head_shots(config, backbone)])
              for folder, backbone, label in zip(folders, backbones, labels)]
    grid = is_grid(sum(len(combinations) for _, _, combinations in caches))
    places = []
    for folder, label, combinations in caches:
        train, val = read_attrs(folder / "train.h5") or {}, read_attrs(folder / "val.h5") or {}
        for layer, head, shots in combinations:
            place = combination_folder(label, layer, head, shots) if grid else ""
            results = result_folders(config, head, place, grid=grid, source=label, layer=layer, shots=shots)
            places.append(PlannedPlace(folder, label, layer, head, shots, place, tuple(results),
                                       cache_identity(folder, layer, train, val), head_settings(config, head, shots)))
    return grid, places


def comparable(record: dict) -> dict:
    """A run's config.json record without the fields that say how it ran: equal for a rerun of the same run."""
    return {name: value for name, value in record.items() if name not in HOW_FIELDS}
