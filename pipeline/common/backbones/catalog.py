"""Any torchvision classification model as a frozen backbone: its name, weights, layers and preprocessing.

Everything comes from torchvision's own registry (``list_models``, ``get_model``, ``get_model_weights``),
its weights API (``weights.get_state_dict``, ``weights.transforms()``) and its graph-based feature
extraction; nothing here knows a model by hand except AlexNet's DeCAF layer names (pool5, fc6, fc7).

    python -m pipeline.common.backbones.catalog            # lists every backbone name
    python -m pipeline.common.backbones.catalog resnet50   # lists resnet50's layer names
"""
from __future__ import annotations

import difflib
import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torchvision import models as tv_models

from features.attrs import NOT_LAYERS
from models import weights_fingerprint
from models.backbones import LayerFeatures, graph_node_names, node_extractor, penultimate_node, reduce_to_vector, reduction_for
from pipeline.common.errors import UserError, first_line
from pipeline.common.preprocess import Preprocess
from pipeline.common.backbones.weights import describe_weights

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "alexnet"
LIST_BACKBONES = "python -m pipeline.common.backbones.catalog"  # how a user lists them all (see the module docstring)
PENULTIMATE = "penultimate"
# AlexNet's DeCAF names: (graph node, reduction). pool5 is the flattened avgpool output, fc6/fc7 post-ReLU
ALEXNET_LAYERS = {"pool5": ("avgpool", "flatten"), "fc6": ("classifier.2", "none"), "fc7": ("classifier.5", "none")}


@functools.lru_cache(maxsize=1)
def backbone_names() -> tuple[str, ...]:
    """Every torchvision classification model name, sorted (detection, video, ... models are not in it)."""
    return tuple(sorted(tv_models.list_models(module=tv_models)))


