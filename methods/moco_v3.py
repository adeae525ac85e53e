"""MoCo v3: An Empirical Study of Training Self-Supervised Vision Transformers (Chen, Xie & He, ICCV 2021).

No queue: the two views' queries (backbone, projector, predictor) are contrasted
with the momentum encoder's keys of the other view within the batch; symmetric
loss, each term scaled by 2T as in the paper's code. The momentum rises from 0.99
to 1 on a cosine schedule. Works with ResNet and ViT backbones alike. With several
workers the queries and keys are gathered (``gather``): the loss is that of the global batch.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from core.contract import MethodParams, StepInfo, StepOutput, feature_dim
from core.views import View
from methods import register
from methods.base import Method, asymmetric_views
from methods.distributed import gather, gather_no_grad
from methods.heads import mlp
from methods.losses import info_nce
from methods.momentum import cosine_momentum, ema_update, frozen_copy


def mocov3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """``CE(q k^T / T, diagonal) * 2T`` on L2-normalised q, k (N, D): in-batch negatives, as in the paper."""
    return info_nce(q, k, temperature) * (2 * temperature)


class MoCoV3Params(MethodParams):
    temperature: float = Field(0.2, gt=0, description="0.2 for ViT (paper), 1.0 for ResNet-50")
    base_momentum: float = Field(0.99, ge=0, lt=1, description="momentum at step 0, cosine to 1")
    proj_hidden_dim: int = Field(4096, ge=1)
    proj_dim: int = Field(256, ge=1)
    pred_hidden_dim: int = Field(4096, ge=1)
    gather: bool = Field(
        True,
        description="with several workers, contrast against the global batch's keys (false: each worker's own batch)",
    )


@register
class MoCoV3(Method):
    name = "moco_v3"
    Params = MoCoV3Params
    uses_negatives = True
    networks = 2
    loss_name = "InfoNCE (in-batch, 2T)"
    paper = "Chen, Xie & He, ICCV 2021"

    params: MoCoV3Params
    projector: nn.Sequential

    def __init__(self, backbone: nn.Module, params: MoCoV3Params) -> None:
        super().__init__(backbone, params)
        self.projector = mlp(feature_dim(backbone), params.proj_hidden_dim, params.proj_dim, 3, last_bn=True)
        self.predictor = mlp(params.proj_dim, params.pred_hidden_dim, params.proj_dim, 2, last_bn=True)
        self.momentum_encoder = frozen_copy(nn.Sequential(backbone, self.projector))

    def views(self, image_size: int) -> list[View]:
        """Two full-size views, blurred with probability 1.0 and 0.1 and solarised with 0.0 and 0.2
        (Chen et al. 2021, arXiv:2104.02057, appendix A.1, BYOL's): :data:`methods.base.BYOL_RECIPES`."""
        return asymmetric_views(image_size)

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        x = torch.cat([views[0], views[1]])
        q1, q2 = self.predictor(self.projector(self.backbone(x))).chunk(2)
        with torch.no_grad():
            k1, k2 = self.momentum_encoder(x).chunk(2)
        if self.params.gather:
            q1, q2, k1, k2 = gather(q1), gather(q2), gather_no_grad(k1), gather_no_grad(k2)
        t = self.params.temperature
        return StepOutput(mocov3_loss(q1, k2, t) + mocov3_loss(q2, k1, t))

    def after_step(self, step: StepInfo) -> None:
        tau = cosine_momentum(step.step, step.total_steps, self.params.base_momentum)
        ema_update(self.momentum_encoder, nn.Sequential(self.backbone, self.projector), tau)
