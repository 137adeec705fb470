"""A frozen backbone as every stage gets it: ``open_backbone`` for a new cache, ``rebuild`` from what a cache or a
checkpoint recorded (its fingerprint checked). These are the only ways a stage gets a network.

A ``Backbone`` carries its name, its weights (the recorded spec, the exact enum, the hub file), its fingerprint,
the planned layers (name, graph node, reduction, width), its ``Preprocess``, and ``module``: the network mapping
a batch to ``{layer: (B, width)}`` in one pass. ``record()`` is what a cache and a checkpoint store, the same
fields for every backbone.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass

import torch

from pipeline.backbones import catalog
from pipeline.backbones.catalog import LIST_LAYERS, LayerSpec, family, recorded_backbone, recorded_specs
from pipeline.common.errors import UserError
from pipeline.common.preprocess import Preprocess


@dataclass
class Backbone:
    """A frozen backbone, on the CPU in fp32 until placed (``pipeline.backbones.precision.place_backbone``)."""

    name: str  # 'alexnet', 'resnet50'
    weights: str  # the spec as recorded: 'imagenet', 'pretrained', 'random:seed=S', 'file:/abs/path', 'X_Weights.MEMBER'
    weights_enum: str  # the exact enum of pretrained weights ('AlexNet_Weights.IMAGENET1K_V1'); else ""
    weights_file: str  # its weights' file: a basename in the torch hub cache, or a path (the Hugging Face cache)
    fingerprint: str  # sha256 over the tensors the backbone runs (models.backbones.weights_fingerprint)
    layers: tuple[LayerSpec, ...]  # what ``module`` computes, in this order
    preprocess: Preprocess
    module: torch.nn.Module  # forward(x) -> {layer: (B, width)}; forward_layers(x, names) -> those

    @property
    def dims(self) -> dict[str, int]:
        return {spec.name: spec.dim for spec in self.layers}

    def record(self) -> dict:
        """What a cache stores to name this backbone (plain strings); a checkpoint stores the same, with the
        spec of the one layer its head reads (``layer_record``)."""
        return {"backbone": self.name, "weights_spec": self.weights, "weights_fingerprint": self.fingerprint,
                "weights_enum": self.weights_enum, "weights_file": self.weights_file,
                "layers_json": json.dumps([spec.to_dict() for spec in self.layers])}


def open_backbone(name: str, weights: str = "pretrained", *, seed: int = 0, layers: tuple[str, ...] | None = None,
                  image_size: int | None = None, resize_size: int | None = None, mode: str | None = None,
                  progress: bool = True) -> Backbone:
    """The backbone ``name`` with ``weights`` (pretrained, imagenet, random with ``seed``, a file, an exact enum),
    computing ``layers`` (default: its own), each checked against the model and sized for the preprocessing's input."""
    name = catalog.check_name(name)
    source = family(name)
    loaded = source.load(name, weights, seed=seed, progress=progress)
    preprocess = catalog.preprocess_of(name, loaded.weights, image_size=image_size, resize_size=resize_size, mode=mode)
    module, specs = source.plan(loaded.model, name, catalog.canonical_layers(name, layers or catalog.default_layers(name)),
                                image_size=preprocess.image_size)
    return Backbone(name, loaded.weights, loaded.weights_enum, catalog.hub_file(name, loaded.weights_enum or "imagenet"),
                    loaded.fingerprint, tuple(specs), preprocess, module)


