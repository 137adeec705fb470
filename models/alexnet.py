"""AlexNet cut at fc7, the linear head trained on its features, and the two reassembled."""
from __future__ import annotations

import hashlib

import torch
from torch import nn
from torchvision.models import AlexNet

FC7_DIM = 4096
MIN_IMAGE_SIZE = 63  # smaller inputs shrink to nothing in AlexNet's third max-pool


class AlexNetFC7(nn.Module):
    """Frozen AlexNet up to fc7: features -> avgpool -> flatten -> classifier[:6] (post-ReLU)."""

    def __init__(self, alexnet: AlexNet):
        super().__init__()
        self.features = alexnet.features
        self.avgpool = alexnet.avgpool
        self.classifier = alexnet.classifier[:6]  # Dropout, fc6, ReLU, Dropout, fc7, ReLU
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "AlexNetFC7":
        return super().train(False)  # always eval: dropout off, the features are deterministic

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the weights are cast once (``.to(torch.bfloat16)``), never per call."""
        return self.features[0].weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x.to(self.dtype))  # (B, 256, 6, 6)
        x = torch.flatten(self.avgpool(x), 1)  # (B, 9216)
        return self.classifier(x)  # (B, 4096) post-ReLU fc7


class LinearHead(nn.Linear):
    """Linear layer to train on top of frozen fc7 features (DINO's LinearClassifier init)."""

    def __init__(self, num_classes: int, in_features: int = FC7_DIM):
        super().__init__(in_features, num_classes)
        nn.init.normal_(self.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.bias)


class AlexNetClassifier(nn.Module):
    """Backbone plus head as one network: AlexNet whose last layer is the trained 4096 -> C head.

    The backbone computes in its own dtype (fp32, or bf16/fp16 weights cast once), exactly as extraction
    did; the head always runs in fp32 on the fc7 it returns, as it did on the cached features.
    """

    def __init__(self, backbone: AlexNetFC7, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).float())  # (B, C) float32 logits


def weights_fingerprint(backbone: AlexNetFC7) -> str:
    """sha256 over the tensors the fc7 cut uses (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:float32;".encode())
        digest.update(tensor.numpy())  # buffer protocol: no copy
    return digest.hexdigest()
