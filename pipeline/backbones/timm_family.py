"""The timm family: ``timm:ARCH[.TAG]``, any timm architecture as a frozen backbone (1,371 in timm 1.0.31, with
1,826 pretrained weights), through timm's own API only: ``list_models``, ``create_model`` and its loader, each
weight's ``pretrained_cfg`` (where the file lives, its preprocessing: ``resolve_data_config``),
``forward_head(pre_logits=True)`` and ``forward_intermediates``.

The tag names the weights (``vit_small_patch14_dinov2.lvd142m``). Without it, ``--weights`` must be a file or
random, and the preprocessing is the architecture's default record (its first tag's). Layers (models.zoo):
``penultimate`` (the default) and the blocks ``forward_intermediates`` gives, by name (``blocks.8``) or index
(``-4``, resolved to the name before anything is written).
"""
from __future__ import annotations

import difflib
import functools
import inspect
import math
import re
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg

from models.zoo import PRE_LOGITS, TimmLayers
from pipeline.backbones import zoo
from pipeline.backbones.catalog import LIST_BACKBONES, LIST_LAYERS, PENULTIMATE, PRETRAINED, LayerSpec, Loaded
from pipeline.common.errors import UserError, first_line
from pipeline.common.preprocess import INTERPOLATIONS, Preprocess

PREFIX = "timm:"
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's loader looks for in a Hugging Face repo
DEFAULT_CROP_PCT = 0.875  # timm's, where a weight's record has no crop_pct


@functools.lru_cache(maxsize=1)
def architectures() -> frozenset[str]:
    return frozenset(timm.list_models())


@functools.lru_cache(maxsize=1)
def pretrained() -> tuple[str, ...]:
    """Every pretrained weight as timm names it, 'ARCH.TAG', sorted."""
    return tuple(timm.list_models(pretrained=True))


def names() -> tuple[str, ...]:
    """Every pretrained weight as a backbone name, 'timm:ARCH.TAG' (an architecture alone takes a file or random)."""
    return tuple(PREFIX + name for name in pretrained())


