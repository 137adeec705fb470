"""What the three entry scripts share: logging setup and the one-line error contract."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from features.errors import CacheError  # not features.cache: h5py-free, for the torch-free live runtimes
from pipeline.common.errors import UserError


def run_main(body: Callable[[], int | None]) -> int:
    """Run an entry point: a UserError becomes one 'error: ...' line on stderr and exit code 2."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return body() or 0
    except (UserError, CacheError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an unwritable --out, a full disk, a vanished file: the file system, not a bug
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}; check the path, its permissions and the free space", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
