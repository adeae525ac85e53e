"""Image-text evaluations (Radford et al. 2021, CLIP): zero-shot classification and cross-modal Recall@k.

    top1 = zero_shot_top1(image_emb, class_text_emb, labels)          # cosine argmax over the class prompts
    i2t = cross_modal_recall(image_emb, caption_emb, ks=(1, 5))        # image i's match is caption i
    t2i = cross_modal_recall(caption_emb, image_emb, ks=(1, 5), groups=caption_ids)

Both compare L2-normalised rows by cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from evaluations.checks import check_features
from evaluations.knn import l2_normalize

__all__ = ["class_embeddings", "cross_modal_recall", "zero_shot_top1"]

_CHUNK = 1024  # queries per similarity block


def class_embeddings(prompt_emb: Any, num_classes: int) -> np.ndarray:
    """Prompt embeddings (C * P, D), class-major, -> one (C, D) embedding per class: the mean of its P normalised
    prompts, normalised again (CLIP's prompt ensembling)."""
    x = l2_normalize(check_features(prompt_emb, evaluation="zero-shot prompts"))
    if x.shape[0] % num_classes:
        raise ValueError(
            f"zero-shot prompts: {x.shape[0]} prompt embeddings do not split evenly into {num_classes} classes"
        )
    return l2_normalize(x.reshape(num_classes, -1, x.shape[1]).mean(axis=1))


def zero_shot_top1(image_emb: Any, class_text_emb: Any, labels: Any) -> float:
    """Share of images whose most similar (cosine) class embedding is their label's.

    image_emb: (N, D); class_text_emb: (C, D), row c the text embedding of class c; labels: (N,) in 0..C-1.
    """
    image, labels = check_features(image_emb, labels, evaluation="zero-shot")
    classes = check_features(class_text_emb, evaluation="zero-shot (class embeddings)")
    if image.shape[1] != classes.shape[1]:
        raise ValueError(
            f"zero-shot: image embeddings have {image.shape[1]} dimensions, class embeddings {classes.shape[1]}"
        )
    predictions = (l2_normalize(image) @ l2_normalize(classes).T).argmax(axis=1)
    return float(np.mean(predictions == labels))


def cross_modal_recall(
    query: Any, gallery: Any, ks: Sequence[int] = (1, 5, 10), groups: Any = None
) -> dict[int, float]:
    """Recall@k across modalities: share of queries with a match among their k most similar gallery items.

    Query i's match is gallery item i; with ``groups`` ((N,) ids, e.g. of identical captions), every
    gallery item j with ``groups[j] == groups[i]`` is a match too. The rank of query i is the number of
    non-matching items at least as similar as its best match (ties count against the query, so
    collapsed embeddings score 0 rather than 1); a hit at k is rank < k.

    query, gallery: (N, D) paired embeddings. Returns {k: recall in [0, 1]} in the order of ``ks``.
    """
    q = l2_normalize(check_features(query, evaluation="cross-modal recall (queries)"))
    g = l2_normalize(check_features(gallery, evaluation="cross-modal recall (gallery)"))
    if q.shape != g.shape:
        raise ValueError(f"cross-modal recall: queries {q.shape} and gallery {g.shape} must be paired (same shape)")
    if not ks or any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
        raise ValueError(f"cross-modal recall: ks must be integers >= 1, got {list(ks)!r}")
    n = q.shape[0]
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"cross-modal recall: groups must have shape ({n},), got {groups.shape}")
    ranks = np.empty(n, dtype=np.int64)
    for start in range(0, n, _CHUNK):
        sims = q[start : start + _CHUNK] @ g.T  # (c, N)
        match = groups[start : start + _CHUNK, None] == groups[None, :]
        best = np.where(match, sims, -np.inf).max(axis=1, keepdims=True)
        ranks[start : start + _CHUNK] = ((sims >= best) & ~match).sum(axis=1)
    return {int(k): float(np.mean(ranks < k)) for k in ks}
