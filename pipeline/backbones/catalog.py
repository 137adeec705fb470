"""Which family a backbone name belongs to, and the facts known about a backbone without importing torch.

A plain backbone name is a torchvision classification model (``alexnet``, ``resnet50``, ``vit_b_16``); a prefix
names another family, each served by its own module: ``timm:ARCH[.TAG]`` (timm_family) and
``open_clip:ARCH[/TAG]`` (open_clip_family), which need the zoo extra (requirements-zoo.txt). The rerun of a
finished extraction answers "up to date" without importing torch, so what it needs (the default layers, the
preprocessing, the weights' file, the default batch size and cache folder) is answered here: from a catalog entry
where the backbone has one, else by asking its family (which imports torch).

Catalog entries hold what a backbone cannot say about itself through its family's generic path. AlexNet has one:
its DeCAF layer names (pool5, fc6 and fc7 are graph nodes of torchvision's AlexNet), the cut after fc7 that its
weights fingerprint has always covered, and its preprocessing, batch sizes and cache folder, known torch-free.
"""
from __future__ import annotations

import importlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pipeline.common.errors import UserError
from pipeline.common.names import DEFAULT_FEATURES
from pipeline.common.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

if TYPE_CHECKING:  # the families import torch; this module does not
    import torch

PENULTIMATE = "penultimate"  # the input of the model's last Linear: what linear probes train on
LIST_LAYERS = "python run_extract.py --list-layers"  # how a user lists a model's layer names
LIST_BACKBONES = "python run_extract.py --list-backbones"
EMBEDDING = "embedding"  # open_clip's layer: the image embedding (encode_image, unnormalised)
PRETRAINED = "pretrained"  # --weights: the weights the backbone's name names (torchvision: imagenet)
ZOO_EXTRA = "pip install -r requirements-zoo.txt"  # timm and open_clip: the optional zoo extra


@dataclass(frozen=True)
class LayerSpec:
    """One cached layer: its name, the graph node it is read from, how it becomes a vector, its width."""

    name: str  # as the user asked for it: 'penultimate', 'fc7', 'layer4'
    node: str  # the graph node: 'flatten', 'classifier.5', 'layer4'
    reduction: str  # models.backbones.REDUCTIONS
    dim: int  # the vector's length

    def to_dict(self) -> dict:
        return {"name": self.name, "node": self.node, "reduction": self.reduction, "dim": self.dim}


@dataclass(frozen=True)
class Entry:
    """What the catalog knows of one backbone, torch-free."""

    name: str
    layers: dict[str, LayerSpec]  # named layers (aliases of graph nodes), in network order
    default_layers: tuple[str, ...]
    preset: Preprocess  # its pretrained weights' own preprocessing (what their transforms() say)
    hub_file: str  # its pretrained weights' file in the torch hub cache
    truncate: tuple[str, int] | None = None  # (module, length): the model is cut to module[:length] when built
    batch_size: dict[str, int] = field(default_factory=dict)  # extraction's default per device type
    out: Path | None = None  # its default cache folder (others: runs/features-NAME)