def rebuild(record: dict, *, weights: str | None = None, seed: int = 0, layers: tuple[str, ...] | None = None) -> Backbone:
    """The backbone a cache's attributes or a checkpoint recorded (``weights``: another spec for the same weights,
    as --weights gives it), computing its recorded ``layers`` (default: all), exactly as when it was recorded.

    Its fingerprint must be the recorded one, else one line: a head is never run on another backbone's features.
    """
    name = recorded_backbone(record)
    specs = recorded_specs(record)
    wanted = layers or tuple(specs)
    missing = [layer for layer in wanted if layer not in specs]
    if missing:
        raise UserError(f"the recorded {name} backbone has no layer {missing[0]!r} (it records "
                        f"{', '.join(specs) or 'none'}); retrain the head with run_train_head.py")
    spec = weights if weights is not None else record["weights_spec"]
    try:
        loaded = family(name).load(name, spec, seed=seed)
    except UserError as err:
        if weights is None:
            raise
        raise UserError(f"--weights {spec} cannot be the {name} backbone this head was trained on ({err}); pass "
                        "the weights used for extraction, or drop --weights") from None
    check_fingerprint(record, name, loaded.weights, loaded.fingerprint, given=weights is not None)
    chosen = [specs[layer] for layer in wanted]
    preprocess = record["preprocess"]
    preprocess = Preprocess.from_dict(json.loads(preprocess) if isinstance(preprocess, str) else preprocess)
    module = family(name).features(loaded.model, chosen)
    _check_widths(name, module, loaded.model, chosen, preprocess.image_size)
    return Backbone(name, loaded.weights, loaded.weights_enum, catalog.hub_file(name, loaded.weights_enum or "imagenet"),
                    loaded.fingerprint, tuple(chosen), preprocess, module)


def _check_widths(name: str, module, model: torch.nn.Module, specs: list[LayerSpec], image_size: int) -> None:
    """The recorded layers, at the recorded input size, give the recorded widths (one pass on the meta device):
    a damaged record is one line, before a frame is read."""
    widths = family(name).widths(module, model, name, image_size)
    for spec in specs:
        width = widths[spec.name]
        if width != spec.dim:
            raise UserError(f"the recorded {name} layer {spec.name!r} gives {width} features at {image_size} px, not "
                            f"the {spec.dim} recorded; retrain the head with run_train_head.py")


def check_fingerprint(record: dict, name: str, recorded: str, fingerprint: str, *, given: bool) -> None:
    """One line when the weights now give another network than the one the record was made with."""
    if fingerprint == record["weights_fingerprint"]:
        return
    trained_on = f"{name} {record['weights_spec']!r} (fingerprint {record['weights_fingerprint'][:12]})"
    given_as = f"--weights {recorded}" if given else f"the backbone weights {recorded}"
    advice = "pass the weights used for extraction, or drop --weights" if given else \
        "pass --weights with the backbone used for extraction"
    raise UserError(f"{given_as} give a {name} with fingerprint {fingerprint[:12]}, but the head was trained on "
                    f"features of {trained_on}; {advice}")


def backbone_listing(pattern: str | None = None) -> str:
    """Every backbone name, family by family, several per line; ``pattern`` (fnmatch, any case; a plain word
    matches where it appears) keeps those it matches, with or without the family's prefix. A zoo family whose
    packages are absent is one line saying how to install them."""
    pattern = None if pattern in (None, "", "*") else pattern
    if pattern and not any(char in pattern for char in "*?["):
        pattern = f"*{pattern}*"
    blocks = []
    for prefix in catalog.FAMILIES:
        label = prefix[:-1] or "torchvision"
        try:
            names = family(prefix).names()
        except UserError:
            blocks.append(f"{label}: not installed; {catalog.ZOO_EXTRA}")
            continue
        shown = [n for n in names if not pattern or fnmatch.fnmatch(n.lower(), pattern.lower())
                 or fnmatch.fnmatch(n[len(prefix):].lower(), pattern.lower())]
        count = f"{len(shown)} of {len(names)}" if pattern else f"{len(names)}"
        blocks.append(f"{label} ({count}):" + ("\n" + _columns(shown) if shown else ""))
    return "\n\n".join(blocks)


def _columns(names: list[str]) -> str:
    """Names in columns, at most about 100 characters a line."""
    width = max(map(len, names)) + 2
    per_line = max(1, 100 // width)
    return "\n".join("".join(n.ljust(width) for n in names[i:i + per_line]).rstrip() for i in range(0, len(names), per_line))


def layer_listing(name: str) -> str:
    """One backbone's layer names (what --layers takes): its named layers, then its graph nodes in order."""
    name = catalog.check_name(name)
    return "\n".join(family(name).list_layers(name))


__all__ = ["Backbone", "LIST_LAYERS", "backbone_listing", "check_fingerprint", "layer_listing", "open_backbone", "rebuild"]
