"""MMCR: Learning Efficient Coding of Natural Images with Maximum Manifold Capacity Representations
(Yerxa, Kuang, Simoncelli & Chung, NeurIPS 2023, arXiv:2303.03307).

Each image's V views, projected and normalised, form a small manifold; the loss maximises the nuclear norm of the
matrix of the manifolds' centroids (spreading the images apart while pulling each one's views together, which
shrinks its centroid away from the sphere), optionally penalising each manifold's own nuclear norm. No negatives,
no second network. Checked against lightly's ``MMCRLoss`` (lightly/loss/mmcr_loss.py) and the authors' ``MMCR_Loss``
(ThomasYerxa/mmcr, mmcr/cifar_stl/loss_mmcr.py). With several workers the projections are gathered first (``gather``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from core.contract import MethodParams, StepInfo, StepOutput, feature_dim
from core.views import View
from methods import register
from methods.base import Method
from methods.distributed import gather
from methods.heads import mlp


def mmcr_loss(z: torch.Tensor, lmbda: float = 0.0) -> torch.Tensor:
    """``-||C||_* + lmbda sum_i ||z_i||_* / N``, the MMCR objective with its local term: C (N, D) the mean over
    views of the row-normalised ``z``, z_i sample i's (V, D) matrix of views, ``||.||_*`` the nuclear norm.

    Collapsed embeddings (all rows one unit vector) give ``-sqrt(N) + lmbda sqrt(V)``: both matrices have rank 1.

    z: (N, V, D) projections of V views of N samples, not necessarily normalised.
    """
    if not (math.isfinite(lmbda) and lmbda >= 0):
        raise ValueError(f"lmbda must be a finite value >= 0, got {lmbda}")
    if z.dim() != 3 or min(z.shape) < 1:
        raise ValueError(f"z must be (N, V, D) with N, V, D >= 1, got {tuple(z.shape)}")
    z = F.normalize(z.float(), dim=-1)
    loss = -torch.linalg.svdvals(z.mean(dim=1)).sum()
    if lmbda > 0:  # N small SVDs, skipped at the default
        loss = loss + lmbda * torch.linalg.svdvals(z).sum() / z.shape[0]
    return loss


class MMCRParams(MethodParams):
    lmbda: float = Field(
        0.0, ge=0, description="weight of the per-sample nuclear norm (0 in the authors' scripts; lightly: 5e-3)"
    )
    proj_hidden_dim: int = Field(512, ge=1, description="the authors' CIFAR/STL projector: 512 hidden")
    proj_dim: int = Field(128, ge=1)
    proj_layers: int = Field(2, ge=1)
    num_views: int = Field(2, ge=2, description="views per image (the authors: 40 on CIFAR/STL, 8 on ImageNet)")
    gather: bool = Field(
        True, description="with several workers, the centroid matrix of the global batch (false: each worker's own)"
    )


@register
class MMCR(Method):
    name = "mmcr"
    Params = MMCRParams
    uses_negatives = False
    networks = 1
    loss_name = "nuclear norm (MMCR)"
    paper = (
        "Yerxa et al. 2023, Learning Efficient Coding of Natural Images with Maximum Manifold Capacity Representations"
    )

    params: MMCRParams
    projector: torch.nn.Sequential

    def __init__(self, backbone: torch.nn.Module, params: MMCRParams) -> None:
        super().__init__(backbone, params)
        self.projector = mlp(feature_dim(backbone), params.proj_hidden_dim, params.proj_dim, params.proj_layers)

    def views(self, image_size: int) -> list[View]:
        """``num_views`` full-size views of the run's recipe."""
        return [View(image_size) for _ in range(self.params.num_views)]

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        per_view = self.projector(self.backbone(torch.cat(views))).chunk(len(views))
        if self.params.gather:
            per_view = tuple(gather(z) for z in per_view)
        return StepOutput(mmcr_loss(torch.stack(per_view, dim=1), self.params.lmbda))

    def collapse_loss(self, batch_size: int) -> float | None:
        # one unit vector everywhere: C is N copies of it (nuclear norm sqrt(N)), each z_i V copies (sqrt(V))
        return -math.sqrt(batch_size) + self.params.lmbda * math.sqrt(self.params.num_views)
