"""A run folder written whole or not at all, by one process at a time (used by head training).

A run is written into ``<out>/.staging-<pid>/``; when every file is there, a manifest (``.ready``) is
written, the previous run's own files are removed and the new ones renamed into ``<out>``, and
``run.json`` (the marker, naming the run's files) comes last. A kill or error before that leaves the
previous run untouched; a kill during the publish (a few renames) is finished by the next run, which
also removes staging folders of dead runs. Only what run.json names is removed: in a folder of the run, only
the files it recorded there (a folder left holding other files is kept, and said so). A folder without
run.json that holds files of the run's names (``own_names``, from the caller) is refused, not cleaned.
``<out>/.lock`` (flock, released by the kernel even after kill -9) admits one writer at a time.
This module knows no head or file of one by name: callers say what their runs write.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from features.atomic import sync_folder, write_atomic
from features.locking import hold_lock
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)

MARKER = "run.json"  # written last: names the run's files, and the files of each of its folders
READY = ".ready"  # in a staging folder: its manifest, written once everything else is
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
TOOL = "run_train_head.py"


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


def _write_json(path: Path, content: dict) -> None:
    write_atomic(path, json.dumps(content, indent=2, allow_nan=False) + "\n", durable=True)


def _is_name(value) -> bool:
    """A plain entry name of a folder: no separator, not empty, not '.' or '..'."""
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\0" not in value


def _names(value) -> bool:
    return isinstance(value, list) and all(_is_name(name) for name in value)


def _field(path: Path, name: str, value, what: str) -> UserError:
    return UserError(f"{path}: field {name!r} must be {what}, got {json.dumps(value)[:80]}; the folder's record is "
                     "damaged or not this tool's: move the folder's files away, or pass another --out")


def read_run_record(out: Path) -> dict | None:
    """``out``/run.json, checked field by field (exact types and ranges); None when there is none.

    Anything else is one line naming the file and the field: a run folder whose record cannot be trusted is
    not cleaned by it.
    """
    path = out / MARKER
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path} ({getattr(err, 'strerror', None) or err}); fix it, or pass another --out") from None
    try:
        record = json.loads(text)
    except ValueError:
        raise UserError(f"{path} is not JSON (damaged, or not this tool's): move the folder's files away, "
                        "or pass another --out") from None
    if not isinstance(record, dict):
        raise _field(path, "(the whole file)", record, "a JSON object")
    checks = {"tool": (lambda v: v == TOOL, f"{TOOL!r}"), "kind": (lambda v: isinstance(v, str), "a string"),
              "features": (lambda v: isinstance(v, str), "a string"),
              "weights_spec": (lambda v: isinstance(v, str), "a string"),
              "heads": (lambda v: isinstance(v, list) and all(isinstance(h, str) for h in v), "a list of strings"),
              "best": (_is_best, "null or {\"head\": a string, \"val_top1\": a number from 0 to 100}"),
              "files": (_names, "a list of names in the folder"),
              "published": (lambda v: isinstance(v, str), "a string")}
    for name, (ok, what) in checks.items():
        if name not in record or not ok(record[name]):
            raise _field(path, name, record.get(name), what)
    contents = record.get("contents")
    if contents is not None and not (isinstance(contents, dict) and all(
            key in record["files"] and _names(value) for key, value in contents.items())):
        raise _field(path, "contents", contents, "an object mapping folders of 'files' to lists of names")
    return record


def _is_best(value) -> bool:
    if value is None:
        return True
    top1 = value.get("val_top1") if isinstance(value, dict) else None
    return (isinstance(value, dict) and set(value) == {"head", "val_top1"} and isinstance(value["head"], str)
            and isinstance(top1, (int, float)) and not isinstance(top1, bool) and 0 <= top1 <= 100)


def previous_entries(out: Path) -> set[str]:
    """The names in ``out`` that belong to the run published there (by its run.json; none without one)."""
    record = read_run_record(out)
    return {MARKER, *(record["files"] if record else ())}


def refuse_foreign(out: Path, own_names: set[str]) -> None:
    """A UserError when ``out`` has no run.json but holds files of the names a run writes: the user's, not ours."""
    if (out / MARKER).exists():
        return
    found = sorted(name for name in own_names if (out / name).is_file() or (out / name).is_symlink())
    if found:
        raise UserError(f"{out} holds {', '.join(found)} but no {MARKER}: this tool did not make that folder, so it "
                        "will not replace them; pass another --out (or move those files away)")


def _replaces(out: Path, own_names: set[str]) -> dict[str, list[str] | None]:
    """What of ``out`` the previous run owns: {name: None (the whole entry) | [files] (a folder: only these)}.

    A run.json without per-folder lists (an older version) owns, in each of its folders, the files of own names.
    """
    record = read_run_record(out)
    if record is None:
        return {}
    contents = record.get("contents")
    owned = {}
    for name in record["files"]:
        folder = out / name
        if name == MARKER or not folder.is_dir() or folder.is_symlink():
            owned[name] = None
        elif contents is not None:
            owned[name] = list(contents.get(name, ()))
        else:
            owned[name] = sorted(p.name for p in folder.iterdir() if p.name in own_names and p.is_file())
    return owned


