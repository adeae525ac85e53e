"""Weighted k-nearest-neighbour classification on frozen embeddings.

Reference: Wu, Xiong, Yu & Lin, "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination" (CVPR 2018), and DINO's
``eval_knn.py`` (Caron et al. 2021): L2-normalise, take the k training
embeddings with the highest cosine similarity s_j, and score each class c as
``sum_j exp(s_j / T) * [y_j == c]``. As in DINO, exp is taken of the raw
similarity (no max subtraction); the vote is accumulated in float64.

Conventions used throughout:
  * k larger than the training set is clipped to N_train.
  * argmax ties go to the lowest class index.
  * Neighbour search is exact (``evaluations.search.inner_product_topk``); the
    order among exactly tied similarities at the k-th place is faiss's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np

from evaluations.search import check_matrix, inner_product_topk

__all__ = ["knn_classify", "knn_evaluate", "knn_evaluate_many", "knn_scores", "l2_normalize"]

log = logging.getLogger(__name__)

# Test rows per vote block: bounds the (rows, C) float64 score block to ~256 MiB.
_VOTE_BUDGET = 1 << 25


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows (last axis) divided by max(||x||_2, eps); zero rows stay zero.

    float32/float64 keep their dtype; other dtypes (fp16, ints) become float32.
    Returns a new array of x's shape.
    """
    x = np.asarray(x)
    if not (isinstance(eps, (int, float, np.floating)) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    norms = np.sqrt(np.einsum("...i,...i->...", x, x))  # no (n, d) temporary
    return x / np.maximum(norms, x.dtype.type(eps))[..., None]


def _check_labels(y: np.ndarray, name: str, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} labels but its features have {n} rows")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype, got {y.dtype}")
    if y.size and y.min() < 0:
        raise ValueError(f"{name} must be non-negative class indices, found {int(y.min())}")
    return y.astype(np.int64, copy=False)


def _check_k_temperature(k: int, temperature: float) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float, np.integer, np.floating))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _resolve_num_classes(num_classes: int | None, max_label: int) -> int:
    if num_classes is None:
        return max_label + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an integer or None, got {num_classes!r}")
    if num_classes <= max_label:
        raise ValueError(
            f"num_classes={num_classes} but the labels go up to {max_label}; num_classes must be > the largest label"
        )
    return int(num_classes)


