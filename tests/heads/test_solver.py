"""The logreg solver at its optimum (in memory and streamed) and the streamed kNN, on small generated data.

The optimum is checked against an independent float64 solve (torch's autograd L-BFGS, tightly converged);
the streamed paths are checked against the in-memory ones on the same rows.
"""
from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch.nn.functional as F

from pipeline.heads import knn
from pipeline.heads.solvers.path import fit_logreg, fit_logreg_streamed, objective, row_blocks, solve
from pipeline.heads.solvers.softmax import InMemorySoftmax, chunked_loss_and_grad

CLASSES, DIM = 5, 40


def clustered(rows: int, seed: int, signal: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized-looking ReLU features with class structure, a few dead (all-zero) units, and labels."""
    prototypes = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(rows) % CLASSES
    x = (signal * prototypes[y] + torch.randn(rows, DIM, generator=generator)).clamp(min=0)
    x[:, :6] = 0  # dead units
    return x - x.mean(0), y


@functools.lru_cache(maxsize=None)
def tight_optimum(rows: int, seed: int, weight_decay: float) -> float:
    """The objective's minimum on ``clustered(rows, seed)``, from a float64 autograd L-BFGS run to max |grad| 1e-10."""
    x, y = clustered(rows, seed)
    w = torch.zeros(CLASSES, DIM, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(CLASSES, dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS([w, b], max_iter=5000, tolerance_grad=1e-10, tolerance_change=1e-16,
                               history_size=20, line_search_fn="strong_wolfe")

    def closure():
        solver.zero_grad()
        loss = objective(x.double(), y, w, b, weight_decay)
        loss.backward()
        return loss

    solver.step(closure)
    return objective(x.double(), y, w.detach(), b.detach(), weight_decay).item()


def test_default_logreg_reaches_the_optimum_at_every_penalty_and_says_it_converged():
    x, y = clustered(300, seed=1)
    val_x, val_y = clustered(100, seed=2)
    weight_decays = (0.1, 0.01, 0.001)
    result = fit_logreg(x, y, val_x, val_y, num_classes=CLASSES, weight_decays=weight_decays)
    for fit in result.fits:
        assert fit.stopped == "converged"
        assert fit.objective == pytest.approx(tight_optimum(300, 1, fit.weight_decay), rel=1e-5)


def test_a_budget_that_runs_out_is_reported_in_the_result_and_the_log(caplog):
    x, y = clustered(300, seed=1)
    with caplog.at_level(logging.WARNING, logger="pipeline.heads.logreg"):
        result = fit_logreg(x, y, x, y, num_classes=CLASSES, weight_decays=(0.001,), max_iter=2)
    fit = result.fits[0]
    assert fit.stopped == "iteration budget" and fit.iterations == 2
    assert fit.objective > tight_optimum(300, 1, 0.001) * (1 + 1e-4)  # really not there
    assert "stopped on its iteration budget" in caplog.text and "--max-iter" in caplog.text
    timed = fit_logreg(x, y, x, y, num_classes=CLASSES, weight_decays=(0.001,), max_seconds=0.0).fits[0]
    assert timed.stopped == "time budget" and timed.iterations == 0


def test_one_solve_in_memory_takes_one_pass_per_iteration_and_updates_the_model_in_place():
    x, y = clustered(200, seed=3)
    weight, bias = torch.zeros(CLASSES, DIM), torch.zeros(CLASSES)
    solved = solve(InMemorySoftmax(x, y, CLASSES, 0.01), weight, bias, max_iter=500)
    assert solved.stopped == "converged" and 0 < solved.iterations <= 500
    assert solved.evaluations == solved.iterations + 1  # line-search trials cost no pass in memory
    assert objective(x, y, weight, bias, 0.01).item() == pytest.approx(tight_optimum(200, 3, 0.01), rel=1e-5)


def test_the_fused_chunked_gradient_equals_autograd():
    x, y = clustered(130, seed=4)
    weight = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0)).mul_(0.1).requires_grad_(True)
    bias = torch.randn(CLASSES, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    expected = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * 0.3 * weight.square().sum()
    expected.backward()
    with torch.no_grad():
        result = chunked_loss_and_grad(row_blocks(x, y, 17)(), weight, bias, 0.3)
    assert result.rows == 130 and result.objective == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(result.grad_weight, weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.grad_bias, bias.grad, rtol=1e-5, atol=1e-6)


def test_streamed_logreg_equals_the_in_memory_one():
    x, y = clustered(300, seed=1)
    val_x, val_y = clustered(100, seed=2)
    weight_decays = (0.1, 0.001)
    passes = []

    def train_chunks():
        passes.append(1)
        return row_blocks(x, y, 37)()  # chunks that do not divide the rows

    memory = fit_logreg(x, y, val_x, val_y, num_classes=CLASSES, weight_decays=weight_decays)
    streamed = fit_logreg_streamed(train_chunks, row_blocks(val_x, val_y, 29), num_classes=CLASSES, dim=DIM,
                                   weight_decays=weight_decays)
    for a, b in zip(memory.fits, streamed.fits):
        assert b.stopped == "converged"
        assert b.objective == pytest.approx(a.objective, rel=1e-5)
        assert b.val_top1 == pytest.approx(a.val_top1, abs=1.0)  # at most one val row of 100 moves
    assert streamed.fits[0].evaluations >= streamed.fits[0].iterations  # each trial step is one pass
    assert len(passes) == sum(f.evaluations for f in streamed.fits) + len(streamed.fits)  # + the train-state pass


@pytest.mark.parametrize("train_chunk", [7, 64, 1000])
def test_streamed_knn_equals_the_in_memory_search(train_chunk):
    generator = torch.Generator().manual_seed(0)
    train, labels = knn.normalize_rows(torch.randn(500, 16, generator=generator)), torch.randint(0, 6, (500,),
                                                                                                generator=generator)
    queries = knn.normalize_rows(torch.randn(90, 16, generator=generator))
    ks = (1, 5, 20)
    memory = knn.knn_predict(train, labels, queries, ks=ks, num_classes=6, temperature=0.07, chunk_rows=32)

    def chunks():
        return ((train[s:s + train_chunk], labels[s:s + train_chunk]) for s in range(0, 500, train_chunk))

    streamed = knn.knn_predict_streamed(chunks, queries, ks=ks, num_classes=6, temperature=0.07, chunk_rows=32)
    for k in ks:
        assert torch.equal(streamed[k], memory[k])


def test_streamed_knn_refuses_more_neighbours_than_rows():
    train = knn.normalize_rows(torch.randn(10, 4))
    with pytest.raises(ValueError, match="k=20 is more than the 10 train rows"):
        knn.knn_predict_streamed(lambda: [(train, torch.zeros(10, dtype=torch.long))], train, ks=(20,), num_classes=2,
                                 temperature=0.07, chunk_rows=4)
