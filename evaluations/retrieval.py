"""Retrieval metrics on embeddings: Recall@k and mAP@R, each item querying all the others.

References: Musgrave, Belongie & Lim, "A Metric Learning Reality Check" (ECCV 2020) for mAP@R; Recall@k in the
metric-learning sense (Song et al. 2016, "Deep Metric Learning via Lifted Structured Feature Embedding"): a query
scores 1 at k if ANY of its k nearest neighbours has its label.

Conventions:

* cosine similarity: L2-normalised rows (zero rows stay zero), exact faiss search (:mod:`evaluations.search`);
* the query is excluded by its index, not its rank (a duplicate of it is an ordinary neighbour);
* ties go to the lower item index, exactly at the cut-off (a query tied there is searched again with more neighbours);
* queries whose label has no other member are excluded; if every query is, a ValueError is raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from evaluations.checks import check_features, remap_labels
from evaluations.knn import l2_normalize
from evaluations.search import inner_product_topk

__all__ = ["map_at_r", "recall_at_k"]

_BUDGET = 1 << 22  # (query, neighbour) pairs held per chunk: ~50 MiB of sims + indices + sort keys


def _search_sorted(xn: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search k items for each query index; rows sorted by (sim desc, index asc), the query itself moved last.

    Returns (sims float32 (q, k), idx int64 (q, k)).
    """
    sims, idx = inner_product_topk(xn, xn[queries], k)
    is_self = idx == queries[:, None]
    order = np.lexsort((idx, -sims, is_self), axis=-1)
    sims = np.take_along_axis(sims, order, axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    return sims, idx


def _neighbours(xn: np.ndarray, queries: np.ndarray, need: int) -> np.ndarray:
    """Indices (len(queries), need) of each query's ``need`` nearest other items, ranked with ties to the lower index.

    need <= N - 1. Rows are searched in chunks; a row whose cut-off similarity ties
    with its last retrieved one is searched again with twice the neighbours.
    """
    n = xn.shape[0]
    out = np.empty((queries.shape[0], need), dtype=np.int64)
    pending = [(np.arange(queries.shape[0]), min(n, need + 1))]
    while pending:
        rows, k = pending.pop()
        step = max(1, _BUDGET // k)
        for start in range(0, rows.shape[0], step):
            chunk = rows[start : start + step]
            sims, idx = _search_sorted(xn, queries[chunk], k)
            # With the query itself moved last, the first `need` columns are the answer,
            # unless an item faiss did not return (similarity <= the smallest returned)
            # ties with the last one kept.
            if k < n:
                unsure = sims.min(axis=1) == sims[:, need - 1]
            else:
                unsure = np.zeros(chunk.shape[0], dtype=bool)
            out[chunk[~unsure]] = idx[~unsure, :need]
            if unsure.any():
                pending.append((chunk[unsure], min(n, 2 * k)))
    return out


def _prepare(x: Any, y: Any, evaluation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised float32 x, int64 labels 0..C-1, and per-class counts."""
    x, y = check_features(x, y, evaluation=evaluation)
    (labels,), num_classes = remap_labels(y)
    return l2_normalize(x), labels, np.bincount(labels, minlength=num_classes)


def _no_valid_query(evaluation: str, n: int, num_classes: int) -> ValueError:
    return ValueError(
        f"{evaluation}: none of the {n} items shares its label with another item "
        f"({num_classes} classes, all singletons); nothing to retrieve"
    )


def recall_at_k(x: Any, y: Any, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@k (metric-learning sense): share of queries with a same-label item among their k nearest others.

    Args:
        x: (N, D) embeddings (numpy or torch); y: (N,) labels of any sortable dtype.
        ks: cut-offs, integers >= 1; a k >= N - 1 means "all other items".

    Returns:
        {k: recall in [0, 1]} in the order of ``ks``, averaged over the queries whose
        label has at least one other member (the others are excluded).
    """
    evaluation = "recall@k"
    if isinstance(ks, (int, np.integer)):
        ks = (int(ks),)
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"{evaluation}: ks must be a non-empty sequence of integers >= 1, got {ks!r}")
    xn, labels, counts = _prepare(x, y, evaluation)
    n = xn.shape[0]
    valid = np.flatnonzero(counts[labels] >= 2)
    if valid.shape[0] == 0:
        raise _no_valid_query(evaluation, n, counts.shape[0])
    need = min(max(int(k) for k in ks), n - 1)
    hits = labels[_neighbours(xn, valid, need)] == labels[valid][:, None]  # (Q, need)
    first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), need)  # rank (0-based) of the first same-label item
    return {int(k): float(np.mean(first_hit < min(int(k), need))) for k in ks}


def map_at_r(x: Any, y: Any) -> float:
    """mAP@R (Musgrave et al. 2020): mean over queries of (1/R) sum_{i<=R} P(i) rel(i).

    R = number of other items with the query's label, rel(i) = 1 if the i-th nearest
    other item has the query's label, P(i) = (same-label items among the first i) / i.
    Queries with R = 0 are excluded from the mean.

    Args:
        x: (N, D) embeddings (numpy or torch); y: (N,) labels of any sortable dtype.

    Returns:
        mAP@R in [0, 1].
    """
    evaluation = "mAP@R"
    xn, labels, counts = _prepare(x, y, evaluation)
    total, count = 0.0, 0
    for c in np.flatnonzero(counts >= 2):
        queries = np.flatnonzero(labels == c)
        r = int(counts[c]) - 1
        rel = labels[_neighbours(xn, queries, r)] == c  # (n_c, R)
        precision = np.cumsum(rel, axis=1) / np.arange(1, r + 1)
        total += float(np.sum(precision * rel) / r)
        count += queries.shape[0]
    if count == 0:
        raise _no_valid_query(evaluation, xn.shape[0], counts.shape[0])
    return total / count
