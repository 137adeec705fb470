"""The torchvision family: any torchvision classification model as a frozen backbone (80 in torchvision 0.29).

Everything comes from torchvision's own registry (``list_models``, ``get_model``, ``get_model_weights``), its
weights API (``weights.transforms()``, the hub cache) and its graph-based feature extraction. A catalog entry
(pipeline.backbones.catalog: AlexNet's) adds named layers and a cut; nothing else knows a model by hand.

A family module offers what ``catalog.Family`` lists: ``names``, ``check``, ``load`` (a model and what names its
weights), ``preset`` (the weights' preprocessing), ``hub_file``, ``list_layers``, ``resolve_layers``, ``plan``
(layers checked and sized), ``features`` (recorded layers rebuilt), ``widths`` and ``default_batch_size``. The
other families (timm_family, open_clip_family) are modules like this, registered in ``catalog.FAMILIES``.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
from pathlib import Path

import torch
import torchvision
from torchvision import models as tv_models

from features.attrs import NOT_LAYERS
from models.backbones import (LayerFeatures, graph_node_names, node_extractor, penultimate_node, reduce_to_vector,
                              reduction_for, weights_fingerprint)
from pipeline.backbones.catalog import (LIST_BACKBONES, LIST_LAYERS, PENULTIMATE, LayerSpec, Loaded, batch_size_for,
                                        entry, own_weights)
from pipeline.backbones.weights import describe_weights, load_state_dict
from pipeline.common.errors import UserError, first_line
from pipeline.common.preprocess import Preprocess

log = logging.getLogger(__name__)

INITS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
         "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@functools.lru_cache(maxsize=1)
def names() -> tuple[str, ...]:
    """Every torchvision classification model name, sorted (detection, video, ... models are not in it)."""
    return tuple(sorted(tv_models.list_models(module=tv_models)))


def check(name: str) -> str:
    """``name`` if torchvision has a classification model of that name, else one line with close names."""
    if name in names():
        return name
    close = difflib.get_close_matches(name.lower(), names(), n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(f"unknown backbone {name!r}; {hint}list all {len(names())} with: {LIST_BACKBONES}")


def enum_name(weights: tv_models.WeightsEnum) -> str:
    """The exact name a weights enum is recorded by, e.g. 'ResNet50_Weights.IMAGENET1K_V2' (never DEFAULT)."""
    return f"{type(weights).__name__}.{weights.name}"


def default_weights(name: str) -> tv_models.WeightsEnum:
    """The model's DEFAULT pretrained weights, resolved to the member it stands for today."""
    return tv_models.get_model_weights(check(name)).DEFAULT


def named_weights(name: str, spec: str) -> tv_models.WeightsEnum | None:
    """The weights enum a spec names: 'imagenet' or 'pretrained' (the DEFAULT, resolved) or an exact
    'X_Weights.MEMBER'."""
    spec = own_weights(name, spec)
    if spec == "imagenet":
        return default_weights(name)
    if "_Weights." not in spec or os.sep in spec:
        return None
    options = ", ".join(enum_name(w) for w in tv_models.get_model_weights(name))
    try:
        weights = tv_models.get_weight(spec)
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"unknown weights {spec!r}; pass imagenet, random, a state_dict file, or one of {options}") from None
    if type(weights) is not tv_models.get_model_weights(name):
        raise UserError(f"weights {spec} are not {name}'s; pass imagenet, random, a state_dict file, or one of {options}")
    return weights