def _neighbours(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    k: int,
    temperature: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate, normalise, search: (sims float32 (N_test, k'), neighbour labels (N_test, k'), train_y int64)."""
    _check_k_temperature(k, temperature)
    train_x = check_matrix(train_x, "train_x")
    test_x = check_matrix(test_x, "test_x")
    if train_x.shape[0] == 0:
        raise ValueError("train_x must have at least one row")
    train_y = _check_labels(train_y, "train_y", train_x.shape[0])
    if test_x.shape[1] != train_x.shape[1]:
        raise ValueError(f"test_x has dimension {test_x.shape[1]} but train_x has dimension {train_x.shape[1]}")
    if k > train_x.shape[0]:
        log.warning(
            "kNN: k=%d is larger than the %d training samples; using k=%d", k, train_x.shape[0], train_x.shape[0]
        )
    sims, idx = inner_product_topk(l2_normalize(train_x), l2_normalize(test_x), int(k))
    return sims, train_y[idx], train_y


def _vote(sims: np.ndarray, labels: np.ndarray, num_classes: int, temperature: float) -> np.ndarray:
    """Class scores (n, C) float64: score_c = sum_j exp(s_j / T) [labels_j == c]."""
    n = sims.shape[0]
    with np.errstate(over="ignore"):  # overflow is reported below as a ValueError
        weights = np.exp(sims.astype(np.float64) / float(temperature))
    if not np.all(np.isfinite(weights)):
        raise ValueError(
            f"temperature={temperature} is too small: exp(similarity / temperature) "
            f"overflows float64 (need temperature >~ 1/709)"
        )
    flat = (np.arange(n, dtype=np.int64)[:, None] * num_classes + labels).ravel()
    scores = np.bincount(flat, weights=weights.ravel(), minlength=n * num_classes)
    return scores.reshape(n, num_classes)


def _voted_blocks(
    sims: np.ndarray, labels: np.ndarray, num_classes: int, temperature: float
) -> Iterator[tuple[slice, np.ndarray]]:
    """Yield (rows, class scores of those rows) in blocks of at most _VOTE_BUDGET scores."""
    n = sims.shape[0]
    step = max(1, _VOTE_BUDGET // num_classes)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        yield rows, _vote(sims[rows], labels[rows], num_classes, temperature)


def knn_scores(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    *,
    num_classes: int | None = None,
) -> np.ndarray:
    """Weighted kNN class scores (Wu et al. 2018; DINO's eval_knn.py).

    Args:
        train_x: (N_train, D) embeddings; train_y: (N_train,) int labels >= 0.
        test_x: (N_test, D) embeddings. Features need not be normalised.
        k: neighbours (clipped to N_train); temperature: T > 0.
        num_classes: C; default max(train_y) + 1.

    Returns:
        (N_test, C) float64, score_c = sum over the k nearest (cosine) training
        points j of exp(s_j / T) [y_j == c]; 0 for classes with no neighbour.
    """
    sims, labels, train_y = _neighbours(train_x, train_y, test_x, k, temperature)
    c = _resolve_num_classes(num_classes, int(train_y.max()))
    out = np.empty((sims.shape[0], c), dtype=np.float64)
    for rows, scores in _voted_blocks(sims, labels, c, temperature):
        out[rows] = scores
    return out


def knn_classify(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    *,
    num_classes: int | None = None,
) -> np.ndarray:
    """Weighted kNN prediction (Wu et al. 2018; DINO's eval_knn.py).

    L2-normalise, take the cosine similarities s_j of the k nearest training
    embeddings, score_c = sum_j exp(s_j / T) [y_j == c], predict argmax_c
    (ties: lowest class index). Shapes as in :func:`knn_scores`.

    Returns:
        Predicted labels, int64 (N_test,).
    """
    sims, labels, train_y = _neighbours(train_x, train_y, test_x, k, temperature)
    c = _resolve_num_classes(num_classes, int(train_y.max()))
    pred = np.empty(sims.shape[0], dtype=np.int64)
    for rows, scores in _voted_blocks(sims, labels, c, temperature):
        pred[rows] = np.argmax(scores, axis=1)
    return pred


def knn_evaluate(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, float]:
    """Weighted kNN top-1 / top-5 accuracy in [0, 1] (Wu et al. 2018; DINO's eval_knn.py).

    C = max(train_y, test_y) + 1 (a test class absent from training is simply
    never predicted). Classes are ranked by score, ties to the lower index.
    top1: argmax == label (same as :func:`knn_classify`).
    top5: the label is among the min(5, C) highest-ranked classes AND at least
    one of the k neighbours carries it: a class no neighbour voted for (score 0)
    is not a prediction, so it never counts as a hit even when fewer than 5
    classes received votes. (DINO's torch.sort could fill those slots with
    arbitrary zero-score classes.) So top5 >= top1, and with C < 5 top5 is the
    fraction of test points whose label appears among their k neighbours.

    Returns:
        {"top1": float, "top5": float}.
    """
    return knn_evaluate_many(train_x, train_y, test_x, test_y, [(k, temperature)])[(k, temperature)]


def knn_evaluate_many(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    settings: list[tuple[int, float]],
) -> dict[tuple[int, float], dict[str, float]]:
    """:func:`knn_evaluate` for several ``(k, temperature)`` settings from ONE search with the largest k.

    The k nearest neighbours are a prefix of the max-k nearest, so each setting
    votes over the first k columns of the same search. Returns
    ``{(k, temperature): {"top1": ..., "top5": ...}}``.
    """
    if not settings:
        raise ValueError("settings must hold at least one (k, temperature) pair")
    for k, t in settings:
        _check_k_temperature(k, t)
    test_x = check_matrix(test_x, "test_x")
    test_y = _check_labels(test_y, "test_y", test_x.shape[0])
    if test_y.shape[0] == 0:
        raise ValueError("test_x must have at least one row to compute an accuracy")
    k_max = max(k for k, _ in settings)
    sims, labels, train_y = _neighbours(train_x, train_y, test_x, k_max, settings[0][1])
    c = max(int(train_y.max()), int(test_y.max())) + 1
    return {(k, t): _accuracies(sims[:, :k], labels[:, :k], test_y, c, t) for k, t in settings}


def _accuracies(
    sims: np.ndarray, labels: np.ndarray, test_y: np.ndarray, c: int, temperature: float
) -> dict[str, float]:
    top = min(5, c)
    hits1 = hits5 = 0
    for rows, scores in _voted_blocks(sims, labels, c, temperature):
        y = test_y[rows]
        n = scores.shape[0]
        s_true = scores[np.arange(n), y][:, None]
        ahead = (scores > s_true) | ((scores == s_true) & (np.arange(c)[None, :] < y[:, None]))
        rank = ahead.sum(axis=1)  # 0 <=> argmax with lowest-index tie-break
        voted = (labels[rows] == y[:, None]).any(axis=1)
        hit1 = np.argmax(scores, axis=1) == y
        hits1 += int(hit1.sum())
        hits5 += int((hit1 | ((rank < top) & voted)).sum())
    n_test = test_y.shape[0]
    return {"top1": hits1 / n_test, "top5": hits5 / n_test}
