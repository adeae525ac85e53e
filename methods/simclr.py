"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations (Chen et al., ICML 2020).

Two augmented views of each image pass through the backbone and a projection
MLP; the NT-Xent loss pulls the two views of an image together and pushes the
other 2N - 2 views in the batch away. With several workers the projections are
gathered first (``gather``), so the negatives are those of the global batch.
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


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Normalised temperature-scaled cross entropy over 2N views (SimCLR eq. 1).

    For anchor i with positive j: ``l_i = -log(exp(s_ij/T) / sum_{k != i} exp(s_ik/T))``
    with cosine similarities s; the denominator holds the positive and the 2N - 2
    negatives. Returns the mean over all 2N anchors (lightly, solo-learn; Google's
    TF code reports twice this). Collapsed embeddings give ``log(2N - 1)``.

    z1, z2: (N, D) projections of the two views, not necessarily normalised.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # an anchor is not its own negative
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


class SimCLRParams(MethodParams):
    temperature: float = Field(0.5, gt=0, description="NT-Xent temperature (0.5 CIFAR recipe; 0.1-0.2 ImageNet)")
    proj_hidden_dim: int = Field(2048, ge=1)
    proj_dim: int = Field(128, ge=1)
    proj_layers: int = Field(2, ge=1, description="2 in SimCLR v1, 3 in v2")
    gather: bool = Field(
        True, description="with several workers, contrast against the global batch (false: each worker's own batch)"
    )


@register
class SimCLR(Method):
    name = "simclr"
    Params = SimCLRParams
    uses_negatives = True
    networks = 1
    loss_name = "NT-Xent"
    paper = "Chen et al. 2020, A Simple Framework for Contrastive Learning of Visual Representations"

    params: SimCLRParams
    projector: torch.nn.Sequential

    def __init__(self, backbone: torch.nn.Module, params: SimCLRParams) -> None:
        super().__init__(backbone, params)
        self.projector = mlp(feature_dim(backbone), params.proj_hidden_dim, params.proj_dim, params.proj_layers)

    def views(self, image_size: int) -> list[View]:
        """Two full-size views of the run's recipe."""
        return [View(image_size), View(image_size)]

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        x1, x2 = views
        z = self.projector(self.backbone(torch.cat([x1, x2])))
        z1, z2 = z.chunk(2)
        if self.params.gather:
            z1, z2 = gather(z1), gather(z2)
        return StepOutput(self.contrast(z1, z2))

    def contrast(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """The loss of the two views' projections (gathered over the workers): NT-Xent; DCL replaces it."""
        return nt_xent(z1, z2, self.params.temperature)

    def collapse_loss(self, batch_size: int) -> float | None:
        return math.log(2 * batch_size - 1)  # every anchor's 2N - 1 candidates equally similar
