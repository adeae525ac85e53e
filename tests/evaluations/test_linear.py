"""Linear probe (evaluations.linear) and the shared input checks (evaluations.checks).

The hand-written training step is compared with the torch.nn protocol it stands
for (BatchNorm1d(affine=False, eps=1e-6) + Linear, torch.optim.SGD, cosine lr),
and the probe's accuracy with scikit-learn's LogisticRegression on digits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from evaluations.checks import check_features, remap_labels
from evaluations.linear import _fit_heads, linear_probe, stratified_split


def blobs(seed=0, n=400, dim=12, num_classes=4, spread=1.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    x = 3.0 * np.eye(num_classes, dim)[y] + spread * rng.normal(size=(n, dim))
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    a, b, ya, yb = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    scaler = StandardScaler().fit(a)
    return scaler.transform(a).astype(np.float32), ya, scaler.transform(b).astype(np.float32), yb


# ------------------------------------------------- the step vs torch.nn


def reference_fit(x, y, num_classes, weight_decay, *, epochs, batch_size, lr, seed):
    """The protocol written with torch.nn modules, autograd and torch.optim.SGD."""
    n, d = x.shape
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(d, affine=False, eps=1e-6), torch.nn.Linear(d, num_classes))
    with torch.no_grad():
        head[1].weight.copy_(torch.randn(num_classes, d, generator=gen) * 0.01)
        head[1].bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr * batch_size / 256, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = n // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            loss = torch.nn.functional.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    bn = head[0]
    return head[1].weight.detach(), head[1].bias.detach(), bn.running_mean, bn.running_var


def test_fit_matches_torch_nn_reference():
    x, y = blobs(n=300, dim=8, num_classes=3, spread=2.0)
    x, y = torch.from_numpy(x) * 5 + 2, torch.from_numpy(y)  # BN has something to undo
    kw = {"epochs": 4, "batch_size": 64, "lr": 0.5, "seed": 3}
    w_ref, b_ref, mean_ref, var_ref = reference_fit(x, y, 3, 1e-2, **kw)
    w, b, mean, var = _fit_heads(x, y, 3, (1e-2,), **kw)
    assert w.shape == (1, 3, 8) and b.shape == (1, 3)
    assert not torch.allclose(w_ref, torch.randn(3, 8, generator=torch.Generator().manual_seed(3)) * 0.01)  # it trained
    torch.testing.assert_close(w[0], w_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b[0], b_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(var, var_ref)


def test_grid_heads_equal_separate_fits():
    x, y = blobs(n=300, dim=8, num_classes=3, spread=2.0)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    kw = {"epochs": 3, "batch_size": 50, "lr": 0.3, "seed": 1}
    w, b, _, _ = _fit_heads(x, y, 3, (0.0, 0.05), **kw)
    for g, wd in enumerate((0.0, 0.05)):
        w1, b1, _, _ = _fit_heads(x, y, 3, (wd,), **kw)
        torch.testing.assert_close(w[g], w1[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b[g], b1[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(w[0], w[1])  # the decay matters, so the check is not vacuous


def test_stratified_split_is_per_class_and_seeded():
    y = np.repeat(np.arange(3), [50, 30, 1])
    fit, val = stratified_split(y, 0.1, seed=0)
    assert np.bincount(y[val], minlength=3).tolist() == [5, 3, 0]  # the singleton stays in training
    assert sorted(np.concatenate([fit, val]).tolist()) == list(range(81))
    again = stratified_split(y, 0.1, seed=0)
    assert np.array_equal(val, again[1])
    assert not np.array_equal(val, stratified_split(y, 0.1, seed=1)[1])


# ------------------------------------------------------------ accuracy


def test_digits_within_two_points_of_logistic_regression(digits):
    train_x, train_y, test_x, test_y = digits
    want = LogisticRegression(max_iter=2000).fit(train_x, train_y).score(test_x, test_y)
    # 30 epochs (150 steps per fit) suffice on 1,347 samples and keep the test quick
    got = linear_probe(train_x, train_y, test_x, test_y, epochs=30)
    assert abs(got["top1"] - want) <= 0.02, (got["top1"], want)
    assert got["top1"] <= got["top5"] <= 1.0
    assert got["weight_decay"] in (0.0, 1e-5, 1e-4, 1e-3)
    by_decay = got["val_top1_by_weight_decay"]
    assert list(by_decay) == [0.0, 1e-5, 1e-4, 1e-3]
    assert got["val_top1"] == max(by_decay.values()) == by_decay[got["weight_decay"]]
    # ties go to the earlier decay
    assert got["weight_decay"] == next(wd for wd, acc in by_decay.items() if acc == got["val_top1"])
    assert got["lr_effective"] == 0.1 and got["num_classes"] == 10


def test_separable_data_is_solved():
    x, y = blobs(seed=1, n=1200, dim=16, num_classes=6, spread=0.3)
    got = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], epochs=10)
    assert got["top1"] == 1.0 and got["top5"] == 1.0 and got["val_top1"] == 1.0


def test_deterministic_for_a_seed():
    x, y = blobs(seed=2, n=600, spread=2.5)
    kw = {"epochs": 3, "batch_size": 64, "weight_decays": (0.0, 1e-2)}
    a = linear_probe(x[:500], y[:500], x[500:], y[500:], seed=4, **kw)
    b = linear_probe(torch.from_numpy(x[:500]), y[:500], x[500:], torch.from_numpy(y[500:]), seed=4, **kw)
    assert a == b
    w0 = _fit_heads(torch.from_numpy(x), torch.from_numpy(y), 4, (0.0,), epochs=2, batch_size=64, lr=0.1, seed=0)[0]
    w1 = _fit_heads(torch.from_numpy(x), torch.from_numpy(y), 4, (0.0,), epochs=2, batch_size=64, lr=0.1, seed=1)[0]
    assert not torch.allclose(w0, w1)


def test_single_weight_decay_needs_no_validation():
    x, y = blobs(seed=3)
    got = linear_probe(x[:300], y[:300], x[300:], y[300:], epochs=5, weight_decays=(1e-4,))
    assert got["weight_decay"] == 1e-4
    assert math.isnan(got["val_top1"]) and got["val_top1_by_weight_decay"] == {}


def test_labels_are_remapped_and_top5_omitted_below_five_classes():
    x, y = blobs(seed=4, num_classes=3, spread=0.3)
    names = np.array(["cat", "dog", "emu"])[y]
    got = linear_probe(x[:300], names[:300], x[300:], names[300:], epochs=10)
    assert "top5" not in got and got["num_classes"] == 3 and got["top1"] == 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 1}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"weight_decays": ()}, "weight_decays"),
        ({"weight_decays": (1e-4, -1.0)}, "weight_decays"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 0.0}, "val_fraction"),
    ],
)
def test_bad_arguments(kwargs, match):
    x, y = blobs()
    with pytest.raises(ValueError, match=match):
        linear_probe(x[:300], y[:300], x[300:], y[300:], **kwargs)


def test_bad_features():
    x, y = blobs()
    bad = x.copy()
    bad[[3, 7, 9], 2] = np.nan
    with pytest.raises(ValueError, match=r"^linear probe: 3 of 300 embedding rows contain NaN or inf$"):
        linear_probe(bad[:300], y[:300], x[300:], y[300:])
    with pytest.raises(ValueError, match="dimension 11 but training embeddings have 12"):
        linear_probe(x[:300], y[:300], x[300:, :11], y[300:])
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe(x[:300], np.zeros(300), x[300:], np.zeros(100))


# ------------------------------------------------- shared input checks


def test_check_features_counts_nan_and_inf_rows():
    x = np.zeros((1000, 4))
    x[[1, 5], 0] = np.nan
    x[9, 3] = -np.inf
    x[5, 1] = np.inf  # a second bad entry in a row already counted
    with pytest.raises(ValueError, match=r"^kNN: 3 of 1000 embedding rows contain NaN or inf$"):
        check_features(x, evaluation="kNN")
    # a float64 value beyond float32's range becomes inf in the float32 copy: also caught
    with pytest.raises(ValueError, match="1 of 2 embedding rows"):
        check_features(np.array([[1e300, 0.0], [1.0, 1.0]]), evaluation="kNN")


def test_check_features_shapes_and_lengths():
    x = check_features(torch.ones(5, 3, dtype=torch.float64), evaluation="e")
    assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape == (5, 3)
    x, y = check_features(np.ones((5, 3)), torch.arange(5), evaluation="e")
    assert y.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"^probe: 5 embedding rows but 4 labels; they must match$"):
        check_features(np.ones((5, 3)), np.arange(4), evaluation="probe")
    with pytest.raises(ValueError, match=r"probe: embeddings must be a 2-D array \(N, D\), got shape \(5,\)"):
        check_features(np.ones(5), evaluation="probe")
    with pytest.raises(ValueError, match="labels must be a 1-D array"):
        check_features(np.ones((5, 3)), np.ones((5, 1)), evaluation="probe")
    with pytest.raises(ValueError, match="at least one row"):
        check_features(np.ones((0, 3)), evaluation="probe")


def test_remap_labels():
    (a,), c = remap_labels(np.array([3, 7, 7]))
    assert a.tolist() == [0, 1, 1] and a.dtype == np.int64 and c == 2
    (a, b), c = remap_labels(np.array([0, 2, 1]), torch.tensor([2, 5]))
    assert a.tolist() == [0, 2, 1] and b.tolist() == [2, 3] and c == 4  # union {0, 1, 2, 5}
    (a, b), c = remap_labels(np.array(["b", "a"]), np.array(["c"]))
    assert a.tolist() == [1, 0] and b.tolist() == [2] and c == 3
    with pytest.raises(ValueError, match="label array 1 must be 1-D"):
        remap_labels(np.arange(3), np.ones((2, 2)))
