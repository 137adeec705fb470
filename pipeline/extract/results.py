"""What extraction reports: per split, and for the whole run."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.extract.freshness import log_up_to_date

log = logging.getLogger(__name__)


@dataclass
class SplitResult:
    """What extraction did for one split."""

    split: str
    file: Path
    rows: int  # rows in the finished file (on ranks other than 0: images this rank processed)
    skipped: list[dict] = field(default_factory=list)  # [{"path", "reason"}]
    up_to_date: bool = False  # the file was already complete with these settings: nothing was done
    assembled: bool = True  # this process wrote the file (under torchrun only rank 0 does)
    seconds: float | None = None
    images_per_s: float | None = None  # None: no image was computed by this run (all resumed)
    computed: int | None = None  # images this run computed (the rest came from an interrupted run's shards)
    reused: int | None = None  # an incremental update: rows taken from the file it updated (else None)
    dropped: int | None = None  # an incremental update: rows of that file whose image is gone or changed
    extracted: int | None = None  # an incremental update: images it passes through the backbone (this run or resumed)

    def log(self) -> None:
        if self.up_to_date:
            log_up_to_date(self.file, {"split": self.split, "num_rows": self.rows})
            return
        if not self.assembled:
            return
        size = self.file.stat().st_size / 2**20
        if self.reused is not None:  # an update: what was kept, read and dropped; the speed of what was read
            log.info("%s: updated, %d rows -> %s (%.1f MiB): reused %d, %s, dropped %d; %d skipped", self.split,
                     self.rows, self.file, size, self.reused, self._extracted(), self.dropped or 0, len(self.skipped))
        elif self.computed == 0:  # every shard was left by an interrupted run: no speed to report
            log.info("%s: %d images, all computed by an earlier, interrupted run; %d skipped -> %s (%.1f MiB)",
                     self.split, self.rows, len(self.skipped), self.file, size)
        else:
            log.info("%s: %d images in %.1f s (%.1f img/s), %d skipped -> %s (%.1f MiB)", self.split, self.rows,
                     self.seconds or 0, self.images_per_s or 0, len(self.skipped), self.file, size)
        for item in self.skipped:
            log.info("  skipped %s: %s", item["path"], item["reason"])

    def _extracted(self) -> str:
        """An update's extracted images in words: none, or how many, how fast, and how many a killed run did."""
        planned, now = self.extracted or 0, self.computed or 0
        if planned == 0:
            return "extracted none (no image needed the backbone)"
        speed = f"in {self.seconds or 0:.1f} s ({self.images_per_s or 0:.1f} img/s)" if now else ""
        if now >= planned:
            return f"extracted {planned} {speed}"
        earlier = f"{planned - now} of them by an earlier, interrupted run"
        return f"extracted {planned} ({earlier}; {now} now {speed})" if now else f"extracted {planned} ({earlier})"


@dataclass
class ExtractResult:
    """What one run of stage one did, split by split."""

    out: Path
    dataset: Path
    weights_spec: str
    weights_fingerprint: str
    device: str
    batch_size: int
    world_size: int
    splits: dict[str, SplitResult] = field(default_factory=dict)
