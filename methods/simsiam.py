"""SimSiam: Exploring Simple Siamese Representation Learning (Chen & He, CVPR 2021).

One network (backbone, 3-layer projector ending in BatchNorm) and a predictor; each
view's prediction matches the other view's projection under a stop-gradient. No
negatives, no momentum encoder. The loss is per sample, so several workers gather nothing
(see :mod:`methods.distributed`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from core.contract import MethodParams, StepInfo, StepOutput, feature_dim
from core.views import View
from methods import register
from methods.base import Method
from methods.heads import mlp


def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``-mean_i cos(p_i, stopgrad(z_i))`` (SimSiam eq. 1); identical inputs give -1."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


class SimSiamParams(MethodParams):
    proj_dim: int = Field(2048, ge=1)
    pred_hidden_dim: int = Field(512, ge=1, description="the predictor's bottleneck")


@register
class SimSiam(Method):
    name = "simsiam"
    Params = SimSiamParams
    uses_negatives = False
    networks = 1
    loss_name = "cosine (stop-grad)"
    paper = "Chen & He, CVPR 2021"

    params: SimSiamParams
    projector: nn.Sequential

    def __init__(self, backbone: nn.Module, params: SimSiamParams) -> None:
        super().__init__(backbone, params)
        self.projector = mlp(feature_dim(backbone), params.proj_dim, params.proj_dim, 3, last_bn=True)
        self.predictor = mlp(params.proj_dim, params.pred_hidden_dim, params.proj_dim)

    def views(self, image_size: int) -> list[View]:
        """Two full-size views of the run's recipe."""
        return [View(image_size), View(image_size)]

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        z1, z2 = self.projector(self.backbone(torch.cat([views[0], views[1]]))).chunk(2)
        p1, p2 = self.predictor(torch.cat([z1, z2])).chunk(2)
        loss = 0.5 * (simsiam_loss(p1, z2) + simsiam_loss(p2, z1))
        return StepOutput(loss)
