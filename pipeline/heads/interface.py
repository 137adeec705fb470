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
    mean_per_class: float = float("nan")  # % the mean over classes (with val rows) of each class's top-1

    @classmethod
    def of(cls, classes, labels, val_top1: float, val_top5: float) -> "Predictions":
        """The predictions ``classes`` (M,) of the val rows whose classes are ``labels`` (M,), with their accuracy."""
        classes = np.asarray(classes)
        return cls(classes, val_top1, val_top5, mean_per_class(classes, labels))


def mean_per_class(classes: np.ndarray, labels: np.ndarray) -> float:
    """The mean over the classes present in ``labels`` of each one's top-1 accuracy (in %): the figure papers report
    for unbalanced sets (Kornblith et al.'s Caltech, Pets, Flowers)."""
    labels = np.asarray(labels)
    present = np.unique(labels)
    if not len(present):
        return float("nan")
    return float(np.mean([100.0 * np.mean(np.asarray(classes)[labels == c] == c) for c in present]))


@dataclass(frozen=True, kw_only=True)
class HeadResult:
    """What every head's ``fit`` returns; each head's result adds its own typed fields."""

    train_images: int  # the train rows used (few-shot: the rows drawn)
    seconds: float  # wall time of the fit, loading the features included
