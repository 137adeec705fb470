"""SGD on cross-entropy for linear heads on cached features: many heads in one pass over the rows.

Every head of a pass takes every batch read (DINOv2 trains its 52 linear heads this way), so a grid of
``--lr`` x ``--weight-decay`` reads, moves and standardizes the cache's rows once per epoch, not once per head.
The heads of one pass share the seed, and so they share what the seed decides alone: the init (one
``LinearHead`` drawn, repeated) and every epoch's batch order (it depends on the seed and the row count only).
Their weights are one (H x C, D) tensor, but each head computes on its own rows with the ops a head trained alone
runs (``addmm``, ``F.cross_entropy``, ``G.T @ x``, torch's SGD step), so on the CPU each is that head bit for bit
(tested against ``nn.Linear`` + ``torch.optim.SGD``: weights within 1e-6, the same history). The arithmetic is
therefore H heads' worth: with the features in memory a pass of 12 heads costs about 12 heads' matmuls, and what
it saves is the reading, the standardizing and the process's fixed costs (benchmarks/bench_probe.py). Memory: one
batch (and the reader's block), the heads' weights, their momentum, and per head its best and its last state.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import LinearHead
from pipeline.common.config import LINEAR_WEIGHT_DECAY, HeadConfig
from pipeline.common.errors import UserError
from pipeline.heads.readers import FeatureSource
from pipeline.heads.standardize import Standardizer

_DEFAULTS = HeadConfig()


@dataclass(frozen=True)
class Recipe:
    """How one head is trained: SGD with momentum on cross-entropy. The defaults are HeadConfig's (the seed
    recipe), not written again here."""

    lr: float = _DEFAULTS.lr[0]
    weight_decay: float = LINEAR_WEIGHT_DECAY[0]
    momentum: float = _DEFAULTS.momentum
    epochs: int = _DEFAULTS.epochs
    batch_size: int = _DEFAULTS.batch_size
    val_batch_size: int = _DEFAULTS.val_batch_size
    seed: int = _DEFAULTS.seed  # the head's init and every epoch's batch order

    @classmethod
    def from_config(cls, config: HeadConfig, lr: float, weight_decay: float) -> "Recipe":
        return cls(lr=lr, weight_decay=weight_decay, momentum=config.momentum, epochs=config.epochs,
                   batch_size=config.batch_size, val_batch_size=config.val_batch_size, seed=config.seed)

    def shared(self) -> tuple:
        """What the heads of one pass must have in common: all but lr and weight decay."""
        return self.momentum, self.epochs, self.batch_size, self.val_batch_size, self.seed


@dataclass(frozen=True)
class Snapshot:
    """The head after one epoch: its state on raw features (the standardization folded in) and the epoch's record."""

    state: dict[str, torch.Tensor]  # {"weight": (C, D), "bias": (C,)}
    metrics: dict  # epoch, train_loss, train_acc, [<scored>_loss, _top1, _top5], train_seconds, seconds


@dataclass(frozen=True)
class FitResult:
    """One head's training: its best epoch (the first of the best scored top-1; the last when nothing is scored),
    its last, and every epoch's record."""

    best: Snapshot
    last: Snapshot
    history: tuple[dict, ...]


