"""The open_clip family: ``open_clip:ARCH[/TAG]``, a CLIP model's image tower as a frozen backbone (196 pretrained
weights of 144 configurations in open_clip 3.3), through open_clip's own API only: ``list_models``,
``list_pretrained``, ``create_model`` and its loader, the weights' ``preprocess_cfg`` and ``encode_image``.

The tag names the weights (``ViT-B-32/laion2b_s34b_b79k``); without it ``--weights`` must be a file or random and
the preprocessing is the configuration's own. Its one layer is ``embedding`` (``penultimate`` is an alias): the
image embedding ``encode_image`` gives, unnormalised, as the LAION CLIP benchmark probes it. The fingerprint
covers the whole model, text tower and ``logit_scale`` included: ``text_tower`` gives those, for the weights a
cache or checkpoint records (fingerprint checked), to build a zero-shot head.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
from open_clip.transform import PreprocessCfg, merge_preprocess_dict

from models.zoo import ImageEmbedding
from pipeline.backbones import zoo
from pipeline.backbones.catalog import (EMBEDDING, LIST_BACKBONES, LIST_LAYERS, PENULTIMATE, PRETRAINED, LayerSpec,
                                        Loaded, recorded_backbone)
from pipeline.common.errors import UserError, first_line
from pipeline.common.preprocess import Preprocess

PREFIX = "open_clip:"
HF_FILE = "open_clip_pytorch_model.bin"  # open_clip's file in a repo named without one (a .safetensors twin first)
URL_CACHE = Path("~/.cache/clip")  # where open_clip keeps weights known only by URL


def split(name: str) -> tuple[str, str]:
    """('ViT-B-32', 'laion2b_s34b_b79k') of 'open_clip:ViT-B-32/laion2b_s34b_b79k' ('' without a tag)."""
    arch, _, tag = name.removeprefix(PREFIX).partition("/")
    return arch, tag


def names() -> tuple[str, ...]:
    """Every pretrained weight as a backbone name, 'open_clip:ARCH/TAG'."""
    return tuple(f"{PREFIX}{arch}/{tag}" for arch, tag in open_clip.list_pretrained())


def check(name: str) -> str:
    """``name`` if open_clip has that configuration (and that tag), else one line with close names."""
    arch, tag = split(name)
    if arch in open_clip.list_models():
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if not tag or tag in tags:
            return name
        raise UserError(f"open_clip has no weights {tag!r} for {arch}; its tags: {', '.join(tags) or 'none'}")
    known = [*names(), *(PREFIX + arch for arch in open_clip.list_models())]
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(f"unknown backbone {name!r}; {hint}list open_clip's with: {LIST_BACKBONES} 'open_clip:PATTERN'")


def _tag_cfg(name: str) -> dict:
    arch, tag = split(check(name))
    return open_clip.get_pretrained_cfg(arch, tag) if tag else {}


def preset(name: str, spec: str) -> Preprocess:
    """The preprocessing create_model attaches to the model: open_clip's defaults, the tag's preprocess_cfg over them,
    the image tower's size. resize_mode shortest is a crop, squash a resize; longest (padding) is refused."""
    arch, _ = split(check(name))
    cfg = merge_preprocess_dict(PreprocessCfg(), _tag_cfg(name))
    size = open_clip.get_model_config(arch)["vision_cfg"].get("image_size", cfg["size"])
    side = size if isinstance(size, int) else size[0]
    if not isinstance(size, int) and size[0] != size[1] or cfg["resize_mode"] not in ("shortest", "squash"):
        raise UserError(f"{name}'s preprocessing (resize_mode {cfg['resize_mode']}, size {size}) is not one this "
                        "project runs (a centre crop or a squash to a square); pick other weights")
    mode = "resize" if cfg["resize_mode"] == "squash" else "crop"
    interpolation = "bilinear" if cfg["interpolation"] == "bilinear" else "bicubic"  # open_clip: anything else bicubic
    return Preprocess(image_size=side, resize_size=side, mode=mode, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                      interpolation=interpolation)


