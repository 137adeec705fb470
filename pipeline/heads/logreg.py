"""Multinomial logistic regression trained to its optimum: full-batch L-BFGS with an L2 penalty.

The objective is the mean cross-entropy of ``x @ W.T + b`` plus ``weight_decay / 2 * ||W||^2`` (the bias is not
penalised; ``weight_decay`` means what SGD's does: it adds ``weight_decay * W`` to the gradient). It is
convex, so L-BFGS with a strong-Wolfe line search reaches its optimum in tens of iterations, each a couple
of full-batch passes: on 100,000 x 4096 rows one pass is two (N, D) x (D, C) matmuls. Several penalties
are solved strongest first, each warm-started from the previous optimum (pipeline.heads.solvers.path). This is
how CLIP's linear probes were trained (scikit-learn's L-BFGS), here in torch on the CPU or the GPU.

``fit`` is this head's entry point (pipeline.heads.interface), returned as a ``LogregResult``:

- ``--select train-split`` (the default): the path is solved on the fit rows and scored on the held-out train rows
  (pipeline.heads.selection); the chosen C is refit on every train row (weight_decay = 1 / (n_all C)) and val is
  scored once. ``--weight-decay sweep:45`` is the paper sweep: C = 10^linspace(-6, 5, 45), weight_decay =
  1 / (n C) for the n rows the path is solved on;
- ``--select val``: the path on every train row, each penalty scored on val, the best kept.

pipeline.heads.publish writes its files.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.common.config import LOGREG_WEIGHT_DECAY, HeadConfig, sweep_values
from pipeline.heads import readers
from pipeline.heads.interface import HeadResult, HeadSettings, Predictions
from pipeline.heads.readers import FeatureReader, InMemoryFeatures, StreamedFeatures
from pipeline.heads.selection import Selection, held_out
from pipeline.heads.solvers.path import PenaltyFit, PenaltyPath, fit_logreg, fit_logreg_streamed
from pipeline.heads.standardize import Standardizer

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LogregResult(HeadResult):
    """A logreg run: the penalty path (and the refit), and the head as best.pt holds it."""

    path: PenaltyPath  # every penalty's fit (path.csv), the refit, and the head's parameters on standardized features
    state: dict[str, torch.Tensor]  # the head on raw features (standardization folded): {"weight", "bias"}
    predictions: Predictions  # of the head on val
    streamed: bool  # the train features were read from disk on every pass
    selected_by: str  # "train-split" or "val"
    held_images: int = 0  # train-split: the held-out rows the C was chosen on
    sweep: tuple[float, ...] | None = None  # the C values of a --weight-decay sweep, as asked

    @property
    def chosen(self) -> PenaltyFit:
        """The penalty chosen on the selection set."""
        return self.path.fits[self.path.best]

    @property
    def best(self) -> PenaltyFit:
        """The fit the head is: the refit at the chosen C (train-split), else the chosen penalty."""
        return self.path.final


def penalties(config: HeadConfig, rows: int) -> tuple[float, ...]:
    """The weight decays of the path for ``rows`` train rows: --weight-decay's, or a sweep's 1 / (rows C)."""
    if config.is_sweep:
        return tuple(1.0 / (rows * c) for c in sweep_values(config.weight_decay))
    return config.weight_decays(LOGREG_WEIGHT_DECAY)


def _fit_in_memory(train: FeatureReader, val: FeatureReader, settings: HeadSettings, held: int, **path):
    """The path on features held in memory (the last ``held`` rows held out): (PenaltyPath, Standardizer, val top-1
    predictions, val labels)."""
    config, device = settings.config, settings.device
    train_x, train_y = train.load_float32(device, config.progress, extra_bytes=logits_bytes(train))
    dim = train_x.shape[1]
    standardizer = (Standardizer.fit(InMemoryFeatures(train_x, train_y), device) if config.standardize
                    else Standardizer.identity(dim, device))
    train_x.sub_(standardizer.mean).mul_(standardizer.inv_std)  # in place: one copy of the features
    val_x, val_y = val.load_float32(device, config.progress)
    val_x.sub_(standardizer.mean).mul_(standardizer.inv_std)
    fitted = fit_logreg(train_x, train_y, val_x, val_y, held=held, overwrite=True, **path)  # dead columns squeezed
    with torch.no_grad():
        predictions = torch.addmm(fitted.bias, val_x, fitted.weight.T).argmax(1)
    return fitted, standardizer, predictions, val_y


def _fit_streamed(train: FeatureReader, val: FeatureReader, settings: HeadSettings, selection: Selection | None, **path):
    """The path over chunks read from disk on every pass (one pass per L-BFGS evaluation): (PenaltyPath,
    Standardizer, val top-1 predictions, val labels). Memory: one chunk, the parameters and the L-BFGS history
    (and the held-out rows, kept)."""
    config, device = settings.config, settings.device
    dim = train.split.feature_dim
    source = (train.source(device, True, config.progress) if train.rows is not None  # few-shot: small, in memory
              else StreamedFeatures(train.split, block_rows=readers.STREAM_ROWS))
    standardizer = Standardizer.fit(source, device) if config.standardize else Standardizer.identity(dim, device)
    train_chunks, val_chunks = train.chunks(device, transform=standardizer), val.chunks(device, transform=standardizer)
    held = selection and (train.part(selection.fit).chunks(device, transform=standardizer),
                          train.part(selection.held).chunks(device, transform=standardizer), train.num_rows)
    fitted = fit_logreg_streamed(train_chunks, val_chunks, dim=dim, device=device, held=held, **path)
    with torch.no_grad():
        predictions = torch.cat([torch.addmm(fitted.bias, x, fitted.weight.T).argmax(1) for x, _ in val_chunks()])
    return fitted, standardizer, predictions, torch.from_numpy(val.labels)


def logits_bytes(train: FeatureReader) -> int:
    """The in-memory solve's (N, C) float32 buffers beside the features."""
    return 4 * train.num_rows * len(train.split.wnids) * 4


