"""The results store: one result.json beside every fit's files, its one reader and validator, and what reads it.

A result.json records one fit evaluated on val: the cache it was trained on (``cache``: pipeline.heads.plan's
``cache_identity``), the head and its settings, the shots, which set chose its hyper-parameters (``selected_by``:
``train-split``, ``val``, or ``none`` for a head with nothing to choose, such as zero-shot with 0 shots), whether it
is the fit its run chose (``chosen``), its val ``top1``, ``top5`` and ``mean_per_class``, and the seconds and the
project's version. A head adds its own fields (logreg: ``chosen_C``, ``weight_decay``, ``refit_objective``; kNN:
``k``; linear: ``lr``, ``weight_decay``, ``epochs``); the store needs none of them.

Readers trust only what ``read_result`` returns: a file that is damaged (not JSON, a field missing or of the wrong
type or range) or of another format version is a ``BadResult``, one line naming the file and what is wrong; a result
whose cache changed since is found by ``stale``. ``--skip-existing`` recomputes those (``fresh``), and the table
leaves them out (pipeline.heads.publish.results): neither ever mixes one in silently. Torch-free.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from features.errors import CacheError
from pipeline.common.config import HeadConfig
from pipeline.common.names import VERSION
from pipeline.heads.plan import PlannedPlace, comparable, current_identity, normalized, plan_run
from pipeline.heads.publish.files import config_record
from pipeline.heads.run_folder import read_run_record

log = logging.getLogger(__name__)

RESULT = "result.json"
RESULT_FORMAT = "fc7-transfer-result/1"
SELECTED_BY = ("train-split", "val", "none")
MAX_BYTES = 1 << 20  # a result.json is a few KiB: a larger file is not one


class BadResult(ValueError):
    """A result.json that cannot be trusted: its message is one line naming the file and what is wrong."""


def _number(low: float, high: float):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# field -> (check, what it must be); every result.json has these, whatever its head
FIELDS = {
    "format": (lambda v: isinstance(v, str), "a format name"),
    "version": (lambda v: isinstance(v, str), "the project's version"),
    "cache": (lambda v: isinstance(v, dict) and all(isinstance(v.get(k), str) for k in ("features", "dataset", "layer"))
              and isinstance(v.get("train"), dict) and isinstance(v.get("val"), dict), "the cache's identity"),
    "head": (lambda v: isinstance(v, str) and bool(v), "a head name"),
    "settings": (lambda v: isinstance(v, dict), "an object"),
    "shots": (lambda v: v is None or _count(v), "null (all) or a count of images per class (0: zero-shot)"),
    "selected_by": (lambda v: v in SELECTED_BY, " or ".join(SELECTED_BY)),
    "chosen": (lambda v: isinstance(v, bool), "true or false"),
    "hyper_parameters": (lambda v: isinstance(v, str), "text"),
    "top1": (_number(0, 100), "a percentage"),
    "top5": (_number(0, 100), "a percentage"),
    "mean_per_class": (_number(0, 100), "a percentage"),
    "val_images": (_count, "a count"),
    "train_images": (_count, "a count"),
    "seconds": (_number(0, math.inf), "seconds"),
    "checkpoint": (lambda v: v is None or v == "best.pt", "null or \"best.pt\""),
}


def write_result(path: Path, record: dict) -> None:
    """``record`` (built by pipeline.heads.publish.result) checked, then written as ``path``."""
    check_result(path, record)
    path.write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")


def check_result(path: Path, record) -> dict:
    """``record`` when every field is of its type and range, else BadResult naming ``path`` and the field."""
    if not isinstance(record, dict):
        raise BadResult(f"{path} is not a result (a JSON object expected)")
    if record.get("format") != RESULT_FORMAT:
        raise BadResult(f"{path} is of format {json.dumps(record.get('format'))[:40]}, not {RESULT_FORMAT} "
                        f"(written by another version than {VERSION})")
    for name, (ok, what) in FIELDS.items():
        if name not in record or not ok(record[name]):
            shown = json.dumps(record.get(name))
            raise BadResult(f"{path}: field {name!r} must be {what}, got {shown[:60]}")
    return record


def read_result(path: Path) -> dict:
    """The checked record of the result.json at ``path``; BadResult (one line) when it is damaged or of another format."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise BadResult(f"{path} is {path.stat().st_size} bytes: not a result.json")
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise BadResult(f"cannot read {path} ({getattr(err, 'strerror', None) or err})") from None
    except ValueError:
        raise BadResult(f"{path} is damaged (not JSON)") from None
    return check_result(path, record)


