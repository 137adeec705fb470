"""The backbone an extraction runs: AlexNet's fc7 cut (as before other backbones), or any torchvision
classifier planned by ``pipeline.common.backbones.catalog``; its default batch size, and what its cache records."""
from __future__ import annotations

import json

import torch

from models.layers import LAYER_DIMS
from pipeline.common.backbones.loading import load_backbone
from pipeline.common.config import ExtractConfig
from pipeline.common.hardware import free_memory
from pipeline.common.preprocess import Preprocess
from pipeline.common.backbones.weights import weights_stamp


def default_batch_size(backbone: str, device: torch.device) -> int:
    """AlexNet's as before (64 on the CPU, 256 on CUDA); other models' from their size and the free memory."""
    if backbone == "alexnet":
        return 256 if device.type == "cuda" else 64
    from pipeline.common.backbones.catalog import default_batch_size as by_model

    free = free_memory(device) if device.type == "cuda" else None
    return by_model(backbone, device.type, free)


def load_for(config: ExtractConfig, preprocess: Preprocess) -> tuple[torch.nn.Module, str, str, dict, dict]:
    """(the backbone, its recorded weights spec, its fingerprint, {layer: width}, extra cache attributes)."""
    if config.is_alexnet:  # the fc7 cut: its fingerprint covers exactly the layers AlexNet caches compare
        backbone, weights_spec, fingerprint = load_backbone(config.weights, seed=config.seed)
        return backbone, weights_spec, fingerprint, dict(LAYER_DIMS), {}
    from pipeline.common.backbones.catalog import default_weights, hub_file, load_classifier, named_weights, plan_layers

    loaded = load_classifier(config.backbone, config.weights, seed=config.seed, progress=config.progress)
    module, specs = plan_layers(loaded.model, loaded.name, config.layers, image_size=preprocess.image_size)
    weights = named_weights(loaded.name, loaded.weights_enum) if loaded.weights_enum else default_weights(loaded.name)
    attrs = {"weights_enum": loaded.weights_enum or "", "weights_file": hub_file(weights).name,
             "layers_json": json.dumps([spec.to_dict() for spec in specs])}
    return module, loaded.weights, loaded.fingerprint, {spec.name: spec.dim for spec in specs}, attrs


def backbone_attrs(weights_spec: str, attrs: dict, kept: dict | None) -> dict:
    """The weights stamp, and for a non-AlexNet backbone its exact weights enum, hub file and layer specs
    (those of the file being extended first): absent ``layers_json`` means AlexNet's layers."""
    if not attrs:
        return {"weights_stamp": weights_stamp(weights_spec)}
    specs = {spec["name"]: spec for spec in json.loads(kept.get("layers_json", "[]"))} if kept else {}
    specs.update({spec["name"]: spec for spec in json.loads(attrs["layers_json"])})
    return {**attrs, "weights_stamp": weights_stamp(weights_spec, attrs["weights_file"]),
            "layers_json": json.dumps(list(specs.values()))}
