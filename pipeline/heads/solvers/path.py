"""The logreg penalty path: L-BFGS solves of the softmax objective, strongest penalty first, each warm-started.

The objective is the mean cross-entropy of ``x @ W.T + b`` plus ``weight_decay / 2 * ||W||^2`` (the bias is not
penalised): scikit-learn's ``LogisticRegression`` with ``C = 1 / (n * weight_decay)`` for n train rows. A weaker
penalty's optimum lies near a stronger one's, so each solve starts from the previous optimum. Each fit is scored
on one set: val (``--select val``), or the held-out train rows (``--select train-split``); the best by that set's
top-1 is chosen (the first of equals: the stronger penalty). With held-out rows, ``refit`` then solves on every
train row at the chosen C (``weight_decay = 1 / (n_all * C)``), warm-started from the chosen optimum, and only the
refit is scored on val (dinov2's ``log_regression.py`` and Kornblith et al. (2019) do the same).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.common.config import LOGREG_MAX_ITER
from pipeline.common.errors import UserError
from pipeline.heads.solvers.lbfgs import Solved, minimize_lbfgs
from pipeline.heads.solvers.softmax import Chunks, InMemorySoftmax, StreamedSoftmax, chunked_loss_and_grad, split_theta, threads

log = logging.getLogger(__name__)

SCORE_ROWS = 16384  # rows per block when scoring, so the (rows, C) logits stay small
# Converged: the gradient bounds the objective's gap to the optimum, |g|^2 / (2 weight_decay), below
# TOLERANCE_GAP x the objective (100x inside the 1e-4 the head promises); with no penalty (weight decay 0),
# every |gradient| entry is below TOLERANCE_GRAD. See benchmarks/bench_logreg.py and docs/heads.md.
TOLERANCE_GAP = 1e-6
TOLERANCE_GRAD = 1e-6
MAX_ITER = LOGREG_MAX_ITER  # the guard: iterations per penalty; a solve that hits it says so (PenaltyFit.stopped)


@dataclass(frozen=True)
class PenaltyFit:
    """The optimum for one L2 penalty and how good it is (losses are mean cross-entropy, accuracies in %):
    one row of path.csv, its fields its columns. A fit is scored on one set: held_* (the held-out train rows)
    or val_*; the other's fields are None."""

    weight_decay: float
    iterations: int  # L-BFGS iterations
    evaluations: int  # full-batch passes (each two (N, D) x (D, C) matmuls; line-search trials are free in memory)
    objective: float  # train cross-entropy + penalty: what was minimised
    grad_max: float  # largest |gradient| entry at the end: 0 at the exact optimum
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_top1: float | None
    val_top5: float | None
    seconds: float
    stopped: str = "converged"  # or "iteration budget", "time budget", "no progress": not at the optimum
    step: str = "path"  # "path": one penalty of the path; "refit": the chosen C on every train row
    rows: int = 0  # the train rows it was solved on
    C: float = math.inf  # scikit-learn's C = 1 / (rows x weight_decay)
    held_loss: float | None = None
    held_top1: float | None = None
    held_top5: float | None = None

    @property
    def score_top1(self) -> float:
        """The top-1 it was chosen by: on the held-out rows, else on val."""
        return self.held_top1 if self.held_top1 is not None else self.val_top1


@dataclass(frozen=True)
class PenaltyPath:
    """The solver's answer: every penalty's fit, the chosen one, and the parameters of the head it gives."""

    fits: tuple[PenaltyFit, ...]  # one per penalty, in the order solved (strongest first)
    best: int  # index into fits: the best scored top-1 (the first of equals: the stronger penalty)
    weight: torch.Tensor  # (C, D) of the head: the refit's when there is one, else the best fit's; standardized features
    bias: torch.Tensor  # (C,)
    refit: PenaltyFit | None = None  # the chosen C solved on every train row and scored on val (held-out rows only)

    @property
    def final(self) -> PenaltyFit:
        """The fit the head is: the refit, or the best of the path."""
        return self.refit or self.fits[self.best]


def c_of(weight_decay: float, rows: int) -> float:
    """scikit-learn's C for a mean-loss penalty on ``rows`` rows."""
    return 1.0 / (rows * weight_decay) if weight_decay > 0 and rows else math.inf


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
            "grad_max": max(result.grad_weight.abs().max().item(), result.grad_bias.abs().max().item()),
            "rows": result.rows}