def backbone_listing() -> str:
    """All backbone names, several per line, for a person to read."""
    names = backbone_names()
    width = max(map(len, names)) + 2
    per_line = max(1, 100 // width)
    return "\n".join("".join(n.ljust(width) for n in names[i:i + per_line]).rstrip() for i in range(0, len(names), per_line))


def check_backbone(name: str) -> str:
    """``name`` if torchvision has a classification model of that name, else one line with close names."""
    if name in backbone_names():
        return name
    close = difflib.get_close_matches(name.lower(), backbone_names(), n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(f"unknown backbone {name!r}; {hint}list all {len(backbone_names())} with: {LIST_BACKBONES}")


def weights_enum_name(weights: tv_models.WeightsEnum) -> str:
    """The exact name a weights enum is recorded by, e.g. 'ResNet50_Weights.IMAGENET1K_V2' (never DEFAULT)."""
    return f"{type(weights).__name__}.{weights.name}"


def default_weights(name: str) -> tv_models.WeightsEnum:
    """The model's DEFAULT pretrained weights, resolved to the member it stands for today."""
    return tv_models.get_model_weights(check_backbone(name)).DEFAULT


def named_weights(name: str, spec: str) -> tv_models.WeightsEnum | None:
    """The weights enum a spec names: 'imagenet' (the DEFAULT, resolved) or an exact 'X_Weights.MEMBER'."""
    if spec == "imagenet":
        return default_weights(name)
    if "_Weights." not in spec or os.sep in spec:
        return None
    try:
        weights = tv_models.get_weight(spec)
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"unknown weights {spec!r}; pass imagenet, random, a state_dict file, or one of "
                        f"{', '.join(weights_enum_name(w) for w in tv_models.get_model_weights(name))}") from None
    if type(weights) is not tv_models.get_model_weights(name):
        raise UserError(f"weights {spec} are not {name}'s; pass imagenet, or one of "
                        f"{', '.join(weights_enum_name(w) for w in tv_models.get_model_weights(name))}")
    return weights


def hub_file(weights: tv_models.WeightsEnum) -> Path:
    """Where torchvision keeps (or downloads) these weights: $TORCH_HOME/hub/checkpoints/<url basename>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


@dataclass
class LoadedBackbone:
    """A whole torchvision classifier in eval mode on the CPU, and what its artifacts must record."""

    model: torch.nn.Module
    name: str  # torchvision model name: 'resnet50'
    weights: str  # the spec as recorded: 'imagenet', 'random:seed=S', 'file:/abs/path' or 'X_Weights.MEMBER'
    weights_enum: str | None  # exact enum for pretrained weights, 'ResNet50_Weights.IMAGENET1K_V2'; else None
    fingerprint: str  # sha256 over the model's tensors (models.weights_fingerprint)

    def record(self) -> dict:
        """What a cache or checkpoint stores to name this backbone (plain strings)."""
        return {"backbone": self.name, "weights": self.weights, "weights_enum": self.weights_enum or "",
                "weights_fingerprint": self.fingerprint}


def _pretrained_model(name: str, weights: tv_models.WeightsEnum, progress: bool) -> torch.nn.Module:
    """torchvision's own builder with these weights: it sets what the weights need (ViT's image size,
    Inception's transform_input) and checks the sha256 prefix of a download (check_hash=True)."""
    cached = hub_file(weights)
    was_there = cached.is_file()
    try:
        return tv_models.get_model(name, weights=weights, progress=progress)
    except Exception as err:
        if was_there:  # a damaged or foreign file under the expected name: torch.hub trusts its cache
            raise UserError(f"{cached} is not usable as {weights_enum_name(weights)} ({first_line(err)}); delete it "
                            "to download it again, or copy a good copy there") from None
        raise UserError(f"{weights_enum_name(weights)} weights are not in {cached} and could not be downloaded "
                        f"({first_line(err)}); copy {cached.name} there, or pass --weights PATH to a local copy") from None


def skeleton(name: str) -> torch.nn.Module:
    """The model with the right structure and no meaningful weights: on the meta device (no random init),
    or on the CPU for the few builders that compute on tensors (RegNet's widths)."""
    try:
        with torch.device("meta"):
            return tv_models.get_model(name, weights=None)
    except NotImplementedError:
        return tv_models.get_model(name, weights=None)


def _file_model(name: str, path: Path) -> torch.nn.Module:
    """The model with a state_dict file's tensors as parameters, built on the meta device (no random init)."""
    if not path.is_file():
        raise UserError(f"weights file not found: {path}; pass --weights imagenet, random, or an existing .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{path} is not a readable PyTorch weights file ({first_line(err)}); "
                        f"pass a state_dict of torchvision's {name}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state_dict of tensors; pass a state_dict of torchvision's {name}")
    model = skeleton(name)
    expected = model.state_dict()
    wrong = sorted(set(expected) ^ set(state)) or [k for k in expected if state[k].shape != expected[k].shape]
    if wrong:
        raise UserError(f"{path} does not fit torchvision's {name} (keys or shapes differ: {', '.join(wrong[:3])}); "
                        f"pass a state_dict of torchvision.models.{name}")
    model.load_state_dict({k: v.to(expected[k].dtype).contiguous() for k, v in state.items()}, assign=True)
    return model


def load_classifier(name: str, spec: str = "imagenet", *, seed: int = 0, progress: bool = True) -> LoadedBackbone:
    """The whole classifier ``name`` with weights ``spec``: 'imagenet' (the model's DEFAULT weights, recorded
    by their exact enum), an exact 'X_Weights.MEMBER', 'random' (``torch.manual_seed(seed); get_model(name)``),
    or a state_dict file. Never random weights unless asked for."""
    name = check_backbone(name)
    weights = named_weights(name, spec)
    if weights is not None:
        model = _pretrained_model(name, weights, progress)
        recorded = "imagenet" if spec == "imagenet" else weights_enum_name(weights)
    else:
        recorded = describe_weights(spec, seed)
        if recorded.startswith("random:"):
            torch.manual_seed(int(recorded.split("=", 1)[1]))
            model = tv_models.get_model(name, weights=None)
            log.warning("backbone %s has RANDOM weights (%s): features are not ImageNet features", name, recorded)
        else:
            model = _file_model(name, Path(recorded[5:]))
    model.requires_grad_(False)
    model.eval()
    return LoadedBackbone(model, name, recorded, weights_enum_name(weights) if weights is not None else None,
                          weights_fingerprint(model))


def preprocess_for(name: str, weights: tv_models.WeightsEnum | None = None, *, image_size: int | None = None,
                   resize_size: int | None = None) -> Preprocess:
    """The preprocessing the weights' own ``transforms()`` define (resize, crop, interpolation, mean, std);
    the model's DEFAULT weights' when it has random or file weights. ``image_size``/``resize_size`` override
    the crop and the resize (the resize never below the crop), as --image-size/--resize-size do."""
    preset = (weights or default_weights(name)).transforms()
    crop, resize = preset.crop_size[0], preset.resize_size[0]
    image = image_size if image_size is not None else crop
    resize = max(resize_size if resize_size is not None else resize, image)
    return Preprocess(image_size=image, resize_size=resize, mean=tuple(preset.mean), std=tuple(preset.std),
                      interpolation=preset.interpolation.value)


def default_layers(name: str) -> tuple[str, ...]:
    """The layers cached when --layers is not given: fc7 on AlexNet (as today), the penultimate elsewhere."""
    return ("fc7",) if name == DEFAULT_BACKBONE else (PENULTIMATE,)


def layer_names(model: torch.nn.Module, name: str) -> list[str]:
    """Every name --layers accepts for this model: its aliases, then its graph nodes in execution order, each
    module path ('layer4', 'features.7') right after its last node, whose output it means (as in
    ``create_feature_extractor``)."""
    aliases = ([*ALEXNET_LAYERS] if name == DEFAULT_BACKBONE else []) + [PENULTIMATE]
    nodes = graph_node_names(model)
    after: dict[int, list[str]] = {}
    for prefix, index in _module_ends(nodes).items():
        if prefix not in nodes:
            after.setdefault(index, []).append(prefix)
    ordered = []
    for index, node in enumerate(nodes):
        ordered += [node, *sorted(after.get(index, []), key=len, reverse=True)]  # deepest path first
    return aliases + ordered


def _module_ends(nodes: list[str]) -> dict[str, int]:
    """Each module path of the graph's nodes ('layer4', 'features') -> the index of its last node in ``nodes``."""
    last = {}
    for index, node in enumerate(nodes):
        parts = node.split(".")
        for depth in range(1, len(parts)):
            last[".".join(parts[:depth])] = index
    return last


def _refuse_reserved(model: torch.nn.Module, name: str, layer: str) -> None:
    """A layer becomes a dataset of the cache named after it: the cache's own names (``features``, its link to
    the main layer; ``labels``, ``paths``, ...: features.attrs.NOT_LAYERS) are refused, naming the graph node
    that gives the same output where there is one (the last node of a module path such as ``features``)."""
    if layer not in NOT_LAYERS:
        return
    nodes = graph_node_names(model)
    ends = _module_ends(nodes)
    role = "its link to the main layer" if layer == "features" else f"its {layer} dataset"
    if layer in ends and layer not in nodes:
        node = nodes[ends[layer]]
        raise UserError(f"--layers {layer}: the cache reserves the name {layer!r} for {role}; pass --layers {node} "
                        f"instead, the last node of {name}'s {layer} module (the same output)")
    raise UserError(f"--layers {layer}: the cache reserves the name {layer!r} for {role}; pass another node (list "
                    f"them with: {LIST_BACKBONES} {name})")


@dataclass(frozen=True)
class LayerSpec:
    """One cached layer: its name, the graph node it is read from, how it becomes a vector, its size."""

    name: str  # as the user asked for it: 'penultimate', 'fc7', 'layer4'
    node: str  # torchvision graph node: 'flatten', 'classifier.5', 'layer4'
    reduction: str  # models.backbones.REDUCTIONS
    dim: int  # the vector's length

    def to_dict(self) -> dict:
        return {"name": self.name, "node": self.node, "reduction": self.reduction, "dim": self.dim}


def _node_of(model: torch.nn.Module, name: str, layer: str) -> tuple[str, str | None]:
    """(graph node, fixed reduction or None to choose by shape) for a requested layer name."""
    if name == DEFAULT_BACKBONE and layer in ALEXNET_LAYERS:
        return ALEXNET_LAYERS[layer]
    if layer == PENULTIMATE:
        node = penultimate_node(model)
        if node is None:
            raise UserError(f"{name} has no single nn.Linear classifier, so no penultimate layer; "
                            f"pass --layers with a node name (list them with: {LIST_BACKBONES} {name})")
        return node, None
    _refuse_reserved(model, name, layer)
    names = layer_names(model, name)  # tracing the graph costs seconds: only for node names
    if layer in names:
        return layer, None
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.4)
    hint = f"nearest: {', '.join(close)}; " if close else ""
    raise UserError(f"{name} has no layer {layer!r}; {hint}list all {len(names)} with: {LIST_BACKBONES} {name}")


