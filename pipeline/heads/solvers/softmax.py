"""The logreg objective's value and gradient, fused by hand, in memory or over row chunks.

objective(W, b) = mean_i CE(x_i @ W.T + b, y_i) + weight_decay / 2 * ||W||^2, and with P = softmax(logits),
G = (P - onehot(y)) / N its gradient is (G.T @ X + weight_decay * W, G.sum(0)): two (N, D) x (D, C) matmuls
and (N, C) elementwise work, nothing kept for a backward pass. Parameters travel as one flat float32
vector ``theta`` = [W.flatten() (C*D), b (C)], as L-BFGS wants them. Sums over rows are taken in float64.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, NamedTuple

import torch

SMALL_WORK = 1 << 22  # elements: (N, C) and parameter-sized work below this runs on one thread (see threads)

Chunks = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # a fresh pass of (x (B, D) float32, y (B,))


@contextmanager
def threads(count: int):
    """torch's intra-op threads set to ``count`` inside the block.

    The solver's elementwise work ((N, C) blocks, parameter vectors) takes tens of microseconds: split
    across OpenMP threads it waits on them instead, milliseconds per op on a shared machine. So a small
    problem runs it on one thread, and only its two matmuls per iteration on the caller's threads.
    """
    old = torch.get_num_threads()
    if count == old:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def squared_norm(x: torch.Tensor) -> float:
    """||x||^2 as one float32 dot (blocked sums: relative error ~1e-7, no float64 copy)."""
    flat = x.reshape(-1)
    return torch.dot(flat, flat).item()


def split_theta(theta: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (W (C, D), b (C,)) into the flat parameter vector."""
    dim = theta.numel() // num_classes - 1
    return theta[:num_classes * dim].view(num_classes, dim), theta[num_classes * dim:]


