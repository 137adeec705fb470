"""The heads, by name: each is one module with ``FILES``, ``folders`` and ``fit`` (pipeline.heads.interface).

A fourth head is one new module and one line here.
"""
from __future__ import annotations

from pipeline.heads import knn, linear, logreg

HEADS = {
    "linear": linear,  # the SGD seed recipe
    "logreg": logreg,  # L-BFGS logistic regression, best of a penalty path
    "knn": knn,  # DINO's weighted kNN
}
