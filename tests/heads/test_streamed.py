"""The logreg and kNN heads stream when the features do not fit in memory (or with --stream), and give what the
in-memory heads give: kNN the same neighbours (up to exact ties), logreg the same objective within 1e-4.

Also: dead (all-zero) feature columns are left out of the logreg solve without changing its optimum.
"""
from __future__ import annotations

import logging

import pytest
import torch

from pipeline.heads import readers
from pipeline.heads.solvers.path import fit_logreg
from tests.helpers import read_csv, train_quick_head, write_synthetic_cache

HEADS = ("--head", "logreg,knn", "--k", "1,5,20", "--weight-decay", "0.1,0.01")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("cache") / "feats", classes=4, train_per_class=30,
                                 val_per_class=10, dim=64, signal=0.3)


@pytest.fixture(scope="module")
def in_memory(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "memory"
    assert train_quick_head(cache, out, *HEADS) == 0
    return out


def spy_chunks(monkeypatch) -> list[int]:
    """Record the rows of every chunk a streamed head reads."""
    sizes, chunks = [], readers.FeatureReader.chunks

    def recording(self, *args, **kwargs):
        factory = chunks(self, *args, **kwargs)

        def counted():
            for x, y in factory():
                sizes.append(len(x))
                yield x, y

        return counted

    monkeypatch.setattr(readers.FeatureReader, "chunks", recording)
    return sizes


def assert_same_results(streamed, in_memory) -> None:
    knn_memory = read_csv(in_memory / "fc7_knn_all" / "knn.csv")
    knn_streamed = read_csv(streamed / "fc7_knn_all" / "knn.csv")
    assert knn_streamed == knn_memory  # every k: the same top-1 and top-5
    path_memory = read_csv(in_memory / "fc7_logreg_all" / "path.csv")
    path_streamed = read_csv(streamed / "fc7_logreg_all" / "path.csv")
    assert [row["weight_decay"] for row in path_streamed] == [row["weight_decay"] for row in path_memory]
    for fast, slow in zip(path_streamed, path_memory):
        assert fast["stopped"] == "converged"
        assert float(fast["objective"]) == pytest.approx(float(slow["objective"]), rel=1e-4)
        scored = "held_top1" if fast["held_top1"] else "val_top1"  # the path on held-out rows; the refit on val
        assert float(fast[scored]) == pytest.approx(float(slow[scored]), abs=100 / 12 + 1e-9)  # one held-out row of 12
    assert "(streamed)" in (streamed / "fc7_logreg_all" / "report.md").read_text()
    assert "(streamed)" in (streamed / "fc7_knn_all" / "report.md").read_text()
    assert "(streamed)" not in (in_memory / "fc7_logreg_all" / "report.md").read_text()


def test_stream_flag_gives_the_in_memory_results_in_bounded_chunks(cache, in_memory, tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "STREAM_ROWS", 16)
    sizes = spy_chunks(monkeypatch)
    out = tmp_path / "streamed"
    assert train_quick_head(cache, out, *HEADS, "--stream") == 0
    assert_same_results(out, in_memory)
    assert sizes and max(sizes) <= 16  # no pass held more than one chunk of rows


def test_a_grid_whose_train_features_do_not_fit_streams_instead_of_refusing(cache, in_memory, tmp_path,
                                                                             monkeypatch, caplog):
    # room for val (40 x 64 float32, 10 KiB) but not for train (120 rows, 30 KiB) in 70 % of what is "free"
    monkeypatch.setattr(readers, "available_memory", lambda: 20_000)
    out = tmp_path / "big"
    with caplog.at_level(logging.INFO):
        assert train_quick_head(cache, out, *HEADS) == 0
    assert_same_results(out, in_memory)
    said = caplog.text
    assert "logreg:" in said and "knn:" in said and said.count("does not fit in memory: streaming it") >= 2
    assert (out / "best.pt").is_file()


def test_the_in_memory_heads_refuse_nothing_that_fits(in_memory):
    assert (in_memory / "experiments.csv").is_file()
    assert "(streamed)" not in (in_memory / "fc7_knn_all" / "report.md").read_text()


def test_dead_columns_are_left_out_without_moving_the_optimum():
    generator = torch.Generator().manual_seed(3)
    y = torch.arange(200) % 4
    x = torch.randn(4, 30, generator=generator)[y] * 0.7 + torch.randn(200, 30, generator=generator)
    x[:, ::3] = 0  # a third of the units never fire
    val_x, val_y = x[:50].clone(), y[:50]
    kept = x.clone()
    dropped = fit_logreg(x, y, val_x, val_y, num_classes=4, weight_decays=(0.1, 0.01))
    assert torch.equal(x, kept)  # the caller's features are untouched unless it gives them up
    assert dropped.weight.shape == (4, 30) and not dropped.weight[:, ::3].any()
    x[:, ::3] = 1e-30  # the same problem to float32 precision, but no column is all zero: nothing is dropped
    full = fit_logreg(x, y, val_x, val_y, num_classes=4, weight_decays=(0.1, 0.01))
    for a, b in zip(dropped.fits, full.fits):
        assert a.objective == pytest.approx(b.objective, rel=1e-5)
    in_place = fit_logreg(kept, y, val_x, val_y, num_classes=4, weight_decays=(0.1, 0.01), overwrite=True)
    # the squeezed view keeps x's row stride, so BLAS may take another kernel than for the copy: equal to float32
    # rounding (exactly on Intel; 6e-9 apart on an AMD EPYC, Zen 4)
    assert [f.objective for f in in_place.fits] == pytest.approx([f.objective for f in dropped.fits], rel=1e-6)
