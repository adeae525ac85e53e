"""NNCLR: With a Little Help from My Friends (Dwibedi et al., ICCV 2021).

Nearest-neighbour contrastive learning: the positive for one view is the nearest
neighbour of its projection in a support queue of past projections (looked up
before this batch is enqueued), contrasted against the other view's prediction
with in-batch negatives; symmetric over the two views. With several workers
(``gather``) the predictions and projections are gathered: the negatives are those of the
global batch, and every worker enqueues the global batch into the same support queue.
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
from methods.distributed import gather, gather_no_grad
from methods.heads import mlp
from methods.losses import info_nce
from methods.queue import FeatureQueue


def nearest_neighbour(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """For each L2-normalised row of z (N, D), the most similar row of ``support`` (K, D) (no gradient)."""
    return support[(z.detach() @ support.T).argmax(dim=1)]


def nnclr_loss(nn_z: torch.Tensor, p: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``CE(NN(z_i) . p_j / T, i)``: the support neighbour of view 1 against the predictions of view 2.

    InfoNCE with cosine similarities, N candidates (solo-learn's choice; lightly's has 2N - 1).
    nn_z, p: (N, D).
    """
    return info_nce(nn_z, p, temperature)


class NNCLRParams(MethodParams):
    temperature: float = Field(0.1, gt=0)
    queue_size: int = Field(98304, ge=1, description="support set of past projections")
    proj_hidden_dim: int = Field(2048, ge=1)
    proj_dim: int = Field(256, ge=1)
    pred_hidden_dim: int = Field(4096, ge=1)
    gather: bool = Field(
        True,
        description=(
            "with several workers, in-batch negatives and enqueueing over the global batch (false: each worker's own)"
        ),
    )


@register
class NNCLR(Method):
    name = "nnclr"
    Params = NNCLRParams
    uses_negatives = True
    networks = 1
    loss_name = "InfoNCE (nearest-neighbour positive)"
    paper = "Dwibedi et al., ICCV 2021"

    params: NNCLRParams
    projector: nn.Sequential

    def __init__(self, backbone: nn.Module, params: NNCLRParams) -> None:
        super().__init__(backbone, params)
        self.projector = mlp(feature_dim(backbone), params.proj_hidden_dim, params.proj_dim, 3, last_bn=True)
        self.predictor = mlp(params.proj_dim, params.pred_hidden_dim, params.proj_dim)
        self.support = FeatureQueue(params.queue_size, params.proj_dim)

    def check(self, batch_size: int) -> None:
        self.support.check_holds_batch(batch_size)

    def views(self, image_size: int) -> list[View]:
        """Two full-size views of the run's recipe."""
        return [View(image_size), View(image_size)]

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        z = self.projector(self.backbone(torch.cat([views[0], views[1]])))
        p1, p2 = self.predictor(z).chunk(2)
        z1, z2 = F.normalize(z, dim=1).chunk(2)
        if self.params.gather:
            p1, p2, z1, z2 = gather(p1), gather(p2), gather_no_grad(z1), gather_no_grad(z2)
        support = self.support.features()  # before this batch is enqueued
        nn1, nn2 = nearest_neighbour(z1, support), nearest_neighbour(z2, support)
        loss = 0.5 * (nnclr_loss(nn1, p2, self.params.temperature) + nnclr_loss(nn2, p1, self.params.temperature))
        self._enqueue = z1.detach()
        return StepOutput(loss)

    def after_step(self, step: StepInfo) -> None:
        self.support.enqueue(self._enqueue)
