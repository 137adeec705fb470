"""The class names a zero-shot head puts into CLIP's templates, and ``--class-prompts FILE``. Torch-free.

By default each class is named as the cache names it: the first synonym of its words.txt line (Tiny ImageNet's
``goldfish``), or its folder name (an ImageFolder's), with ``_`` read as a space (``sea_lion`` is "sea lion").
``--class-prompts FILE`` names them instead: a UTF-8 text file of one line per class, in the cache's class order
(the order of ``class_wnids`` in the checkpoint and of per_class.csv: wnids.txt's order, or the sorted folder
names); blank lines and lines starting with ``#`` are skipped, and surrounding spaces dropped. Another count of
lines than of classes is one line saying how many, and in which order.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.common.errors import UserError

MAX_BYTES = 16 * 2**20  # far above any class list: a larger file is not one


def default_name(name: str) -> str:
    """A cache's class name as a prompt reads it: ``_`` as a space, spaces collapsed."""
    return " ".join(name.replace("_", " ").split())


def _read_lines(path: Path) -> list[str]:
    """The non-blank, non-comment lines of ``path``, stripped; a file that cannot be read is one line."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise UserError(f"--class-prompts {path} is {path.stat().st_size} bytes: not a list of class names")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--class-prompts {path}: no such file; pass a text file of one class name per line") from None
    except IsADirectoryError:
        raise UserError(f"--class-prompts {path} is a folder; pass a text file of one class name per line") from None
    except UnicodeDecodeError:
        raise UserError(f"--class-prompts {path} is not UTF-8 text; pass a text file of one class name per line") from None
    except OSError as err:
        raise UserError(f"cannot read --class-prompts {path} ({err.strerror or err})") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def class_names(wnids: list[str], names: list[str], prompts: Path | None) -> list[str]:
    """The name of each class (in the cache's order) that the templates are filled with."""
    if prompts is None:
        return [default_name(name) or wnid for wnid, name in zip(wnids, names)]
    lines = _read_lines(Path(prompts))
    if len(lines) != len(wnids):
        shown = ", ".join(wnids[:5]) + (", ..." if len(wnids) > 5 else "")
        raise UserError(f"--class-prompts {prompts} names {len(lines)} class{'es' if len(lines) != 1 else ''}, but the "
                        f"cache has {len(wnids)}: give one line per class, in the cache's order ({shown})")
    return lines


def prompts_digest(prompts: Path | None) -> str | None:
    """What a result records of --class-prompts: the sha256 of its bytes (16 hex digits), so a changed file is another
    run; None without one, "unreadable" when it cannot be read (the run then says why, in one line)."""
    if prompts is None:
        return None
    try:
        return hashlib.sha256(Path(prompts).read_bytes()).hexdigest()[:16]
    except OSError:
        return "unreadable"