def hub_path(weights: tv_models.WeightsEnum) -> Path:
    """Where torchvision keeps (or downloads) these weights: $TORCH_HOME/hub/checkpoints/<url basename>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def hub_file(name: str, spec: str) -> str:
    """The basename of the hub file of the weights ``spec`` names (random or file weights: the default's)."""
    return hub_path(named_weights(name, spec) or default_weights(name)).name


def weights_url(weights: tv_models.WeightsEnum) -> str:
    """Where the weights are downloaded from (a seam: tests point it at a loopback server)."""
    return weights.url


def preset(name: str, spec: str) -> Preprocess:
    """The preprocessing the weights' own ``transforms()`` define (resize, crop, interpolation, mean, std); the
    model's DEFAULT weights' when it has random or file weights."""
    transforms = (named_weights(name, spec) or default_weights(name)).transforms()
    return Preprocess(image_size=transforms.crop_size[0], resize_size=transforms.resize_size[0],
                      mean=tuple(transforms.mean), std=tuple(transforms.std),
                      interpolation=transforms.interpolation.value)


@contextlib.contextmanager
def _no_init():
    """No random initialisation while a model is built whose every tensor is then loaded (seconds for big ones)."""
    saved = {name: getattr(torch.nn.init, name) for name in INITS if hasattr(torch.nn.init, name)}
    for name in saved:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


@contextlib.contextmanager
def _serving(weights: tv_models.WeightsEnum, state: dict):
    """torchvision's builder loads ``state`` as these weights' (it was read and hash-checked here, once)."""
    kind = type(weights)
    kind.get_state_dict = lambda self, *args, **kwargs: state
    try:
        yield
    finally:
        del kind.get_state_dict


def _pretrained_model(name: str, weights: tv_models.WeightsEnum, progress: bool) -> torch.nn.Module:
    """torchvision's own builder with these weights (it sets what they need: ViT's image size, Inception's
    transform_input, DenseNet's key names); the file comes from the hub cache, or is downloaded and its sha256
    prefix checked (check_hash)."""
    cached = hub_path(weights)
    was_there = cached.is_file()
    try:
        state = torch.hub.load_state_dict_from_url(weights_url(weights), map_location="cpu", progress=progress,
                                                   check_hash=True, weights_only=True, file_name=cached.name)
    except Exception as err:
        if was_there:  # a damaged or foreign file under the expected name: torch.hub trusts its cache
            raise UserError(f"{cached} is not usable as {enum_name(weights)} ({first_line(err)}); delete it to "
                            "download it again, or copy a good copy there") from None
        raise UserError(f"{enum_name(weights)} weights are not in {cached} and could not be downloaded "
                        f"({first_line(err)}); copy {cached.name} there, or pass --weights PATH to a local copy") from None
    try:
        with _no_init(), _serving(weights, state):
            return tv_models.get_model(name, weights=weights, progress=progress)
    except (RuntimeError, KeyError) as err:
        raise UserError(f"{cached} does not fit torchvision's {name} ({first_line(err)}); delete it to download it "
                        "again, or pass --weights PATH to a good copy") from None


def skeleton(name: str) -> torch.nn.Module:
    """The model with the right structure and no meaningful weights: on the meta device (no random init),
    or on the CPU for the few builders that compute on tensors (RegNet's widths)."""
    try:
        with torch.device("meta"):
            return tv_models.get_model(name, weights=None)
    except NotImplementedError:
        with _no_init():
            return tv_models.get_model(name, weights=None)


def _file_model(name: str, path: Path) -> torch.nn.Module:
    """The model with a state_dict file's tensors as parameters, built on the meta device (no random init)."""
    state = load_state_dict(path, f"torchvision's {name}")
    model = skeleton(name)
    expected = model.state_dict()
    wrong = sorted(set(expected) ^ set(state)) or [k for k in expected if state[k].shape != expected[k].shape]
    if wrong:
        raise UserError(f"{path} does not fit torchvision's {name} (keys or shapes differ: {', '.join(wrong[:3])}); "
                        f"pass a state_dict of torchvision.models.{name}")
    model.load_state_dict({k: v.to(expected[k].dtype).contiguous() for k, v in state.items()}, assign=True)
    return model


def random_model(name: str, seed: int) -> torch.nn.Module:
    """Exactly ``torch.manual_seed(seed); get_model(name)``: for tests only."""
    torch.manual_seed(seed)
    return tv_models.get_model(name, weights=None)


def _cut(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The model as its catalog entry cuts it (AlexNet: after fc7), the rest dropped: never run, never fingerprinted."""
    found = entry(name)
    if found is not None and found.truncate is not None:
        module, length = found.truncate
        setattr(model, module, getattr(model, module)[:length])
    return model


def load(name: str, spec: str = "imagenet", *, seed: int = 0, progress: bool = True) -> Loaded:
    """The classifier ``name`` with weights ``spec``: 'imagenet' or 'pretrained' (the model's DEFAULT weights,
    recorded as 'imagenet' and by their exact enum), an exact 'X_Weights.MEMBER', 'random'
    (``torch.manual_seed(seed); get_model(name)``), or a state_dict file. Never random weights unless asked for."""
    name = check(name)
    spec = own_weights(name, spec)
    weights = named_weights(name, spec)
    if weights is not None:
        model = _pretrained_model(name, weights, progress)
        recorded = "imagenet" if spec == "imagenet" else enum_name(weights)
    else:
        recorded = describe_weights(spec, seed)
        if recorded.startswith("random:"):
            model = random_model(name, int(recorded.split("=", 1)[1]))
            log.warning("backbone %s has RANDOM weights (%s): features are not ImageNet features", name, recorded)
        else:
            model = _file_model(name, Path(recorded[5:]))
    model = _cut(model, name)
    model.requires_grad_(False)
    model.eval()
    return Loaded(model, name, recorded, enum_name(weights) if weights is not None else "", weights_fingerprint(model))


def layer_names(model: torch.nn.Module, name: str) -> list[str]:
    """Every name --layers accepts for this model: its named layers, then its graph nodes in execution order, each
    module path ('layer4', 'features.7') right after its last node, whose output it means (as in
    ``create_feature_extractor``)."""
    found = entry(name)
    aliases = list(found.layers) if found else [PENULTIMATE]
    nodes = graph_node_names(model)
    after: dict[int, list[str]] = {}
    for prefix, index in _module_ends(nodes).items():
        if prefix not in nodes:
            after.setdefault(index, []).append(prefix)
    ordered = []
    for index, node in enumerate(nodes):
        ordered += [node, *sorted(after.get(index, []), key=len, reverse=True)]  # deepest path first
    return aliases + ordered


def structure(name: str) -> torch.nn.Module:
    """The model as a backbone runs it (cut as its catalog entry says), with no meaningful weights: for its
    graph's names and shapes."""
    return _cut(skeleton(name), name)


def list_layers(name: str) -> list[str]:
    """Every layer name ``name`` takes, from its structure alone (no weights are read)."""
    return layer_names(structure(name), name)


def resolve_layers(name: str, layers) -> tuple[str, ...]:
    """torchvision layers are named, never numbered: the names as given (a number is refused by ``plan``)."""
    return tuple(layers)


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
                    f"them with: {LIST_LAYERS} {name})")


def _node_of(model: torch.nn.Module, name: str, layer: str) -> tuple[str, str | None]:
    """(graph node, fixed reduction or None to choose by shape) for a requested layer name."""
    found = entry(name)
    if found is not None and layer in found.layers:
        return found.layers[layer].node, found.layers[layer].reduction
    if layer == PENULTIMATE:
        node = penultimate_node(model)
        if node is None:
            raise UserError(f"{name} has no single nn.Linear classifier, so no penultimate layer; "
                            f"pass --layers with a node name (list them with: {LIST_LAYERS} {name})")
        return node, None
    _refuse_reserved(model, name, layer)
    known = layer_names(model, name)  # tracing the graph costs seconds: only for node names
    if layer in known:
        return layer, None
    close = difflib.get_close_matches(layer, known, n=5, cutoff=0.4)
    hint = f"nearest: {', '.join(close)}; " if close else ""
    raise UserError(f"{name} has no layer {layer!r}; {hint}list all {len(known)} with: {LIST_LAYERS} {name}")


def probe(extractor: torch.nn.Module, model: torch.nn.Module, name: str, image_size: int) -> dict[str, tuple[int, ...]]:
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
                            f"{smallest} (its weights were trained at {preset(name, 'imagenet').image_size})") from None
    return {node: tuple(output.shape) for node, output in outputs.items()}


