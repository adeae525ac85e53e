"""Collapse diagnostics (evaluations.collapse) against closed forms and direct formulas.

References: Garrido et al. 2023 (RankMe), Roy & Vetterli 2007 (effective rank),
Wang & Isola 2020 (alignment, uniformity).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from evaluations import collapse
from evaluations.collapse import (
    alignment,
    effective_rank,
    rankme,
    singular_values,
    spectrum_figure,
    std_of_normalized,
    uniformity,
)


def closed_form_rankme(d, eps=1e-7):
    p = 1 / d + eps
    return math.exp(-d * p * math.log(p))


# ---------------------------------------------------------------- rank


def test_rankme_of_identity():
    assert closed_form_rankme(128) == pytest.approx(128.006, abs=1e-3)
    assert rankme(np.eye(128)) == pytest.approx(closed_form_rankme(128), rel=1e-12)
    assert rankme(np.eye(128)) == pytest.approx(128.006, abs=1e-3)
    assert effective_rank(np.eye(128)) == pytest.approx(128.0, abs=1e-9)


def test_rank_one_matrix():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 1)) @ rng.normal(size=(1, 128))
    assert rankme(z) == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(z) == pytest.approx(1.0, abs=1e-4)


def test_rank_of_known_spectrum_and_invariances():
    # singular values 3, 1 (orthogonal columns): p = (0.75, 0.25)
    z = np.zeros((10, 4))
    z[0, 0], z[1, 1] = 3.0, 1.0
    want = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(z) == pytest.approx(want, rel=1e-12)
    rng = np.random.default_rng(1)
    z = rng.normal(size=(200, 32)) + 2.0  # uncentred: the mean direction counts
    r = rankme(z)
    assert rankme(z[rng.permutation(200)]) == pytest.approx(r, rel=1e-10)
    assert rankme(5.0 * z) == pytest.approx(r, rel=1e-10)
    assert rankme(z) < rankme(z - z.mean(axis=0))  # no centring inside


def test_singular_values_match_numpy_and_torch_input():
    z = np.random.default_rng(2).normal(size=(50, 20)).astype(np.float32)
    s = singular_values(torch.from_numpy(z))
    assert s.shape == (20,) and s.dtype == np.float64 and np.all(np.diff(s) <= 0)
    np.testing.assert_allclose(s, np.linalg.svd(z.astype(np.float64), compute_uv=False), rtol=1e-10)


# --------------------------------------------------------------- spread


def test_std_of_normalized_gaussian_and_collapsed():
    z = np.random.default_rng(3).normal(size=(20000, 128))
    assert std_of_normalized(z) == pytest.approx(1 / math.sqrt(128), rel=0.01)
    assert std_of_normalized(np.tile(np.random.default_rng(4).normal(size=(1, 128)), (100, 1))) == pytest.approx(0.0, abs=1e-12)
    # rows of different lengths pointing the same way are collapsed too
    assert std_of_normalized(np.outer(np.arange(1, 51), np.ones(16))) == pytest.approx(0.0, abs=1e-15)


def test_alignment_closed_forms():
    x = np.random.default_rng(5).normal(size=(100, 16))
    assert alignment(x, x) == 0.0
    assert alignment(x, 3 * x) == pytest.approx(0.0, abs=1e-24)  # views are normalised first
    assert alignment(x, -x) == pytest.approx(4.0)
    assert alignment(x, -x, alpha=3) == pytest.approx(8.0)
    # orthogonal views: ||x - y||^2 = 2
    assert alignment(np.eye(8)[:4], np.eye(8)[4:]) == pytest.approx(2.0)
    y = np.random.default_rng(6).normal(size=(100, 16))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    assert alignment(x, y) == pytest.approx(np.mean(np.sum((xn - yn) ** 2, axis=1)))


def test_uniformity_closed_forms():
    assert uniformity(np.eye(128)) == pytest.approx(-4.0, abs=1e-12)
    assert uniformity(np.eye(16), t=3) == pytest.approx(-6.0, abs=1e-12)
    assert uniformity(np.ones((20, 5))) == pytest.approx(0.0, abs=1e-12)
    # large t: log-sum-exp keeps it finite (exp(-2000 * 2) underflows float64)
    assert uniformity(np.eye(10), t=1000) == pytest.approx(-2000.0)


def test_uniformity_matches_torch_pdist_formula():
    x = np.random.default_rng(7).normal(size=(300, 12))
    xt = torch.nn.functional.normalize(torch.from_numpy(x), dim=1)
    want = torch.pdist(xt, p=2).pow(2).mul(-2).exp().mean().log().item()  # Wang & Isola's code
    assert uniformity(x) == pytest.approx(want, rel=1e-10)


def test_uniformity_subsample_is_fixed(monkeypatch):
    monkeypatch.setattr(collapse, "UNIFORMITY_MAX_ROWS", 64)
    monkeypatch.setattr(collapse, "_PAIR_BLOCK", 10)  # several blocks, ragged last one
    x = np.random.default_rng(8).normal(size=(500, 6))
    rows = np.sort(np.random.default_rng(0).choice(500, 64, replace=False))
    xn = x[rows] / np.linalg.norm(x[rows], axis=1, keepdims=True)
    i, j = np.triu_indices(64, k=1)
    want = math.log(np.mean(np.exp(-2 * np.sum((xn[i] - xn[j]) ** 2, axis=1))))
    assert uniformity(x) == pytest.approx(want, rel=1e-10)
    assert uniformity(x) == uniformity(x)


# ---------------------------------------------------------------- figure


def test_spectrum_figure():
    z = np.random.default_rng(9).normal(size=(100, 16))
    collapsed = np.outer(np.ones(100), np.arange(16.0))
    fig = spectrum_figure({"healthy": singular_values(z), "collapsed": singular_values(collapsed)})
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["healthy", "collapsed"]
    np.testing.assert_array_equal(lines[0].get_xdata(), np.arange(1, 17))
    assert len(lines[1].get_xdata()) >= 1  # exact zeros are dropped from the log axis
    fig.savefig(io.BytesIO(), format="png")  # renders headless (Agg)


# ---------------------------------------------------------------- errors


def test_bad_input():
    with pytest.raises(ValueError, match="rankme: eps"):
        rankme(np.eye(3), eps=-1.0)
    with pytest.raises(ValueError, match="every embedding is zero"):
        effective_rank(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="alignment: the two views must have the same shape"):
        alignment(np.ones((4, 3)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="uniformity: needs at least 2 rows"):
        uniformity(np.ones((1, 3)))
    with pytest.raises(ValueError, match="uniformity: t must be"):
        uniformity(np.eye(3), t=0)
    bad = np.eye(4)
    bad[2, 2] = np.inf
    with pytest.raises(ValueError, match="1 of 4 embedding rows contain NaN or inf"):
        rankme(bad)
    with pytest.raises(ValueError, match="spectrum_figure"):
        spectrum_figure({})


def test_closed_form_collapse_losses_equal_the_losses_of_constant_embeddings() -> None:
    import math

    from core.backbones import create_backbone
    from harness.trial.evaluate import collapsed
    from methods import create_method
    from methods.moco import moco_loss
    from methods.simclr import nt_xent
    from tests.helpers.method_params import small_params

    z = torch.ones(8, 16)
    simclr = create_method("simclr", create_backbone("test_resnet"), **small_params("simclr"))
    assert float(nt_xent(z, z, 0.2)) == pytest.approx(simclr.collapse_loss(8)) == pytest.approx(math.log(15))
    moco = create_method("moco_v2", create_backbone("test_resnet"), **small_params("moco_v2", queue_size=64))
    assert float(moco_loss(z, z, torch.ones(64, 16), 0.2)) == pytest.approx(moco.collapse_loss(8)) == pytest.approx(math.log(65))
    # the verdict: loss within 2% of the collapse value, or normalised std far below 1/sqrt(d)
    assert collapsed(6.86, math.log(1025), 0.05, 128) and not collapsed(6.70, math.log(1025), 0.05, 128)
    assert collapsed(None, None, 0.001, 100) and not collapsed(None, None, 0.05, 100)


def test_one_decomposition_on_a_torch_device_gives_numpys_ranks():
    from evaluations.collapse import effective_rank, rankme, ranks, singular_values

    z = np.random.default_rng(3).normal(size=(300, 24)) @ np.diag(np.linspace(0.1, 3, 24))
    me, eff, s = ranks(z, "cpu")  # the torch path (the battery's on a GPU)
    np.testing.assert_allclose(s, singular_values(z), rtol=1e-10)
    assert me == pytest.approx(rankme(z), rel=1e-12) and eff == pytest.approx(effective_rank(z), rel=1e-12)


def test_a_final_loss_at_a_negative_collapse_value_is_collapsed() -> None:
    """MMCR's collapse value is -sqrt(N): within the tolerance of it counts, as for the positive values of the others."""
    from harness.trial.evaluate import collapsed

    assert collapsed(-8.0, -8.0, None, 0) and collapsed(-7.95, -8.0, None, 0)
    assert not collapsed(-9.0, -8.0, None, 0)  # below the collapse value: learning
    assert collapsed(4.9, 5.0, None, 0) and not collapsed(4.8, 5.0, None, 0)  # positive values as before
