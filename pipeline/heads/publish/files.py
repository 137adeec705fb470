"""The publisher's tools for a staged run folder: the one config record, the one CSV and checkpoint writer,
and one line for a failed write. Moving the staged run into --out is pipeline.heads.run_folder's."""
from __future__ import annotations

import csv
import json
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from features.cache import CachedSplit
from pipeline.common.config import HeadConfig
from pipeline.common.errors import UserError, first_line
from pipeline.heads.run_folder import StagedRun


def prepare_out(out: Path) -> None:
    """A --out that cannot be written is one line, before anything runs."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to --out {out} ({err.strerror}); choose a writable folder") from None


@contextmanager
def writing(stage: StagedRun, path: Path):
    """A failed write (a full disk) is one line naming the file; the folder still holds the previous run."""
    try:
        yield
    except OSError as err:
        raise UserError(f"cannot write {final_path(stage, path)} ({err.strerror or first_line(err)}); {stage.out} still "
                        "holds its previous run, unchanged: free some space (or fix the folder), then rerun") from None


def final_path(stage: StagedRun, path: Path) -> Path:
    """Where ``path`` (in the staging folder) will be once the run is published."""
    path = Path(path)
    return stage.out / path.relative_to(stage.path) if path.is_relative_to(stage.path) else path


def commit(stage: StagedRun, run: dict, own_names: set[str]) -> None:
    """Publish the staged run (pipeline.heads.run_folder); a failure is one line saying what ``out`` holds now."""
    try:
        stage.commit(run, own_names)
    except OSError as err:
        state = ("the next run completes it" if stage.publishing() else f"{stage.out} still holds its previous run, unchanged")
        raise UserError(f"cannot finish writing the run into {stage.out} ({err.strerror or first_line(err)}); "
                        f"free some space, then rerun ({state})") from None


def plain(value):
    """``value`` as JSON values: paths as str, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def config_record(config: HeadConfig, **extra) -> dict:
    """The one JSON form of a config (config.json, and the checkpoint's ``config``), with ``extra`` fields."""
    return {**plain(asdict(config)), **plain(extra)}


def write_config(stage: StagedRun, folder: Path, record: dict) -> None:
    """``folder``/config.json (the folder made first)."""
    with writing(stage, folder / "config.json"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` as the CSV at ``path``, the first row's keys its header (the same keys in every row)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def layer_attrs(split: CachedSplit) -> dict:
    """The split's attributes as a checkpoint records them: the layer read and its width."""
    return {**split.attrs, "layer": split.layer, "feature_dim": split.feature_dim}
