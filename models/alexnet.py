"""AlexNet cut after fc7 and returning any of its layers, the linear head trained on them, and the two reassembled."""
from __future__ import annotations

import hashlib

import torch
from torch import nn
from torchvision.models import AlexNet

from models.head import LinearHead  # noqa: F401 - re-exported
from models.layers import LAYER_DIMS, LAYERS


class AlexNetLayers(nn.Module):
    """Frozen AlexNet up to fc7, returning its layers: features -> avgpool (pool5) -> fc6 -> fc7 (post-ReLU).

    ``output`` picks the layer ``forward`` returns (pool5, fc6 or fc7; the module always holds the
    whole fc7 cut, so its weights and fingerprint do not depend on it). ``forward_layers`` fills several
    layers in one pass.
    """

    def __init__(self, alexnet: AlexNet, output: str = "fc7"):
        super().__init__()
        if output not in LAYER_DIMS:
            raise ValueError(f"output must be one of {LAYERS}, not {output!r}")
        self.features = alexnet.features
        self.avgpool = alexnet.avgpool
        self.classifier = alexnet.classifier[:6]  # Dropout, fc6, ReLU, Dropout, fc7, ReLU
        self.output = output
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "AlexNetLayers":
        return super().train(False)  # always eval: dropout off, the features are deterministic

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the weights are cast once (``.to(torch.bfloat16)``), never per call."""
        return self.features[0].weight.dtype

    def forward_layers(self, x: torch.Tensor, layers: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
        """{layer: (B, dim)} for each requested layer, from one pass that stops at the deepest of them."""
        out = {}
        x = self.features(x.to(self.dtype))  # (B, 256, 6, 6)
        x = torch.flatten(self.avgpool(x), 1)  # (B, 9216) pool5
        if "pool5" in layers:
            out["pool5"] = x
        if "fc6" in layers or "fc7" in layers:
            x = self.classifier[:3](x)  # (B, 4096) post-ReLU fc6
            if "fc6" in layers:
                out["fc6"] = x
            if "fc7" in layers:
                out["fc7"] = self.classifier[3:](x)  # (B, 4096) post-ReLU fc7
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_layers(x, (self.output,))[self.output]  # (B, dim) of the output layer


class AlexNetClassifier(nn.Module):
    """Backbone plus head as one network: AlexNet whose last layer is the trained 4096 -> C head.

    The backbone computes in its own dtype (fp32, or bf16/fp16 weights cast once), exactly as extraction
    did; the head always runs in fp32 on the fc7 it returns, as it did on the cached features.
    """

    def __init__(self, backbone: AlexNetLayers, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).float())  # (B, C) float32 logits


def weights_fingerprint(backbone: AlexNetLayers) -> str:
    """sha256 over the tensors the fc7 cut uses (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:float32;".encode())
        digest.update(tensor.numpy())  # buffer protocol: no copy
    return digest.hexdigest()
