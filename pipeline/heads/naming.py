"""How a run names its folders: one function from a head's settings to its folder name.

Distinct settings give distinct names: a number is written as ``:g`` writes it when that reads back as the
same float (``0.001``, ``1e-05``, ``0``), else in full (``0.0010000001``), so two values never share a folder.
"""
from __future__ import annotations

from pipeline.backbones.catalog import safe_name


def number(value: float) -> str:
    """The shortest text of ``value`` that reads back as exactly ``value``, in ``:g`` style where that is exact."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def shots_name(shots: int | None) -> str:
    """How a run folder and the table name a shot count: '5shot', or 'all'."""
    return "all" if shots is None else f"{shots}shot"


def folder_name(*, layer: str | None = None, head: str | None = None, shots: int | None = None,
                lr: float | None = None, weight_decay: float | None = None) -> str:
    """A combination folder (``fc7_knn_all``), a sweep's head folder (``lr0.001_wd0``), or both joined
    (``fc7_linear_all_lr0.001_wd0``): the layer, head and shots of a grid, then a linear head's lr and weight decay."""
    parts = [] if layer is None else [layer, head, shots_name(shots)]
    if lr is not None:
        parts.append(f"lr{number(lr)}_wd{number(weight_decay)}")
    return "_".join(parts)


def combination_folder(source: str | None, layer: str | None, head: str | None, shots: int | None, *,
                       lr: float | None = None, weight_decay: float | None = None) -> str:
    """A combination's folder in a grid (``fc7_knn_all``; with several caches it starts with the cache's label,
    ``resnet18_penultimate_linear_all``), or with no layer a sweep's head folder (``lr0.001_wd0``)."""
    name = folder_name(layer=layer, head=head, shots=shots, lr=lr, weight_decay=weight_decay)
    # a backbone as one folder name ('open_clip:ViT-B-32/laion2b_s34b_b79k' holds a slash)
    return name if source is None else f"{safe_name(source)}_{name}"