def check_clashes(out: Path, names, previous: set[str] | None = None) -> None:
    """A UserError when a name this run will publish is taken in ``out`` by something not of the run there
    (a folder of the user's named like a grid's combination): checked before anything is moved or removed."""
    previous = previous_entries(out) if previous is None else previous
    taken = [name for name in names if name not in previous and ((out / name).exists() or (out / name).is_symlink())]
    if taken:
        raise UserError(f"{out / taken[0]} is in the way: this run writes an entry of that name, and it is not part of "
                        f"the run in {out} (this tool did not write it); move it away or pass another --out")


def _remove_previous(out: Path, staging: Path, replaces: dict, files: list[str], contents: dict) -> None:
    """Remove what the previous run owns, except what this run already moved in (a publish resumed after a kill)."""
    for name, owned in sorted(replaces.items()):
        if name == MARKER:
            continue
        if owned is None:
            if not (name in files and not (staging / name).exists()):
                _remove(out / name)
            continue
        new = set(contents.get(name, ())) if name in files else set()
        for child in owned:
            # a file this run writes again is replaced by the move; a folder (a kNN run's k folder) cannot be, so it
            # goes first, unless this run's was moved in already (a publish resumed after a kill)
            target = out / name / child
            if child not in new or (target.is_dir() and not target.is_symlink() and (staging / name / child).exists()):
                _remove(target)
        folder = out / name
        left = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        if folder.is_dir() and not left and name not in files:
            folder.rmdir()
        elif left and not set(left) <= new:
            log.info("kept %s: it holds files this tool did not write (%s)", folder,
                     ", ".join(sorted(set(left) - new)))


def _move_in(out: Path, staging: Path, name: str) -> None:
    """Move ``staging/name`` to ``out/name``; a folder kept there (it holds the user's files) takes the files."""
    source, target = staging / name, out / name
    if source.is_dir() and target.is_dir() and not target.is_symlink():
        for child in sorted(source.iterdir()):
            os.replace(child, target / child.name)
        source.rmdir()
    else:
        os.replace(source, target)


def _read_manifest(path: Path) -> dict:
    """A staging folder's manifest, checked: a damaged one is one line, and nothing is moved."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({getattr(err, 'strerror', None) or err}); remove {path.parent}, "
                        "then rerun") from None
    replaces = manifest.get("replaces", []) if isinstance(manifest, dict) else None
    ok = (isinstance(manifest, dict) and _names(manifest.get("files")) and isinstance(manifest.get("run"), dict)
          and isinstance(manifest.get("contents", {}), dict)
          and all(k in manifest["files"] and _names(v) for k, v in manifest.get("contents", {}).items())
          and (_names(replaces) or isinstance(replaces, dict) and all(
              _is_name(k) and (v is None or _names(v)) for k, v in replaces.items())))
    if not ok:
        raise UserError(f"{path}: its fields 'files', 'contents', 'run' or 'replaces' are damaged; remove "
                        f"{path.parent}, then rerun")
    return manifest


def publish(out: Path, staging: Path) -> list[str]:
    """Move a finished staging folder's files into ``out``, replacing the previous run's; idempotent after a kill.

    An entry of the manifest that is no longer in ``staging`` was moved already (by this or a killed call).
    What the previous run owns was recorded in the manifest (``replaces``) before anything was removed.
    """
    manifest = _read_manifest(staging / READY)
    files, contents = list(manifest["files"]), dict(manifest.get("contents", {}))
    replaces = {name: None for name in previous_entries(out)}
    old = manifest.get("replaces", {})  # a list of names: a manifest of an older version (whole entries)
    replaces.update(old if isinstance(old, dict) else {name: None for name in old})
    check_clashes(out, [name for name in files if (staging / name).exists()], set(replaces))
    (out / MARKER).unlink(missing_ok=True)  # from here until the end, the folder does not claim a complete run
    _remove_previous(out, staging, replaces, files, contents)
    for name in files:
        if (staging / name).exists():
            _move_in(out, staging, name)
    sync_folder(out)
    _write_json(out / MARKER, {**manifest["run"], "files": sorted(files + [MARKER]), "contents": contents,
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

    def commit(self, run: dict, own_names: set[str]) -> list[str]:
        """Publish the staged files; ``run`` (plain values) is recorded in run.json, with every file of each
        staged folder. ``own_names``: what a run of this kind writes (an older run.json's folders are cleaned by them)."""
        files = sorted(p.name for p in self.path.iterdir() if p.name != READY)
        contents = {name: sorted(p.name for p in (self.path / name).iterdir())
                    for name in files if (self.path / name).is_dir()}
        _write_json(self.path / READY, {"files": files, "contents": contents, "run": run,
                                        "replaces": _replaces(self.out, own_names)})
        return publish(self.out, self.path)

    def publishing(self) -> bool:
        """The staged run is complete and (partly) moved into ``out``: left for the next run to finish."""
        return (self.path / READY).is_file()

    def __exit__(self, *exc) -> None:
        if self.path.exists() and not (self.path / READY).is_file():
            shutil.rmtree(self.path, ignore_errors=True)
