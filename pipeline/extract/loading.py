"""The backbone an extraction runs (pipeline.backbones), the settings that depend on it, and what its cache
records of it."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from pipeline.backbones import catalog
from pipeline.backbones.precision import check_choice
from pipeline.backbones.weights import weights_stamp
from pipeline.common.config import ExtractConfig
from pipeline.common.preprocess import Preprocess


def settle(config: ExtractConfig) -> ExtractConfig:
    """``config`` checked, with its backbone's defaults filled in: its own cache folder and layers, the layers' and
    weights' names as its family records them (torch-free for a catalog entry such as AlexNet, and for names). An
    unknown backbone name is one line with close names."""
    config.check()
    name = catalog.check_name(config.backbone)
    return replace(config, backbone=name, precision=check_choice(config.precision),
                   weights=catalog.own_weights(name, config.weights),  # pretrained: torchvision's imagenet
                   out=Path(config.out) if config.out is not None else catalog.default_out(name),
                   layers=catalog.canonical_layers(name, config.layers or catalog.default_layers(name)))


def preprocess_of(config: ExtractConfig) -> Preprocess:
    """The preprocessing of this extraction: the weights' own, with only the sizes the user gave replacing theirs
    (torch-free for a catalog entry; another model's weights are asked, which imports torchvision)."""
    return catalog.preprocess_of(config.backbone, config.weights, image_size=config.image_size,
                                 resize_size=config.resize_size, mode=config.resize_mode)


def hub_name(config: ExtractConfig) -> str:
    """The basename of this backbone's pretrained weights in the torch hub cache (what the quick look stats)."""
    return catalog.hub_file(config.backbone, config.weights)


def default_batch_size(name: str, device) -> int:
    """The backbone's own (AlexNet: 64 on the CPU, 256 on CUDA), else from its size and the free device memory."""
    from pipeline.common.hardware import free_memory

    return catalog.default_batch_size(name, device.type, free_memory(device) if device.type == "cuda" else None)


def load_for(config: ExtractConfig):
    """The backbone (pipeline.backbones.Backbone) of this extraction, computing ``config.layers``."""
    from pipeline.backbones.backbone import open_backbone

    return open_backbone(config.backbone, config.weights, seed=config.seed, layers=config.layers,
                         image_size=config.image_size, resize_size=config.resize_size, mode=config.resize_mode,
                         progress=config.progress)


def backbone_attrs(record: dict, kept: dict | None, layers: list[str]) -> dict:
    """What the cache records of its backbone (``Backbone.record()``), with the weights stamp and the specs of the
    ``layers`` the file holds (those of the file being extended first: its kept layers keep their specs)."""
    specs = {name: spec.to_dict() for name, spec in catalog.recorded_specs(kept).items()} if kept else {}
    specs.update({spec["name"]: spec for spec in json.loads(record["layers_json"])})
    return {**record, "weights_stamp": weights_stamp(record["weights_spec"], record["weights_file"]),
            "layers_json": json.dumps([specs[layer] for layer in layers if layer in specs])}
