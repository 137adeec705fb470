"""Multinomial logistic regression trained to its optimum: full-batch L-BFGS with an L2 penalty.

The objective is the mean cross-entropy of ``x @ W.T + b`` plus ``weight_decay / 2 * ||W||^2`` (the bias is
not penalised; ``weight_decay`` means what SGD's does: it adds ``weight_decay * W`` to the gradient). It is
convex, so L-BFGS with a strong-Wolfe line search reaches its optimum in tens of iterations, each a couple
of full-batch passes: on 100,000 x 4096 rows one pass is two (N, D) x (D, C) matmuls. Several penalties
are solved strongest first, each warm-started from the previous optimum (a weaker penalty's optimum lies
near a stronger one's), and the caller keeps the best by val top-1. This is how CLIP's linear probes were
trained (scikit-learn's L-BFGS), here in torch on the CPU or the GPU.

``fit`` is this head's entry point (pipeline.heads.interface): one solve of the --weight-decay path, the best
kept, returned as a ``LogregResult``; pipeline.heads.publish writes its files.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.common.config import LOGREG_MAX_ITER, LOGREG_WEIGHT_DECAY
from pipeline.common.errors import UserError
from pipeline.heads import readers
from pipeline.heads.interface import HeadResult, HeadSettings, Predictions
from pipeline.heads.readers import FeatureReader, InMemoryFeatures, StreamedFeatures
from pipeline.heads.standardize import Standardizer
from pipeline.heads.solvers.lbfgs import Solved, minimize_lbfgs
from pipeline.heads.solvers.softmax import Chunks, InMemorySoftmax, StreamedSoftmax, chunked_loss_and_grad, split_theta, threads

log = logging.getLogger(__name__)

SCORE_ROWS = 16384  # rows per block when scoring, so the (rows, C) logits stay small
# Converged: the gradient bounds the objective's gap to the optimum, |g|^2 / (2 weight_decay), below
# TOLERANCE_GAP x the objective (100x inside the 1e-4 the head promises), or, whatever the penalty (0 too),
# every |gradient| entry is below TOLERANCE_GRAD. See benchmarks/bench_logreg.py and docs/heads.md.
TOLERANCE_GAP = 1e-6
TOLERANCE_GRAD = 1e-6
MAX_ITER = LOGREG_MAX_ITER  # the guard: iterations per penalty; a solve that hits it says so (PenaltyFit.stopped)


@dataclass(frozen=True)
class PenaltyFit:
    """The optimum for one L2 penalty and how good it is (losses are mean cross-entropy, accuracies in %):
    one row of path.csv, its fields its columns."""

    weight_decay: float
    iterations: int  # L-BFGS iterations
    evaluations: int  # full-batch passes (each two (N, D) x (D, C) matmuls; line-search trials are free in memory)
    objective: float  # train cross-entropy + penalty: what was minimised
    grad_max: float  # largest |gradient| entry at the end: 0 at the exact optimum
    train_loss: float
    train_acc: float
    val_loss: float
    val_top1: float
    val_top5: float
    seconds: float
    stopped: str = "converged"  # or "iteration budget", "time budget", "no progress": not at the optimum


@dataclass(frozen=True)
class PenaltyPath:
    """The solver's answer: every penalty's fit, and the parameters of the best."""

    fits: tuple[PenaltyFit, ...]  # one per penalty, in the order solved (strongest first)
    best: int  # index into fits: the best val top-1 (the first of equals: the stronger penalty)
    weight: torch.Tensor  # (C, D) of the best fit, on standardized features
    bias: torch.Tensor  # (C,)


def row_blocks(x: torch.Tensor, y: torch.Tensor, rows: int = SCORE_ROWS) -> Chunks:
    """A chunk factory over in-memory tensors: (x, y) blocks of ``rows`` rows (views, no copies)."""
    return lambda: ((x[start:start + rows], y[start:start + rows]) for start in range(0, len(y), rows))


def objective(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              weight_decay: float) -> torch.Tensor:
    """Mean cross-entropy of the linear model plus the L2 penalty on its weight."""
    logits = torch.addmm(bias, x, weight.T)  # (N, C)
    return F.cross_entropy(logits, y) + 0.5 * weight_decay * weight.square().sum()


@torch.no_grad()
def score_chunks(chunks, weight: torch.Tensor, bias: torch.Tensor) -> dict:
    """Mean cross-entropy, top-1 and top-5 (in %) of the linear model over (x, y) chunks."""
    loss = top1 = top5 = 0.0
    n = 0
    for x, labels in chunks:
        logits = torch.addmm(bias, x, weight.T)  # (B, C)
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        top1 += (ranked[:, 0] == labels).sum().item()
        top5 += (ranked == labels[:, None]).any(1).sum().item()
        n += len(labels)
    n = max(n, 1)
    return {"loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def score(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> dict:
    """Mean cross-entropy, top-1 and top-5 (in %) of the linear model on (x, y), in row blocks."""
    return score_chunks(row_blocks(x, y)(), weight, bias)


@torch.no_grad()
def solve(problem, weight: torch.Tensor, bias: torch.Tensor, *, max_iter: int = MAX_ITER,
          tolerance_grad: float = TOLERANCE_GRAD, tolerance_gap: float = TOLERANCE_GAP,
          max_seconds: float | None = None, progress: bool = False) -> Solved:
    """Run L-BFGS on ``problem`` (InMemorySoftmax or StreamedSoftmax) from (weight, bias), updated in place."""
    theta = torch.cat([weight.detach().flatten(), bias.detach()]).float()
    bar = tqdm(desc=f"L-BFGS wd={problem.weight_decay:g}", unit="it", leave=False, disable=not progress)
    try:
        with threads(1 if getattr(problem, "small", False) else torch.get_num_threads()):
            solved = minimize_lbfgs(problem, theta, max_iter=max_iter, tolerance_grad=tolerance_grad,
                                    tolerance_gap=tolerance_gap, convexity=problem.weight_decay,
                                    max_seconds=max_seconds, on_iteration=bar.update)
    finally:
        bar.close()
    new_weight, new_bias = split_theta(theta, len(bias))
    weight.copy_(new_weight)
    bias.copy_(new_bias)
    return solved


def train_state_chunks(chunks, weight: torch.Tensor, bias: torch.Tensor, weight_decay: float) -> dict:
    """At (weight, bias): the objective, the train cross-entropy and top-1 (%), and the largest |gradient|
    entry (0 at the exact optimum), from one pass over the chunks."""
    result = chunked_loss_and_grad(chunks, weight, bias, weight_decay)
    return {"objective": result.objective, "loss": result.loss, "acc": 100.0 * result.correct / max(result.rows, 1),
            "grad_max": max(result.grad_weight.abs().max().item(), result.grad_bias.abs().max().item())}


def train_state(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                weight_decay: float) -> dict:
    """At (weight, bias): the objective, the train cross-entropy and top-1 (%), and the largest |gradient|
    entry (0 at the exact optimum), from one full-batch pass."""
    return train_state_chunks([(x, y)], weight, bias, weight_decay)


def live_columns(x: torch.Tensor, rows: int = SCORE_ROWS) -> torch.Tensor | None:
    """Indices of the columns of ``x`` that are nonzero in some row, or None when all are.

    A column that is zero in every train row (a dead unit, standardized) gets weight 0 at every optimum:
    its gradient is weight_decay x its weight, 0 from the zero start. So the solve can leave it out.
    """
    live = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
    for start in range(0, len(x), rows):
        live |= x[start:start + rows].any(0)  # nonzero anywhere (no (rows, D) bool temporary)
    return None if bool(live.all()) else live.nonzero()[:, 0]


def keep_columns(x: torch.Tensor, columns: torch.Tensor, *, overwrite: bool, rows: int = SCORE_ROWS) -> torch.Tensor:
    """``x[:, columns]``: a copy, or with ``overwrite`` written over x's first columns in row blocks and
    returned as a view with x's row stride (no second copy of the features; matmuls read it in place)."""
    if not overwrite:
        return x[:, columns]
    for start in range(0, len(x), rows):
        block = x[start:start + rows]
        block[:, :len(columns)] = block[:, columns]  # the right side is gathered first
    return x[:, :len(columns)]