def _source(name: str) -> tuple[str, str, list[str]]:
    """('hf', repo, file names to try) or ('url', url, [basename]) of the weights ``name`` names, as open_clip's
    ``download_pretrained`` chooses (the hub first)."""
    cfg = _tag_cfg(name)
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # 'org/repo/' names no file: open_clip's default one
        filename = filename or HF_FILE
        safe = list(open_clip.pretrained._get_safe_alternatives(filename))  # what open_clip tries first
        return "hf", repo, [*safe, filename]
    if cfg.get("url"):
        return "url", cfg["url"], [cfg["url"].rsplit("/", 1)[-1]]
    raise UserError(f"open_clip records no source for {name}'s weights; pass --weights FILE ({zoo.FILE_KINDS})")


def hub_file(name: str, spec: str) -> str:
    """The pretrained weights' file where it is cached now (an absolute path); "" without a tag or not cached."""
    if not split(name)[1]:
        return ""
    kind, where, filenames = _source(name)
    if kind == "url":
        path = URL_CACHE.expanduser() / filenames[0]
        return str(path) if path.is_file() else ""
    from huggingface_hub import try_to_load_from_cache

    from pipeline.backbones.weights import hf_cache_dir

    found = [try_to_load_from_cache(where, f, cache_dir=hf_cache_dir()) for f in filenames]
    return next((path for path in found if isinstance(path, str)), "")


@contextlib.contextmanager
def _quiet():
    """open_clip's own log lines (root logger: "Model initialized randomly", ...) are not the user's business:
    the family says what it loaded."""
    drop = logging.Filter()
    drop.filter = lambda record: "open_clip" not in record.pathname  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _create(name: str, pretrained: str | None = None) -> torch.nn.Module:
    """open_clip's create_model for this configuration, QuickGELU as the tag was trained with; no tower weights
    fetched on the side. A configuration it cannot build offline (a Hugging Face text tower) is one line."""
    arch, _ = split(name)
    try:
        with _quiet():
            return open_clip.create_model(arch, pretrained=pretrained, pretrained_image=False, pretrained_text=False,
                                          force_quick_gelu=bool(_tag_cfg(name).get("quick_gelu", False)))
    except Exception as err:
        what = f"{pretrained} does not load into" if pretrained else "cannot build"
        raise UserError(f"open_clip {what} {arch} ({first_line(err)}); pass --weights FILE of that configuration "
                        f"({zoo.FILE_KINDS}), or another --backbone") from None


def load(name: str, spec: str = PRETRAINED, *, seed: int = 0, progress: bool = True) -> Loaded:
    """The whole CLIP model ``name`` with weights ``spec``: 'pretrained' (the tag's, through open_clip's loader from
    the local cache, else downloaded), 'random' (``torch.manual_seed(seed); open_clip.create_model(ARCH)``), or a
    state_dict file of that configuration. Never random weights unless asked for."""
    name = check(name)
    arch, tag = split(name)
    enum = ""
    if spec == PRETRAINED:
        if not tag:
            first = next((n for n in names() if split(n)[0] == arch), f"{PREFIX}{arch}/TAG")
            raise UserError(f"{name} names no pretrained weights: add a tag, such as {first} (list them with: "
                            f"{LIST_BACKBONES} '{name}/*'), or pass --weights FILE or random")
        kind, where, filenames = _source(name)
        path = (zoo.hub_weights(where, filenames, name) if kind == "hf"
                else zoo.url_weights(where, URL_CACHE.expanduser(), name, progress=progress))
        model, recorded, enum = _create(name, str(path)), PRETRAINED, f"{kind}:{where}"
    else:
        model, recorded = zoo.other_weights(spec, seed, lambda: _create(name), name, f"open_clip's {arch}")
    return zoo.frozen(model, name, recorded, enum)


def list_layers(name: str) -> list[str]:
    """What --layers takes: the image embedding (penultimate is its alias)."""
    check(name)
    return [EMBEDDING, PENULTIMATE]


def resolve_layers(name: str, layers) -> tuple[str, ...]:
    """open_clip layers are named, never numbered (intermediate blocks of its towers are not offered)."""
    return tuple(layers)


def _check_size(model: torch.nn.Module, name: str, image_size: int) -> None:
    size = getattr(model.visual, "image_size", None)
    fixed = (size, size) if isinstance(size, int) else tuple(size) if size else None
    if fixed and fixed != (image_size, image_size):
        raise UserError(f"--image-size {image_size} does not fit {name}: its image tower takes only {fixed[0]}x"
                        f"{fixed[1]} inputs; use --image-size {fixed[0]}")


