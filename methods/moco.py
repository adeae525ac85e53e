"""MoCo v2: Improved Baselines with Momentum Contrastive Learning (Chen, Fan, Girshick & He, 2020),
on MoCo (He et al., CVPR 2020).

A query encoder (backbone + MLP head) is trained with InfoNCE against the key
encoder's output for the other view (the positive) and a queue of keys from
earlier batches (the negatives). The key encoder is a momentum copy of the query
encoder (m = 0.999) and receives no gradients; the current keys enter the queue
after the loss has used it. The loss is per query, so with several workers nothing is
gathered for it; the keys enqueued are gathered (``gather``), so every worker holds the
single-process queue.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from core.contract import MethodParams, StepInfo, StepOutput, feature_dim
from core.views import View
from methods import register
from methods.base import Method
from methods.distributed import gather_no_grad
from methods.heads import mlp
from methods.momentum import ema_update, frozen_copy
from methods.queue import FeatureQueue


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE of MoCo: logits ``[q.k, q.queue] / T`` with the positive at index 0, mean over the batch.

    q, k: (N, D) and queue: (K, D), all L2-normalised by the caller. Equal logits give log(K + 1).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    positives = (q * k).sum(dim=1, keepdim=True)
    negatives = q @ queue.T
    logits = torch.cat([positives, negatives], dim=1).float() / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class MoCoV2Params(MethodParams):
    temperature: float = Field(0.2, gt=0, description="InfoNCE temperature (MoCo v2: 0.2)")
    momentum: float = Field(0.999, ge=0, lt=1, description="key encoder EMA momentum")
    queue_size: int = Field(65536, ge=1, description="negatives kept from earlier batches")
    proj_hidden_dim: int = Field(2048, ge=1)
    proj_dim: int = Field(128, ge=1)
    gather: bool = Field(
        True, description="with several workers, enqueue the global batch's keys (false: each worker's own)"
    )


@register
class MoCoV2(Method):
    name = "moco_v2"
    Params = MoCoV2Params
    uses_negatives = True
    networks = 2
    loss_name = "InfoNCE (queue)"
    paper = "Chen et al. 2020, arXiv:2003.04297"

    params: MoCoV2Params
    projector: nn.Sequential

    def __init__(self, backbone: nn.Module, params: MoCoV2Params) -> None:
        super().__init__(backbone, params)
        # MoCo v2's head: Linear-ReLU-Linear, no BatchNorm
        self.projector = mlp(feature_dim(backbone), params.proj_hidden_dim, params.proj_dim, 2, batch_norm=False)
        self.key_encoder = frozen_copy(nn.Sequential(backbone, self.projector))
        self.queue = FeatureQueue(params.queue_size, params.proj_dim)

    def check(self, batch_size: int) -> None:
        self.queue.check_holds_batch(batch_size)

    def collapse_loss(self, batch_size: int) -> float | None:
        return math.log(self.params.queue_size + 1)  # the positive and the K queued keys equally similar

    def views(self, image_size: int) -> list[View]:
        """Two full-size views of the run's recipe."""
        return [View(image_size), View(image_size)]

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        x_q, x_k = views[0], views[1]
        q = F.normalize(self.projector(self.backbone(x_q)), dim=1)
        with torch.no_grad():
            k = F.normalize(self.key_encoder(x_k), dim=1)
        loss = moco_loss(q, k, self.queue.features(), self.params.temperature)
        self._keys = k  # enqueued after the optimiser step: this step's keys are not its own negatives
        return StepOutput(loss)

    def after_step(self, step: StepInfo) -> None:
        self.queue.enqueue(gather_no_grad(self._keys) if self.params.gather else self._keys)
        ema_update(self.key_encoder, nn.Sequential(self.backbone, self.projector), self.params.momentum)