class StackedHeads:
    """H linear heads of C classes on D features, held as one (H x C, D) weight and (H x C,) bias (head h: rows
    h x C to (h + 1) x C), each with its momentum. Each head computes on its own rows with the very ops a head
    trained alone runs (``addmm``, ``F.cross_entropy``, the weight gradient ``G.T @ x``, torch's SGD step), so it is
    that head bit for bit on the CPU; one larger matmul for all of them would round differently."""

    def __init__(self, count: int, num_classes: int, dim: int, seed: int, device: torch.device):
        torch.manual_seed(seed)
        single = LinearHead(num_classes, dim)  # the init a head trained alone with this seed gets
        self.count, self.num_classes = count, num_classes
        self.weight = single.weight.detach().repeat(count, 1).to(device)  # (H x C, D)
        self.bias = single.bias.detach().repeat(count).to(device)  # (H x C,)
        self.buffers: dict[str, torch.Tensor] = {}  # momentum of every head, per parameter
        self.started: set[tuple[str, int]] = set()  # (parameter, first row) of each head whose buffer is made

    def rows(self, head: int) -> slice:
        return slice(head * self.num_classes, (head + 1) * self.num_classes)

    def logits(self, head: int, x: torch.Tensor) -> torch.Tensor:
        """(B, C): what nn.Linear computes for head ``head``."""
        rows = self.rows(head)
        return torch.addmm(self.bias[rows], x, self.weight[rows].T)

    def train_step(self, head: int, recipe: "Recipe", x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step of head ``head`` on the batch: (its loss, its logits), both detached."""
        logits = self.logits(head, x).requires_grad_()
        loss = F.cross_entropy(logits, y)
        (grad,) = torch.autograd.grad(loss, logits)  # (B, C): the cross-entropy's backward, as autograd runs it alone
        rows = self.rows(head)
        self._sgd(rows, recipe, "weight", self.weight, grad.t().mm(x))  # addmm's backward for its weight
        self._sgd(rows, recipe, "bias", self.bias, grad.sum(0))  # and for its broadcast bias
        return loss.detach(), logits.detach()

    def _sgd(self, rows: slice, recipe: "Recipe", name: str, param: torch.Tensor, grad: torch.Tensor) -> None:
        """torch.optim.SGD's step (its single-tensor path: dampening 0, no Nesterov) on one head's rows."""
        if name not in self.buffers:
            self.buffers[name] = torch.empty_like(param)
        p, buffer = param[rows], self.buffers[name][rows]
        d_p = grad if recipe.weight_decay == 0 else grad.add(p, alpha=recipe.weight_decay)
        if recipe.momentum != 0:
            if (name, rows.start) not in self.started:  # the first step: the buffer is the gradient itself
                buffer.copy_(d_p)
                self.started.add((name, rows.start))
            else:
                buffer.mul_(recipe.momentum).add_(d_p)
            d_p = buffer
        p.add_(d_p, alpha=-recipe.lr)

    def folded(self, standardizer: Standardizer) -> list[dict[str, torch.Tensor]]:
        """Each head's state on raw features (the standardization folded in)."""
        return [standardizer.fold(self.weight[self.rows(h)], self.bias[self.rows(h)]) for h in range(self.count)]


@torch.inference_mode()
def evaluate_heads(heads: StackedHeads, source: FeatureSource, standardizer: Standardizer, batch_size: int,
                   device: torch.device, prefix: str) -> list[dict]:
    """Per head: loss, top-1 and top-5 (in %) on ``source``, keyed ``<prefix>_loss`` and so on (each head scored as
    pipeline.heads.linear.evaluate scores it alone)."""
    count, num_classes = heads.count, heads.num_classes
    sums = torch.zeros(3, count, device=device)  # loss, top-1, top-5 per head
    for x, y in source.batches(batch_size, None):
        x, y = standardizer(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        for h in range(count):
            logits = heads.logits(h, x)
            ranked = logits.topk(min(5, num_classes), dim=1).indices  # (B, 5)
            sums[0, h] += F.cross_entropy(logits, y, reduction="sum")
            sums[1, h] += (ranked[:, 0] == y).sum()
            sums[2, h] += (ranked == y[:, None]).any(1).sum()
    n = source.num_rows
    return [{f"{prefix}_loss": loss / n, f"{prefix}_top1": 100.0 * right / n, f"{prefix}_top5": 100.0 * near / n}
            for loss, right, near in zip(*sums.tolist())]


def fit_heads(train: FeatureSource, score: FeatureSource | None, recipes: list[Recipe], standardizer: Standardizer, *,
              num_classes: int, device: torch.device, scored_on: str = "val",
              on_epoch: Callable[[int, dict], None] | None = None, progress: bool = True) -> list[FitResult]:
    """Train every head of ``recipes`` in one pass over ``train`` per epoch; after each epoch score each on ``score``
    (its records' ``<scored_on>_*`` keys; None: nothing scored). ``on_epoch(head, record)`` as each epoch ends.

    The recipes may differ in lr and weight decay only. Deterministic on the CPU for a given seed.
    """
    first = recipes[0]
    if any(recipe.shared() != first.shared() for recipe in recipes):
        raise ValueError("heads of one pass differ only in lr and weight decay")
    heads = StackedHeads(len(recipes), num_classes, len(standardizer.mean), first.seed, device)
    generator = torch.Generator().manual_seed(first.seed)
    epochs, batch_size = first.epochs, first.batch_size
    histories, best, states = [[] for _ in recipes], [None] * len(recipes), []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        loss_sum, correct = _train_epoch(heads, recipes, train, standardizer, generator, device,
                                         desc=f"epoch {epoch}/{epochs}", progress=progress)
        train_seconds = time.perf_counter() - start
        _check_finite(loss_sum, recipes, epoch)
        scores = (evaluate_heads(heads, score, standardizer, first.val_batch_size, device, scored_on) if score is not None
                  else [{} for _ in recipes])
        states = heads.folded(standardizer)
        seconds = round(time.perf_counter() - start, 3)
        for h, recipe in enumerate(recipes):
            record = {"epoch": epoch, "train_loss": loss_sum[h] / train.num_rows,
                      "train_acc": 100.0 * correct[h] / train.num_rows, **scores[h],
                      "train_seconds": round(train_seconds, 3), "seconds": seconds}
            histories[h].append(record)
            if score is None or best[h] is None or record[f"{scored_on}_top1"] > best[h].metrics[f"{scored_on}_top1"]:
                best[h] = Snapshot(states[h], record)
            if on_epoch:
                on_epoch(h, record)
    return [FitResult(best=best[h], last=Snapshot(states[h], histories[h][-1]), history=tuple(histories[h]))
            for h in range(len(recipes))]


def _train_epoch(heads: StackedHeads, recipes: list[Recipe], train: FeatureSource, standardizer: Standardizer,
                 generator: torch.Generator, device: torch.device, *, desc: str, progress: bool) -> tuple[list, list]:
    """One epoch of every head on the same batches: each head's summed loss and correct count."""
    count, batch_size = heads.count, recipes[0].batch_size
    loss_sum = torch.zeros(count, device=device)
    correct = torch.zeros(count, device=device, dtype=torch.long)
    batches = tqdm(train.batches(batch_size, generator), total=math.ceil(train.num_rows / batch_size), desc=desc,
                   unit="batch", leave=False, disable=not progress)
    for x, y in batches:  # read, moved and standardized once for every head
        x, y = standardizer(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
        for h, recipe in enumerate(recipes):
            loss, logits = heads.train_step(h, recipe, x, y)
            loss_sum[h] += loss * len(y)  # no .item() here: it would sync the GPU every step
            correct[h] += (logits.argmax(1) == y).sum()
    return loss_sum.tolist(), correct.tolist()


def _check_finite(loss_sum: list[float], recipes: list[Recipe], epoch: int) -> None:
    """A head whose loss is no longer finite stops the run: one line naming its lr and weight decay."""
    for loss, recipe in zip(loss_sum, recipes):
        if not math.isfinite(loss):
            also = f" or --weight-decay (now {recipe.weight_decay:g})" if recipe.weight_decay else ""
            raise UserError(f"training diverged at epoch {epoch} (loss is {loss}); lower --lr (now {recipe.lr:g}){also}")