def plan(model: torch.nn.Module, name: str, layers, *, image_size: int = 224) -> tuple[ImageEmbedding, list[LayerSpec]]:
    """(the image tower as a one-layer module, what to record): ``embedding``, sized by one meta pass."""
    wrong = [layer for layer in layers if layer not in (EMBEDDING, PENULTIMATE)]
    if wrong:
        raise UserError(f"{name} has no layer {wrong[0]!r}; it offers {EMBEDDING} (the image embedding, alias "
                        f"{PENULTIMATE}): intermediate blocks of open_clip towers are not offered ({LIST_LAYERS} {name})")
    _check_size(model, name, image_size)
    module = ImageEmbedding(model.visual, (EMBEDDING,))
    dim = zoo.widths(module, image_size)[EMBEDDING]
    return module, [LayerSpec(EMBEDDING, module.layers[EMBEDDING][0], "none", dim)]


def features(model: torch.nn.Module, specs: list[LayerSpec]) -> ImageEmbedding:
    """The image tower computing the recorded layer (the text tower is left out)."""
    return ImageEmbedding(model.visual, tuple(spec.name for spec in specs))


def widths(module: ImageEmbedding, model: torch.nn.Module, name: str, image_size: int) -> dict[str, int]:
    _check_size(model, name, image_size)
    return zoo.widths(module, image_size)


def default_batch_size(name: str, device_type: str = "cpu", free_bytes: int | None = None) -> int:
    """From the image tower's multiply-adds at its input size (built on the meta device) and the free memory."""
    arch, _ = split(check(name))

    def count() -> float:
        from open_clip.model import _build_vision_tower  # the tower alone: the text tower costs nothing here

        config = open_clip.get_model_config(arch)
        with torch.device("meta"):
            tower = _build_vision_tower(config["embed_dim"], config["vision_cfg"], quick_gelu=False)
        return zoo.gflops(tower, lambda model, x: model(x), preset(name, PRETRAINED).image_size)

    return zoo.batch_size(count, device_type, free_bytes)


@dataclass
class TextTower:
    """A CLIP model's text side, for the weights a record names: what a zero-shot head is built from."""

    model: torch.nn.Module  # the whole CLIP model, eval, CPU, fp32 (the fingerprinted one)
    tokenize: Callable[[list[str]], torch.Tensor]  # open_clip's tokenizer for this configuration
    fingerprint: str

    @property
    def logit_scale(self) -> float:
        """The learned log-temperature: CLIP's probabilities are softmax(exp(logit_scale) * cosine)."""
        return float(self.model.logit_scale.detach().float())

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(N, embed_dim) float32 text embeddings, unnormalised (L2-normalise them to compare with images)."""
        with torch.inference_mode():
            return self.model.encode_text(self.tokenize(list(texts))).float()


def text_tower(record: dict, *, weights: str | None = None, seed: int = 0) -> TextTower:
    """The text tower and logit_scale of the open_clip backbone a cache's attributes or a checkpoint record
    (``weights``: another spec for the same weights). Its fingerprint must be the recorded one, else one line."""
    from pipeline.backbones.backbone import check_fingerprint

    name = recorded_backbone(record)
    if not name.startswith(PREFIX):
        raise UserError(f"{name} is not a CLIP model, so it has no text tower; extract with an open_clip backbone "
                        f"(such as {PREFIX}ViT-B-32/laion2b_s34b_b79k)")
    loaded = load(name, weights if weights is not None else record["weights_spec"], seed=seed)
    check_fingerprint(record, name, loaded.weights, loaded.fingerprint, given=weights is not None)
    try:
        tokenize = open_clip.get_tokenizer(split(name)[0])
    except Exception as err:  # a Hugging Face tokenizer that is neither cached nor downloadable
        raise UserError(f"the tokenizer of {name} cannot be loaded ({first_line(err)}); it is fetched from the "
                        "Hugging Face hub: run once where a network is") from None
    return TextTower(loaded.model, tokenize, loaded.fingerprint)