def stale(path: Path, record: dict, now: dict | None = None) -> str | None:
    """Why ``record`` no longer describes its cache (one line naming ``path`` and what changed), or None.

    ``now``: the cache's identity now (read from the cache when not given); a cache whose files are gone cannot be
    compared, and is not called stale.
    """
    cache = record["cache"]
    now = now if now is not None else current_identity(Path(cache["features"]), cache["layer"])
    if now is None or now == cache:
        return None
    changed = [key for key in sorted(set(now) | set(cache)) if now.get(key) != cache.get(key)]
    return (f"{path} was computed from the cache in {cache['features']} as it was before, and the cache changed since "
            f"({', '.join(changed)} differ)")


def fresh(out: Path, places: list[PlannedPlace], *, say: bool = True) -> dict[tuple, list[tuple[str, dict]]]:
    """The places whose every result.json in ``out`` belongs to the run published there and matches its identity
    and settings: {place key: [(folder, record)]}. A damaged one, one of another format or of a cache that changed
    since is named in one line (a warning; ``say=False``: not, the run that recomputes it says it): its place is
    recomputed."""
    try:
        record = read_run_record(out)
    except Exception:  # a damaged run.json: the training run says so, in one line
        return {}
    if record is None or record.get("contents") is None:
        return {}
    published = set(record["files"])
    found = {}
    for place in places:
        results = [_fresh_result(out, folder, place, published, say) for folder in place.results]
        if all(result is not None for result in results):
            found[place.key] = list(zip(place.results, results))
    return found


def _fresh_result(out: Path, folder: str, place: PlannedPlace, published: set[str], say: bool) -> dict | None:
    path = out / folder / RESULT
    top = Path(folder).parts[0] if folder else RESULT
    if top not in published or not path.is_file():
        return None
    try:
        record = read_result(path)
    except BadResult as err:
        if say:
            log.warning("%s; recomputing it", err)
        return None
    reason = stale(path, record, place.identity)
    if reason:
        if say:
            log.warning("%s; recomputing it", reason)
        return None
    same = (record["head"], record["shots"], record["settings"]) == (place.head, place.shots, place.settings)
    return record if same else None


def up_to_date(out: Path, grid: bool, places: list[PlannedPlace], record: dict) -> bool:
    """Whether the run in ``out`` is this run already: every place fresh and, for a grid, its config.json the same
    settings as ``record`` (this run's config record), how it ran aside."""
    if not places or len(fresh(out, places, say=False)) != len(places):
        return False
    if not grid:
        return True
    try:
        written = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(written, dict) and comparable(written) == comparable(record)


def already_done(config: HeadConfig) -> bool:
    """``--skip-existing`` (on by default in grids and sweeps): whether ``--out`` holds this very run, every result.json fresh;
    decided from the caches' attributes and the JSON files, before torch is imported."""
    config = normalized(config)
    try:
        grid, places = plan_run(config)
    except CacheError:  # a missing or damaged cache: the training run says what is wrong
        return False
    if not config.skips_existing(grid):
        return False
    out = Path(config.out)
    if not up_to_date(out, grid, places, config_record(config)):
        return False
    count = sum(len(place.results) for place in places)
    log.info("%s is up to date: %s match%s this run's caches and settings (--skip-existing); nothing to train", out,
             "its result.json" if count == 1 else f"its {count} result.json files", "es" if count == 1 else "")
    return True


def result_files(folders: list[Path]) -> list[Path]:
    """Every result.json below ``folders`` (a run's staging and trash folders aside), sorted."""
    found = []
    for folder in folders:
        for path in sorted(Path(folder).rglob(RESULT)):
            if not any(part.startswith((".staging-", ".trash-")) for part in path.relative_to(folder).parts):
                found.append(path)
    return list(dict.fromkeys(found))

