"""The torch runtime of the live classifier: the frozen backbone rebuilt from the checkpoint, plus its head.

The checkpoint written by run_train_head.py holds everything needed: the head (an ``nn.Linear`` on raw
features), the class wnids and names, the preprocessing and the backbone's weights spec and fingerprint.
The backbone is rebuilt from that spec (or ``--weights``) and must have the recorded fingerprint, so a
head is never run on features of another backbone. Every frame goes through the same ``Preprocess`` as
extraction, and the layer -> head split is kept (the layer under the extraction precision, the head in
fp32), so an image gives the probabilities that ``softmax(head(cached features))`` gives for it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from models.backbones import LayerClassifier
from pipeline.backbones.backbone import rebuild
from pipeline.backbones.catalog import recorded_backbone, recorded_specs
from pipeline.backbones.precision import AUTO, choose_precision, place_backbone
from pipeline.common.checkpoint import checkpoint_preprocess, head_normalizes, load_head, read_checkpoint
from pipeline.common.errors import UserError
from pipeline.common.hardware import resolve_device
from pipeline.datasets.jpeg import decode_floor
from pipeline.common.preprocess import Preprocess, stack_or_list
from pipeline.live.sources import torch_decoder
from pipeline.live.checks import frame_bytes
from pipeline.live.classifier import ClassInfo


def live_precision(checkpoint: dict, requested: str | None) -> str:
    """The backbone's precision: ``requested``; None, or auto over a cache whose precision was given explicitly
    (or made before auto), keeps the checkpoint's, so frames give the cached features; auto over an auto-made
    cache stays auto (measured on the first batch)."""
    recorded = checkpoint.get("precision", "fp32")
    if requested is None or (requested == AUTO and not checkpoint.get("precision_auto", False)):
        return recorded
    return requested


def build_classifier(checkpoint: dict, *, weights: str | None = None, seed: int = 0,
                     device: torch.device | str = "cpu", precision: str | None = None) -> LayerClassifier:
    """Backbone (from the checkpoint's record, or ``weights``) + head, in eval mode on ``device``.

    The backbone is rebuilt by pipeline.backbones (its fingerprint must be the one recorded in the checkpoint,
    else a UserError) and placed as extraction placed it (channels_last, weights cast once to the recorded
    precision, the same math flags), so a frame gives the features the cache holds for it. ``precision``:
    another precision (auto: fp32 until TorchClassifier has timed the candidates on its first batch).
    """
    device = resolve_device(device) if isinstance(device, str) else device
    layer = checkpoint.get("layer", "fc7")
    spec = recorded_specs(checkpoint).get(layer)  # checked before any weights are read
    if spec is None or spec.dim != checkpoint["feature_dim"]:
        found = f"gives {spec.dim}" if spec else "is not one it records"
        raise UserError(f"the head reads {checkpoint['feature_dim']} features of layer {layer!r}, which the recorded "
                        f"{recorded_backbone(checkpoint)} backbone {found}; retrain the head with run_train_head.py")
    backbone = rebuild(checkpoint, weights=weights, seed=seed, layers=(layer,))
    precision = live_precision(checkpoint, precision)
    module = place_backbone(backbone.module, device, "fp32" if precision == AUTO else precision)
    head = load_head(checkpoint).to(device)
    return LayerClassifier(module, layer, head, normalize=head_normalizes(checkpoint)).eval()


def load_classifier(checkpoint_path: str | Path, weights: str | None = None, device: torch.device | str = "cpu", *,
                    seed: int = 0) -> tuple[LayerClassifier, dict, Preprocess]:
    """(model in eval mode on ``device``, the checked checkpoint dict, its Preprocess)."""
    checkpoint = read_checkpoint(checkpoint_path)
    model = build_classifier(checkpoint, weights=weights, seed=seed, device=device)
    return model, checkpoint, checkpoint_preprocess(checkpoint)


def as_tensor(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A (3, H, W) uint8 tensor; an (H, W, 3) array becomes a channels_last view of it, no copy."""
    return torch.from_numpy(image).permute(2, 0, 1) if isinstance(image, np.ndarray) else image


def _batch(images: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    """(3, H, W) uint8 images -> a (B, 3, H, W) channels_last batch when they have one size, else a list."""
    if len(images) == 1:
        return images[0][None].to(device, non_blocking=True)  # a view: a frame's (3, H, W) is already HWC in memory
    batch = stack_or_list(list(images), channels_last=True)  # interleaved pixels: the layout Preprocess resizes in
    if isinstance(batch, list):  # mixed sizes (a folder): resized one by one
        return [image.to(device, non_blocking=True) for image in batch]
    return batch.to(device, non_blocking=True)


@torch.inference_mode()
def predict_frames(model: LayerClassifier, preprocess: Preprocess,
                   images: Sequence[torch.Tensor | np.ndarray]) -> torch.Tensor:
    """RGB uint8 images, (3, H, W) tensors or (H, W, 3) arrays of any sizes -> (B, C) float32 probabilities
    on the CPU, in order.

    One pass of ``model`` over the batch: the layer as extraction computed it (same preprocessing, same
    compute dtype), then the head in fp32, as it ran on the cached features.
    """
    if not len(images):
        raise ValueError("predict_frames needs at least one image")
    device = model.head.weight.device
    x = preprocess(_batch([as_tensor(image) for image in images], device))  # (B, 3, S, S) float32, channels_last
    return torch.softmax(model(x), dim=1).cpu()


def describe(checkpoint: dict, weights: str, where: str) -> str:
    """The log line's account of a head and its backbone."""
    top1 = checkpoint.get("metrics", {}).get("val_top1")
    return (f"head: {len(checkpoint['class_wnids'])} classes, epoch {checkpoint.get('epoch', '?')}, val top-1 "
            f"{'?' if top1 is None else f'{top1:.2f}%'}; backbone {weights} on {where}")


class TorchClassifier:
    """The backbone + head of a checkpoint on torch: the reference every other runtime is measured against."""

    def __init__(self, checkpoint: dict, *, weights: str | None = None, seed: int = 0, device: str = "cpu",
                 precision: str | None = None):
        """``precision``: None keeps the checkpoint's (extraction's); auto times the candidates on the first
        batch predicted, at that batch's size (batch 1 and 64 can choose differently)."""
        device = resolve_device(device)
        self.model = build_classifier(checkpoint, weights=weights, seed=seed, device=device, precision=precision)
        self.choose_precision = live_precision(checkpoint, precision) == AUTO
        self.precision_record: dict | None = None  # auto's choice and measurements, once made
        self.preprocess = checkpoint_preprocess(checkpoint)
        spec = weights or checkpoint["weights_spec"]
        self.classes = ClassInfo(list(checkpoint["class_wnids"]), list(checkpoint["class_names"]),
                                 describe(checkpoint, spec, str(device)), spec)
        self.decode = torch_decoder(min_side=decode_floor(self.preprocess))  # a large JPEG as extraction read it

    def predict(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        if self.choose_precision:
            self._choose_precision(frames)
        return predict_frames(self.model, self.preprocess, frames).numpy()

    def _choose_precision(self, frames: Sequence[np.ndarray]) -> None:
        """--precision auto: time the candidates on this first batch, then cast the backbone once to the choice."""
        device, backbone = self.model.head.weight.device, self.model.backbone
        batch = _batch([as_tensor(frame) for frame in frames], device)
        self.precision_record = choose_precision(backbone, lambda dtype: self.preprocess(batch, dtype),
                                                 (self.model.layer,), device)
        self.model.backbone = place_backbone(backbone, device, self.precision_record["chosen"])
        self.choose_precision = False

    def per_frame_bytes(self, width: int, height: int) -> int:
        return frame_bytes(self.preprocess, width, height)
