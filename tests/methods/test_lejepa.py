"""LeJEPA's two terms against hand computations and closed forms, its loss as their weighted sum, its random
directions, and its bad input. The registry-wide contract and the two-worker equality test cover the rest."""

from __future__ import annotations

import math

import pytest
import torch

from core.contract import StepInfo
from harness.cli import main
from methods import create_method
from methods.lejepa import epps_pulley_weights, invariance, random_directions, sigreg
from tests.helpers.method_params import small_params
from tests.helpers.runs import CONFIG


class TinyBackbone(torch.nn.Module):
    """Conv, ReLU, global average pooling: any image size."""

    num_features = 12

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, self.num_features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def hand_sigreg(x: list[list[float]], knots: int, t_max: float) -> float:
    """The statistic of the slices ``x[s]`` (each a list of N samples), with explicit sums and the trapezoidal rule."""
    dt = t_max / (knots - 1)
    total = 0.0
    for samples in x:
        n = len(samples)
        stat = 0.0
        for k in range(knots):
            t = k * dt
            trapezoid = dt / 2 if k in (0, knots - 1) else dt
            cos = sum(math.cos(t * v) for v in samples) / n
            sin = sum(math.sin(t * v) for v in samples) / n
            stat += 2 * trapezoid * math.exp(-t * t / 2) * ((cos - math.exp(-t * t / 2)) ** 2 + sin**2)
        total += n * stat
    return total / len(x)


def test_sigreg_equals_a_hand_computation_on_two_slices() -> None:
    proj = torch.tensor([[0.5, -1.0], [1.5, 0.25], [-0.75, 2.0]])
    directions = torch.tensor([[1.0, 0.6], [0.0, 0.8]])  # unit columns: the first coordinate, and a mix
    slices = [[float(row[0]) for row in proj], [0.6 * float(row[0]) + 0.8 * float(row[1]) for row in proj]]
    got = sigreg(proj, directions, knots=5, t_max=2.0)
    assert got.item() == pytest.approx(hand_sigreg(slices, 5, 2.0), rel=1e-5)
    views = torch.stack([proj, proj.flip(0) * 0.5])  # (V, N, D): the mean over the views
    second = [
        [0.5 * float(row[0]) for row in proj],
        [0.5 * (0.6 * float(row[0]) + 0.8 * float(row[1])) for row in proj],
    ]
    expected = (hand_sigreg(slices, 5, 2.0) + hand_sigreg(second, 5, 2.0)) / 2
    assert sigreg(views, directions, knots=5, t_max=2.0).item() == pytest.approx(expected, rel=1e-5)


def test_sigreg_of_gaussian_samples_is_its_expectation_under_the_null_and_collapse_or_a_shift_is_far_above() -> None:
    """For N iid N(0, 1) samples E[N |phi_N(t) - phi(t)|^2] = 1 - exp(-t^2) exactly, so the statistic's mean is
    sum_k w_k (1 - exp(-t_k^2)), about 1.06, whatever N: averaged over 512 slices it lands within a few percent."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1024, 64, generator=g)
    directions = random_directions(64, 512, step=0)
    t, weights = epps_pulley_weights(17, 3.0)
    expected = float((weights * (1 - torch.exp(-t.square()))).sum())
    gaussian = sigreg(z, directions).item()
    assert gaussian == pytest.approx(expected, rel=0.05) and 1.0 < expected < 1.1
    collapsed = sigreg(torch.ones(1024, 64) * 0.3, directions).item()
    shifted = sigreg(z + 2.0, directions).item()
    assert collapsed > 100 * gaussian and shifted > 100 * gaussian


def test_invariance_is_zero_for_identical_views_and_the_mean_square_to_the_global_mean() -> None:
    g = torch.Generator().manual_seed(1)
    view = torch.randn(5, 4, generator=g)
    assert invariance(torch.stack([view] * 4), torch.stack([view] * 2)).item() == 0.0
    a, b, c = (torch.randn(5, 4, generator=g) for _ in range(3))
    centre = (a + b) / 2
    expected = ((a - centre).square().mean() + (b - centre).square().mean() + (c - centre).square().mean()) / 3
    assert invariance(torch.stack([a, b, c]), torch.stack([a, b])).item() == pytest.approx(expected.item(), rel=1e-6)


def test_directions_are_unit_columns_fixed_by_the_step_and_fresh_each_step() -> None:
    a = random_directions(16, 8, step=3)
    assert a.shape == (16, 8) and torch.allclose(a.norm(dim=0), torch.ones(8))
    assert torch.equal(a, random_directions(16, 8, step=3)) and not torch.allclose(a, random_directions(16, 8, step=4))


def test_the_loss_is_lambda_sigreg_plus_one_minus_lambda_invariance_of_its_projections() -> None:
    torch.manual_seed(0)
    method = create_method("lejepa", TinyBackbone(), **small_params("lejepa", lmbda=0.3))
    views = [torch.randn(6, 3, v.size, v.size) for v in method.views(16)]
    assert [v.size for v in method.views(16)] == [16, 16, 8, 8]
    out = method.training_step(views, StepInfo(0, 5, 10))
    with torch.no_grad():  # one projector call for every view, as the step's (its BatchNorm's statistics)
        proj = torch.stack(method.projector(torch.cat([method.backbone(v) for v in views])).chunk(len(views)))
    sig = sigreg(proj, random_directions(proj.shape[-1], 64, step=5))
    inv = invariance(proj, proj[:2])
    torch.testing.assert_close(out.loss.detach(), 0.3 * sig + 0.7 * inv, rtol=1e-4, atol=1e-5)
    assert float(out.logs["sigreg"]) == pytest.approx(sig.item(), rel=1e-4)


@pytest.mark.parametrize(
    "override,message",
    [
        ("method.lmbda=1.5", "method.lmbda: "),
        ("method.lmbda=-0.1", "method.lmbda: "),
        ("method.num_slices=0", "method.num_slices: "),
    ],
)
def test_bad_lejepa_settings_are_one_line_exit_2(tmp_path, unmade_tracking_uri, capsys, override, message) -> None:
    code = main(["-q", "run", CONFIG, "method=lejepa", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert "[0, 1]" in err[0] or "at least 1 slice" in err[0], err
    assert not (tmp_path / "mlflow.db").exists()
