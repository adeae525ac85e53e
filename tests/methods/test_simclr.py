"""NT-Xent against its closed form and a plain loop implementation; the SimCLR method's contract."""

import math

import pytest
import torch
import torch.nn.functional as F

from methods.simclr import nt_xent


def nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """The definition, one anchor at a time (SimCLR eq. 1), in float64."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        num = math.exp(float(z[i] @ z[j]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(num / den)
    return total / n2


@pytest.mark.parametrize("n", [2, 8, 256])
def test_collapsed_embeddings_give_log_2n_minus_1(n):
    z = torch.ones(n, 16)
    assert nt_xent(z, z, 0.5).item() == pytest.approx(math.log(2 * n - 1), rel=1e-5)


def test_check_value_from_protocols():
    z = torch.ones(256, 4)
    assert nt_xent(z, z, 0.1).item() == pytest.approx(6.2364, abs=1e-4)


@pytest.mark.parametrize("t", [0.07, 0.5, 1.0])
def test_matches_loop_implementation(t):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert nt_xent(z1, z2, t).item() == pytest.approx(nt_xent_loop(z1, z2, t), rel=1e-5)


def test_scale_invariant_and_symmetric_in_views():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    base = nt_xent(z1, z2, 0.2)
    assert nt_xent(3 * z1, 0.5 * z2, 0.2).item() == pytest.approx(base.item(), rel=1e-5)
    assert nt_xent(z2, z1, 0.2).item() == pytest.approx(base.item(), rel=1e-5)


def test_perfect_positives_and_orthogonal_negatives_approach_zero():
    z = torch.eye(4)  # each view's positive is identical, every negative orthogonal
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + 6))  # 2N - 2 = 6 negatives at similarity 0
    assert nt_xent(z, z, 0.5).item() == pytest.approx(expected, rel=1e-5)
    assert nt_xent(z, z, 0.05).item() < 1e-6


@pytest.mark.parametrize("t", [0.0, -0.1])
def test_rejects_non_positive_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.ones(2, 2), torch.ones(2, 2), t)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="z1 and z2"):
        nt_xent(torch.ones(2, 3), torch.ones(3, 3), 0.5)
