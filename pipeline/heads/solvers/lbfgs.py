"""L-BFGS for the convex softmax objective, with a line search that costs no matmul in memory.

The objective of a linear model changes along a search direction only through its logits, and those are
linear in the step: ``Z(t) = Z + t * Zd`` with ``Zd = X @ dW.T + db``. So an iteration in memory costs two
(N, D) x (D, C) matmuls whatever the line search tries (``Zd``, then the gradient ``G.T @ X`` at the step
taken); each trial step is (N, C) work. A streamed problem cannot keep (N, C) logits, so each trial is one
pass over the rows; L-BFGS takes the first trial (t = 1) almost always.

The line search finds a step whose slope is small (strong Wolfe, c2 = 0.9) by a safeguarded secant on the
slope, which is increasing along the line (the objective is convex). It stops on the gradient (the
largest |entry|), not on the objective, whose float32 changes near the optimum are below its resolution.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

HISTORY_SIZE = 10  # curvature pairs: 2 x 10 x (C x D) floats, 66 MB for 200 x 4096 (scipy's default m)
WOLFE_DECREASE = 1e-4  # c1: sufficient decrease
WOLFE_SLOPE = 0.9  # c2: |slope| at the step at most this share of the slope at 0
MAX_TRIALS = 25  # line search trials before giving up on a direction


@dataclass
class Solved:
    """How a solve ended. ``stopped``: "converged", "iteration budget", "time budget" or "no progress"."""

    iterations: int
    evaluations: int  # (N, D) x (D, C) matmul pairs: full-batch passes
    objective: float
    grad_max: float  # largest |gradient| entry at the end
    stopped: str
    seconds: float


class Problem(Protocol):
    passes: int  # full-batch passes so far: each is two (N, D) x (D, C) matmuls

    def start(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        """(objective, gradient) at theta; the problem now sits at theta."""

    def line(self, direction: torch.Tensor) -> Callable[[float], tuple[float, float]]:
        """phi(t) -> (objective, slope) at theta + t * direction."""

    def move(self, t: float) -> tuple[float, torch.Tensor]:
        """Go to theta + t * direction (a step phi was called with); its (objective, gradient)."""


def two_loop(gradient: torch.Tensor, steps: list, changes: list, rhos: list) -> torch.Tensor:
    """-H @ gradient from the stored (s, y) pairs, H0 scaled by s.y / y.y of the newest pair."""
    q = gradient.neg()
    alphas = []
    for s, y, rho in zip(reversed(steps), reversed(changes), reversed(rhos)):
        alpha = rho * s.dot(q)
        q.add_(y, alpha=-alpha)
        alphas.append(alpha)
    if steps:
        q.mul_(steps[-1].dot(changes[-1]) / changes[-1].dot(changes[-1]))
    for s, y, rho, alpha in zip(steps, changes, rhos, reversed(alphas)):
        beta = rho * y.dot(q)
        q.add_(s, alpha=alpha - beta)
    return q


def line_search(phi: Callable[[float], tuple[float, float]], f0: float, slope0: float, t: float) -> float | None:
    """A step t > 0 with sufficient decrease and |slope| <= c2 |slope0|, or None when none was found."""
    lo, slope_lo = 0.0, slope0
    hi = slope_hi = None
    slack = 1e-6 * abs(f0)  # float32 objectives near the optimum: differences below this are noise
    for _ in range(MAX_TRIALS):
        f, slope = phi(t)
        if not (math.isfinite(f) and math.isfinite(slope)) or f > f0 + WOLFE_DECREASE * t * slope0 + slack:
            hi, slope_hi = t, (slope if math.isfinite(slope) and slope > 0 else None)
        elif abs(slope) <= -WOLFE_SLOPE * slope0:
            return t
        elif slope > 0:
            hi, slope_hi = t, slope
        else:
            lo, slope_lo = t, slope
        if hi is None:  # still descending at t: try 4x further
            t = 4.0 * t
            continue
        width = hi - lo
        if slope_hi is not None and slope_hi > slope_lo:  # the slope's root by secant, kept off the ends
            guess = lo - slope_lo * width / (slope_hi - slope_lo)
            t = min(max(guess, lo + 0.1 * width), hi - 0.1 * width)
        else:
            t = lo + 0.5 * width
    return lo if lo > 0 else None


def minimize_lbfgs(problem: Problem, theta: torch.Tensor, *, max_iter: int, tolerance_grad: float,
                   tolerance_gap: float = 0.0, convexity: float = 0.0, max_seconds: float | None = None,
                   on_iteration=None) -> Solved:
    """Run L-BFGS from theta (a flat tensor, updated in place) until it converges, or a budget (``max_iter``
    iterations, ``max_seconds``) runs out; ``Solved.stopped`` says which.

    Converged: for an objective at least ``convexity``-strongly convex (a penalty), when the gradient bounds its
    distance to the optimum, f - f* <= |g|^2 / (2 convexity), below ``tolerance_gap`` x |f|: a strong penalty stops
    early, a weak one late. Without a penalty (``convexity`` 0: there may be no finite optimum), when max |gradient|
    <= ``tolerance_grad``. An absolute gradient test is not used with a penalty: at a weak one on separable rows the
    objective is ~1e-5, and max |g| <= 1e-6 stopped 58 % above the optimum (#33's scikit-learn check).
    """
    start = time.perf_counter()
    f, gradient = problem.start(theta)
    iterations = 0
    steps, changes, rhos = [], [], []
    while True:
        grad_max = gradient.abs().max().item()
        if not (math.isfinite(f) and math.isfinite(grad_max)):
            stopped = "no progress"
            break
        gap_bound = gradient.dot(gradient).item() / (2.0 * convexity) if convexity > 0 else math.inf
        if gap_bound <= tolerance_gap * abs(f) if convexity > 0 else grad_max <= tolerance_grad:
            stopped = "converged"
            break
        if iterations >= max_iter:
            stopped = "iteration budget"
            break
        if max_seconds is not None and time.perf_counter() - start >= max_seconds:
            stopped = "time budget"
            break
        direction = two_loop(gradient, steps, changes, rhos)
        slope0 = gradient.dot(direction).item()
        if not slope0 < 0:  # not a descent direction (rounding): forget the curvature, go downhill
            steps.clear(), changes.clear(), rhos.clear()
            direction, slope0 = gradient.neg(), -gradient.dot(gradient).item()
        first = 1.0 if steps else min(1.0, 1.0 / gradient.abs().sum().item())  # torch's first step
        t = line_search(problem.line(direction), f, slope0, first)
        if t is None:
            stopped = "no progress"
            break
        f, new_gradient = problem.move(t)
        step, change = direction.mul_(t), new_gradient - gradient
        curvature = step.dot(change).item()
        if curvature > 1e-10 * change.dot(change).item():
            if len(steps) == HISTORY_SIZE:
                steps.pop(0), changes.pop(0), rhos.pop(0)
            steps.append(step), changes.append(change), rhos.append(1.0 / curvature)
        theta.add_(step)
        gradient = new_gradient
        iterations += 1
        if on_iteration:
            on_iteration()
    return Solved(iterations=iterations, evaluations=problem.passes, objective=f, grad_max=grad_max, stopped=stopped,
                  seconds=time.perf_counter() - start)