def fit_logreg(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, *,
               num_classes: int, weight_decays: tuple[float, ...], max_iter: int = MAX_ITER, progress: bool = False,
               tolerance_grad: float = TOLERANCE_GRAD, max_seconds: float | None = None,
               overwrite: bool = False) -> PenaltyPath:
    """Solve for each penalty, strongest first, warm-starting each from the previous optimum.

    ``train_x``/``val_x``: (N, D) / (M, D) float32 standardized features on one device. The start is zero,
    so results depend on nothing random.
    ``max_iter`` / ``max_seconds``: the budget per penalty; a solve that runs out says so.
    Columns zero in every train row are left out of the solve (their weight is 0); ``overwrite``: train_x
    is the caller's to give up, and those columns are squeezed out in place instead of copied.
    """
    dim, live = train_x.shape[1], live_columns(train_x)
    val_chunks = row_blocks(val_x, val_y)
    if live is not None:
        log.info("logreg: %d of %d feature columns are 0 in every train row (dead units): solving on the other %d",
                 dim - len(live), dim, len(live))
        train_x = keep_columns(train_x, live, overwrite=overwrite)
        val_chunks = (lambda blocks: lambda: ((x[:, live], y) for x, y in blocks()))(val_chunks)
    result = fit_path(lambda wd: InMemorySoftmax(train_x, train_y, num_classes, wd), row_blocks(train_x, train_y),
                      val_chunks, num_classes=num_classes, dim=train_x.shape[1], device=train_x.device,
                      weight_decays=weight_decays, max_iter=max_iter, tolerance_grad=tolerance_grad,
                      max_seconds=max_seconds, progress=progress)
    if live is not None:
        weight = torch.zeros(num_classes, dim, device=result.weight.device)
        weight[:, live] = result.weight
        result = replace(result, weight=weight)
    return result


