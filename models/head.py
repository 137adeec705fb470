"""The linear head trained on cached features: torch only, so stage two never imports torchvision (seconds)."""
from __future__ import annotations

from torch import nn


class LinearHead(nn.Linear):
    """Linear layer to train on top of frozen features (DINO's LinearClassifier init)."""

    def __init__(self, num_classes: int, in_features: int):
        super().__init__(in_features, num_classes)
        nn.init.normal_(self.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.bias)
