"""VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning
(Bardes, Ponce & LeCun, ICLR 2022).

Two views through one network and an expander; the loss on the expanded z1, z2 (N, D) is

    sim_coeff * MSE(z1, z2)                                                       invariance
    + std_coeff * (mean_d relu(1 - std(z1)_d) + mean_d relu(1 - std(z2)_d)) / 2   variance (hinge at gamma = 1)
    + cov_coeff * (sum_{i != j} C(z1)_ij^2 / D + sum_{i != j} C(z2)_ij^2 / D)     covariance

with std = sqrt(Var + 1e-4) (unbiased) and C(z) the covariance over the batch, as the authors' ``main_vicreg.py``.
No negatives, one network.

Difference from the reference code: with several workers (``gather``) the invariance term is taken on the gathered
rows too (the authors' on each worker's own), so every worker's loss is the single-process loss of the global batch;
the gradients are the same either way.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from core.contract import MethodParams, StepInfo, StepOutput, feature_dim
from core.views import View
from methods import register
from methods.base import Method, asymmetric_views
from methods.distributed import gather
from methods.heads import mlp

STD_TARGET = 1.0
"""gamma: the standard deviation each dimension is pushed up to (the hinge of the variance term)."""
STD_EPS = 1e-4
"""Added to the variance under the square root (numerical stability; the authors' 0.0001)."""


def _centred(z: torch.Tensor) -> torch.Tensor:
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(
            f"VICReg needs embeddings of shape (N, D) with N >= 2 (unbiased batch statistics), got {tuple(z.shape)}"
        )
    z = z.float()
    return z - z.mean(dim=0)


def variance_term(z: torch.Tensor) -> torch.Tensor:
    """``mean_d relu(1 - sqrt(Var_d + 1e-4))`` of z (N, D), the unbiased variance over the batch: 0 when every
    dimension's std is at least 1, 1 - 1e-2 for a collapsed (constant) z."""
    std = torch.sqrt(_centred(z).var(dim=0) + STD_EPS)
    return F.relu(STD_TARGET - std).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """``sum_{i != j} C_ij^2 / D`` with C = (z - mean)^T (z - mean) / (N - 1) the (D, D) covariance of z (N, D):
    0 for decorrelated dimensions, whatever their variances."""
    zc = _centred(z)
    n, d = zc.shape
    cov = zc.T @ zc / (n - 1)
    return (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / d


class VICRegTerms(NamedTuple):
    """The three unweighted terms of the loss (0-d tensors)."""

    invariance: torch.Tensor
    """MSE(z1, z2), the mean over the N x D entries."""
    variance: torch.Tensor
    """The two branches' variance terms, averaged."""
    covariance: torch.Tensor
    """The two branches' covariance terms, summed."""

    def total(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0) -> torch.Tensor:
        """``sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance``; a negative coefficient is a
        ValueError."""
        for name, value in (("sim_coeff", sim_coeff), ("std_coeff", std_coeff), ("cov_coeff", cov_coeff)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"VICReg {name} must be a finite number >= 0, got {value}")
        return sim_coeff * self.invariance + std_coeff * self.variance + cov_coeff * self.covariance


def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor) -> VICRegTerms:
    """Invariance, variance and covariance terms of two views' embeddings z1, z2 (N, D), unweighted; in float32, also
    under autocast (the (D, D) covariance included; the authors' loop ran it under fp16 autocast)."""
    if z1.shape != z2.shape:
        raise ValueError(f"VICReg: the two views' embeddings differ in shape, {tuple(z1.shape)} and {tuple(z2.shape)}")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        invariance = F.mse_loss(z1.float(), z2.float())
        variance = (variance_term(z1) + variance_term(z2)) / 2
        covariance = covariance_term(z1) + covariance_term(z2)
    return VICRegTerms(invariance, variance, covariance)


def vicreg_loss(
    z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0
) -> torch.Tensor:
    """The VICReg loss of z1, z2 (N, D): the weighted sum of :func:`vicreg_terms` (paper defaults 25, 25, 1)."""
    return vicreg_terms(z1, z2).total(sim_coeff, std_coeff, cov_coeff)


class VICRegParams(MethodParams):
    sim_coeff: float = Field(25.0, ge=0, description="lambda: weight of the invariance (MSE) term")
    std_coeff: float = Field(25.0, ge=0, description="mu: weight of the variance term")
    cov_coeff: float = Field(1.0, ge=0, description="nu: weight of the covariance term")
    proj_hidden_dim: int = Field(8192, ge=1)
    proj_dim: int = Field(8192, ge=1)
    gather: bool = Field(
        True, description="with several workers, global batch statistics (false: each worker's own batch)"
    )


@register
class VICReg(Method):
    name = "vicreg"
    Params = VICRegParams
    uses_negatives = False
    networks = 1
    loss_name = "variance-invariance-covariance"
    paper = "Bardes, Ponce & LeCun, ICLR 2022"
    # std_coeff 1 in the tests: with the paper's 25 the variance hinge (about 0.99 on the tiny embeddings of the
    # distributed tests' untrained network, whatever the batch) hides the batch-dependent parts of the loss.

    params: VICRegParams
    projector: nn.Sequential

    def __init__(self, backbone: nn.Module, params: VICRegParams) -> None:
        super().__init__(backbone, params)
        self.projector = mlp(feature_dim(backbone), params.proj_hidden_dim, params.proj_dim, 3)
        # The expander's last layer has no bias, as the authors' (every term is blind to a shift shared by both views,
        # so a bias would get no gradient).
        self.projector[-1] = nn.Linear(params.proj_hidden_dim, params.proj_dim, bias=False)

    def views(self, image_size: int) -> list[View]:
        """Two full-size views, blurred with probability 1.0 and 0.1 and solarised with 0.0 and 0.2
        (Bardes et al. 2022, arXiv:2105.04906, appendix C.1, BYOL's): :data:`methods.base.BYOL_RECIPES`."""
        return asymmetric_views(image_size)

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        z1, z2 = self.projector(self.backbone(torch.cat([views[0], views[1]]))).chunk(2)
        if self.params.gather:
            z1, z2 = gather(z1), gather(z2)
        terms = vicreg_terms(z1, z2)
        p = self.params
        logs: dict[str, float | torch.Tensor] = {
            "vicreg_inv": terms.invariance.detach(),
            "vicreg_var": terms.variance.detach(),
            "vicreg_cov": terms.covariance.detach(),
        }
        return StepOutput(terms.total(p.sim_coeff, p.std_coeff, p.cov_coeff), logs)
