"""The heads, by name: each is one module whose ``fit`` returns a result (pipeline.heads.interface), paired
with the publisher that writes that result (pipeline.heads.publish).

A new head is one module, its writer in pipeline.heads.publish, and one line here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pipeline.heads import knn, linear, logreg, zeroshot
from pipeline.heads.interface import HeadResult, HeadSettings
from pipeline.heads.publish.heads import KNN, LOGREG
from pipeline.heads.publish.linear import LINEAR
from pipeline.heads.publish.place import Publisher
from pipeline.heads.publish.zeroshot import ZEROSHOT
from pipeline.heads.readers import FeatureReader


@dataclass(frozen=True)
class Head:
    """One head: its ``fit`` (solves and returns, writes nothing) and the publisher of what it returns."""

    fit: Callable[[FeatureReader, FeatureReader, HeadSettings], HeadResult]
    publisher: Publisher


HEADS = {
    "linear": Head(linear.fit, LINEAR),  # the SGD seed recipe
    "logreg": Head(logreg.fit, LOGREG),  # L-BFGS logistic regression, best of a penalty path
    "knn": Head(knn.fit, KNN),  # DINO's weighted kNN
    "zeroshot": Head(zeroshot.fit, ZEROSHOT),  # CLIP zero-shot: a linear head from text, on an open_clip cache
}
