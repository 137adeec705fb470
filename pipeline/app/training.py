"""Training from the page: the incremental extraction, then the head, in this process (torch is imported once).

The stages run as the commands run them (pipeline.commands.run_extract, then pipeline.commands.train_head), on
what is on disk: ``DIR/images`` -> ``DIR/features`` -> ``DIR/heads/<head>``. Both are kill-safe on their own:
the cache is written in resumable shards (a killed extraction resumes from its finished shards) and a head run
is staged and published whole (a killed one leaves the last finished run as it was). So a kill of the server
loses no image and no finished run, and the next training picks up where it stopped.

One training at a time: a second request while one runs gets the running one's state. Progress is read from the
head's per-epoch log records (the stage's own ``on_epoch`` logger), and Cancel is answered at the next one of
them (a head's epoch, or the end of the extraction), so a cancelled run is never published.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.common.config import ExtractConfig, HeadConfig
from pipeline.common.errors import UserError

log = logging.getLogger(__name__)

HEADS = ("linear", "logreg")  # what the page offers (run_train_head.py --head; linear the default): the heads that
# save a checkpoint, which the live classifier and the export read (knn saves none)
EXTRACT_SHARE = 0.5  # the progress bar's share of the extraction (the head's epochs fill the rest)


class Cancelled(Exception):
    """Raised inside the training thread at the next progress point after Cancel."""


@dataclass
class Options:
    """The settings a training uses: the server's backbone flags, and overrides of the stages' defaults (tests use
    small inputs and few epochs; the page uses today's defaults)."""

    backbone: str = "alexnet"
    weights: str = "pretrained"
    seed: int = 0
    extract: dict = field(default_factory=dict)  # ExtractConfig fields
    head: dict = field(default_factory=dict)  # HeadConfig fields


def head_dir(root: Path, head: str) -> Path:
    return Path(root) / "heads" / head


class EpochWatch(logging.Handler):
    """Reads the head's per-epoch log records (pipeline.heads.linear's, whose ``head_epoch`` attribute carries the
    epoch's facts as data) into the trainer's curves, and raises Cancelled there once Cancel was pressed."""

    def __init__(self, trainer: "Trainer"):
        super().__init__(logging.INFO)
        self.trainer = trainer

    def emit(self, record: logging.LogRecord) -> None:
        facts = getattr(record, "head_epoch", None)  # the epoch's facts as data, whatever the message's wording
        if isinstance(facts, dict):
            scored = facts.get("scored_on")
            self.trainer.on_epoch({"run": str(facts["run"]), "epoch": int(facts["epoch"]),
                                   "epochs": int(facts["epochs"]), "train_loss": float(facts["train_loss"]),
                                   "train_acc": float(facts["train_acc"]), "scored_on": scored,
                                   "score_loss": scored and float(facts[f"{scored}_loss"]),
                                   "score_acc": scored and float(facts[f"{scored}_top1"])})
            self.trainer.check_cancel()  # between epochs only: never inside the run's publishing


class Trainer:
    """The one training of a project folder: started in a thread, watched by any number of pages."""

    def __init__(self, root: Path, options: Options, on_done=None):
        self.root, self.options = Path(root), options
        self.on_done = on_done  # called in a thread of its own after a finished run (the live model warms up)
        self.lock = threading.Lock()
        self.cancel_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.version = 0
        self.status: dict = {"state": "idle", "phase": None, "progress": 0.0, "epochs": [], "message": "",
                             "error": None, "head": None, "seconds": None, "run": 0}

    # state, as every page sees it

    def snapshot(self) -> dict:
        with self.lock:
            return {**self.status, "epochs": list(self.status["epochs"]), "version": self.version}

    def _update(self, **changes) -> None:
        with self.lock:
            self.status.update(changes)
            self.version += 1

    def on_epoch(self, record: dict) -> None:
        with self.lock:
            self.status["epochs"].append(record)
            done = record["epoch"] / max(1, record["epochs"])
            self.status["progress"] = EXTRACT_SHARE + (1 - EXTRACT_SHARE) * done
            self.status["message"] = f"training the {self.status['head']} head: epoch {record['epoch']}/{record['epochs']}"
            self.version += 1

    def check_cancel(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled()

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    # control

    def start(self, head: str = "linear", epochs: int | None = None) -> tuple[bool, dict]:
        """(started, state): a new training, or (False, the running one's state) while one runs."""
        if head not in HEADS:
            raise UserError(f"head {head!r}: use one of {', '.join(HEADS)}")
        if epochs is not None and not 1 <= epochs <= 1000:
            raise UserError(f"epochs must be 1 to 1000, got {epochs}")
        with self.lock:
            if self.thread is not None and self.thread.is_alive():
                return False, {**self.status, "version": self.version}
            self.cancel_event.clear()
            self.status = {"state": "running", "phase": "extracting", "progress": 0.0, "epochs": [],
                           "message": "extracting features of new images (the cache keeps the others)", "error": None,
                           "head": head, "seconds": None, "run": self.status["run"] + 1}
            self.version += 1
            self.thread = threading.Thread(target=self._run, args=(head, epochs), name="app-training", daemon=True)
            self.thread.start()
            return True, {**self.status, "version": self.version}

    def cancel(self) -> bool:
        """Ask the running training to stop; False when none runs."""
        if not self.running():
            return False
        self.cancel_event.set()
        self._update(message="cancelling at the next step")
        return True

    def wait(self, timeout: float | None = None) -> dict:
        thread = self.thread
        if thread is not None:
            thread.join(timeout)
        return self.snapshot()

    # the thread

    def _run(self, head: str, epochs: int | None) -> None:
        started = time.perf_counter()
        watch, watched = EpochWatch(self), logging.getLogger("pipeline.heads")
        level = watched.level
        watched.addHandler(watch)
        if not watched.isEnabledFor(logging.INFO):
            watched.setLevel(logging.INFO)  # the epoch records must be made to be read
        try:
            self._stages(head, epochs)
            self._update(state="done", phase=None, progress=1.0, message=f"trained the {head} head",
                         seconds=round(time.perf_counter() - started, 2))
            if self.on_done is not None:  # not in this thread: a Train pressed now starts at once
                threading.Thread(target=self.on_done, name="app-live-warm", daemon=True).start()
        except Cancelled:
            self._update(state="cancelled", phase=None, message="cancelled: the last finished head is kept",
                         seconds=round(time.perf_counter() - started, 2))
        except UserError as err:
            self._update(state="failed", phase=None, error=str(err), message=str(err))
        except Exception as err:  # noqa: BLE001  the page shows it; the log has the traceback
            log.exception("training failed")
            self._update(state="failed", phase=None, error=f"{type(err).__name__}: {err}", message=str(err))
        finally:
            watched.removeHandler(watch)
            watched.setLevel(level)

    def _stages(self, head: str, epochs: int | None) -> None:
        from pipeline import commands

        options = self.options
        extract = ExtractConfig(data=str(self.root / "images"), out=self.root / "features", backbone=options.backbone,
                                weights=options.weights, seed=options.seed, progress=False,
                                **options.extract)
        commands.run_extract(extract)
        self.check_cancel()
        self._update(phase="training", progress=EXTRACT_SHARE, message=f"training the {head} head")
        overrides = dict(options.head)
        if epochs is not None:
            overrides["epochs"] = epochs
        config = HeadConfig(features=self.root / "features", out=head_dir(self.root, head), head=(head,),
                            progress=False, **overrides)
        commands.train_head(config)
