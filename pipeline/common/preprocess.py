"""The one preprocessing definition, shared by extraction and the live runner.

It is torchvision's ``ImageClassification`` eval transform, with the sizes, interpolation, mean and std the
weights' own ``transforms()`` say (resize the shorter side, centre-crop, normalise, RGB; AlexNet's: 256, 224,
bilinear, ImageNet mean/std), written as batched tensor ops on uint8 images so it runs on whatever device holds
them. The uint8 resize with antialias matches PIL's resize, so features equal the plain
``transforms.Compose([Resize(256), CenterCrop(224), ToTensor(), Normalize(...)])`` reference.

On CUDA there is no uint8 resize (torchvision goes uint8 -> float32 -> resize -> round -> uint8), so the
device path stays in float: one resize in float32 (antialias only when it shrinks: for an upscale such
as 64 -> 256 it changes nothing), rounded as the uint8 path rounds, cropped as a view and normalised
straight into the compute dtype in channels_last. It differs from the CPU path by +-1 on about 20 % of
the resized pixels (float vs fixed-point interpolation), fc7 cosine >= 0.99999.
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("crop", "resize")
# the input sides a checkpoint or an export may record: far above any backbone's training size (224-518), far below
# a runaway allocation; each backbone's own smallest input is checked when it is rebuilt (pipeline.backbones.rebuild)
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 4096
INTERPOLATIONS = ("bilinear", "bicubic")  # what torchvision's ImageClassification presets use
# the most elongated image used, longer side / shorter side: beyond it an image is a listed skip. The resize
# takes the shorter side to resize_size before the crop, so a 1x4000 strip would become 256 x 1,024,000 pixels
# (0.8 GB) to keep 224 x 224 of them. Photos and panoramas stay far below it (docs/imagefolder.md)
MAX_ASPECT_RATIO = 50


def aspect_problem(height: int, width: int) -> str | None:
    """Why an image of this size is not used (longer than MAX_ASPECT_RATIO times its shorter side), or None.

    The one rule, applied where images are decoded (extraction, preparation and every live runtime), so they
    all skip the same files; ordinary images never meet it, so their pixels are as they always were."""
    short, long = sorted((height, width))
    if long <= MAX_ASPECT_RATIO * short:
        return None
    ratio = f"{long / short:.1f}".removesuffix(".0")
    return (f"{width}x{height} pixels ({ratio}:1) is more elongated than the {MAX_ASPECT_RATIO}:1 an image may be: "
            f"resized by its shorter side it would be {ratio} squares long, of which the centre crop keeps one; "
            "crop it to use it")


@dataclass(frozen=True)
class Preprocess:
    """How an RGB uint8 image becomes the network's input."""

    image_size: int = 224  # the side of the square the network sees
    resize_size: int = 256  # "crop": the shorter side is resized to this, then the centre is cropped
    mode: str = "crop"  # "crop" (resize the shorter side, then centre-crop) or "resize" (squash to image_size)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"  # the resize filter, as the weights' transforms() say (Swin, EfficientNet: bicubic)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, not {self.interpolation!r}")
        if self.image_size <= 0 or self.resize_size < self.image_size:
            raise ValueError(f"need 0 < image_size <= resize_size, got {self.image_size} and {self.resize_size}")

    def to_dict(self) -> dict:
        """The recorded settings; bilinear is left out, so AlexNet's record (and old caches') stays as it was."""
        recorded = {**asdict(self), "mean": list(self.mean), "std": list(self.std), "color": "RGB"}
        if self.interpolation == "bilinear":
            del recorded["interpolation"]
        return recorded

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(image_size=int(d["image_size"]), resize_size=int(d["resize_size"]), mode=d["mode"],
                   mean=tuple(d["mean"]), std=tuple(d["std"]), interpolation=d.get("interpolation", "bilinear"))

    # torch is imported in the methods, not at the top: the settings alone (to_json) are needed without
    # it when run_extract.py checks whether a cache is up to date, and importing torch takes seconds

    def resize_crop(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """RGB uint8 images, (B, 3, H, W) or a list of (3, H, W), -> (B, 3, S, S) uint8: the geometric part."""
        import torch
        from torchvision.transforms.v2 import functional as F

        if isinstance(images, (list, tuple)):
            # stacked straight into channels_last (decoded JPEGs are interleaved in memory already): one copy, not
            # a planar stack and then a second copy into the layout below (0.17 -> 0.10 core-ms per 64 px image)
            batch = stack_or_list(list(images), channels_last=True)
            if isinstance(batch, list):  # mixed sizes: rare
                return torch.cat([self.resize_crop(image[None]) for image in batch])
            return self.resize_crop(batch)
        # channels_last: torchvision's uint8 resize works on interleaved pixels, and the float conversion in
        # normalize() then keeps that layout; the whole preprocessing is ~1.5x faster, with equal output
        images = images.contiguous(memory_format=torch.channels_last)
        mode = F.InterpolationMode(self.interpolation)
        if self.mode == "resize":
            return F.resize(images, [self.image_size, self.image_size], interpolation=mode, antialias=True)
        images = F.resize(images, [self.resize_size], interpolation=mode, antialias=True)
        return F.center_crop(images, [self.image_size, self.image_size])

    def normalize(self, images: torch.Tensor, dtype: torch.dtype | None = None, *,
                  reuse: dict | None = None) -> torch.Tensor:
        """(B, 3, S, S) uint8 (or float holding 0..255) -> (B, 3, S, S) in ``dtype`` (float32 by default),
        ImageNet-normalised, channels_last.

        The arithmetic is float32 whatever ``dtype`` is (the result is rounded to it once, as the backbone's
        own cast would), with the constants made once per device: no host-to-device copy per batch.

        ``reuse`` (CPU only): a dict the caller keeps between batches; the result is written into buffers held
        there, so it is overwritten by the next call with the same dict. Without it, each call allocates.
        """
        import torch

        dtype = dtype or torch.float32
        if images.device.type == "cpu":
            return _normalize_cpu(images, self.mean, self.std, dtype, reuse)
        mean, std = _constants(self.mean, self.std, images.device)
        # uint8 - float32 is computed in float32 in one pass on the GPU: no separate conversion
        out = torch.sub(images, mean, out=torch.empty(images.shape, device=images.device,
                                                      memory_format=torch.channels_last))
        if dtype == torch.float32:
            return out.div_(std)
        return torch.div(out, std, out=torch.empty(out.shape, dtype=dtype, device=images.device,
                                                   memory_format=torch.channels_last))

    def resize_crop_float(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """The device path's geometric part: uint8 -> float32 holding rounded 0..255 values, cropped (a view).

        What torchvision's uint8 resize does on CUDA, less the round trip through uint8.
        """
        import torch
        from torchvision.transforms.v2 import functional as F

        if isinstance(images, (list, tuple)):
            return torch.cat([self.resize_crop_float(image[None] if image.dim() == 3 else image) for image in images])
        height, width = images.shape[-2:]
        size = [self.image_size, self.image_size] if self.mode == "resize" else [self.resize_size]
        target = size * 2 if len(size) == 1 else size
        shrinks = height > target[0] or width > target[1] if self.mode == "resize" else min(height, width) > size[0]
        # antialias only matters when shrinking for bilinear: for an upscale it is the plain filter. Bicubic always
        # takes the antialiased kernel: it is PIL's (a = -0.5), the plain one is not (a = -0.75)
        antialias = shrinks or self.interpolation == "bicubic"
        images = F.resize(images.to(torch.float32), size, interpolation=F.InterpolationMode(self.interpolation),
                          antialias=antialias).round_()
        if self.interpolation == "bicubic":  # bicubic overshoots; the uint8 path saturates, so clamp as it does
            images = images.clamp_(0, 255)
        return images if self.mode == "resize" else F.center_crop(images, [self.image_size, self.image_size])

    def __call__(self, images: torch.Tensor | list[torch.Tensor], dtype: torch.dtype | None = None, *,
                 float_resize: bool | None = None) -> torch.Tensor:
        """RGB uint8 images, (B, 3, H, W) or a list of (3, H, W), -> (B, 3, S, S) network input in ``dtype``.

        ``float_resize``: the device path (resize in float32); None: on CUDA only. The CPU's uint8 path is
        what the cache and the fidelity tests were made with, bit for bit.
        """
        device = images[0].device if isinstance(images, (list, tuple)) else images.device
        if float_resize is None:
            float_resize = device.type == "cuda"
        if float_resize:
            return self.normalize(self.resize_crop_float(images), dtype)
        return self.normalize(self.resize_crop(images), dtype)


def stack_or_list(images: list[torch.Tensor], *, channels_last: bool = False) -> torch.Tensor | list[torch.Tensor]:
    """(3, H, W) images -> one (B, 3, H, W) tensor when they share a size, else the list (resized one by one).

    ``channels_last``: stacked as (B, H, W, 3) in memory (one copy), the layout the uint8 resize is fastest in.
    """
    import torch

    if len({tuple(image.shape) for image in images}) != 1:
        return list(images)
    if channels_last:
        return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    return torch.stack(images)


@functools.lru_cache(maxsize=None)
def _constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean * 255, std * 255) as (1, 3, 1, 1) float32 tensors on ``device``, made once per device."""
    import torch

    with torch.inference_mode(False):  # ordinary tensors, usable inside and outside inference mode
        mean_t = torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1) * 255
        std_t = torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return mean_t, std_t


def _normalize_cpu(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype,
                   reuse: dict | None) -> torch.Tensor:
    """normalize() on the CPU: each image as one row of interleaved pixels (RGBRGB..., what channels_last
    holds), converted with a plain copy and then shifted and scaled by constants laid out the same way.

    Every loop is a contiguous vector loop over one dtype (the rounding to bf16 or fp16 too): converting while subtracting a broadcast (1, 3, 1, 1)
    was ~7x slower (0.86 against 0.12 core-ms per 224 px image, with the buffers reused; a fresh 38 MB buffer
    per batch of 64 costs about 0.5 core-ms per image in page faults alone). The operations per element are the
    same (float(v) - mean, then / std, rounded to ``dtype`` once), so the bits are the same.
    """
    import torch

    batch, channels, height, width = images.shape
    mean_row, std_row = _row_constants(mean, std, height, width)
    work = _scratch(reuse, torch.float32, batch, mean_row.numel())
    work.view(batch, height, width, channels).copy_(images.permute(0, 2, 3, 1))  # uint8 -> float32
    work.sub_(mean_row).div_(std_row)
    # a narrower dtype: the float32 result rounded once by a plain copy. The same bits as dividing straight into a
    # bf16 output, which torch computes 3.5x slower (0.44 against 0.13 core-ms per 224 px image, AMD Zen 4)
    out = work if dtype == torch.float32 else _scratch(reuse, dtype, batch, mean_row.numel()).copy_(work)
    return out.view(batch, height, width, channels).permute(0, 3, 1, 2)  # NCHW sizes, channels_last strides


def _scratch(reuse: dict | None, dtype: torch.dtype, rows: int, width: int) -> torch.Tensor:
    """A (rows, width) buffer: fresh, or the one kept in ``reuse`` for this dtype (grown when too small)."""
    import torch

    if reuse is None:
        return torch.empty(rows, width, dtype=dtype)
    buffer = reuse.get(dtype)
    if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != width:
        buffer = reuse[dtype] = torch.empty(rows, width, dtype=dtype)
    return buffer[:rows]


@functools.lru_cache(maxsize=8)
def _row_constants(mean: tuple[float, ...], std: tuple[float, ...], height: int,
                   width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean * 255, std * 255) repeated for every pixel of a height x width image, as flat float32 rows
    laid out as channels_last holds the pixels."""
    import torch

    with torch.inference_mode(False):
        mean_t = (torch.tensor(mean, dtype=torch.float32) * 255).repeat(height * width)
        std_t = (torch.tensor(std, dtype=torch.float32) * 255).repeat(height * width)
    return mean_t, std_t