def train_state(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                weight_decay: float) -> dict:
    """At (weight, bias): the objective, the train cross-entropy and top-1 (%), and the largest |gradient|
    entry (0 at the exact optimum), from one full-batch pass."""
    return train_state_chunks([(x, y)], weight, bias, weight_decay)


@dataclass(frozen=True)
class Budget:
    """What every solve of a path gets: the iteration guard, the tolerance, an optional time limit, a progress bar."""

    max_iter: int = MAX_ITER
    tolerance_grad: float = TOLERANCE_GRAD
    max_seconds: float | None = None
    progress: bool = False


def solve_scored(problem, weight: torch.Tensor, bias: torch.Tensor, train_chunks: Chunks, score_chunks_: Chunks, *,
                 scored_on: str, step: str, budget: Budget) -> PenaltyFit:
    """One penalty: solved from (weight, bias) (updated in place), then its train state and its score on one set
    (``scored_on``: "held" or "val"). A solve that reaches the guard is logged, and still recorded."""
    start, weight_decay = time.perf_counter(), problem.weight_decay
    solved = solve(problem, weight, bias, max_iter=budget.max_iter, tolerance_grad=budget.tolerance_grad,
                   max_seconds=budget.max_seconds, progress=budget.progress)
    train = train_state_chunks(train_chunks(), weight, bias, weight_decay)
    if not all(math.isfinite(train[key]) for key in ("objective", "grad_max")):
        raise UserError(f"logistic regression diverged at weight decay {weight_decay:g} (the objective is "
                        f"{train['objective']}); check the features for inf or NaN values")
    scored = score_chunks(score_chunks_(), weight, bias)
    scores = {f"{kind}_{name}": scored[name] if kind == scored_on else None
              for kind in ("val", "held") for name in ("loss", "top1", "top5")}
    fit = PenaltyFit(weight_decay=weight_decay, iterations=solved.iterations, evaluations=solved.evaluations,
                     objective=train["objective"], grad_max=train["grad_max"], train_loss=train["loss"],
                     train_acc=train["acc"], seconds=round(time.perf_counter() - start, 3), stopped=solved.stopped,
                     step=step, rows=train["rows"], C=c_of(weight_decay, train["rows"]), **scores)
    log.info("logreg %s wd=%-8g C=%-8.3g %3d iterations %3d evaluations  objective %.5f (max |grad| %.1e)  train acc "
             "%5.2f%%  %s top1 %5.2f%% top5 %5.2f%%  %.1fs", step, weight_decay, fit.C, fit.iterations, fit.evaluations,
             fit.objective, fit.grad_max, fit.train_acc, scored_on, scored["top1"], scored["top5"], fit.seconds)
    if solved.stopped != "converged":
        log.warning("logreg wd=%g stopped on its %s after %d iterations (%.0fs) with max |grad| %.1e above the "
                    "tolerance %.0e: its objective may be above the optimum; raise --max-iter (it is recorded as is)",
                    weight_decay, solved.stopped, solved.iterations, solved.seconds, fit.grad_max, budget.tolerance_grad)
    return fit


def fit_path(problem_for, train_chunks: Chunks, score_chunks_: Chunks, *, num_classes: int, dim: int, device,
             weight_decays: tuple[float, ...], budget: Budget, scored_on: str = "val") -> PenaltyPath:
    """The penalty path over a problem factory (weight_decay -> InMemorySoftmax or StreamedSoftmax), strongest
    first, each warm-started from the previous optimum; the best by the scored top-1 is kept."""
    weight = torch.zeros(num_classes, dim, device=device)  # (C, D)
    bias = torch.zeros(num_classes, device=device)
    fits, best, best_state = [], 0, None
    for weight_decay in sorted(set(weight_decays), reverse=True):
        fit = solve_scored(problem_for(weight_decay), weight, bias, train_chunks, score_chunks_, scored_on=scored_on,
                           step="path", budget=budget)
        fits.append(fit)
        if best_state is None or fit.score_top1 > fits[best].score_top1:
            best, best_state = len(fits) - 1, (weight.clone(), bias.clone())
    return PenaltyPath(fits=tuple(fits), best=best, weight=best_state[0], bias=best_state[1])


