"""Recall@k and mAP@R (evaluations.retrieval): hand-worked cases and a brute-force numpy reference.

Reference: Musgrave, Belongie & Lim, "A Metric Learning Reality Check" (2020).
The reference below builds the full float64 similarity matrix, removes the
diagonal, ranks by (similarity desc, index asc) and applies the definitions
literally, one query at a time.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluations import retrieval
from evaluations.retrieval import map_at_r, recall_at_k


def unit(deg):
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


def reference(x, y, ks):
    x = np.asarray(x, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    n = len(x)
    recalls = {k: [] for k in ks}
    aps = []
    for q in range(n):
        others = np.array([j for j in range(n) if j != q])
        ranked = others[np.lexsort((others, -sim[q, others]))]
        rel = (y[ranked] == y[q]).astype(float)
        r = int(rel.sum())
        if r == 0:
            continue
        for k in ks:
            recalls[k].append(float(rel[:k].any()))
        aps.append(sum(rel[i] * rel[: i + 1].sum() / (i + 1) for i in range(r)) / r)
    return {k: float(np.mean(v)) for k, v in recalls.items()}, float(np.mean(aps))


# ------------------------------------------------------------ hand worked

# Items (angle in degrees, label); item 4 is a singleton and never a query.
#   0: 0 deg, label 0      1: +40 deg, label 1      2: -40 deg, label 0
#   3: 0 deg, label 1 (a duplicate of item 0)        4: 180 deg, label 2
# Rankings (similarity desc, ties to the lower index), the query itself excluded:
#   q0: 3 (sim 1), 1 and 2 (cos 40, tie -> 1 first), 4   labels 1, 1, 0, 2   R = 1
#   q1: 0 and 3 (cos 40, tie -> 0 first), 2, 4            labels 0, 1, 0, 2   R = 1
#   q2: 0 and 3 (cos 40, tie -> 0 first), 1, 4            labels 0, 1, 1, 2   R = 1
#   q3: 0 (sim 1), 1 and 2 (tie -> 1 first), 4           labels 0, 1, 0, 2   R = 1
# First same-label rank: q0 3, q1 2, q2 1, q3 2.  AP@R (R = 1) = [rank == 1]: 0, 0, 1, 0.
HAND_X = np.array([unit(0), unit(40), unit(-40), unit(0), unit(180)], dtype=np.float32)
HAND_Y = np.array([0, 1, 0, 1, 2])


def test_hand_worked_recall_and_map():
    assert recall_at_k(HAND_X, HAND_Y, ks=(1, 2, 3, 4)) == {1: 0.25, 2: 0.75, 3: 1.0, 4: 1.0}
    assert map_at_r(HAND_X, HAND_Y) == 0.25
    # the reference agrees (and so checks itself on the hand-worked case)
    assert reference(HAND_X, HAND_Y, (1, 2, 3)) == ({1: 0.25, 2: 0.75, 3: 1.0}, 0.25)


def test_ties_go_to_the_lower_index():
    # Only query 0 has a tie: items 1 and 2 sit at +-40 deg, both at similarity cos 40.
    #   0: 0 deg, label 0    1: +40 deg, label 1    2: -40 deg, label 0    3: 170 deg, label 1
    # q0: 1, 2 (tie -> 1 first), 3 -> labels 1, 0, 1: rank 2
    # q1: 0 (40 deg), 2 (80), 3 (130) -> 0, 0, 1: rank 3
    # q2: 0 (40 deg), 1 (80), 3 (150) -> 0: rank 1
    # q3: 1 (130 deg), 2 (150), 0 (170) -> 1: rank 1
    x = np.array([unit(0), unit(40), unit(-40), unit(170)], dtype=np.float32)
    y = np.array([0, 1, 0, 1])
    assert recall_at_k(x, y, ks=(1, 2, 3)) == {1: 0.5, 2: 0.75, 3: 1.0}
    assert map_at_r(x, y) == 0.5
    # The same points with the tied pair's indices swapped: now the same-label item
    # has the lower index and wins the tie, so q0 hits at rank 1 (and q1, q2 trade places).
    x2, y2 = x[[0, 2, 1, 3]], y[[0, 2, 1, 3]]
    assert recall_at_k(x2, y2, ks=(1, 2, 3)) == {1: 0.75, 2: 0.75, 3: 1.0}
    assert map_at_r(x2, y2) == 0.75


def test_duplicate_of_the_query_is_a_neighbour():
    # query 0 and its exact duplicate 1 have different labels: the duplicate is q0's
    # nearest neighbour (the query is excluded by index, not by dropping rank 0)
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [0.6, 0.8]], dtype=np.float32)
    y = np.array([0, 1, 0, 1])
    # q0: 1, 2, 3 -> 1, 0, 1 (R=1): rank 2;  q1: 0, 2, 3 -> 0, 0, 1: rank 3
    # q2: 3 (sim 0.96), 0 and 1 (0.8, tie) -> 1, 0, 1: rank 2;  q3: 2 (0.96), 0, 1 -> 0, 0, 1: rank 3
    assert recall_at_k(x, y, ks=(1, 2, 3)) == {1: 0.0, 2: 0.5, 3: 1.0}
    assert map_at_r(x, y) == 0.0


def test_all_ties_across_the_search_cut_off():
    # collapsed embedding: every similarity ties, ranking = other items by index.
    # k=1 searches 2 of 50 items; the tie at the cut-off forces re-searches up to all 50.
    x = np.ones((50, 4), dtype=np.float32)
    y = np.arange(50) % 3
    # recall@1: the nearest is item 0 (item 1 for q0); hits = queries of label 0 other than 0
    assert recall_at_k(x, y, ks=(1,)) == {1: 16 / 50}
    want_recall, want_map = reference(x, y, (1, 2, 7))
    assert recall_at_k(x, y, ks=(1, 2, 7)) == pytest.approx(want_recall, abs=1e-12)
    assert map_at_r(x, y) == pytest.approx(want_map, abs=1e-12)


def test_all_singletons_is_an_error():
    with pytest.raises(ValueError, match="none of the 3 items shares its label"):
        recall_at_k(np.eye(3), np.arange(3))
    with pytest.raises(ValueError, match="none of the 3 items shares its label"):
        map_at_r(np.eye(3), np.arange(3))


def test_k_beyond_n_means_all_other_items():
    assert recall_at_k(HAND_X, HAND_Y, ks=(100,)) == {100: 1.0}


# ------------------------------------------------------- brute force reference


def random_data(seed=0, n=240, dim=8, num_classes=7):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim))
    y = rng.integers(0, num_classes, n)
    y[0] = 99  # a singleton class: excluded from both metrics
    x = np.concatenate([means, [np.zeros(dim)]])[np.minimum(y, num_classes)] + 1.2 * rng.normal(size=(n, dim))
    return (x * rng.uniform(0.1, 10, (n, 1))).astype(np.float32), y


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force_reference(seed):
    x, y = random_data(seed)
    ks = (1, 5, 10, 30)
    want_recall, want_map = reference(x, y, ks)
    got = recall_at_k(x, y, ks=ks)
    assert list(got) == list(ks)
    assert got == pytest.approx(want_recall, abs=1e-12)
    assert map_at_r(x, y) == pytest.approx(want_map, abs=1e-12)
    assert 0.1 < want_map < 0.9 and want_recall[1] < want_recall[5] < 1  # not degenerate


def test_chunking_is_invisible(monkeypatch):
    x, y = random_data(2)
    want = recall_at_k(x, y, ks=(1, 3)), map_at_r(x, y)
    monkeypatch.setattr(retrieval, "_BUDGET", 7)  # a handful of queries per faiss call
    assert (recall_at_k(x, y, ks=(1, 3)), map_at_r(x, y)) == want


def test_torch_input_and_string_labels():
    x, y = random_data(3, n=60)
    names = np.array([f"class-{v}" for v in y])
    assert recall_at_k(torch.from_numpy(x), names) == recall_at_k(x, y)
    assert map_at_r(torch.from_numpy(x), torch.from_numpy(y)) == map_at_r(x, y)


def test_bad_input():
    x, y = random_data(n=30)
    with pytest.raises(ValueError, match="ks must be"):
        recall_at_k(x, y, ks=(0, 5))
    with pytest.raises(ValueError, match="ks must be"):
        recall_at_k(x, y, ks=())
    with pytest.raises(ValueError, match="recall@k: 30 embedding rows but 29 labels"):
        recall_at_k(x, y[:-1])
    bad = x.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"mAP@R: 1 of 30 embedding rows contain NaN or inf"):
        map_at_r(bad, y)
