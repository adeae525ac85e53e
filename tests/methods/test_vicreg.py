"""VICReg: each term against a hand computation and its closed forms, the weighting, refused coefficients, and the
loss against an independent transcription of the authors' reference ``forward`` (facebookresearch/vicreg), and each
term over the global batch on two gloo workers."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.backbones import create_backbone
from core.contract import StepInfo
from core.errors import ConfigError
from harness.cli import main
from harness.config.loading import build_config
from methods import create_method
from methods.distributed import average_gradients, rank, world_size
from methods.vicreg import VICRegParams, covariance_term, variance_term, vicreg_loss, vicreg_terms
from tests.helpers.ddp import run_distributed
from tests.helpers.method_params import small_params

HADAMARD = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
"""Its last three columns are zero-mean and mutually orthogonal: exactly decorrelated."""


def _decorrelated(scales: tuple[float, ...] = (1.0, 3.0, 0.5), shift: tuple[float, ...] = (5.0, -2.0, 0.25)) -> torch.Tensor:
    return HADAMARD[:, 1:] * torch.tensor(scales) + torch.tensor(shift)


# ----------------------------------------------------------------------------- variance


def test_variance_is_zero_when_every_std_is_at_least_one() -> None:
    z = _decorrelated(scales=(1.0, 3.0, 2.0))  # unbiased variances 4/3, 12, 16/3: every std > 1
    assert variance_term(z).item() == 0.0
    z = torch.tensor([[-1.0, 10.0], [1.0, -10.0]])  # N = 2: unbiased variances 2 and 200
    assert variance_term(z).item() == 0.0


def test_variance_by_hand() -> None:
    # three dimensions over N = 4 samples:
    #   [7, 7, 7, 7]    variance 0                            std sqrt(1e-4) = 0.01  hinge 0.99
    #   [0, 0, 1, 1]    squares about the mean 4 * 0.25 = 1    variance 1/3           hinge 1 - sqrt(1/3 + 1e-4)
    #   [-2, 2, -2, 2]  squares 16, / 3                        variance 16/3          hinge 0
    z = torch.tensor([[7.0, 0, -2], [7, 0, 2], [7, 1, -2], [7, 1, 2]])
    expected = (0.99 + (1 - math.sqrt(1 / 3 + 1e-4)) + 0.0) / 3  # 0.470854...
    assert variance_term(z).item() == pytest.approx(expected, rel=1e-5)
    # the biased variance (1/4 for the middle column) would give (0.99 + 1 - sqrt(0.2501)) / 3 = 0.4966...
    assert abs(variance_term(z).item() - (0.99 + 1 - math.sqrt(0.2501)) / 3) > 1e-2
    # collapsed embeddings: every dimension at the hinge's maximum, 1 - 0.01
    assert variance_term(torch.ones(8, 5)).item() == pytest.approx(0.99, rel=1e-6)
    # the loss averages the two branches
    assert vicreg_terms(z, torch.ones(4, 3)).variance.item() == pytest.approx((expected + 0.99) / 2, rel=1e-5)


# ----------------------------------------------------------------------------- covariance


def test_covariance_is_zero_for_decorrelated_dimensions() -> None:
    z = _decorrelated()
    assert covariance_term(z).item() == pytest.approx(0.0, abs=1e-10)
    assert vicreg_terms(z, z).covariance.item() == pytest.approx(0.0, abs=1e-10)


def test_covariance_by_hand_in_three_dimensions() -> None:
    # centred columns a = [1, -1, 1, -1], b = [2, 0, 0, -2], c = [1, 1, -1, -1]; N - 1 = 3:
    #   C_ab = (2 + 0 + 0 + 2) / 3 = 4/3,  C_ac = (1 - 1 - 1 + 1) / 3 = 0,  C_bc = (2 + 0 + 0 + 2) / 3 = 4/3
    #   sum over i != j of C_ij^2 = 2 * (16/9 + 0 + 16/9) = 64/9;  / D = 3  ->  64/27 = 2.370370...
    centred = torch.tensor([[1.0, 2, 1], [-1, 0, 1], [1, 0, -1], [-1, -2, -1]])
    z = centred + torch.tensor([5.0, -3.0, 0.5])  # a shift per dimension changes nothing
    assert covariance_term(z).item() == pytest.approx(64 / 27, rel=1e-6)
    # dividing by N instead of N - 1 would give 2 * (1 + 0 + 1) / 3 = 4/3
    assert covariance_term(z).item() != pytest.approx(4 / 3, rel=1e-2)
    # the loss sums the two branches
    assert vicreg_terms(z, _decorrelated()[:, [0, 1, 2]]).covariance.item() == pytest.approx(64 / 27, rel=1e-6)
    assert vicreg_terms(z, z).covariance.item() == pytest.approx(2 * 64 / 27, rel=1e-6)


# ----------------------------------------------------------------------------- invariance and the total


def test_invariance_is_the_mse() -> None:
    z = torch.randn(6, 4)
    assert vicreg_terms(z, z).invariance.item() == 0.0
    z1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    # differences 0, 2, 3, 0: squares 0 + 4 + 9 + 0 = 13, over 4 entries
    assert vicreg_terms(z1, z2).invariance.item() == pytest.approx(13 / 4)


def test_the_total_is_the_weighted_sum_with_the_papers_defaults() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g)
    t = vicreg_terms(z1, z2)
    assert all(v.item() > 0 for v in t)  # every term contributes
    assert vicreg_loss(z1, z2, 2.0, 3.0, 0.5).item() == pytest.approx((2 * t.invariance + 3 * t.variance + 0.5 * t.covariance).item(), rel=1e-6)
    assert vicreg_loss(z1, z2).item() == pytest.approx((25 * t.invariance + 25 * t.variance + t.covariance).item(), rel=1e-6)
    assert vicreg_loss(z1, z2, 0.0, 0.0, 1.0).item() == pytest.approx(t.covariance.item(), rel=1e-6)
    # blind to a shift shared by the two views
    assert vicreg_loss(z1 + 3.0, z2 + 3.0).item() == pytest.approx(vicreg_loss(z1, z2).item(), rel=1e-5)


def test_the_statistics_stay_in_float32_under_autocast() -> None:
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    expected = vicreg_terms(z1, z2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # would run the (D, D) covariance in bfloat16
        got = vicreg_terms(z1, z2)
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)


def test_negative_coefficients_and_bad_shapes_are_refused() -> None:
    z = torch.randn(4, 3)
    for coeffs in [(-1.0, 25.0, 1.0), (25.0, -0.1, 1.0), (25.0, 25.0, -1.0), (math.nan, 25.0, 1.0)]:
        with pytest.raises(ValueError, match="coeff"):
            vicreg_loss(z, z, *coeffs)
    with pytest.raises(ValueError, match="N >= 2"):
        vicreg_loss(z[:1], z[:1])
    with pytest.raises(ValueError, match="shape"):
        vicreg_loss(z, z[:, :2])
    for key in ["sim_coeff", "std_coeff", "cov_coeff"]:
        with pytest.raises(ConfigError, match=f"method.{key}"):
            build_config({"method": {"name": "vicreg", key: -1}})


def test_a_negative_coefficient_is_a_one_line_config_error(tmp_path, tracking_uri, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("method: {name: vicreg, std_coeff: -1}\n")
    code = main(["-q", "run", str(path)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "method.std_coeff" in lines[0], err


# ----------------------------------------------------------------------------- the authors' formula


def _off_diagonal(x: torch.Tensor) -> torch.Tensor:
    # the authors' helper: every off-diagonal entry of a square matrix, flattened
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def _reference_vicreg(x: torch.Tensor, y: torch.Tensor, sim_coeff: float, std_coeff: float, cov_coeff: float) -> torch.Tensor:
    # VICReg.forward of facebookresearch/vicreg main_vicreg.py, on one process, after the projector
    batch_size, num_features = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)
    cov_loss = _off_diagonal(cov_x).pow_(2).sum().div(num_features) + _off_diagonal(cov_y).pow_(2).sum().div(num_features)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


@pytest.mark.parametrize("n,d,scale", [(32, 16, 0.3), (64, 8, 2.0), (5, 40, 1.0)])
def test_against_the_authors_formula_on_random_inputs(n: int, d: int, scale: float) -> None:
    # scales below and above 1 put the variance hinge on either side; the reference in float64, the loss in float32
    g = torch.Generator().manual_seed(n + d)
    x, y = scale * torch.randn(n, d, generator=g) + 1.0, scale * torch.randn(n, d, generator=g)
    for coeffs in [(25.0, 25.0, 1.0), (1.0, 0.5, 10.0)]:
        expected = _reference_vicreg(x.double(), y.double(), *coeffs).item()
        assert vicreg_loss(x, y, *coeffs).item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- the method


def test_the_method_logs_its_terms_and_its_expander_is_the_papers() -> None:
    torch.manual_seed(0)
    method = create_method("vicreg", create_backbone("test_resnet", in_chans=3, img_size=16), **small_params("vicreg"))
    linears = [m for m in method.projector if isinstance(m, torch.nn.Linear)]
    batch_norms = [m for m in method.projector if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(linears) == 3 and len(batch_norms) == 2 and linears[-1].bias is None  # last layer linear, no BN, no bias
    x = torch.randn(8, 3, 16, 16)
    out = method.training_step([x, x.flip(-1)], StepInfo(0, 0, 1))
    logs = {k: float(v) for k, v in out.logs.items()}
    assert set(logs) == {"vicreg_inv", "vicreg_var", "vicreg_cov"}
    p = method.params
    assert out.loss.item() == pytest.approx(p.sim_coeff * logs["vicreg_inv"] + p.std_coeff * logs["vicreg_var"] + p.cov_coeff * logs["vicreg_cov"], rel=1e-5)
    defaults = VICRegParams()  # the paper's (building its 8192-wide expander takes seconds)
    assert (defaults.sim_coeff, defaults.std_coeff, defaults.cov_coeff, defaults.proj_hidden_dim, defaults.proj_dim) == (25, 25, 1, 8192, 8192)


# ----------------------------------------------------------------------------- each term over the global batch


TERMS = {"vicreg_inv": (1.0, 0.0, 0.0), "vicreg_var": (0.0, 1.0, 0.0), "vicreg_cov": (0.0, 0.0, 1.0)}
"""One method per term, (sim, std, cov) coefficients: each term's value and gradient checked on its own."""
SCALE = 30.0
"""Input scale at which the embeddings' per-dimension std straddles 1 (the hinge active on some dimensions, not on
others) and the three terms are of order 1. The registry-wide test in test_distributed.py runs on embeddings of std
about 0.004, where the variance term is about 0.99 whatever the batch and the covariance term's gradient about 1e-8."""