def plan(model: torch.nn.Module, name: str, layers: tuple[str, ...] | list[str], *,
         image_size: int = 224) -> tuple[LayerFeatures, list[LayerSpec]]:
    """(the one-pass module, what to record) for the requested layers, each checked and sized by one pass over one
    image. Reductions: (B, C, H, W) and Swin's (B, H, W, C) are averaged over H and W, ViT tokens give their class
    token, (B, D) stays; a named layer keeps its own (AlexNet's pool5 stays flattened). Unknown names are one line
    with the nearest ones."""
    chosen = {layer: _node_of(model, name, layer) for layer in dict.fromkeys(layers)}
    extractor = node_extractor(model, [node for node, _ in chosen.values()])
    shapes = probe(extractor, model, name, image_size)
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
    return features(model, specs, extractor=extractor), specs


def features(model: torch.nn.Module, specs: list[LayerSpec], *, extractor=None) -> LayerFeatures:
    """The one-pass module computing these (recorded) layers: ``forward(x) -> {name: (B, dim)}``."""
    return LayerFeatures(model, {spec.name: (spec.node, spec.reduction) for spec in specs}, extractor=extractor)


def widths(module: LayerFeatures, model: torch.nn.Module, name: str, image_size: int) -> dict[str, int]:
    """Each layer's vector length at ``image_size``, from one pass on the meta device (``probe``)."""
    shapes = probe(module.extractor, model, name, image_size)
    return {layer: int(reduce_to_vector(torch.empty(shapes[node], device="meta"), reduction).shape[1])
            for layer, (node, reduction) in module.layers.items()}


def default_batch_size(name: str, device_type: str = "cpu", free_bytes: int | None = None) -> int:
    """The extraction batch from the model's GFLOPs per image (``catalog.batch_size_for``: the CPU costs per image,
    so big models take fewer; on CUDA from ``free_bytes`` of device memory)."""
    return batch_size_for(float(default_weights(name).meta.get("_ops", 4.0)), device_type, free_bytes)
