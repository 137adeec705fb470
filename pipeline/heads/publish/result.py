"""A fit's result.json (pipeline.heads.store holds its format and its one reader): what every head's writer records.

The cache identity and the settings come from pipeline.heads.plan, the functions ``--skip-existing`` compares with,
so what is written is what a rerun looks for.
"""
from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

from pipeline.common.names import VERSION
from pipeline.heads.plan import cache_identity, head_settings
from pipeline.heads.publish.files import writing
from pipeline.heads.publish.place import Place
from pipeline.heads.store import RESULT, RESULT_FORMAT, write_result


def finite(value: float | None) -> float | None:
    """A number JSON can hold: None for inf or NaN (a C of an unpenalised fit)."""
    return None if value is None or not math.isfinite(value) else value


def result_record(place: Place, *, selected_by: str, chosen: bool, hyper_parameters: str, top1: float, top5: float,
                  mean_per_class: float, train_images: int, seconds: float, checkpoint: bool, held_images: int = 0,
                  **fields) -> dict:
    """The record of one fit evaluated on val (``fields``: the head's own, such as its k or its chosen C)."""
    settings = place.settings
    config = settings.config
    return {"format": RESULT_FORMAT, "version": VERSION,
            "cache": cache_identity(Path(config.features), settings.layer, place.train.attrs, place.val.attrs),
            "source": place.source, "head": settings.name, "settings": head_settings(config, settings.name, settings.shots),
            "shots": settings.shots, "selected_by": selected_by,
            "select_fraction": config.select_fraction if selected_by == "train-split" else None,
            "held_out_images": held_images if selected_by == "train-split" else None, "chosen": chosen,
            "hyper_parameters": hyper_parameters, **{name: finite(value) if isinstance(value, float) else value
                                                     for name, value in fields.items()},
            "top1": top1, "top5": top5, "mean_per_class": mean_per_class, "val_images": place.val.num_rows,
            "train_images": train_images, "seconds": round(seconds, 3), "checkpoint": "best.pt" if checkpoint else None,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def publish_result(place: Place, folder: Path, record: dict) -> None:
    """``folder``/result.json (the folder made first), whole."""
    with writing(place.stage, folder / RESULT):
        folder.mkdir(parents=True, exist_ok=True)
        write_result(folder / RESULT, record)
