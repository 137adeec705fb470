"""What chooses a head's hyper-parameters: a held-out share of the train rows (``--select train-split``), or val.

Kornblith et al. (2019) and DINOv2's ``log_regression.py`` choose on a held-out 10 % of train, refit on all of train
at the chosen value, and report val once; choosing on val (today's ``--select val``) makes the val figure
optimistic. ``held_out`` holds out, in every class, the ``round(fraction x n)`` rows (at least one, and never all:
one stays to fit on) whose paths hash lowest, by ``hash_share`` of ``"select:" + path``
(pipeline.datasets.holdout): stratified, and stable (the same rows whatever their order, the seed or the other
classes). The key differs from the one that made an ImageFolder's val split, whose train rows all hash above the
val fraction. Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.common.errors import UserError
from pipeline.datasets.holdout import hash_share

SALT = "select:"  # the hash key of a row: SALT + its path


@dataclass(frozen=True)
class Selection:
    """The train rows split in two, as positions into the reader's rows (sorted): fit on ``fit``, choose on ``held``."""

    fit: np.ndarray
    held: np.ndarray

    @property
    def order(self) -> np.ndarray:
        """The fit positions, then the held-out ones: loaded in this order, the fit rows are the first ``len(fit)``."""
        return np.concatenate([self.fit, self.held])


def held_out(paths: list[str], labels: np.ndarray, fraction: float, wnids: list[str]) -> Selection:
    """Per class, the ``round(fraction x n)`` rows (at least 1, at most n - 1) with the lowest hash of their path.

    ``paths`` and ``labels`` are the reader's rows (a few-shot draw: the rows drawn). A class with a single row
    cannot both fit and choose: one line naming ``--select val``. A class with no row is left out.
    """
    labels = np.asarray(labels)
    shares = np.array([hash_share(SALT + path) for path in paths])
    held = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) < 2:
            raise UserError(f"--select train-split holds out train rows of every class to choose the hyper-parameters "
                            f"on, but class {wnids[label]} has {len(rows)} train image (--shots 1?); use --select val, "
                            "or more --shots")
        count = min(len(rows) - 1, max(1, int(np.floor(fraction * len(rows) + 0.5))))
        order = sorted(rows, key=lambda row: (shares[row], paths[row]))
        held.extend(order[:count])
    held = np.sort(np.asarray(held, dtype=np.int64))
    fit = np.setdiff1d(np.arange(len(labels)), held)
    return Selection(fit=fit, held=held)
