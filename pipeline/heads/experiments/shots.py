"""Few-shot training sets: K train images per class, drawn reproducibly from the cache's rows."""
from __future__ import annotations

import numpy as np

from pipeline.common.errors import UserError


def few_shot_rows(labels: np.ndarray, shots: int, *, seed: int, wnids: list[str]) -> np.ndarray:
    """Sorted row indices holding ``shots`` rows of every class, drawn with ``seed``.

    Each class draws from its own generator, seeded by (seed, class), and takes the first ``shots`` rows
    of a permutation of its rows: the same seed gives the same rows, and with one seed the 5-shot set is
    part of the 10-shot set. A class with fewer rows than ``shots`` is an error, not a smaller class.
    """
    labels = np.asarray(labels)
    chosen = []
    for label, wnid in enumerate(wnids):
        rows = np.flatnonzero(labels == label)
        if len(rows) < shots:
            have = np.bincount(labels, minlength=len(wnids))
            raise UserError(f"--shots {shots} asks for more train images than class {wnid} has ({len(rows)}); "
                            f"use --shots {int(have.min())} or less, or 'all'")
        permutation = np.random.default_rng((seed, label)).permutation(len(rows))
        chosen.append(rows[permutation[:shots]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)