def fit(train: FeatureReader, val: FeatureReader, settings: HeadSettings) -> LogregResult:
    """Standardize, solve the penalty path, choose on the held-out rows and refit (or choose on val).

    In memory when the features fit, else (or with --stream) streamed from the cache: the same path.
    """
    start = time.perf_counter()
    config, device = settings.config, settings.device
    num_classes, dim = len(train.split.wnids), train.split.feature_dim
    selection = (held_out(train.paths, train.labels, config.select_fraction, train.split.wnids)
                 if config.select_for("logreg") == "train-split" else None)
    held = 0 if selection is None else len(selection.held)
    streamed = bool(config.stream) or not train.fits_float32(device, logits_bytes(train))
    if streamed and not config.stream:
        log.info("logreg: %s (%d rows, %.1f GiB as float32) does not fit in memory: streaming it, one pass per "
                 "L-BFGS evaluation", train.split.path, train.num_rows, train.float32_bytes() / 2**30)
    path = dict(num_classes=num_classes, weight_decays=penalties(config, train.num_rows - held),
                max_iter=config.max_iter, progress=config.progress)
    if streamed:
        fitted, standardizer, predictions, val_y = _fit_streamed(train, val, settings, selection, **path)
    else:  # the fit rows first, the held-out rows last: one tensor serves the path and the refit
        ordered = train if selection is None else train.part(selection.order)
        fitted, standardizer, predictions, val_y = _fit_in_memory(ordered, val, settings, held, **path)
    final = fitted.final
    head = nn.Linear(dim, num_classes).to(device)
    with torch.no_grad():
        head.weight.copy_(fitted.weight)
        head.bias.copy_(fitted.bias)
    return LogregResult(path=fitted, state=standardizer.fold_into(head), streamed=streamed,
                        predictions=Predictions.of(predictions.cpu().numpy(), val_y.cpu().numpy(), final.val_top1,
                                                   final.val_top5),
                        selected_by="val" if selection is None else "train-split", held_images=held,
                        sweep=sweep_values(config.weight_decay) if config.is_sweep else None,
                        train_images=train.num_rows, seconds=time.perf_counter() - start)