def _probe_shapes(extractor: torch.nn.Module, model: torch.nn.Module, name: str, image_size: int) -> dict[str, tuple[int, ...]]:
    """Each node's output shape for one image of ``image_size``, from a pass on the meta device (no compute:
    the extractor's tensors are swapped for meta ones); one real fp32 image where the meta pass fails. A
    size the model cannot take is one line."""
    fixed = getattr(model, "image_size", None)  # ViT: its position embeddings are made for one size
    if isinstance(fixed, int) and fixed != image_size:
        raise UserError(f"--image-size {image_size} does not fit {name}: its position embeddings take only "
                        f"{fixed}x{fixed} inputs; use --image-size {fixed}")
    meta = {key: torch.empty_like(value, device="meta") for key, value in extractor.state_dict(keep_vars=True).items()}
    try:
        outputs = torch.func.functional_call(extractor, meta, (torch.zeros(1, 3, image_size, image_size, device="meta"),))
    except Exception:  # an op without a meta kernel, or a size the model cannot take: see it for real
        image = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
        try:
            with torch.inference_mode():
                outputs = extractor(image)
        except Exception as err:
            weights = default_weights(name)
            smallest = weights.meta.get("min_size", (1, 1))[0]
            raise UserError(f"--image-size {image_size} does not fit {name} ({first_line(err)}); use at least "
                            f"{smallest} (its weights were trained at {preprocess_for(name, weights).image_size})") from None
    return {node: tuple(output.shape) for node, output in outputs.items()}


