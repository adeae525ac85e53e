"""Weighted kNN (evaluations.knn) and exact inner-product search (evaluations.search).

References: Wu et al. 2018 (non-parametric instance discrimination) and DINO's
eval_knn.py. The brute-force reference below is written independently of the
implementation: full similarity matrix, argsort, explicit per-neighbour vote.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import top_k_accuracy_score

from evaluations import search
from evaluations.knn import knn_classify, knn_evaluate, knn_evaluate_many, knn_scores, l2_normalize
from evaluations.search import inner_product_topk

# ---------------------------------------------------------------- reference


def brute_force_scores(train_x, train_y, test_x, k, temperature, num_classes):
    """Reference vote in float64 with a full (N_test, N_train) similarity matrix."""
    a = train_x.astype(np.float64)
    b = test_x.astype(np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    sim = b @ a.T
    k = min(k, len(a))
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    scores = np.zeros((len(b), num_classes))
    for i in range(len(b)):
        for j in order[i]:
            scores[i, train_y[j]] += math.exp(sim[i, j] / temperature)
    return scores, sim


def make_data(seed=0, n_train=200, n_test=50, dim=16, num_classes=10):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim))
    train_y = rng.integers(0, num_classes, size=n_train)
    test_y = rng.integers(0, num_classes, size=n_test)
    # class structure + noise, rows of very different norms (cosine must ignore them)
    train_x = (means[train_y] + 1.5 * rng.normal(size=(n_train, dim))) * rng.uniform(0.1, 10, (n_train, 1))
    test_x = (means[test_y] + 1.5 * rng.normal(size=(n_test, dim))) * rng.uniform(0.1, 10, (n_test, 1))
    return train_x.astype(np.float32), train_y, test_x.astype(np.float32), test_y


def unit(deg):
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


# ---------------------------------------------------------- kNN vs reference


@pytest.mark.parametrize(
    "k,temperature",
    [(1, 0.07), (5, 0.07), (20, 0.07), (20, 0.5), (7, 1.0), (200, 0.07), (200, 0.03)],
)
def test_knn_matches_brute_force(k, temperature):
    train_x, train_y, test_x, _ = make_data()
    assert k <= len(train_x)
    ref, sim = brute_force_scores(train_x, train_y, test_x, k, temperature, 10)
    if k < len(train_x):  # well-posed: no near-tie at the k-th neighbour boundary
        s = -np.sort(-sim, axis=1)
        assert np.min(s[:, k - 1] - s[:, k]) > 1e-5

    got = knn_scores(train_x, train_y, test_x, k=k, temperature=temperature)
    assert got.shape == (50, 10) and got.dtype == np.float64
    # similarities are float32 (error ~1e-7), so exp(s / T) carries a relative error ~1e-7 / T
    np.testing.assert_allclose(got, ref, rtol=1e-6 + 3e-7 / temperature, atol=0)

    pred = knn_classify(train_x, train_y, test_x, k=k, temperature=temperature)
    assert pred.dtype == np.int64 and pred.shape == (50,)
    np.testing.assert_array_equal(pred, np.argmax(ref, axis=1))
    # non-trivial: predictions are not all one class
    assert len(np.unique(pred)) > 3


def test_k_larger_than_train_is_clipped():
    train_x, train_y, test_x, _ = make_data(n_train=30)
    ref, _ = brute_force_scores(train_x, train_y, test_x, 30, 0.07, 10)
    got = knn_scores(train_x, train_y, test_x, k=1000, temperature=0.07)
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=0)


def test_num_classes_pads_score_columns():
    train_x, train_y, test_x, _ = make_data()
    got = knn_scores(train_x, train_y, test_x, k=5, num_classes=13)
    assert got.shape == (50, 13)
    assert np.all(got[:, 10:] == 0)
    np.testing.assert_array_equal(got[:, :10], knn_scores(train_x, train_y, test_x, k=5))


def test_fp16_and_float64_features_accepted():
    train_x, train_y, test_x, _ = make_data()
    p32 = knn_classify(train_x, train_y, test_x, k=10)
    p64 = knn_classify(train_x.astype(np.float64), train_y, test_x.astype(np.float64), k=10)
    np.testing.assert_array_equal(p32, p64)
    # fp16 rounding may move a borderline neighbour; most predictions must agree
    p16 = knn_classify(train_x.astype(np.float16), train_y, test_x.astype(np.float16), k=10)
    assert np.mean(p16 == p32) > 0.9


# ------------------------------------------------------------ hand computed


def test_weighted_vote_beats_majority_with_small_temperature():
    # query along +x; one class-1 point 5 deg away, two class-0 points 40 deg away,
    # one class-2 point opposite (never among the k=3 neighbours).
    train_x = np.array([unit(5), unit(40), unit(-40), unit(180)], dtype=np.float32)
    train_y = np.array([1, 0, 0, 2])
    test_x = np.array([[3.0, 0.0]], dtype=np.float32)
    c5, c40 = math.cos(math.radians(5)), math.cos(math.radians(40))

    t = 0.05  # exp(0.9962/0.05) ~ 4.5e8 vs 2*exp(0.7660/0.05) ~ 9.0e6: class 1 wins
    expected = np.array([[2 * math.exp(c40 / t), math.exp(c5 / t), 0.0]])
    np.testing.assert_allclose(knn_scores(train_x, train_y, test_x, k=3, temperature=t), expected, rtol=1e-6)
    assert knn_classify(train_x, train_y, test_x, k=3, temperature=t).tolist() == [1]

    t = 1.0  # 2*exp(0.766) = 4.30 vs exp(0.996) = 2.71: the majority (class 0) wins
    expected = np.array([[2 * math.exp(c40 / t), math.exp(c5 / t), 0.0]])
    np.testing.assert_allclose(knn_scores(train_x, train_y, test_x, k=3, temperature=t), expected, rtol=1e-6)
    assert knn_classify(train_x, train_y, test_x, k=3, temperature=t).tolist() == [0]

    # k=1: only the nearest point votes
    assert knn_classify(train_x, train_y, test_x, k=1, temperature=1.0).tolist() == [1]


def test_scaling_features_changes_nothing():
    train_x, train_y, test_x, test_y = make_data(seed=3)
    rng = np.random.default_rng(1)
    scaled_train = train_x * rng.uniform(1e-3, 1e3, size=(len(train_x), 1)).astype(np.float32)
    scaled_test = test_x * rng.uniform(1e-3, 1e3, size=(len(test_x), 1)).astype(np.float32)
    np.testing.assert_allclose(
        knn_scores(scaled_train, train_y, scaled_test, k=20),
        knn_scores(train_x, train_y, test_x, k=20),
        rtol=1e-5,
    )
    np.testing.assert_array_equal(
        knn_classify(scaled_train, train_y, scaled_test, k=20), knn_classify(train_x, train_y, test_x, k=20)
    )
    assert knn_evaluate(scaled_train, train_y, scaled_test, test_y) == knn_evaluate(train_x, train_y, test_x, test_y)


def test_exact_tie_goes_to_lowest_class_index():
    train_x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    test_x = np.array([[1.0, 0.0]], dtype=np.float32)
    for labels in ([3, 1, 0], [1, 3, 0]):
        scores = knn_scores(train_x, np.array(labels), test_x, k=2)
        assert scores[0, 1] == scores[0, 3] > 0
        assert knn_classify(train_x, np.array(labels), test_x, k=2).tolist() == [1]
    # in knn_evaluate the tie also ranks class 1 first
    assert knn_evaluate(train_x, np.array([3, 1, 0]), test_x, np.array([1]), k=2)["top1"] == 1.0
    assert knn_evaluate(train_x, np.array([3, 1, 0]), test_x, np.array([3]), k=2)["top1"] == 0.0
    # six classes with identical scores: the top 5 are classes 0..4, class 5 ranks sixth
    six = np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (6, 1))
    for label, top5 in [(0, 1.0), (4, 1.0), (5, 0.0)]:
        got = knn_evaluate(six, np.array([5, 3, 1, 0, 2, 4]), test_x, np.array([label]), k=6)
        assert got == {"top1": float(label == 0), "top5": top5}


def test_zero_vector_gets_zero_similarity():
    np.testing.assert_array_equal(l2_normalize(np.zeros((2, 3), np.float32)), np.zeros((2, 3)))
    x = l2_normalize(np.array([[3.0, 4.0]], dtype=np.float16))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [[0.6, 0.8]], rtol=1e-6)


# ------------------------------------------------------------ top1 / top5


def test_evaluate_matches_sklearn_when_every_class_votes():
    train_x, train_y, test_x, test_y = make_data(seed=5, n_train=120, n_test=80, num_classes=8)
    n = len(train_x)  # k = N_train: every class gets a positive score, so no zero-score ties
    scores = knn_scores(train_x, train_y, test_x, k=n, temperature=0.07)
    assert all(len(np.unique(row)) == 8 for row in scores)  # no ties between classes
    labels = np.arange(8)
    want_top1 = top_k_accuracy_score(test_y, scores, k=1, labels=labels)
    want_top5 = top_k_accuracy_score(test_y, scores, k=5, labels=labels)
    got = knn_evaluate(train_x, train_y, test_x, test_y, k=n, temperature=0.07)
    assert got["top1"] == pytest.approx(want_top1, abs=1e-12)
    assert got["top5"] == pytest.approx(want_top5, abs=1e-12)
    assert 0 < got["top1"] < got["top5"] < 1  # the check is not vacuous


def test_evaluate_top1_is_knn_classify_accuracy():
    train_x, train_y, test_x, test_y = make_data(seed=7)
    for k in (1, 20):
        got = knn_evaluate(train_x, train_y, test_x, test_y, k=k)
        acc = np.mean(knn_classify(train_x, train_y, test_x, k=k) == test_y)
        assert got["top1"] == pytest.approx(acc, abs=1e-12)
        assert got["top5"] >= got["top1"]
        assert isinstance(got["top1"], float) and isinstance(got["top5"], float)


def test_top5_hand_computed():
    # ten classes, one training point each, at angles 0, 10, ..., 90 degrees; query at 0 deg.
    train_x = np.array([unit(10 * c) for c in range(10)], dtype=np.float32)
    train_y = np.arange(10)
    test_x = np.array([[1.0, 0.0]] * 6, dtype=np.float32)
    # neighbours ranked 0,1,2,... ; with k=7, classes 0..4 are the top 5.
    test_y = np.array([0, 4, 5, 6, 9, 2])
    got = knn_evaluate(train_x, train_y, test_x, test_y, k=7)
    assert got == {"top1": 1 / 6, "top5": 3 / 6}  # hits: 0 (top1), 4, 2


def test_top5_never_counts_a_class_without_votes():
    # k=1: only class 9 gets a vote; classes 0..3 (score 0, low index) are not predictions.
    train_x = np.array([unit(90 - 10 * c) for c in range(10)], dtype=np.float32)
    train_y = np.arange(10)
    test_x = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    got = knn_evaluate(train_x, train_y, test_x, np.array([2, 9]), k=1)
    assert got == {"top1": 0.5, "top5": 0.5}


def test_top5_with_fewer_than_five_classes():
    # three classes: top5 is over min(5, 3) = 3 ranks, i.e. "label among the k neighbours"
    train_x = np.array([unit(0), unit(20), unit(40), unit(90)], dtype=np.float32)
    train_y = np.array([0, 1, 1, 2])
    test_x = np.array([[1.0, 0.0]] * 3, dtype=np.float32)
    got = knn_evaluate(train_x, train_y, test_x, np.array([0, 1, 2]), k=3, temperature=0.07)
    # scores: class0 = e^(1/T), class1 = e^(cos20/T) + e^(cos40/T) < class0; class 2 no vote
    assert got == {"top1": 1 / 3, "top5": 2 / 3}
    got = knn_evaluate(train_x, train_y, test_x, np.array([0, 1, 2]), k=4, temperature=0.07)
    assert got == {"top1": 1 / 3, "top5": 1.0}


def test_test_class_absent_from_training():
    train_x, train_y, test_x, test_y = make_data(seed=2, num_classes=5)
    test_y = test_y.copy()
    test_y[:10] = 7  # never seen in training: never a hit
    got = knn_evaluate(train_x, train_y, test_x, test_y, k=20)
    base = knn_evaluate(train_x, train_y, test_x[10:], test_y[10:], k=20)
    assert got["top1"] == pytest.approx(base["top1"] * 40 / 50)
    assert got["top5"] == pytest.approx(base["top5"] * 40 / 50)


# ------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k": 0}, "k must"),
        ({"k": -3}, "k must"),
        ({"k": 2.5}, "k must"),
        ({"k": True}, "k must"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 1e-4}, "temperature"),  # exp(1/1e-4) overflows float64
    ],
)
def test_bad_k_and_temperature(kwargs, match):
    train_x, train_y, test_x, test_y = make_data()
    for fn in (knn_scores, knn_classify):
        with pytest.raises(ValueError, match=match):
            fn(train_x, train_y, test_x, **kwargs)
    with pytest.raises(ValueError, match=match):
        knn_evaluate(train_x, train_y, test_x, test_y, **kwargs)


def test_bad_shapes_and_labels():
    train_x, train_y, test_x, test_y = make_data()
    cases = [
        ((train_x, train_y[:-1], test_x), "train_y"),
        ((train_x[0], train_y, test_x), "train_x"),
        ((train_x, train_y, test_x[:, :5]), "test_x"),
        ((train_x, train_y, test_x[0]), "test_x"),
        ((train_x, train_y.astype(np.float64), test_x), "train_y"),
        ((train_x, -train_y - 1, test_x), "train_y"),
        ((train_x, train_y.reshape(-1, 1), test_x), "train_y"),
        ((train_x[:0], train_y[:0], test_x), "train_x"),
        ((np.where(np.arange(200)[:, None] == 3, np.nan, train_x), train_y, test_x), "train_x"),
        ((train_x, train_y, np.full_like(test_x, np.inf)), "test_x"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            knn_classify(*args)
    with pytest.raises(ValueError, match="num_classes"):
        knn_scores(train_x, train_y, test_x, num_classes=5)
    with pytest.raises(ValueError, match="test_y"):
        knn_evaluate(train_x, train_y, test_x, test_y[:-1])
    with pytest.raises(ValueError, match="test_y"):
        knn_evaluate(train_x, train_y, test_x, test_y.astype(float))
    with pytest.raises(ValueError, match="test_x"):
        knn_evaluate(train_x, train_y, test_x[:0], test_y[:0])


# ------------------------------------------------------ inner_product_topk


def _search_data(seed=2, n_db=60, n_q=20, dim=24):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n_db, dim)).astype(np.float32),
        rng.normal(size=(n_q, dim)).astype(np.float32),
    )


def test_search_matches_numpy():
    db, q = _search_data()
    full = q.astype(np.float64) @ db.astype(np.float64).T
    order = np.argsort(-full, axis=1, kind="stable")
    s = np.take_along_axis(full, order, axis=1)
    assert np.min(np.diff(-s, axis=1)) > 1e-4  # no (near-)ties in the fixed data
    for k in (1, 10, 60):
        sims, idx = inner_product_topk(db, q, k, use_gpu=False)
        assert sims.shape == idx.shape == (20, k)
        assert sims.dtype == np.float32 and idx.dtype == np.int64
        np.testing.assert_array_equal(idx, order[:, :k])
        np.testing.assert_allclose(sims, s[:, :k], rtol=1e-5, atol=1e-5)


def test_search_chunking_is_invisible():
    db, q = _search_data(seed=1)
    one = inner_product_topk(db, q, 17, chunk_size=4096)
    chunked = inner_product_topk(db, q, 17, chunk_size=3)  # 20 = 6 * 3 + 2: ragged last chunk
    np.testing.assert_array_equal(one[1], chunked[1])
    # faiss may pick a different (BLAS vs direct) kernel for tiny batches: last-bit differences only
    np.testing.assert_allclose(one[0], chunked[0], rtol=1e-6, atol=1e-6)


def test_search_k_clipped_and_empty_queries():
    db, q = _search_data(n_db=8)
    sims, idx = inner_product_topk(db, q, 50)
    assert sims.shape == idx.shape == (20, 8)
    np.testing.assert_array_equal(np.sort(idx, axis=1), np.tile(np.arange(8), (20, 1)))
    sims, idx = inner_product_topk(db, q[:0], 5)
    assert sims.shape == idx.shape == (0, 5)


def test_search_accepts_fp16():
    db, q = _search_data(seed=2)
    db16, q16 = db.astype(np.float16), q.astype(np.float16)
    got = inner_product_topk(db16, q16, 5)
    want = inner_product_topk(db16.astype(np.float32), q16.astype(np.float32), 5)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_search_bad_arguments():
    db, q = _search_data()
    with pytest.raises(ValueError, match="k must"):
        inner_product_topk(db, q, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        inner_product_topk(db, q, 3, chunk_size=0)
    with pytest.raises(ValueError, match="queries"):
        inner_product_topk(db, q[:, :5], 3)
    with pytest.raises(ValueError, match="queries"):
        inner_product_topk(db, q[0], 3)
    with pytest.raises(ValueError, match="database"):
        inner_product_topk(db[0], q, 3)
    with pytest.raises(ValueError, match="database"):
        inner_product_topk(db[:0], q, 3)
    with pytest.raises(ValueError, match="database"):
        inner_product_topk(np.where(db > 2.5, np.nan, db), q, 3)
    with pytest.raises(ValueError, match="use_gpu"):
        inner_product_topk(db, q, 3, use_gpu="yes")


def test_gpu_selection_logic(monkeypatch):
    """No GPU needed: record which path inner_product_topk picks."""
    assert isinstance(search.gpu_available(), bool)
    db, q = _search_data(n_db=3000, n_q=4)
    chosen = []
    real = search._make_searcher

    def spy(database, on_gpu):
        chosen.append(on_gpu)
        return real(database, False)

    monkeypatch.setattr(search, "_make_searcher", spy)
    monkeypatch.setattr(search, "gpu_available", lambda: True)
    inner_product_topk(db, q, 10)
    inner_product_topk(db, q, search.GPU_MAX_K)
    inner_product_topk(db, q, search.GPU_MAX_K + 1)  # beyond the faiss GPU limit: CPU
    inner_product_topk(db, q, 10, use_gpu=False)
    inner_product_topk(db, q, 10, use_gpu=True)
    assert chosen == [True, True, False, False, True]

    monkeypatch.setattr(search, "gpu_available", lambda: False)
    inner_product_topk(db, q, 10)
    assert chosen[-1] is False
    with pytest.raises(RuntimeError, match="use_gpu=True"):
        inner_product_topk(db, q, 10, use_gpu=True)


def test_many_settings_from_one_search_equal_separate_evaluations() -> None:
    rng = np.random.default_rng(3)
    train_x, test_x = rng.normal(size=(300, 16)), rng.normal(size=(50, 16))
    train_y, test_y = rng.integers(0, 7, 300), rng.integers(0, 7, 50)
    settings = [(20, 0.07), (5, 0.1), (200, 0.1), (1, 1.0)]
    many = knn_evaluate_many(train_x, train_y, test_x, test_y, settings)
    assert list(many) == settings
    for k, t in settings:
        assert many[(k, t)] == knn_evaluate(train_x, train_y, test_x, test_y, k=k, temperature=t)


def test_k_larger_than_the_training_set_is_clamped_with_a_warning(caplog) -> None:
    train_x, train_y = np.eye(3), np.array([0, 1, 1])
    with caplog.at_level("WARNING"):
        got = knn_evaluate(train_x, train_y, np.eye(3)[:1], np.array([0]), k=10)
    assert "k=10 is larger than the 3 training samples" in caplog.text
    assert got == knn_evaluate(train_x, train_y, np.eye(3)[:1], np.array([0]), k=3)


def test_the_torch_search_path_finds_the_same_neighbours_and_predictions_as_faiss() -> None:
    """The path a GPU takes when faiss has no GPU support (matmul + topk in torch), run on the CPU here."""
    from evaluations import search
    from evaluations.knn import knn_classify

    rng = np.random.default_rng(0)
    database, queries = rng.normal(size=(700, 24)).astype(np.float32), rng.normal(size=(130, 24)).astype(np.float32)
    ref_s, ref_i = search.inner_product_topk(database, queries, 20)
    old = search._TORCH_BUDGET
    search._TORCH_BUDGET = 700 * 7  # blocks of 7 queries: the blocking is exercised
    try:
        s, i = search.inner_product_topk(database, queries, 20, backend="torch")
    finally:
        search._TORCH_BUDGET = old
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_allclose(s, ref_s, rtol=1e-5, atol=1e-5)
    labels = rng.integers(0, 5, size=700)
    expected = knn_classify(database, labels, queries, k=20, temperature=0.07)
    with search.on_device("cpu"):  # the CPU: faiss, as without the block
        np.testing.assert_array_equal(knn_classify(database, labels, queries, k=20, temperature=0.07), expected)