ALEXNET = Entry(
    name="alexnet",
    # DeCAF's layers: the flattened avgpool (pool5), post-ReLU fc6 and fc7; fc7 also serves as the penultimate
    layers={"pool5": LayerSpec("pool5", "avgpool", "flatten", 9216), "fc6": LayerSpec("fc6", "classifier.2", "none", 4096),
            "fc7": LayerSpec("fc7", "classifier.5", "none", 4096),
            PENULTIMATE: LayerSpec(PENULTIMATE, "classifier.5", "none", 4096)},
    default_layers=("fc7",),
    preset=Preprocess(image_size=224, resize_size=256, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    hub_file="alexnet-owt-7be5be79.pth",  # AlexNet_Weights.IMAGENET1K_V1
    truncate=("classifier", 6),  # Dropout, fc6, ReLU, Dropout, fc7, ReLU: fc8 is never run nor fingerprinted
    batch_size={"cpu": 64, "cuda": 256},
    out=DEFAULT_FEATURES,
)
ENTRIES = {entry.name: entry for entry in (ALEXNET,)}
# a family: the module (beside this one) that serves names with its prefix; "" serves plain names
FAMILIES = {"": "pipeline.backbones.torchvision_family", "timm:": "pipeline.backbones.timm_family",
            "open_clip:": "pipeline.backbones.open_clip_family"}
ZOO_PACKAGES = ("timm", "open_clip", "huggingface_hub", "safetensors", "ftfy", "regex")  # requirements-zoo.txt
# torch-free facts of a family: its default layer (others: penultimate) and the aliases of its layer names
DEFAULT_LAYER = {"open_clip:": EMBEDDING}
LAYER_ALIASES = {"open_clip:": {PENULTIMATE: EMBEDDING}}
TEXT_TOWERS = ("open_clip:",)  # the families whose models have a text tower (open_clip_family.text_tower)


@dataclass
class Loaded:
    """A whole network in eval mode on the CPU, as a family's ``load`` returns it, and what names its weights."""

    model: torch.nn.Module
    name: str  # 'resnet50', 'timm:vit_small_patch16_224.augreg_in21k_ft_in1k'
    weights: str  # the spec as recorded: 'imagenet', 'pretrained', 'random:seed=S', 'file:/abs/path', an exact enum
    weights_enum: str  # the exact pretrained weights ('ResNet50_Weights.IMAGENET1K_V2', 'timm:resnet18.a1_in1k'), else ""
    fingerprint: str  # sha256 over the model's tensors: models.backbones.weights_fingerprint


class Family(Protocol):
    """What a family module offers (pipeline.backbones.torchvision_family is one): another family (``timm:``,
    ``open_clip:``) is one module with these functions, registered in FAMILIES; no stage changes."""

    def names(self) -> tuple[str, ...]: ...  # every name it serves, for --list-backbones
    def check(self, name: str) -> str: ...  # the name, or one line with close names
    # .model (eval, CPU), .weights (the recorded spec), .weights_enum, .fingerprint
    def load(self, name: str, spec: str, *, seed: int = 0, progress: bool = True) -> Loaded: ...
    def preset(self, name: str, spec: str) -> Preprocess: ...  # the weights' own preprocessing
    def hub_file(self, name: str, spec: str) -> str: ...  # the weights' file in its local cache (a basename:
    # in the torch hub's checkpoints/; or an absolute path)
    def list_layers(self, name: str) -> list[str]: ...  # what --layers takes, from the structure alone
    def resolve_layers(self, name: str, layers) -> tuple[str, ...]: ...  # block indices ('-4') -> their names
    def plan(self, model, name: str, layers, *, image_size: int): ...  # (module, [LayerSpec]) checked and sized
    def features(self, model, specs: list[LayerSpec]): ...  # the module of recorded layers
    def widths(self, module, model, name: str, image_size: int) -> dict[str, int]: ...  # each layer's width
    def default_batch_size(self, name: str, device_type: str, free_bytes: int | None) -> int: ...


def entry(name: str) -> Entry | None:
    """The catalog entry of a backbone, None when it has none (its family answers everything)."""
    return ENTRIES.get(name)


def prefix_of(name: str) -> str:
    """A name's family prefix: 'timm:', 'open_clip:', or '' for torchvision's plain names."""
    return name.split(":", 1)[0] + ":" if ":" in name else ""


def has_text_tower(name: str) -> bool:
    """Whether the backbone ``name`` is a CLIP model, whose text tower makes a zero-shot head (open_clip's)."""
    return prefix_of(name) in TEXT_TOWERS


def family(name: str) -> Family:
    """The module serving ``name``'s family (imports torch): torchvision's for plain names. A zoo family whose
    packages are not installed is one line naming the extra."""
    prefix = prefix_of(name)
    if prefix not in FAMILIES:
        raise UserError(f"unknown backbone family {prefix!r} in {name!r}; backbones are torchvision model names, "
                        f"timm:ARCH[.TAG] or open_clip:ARCH[/TAG] (list them with: {LIST_BACKBONES})")
    try:
        return importlib.import_module(FAMILIES[prefix])
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in ZOO_PACKAGES:
            raise
        raise UserError(f"backbone {name!r} needs the {prefix[:-1]} family's packages ({err.name} is not installed); "
                        f"{ZOO_EXTRA}") from None


def check_name(name: str) -> str:
    """``name`` when some family serves it, else one line with close names (torch-free for catalog entries)."""
    return name if name in ENTRIES else family(name).check(name)


def own_weights(name: str, weights: str) -> str:
    """--weights as ``name``'s family records it: ``pretrained`` on a torchvision model is ``imagenet``."""
    return "imagenet" if weights == PRETRAINED and prefix_of(name) == "" else weights


def default_layers(name: str) -> tuple[str, ...]:
    """The layers cached when --layers is not given: AlexNet's fc7 (as always), the penultimate elsewhere."""
    found = entry(name)
    return found.default_layers if found else (DEFAULT_LAYER.get(prefix_of(name), PENULTIMATE),)


def canonical_layers(name: str, layers) -> tuple[str, ...]:
    """The layer names a file records for ``layers``: aliases replaced (open_clip's ``penultimate`` is its
    ``embedding``) and block indices ('-4') resolved to the blocks' names by the family, before anything is written."""
    aliases = LAYER_ALIASES.get(prefix_of(name), {})
    named = tuple(dict.fromkeys(aliases.get(layer, layer) for layer in layers))
    if any(re.fullmatch(r"-?\d+", layer) for layer in named):
        named = tuple(dict.fromkeys(family(name).resolve_layers(name, named)))
    return named


def default_out(name: str) -> Path:
    """Each backbone's own cache folder, so two caches never collide: runs/features-NAME (AlexNet: runs/features)."""
    found = entry(name)
    if found and found.out is not None:
        return found.out
    return DEFAULT_FEATURES.with_name(f"{DEFAULT_FEATURES.name}-{safe_name(name)}")


def safe_name(name: str) -> str:
    """A backbone name as one folder name: 'timm:vit_small_patch14_dinov2.lvd142m' -> 'timm-vit_small_patch14_dinov2.lvd142m',
    'open_clip:ViT-B-32/laion2b_s34b_b79k' -> 'open_clip-ViT-B-32-laion2b_s34b_b79k'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "backbone"


def default_batch_size(name: str, device_type: str = "cpu", free_bytes: int | None = None) -> int:
    """Extraction's batch when --batch-size is not given: the entry's, else from the model's size (its family)."""
    found = entry(name)
    if found and device_type in found.batch_size:
        return found.batch_size[device_type]
    return family(name).default_batch_size(name, device_type, free_bytes)


def batch_size_for(gflops: float, device_type: str = "cpu", free_bytes: int | None = None) -> int:
    """The extraction batch for a model of ``gflops`` (multiply-adds, in billions, per image at its input size):
    on the CPU the largest power of two at most 256 / GFLOPs (the CPU costs per image), and at most what a quarter
    of ``free_bytes`` holds at about 2 MB per GFLOP per image; on CUDA from ``free_bytes`` alone. 8 to 64 on the
    CPU (resnet50: 32, vit_b_16: 8), 8 to 256 on CUDA."""
    per_image = 2e6 * max(gflops, 1.0)
    by_memory = free_bytes / 4 / per_image if free_bytes is not None else math.inf
    if device_type != "cuda":
        budget = min(256 / max(gflops, 1e-3), by_memory)
        return int(min(64, max(8, 2 ** math.floor(math.log2(max(budget, 1))))))
    if free_bytes is None:
        return 256
    return int(min(256, max(8, 2 ** math.floor(math.log2(max(by_memory, 1))))))


def preprocess_of(name: str, weights: str, *, image_size: int | None = None, resize_size: int | None = None,
                  mode: str | None = None) -> Preprocess:
    """The preprocessing an extraction of ``name`` with ``weights`` uses: the weights' own (random or file weights:
    the model's default weights'), with only the sizes and mode given replacing theirs (the resize never below the
    crop)."""
    found = entry(name)
    preset = found.preset if found else family(name).preset(name, weights)
    image = image_size if image_size is not None else preset.image_size
    resize = max(resize_size if resize_size is not None else preset.resize_size, image)
    try:
        return Preprocess(image_size=image, resize_size=resize, mean=preset.mean, std=preset.std,
                          interpolation=preset.interpolation, mode=mode or preset.mode)
    except ValueError as err:
        raise UserError(f"bad preprocessing options: {err}") from None


def hub_file(name: str, weights: str) -> str:
    """The file ``weights`` (imagenet or pretrained, or an exact enum; for random or file weights, the default
    weights') are read from: a basename in the torch hub cache, or a path (the zoo's Hugging Face cache)."""
    found = entry(name)
    return found.hub_file if found else family(name).hub_file(name, weights)


def order_layers(name: str, layers) -> list[str]:
    """Layers as a file stores them: the entry's named layers in network order first, the others as given."""
    named = list(entry(name).layers) if entry(name) else list(default_layers(name))
    return [layer for layer in named if layer in layers] + [layer for layer in layers if layer not in named]


def main_layer(name: str, layers) -> str:
    """The layer a file's ``features`` link points to: the backbone's default layer where held, else the first."""
    ordered = order_layers(name, layers)
    return next((layer for layer in default_layers(name) if layer in ordered), ordered[0])


def recorded_specs(record: dict) -> dict[str, LayerSpec]:
    """{layer: LayerSpec} a cache's attributes (``layers_json``) or a checkpoint (``layer_spec``) record; a record
    made before specs were recorded (AlexNet's, by its layer names) gets its entry's. Raises ValueError on junk."""
    if "layers_json" in record:
        return {spec["name"]: LayerSpec(**spec) for spec in json.loads(record["layers_json"])}
    if "layer_spec" in record:
        spec = LayerSpec(**record["layer_spec"])
        return {spec.name: spec}
    found = entry(recorded_backbone(record))
    return dict(found.layers) if found else {}


def recorded_backbone(record: dict) -> str:
    """The backbone a cache or checkpoint names; one made before other backbones existed names none: AlexNet's."""
    return record.get("backbone") or ALEXNET.name
