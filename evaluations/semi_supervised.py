"""Semi-supervised evaluation: class-balanced labelled subsets (SimCLR's 1% / 10% protocol).

SimCLR (Chen et al. 2020) fine-tunes on class-balanced 1% and 10% subsets of the
ImageNet training labels. :func:`balanced_subset` draws such a subset for any
labelled set: exactly balanced up to one sample per class, seeded, reproducible.

    >>> import numpy as np
    >>> from evaluations.semi_supervised import balanced_subset
    >>> labels = np.repeat(np.arange(10), 100)          # 10 classes x 100
    >>> idx = balanced_subset(labels, 0.05, seed=0)      # 50 indices, 5 per class
    >>> len(idx), np.bincount(labels[idx]).tolist()
    (50, [5, 5, 5, 5, 5, 5, 5, 5, 5, 5])
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from evaluations.checks import as_numpy

__all__ = ["balanced_subset"]


def balanced_subset(labels: Any, fraction: float, seed: int) -> np.ndarray:
    """Sorted int64 indices of a class-balanced subset holding ``round(fraction * N)`` samples.

    With C classes and total T = round(fraction * N) (Python's round: half to even),
    every class gets floor(T / C) samples and T mod C classes, chosen at random by
    ``seed`` among the classes that have more than floor(T / C) samples, get one
    more; within a class the samples are drawn uniformly without replacement.
    Random draws come from ``np.random.default_rng(seed)``: first the classes that
    get the extra sample, then each class's samples, in sorted label order.

    Args:
        labels: (N,) labels of any sortable dtype (numpy or torch).
        fraction: share of the N samples to keep, 0 < fraction <= 1.
        seed: integer seed.

    Raises:
        ValueError: fraction outside (0, 1]; T < C (some class would get no label;
            the message names C and the smallest fraction, C / N, that gives each
            class one); a class with fewer samples than its share (named).
    """
    y = as_numpy(labels)
    if y.ndim != 1 or y.shape[0] == 0:
        raise ValueError(f"balanced_subset: labels must be a non-empty 1-D array, got shape {y.shape}")
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float, np.integer, np.floating))
        or not math.isfinite(fraction)
        or not 0 < fraction <= 1
    ):
        raise ValueError(f"balanced_subset: fraction must be a number in (0, 1], got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"balanced_subset: seed must be an integer, got {seed!r}")
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    n, num_classes = y.shape[0], classes.shape[0]
    total = round(float(fraction) * n)
    base, extra = divmod(total, num_classes)
    if base == 0:
        raise ValueError(
            f"balanced_subset: fraction={fraction} keeps {total} of {n} samples, fewer than the "
            f"{num_classes} classes; the smallest fraction giving every class a label is "
            f"{num_classes}/{n} = {num_classes / n:.6g}"
        )
    short = np.flatnonzero(counts < base)
    if short.size:
        c = short[0]
        raise ValueError(
            f"balanced_subset: class {classes[c].item()!r} has {counts[c]} samples but its share at "
            f"fraction={fraction} is {base}; use fraction <= {counts.min() * num_classes / n:.6g} or drop the class"
        )
    can_take_extra = np.flatnonzero(counts > base)
    if can_take_extra.shape[0] < extra:  # only when every class is (nearly) exhausted
        raise ValueError(
            f"balanced_subset: {extra} classes need {base + 1} samples at fraction={fraction} but only "
            f"{can_take_extra.shape[0]} classes have that many"
        )
    rng = np.random.default_rng(int(seed))
    share = np.full(num_classes, base, dtype=np.int64)
    share[rng.choice(can_take_extra, size=extra, replace=False)] += 1
    order = np.argsort(inverse, kind="stable")  # indices grouped by class, ascending within a class
    starts = np.concatenate([[0], np.cumsum(counts)])
    picked = [
        rng.choice(order[starts[c] : starts[c + 1]], size=int(share[c]), replace=False) for c in range(num_classes)
    ]
    return np.sort(np.concatenate(picked)).astype(np.int64)
