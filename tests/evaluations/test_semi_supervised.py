"""Class-balanced labelled subsets (evaluations.semi_supervised.balanced_subset)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluations.semi_supervised import balanced_subset


def imbalanced_labels(seed=0):
    rng = np.random.default_rng(seed)
    counts = [120, 80, 200, 95, 150, 60, 110]  # 815 samples, 7 classes
    return rng.permutation(np.repeat(np.arange(7) * 10 + 3, counts))  # labels 3, 13, ..., 63


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 0.3, 0.5])
def test_exactly_balanced_and_right_total(fraction):
    y = imbalanced_labels()
    idx = balanced_subset(y, fraction, seed=0)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)  # sorted, no repeats
    assert len(idx) == round(fraction * len(y))
    per_class = np.unique(y[idx], return_counts=True)[1]
    assert len(per_class) == 7  # every class present
    assert per_class.max() - per_class.min() <= 1
    assert per_class.min() == len(idx) // 7


def test_total_uses_round_and_remainder_spread():
    y = np.repeat(np.arange(4), 25)  # N = 100
    idx = balanced_subset(y, 0.07, seed=3)  # 7 samples: 1 each + 3 extra
    assert sorted(np.bincount(y[idx]).tolist()) == [1, 2, 2, 2]
    # which classes get the extra sample depends on the seed
    extras = {tuple(np.bincount(y[balanced_subset(y, 0.07, seed=s)]).tolist()) for s in range(20)}
    assert len(extras) > 1


def test_reproducible_for_a_seed_and_different_for_another():
    y = imbalanced_labels()
    a = balanced_subset(y, 0.1, seed=7)
    assert np.array_equal(a, balanced_subset(y, 0.1, seed=7))
    assert np.array_equal(a, balanced_subset(torch.from_numpy(y), 0.1, seed=7))
    assert not np.array_equal(a, balanced_subset(y, 0.1, seed=8))


def test_full_fraction_and_string_labels():
    y = np.array(["b", "a", "b", "a", "c", "c"])
    assert balanced_subset(y, 1.0, seed=0).tolist() == [0, 1, 2, 3, 4, 5]
    idx = balanced_subset(y, 0.5, seed=0)
    assert sorted(y[idx].tolist()) == ["a", "b", "c"]


def test_fraction_too_small_for_the_classes():
    y = imbalanced_labels()  # 7 classes, 815 samples
    with pytest.raises(ValueError, match=r"fewer than the 7 classes; the smallest fraction giving every class a label is 7/815 = 0.00858896"):
        balanced_subset(y, 0.005, seed=0)  # round(4.075) = 4 samples for 7 classes
    assert len(balanced_subset(y, 7 / 815, seed=0)) == 7  # the fraction named in the message works


def test_class_smaller_than_its_share():
    y = np.repeat(np.array([0, 1, 2]), [100, 100, 4])
    with pytest.raises(ValueError, match=r"class 2 has 4 samples but its share at fraction=0.1 is 6"):
        balanced_subset(y, 0.1, seed=0)  # round(20.4) = 20 -> 6 or 7 each
    # a class with exactly its base share is fine: it just never gets the extra sample
    y = np.repeat(np.array([0, 1, 2]), [100, 100, 6])  # N = 206, 20 samples: 6 each + 2 extra
    for seed in range(10):
        counts = np.bincount(y[balanced_subset(y, 20 / 206, seed=seed)])
        assert counts.tolist()[2] == 6 and sorted(counts.tolist()) == [6, 7, 7]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction must be a number in"):
        balanced_subset(np.arange(10) % 2, fraction, seed=0)


def test_bad_labels_and_seed():
    with pytest.raises(ValueError, match="labels must be a non-empty 1-D array"):
        balanced_subset(np.zeros((4, 2)), 0.5, seed=0)
    with pytest.raises(ValueError, match="seed must be an integer"):
        balanced_subset(np.arange(10) % 2, 0.5, seed=1.5)