class _LinearBackbone(nn.Module):
    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _one_term_steps() -> dict[str, dict[str, Any]]:
    """One training step per term, with and without gathering, on this worker's rows of a fixed global batch of 8
    (all of it without a process group); gradients averaged over the workers. No BatchNorm (per-worker statistics)."""
    g = torch.Generator().manual_seed(1)
    views = [SCALE * torch.randn(8, 3, 2, 2, generator=g) for _ in range(2)]
    n = 8 // world_size()
    views = [v[rank() * n : (rank() + 1) * n] for v in views]
    results = {}
    for term, (sim, std, cov) in TERMS.items():
        for gathering in (True, False):
            torch.manual_seed(0)
            method = create_method("vicreg", _LinearBackbone(), proj_hidden_dim=16, proj_dim=8, sim_coeff=sim, std_coeff=std, cov_coeff=cov, gather=gathering)
            for i, layer in enumerate(method.projector):
                if isinstance(layer, nn.BatchNorm1d):
                    method.projector[i] = nn.Identity()
            out = method.training_step(views, StepInfo(0, 0, 1))
            out.loss.backward()
            average_gradients(method)
            grads = {name: p.grad.clone() for name, p in method.named_parameters() if p.grad is not None}
            results[term + ("" if gathering else "/no_gather")] = {"loss": out.loss.detach(), "logs": {k: torch.as_tensor(v) for k, v in out.logs.items()}, "grads": grads}
    return results


