"""The weighted k-nearest-neighbour classifier of DINO's ``eval_knn.py``, on cached features.

Train and val features are L2-normalised, so a dot product is a cosine similarity. Each val row takes
its k most similar train rows; each of them votes for its own class with weight ``exp(similarity / T)``
(T = 0.07 by default, HeadConfig.temperature), and a class's score is the sum of its votes. Nothing is trained.

Similarities are computed for ``chunk_rows`` val rows at a time, so beyond the features themselves the
memory is one (chunk_rows, N) block, never (M, N). The top-k search runs once per chunk with the largest
k; a smaller k reuses the first k of those neighbours (they come sorted by similarity).

``fit`` is this head's entry point (pipeline.heads.interface): one search answering every --k, returned as a
``KnnResult`` (each k's accuracy, the chosen k's predictions; with --select train-split, k is chosen on held-out
train rows first); pipeline.heads.publish writes its files.

``knn_predict_streamed`` does the same search when the train features do not fit in memory (or with
--stream): it reads them once, in row chunks, and keeps a running top-k of every val row: (M, k)
similarities and labels. ``fit`` takes it then; the result equals the in-memory one up to exact ties.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from pipeline.heads.interface import HeadResult, HeadSettings, Predictions, mean_per_class
from pipeline.heads.readers import FeatureReader
from pipeline.heads.selection import held_out

log = logging.getLogger(__name__)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in place for float32 (an all-zero row stays zero)."""
    x = x if x.dtype == torch.float32 else x.float()
    return x.div_(x.norm(dim=1, keepdim=True).clamp_min_(1e-12))


def class_scores(similarities: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int,
                 temperature: float, *, shift: bool = False) -> torch.Tensor:
    """(B, C) summed votes: neighbour j of row i adds exp(similarities[i, j] / T) to its class.

    ``shift``: divide each row's votes by exp(max_j s[i, j] / T), one factor per row, so the class ranking is
    the same but a tiny T cannot overflow (exp(1 / 1e-9) is inf, and inf - inf is NaN).
    """
    if shift:
        similarities = similarities - similarities.amax(1, keepdim=True)
    votes = (similarities / temperature).exp()  # (B, k)
    scores = torch.zeros(len(similarities), num_classes, device=similarities.device, dtype=votes.dtype)
    return scores.scatter_add_(1, neighbour_labels, votes)


@torch.inference_mode()
def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, *, ks: tuple[int, ...],
                num_classes: int, temperature: float, chunk_rows: int,
                progress: bool = False) -> dict[int, torch.Tensor]:
    """{k: (M, min(5, C)) classes ranked by score} for every k, from one top-k search per chunk.

    ``train`` (N, D) and ``queries`` (M, D) must already be L2-normalised (``normalize_rows``); ``ks``
    must not exceed N.
    """
    k_max = max(ks)
    top = min(5, num_classes)
    ranked = {k: [] for k in ks}
    for start in tqdm(range(0, len(queries), chunk_rows), desc="knn", unit="chunk", leave=False,
                      disable=not progress):
        similarity = queries[start:start + chunk_rows] @ train.T  # (B, N): the only large block
        nearest, index = similarity.topk(k_max, dim=1, largest=True, sorted=True)  # (B, k_max)
        del similarity
        labels = train_labels[index]  # (B, k_max)
        for k, classes in rank_neighbours(nearest, labels, ks, num_classes, temperature).items():
            ranked[k].append(classes)
    return {k: torch.cat(parts) if parts else torch.zeros(0, top, dtype=torch.long) for k, parts in ranked.items()}


def rank_neighbours(nearest: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...], num_classes: int,
                    temperature: float) -> dict[int, torch.Tensor]:
    """{k: (B, min(5, C)) classes ranked by the votes of the first k neighbours} from sorted (B, k_max) neighbours."""
    top = min(5, num_classes)
    return {k: class_scores(nearest[:, :k], labels[:, :k], num_classes, temperature, shift=True).topk(top, dim=1).indices
            for k in ks}


