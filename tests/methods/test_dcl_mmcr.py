"""DCL, DCLW and MMCR: the losses against hand computations and numpy re-implementations, their invariances, the
closed-form collapse values, how the methods feed their views to the losses and bad values. Two gloo workers giving
the single-process loss and gradients: tests/methods/test_distributed.py, with every gathering method."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from core.backbones import create_backbone
from core.contract import StepInfo
from core.errors import ConfigError
from methods import create_method
from methods.dcl import dcl_loss
from methods.mmcr import mmcr_loss
from methods.simclr import nt_xent
from tests.helpers.method_params import small_params

# ----------------------------------------------------------------------------- references in numpy (float64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def dcl_numpy(z1: np.ndarray, z2: np.ndarray, t: float, sigma: float | None = None) -> float:
    """Eq. 6 of Yeh et al. 2022 one anchor at a time; DCLW's weights as lightly's negative_mises_fisher_weights."""
    a, b = _unit(z1), _unit(z2)
    n = len(a)
    pair = (a * b).sum(axis=1)
    w = np.ones(n) if sigma is None else 2 - n * np.exp(pair / sigma) / np.exp(pair / sigma).sum()
    z = np.concatenate([a, b])
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        negatives = [k for k in range(2 * n) if k not in (i, j)]
        total += -w[i % n] * (z[i] @ z[j]) / t + np.log(sum(np.exp(z[i] @ z[k] / t) for k in negatives))
    return total / (2 * n)


def mmcr_numpy(z: np.ndarray, lmbda: float) -> float:
    z = _unit(z)
    centroids = z.mean(axis=1)
    local = sum(np.linalg.svd(zi, compute_uv=False).sum() for zi in z)
    return -np.linalg.svd(centroids, compute_uv=False).sum() + lmbda * local / len(z)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- DCL / DCLW


def test_dcl_leaves_the_positive_out_of_the_denominator_by_hand() -> None:
    # two samples, unit vectors: a0 = (1, 0), a1 = (0, 1) in view 1; b0 = (0.6, 0.8), b1 = (-0.6, 0.8) in view 2
    # cosines: a0.b0 = 0.6, a1.b1 = 0.8 (positives); a0.a1 = 0, a0.b1 = -0.6, a1.b0 = 0.8, b0.b1 = 0.28
    t = 0.5

    def e(cosine: float) -> float:
        return math.exp(cosine / t)

    anchors = [
        -0.6 / t + math.log(e(0.0) + e(-0.6)),  # a0: negatives a1, b1
        -0.8 / t + math.log(e(0.0) + e(0.8)),  # a1: negatives a0, b0
        -0.6 / t + math.log(e(0.28) + e(0.8)),  # b0: negatives b1, a1
        -0.8 / t + math.log(e(0.28) + e(-0.6)),  # b1: negatives b0, a0
    ]
    expected = sum(anchors) / 4
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.6, 0.8], [-0.6, 0.8]])
    assert dcl_loss(3 * z1, 0.5 * z2, t).item() == pytest.approx(expected, rel=1e-6)  # normalised inside
    # NT-Xent is the same with the positive added to each denominator: the decoupling is the whole difference
    coupled = [
        -0.6 / t + math.log(e(0.6) + e(0.0) + e(-0.6)),
        -0.8 / t + math.log(e(0.8) + e(0.0) + e(0.8)),
        -0.6 / t + math.log(e(0.6) + e(0.28) + e(0.8)),
        -0.8 / t + math.log(e(0.8) + e(0.28) + e(-0.6)),
    ]
    assert nt_xent(z1, z2, t).item() == pytest.approx(sum(coupled) / 4, rel=1e-6)
    assert abs(expected - sum(coupled) / 4) > 0.1


@pytest.mark.parametrize(("t", "sigma"), [(0.1, None), (0.5, None), (0.1, 0.5), (0.2, 0.1), (1.0, 2.0)])
def test_dcl_and_dclw_equal_a_numpy_reimplementation(t: float, sigma: float | None) -> None:
    z1, z2 = _randn(7, 5, seed=0), _randn(7, 5, seed=1)
    expected = dcl_numpy(z1.double().numpy(), z2.double().numpy(), t, sigma)
    assert dcl_loss(z1, z2, t, sigma).item() == pytest.approx(expected, rel=1e-5)


def test_dclw_with_a_huge_sigma_is_dcl_and_a_small_one_is_not() -> None:
    z1, z2 = _randn(6, 4, seed=2), _randn(6, 4, seed=3)
    dcl = dcl_loss(z1, z2, 0.1).item()
    assert dcl_loss(z1, z2, 0.1, sigma=1e8).item() == pytest.approx(dcl, rel=1e-6)  # softmax uniform: every w_i = 1
    assert dcl_loss(z1, z2, 0.1, sigma=0.1).item() != pytest.approx(dcl, rel=1e-3)


def test_dclw_weights_carry_no_gradient() -> None:
    """The weights are constants of the step (detached, as in lightly): the gradient is that of the loss with the
    numpy weights plugged in as numbers."""
    z1, z2 = _randn(5, 3, seed=4).double(), _randn(5, 3, seed=5).double()
    a, b = _unit(z1.numpy()), _unit(z2.numpy())
    pair = (a * b).sum(axis=1) / 0.5
    weights = torch.from_numpy(np.tile(2 - 5 * np.exp(pair) / np.exp(pair).sum(), 2))
    x1, x2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    dcl_loss(x1, x2, 0.2, sigma=0.5).backward()
    y1, y2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    z = torch.nn.functional.normalize(torch.cat([y1, y2]), dim=1)
    sim = z @ z.T / 0.2
    partner = (torch.arange(10) + 5) % 10
    keep = ~(torch.eye(10, dtype=torch.bool) | torch.eye(10, dtype=torch.bool)[partner])
    by_hand = (-weights * sim[torch.arange(10), partner] + torch.stack([sim[i][keep[i]].logsumexp(0) for i in range(10)])).mean()
    by_hand.backward()
    torch.testing.assert_close(x1.grad.double(), y1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x2.grad.double(), y2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sigma", [None, 0.5])
def test_dcl_is_symmetric_in_the_views_and_scale_invariant(sigma: float | None) -> None:
    z1, z2 = _randn(6, 8, seed=6), _randn(6, 8, seed=7)
    base = dcl_loss(z1, z2, 0.2, sigma).item()
    assert dcl_loss(z2, z1, 0.2, sigma).item() == pytest.approx(base, rel=1e-6)
    assert dcl_loss(4 * z1, 0.25 * z2, 0.2, sigma).item() == pytest.approx(base, rel=1e-5)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])  # the same pairs in another order
    assert dcl_loss(z1[perm], z2[perm], 0.2, sigma).item() == pytest.approx(base, rel=1e-5)


@pytest.mark.parametrize("name", ["dcl", "dclw"])
@pytest.mark.parametrize("n", [2, 8, 64])
def test_dcl_collapse_value_is_log_2n_minus_2(name: str, n: int) -> None:
    method = create_method(name, create_backbone("test_resnet"), **small_params(name))
    z = torch.ones(n, 16)
    sigma = 0.5 if name == "dclw" else None
    assert dcl_loss(z, z, 0.1, sigma).item() == pytest.approx(method.collapse_loss(n), rel=1e-5)
    assert method.collapse_loss(n) == pytest.approx(math.log(2 * n - 2))


# ----------------------------------------------------------------------------- MMCR


def test_mmcr_with_one_view_and_no_local_term_is_minus_the_nuclear_norm() -> None:
    x = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [1.0, 1.0, 0.0], [0.0, -5.0, 0.0]])
    rows = x.double().numpy() / np.linalg.norm(x.double().numpy(), axis=1, keepdims=True)
    expected = -np.linalg.svd(rows, compute_uv=False).sum()
    assert mmcr_loss(x[:, None, :], 0.0).item() == pytest.approx(expected, rel=1e-6)
    # orthonormal rows: singular values all 1, nuclear norm N
    assert mmcr_loss(torch.eye(3)[:, None, :] * 7, 0.0).item() == pytest.approx(-3.0, rel=1e-6)


@pytest.mark.parametrize("lmbda", [0.0, 0.005, 0.7])
def test_mmcr_equals_a_numpy_computation(lmbda: float) -> None:
    z = _randn(6, 3, 5, seed=8)
    assert mmcr_loss(z, lmbda).item() == pytest.approx(mmcr_numpy(z.double().numpy(), lmbda), rel=1e-5)


def test_mmcr_ignores_the_order_of_views_and_samples_and_the_rows_scale() -> None:
    z = _randn(5, 4, 6, seed=9)
    base = mmcr_loss(z, 0.1).item()
    assert mmcr_loss(z[:, [2, 0, 3, 1]], 0.1).item() == pytest.approx(base, rel=1e-5)
    assert mmcr_loss(z[[4, 1, 0, 3, 2]], 0.1).item() == pytest.approx(base, rel=1e-5)
    assert mmcr_loss(z * torch.rand(5, 4, 1, generator=torch.Generator().manual_seed(0)).add(0.1), 0.1).item() == pytest.approx(base, rel=1e-5)


@pytest.mark.parametrize(("n", "views", "lmbda"), [(8, 2, 0.0), (16, 3, 0.005), (4, 5, 1.0)])
def test_mmcr_collapse_value(n: int, views: int, lmbda: float) -> None:
    method = create_method("mmcr", create_backbone("test_resnet"), **small_params("mmcr", num_views=views, lmbda=lmbda))
    z = torch.ones(n, views, 16)
    assert mmcr_loss(z, lmbda).item() == pytest.approx(method.collapse_loss(n), rel=1e-5, abs=1e-6)
    assert method.collapse_loss(n) == pytest.approx(-math.sqrt(n) + lmbda * math.sqrt(views))


def test_mmcr_gradient_is_finite_at_collapse_and_with_more_dimensions_than_samples() -> None:
    for z in (torch.ones(4, 2, 8), _randn(3, 2, 32, seed=10)):
        z.requires_grad_()
        mmcr_loss(z, 0.5).backward()
        assert torch.isfinite(z.grad).all()


# ----------------------------------------------------------------------------- the methods


@pytest.mark.parametrize("name", ["dcl", "dclw", "mmcr"])
def test_the_step_pairs_each_samples_views_for_the_loss(name: str) -> None:
    """In eval mode (BatchNorm's running statistics) the step's batched forward equals projecting each view alone,
    so the loss must see view v of sample i where the loss functions above expect it."""
    torch.manual_seed(0)
    method = create_method(name, create_backbone("test_resnet", img_size=16), **small_params(name, gather=False)).eval()
    views = [_randn(6, 3, 16, 16, seed=20 + v) for v in range(len(method.views(16)))]
    with torch.no_grad():
        loss = method.training_step(views, StepInfo(0, 0, 1)).loss
        z = [method.projector(method.backbone(v)) for v in views]
    if name == "mmcr":
        expected = mmcr_loss(torch.stack(z, dim=1), method.params.lmbda)
        assert len(views) == method.params.num_views == small_params("mmcr")["num_views"]
    else:
        assert method.sigma == (0.5 if name == "dclw" else None)
        expected = dcl_loss(z[0], z[1], method.params.temperature, method.sigma)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_method_defaults_are_the_references() -> None:
    dclw = create_method("dclw", create_backbone("test_resnet"))
    assert (dclw.params.temperature, dclw.params.sigma, dclw.sigma) == (0.1, 0.5, 0.5)
    assert create_method("dcl", create_backbone("test_resnet")).sigma is None
    mmcr = create_method("mmcr", create_backbone("test_resnet"))
    assert (mmcr.params.lmbda, mmcr.params.num_views, len(mmcr.views(32))) == (0.0, 2, 2)


# ----------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: dcl_loss(torch.ones(2, 2), torch.ones(2, 2), 0.0), "temperature must be > 0"),
        (lambda: dcl_loss(torch.ones(2, 2), torch.ones(2, 2), -0.1), "temperature must be > 0"),
        (lambda: dcl_loss(torch.ones(2, 2), torch.ones(2, 2), 0.1, sigma=0.0), "sigma must be > 0"),
        (lambda: dcl_loss(torch.ones(2, 2), torch.ones(2, 2), 0.1, sigma=-1.0), "sigma must be > 0"),
        (lambda: dcl_loss(torch.ones(2, 3), torch.ones(3, 3), 0.1), "z1 and z2 must both be"),
        (lambda: dcl_loss(torch.ones(1, 3), torch.ones(1, 3), 0.1), "N >= 2"),
        (lambda: mmcr_loss(torch.ones(2, 2, 2), -0.1), "lmbda must be"),
        (lambda: mmcr_loss(torch.ones(2, 2, 2), math.nan), "lmbda must be"),
        (lambda: mmcr_loss(torch.ones(4, 2), 0.0), r"z must be \(N, V, D\)"),
    ],
)
def test_bad_loss_arguments_are_one_line_value_errors(call, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ({"name": "dcl", "temperature": 0}, "method.temperature"),
        ({"name": "dclw", "sigma": 0}, "method.sigma"),
        ({"name": "dclw", "sigma": -0.5}, "method.sigma"),
        ({"name": "dcl", "sigma": 0.5}, "method.sigma.*unknown key"),
        ({"name": "mmcr", "lmbda": -0.01}, "method.lmbda"),
        ({"name": "mmcr", "num_views": 1}, "method.num_views"),
    ],
)
def test_bad_method_parameters_are_one_line_config_errors(method: dict[str, Any], message: str) -> None:
    from harness.config.loading import build_config

    with pytest.raises(ConfigError, match=message) as err:
        build_config({"method": method})
    assert "\n" not in str(err.value)