def softmax_terms(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(summed cross-entropy, G = softmax(logits) - onehot(y) (B, C)): G is written over ``logits``.

    Near a separable optimum a row's cross-entropy is ~1e-6 and its true-class probability 1 - 1e-6: in
    float32, lse - z_y and p_y - 1 would cancel to noise. So both come from the sum of the *other*
    probabilities, r = sum_{c != y} p_c: the loss is -log1p(-r) where r < 1/2 (else lse - z_y, no
    cancellation there), and G's true-class entry is -r. Nine (B, C) float32 passes, no float64 copy of
    the logits: only the (B,) row losses are summed in float64.
    """
    index = y[:, None]
    true = logits.gather(1, index)  # (B, 1)
    top = logits.amax(1, keepdim=True)
    exp = logits.sub_(top).exp_()  # in place: exp(z - max)
    total = exp.sum(1, keepdim=True)
    prob = exp.div_(total)
    prob.scatter_(1, index, 0.0)
    others = prob.sum(1, keepdim=True)  # r: (B, 1)
    rows = torch.where(others < 0.5, torch.log1p(others.neg()).neg_(), total.log_().sub_(true.sub_(top)))
    return rows.sum(dtype=torch.float64).item(), prob.scatter_(1, index, others.neg_())


class Evaluation(NamedTuple):
    objective: float  # mean cross-entropy + penalty
    grad_weight: torch.Tensor  # (C, D)
    grad_bias: torch.Tensor  # (C,)
    rows: int
    loss: float  # mean cross-entropy
    correct: int  # rows whose top-1 class is right


def chunked_loss_and_grad(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], weight: torch.Tensor,
                          bias: torch.Tensor, weight_decay: float) -> Evaluation:
    """The objective, its gradient and the train top-1 count in one pass over the chunks."""
    grad_weight, grad_bias = torch.zeros_like(weight), torch.zeros_like(bias, dtype=torch.float64)
    loss, rows, correct = 0.0, 0, 0
    for x, y in chunks:
        logits = torch.addmm(bias, x, weight.T)  # (B, C)
        correct += (logits.argmax(1) == y).sum().item()
        part, grad = softmax_terms(logits, y)
        loss += part
        rows += len(y)
        grad_weight.addmm_(grad.T, x)  # (C, D) += (C, B) @ (B, D)
        grad_bias += grad.sum(0, dtype=torch.float64)
    rows_ = max(rows, 1)
    grad_weight.div_(rows_).add_(weight, alpha=weight_decay)
    objective = loss / rows_ + 0.5 * weight_decay * weight.square().sum(dtype=torch.float64).item()
    return Evaluation(objective, grad_weight, (grad_bias / rows_).to(bias.dtype), rows, loss / rows_, correct)


class InMemorySoftmax:
    """The problem on one (N, D) tensor; it keeps the (N, C) logits, so line-search trials cost no matmul.

    ``x`` may be a column view with a row stride above D (the live columns, ``logreg.drop_dead_columns``):
    both matmuls read it in place. Three (N, C) buffers are reused across iterations: the logits at theta,
    their change per unit step, and a trial's logits (overwritten by its G).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float):
        self.x, self.y, self.num_classes, self.weight_decay = x, y, num_classes, weight_decay
        self.passes = 0
        self.last_t = None
        self.matmul_threads = torch.get_num_threads()  # the caller's: the elementwise work may run on fewer
        n = len(y)
        self.small = n * num_classes < SMALL_WORK and num_classes * (x.shape[1] + 1) < SMALL_WORK
        self.logits_step = torch.empty(n, num_classes, device=x.device)
        self.trial = torch.empty_like(self.logits_step)

    def _gradient(self, grad_logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        gradient = torch.empty(self.num_classes * (self.x.shape[1] + 1), device=self.x.device)
        grad_weight, grad_bias = split_theta(gradient, self.num_classes)
        with threads(self.matmul_threads):
            torch.mm(grad_logits.T, self.x, out=grad_weight)  # (C, D)
        grad_weight.div_(len(self.y)).add_(weight, alpha=self.weight_decay)
        torch.sum(grad_logits, 0, out=grad_bias).div_(len(self.y))
        return gradient

    def start(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        self.theta = theta
        weight, bias = split_theta(theta, self.num_classes)
        with threads(self.matmul_threads):
            self.logits = torch.addmm(bias, self.x, weight.T)  # (N, C)
        loss, grad = softmax_terms(self.trial.copy_(self.logits), self.y)
        self.passes += 1
        f = loss / len(self.y) + 0.5 * self.weight_decay * squared_norm(weight)
        return f, self._gradient(grad, weight)

    def line(self, direction: torch.Tensor) -> Callable[[float], tuple[float, float]]:
        weight, _ = split_theta(self.theta, self.num_classes)
        self.direction = direction
        d_weight, d_bias = split_theta(direction, self.num_classes)
        with threads(self.matmul_threads):
            torch.addmm(d_bias, self.x, d_weight.T, out=self.logits_step)  # (N, C): logits change per unit step
        ww, dd = squared_norm(weight), squared_norm(d_weight)
        wd_ = torch.dot(weight.view(-1), d_weight.reshape(-1)).item()
        n = len(self.y)

        def phi(t: float) -> tuple[float, float]:
            logits = torch.add(self.logits, self.logits_step, alpha=t, out=self.trial)
            loss, grad = softmax_terms(logits, self.y)
            # slope of the mean CE: mean_i sum_c G_ic * Zd_ic, with G = P - onehot (row sums in float32)
            slope = torch.mul(grad, self.logits_step).sum(1).sum(dtype=torch.float64).item() / n
            f = loss / n + 0.5 * self.weight_decay * (ww + 2 * t * wd_ + t * t * dd)
            self.last_t, self.last_f = t, f
            return f, slope + self.weight_decay * (wd_ + t * dd)

        self.phi = phi
        return phi

    def move(self, t: float) -> tuple[float, torch.Tensor]:
        if t != self.last_t:  # the search settled on an earlier trial: redo it (no matmul)
            self.phi(t)
        f = self.last_f
        weight, _ = split_theta(self.theta, self.num_classes)
        d_weight, _ = split_theta(self.direction, self.num_classes)
        self.logits.add_(self.logits_step, alpha=t)  # the logits at the step taken
        gradient = self._gradient(self.trial, weight + t * d_weight)  # self.trial holds G there
        self.passes += 1  # the logits_step matmul and the gradient matmul
        return f, gradient


class StreamedSoftmax:
    """The problem over row chunks read afresh on each pass: every trial step is one pass, nothing (N, C) kept."""

    def __init__(self, chunks: Chunks, num_classes: int, weight_decay: float):
        self.chunks, self.num_classes, self.weight_decay = chunks, num_classes, weight_decay
        self.passes = 0
        self.rows = None

    def evaluate(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        """(objective, flat gradient) at theta, in one pass."""
        weight, bias = split_theta(theta, self.num_classes)
        result = chunked_loss_and_grad(self.chunks(), weight, bias, self.weight_decay)
        if self.rows is not None and result.rows != self.rows:
            raise RuntimeError(f"a pass over the chunks gave {result.rows} rows, the first gave {self.rows}")
        self.rows = result.rows
        self.passes += 1
        return result.objective, torch.cat([result.grad_weight.flatten(), result.grad_bias])

    def start(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        self.theta = theta
        return self.evaluate(theta)

    def line(self, direction: torch.Tensor) -> Callable[[float], tuple[float, float]]:
        def phi(t: float) -> tuple[float, float]:
            f, gradient = self.evaluate(torch.add(self.theta, direction, alpha=t))
            self.last = (t, f, gradient)
            return f, gradient.dot(direction).item()

        self.phi = phi
        return phi

    def move(self, t: float) -> tuple[float, torch.Tensor]:
        if self.last[0] != t:
            self.phi(t)
        return self.last[1], self.last[2]
