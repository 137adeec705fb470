"""Reading a file torch saved, weights-only: the one call of torch's unpickler in the project, with one wording of
its refusal.

Head checkpoints (pipeline.common.checkpoint) and backbone weights files (pipeline.backbones.weights) are read
here. Torch's weights-only unpickler rebuilds tensors and plain values only; anything else in the file (a class,
a function such as ``os.system``) is refused, and the user reads why in one line, without torch's advice to load
the file unsafely. Torch is imported when a file is read, so importing this module stays torch-free.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

from pipeline.common.errors import UserError

# the lines of torch's message that are advice (to load unsafely, to file an issue, to read the docs); the line that
# names what was refused goes on to advise allowlisting it, so refusal() keeps its first sentence only
ADVICE = ("weights_only", "Weights only load failed", "documentation", "Please file an issue")


def refusal(err: BaseException) -> str:
    """What torch's loader found wrong, in its own words, in one short phrase (never its advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    found = [line for line in lines if not any(advice in line for advice in ADVICE)]
    if not found:  # an empty file: EOFError with no message
        return type(err).__name__
    gist = found[0].removeprefix("WeightsUnpickler error:").strip().split(". ")[0].rstrip(".")[:160]
    return gist if isinstance(err, (RuntimeError, OSError, pickle.UnpicklingError)) else f"{type(err).__name__} {gist}"


def is_hostile(err: BaseException) -> bool:
    """Whether torch refused the file for what it would import (a pickled class or function), not for damage."""
    return isinstance(err, pickle.UnpicklingError) and "GLOBAL" in str(err)


def load_weights_only(path: Path, kind: str, advice: str) -> object:
    """The object saved at ``path``, read on the CPU by torch's weights-only unpickler.

    A file holding pickled objects besides tensors and plain values is refused for safety; a damaged or foreign
    file is "not a readable ``kind``". Either is one UserError line that ends with ``advice``.
    """
    import torch

    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling, zip, EOF and I/O errors alike
        if is_hostile(err):
            raise UserError(f"{path} holds pickled objects besides tensors ({refusal(err)}), and is refused for "
                            f"safety; {advice}") from None
        raise UserError(f"{path} is not a readable {kind} ({refusal(err)}); {advice}") from None
