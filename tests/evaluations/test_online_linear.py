"""The online linear probe against scikit-learn's logistic regression on fixed data, and its state kept between
evaluations: two updates of 5 passes are one of 10."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from evaluations.online_linear import OnlineLinearProbe


def blobs(n: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Four Gaussian classes in 16-d around fixed centres, with an offset and scales a standardisation must undo."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(4, 16)) * 2
    y = rng.integers(0, 4, size=n)
    x = centres[y] + noise * rng.normal(size=(n, 16))
    return (x * np.linspace(0.5, 20, 16) + 7).astype(np.float32), y


@pytest.mark.parametrize("noise", [0.5, 3.0])
def test_its_accuracy_is_logistic_regressions_on_the_same_data(noise: float) -> None:
    (train_x, train_y), (test_x, test_y) = blobs(1024, 0, noise), blobs(512, 1, noise)
    probe = OnlineLinearProbe(4, epochs=30, seed=0)
    got = probe.update(train_x, train_y, test_x, test_y)
    mean, std = train_x.mean(0), train_x.std(0)
    reference = (
        LogisticRegression(max_iter=2000).fit((train_x - mean) / std, train_y).score((test_x - mean) / std, test_y)
    )
    assert got == pytest.approx(reference, abs=0.03), (got, reference)
    assert (reference > 0.99) == (noise < 1)  # one easy and one hard case


def test_two_updates_of_five_passes_are_one_of_ten() -> None:
    (train_x, train_y), (test_x, test_y) = blobs(300, 2, 3.0), blobs(100, 3, 3.0)
    twice, once = OnlineLinearProbe(4, epochs=5, seed=7), OnlineLinearProbe(4, epochs=10, seed=7)
    twice.update(train_x, train_y, test_x, test_y)
    second = twice.update(train_x, train_y, test_x, test_y)
    assert second == once.update(train_x, train_y, test_x, test_y)
    assert twice.weight is not None and once.weight is not None
    np.testing.assert_allclose(twice.weight.numpy(), once.weight.numpy(), rtol=1e-5, atol=1e-6)


def test_bad_labels_or_a_changed_width_are_value_errors() -> None:
    x, y = blobs(64, 4, 1.0)
    probe = OnlineLinearProbe(4, epochs=1)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        probe.update(x, y + 1, x, y)
    probe.update(x, y, x, y)
    with pytest.raises(ValueError, match="changed width from 16 to 8"):
        probe.update(x[:, :8], y, x[:, :8], y)
