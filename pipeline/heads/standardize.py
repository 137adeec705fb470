"""Z-scoring with train-set statistics, and folding it into a linear layer on raw features (linear and logreg)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.heads.readers import FeatureSource

STATS_ROWS = 4096  # rows per step when computing the standardization statistics
STD_FLOOR = 1e-6  # dead ReLU units have std 0: leave them unscaled


@dataclass
class Standardizer:
    mean: torch.Tensor  # (D,)
    inv_std: torch.Tensor  # (D,)

    @classmethod
    def identity(cls, dim: int, device) -> "Standardizer":
        return cls(torch.zeros(dim, device=device), torch.ones(dim, device=device))

    @classmethod
    def fit(cls, source: FeatureSource, device) -> "Standardizer":
        """Mean and std over the whole train set, accumulated in float64."""
        total = sq = None
        for x, _ in source.batches(STATS_ROWS, None):  # small blocks: float64 copies stay ~100 MiB
            x = x.to(device, torch.float64)
            total = x.sum(0) if total is None else total + x.sum(0)
            sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
        mean = total / source.num_rows
        std = (sq / source.num_rows - mean * mean).clamp_min(0).sqrt()
        inv_std = torch.where(std > STD_FLOOR, 1.0 / std, torch.ones_like(std))
        return cls(mean.float(), inv_std.float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) * self.inv_std

    def fold_into(self, head: nn.Linear) -> dict[str, torch.Tensor]:
        """The state of a Linear on raw features equal to ``head`` on standardized ones."""
        return self.fold(head.weight.detach(), head.bias.detach())

    def fold(self, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state of a Linear on raw features equal to (``weight`` (C, D), ``bias`` (C,)) on standardized ones."""
        weight = weight * self.inv_std  # (C, D)
        bias = bias - weight @ self.mean
        return {"weight": weight.cpu().clone(), "bias": bias.cpu().clone()}
