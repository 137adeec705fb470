"""One row of the grid's table (experiments.csv): a trained head, or one k of a kNN run."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.heads.naming import shots_name

COLUMNS = ["dataset", "backbone", "layer", "head", "hyper_parameters", "selected_by", "shots", "val_top1", "val_top5",
           "train_images", "seconds", "folder"]


@dataclass(frozen=True)
class Experiment:
    """One row of the table: a trained head (linear, logreg) or one k of a kNN run."""

    layer: str
    head: str
    params: str  # the hyper-parameters, as a person reads them
    shots: str  # "5shot" or "all"
    val_top1: float  # %
    val_top5: float
    train_images: int
    seconds: float  # wall time of the run, loading the features included (a kNN run's k share one)
    folder: Path
    checkpoint: Path | None  # best.pt (linear, logreg); None for knn
    backbone: str = ""  # the cache's backbone (set by the grid, which may compare several)
    dataset: str = ""  # the cache's dataset (a grid may hold caches of several)
    selected_by: str = "val"  # which set chose the hyper-parameters: "train-split", "val" or "none"

    @classmethod
    def from_result(cls, record: dict, folder: Path, backbone: str) -> "Experiment":
        """The row of a fit kept from an earlier run, from its result.json (pipeline.heads.store)."""
        return cls(layer=record["cache"]["layer"], head=record["head"], params=record["hyper_parameters"],
                   shots=shots_name(record["shots"]), val_top1=record["top1"], val_top5=record["top5"],
                   train_images=record["train_images"], seconds=record["seconds"], folder=folder,
                   checkpoint=folder / "best.pt" if record["checkpoint"] else None, backbone=backbone,
                   dataset=record["cache"]["dataset"], selected_by=record["selected_by"])

    def record(self, out: Path) -> dict:
        """The row as experiments.csv holds it (``COLUMNS``), its folder relative to ``out``."""
        return {"dataset": self.dataset, "backbone": self.backbone, "layer": self.layer, "head": self.head,
                "hyper_parameters": self.params, "selected_by": self.selected_by, "shots": self.shots,
                "val_top1": round(self.val_top1, 4), "val_top5": round(self.val_top5, 4),
                "train_images": self.train_images, "seconds": round(self.seconds, 2),
                "folder": os.path.relpath(self.folder, out)}