@torch.inference_mode()
def knn_predict_streamed(train_chunks: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], queries: torch.Tensor,
                         *, ks: tuple[int, ...], num_classes: int, temperature: float, chunk_rows: int,
                         progress: bool = False) -> dict[int, torch.Tensor]:
    """``knn_predict`` with the train rows read once, as (x (B, D) L2-normalised, labels (B,)) chunks.

    Equal to the in-memory search up to exact similarity ties (which of two equal neighbours is kept).
    Memory: the queries, a running (M, k_max) top-k, and one (chunk_rows, B) similarity block.
    """
    k_max, rows = max(ks), 0
    best = torch.full((len(queries), 0), -torch.inf, device=queries.device)  # (M, <= k_max) sorted similarities
    best_labels = torch.zeros((len(queries), 0), dtype=torch.long, device=queries.device)
    for train, train_labels in tqdm(train_chunks(), desc="knn", unit="chunk", leave=False, disable=not progress):
        train_labels = train_labels.to(queries.device)
        merged, merged_labels = [], []
        for start in range(0, len(queries), chunk_rows):
            similarity = queries[start:start + chunk_rows] @ train.T  # (b, B)
            candidates = torch.cat([best[start:start + chunk_rows], similarity], dim=1)
            labels = torch.cat([best_labels[start:start + chunk_rows],
                                train_labels.expand(len(similarity), -1)], dim=1)
            nearest, index = candidates.topk(min(k_max, candidates.shape[1]), dim=1, largest=True, sorted=True)
            merged.append(nearest)
            merged_labels.append(labels.gather(1, index))
        if merged:
            best, best_labels = torch.cat(merged), torch.cat(merged_labels)
        rows += len(train_labels)
    if rows < k_max:
        raise ValueError(f"k={k_max} is more than the {rows} train rows")
    if not len(queries):
        return {k: torch.zeros(0, min(5, num_classes), dtype=torch.long) for k in ks}
    return rank_neighbours(best, best_labels, ks, num_classes, temperature)