def fit_logreg_streamed(train_chunks: Chunks, val_chunks: Chunks, *, num_classes: int, dim: int,
                        weight_decays: tuple[float, ...], max_iter: int = MAX_ITER, device=None,
                        progress: bool = False, tolerance_grad: float = TOLERANCE_GRAD,
                        max_seconds: float | None = None) -> PenaltyPath:
    """``fit_logreg`` over row chunks: each L-BFGS trial step is one pass over ``train_chunks()``.

    The chunk factories yield (x (B, D) float32 standardized, y (B,)) on ``device``, in the same rows each pass.
    """
    return fit_path(lambda wd: StreamedSoftmax(train_chunks, num_classes, wd), train_chunks, val_chunks,
                    num_classes=num_classes, dim=dim, device=device or torch.device("cpu"),
                    weight_decays=weight_decays, max_iter=max_iter, tolerance_grad=tolerance_grad,
                    max_seconds=max_seconds, progress=progress)


def fit_path(problem_for, train_chunks: Chunks, val_chunks: Chunks, *, num_classes: int, dim: int, device,
             weight_decays: tuple[float, ...], max_iter: int, tolerance_grad: float, max_seconds: float | None,
             progress: bool) -> PenaltyPath:
    """The penalty path over a problem factory (weight_decay -> InMemorySoftmax or StreamedSoftmax)."""
    weight = torch.zeros(num_classes, dim, device=device)  # (C, D)
    bias = torch.zeros(num_classes, device=device)
    fits, best, best_state = [], 0, None
    for weight_decay in sorted(set(weight_decays), reverse=True):
        start = time.perf_counter()
        solved = solve(problem_for(weight_decay), weight, bias, max_iter=max_iter, tolerance_grad=tolerance_grad,
                       max_seconds=max_seconds, progress=progress)
        train = train_state_chunks(train_chunks(), weight, bias, weight_decay)
        if not all(math.isfinite(train[key]) for key in ("objective", "grad_max")):
            raise UserError(f"logistic regression diverged at weight decay {weight_decay:g} (the objective is "
                            f"{train['objective']}); check the features for inf or NaN values")
        val = score_chunks(val_chunks(), weight, bias)
        fit = PenaltyFit(weight_decay=weight_decay, iterations=solved.iterations, evaluations=solved.evaluations,
                         objective=train["objective"], grad_max=train["grad_max"], train_loss=train["loss"],
                         train_acc=train["acc"], val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"],
                         seconds=round(time.perf_counter() - start, 3), stopped=solved.stopped)
        fits.append(fit)
        if best_state is None or fit.val_top1 > fits[best].val_top1:
            best, best_state = len(fits) - 1, (weight.clone(), bias.clone())
        log.info("logreg wd=%-8g %3d iterations %3d evaluations  objective %.5f (max |grad| %.1e)  train acc %5.2f%%  "
                 "val top1 %5.2f%% top5 %5.2f%%  %.1fs", weight_decay, fit.iterations, fit.evaluations, fit.objective,
                 fit.grad_max, fit.train_acc, fit.val_top1, fit.val_top5, fit.seconds)
        if solved.stopped != "converged":
            log.warning("logreg wd=%g stopped on its %s after %d iterations (%.0fs) with max |grad| %.1e above the "
                        "tolerance %.0e: its objective may be above the optimum; raise --max-iter", weight_decay,
                        solved.stopped, solved.iterations, solved.seconds, fit.grad_max, tolerance_grad)
    return PenaltyPath(fits=tuple(fits), best=best, weight=best_state[0], bias=best_state[1])


