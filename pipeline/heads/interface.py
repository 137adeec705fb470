"""The head contract: what one head run gets (``HeadSettings``) and what it returns (a ``HeadResult``).

A head is one module of pipeline.heads with

- ``fit(train, val, settings) -> HeadResult``: train (or index) on the train reader, score on val, and return
  what it found (weights, per-fit rows, val predictions, metrics) as a frozen dataclass of its own, a
  ``HeadResult``. It writes no file: pipeline.heads.publish turns the result into the run folder's files and
  the grid's table rows (dinov2's ``sweep_C_values`` returns its best and lets its caller write).

pipeline.heads.registry pairs each head with its publisher; pipeline.heads.experiments.grid loops over it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.common.config import HeadConfig


@dataclass(frozen=True)
class HeadSettings:
    """One head on one layer and shot count: the config narrowed to them (``config.layers == (layer,)``,
    ``config.head == (name,)``, ``config.shots == (shots,)``), and the device it runs on."""

    config: HeadConfig
    device: torch.device

    @property
    def name(self) -> str:
        return self.config.head[0]

    @property
    def layer(self) -> str:
        return self.config.layers[0]

    @property
    def shots(self) -> int | None:
        return self.config.shots[0]


@dataclass(frozen=True)
class Predictions:
    """A trained head's answers on the val rows: what its report is made of."""

    classes: np.ndarray  # (M,) the top-1 class of each val row
    val_top1: float  # %
    val_top5: float  # %


@dataclass(frozen=True, kw_only=True)
class HeadResult:
    """What every head's ``fit`` returns; each head's result adds its own typed fields."""

    train_images: int  # the train rows used (few-shot: the rows drawn)
    seconds: float  # wall time of the fit, loading the features included
