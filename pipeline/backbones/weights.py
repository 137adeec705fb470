"""Backbone weights: the recorded spec and a stamp of its file (torch-free), and reading a weights file.

The stamp lets a rerun of run_extract.py see that a complete cache is up to date in well under a
second (importing torch and torchvision alone takes seconds): same spec, same weights file (size and
modification time), same torch for seeded random weights. Anything else falls back to the full check,
which loads the weights and compares their fingerprint. ``load_state_dict`` reads a weights file with
torch's weights-only loader (pipeline.common.torch_files: torch is imported there, when a file is read).
"""
from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

from pipeline.common.errors import UserError, first_line
from pipeline.common.names import PRETRAINED_SPECS
from pipeline.common.torch_files import load_weights_only




def describe_weights(spec: str, seed: int = 0) -> str:
    """The spec as recorded in caches and checkpoints: 'imagenet', 'pretrained', 'random:seed=S' or 'file:/abs/path'."""
    if spec in PRETRAINED_SPECS:
        return spec
    if spec == "random":
        return f"random:seed={seed}"
    if spec.startswith(("random:", "file:")) or is_enum_spec(spec):
        return spec
    return f"file:{Path(spec).resolve()}"


def is_enum_spec(spec: str) -> bool:
    """Whether a spec names torchvision weights exactly ('ResNet50_Weights.IMAGENET1K_V2'), not a file."""
    return "_Weights." in spec and os.sep not in spec and not Path(spec).exists()


def is_random(spec: str | None, seed: int = 0) -> bool:
    """Whether a weights spec (as given or as recorded) names random weights: for tests only."""
    return spec is not None and describe_weights(spec, seed).startswith("random:")


def hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub."""
    torch_home = os.getenv("TORCH_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(torch_home)) / "hub"


def hf_cache_dir() -> Path:
    """huggingface_hub's cache without importing it, as it is set now: $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub (where timm and open_clip keep their pretrained weights)."""
    if os.getenv("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    home = os.getenv("HF_HOME") or os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def hf_offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids huggingface_hub to reach the network, as the environment says now."""
    return os.getenv("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def weights_file(recorded: str, hub_name: str) -> Path | None:
    """The file a recorded spec's weights are read from (for imagenet, pretrained or an exact enum: ``hub_name``,
    a basename in the torch hub's checkpoints/ or an absolute path); None for random weights, or pretrained weights
    with no file."""
    if recorded.startswith("random:"):
        return None
    if recorded in PRETRAINED_SPECS or is_enum_spec(recorded):
        return hub_dir() / "checkpoints" / hub_name if hub_name else None
    return Path(recorded[5:])


def weights_stamp(recorded: str, hub_name: str) -> str:
    """JSON naming what the weights of a recorded spec are read from, as it is now on disk (``hub_name``: the
    backbone's file in the hub cache, ``pipeline.backbones.catalog.hub_file``)."""
    path = weights_file(recorded, hub_name)
    if path is None:
        return json.dumps({"torch": metadata.version("torch")})  # the seeded init may change between releases
    try:
        stat = path.stat()
    except OSError:
        return json.dumps({"file": str(path), "missing": True})
    return json.dumps({"file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})


def load_state_dict(path: Path, what: str) -> dict:
    """The tensors of a state_dict file (a {"state_dict": ...} wrapper too), read weights-only: a .pth or .bin
    holding pickled objects besides tensors is refused for safety; a .safetensors file is read with safetensors
    (the zoo extra). ``what``: the model it must be, for the messages."""
    import torch

    if not path.is_file():
        raise UserError(f"weights file not found: {path}; pass --weights pretrained, random, or an existing .pth, "
                        ".bin or .safetensors file")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, what)
    state = load_weights_only(path, "PyTorch weights file", f"pass a plain state_dict of {what}")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state_dict of tensors; pass a state_dict of {what}")
    return state


def _load_safetensors(path: Path, what: str) -> dict:
    """The tensors of a .safetensors file (it holds nothing else), or one line."""
    try:
        from safetensors.torch import load_file
    except ModuleNotFoundError:
        raise UserError(f"{path} is a .safetensors file, which needs the safetensors package; pip install -r "
                        "requirements-zoo.txt, or pass a .pth state_dict") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # a damaged header or a truncated file
        raise UserError(f"{path} is not a readable .safetensors file ({first_line(err)}); pass a state_dict of "
                        f"{what}") from None
