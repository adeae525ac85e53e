"""BYOL: Bootstrap Your Own Latent (Grill et al., NeurIPS 2020).

An online network (backbone, projector, predictor) predicts the projection of the
other view made by a target network (backbone, projector), an exponential moving
average of the online one whose momentum rises from 0.996 to 1 on a cosine
schedule. No negatives; the target receives no gradients. The loss is per sample,
so several workers gather nothing (see :mod:`methods.distributed`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from core.contract import MethodParams, StepInfo, StepOutput, feature_dim
from core.views import View
from methods import register
from methods.base import Method, asymmetric_views
from methods.heads import mlp
from methods.momentum import cosine_momentum, ema_update, frozen_copy


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``mean_i (2 - 2 cos(p_i, z_i))`` (BYOL eq. 2); identical inputs give 0. ``z`` is the target (detach it)."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=1)).mean()


class BYOLParams(MethodParams):
    base_momentum: float = Field(0.996, ge=0, lt=1, description="target EMA momentum at step 0 (cosine to 1)")
    proj_hidden_dim: int = Field(4096, ge=1)
    proj_dim: int = Field(256, ge=1)
    pred_hidden_dim: int = Field(4096, ge=1)


@register
class BYOL(Method):
    name = "byol"
    Params = BYOLParams
    uses_negatives = False
    networks = 2
    loss_name = "cosine (EMA target)"
    paper = "Grill et al., NeurIPS 2020"

    params: BYOLParams
    projector: nn.Sequential

    def __init__(self, backbone: nn.Module, params: BYOLParams) -> None:
        super().__init__(backbone, params)
        self.projector = mlp(feature_dim(backbone), params.proj_hidden_dim, params.proj_dim)
        self.predictor = mlp(params.proj_dim, params.pred_hidden_dim, params.proj_dim)
        self.target = frozen_copy(nn.Sequential(backbone, self.projector))

    def views(self, image_size: int) -> list[View]:
        """Two full-size views, blurred with probability 1.0 and 0.1 and solarised with 0.0 and 0.2
        (Grill et al. 2020, arXiv:2006.07733, appendix B, Table 6): :data:`methods.base.BYOL_RECIPES`."""
        return asymmetric_views(image_size)

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        x1, x2 = views[0], views[1]
        p1, p2 = self.predictor(self.projector(self.backbone(torch.cat([x1, x2])))).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target(torch.cat([x1, x2])).chunk(2)
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)  # symmetrised, summed as in the paper
        return StepOutput(loss, {"momentum": cosine_momentum(step.step, step.total_steps, self.params.base_momentum)})

    def after_step(self, step: StepInfo) -> None:
        tau = cosine_momentum(step.step, step.total_steps, self.params.base_momentum)
        ema_update(self.target, nn.Sequential(self.backbone, self.projector), tau)