def refit(path: PenaltyPath, problem_for, train_chunks: Chunks, val_chunks: Chunks, *, rows: int,
          budget: Budget) -> PenaltyPath:
    """The chosen C solved on all ``rows`` train rows (weight_decay = 1 / (rows x C)), warm-started from the chosen
    optimum, and scored on val once: ``path`` with its ``refit`` and the refit's parameters."""
    chosen = path.fits[path.best]
    weight_decay = 1.0 / (rows * chosen.C) if math.isfinite(chosen.C) else 0.0
    weight, bias = path.weight.clone(), path.bias.clone()
    fit = solve_scored(problem_for(weight_decay), weight, bias, train_chunks, val_chunks, scored_on="val", step="refit",
                       budget=budget)
    return replace(path, weight=weight, bias=bias, refit=fit)


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
               num_classes: int, weight_decays: tuple[float, ...], held: int = 0, max_iter: int = MAX_ITER,
               progress: bool = False, tolerance_grad: float = TOLERANCE_GRAD, max_seconds: float | None = None,
               overwrite: bool = False) -> PenaltyPath:
    """Solve for each penalty, strongest first, warm-starting each from the previous optimum.

    ``train_x``/``val_x``: (N, D) / (M, D) float32 standardized features on one device. The start is zero,
    so results depend on nothing random. ``held``: the last ``held`` train rows are held out: the path is solved
    on the others and scored on them, then the chosen C is refit on all N rows and scored on val (else the path
    is solved on all N and scored on val). ``max_iter`` / ``max_seconds``: the budget per penalty.
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
    budget = Budget(max_iter, tolerance_grad, max_seconds, progress)
    fit_x, fit_y = train_x[:len(train_x) - held], train_y[:len(train_y) - held]
    score = row_blocks(train_x[len(fit_x):], train_y[len(fit_y):]) if held else val_chunks
    result = fit_path(lambda wd: InMemorySoftmax(fit_x, fit_y, num_classes, wd), row_blocks(fit_x, fit_y), score,
                      num_classes=num_classes, dim=train_x.shape[1], device=train_x.device, weight_decays=weight_decays,
                      budget=budget, scored_on="held" if held else "val")
    if held:
        result = refit(result, lambda wd: InMemorySoftmax(train_x, train_y, num_classes, wd), row_blocks(train_x, train_y),
                       val_chunks, rows=len(train_y), budget=budget)
    if live is not None:
        weight = torch.zeros(num_classes, dim, device=result.weight.device)
        weight[:, live] = result.weight
        result = replace(result, weight=weight)
    return result


def fit_logreg_streamed(train_chunks: Chunks, val_chunks: Chunks, *, num_classes: int, dim: int,
                        weight_decays: tuple[float, ...], max_iter: int = MAX_ITER, device=None,
                        progress: bool = False, tolerance_grad: float = TOLERANCE_GRAD,
                        max_seconds: float | None = None, held: tuple[Chunks, Chunks, int] | None = None) -> PenaltyPath:
    """``fit_logreg`` over row chunks: each L-BFGS trial step is one pass over the train chunks.

    The chunk factories yield (x (B, D) float32 standardized, y (B,)) on ``device``, in the same rows each pass.
    ``held``: (fit chunks, held-out chunks, every train row's count): the path is solved on the fit chunks and
    scored on the held-out ones, then refit on ``train_chunks`` (every row) and scored on val.
    """
    budget = Budget(max_iter, tolerance_grad, max_seconds, progress)
    fit_chunks, score = (held[0], held[1]) if held else (train_chunks, val_chunks)
    result = fit_path(lambda wd: StreamedSoftmax(fit_chunks, num_classes, wd), fit_chunks, score, num_classes=num_classes,
                      dim=dim, device=device or torch.device("cpu"), weight_decays=weight_decays, budget=budget,
                      scored_on="held" if held else "val")
    if held:
        result = refit(result, lambda wd: StreamedSoftmax(train_chunks, num_classes, wd), train_chunks, val_chunks,
                       rows=held[2], budget=budget)
    return result
