"""Barlow Twins: Self-Supervised Learning via Redundancy Reduction (Zbontar et al., ICML 2021).

The cross-correlation matrix of the two views' batch-normalised projections is
pushed to the identity: its diagonal to 1 (invariance), its off-diagonal to 0
(redundancy reduction), weighted by lambda. No negatives, one network. With several
workers the projections are gathered (``gather``) so that the normalisation and the
cross-correlation use the statistics of the global batch, as the paper requires.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from core.contract import MethodParams, StepInfo, StepOutput, feature_dim
from core.views import View
from methods import register
from methods.base import Method, asymmetric_views
from methods.distributed import gather
from methods.heads import mlp


def _batch_normalize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-dimension standardisation over the batch, no affine, biased variance (BatchNorm1d in training mode)."""
    z = z.float()
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3) -> torch.Tensor:
    """``sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2`` with C the (D, D) cross-correlation of the
    batch-normalised z1, z2 (N, D). Perfectly correlated, decorrelated features give 0; invariant to
    per-dimension affine maps of either input."""
    n = z1.shape[0]
    c = _batch_normalize(z1).T @ _batch_normalize(z2) / n
    on_diag = (1 - torch.diagonal(c)).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


class BarlowTwinsParams(MethodParams):
    lambd: float = Field(5e-3, gt=0, description="weight of the off-diagonal term")
    proj_hidden_dim: int = Field(8192, ge=1)
    proj_dim: int = Field(8192, ge=1)
    gather: bool = Field(
        True, description="with several workers, global batch statistics (false: each worker's own batch)"
    )


@register
class BarlowTwins(Method):
    name = "barlow_twins"
    Params = BarlowTwinsParams
    uses_negatives = False
    networks = 1
    loss_name = "cross-correlation"
    paper = "Zbontar et al., ICML 2021"

    params: BarlowTwinsParams
    projector: nn.Sequential

    def __init__(self, backbone: nn.Module, params: BarlowTwinsParams) -> None:
        super().__init__(backbone, params)
        self.projector = mlp(feature_dim(backbone), params.proj_hidden_dim, params.proj_dim, 3)

    def views(self, image_size: int) -> list[View]:
        """Two full-size views, blurred with probability 1.0 and 0.1 and solarised with 0.0 and 0.2
        (Zbontar et al. 2021, arXiv:2103.03230, appendix A.1, BYOL's): :data:`methods.base.BYOL_RECIPES`."""
        return asymmetric_views(image_size)

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        z1, z2 = self.projector(self.backbone(torch.cat([views[0], views[1]]))).chunk(2)
        if self.params.gather:
            z1, z2 = gather(z1), gather(z2)
        return StepOutput(barlow_twins_loss(z1, z2, self.params.lambd))
