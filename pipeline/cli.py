"""What the three entry scripts share: logging setup and the one-line error contract.

``features/`` says what is wrong with a cache; the kind of its CacheError decides what to do, added here.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from features.errors import (CacheBusy, CacheDamaged, CacheError, CacheIncomplete, CacheMissing, CacheUnwritable,
                             LayerMissing)
from pipeline.common.errors import UserError, first_line

# what requirements.txt installs that the torch-free set-up (opencv-python, numpy, onnxruntime) lacks
REQUIREMENTS = ("torch", "torchvision", "h5py")

# what to do about each kind of cache problem (the most specific class first)
CACHE_ADVICE: tuple[tuple[type, str], ...] = (
    (CacheMissing, "run run_extract.py first, or pass --features DIR"),
    (CacheIncomplete, "rerun run_extract.py to finish it (the finished shards are kept)"),
    (CacheDamaged, "re-extract it with run_extract.py --overwrite"),
    (CacheBusy, "wait for it to finish, then rerun (or pass another folder)"),
    (CacheUnwritable, "free some space (or fix the folder's permissions) and rerun: the finished shards are kept"),
)


def comma_list(convert: Callable = str, what: str = "names"):
    """An argparse type for a comma list: 'pool5, fc7' -> ('pool5', 'fc7'), each item through ``convert``; one
    line naming what was expected when an item does not convert."""
    def parse(text: str) -> tuple:
        try:
            return tuple(convert(item.strip()) for item in text.split(",") if item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} separated by commas, got {text!r}") from None
    return parse


def shots(item: str) -> int | None:
    """--shots: images per class, or 'all' (None)."""
    return None if item.lower() == "all" else int(item)


def cache_advice(err: CacheError) -> str:
    """The line a CacheError is printed as: what is wrong (from features/), then what to do."""
    if isinstance(err, LayerMissing):
        return f"{err}; add it with run_extract.py --layers {err.layer}"
    for kind, advice in CACHE_ADVICE:
        if isinstance(err, kind):
            return f"{err}; {advice}"
    return str(err)


def missing_requirement(err: ImportError | OSError) -> str | None:
    """The requirements.txt package an import failed on (torch absent, or failing while it is imported), or None."""
    root = (getattr(err, "name", None) or "").split(".")[0]
    if root in REQUIREMENTS:
        return root
    tb = err.__traceback__
    while tb is not None:  # raised by the package's own import (a missing shared library, a broken install)
        module = str(tb.tb_frame.f_globals.get("__name__", "")).split(".")[0]
        if module in REQUIREMENTS and tb.tb_frame.f_code.co_name == "<module>":
            return module
        tb = tb.tb_next
    return None


def run_main(body: Callable[[], int | None]) -> int:
    """Run an entry point: a UserError becomes one 'error: ...' line on stderr and exit code 2."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return body() or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CacheError as err:
        print(f"error: {cache_advice(err)}", file=sys.stderr)
        return 2
    except (ImportError, OSError) as err:
        package = missing_requirement(err)  # torch absent or broken (a missing shared library is an OSError)
        if package is not None:
            print(f"error: {package} cannot be imported ({first_line(err)}); pip install -r requirements.txt, or run "
                  "an exported graph without it: run_webcam.py --onnx FILE.onnx (--runtime opencv or onnxruntime)",
                  file=sys.stderr)
            return 2
        if isinstance(err, ImportError):  # not a requirement: a bug, with its traceback
            raise
        where = f"{err.filename}: " if err.filename else ""  # an unwritable --out, a full disk, a vanished file
        print(f"error: {where}{err.strerror or err}; check the path, its permissions and the free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