def plan_layers(model: torch.nn.Module, name: str, layers: tuple[str, ...] | list[str] | None = None, *,
                image_size: int = 224) -> tuple[LayerFeatures, list[LayerSpec]]:
    """(the one-pass module, what to record) for the requested layers (default: ``default_layers``), each
    checked and sized by one pass over one image.

    Reductions: (B, C, H, W) and Swin's (B, H, W, C) are averaged over H and W, ViT tokens give their class
    token, (B, D) stays; AlexNet's pool5 stays flattened. Unknown names are one line with the nearest ones.
    """
    layers = list(dict.fromkeys(layers or default_layers(name)))
    chosen = {layer: _node_of(model, name, layer) for layer in layers}
    extractor = node_extractor(model, [node for node, _ in chosen.values()])
    shapes = _probe_shapes(extractor, model, name, image_size)
    is_vit = isinstance(model, torchvision.models.VisionTransformer)
    is_swin = isinstance(model, torchvision.models.SwinTransformer)
    specs = []
    for layer, (node, reduction) in chosen.items():
        shape = shapes[node]
        reduction = reduction or reduction_for(shape, channels_last=is_swin, class_token=is_vit)
        if reduction is None:
            raise UserError(f"{name} layer {layer!r} gives {tuple(shape)}, which has no reduction to one vector per "
                            "image (4-d maps are averaged, ViT tokens give their class token); pick another node")
        dim = reduce_to_vector(torch.empty(shape, device="meta"), reduction).shape[1]
        specs.append(LayerSpec(layer, node, reduction, int(dim)))
    return layer_features(model, specs, extractor=extractor), specs


def layer_features(model: torch.nn.Module, specs: list[LayerSpec], *, extractor=None) -> LayerFeatures:
    """The one-pass module computing these (recorded) layers: ``forward(x) -> {name: (B, dim)}``."""
    return LayerFeatures(model, {spec.name: (spec.node, spec.reduction) for spec in specs}, extractor=extractor)


def default_batch_size(name: str, device_type: str = "cpu", free_bytes: int | None = None) -> int:
    """The extraction batch when --batch-size is not given: AlexNet's as today (64 on the CPU, 256 on CUDA);
    else from the model's GFLOPs per image (the CPU costs per image, so big models take fewer) and, on CUDA,
    ``free_bytes`` of device memory (a quarter of it for activations, about 2 MB per GFLOP per image)."""
    if name == DEFAULT_BACKBONE:
        return 256 if device_type == "cuda" else 64
    gflops = float(default_weights(name).meta.get("_ops", 4.0))
    if device_type != "cuda":
        budget = 256 / gflops  # 64 for <= 4 GFLOPs (resnet50: 32), 8 for vit_b_16 (17.6)
        return int(min(64, max(8, 2 ** math.floor(math.log2(max(budget, 1))))))
    if free_bytes is None:
        return 256
    per_image = 2e6 * max(gflops, 1.0)
    return int(min(256, max(8, 2 ** math.floor(math.log2(max(free_bytes / 4 / per_image, 1))))))


def main(argv: list[str] | None = None) -> int:
    """Prints all backbone names, or one backbone's layer names (aliases first, then its graph nodes)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(backbone_listing())
        return 0
    try:
        name = check_backbone(argv[0])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(layer_names(skeleton(name), name)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
