"""A run folder written whole or not at all, by one process at a time (used by head training).

A run is written into ``<out>/.staging-<pid>/``; when every file is there, a manifest (``.ready``) is
written, the previous run's own files are removed and the new ones renamed into ``<out>``, and
``run.json`` (the marker, naming the run's files) comes last. A kill or error before that leaves the
previous run untouched; a kill during the publish (a few renames) is finished by the next run, which
also removes staging folders of dead runs. Files in ``<out>`` that the tool did not write are never
touched. ``<out>/.lock`` (flock, released by the kernel even after kill -9) admits one writer at a time.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

from features.locking import hold_lock
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)

MARKER = "run.json"  # written last: names the run's files
READY = ".ready"  # in a staging folder: its manifest, written once everything else is
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
# what a head run (linear, logreg, knn, a sweep, a grid) writes at the top of its folder: a folder whose
# run.json is missing (an older run, or one killed during its publish) is cleaned by these names
RUN_FILES = ("best.pt", "last.pt", "history.csv", "config.json", "accuracy.png", "loss.png", "per_class.csv",
             "confusions.csv", "report.md", "sweep.csv", "sweep.png", "path.csv", "knn.csv", "experiments.csv",
             "experiments.md", "experiments.png", MARKER)
# a sweep's head folders (pipeline.heads.linear.run_name) and a grid's combination folders (pipeline.heads.grid)
RUN_FOLDER = re.compile(r"lr[^/]*_wd[^/]*|[a-z0-9]+_(linear|logreg|knn)_(\d+shot|all)(_lr[^/]*_wd[^/]*)?")


def exclusive_run(out: Path, what: str):
    """Hold ``<out>/.lock`` while ``what`` writes into ``out``; a second writer gets a one-line error."""
    return hold_lock(out, f"{what}, pid {os.getpid()}", lambda holder: UserError(
        f"{out} is in use by another run ({holder}); wait for it, or pass another --out"))


def _remove(path: Path) -> None:
    """Remove a file or folder; a folder is first renamed aside, so it vanishes from ``out`` at once."""
    if path.is_dir() and not path.is_symlink():
        aside = path.with_name(f"{TRASH_PREFIX}{os.getpid()}-{path.name}")
        os.replace(path, aside)
        shutil.rmtree(aside)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, content: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(content, indent=2, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def previous_entries(out: Path) -> set[str]:
    """The names in ``out`` that belong to the run published there (by its run.json, else by name)."""
    try:
        recorded = json.loads((out / MARKER).read_text())["files"]
        entries = {str(name) for name in recorded if "/" not in str(name) and str(name) not in ("", ".", "..")}
    except (OSError, ValueError, KeyError, TypeError):
        entries = set()
    entries.update(name for name in RUN_FILES if (out / name).exists())
    for folder in out.iterdir():  # a sweep's or a grid's folders holding nothing but the tool's files
        if folder.is_dir() and RUN_FOLDER.fullmatch(folder.name) and all(
                p.is_file() and p.name in (*RUN_FILES, ".lock") for p in folder.iterdir()):
            entries.add(folder.name)
    entries.add(MARKER)
    return entries


def check_clashes(out: Path, names, previous: set[str] | None = None) -> None:
    """A UserError when a name this run will publish is taken in ``out`` by something not of the run there
    (a folder of the user's named like a grid's combination): checked before anything is moved or removed."""
    previous = previous_entries(out) if previous is None else previous
    taken = [name for name in names if name not in previous and ((out / name).exists() or (out / name).is_symlink())]
    if taken:
        raise UserError(f"{out / taken[0]} is in the way: this run writes an entry of that name, and it is not part of "
                        f"the run in {out} (this tool did not write it); move it away or pass another --out")


def publish(out: Path, staging: Path) -> list[str]:
    """Move a finished staging folder's files into ``out``, replacing the previous run's; idempotent after a kill.

    An entry of the manifest that is no longer in ``staging`` was moved already (by this or a killed call).
    The previous run's entries were recorded in the manifest (``replaces``) before anything was removed.
    """
    manifest = json.loads((staging / READY).read_text())
    files = list(manifest["files"])
    previous = set(manifest.get("replaces", ())) | previous_entries(out)
    check_clashes(out, [name for name in files if (staging / name).exists()], previous)
    (out / MARKER).unlink(missing_ok=True)  # from here until the end, the folder does not claim a complete run
    for name in sorted(previous - {MARKER}):
        if name in files and not (staging / name).exists():
            continue  # this run's own, already in place
        _remove(out / name)
    for name in files:
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    _fsync_dir(out)
    _write_json(out / MARKER, {**manifest["run"], "files": sorted(files + [MARKER]),
                               "published": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    shutil.rmtree(staging, ignore_errors=True)
    return files


def recover(out: Path) -> None:
    """Under the lock: finish the publish of a run killed during it, and remove other staging and trash folders."""
    for folder in sorted(out.glob(STAGING_PREFIX + "*")):
        if (folder / READY).is_file():
            log.info("finishing the publish of a run that was interrupted during it (%s)", folder.name)
            publish(out, folder)
        else:
            log.info("removing %s, left by an interrupted run", folder)
            shutil.rmtree(folder, ignore_errors=True)
    for folder in out.glob(TRASH_PREFIX + "*"):
        shutil.rmtree(folder, ignore_errors=True)


class StagedRun:
    """Where a run's files are written (``path``) until ``commit`` moves them into ``out``.

    Use as a context manager after taking the lock: on an exception the staging folder is removed and
    ``out`` is left as it was.
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / f"{STAGING_PREFIX}{os.getpid()}"

    def __enter__(self) -> "StagedRun":
        recover(self.out)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir()
        return self

    def commit(self, run: dict) -> list[str]:
        """Publish the staged files; ``run`` (plain values) is recorded in run.json."""
        files = sorted(p.name for p in self.path.iterdir() if p.name != READY)
        _write_json(self.path / READY, {"files": files, "run": run, "replaces": sorted(previous_entries(self.out))})
        return publish(self.out, self.path)

    def publishing(self) -> bool:
        """The staged run is complete and (partly) moved into ``out``: left for the next run to finish."""
        return (self.path / READY).is_file()

    def __exit__(self, *exc) -> None:
        if self.path.exists() and not (self.path / READY).is_file():
            shutil.rmtree(self.path, ignore_errors=True)