def accuracy(ranked: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 and top-5 (in %) of ranked predictions (M, 5) against labels (M,)."""
    labels = labels.to(ranked.device)
    n = max(len(labels), 1)
    return {"val_top1": 100.0 * (ranked[:, 0] == labels).sum().item() / n,
            "val_top5": 100.0 * (ranked == labels[:, None]).any(1).sum().item() / n}


# ---------------------------------------------------------------------------------------------
# The head's entry point


@dataclass(frozen=True)
class KnnScore:
    """One --k and its accuracy on val (and, with train-split, on the held-out rows): one row of knn.csv."""

    k: int
    k_used: int  # the neighbours that voted: k, or every train row when k is more than them
    val_top1: float  # %
    val_top5: float  # %
    mean_per_class: float = float("nan")  # % on val: the mean of each class's top-1
    held_top1: float | None = None  # % on the held-out train rows, neighbours from the other train rows (train-split)
    held_top5: float | None = None


@dataclass(frozen=True, kw_only=True)
class KnnResult(HeadResult):
    """A kNN run: every k from one search; nothing is trained, so there is no checkpoint."""

    scores: tuple[KnnScore, ...]  # one per --k, in the order asked
    best: KnnScore  # the chosen k: the best held-out top-1 (train-split) or val top-1 (val); the first of equals
    predictions: Predictions  # of the chosen k on val
    temperature: float
    streamed: bool  # the train features were read once from disk, in chunks
    selected_by: str = "val"  # "train-split" or "val"
    held_images: int = 0  # train-split: the held-out rows k was chosen on


def _used(ks: tuple[int, ...], rows: int) -> dict[int, int]:
    """Each k, and the neighbours it gets from ``rows`` train rows (all of them when k is more)."""
    return {k: min(k, rows) for k in ks}


def fit(train: FeatureReader, val: FeatureReader, settings: HeadSettings) -> KnnResult:
    """Every --k from one search with the largest; a k above the train rows uses them all (and says so).

    With --select train-split, k is chosen first on the held-out train rows (their neighbours from the other train
    rows; pipeline.heads.selection), then every train row answers val in one search.
    """
    start = time.perf_counter()
    config, device = settings.config, settings.device
    count = train.num_rows
    val_x, val_y = val.load_float32(device, config.progress)
    normalize_rows(val_x)
    used = _used(config.k, count)
    for k, k_used in used.items():
        if k_used < k:
            log.warning("knn: k=%d is more than the %d train images; it uses all %d", k, count, count)
    selection = (held_out(train.paths, train.labels, config.select_fraction, train.split.wnids)
                 if config.select_for("knn") == "train-split" else None)
    search = dict(num_classes=len(train.split.wnids), temperature=config.temperature, chunk_rows=config.knn_chunk_rows,
                  progress=config.progress)
    extra = config.knn_chunk_rows * count * 4 * 2  # one (chunk, N) similarity block and its top-k work
    streamed = bool(config.stream) or not train.fits_float32(device, extra)
    if streamed and not config.stream:
        log.info("knn: %s (%d rows, %.1f GiB as float32) does not fit in memory: streaming it, one pass with "
                 "a running top-%d", train.split.path, count, train.float32_bytes() / 2**30, max(used.values()))
    held = None
    if streamed:
        if selection is not None:
            held_x, held_y = train.part(selection.held).load_float32(device, config.progress)
            fit_used = _used(config.k, len(selection.fit))
            held = (knn_predict_streamed(train.part(selection.fit).chunks(device, transform=normalize_rows),
                                         normalize_rows(held_x), ks=tuple(sorted(set(fit_used.values()))), **search),
                    held_y, fit_used)
        ranked = knn_predict_streamed(train.chunks(device, transform=normalize_rows), val_x,
                                      ks=tuple(sorted(set(used.values()))), **search)
    else:  # the fit rows first, the held-out rows last: one tensor serves both searches
        ordered = train if selection is None else train.part(selection.order)
        train_x, train_y = ordered.load_float32(device, config.progress, extra_bytes=extra)
        normalize_rows(train_x)
        if selection is not None:
            n, fit_used = len(selection.fit), _used(config.k, len(selection.fit))
            held = (knn_predict(train_x[:n], train_y[:n], train_x[n:], ks=tuple(sorted(set(fit_used.values()))),
                                **search), train_y[n:], fit_used)
        ranked = knn_predict(train_x, train_y, val_x, ks=tuple(sorted(set(used.values()))), **search)
    scores = tuple(_score(k, used[k], ranked, val_y, held) for k in config.k)
    best = max(scores, key=lambda score: score.val_top1 if held is None else score.held_top1)  # max: the first of equals
    predictions = Predictions.of(ranked[best.k_used][:, 0].cpu().numpy(), val_y.cpu().numpy(), best.val_top1,
                                 best.val_top5)
    return KnnResult(scores=scores, best=best, predictions=predictions, temperature=config.temperature,
                     streamed=streamed, selected_by="val" if selection is None else "train-split",
                     held_images=0 if selection is None else len(selection.held), train_images=count,
                     seconds=time.perf_counter() - start)


def _score(k: int, k_used: int, ranked: dict, val_y: torch.Tensor, held) -> KnnScore:
    """One k's accuracy on val, and on the held-out rows when ``held`` is (their ranked classes, labels, k used)."""
    on_val = accuracy(ranked[k_used], val_y)
    per_class = mean_per_class(ranked[k_used][:, 0].cpu().numpy(), val_y.cpu().numpy())
    if held is None:
        return KnnScore(k=k, k_used=k_used, **on_val, mean_per_class=per_class)
    held_ranked, held_y, fit_used = held
    on_held = accuracy(held_ranked[fit_used[k]], held_y)
    return KnnScore(k=k, k_used=k_used, **on_val, mean_per_class=per_class, held_top1=on_held["val_top1"],
                    held_top5=on_held["val_top5"])
