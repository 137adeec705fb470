"""The logreg objective's value and gradient, fused by hand, in memory or over row chunks.

objective(W, b) = mean_i CE(x_i @ W.T + b, y_i) + weight_decay / 2 * ||W||^2, and with P = softmax(logits),
G = (P - onehot(y)) / N its gradient is (G.T @ X + weight_decay * W, G.sum(0)): two (N, D) x (D, C) matmuls
and (N, C) elementwise work, nothing kept for a backward pass. Parameters travel as one flat float32
vector ``theta`` = [W.flatten() (C*D), b (C)], as L-BFGS wants them. Sums over rows are taken in float64.
"""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple

import torch

Chunks = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # a fresh pass of (x (B, D) float32, y (B,))


def split_theta(theta: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views (W (C, D), b (C,)) into the flat parameter vector."""
    dim = theta.numel() // num_classes - 1
    return theta[:num_classes * dim].view(num_classes, dim), theta[num_classes * dim:]


def softmax_terms(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(summed cross-entropy, G = softmax(logits) - onehot(y) (B, C)): G is written over ``logits``.

    Near a separable optimum a row's cross-entropy is ~1e-6 and its true-class probability 1 - 1e-6: in
    float32, lse - z_y and p_y - 1 would cancel to noise. So the loss takes its logsumexp in float64, and
    G's true-class entry is minus the sum of the other probabilities.
    """
    true = logits.gather(1, y[:, None])  # (B, 1)
    loss = (torch.logsumexp(logits.double(), dim=1) - true[:, 0].double()).sum().item()
    lse = torch.logsumexp(logits, dim=1, keepdim=True)  # (B, 1)
    grad = logits.sub_(lse).exp_()  # probabilities, in place
    grad.scatter_(1, y[:, None], 0.0)
    return loss, grad.scatter_(1, y[:, None], grad.sum(1, keepdim=True).neg_())


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
    """The problem on one (N, D) tensor; it keeps the (N, C) logits, so line-search trials cost no matmul."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float):
        self.x, self.y, self.num_classes, self.weight_decay = x, y, num_classes, weight_decay
        self.passes = 0
        self.last_t = None

    def _gradient(self, grad_logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        gradient = torch.empty(self.num_classes * (self.x.shape[1] + 1), device=self.x.device)
        grad_weight, grad_bias = split_theta(gradient, self.num_classes)
        torch.mm(grad_logits.T, self.x, out=grad_weight)  # (C, D)
        grad_weight.div_(len(self.y)).add_(weight, alpha=self.weight_decay)
        grad_bias.copy_(grad_logits.sum(0, dtype=torch.float64).div_(len(self.y)))
        return gradient

    def start(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        self.theta = theta
        weight, bias = split_theta(theta, self.num_classes)
        self.logits = torch.addmm(bias, self.x, weight.T)  # (N, C)
        loss, grad = softmax_terms(self.logits.clone(), self.y)
        self.passes += 1
        f = loss / len(self.y) + 0.5 * self.weight_decay * weight.square().sum(dtype=torch.float64).item()
        return f, self._gradient(grad, weight)

    def line(self, direction: torch.Tensor) -> Callable[[float], tuple[float, float]]:
        weight, _ = split_theta(self.theta, self.num_classes)
        self.direction = direction
        d_weight, d_bias = split_theta(direction, self.num_classes)
        self.logits_step = torch.addmm(d_bias, self.x, d_weight.T)  # (N, C): logits change per unit step
        ww = weight.square().sum(dtype=torch.float64).item()
        wd_ = (weight * d_weight).sum(dtype=torch.float64).item()
        dd = d_weight.square().sum(dtype=torch.float64).item()
        n = len(self.y)

        def phi(t: float) -> tuple[float, float]:
            logits = torch.add(self.logits, self.logits_step, alpha=t)
            loss, grad = softmax_terms(logits.clone(), self.y)
            # slope of the mean CE: mean_i sum_c G_ic * Zd_ic, with G = P - onehot
            slope = ((grad * self.logits_step).sum(dtype=torch.float64).item()) / n
            f = loss / n + 0.5 * self.weight_decay * (ww + 2 * t * wd_ + t * t * dd)
            self.last_t, self.last_f, self.last_logits, self.last_grad = t, f, logits, grad
            return f, slope + self.weight_decay * (wd_ + t * dd)

        self.phi = phi
        return phi

    def move(self, t: float) -> tuple[float, torch.Tensor]:
        if t != self.last_t:  # the search settled on an earlier trial: redo it (no matmul)
            self.phi(t)
        f = self.last_f
        weight, _ = split_theta(self.theta, self.num_classes)
        d_weight, _ = split_theta(self.direction, self.num_classes)
        self.logits = self.last_logits
        gradient = self._gradient(self.last_grad, weight + t * d_weight)
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
