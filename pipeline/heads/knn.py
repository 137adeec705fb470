"""The weighted k-nearest-neighbour classifier of DINO's ``eval_knn.py``, on cached features.

Train and val features are L2-normalised, so a dot product is a cosine similarity. Each val row takes
its k most similar train rows; each of them votes for its own class with weight ``exp(similarity / T)``
(T = 0.07 by default, HeadConfig.knn_temperature), and a class's score is the sum of its votes. Nothing is trained.

Similarities are computed for ``chunk_rows`` val rows at a time, so beyond the features themselves the
memory is one (chunk_rows, N) block, never (M, N). The top-k search runs once per chunk with the largest
k; a smaller k reuses the first k of those neighbours (they come sorted by similarity).
"""
from __future__ import annotations

import torch
from tqdm import tqdm

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
        for k in ks:
            scores = class_scores(nearest[:, :k], labels[:, :k], num_classes, temperature, shift=True)
            ranked[k].append(scores.topk(top, dim=1).indices)
    return {k: torch.cat(parts) if parts else torch.zeros(0, top, dtype=torch.long) for k, parts in ranked.items()}


def accuracy(ranked: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 and top-5 (in %) of ranked predictions (M, 5) against labels (M,)."""
    labels = labels.to(ranked.device)
    n = max(len(labels), 1)
    return {"val_top1": 100.0 * (ranked[:, 0] == labels).sum().item() / n,
            "val_top5": 100.0 * (ranked == labels[:, None]).any(1).sum().item() / n}