def bare(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def check(name: str) -> str:
    """``name`` if timm has that architecture (and that tag), else one line with close names."""
    arch, _, tag = bare(name).partition(".")
    if arch in architectures() and (not tag or bare(name) in set(pretrained())):
        return name
    if arch in architectures():
        tags = [n.partition(".")[2] for n in pretrained() if n.partition(".")[0] == arch]
        raise UserError(f"timm has no weights {tag!r} for {arch}; its tags: {', '.join(tags) or 'none'} (list them "
                        f"with: {LIST_BACKBONES} 'timm:{arch}.*')")
    close = difflib.get_close_matches(bare(name), [*pretrained(), *sorted(architectures())], n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(PREFIX + c for c in close)}? " if close else ""
    raise UserError(f"unknown backbone {name!r}; {hint}list timm's with: {LIST_BACKBONES} 'timm:PATTERN'")


def pretrained_cfg(name: str) -> dict:
    """The record timm keeps of the weights ``name`` names (an architecture alone: its default weights')."""
    cfg = get_pretrained_cfg(bare(check(name)))
    return cfg.to_dict() if cfg is not None else {}


def to_preprocess(data: dict, what: str) -> Preprocess:
    """timm's data config (``resolve_data_config``) as this project's Preprocess, or one line where it is not one
    the project runs: ``crop_mode`` center is a crop after resizing the shorter side to floor(size / crop_pct),
    as timm's ``transforms_imagenet_eval`` computes it; squash with nothing to crop is a resize."""
    channels, height, width = data["input_size"]
    interpolation, crop_pct = data.get("interpolation", "bilinear"), data.get("crop_pct") or DEFAULT_CROP_PCT
    crop_mode = data.get("crop_mode") or "center"
    resize = math.floor(height / crop_pct)
    problem = (f"{channels} input channels" if channels != 3 else f"a {height}x{width} input" if height != width
               else f"{interpolation} interpolation" if interpolation not in INTERPOLATIONS
               else f"crop_mode {crop_mode}" if crop_mode not in ("center", "squash")
               else f"crop_mode squash with crop_pct {crop_pct}" if crop_mode == "squash" and resize != height else None)
    if problem:
        raise UserError(f"{what}'s preprocessing has {problem}, which this project does not run (it runs a "
                        "centre crop or a squash to a square RGB input, bilinear or bicubic); pick other weights")
    mode = "resize" if crop_mode == "squash" else "crop"
    return Preprocess(image_size=height, resize_size=height if mode == "resize" else resize, mode=mode,
                      mean=tuple(data["mean"]), std=tuple(data["std"]), interpolation=interpolation)


def preset(name: str, spec: str) -> Preprocess:
    """The preprocessing the weights' own record says (``resolve_data_config`` of their pretrained_cfg)."""
    return to_preprocess(resolve_data_config(pretrained_cfg=pretrained_cfg(name)), name)


def _hub_source(cfg: dict) -> tuple[str, str | None, list[str]]:
    """(repo, revision, file names to try) of weights timm reads from the Hugging Face hub."""
    repo, _, revision = cfg["hf_hub_id"].partition("@")
    return repo, revision or None, [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else list(HUB_FILES)


def hub_file(name: str, spec: str) -> str:
    """The pretrained weights' file where it is cached now (an absolute path, or the basename of a URL's file in the
    torch hub's checkpoints/); "" for an architecture without a tag, or weights not cached."""
    if "." not in bare(name):
        return ""
    cfg = pretrained_cfg(name)
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        from pipeline.backbones.weights import hf_cache_dir

        repo, revision, filenames = _hub_source(cfg)
        found = [try_to_load_from_cache(repo, f, cache_dir=hf_cache_dir(), revision=revision) for f in filenames]
        return next((path for path in found if isinstance(path, str)), "")
    return cfg.get("url", "").rsplit("/", 1)[-1]


def _pretrained_path(name: str, progress: bool) -> tuple[Path, str, bool]:
    """(the weights' local file, where they come from, whether timm reads it with the model's own custom loader)."""
    cfg = pretrained_cfg(name)
    if cfg.get("hf_hub_id"):
        repo, revision, filenames = _hub_source(cfg)
        return zoo.hub_weights(repo, filenames, name, revision=revision), f"hf-hub:{cfg['hf_hub_id']}", False
    if cfg.get("url"):
        folder = Path(torch.hub.get_dir()) / "checkpoints"  # where timm's own download keeps it
        return zoo.url_weights(cfg["url"], folder, name, progress=progress), cfg["url"], bool(cfg.get("custom_load"))
    if cfg.get("file"):
        return Path(cfg["file"]), f"file:{cfg['file']}", bool(cfg.get("custom_load"))
    raise UserError(f"timm records no source for {name}'s weights; pass --weights FILE ({zoo.FILE_KINDS})")


def load(name: str, spec: str = PRETRAINED, *, seed: int = 0, progress: bool = True) -> Loaded:
    """The model ``name`` with weights ``spec``: 'pretrained' (the tag's weights, through timm's loader from the local
    cache, else downloaded), 'random' (``torch.manual_seed(seed); timm.create_model(ARCH[.TAG])``), or a state_dict
    file of that architecture. Never random weights unless asked for."""
    name = check(name)
    arch = bare(name)
    enum = ""
    if spec == PRETRAINED:
        if "." not in arch:
            raise UserError(f"{name} names no pretrained weights: add a tag, such as {_first_tagged(arch)} (list them "
                            f"with: {LIST_BACKBONES} '{name}.*'), or pass --weights FILE or random")
        path, enum, custom = _pretrained_path(name, progress)
        try:
            model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={
                "file": str(path), "source": None, "custom_load": custom})  # timm's own loader, on the local file
        except Exception as err:  # a damaged or foreign file under the expected name
            raise UserError(f"{path} does not load into timm's {arch} ({first_line(err)}); delete it to download it "
                            f"again, or pass --weights FILE ({zoo.FILE_KINDS})") from None
        recorded = PRETRAINED
    else:
        model, recorded = zoo.other_weights(spec, seed, lambda: timm.create_model(arch), name, f"timm's {arch}")
    return zoo.frozen(model, name, recorded, enum)


def _first_tagged(arch: str) -> str:
    return next((PREFIX + n for n in pretrained() if n.partition(".")[0] == arch), f"{PREFIX}{arch}.TAG")


def block_names(model: torch.nn.Module) -> list[str]:
    """The blocks ``forward_intermediates`` gives, in order (its index i is the i-th): none without it."""
    if not callable(getattr(model, "forward_intermediates", None)):
        return []
    return [info["module"] for info in getattr(model, "feature_info", [])]


@functools.lru_cache(maxsize=8)
def structure(name: str) -> torch.nn.Module:
    """The model on the meta device: its structure, no weights."""
    with torch.device("meta"):
        return timm.create_model(bare(check(name)))


def list_layers(name: str) -> list[str]:
    """What --layers takes: penultimate, then each block forward_intermediates gives (by name; an index works too)."""
    return [PENULTIMATE, *block_names(structure(name))]


def resolve_layers(name: str, layers) -> tuple[str, ...]:
    """Block indices ('8', '-4') replaced by the blocks' names ('blocks.8'), so records hold names only."""
    blocks = block_names(structure(name))
    resolved = []
    for layer in layers:
        if re.fullmatch(r"-?\d+", layer):
            index = int(layer)
            if not -len(blocks) <= index < len(blocks):
                raise UserError(f"{name} has {len(blocks)} blocks, so no block {index}; use 0 to {len(blocks) - 1} or "
                                f"-{len(blocks)} to -1 (list them with: {LIST_LAYERS} {name})")
            layer = blocks[index]
        resolved.append(layer)
    return tuple(resolved)


def reduction_of(model: torch.nn.Module, name: str) -> str:
    """How a block's output becomes one vector, as the model's head pools: the class token where the head reads it,
    else the mean of the patch tokens (a token model) or over H and W (a CNN)."""
    if getattr(model, "global_pool", None) == "token":
        if "return_prefix_tokens" not in inspect.signature(model.forward_intermediates).parameters:
            raise UserError(f"{name}'s head reads its class token, which its forward_intermediates does not give; "
                            "use --layers penultimate")
        return "class_token"
    return "mean_patch_tokens" if hasattr(model, "patch_embed") else "mean_hw"


def _node_of(model: torch.nn.Module, name: str, layer: str, blocks: list[str]) -> tuple[str, str]:
    if layer == PENULTIMATE:
        return PRE_LOGITS, "pre_logits"
    if layer in blocks:
        return layer, reduction_of(model, name)
    if not blocks:
        raise UserError(f"{name} has no forward_intermediates, so no layer {layer!r}; it offers: {PENULTIMATE}")
    close = difflib.get_close_matches(layer, blocks, n=5, cutoff=0.4)
    hint = f"nearest: {', '.join(close)}; " if close else ""
    raise UserError(f"{name} has no layer {layer!r}; {hint}list all {len(blocks) + 1} with: {LIST_LAYERS} {name}")


def _check_size(model: torch.nn.Module, name: str, image_size: int) -> None:
    """A ViT whose position embeddings take one size is refused another in one line."""
    embed = getattr(model, "patch_embed", None)
    fixed = getattr(embed, "img_size", None)
    if fixed and getattr(embed, "strict_img_size", False) and tuple(fixed) != (image_size, image_size):
        raise UserError(f"--image-size {image_size} does not fit {name}: its position embeddings take only "
                        f"{fixed[0]}x{fixed[1]} inputs; use --image-size {fixed[0]}")


def plan(model: torch.nn.Module, name: str, layers, *, image_size: int = 224) -> tuple[TimmLayers, list[LayerSpec]]:
    """(the one-pass module, what to record) for the requested layers, each checked and sized by one meta pass."""
    _check_size(model, name, image_size)
    blocks = block_names(model)
    chosen = {layer: _node_of(model, name, layer, blocks) for layer in resolve_layers(name, dict.fromkeys(layers))}
    module = TimmLayers(model, chosen, {block: index for index, block in enumerate(blocks)})
    dims = zoo.widths(module, image_size)
    return module, [LayerSpec(layer, node, reduction, dims[layer]) for layer, (node, reduction) in chosen.items()]


def features(model: torch.nn.Module, specs: list[LayerSpec]) -> TimmLayers:
    """The one-pass module computing these (recorded) layers."""
    blocks = block_names(model)
    return TimmLayers(model, {s.name: (s.node, s.reduction) for s in specs}, {b: i for i, b in enumerate(blocks)})


def widths(module: TimmLayers, model: torch.nn.Module, name: str, image_size: int) -> dict[str, int]:
    _check_size(model, name, image_size)
    return zoo.widths(module, image_size)


def default_batch_size(name: str, device_type: str = "cpu", free_bytes: int | None = None) -> int:
    """From the model's multiply-adds at its input size (counted on the meta device) and the free memory."""
    size = preset(name, PRETRAINED).image_size
    run = lambda model, x: model.forward_head(model.forward_features(x), pre_logits=True)  # noqa: E731
    return zoo.batch_size(lambda: zoo.gflops(structure(name), run, size), device_type, free_bytes)