def _worker(rank_: int, world: int) -> dict[str, dict[str, Any]]:
    return _one_term_steps()


def test_two_workers_give_each_term_and_its_gradient_of_the_global_batch(tmp_path) -> None:
    workers = run_distributed(_worker, tmp_path, 2)
    single = _one_term_steps()
    for term in TERMS:
        expected = single[term]
        top = max(v.abs().max().item() for v in expected["grads"].values())
        assert expected["loss"].item() > 0.1 and top > 1e-2, (term, expected["loss"], top)  # the term is not negligible here
        tol = {"atol": 1e-5 * top, "rtol": 1e-4}
        for r, w in enumerate(workers):
            torch.testing.assert_close(w[term]["loss"], expected["loss"], atol=1e-6, rtol=1e-5, msg=lambda m, r=r, term=term: f"{term} rank {r}: {m}")
            for key, value in expected["logs"].items():
                torch.testing.assert_close(w[term]["logs"][key], value, atol=1e-6, rtol=1e-5)
            assert w[term]["grads"].keys() == expected["grads"].keys()
            for key, value in expected["grads"].items():
                torch.testing.assert_close(w[term]["grads"][key], value, **tol, msg=lambda m, r=r, term=term, key=key: f"{term} rank {r} {key}: {m}")
        local = workers[0][term + "/no_gather"]
        if term == "vicreg_inv":  # a mean over samples: each worker's own rows give the global gradient (the authors' way)
            for key, value in expected["grads"].items():
                torch.testing.assert_close(local["grads"][key], value, **tol)
        else:  # batch statistics: each worker's half batch is not the global batch
            assert not torch.allclose(local["loss"], expected["loss"], rtol=1e-2), term
            assert any(not torch.allclose(local["grads"][k], v, **tol) for k, v in expected["grads"].items()), term