# ---------------------------------------------------------------------------------------------
# The head's entry point


@dataclass(frozen=True, kw_only=True)
class LogregResult(HeadResult):
    """A logreg run: the penalty path, and its best head as best.pt holds it."""

    path: PenaltyPath  # every penalty's fit (path.csv), and the best's parameters on standardized features
    state: dict[str, torch.Tensor]  # the best head on raw features (standardization folded): {"weight", "bias"}
    predictions: Predictions  # of the best head on val
    streamed: bool  # the train features were read from disk on every pass

    @property
    def best(self) -> PenaltyFit:
        return self.path.fits[self.path.best]


def _fit_in_memory(train: FeatureReader, val: FeatureReader, settings: HeadSettings, **path):
    """The path on features held in memory: (PenaltyPath, Standardizer, val top-1 predictions)."""
    config, device = settings.config, settings.device
    train_x, train_y = train.load_float32(device, config.progress, extra_bytes=logits_bytes(train))
    dim = train_x.shape[1]
    standardizer = (Standardizer.fit(InMemoryFeatures(train_x, train_y), device) if config.standardize
                    else Standardizer.identity(dim, device))
    train_x.sub_(standardizer.mean).mul_(standardizer.inv_std)  # in place: one copy of the features
    val_x, val_y = val.load_float32(device, config.progress)
    val_x.sub_(standardizer.mean).mul_(standardizer.inv_std)
    fitted = fit_logreg(train_x, train_y, val_x, val_y, overwrite=True, **path)  # dead columns squeezed in place
    with torch.no_grad():
        predictions = torch.addmm(fitted.bias, val_x, fitted.weight.T).argmax(1)
    return fitted, standardizer, predictions


def _fit_streamed(train: FeatureReader, val: FeatureReader, settings: HeadSettings, **path):
    """The path over chunks read from disk on every pass (one pass per L-BFGS evaluation): (PenaltyPath,
    Standardizer, val top-1 predictions). Memory: one chunk, the parameters and the L-BFGS history."""
    config, device = settings.config, settings.device
    dim = train.split.feature_dim
    source = (train.source(device, True, config.progress) if train.rows is not None  # few-shot: small, in memory
              else StreamedFeatures(train.split, block_rows=readers.STREAM_ROWS))
    standardizer = Standardizer.fit(source, device) if config.standardize else Standardizer.identity(dim, device)
    train_chunks, val_chunks = train.chunks(device, transform=standardizer), val.chunks(device, transform=standardizer)
    fitted = fit_logreg_streamed(train_chunks, val_chunks, dim=dim, device=device, **path)
    with torch.no_grad():
        predictions = torch.cat([torch.addmm(fitted.bias, x, fitted.weight.T).argmax(1) for x, _ in val_chunks()])
    return fitted, standardizer, predictions


def logits_bytes(train: FeatureReader) -> int:
    """The in-memory solve's (N, C) float32 buffers beside the features."""
    return 4 * train.num_rows * len(train.split.wnids) * 4


def fit(train: FeatureReader, val: FeatureReader, settings: HeadSettings) -> LogregResult:
    """Standardize, solve the penalty path, keep the best by val top-1.

    In memory when the features fit, else (or with --stream) streamed from the cache: the same path.
    """
    start = time.perf_counter()
    config, device = settings.config, settings.device
    num_classes, dim = len(train.split.wnids), train.split.feature_dim
    streamed = bool(config.stream) or not train.fits_float32(device, logits_bytes(train))
    if streamed and not config.stream:
        log.info("logreg: %s (%d rows, %.1f GiB as float32) does not fit in memory: streaming it, one pass per "
                 "L-BFGS evaluation", train.split.path, train.num_rows, train.float32_bytes() / 2**30)
    fitted, standardizer, predictions = (_fit_streamed if streamed else _fit_in_memory)(
        train, val, settings, num_classes=num_classes, weight_decays=config.weight_decays(LOGREG_WEIGHT_DECAY),
        max_iter=config.max_iter, progress=config.progress)
    best = fitted.fits[fitted.best]
    head = nn.Linear(dim, num_classes).to(device)
    with torch.no_grad():
        head.weight.copy_(fitted.weight)
        head.bias.copy_(fitted.bias)
    return LogregResult(path=fitted, state=standardizer.fold_into(head), streamed=streamed,
                        predictions=Predictions(predictions.cpu().numpy(), best.val_top1, best.val_top5),
                        train_images=train.num_rows, seconds=time.perf_counter() - start)
