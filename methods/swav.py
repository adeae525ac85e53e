"""SwAV: Unsupervised Learning of Visual Features by Contrasting Cluster Assignments (Caron et al., NeurIPS 2020).

Every crop's L2-normalised projection is scored against K learnable, L2-normalised prototypes; the *codes* of the two
global crops are soft cluster assignments from a few Sinkhorn-Knopp iterations, which spread each batch equally over
the prototypes (the equipartition that prevents collapse), and each is predicted, by cross entropy, from the scores
of every other crop (the *swapped prediction*). Clustering-based: no negatives. Prototypes re-normalised before every
step, frozen for the first ``freeze_prototypes_steps``, codes in float32 without gradient from the global crops only,
an optional queue and multi-crop (2 global crops + ``num_small_crops``) follow facebookresearch/swav.

Difference from the reference code: with several workers (``gather``) every crop's projections are gathered before
the scores, so each worker computes the single-process loss of the global batch (the reference's
``distributed_sinkhorn`` all-reduces the sums instead; the codes are the same).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from core.contract import MethodParams, StepInfo, StepOutput, feature_dim
from core.errors import ConfigError
from core.views import View, check_area_range
from methods import register
from methods.base import Method
from methods.distributed import gather
from methods.heads import mlp
from methods.multicrop import multi_crop_views, per_view


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp codes of SwAV (the reference code's ``distributed_sinkhorn`` on one process).

    scores: (B, K) prototype scores. ``Q = exp(scores / epsilon).T`` (K, B) is normalised to a
    total of 1, then ``iterations`` times its rows (prototypes) are scaled to sum to 1/K and its
    columns (samples) to 1/B. Returns the (B, K) codes ``B * Q.T``: each row sums to 1 and the
    prototype marginals (column sums of the result) approach B / K with more iterations.

    Always computed in float32 (also for half inputs and under autocast), without gradient.
    The iterations run in the log domain (each normalisation is a ``logsumexp`` subtraction):
    the reference code's result to float rounding, without its overflow of ``exp(scores / epsilon)``
    above 88 or its 0 / 0 when a prototype's or a sample's weights all underflow (small epsilon).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, K), got shape {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    with torch.autocast(device_type=scores.device.type, enabled=False):
        log_q = (scores.detach().float() / epsilon).T  # (K, B), log of Q up to its normalisation
        k, b = log_q.shape
        log_q = log_q - torch.logsumexp(log_q.reshape(-1), dim=0)  # Q /= Q.sum()
        for _ in range(iterations):
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(k)  # each prototype: total 1/K
            log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(b)  # each sample: total 1/B
        return torch.exp(log_q + math.log(b)).T  # Q *= B: columns sum to 1, an assignment per sample


def swapped_prediction_loss(
    scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], temperature: float = 0.1
) -> torch.Tensor:
    """SwAV's swapped prediction: the codes of crop i predicted from the scores of every other crop.

    scores: one (B, K) tensor of prototype scores per crop; codes: the (B, K) codes of the
    first ``len(codes)`` crops (the global ones). For each coded crop i the loss is the mean,
    over the crops v != i, of ``-mean_b sum_k q_i[b, k] log softmax(scores_v[b] / T)[k]``;
    the result is the mean over the coded crops. Computed in float32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if len(scores) < 2 or not 1 <= len(codes) <= len(scores):
        raise ValueError(
            f"need at least 2 crops' scores and 1 to {len(scores)} codes, got {len(scores)} and {len(codes)}"
        )
    log_p = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]
    loss = scores[0].new_zeros((), dtype=torch.float32)
    for i, q in enumerate(codes):
        q = q.float()
        sub = sum(-(q * log_p[v]).sum(dim=1).mean() for v in range(len(scores)) if v != i)
        loss = loss + sub / (len(scores) - 1)
    return loss / len(codes)


class SwAVParams(MethodParams):
    temperature: float = Field(0.1, gt=0, description="softmax temperature of the predictions (paper: 0.1)")
    epsilon: float = Field(
        0.05, gt=0, description="Sinkhorn entropy regularisation (paper: 0.05; 0.03 with the queue at small batches)"
    )
    sinkhorn_iterations: int = Field(3, ge=1, description="Sinkhorn-Knopp iterations (paper: 3)")
    num_prototypes: int = Field(3000, ge=2, description="K, the number of prototypes (paper: 3000 on ImageNet)")
    proj_hidden_dim: int = Field(2048, ge=1)
    proj_dim: int = Field(128, ge=1)
    num_small_crops: int = Field(
        6, ge=0, description="small crops besides the 2 global ones (paper: 6 x 96 px for 224 px images)"
    )
    small_crop_size_ratio: float = Field(
        96 / 224, gt=0, le=1, description="small crop side / image side, rounded (96/224: 96 px at 224, 14 px at 32)"
    )
    global_crop_scale: tuple[float, float] = Field(
        (0.14, 1.0), description="crop area range of the 2 global crops (paper: 0.14-1)"
    )
    small_crop_scale: tuple[float, float] = Field(
        (0.05, 0.14), description="crop area range of the small crops (paper: 0.05-0.14)"
    )
    freeze_prototypes_steps: int = Field(
        313, ge=0, description="steps at the start without prototype updates (reference code: 313 iterations)"
    )
    queue_length: int = Field(
        0,
        ge=0,
        description="past global-crop projections added when computing codes; 0 = no queue (paper: 3840 at batch 256)",
    )
    queue_start_step: int = Field(
        0, ge=0, description="step at which the queue starts filling; it is used once full (paper: epoch 15)"
    )
    gather: bool = Field(
        True, description="with several workers, codes and loss over the global batch (false: each worker's own batch)"
    )

    @field_validator("global_crop_scale", "small_crop_scale")
    @classmethod
    def _area_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        return check_area_range(v)


@register
class SwAV(Method):
    name = "swav"
    Params = SwAVParams
    uses_negatives = False
    networks = 1
    loss_name = "swapped prediction (Sinkhorn codes)"
    paper = "Caron et al., NeurIPS 2020, Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"

    params: SwAVParams
    projector: nn.Sequential
    queue: torch.Tensor
    """Buffer (2, queue_length, proj_dim): past global-crop projections, newest first."""
    queue_filled: torch.Tensor
    """0-d int64 buffer: rows of the queue filled so far (capped at queue_length)."""

    def __init__(self, backbone: nn.Module, params: SwAVParams) -> None:
        super().__init__(backbone, params)
        self.projector = mlp(feature_dim(backbone), params.proj_hidden_dim, params.proj_dim)
        self.prototypes = nn.Linear(params.proj_dim, params.num_prototypes, bias=False)
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        # one queue per global crop, newest rows first, zeros until filled (as in the reference code)
        self.register_buffer("queue", torch.zeros(2, params.queue_length, params.proj_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self._pending: torch.Tensor | None = None

    # ------------------------------------------------------------------ configuration

    def views(self, image_size: int) -> list[View]:
        """Two global crops of ``image_size`` px, then ``num_small_crops`` small crops."""
        p = self.params
        if p.num_small_crops < 0:
            raise ConfigError(f"method.num_small_crops: must be >= 0, got {p.num_small_crops}")
        return multi_crop_views(
            image_size,
            p.global_crop_scale,
            p.num_small_crops,
            p.small_crop_size_ratio,
            p.small_crop_scale,
            "method.small_crop_size_ratio",
            "small",
        )

    def check(self, batch_size: int) -> None:
        p = self.params
        if p.num_small_crops < 0:
            raise ConfigError(f"method.num_small_crops: must be >= 0, got {p.num_small_crops}")
        if 0 < p.queue_length < batch_size:
            raise ConfigError(
                f"method.queue_length: {p.queue_length} is smaller than pretrain.batch_size "
                f"{batch_size}; the queue must hold at least one batch (or 0: no queue)"
            )

    # ------------------------------------------------------------------ training

    def _encode(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """L2-normalised projections of every crop, one backbone call per run of equal-sized crops."""
        return [F.normalize(z.float(), dim=1) for z in per_view(lambda x: self.projector(self.backbone(x)), views)]

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        if len(views) < 2:
            raise ValueError(f"SwAV needs at least the 2 global crops, got {len(views)} views")
        p = self.params
        with torch.no_grad():  # the reference code normalises the prototypes before every forward
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        zs = self._encode(views)
        if p.gather:
            zs = [gather(z) for z in zs]
        with torch.autocast(device_type=zs[0].device.type, enabled=False):
            weight = self.prototypes.weight.float()
            scores = [z @ weight.T for z in zs]
            use_queue = (
                p.queue_length > 0 and step.step >= p.queue_start_step and int(self.queue_filled) >= p.queue_length
            )
            codes = []
            with torch.no_grad():
                for i in range(2):
                    s = scores[i].detach()
                    if use_queue:
                        s = torch.cat([self.queue[i].float() @ weight.detach().T, s])
                    codes.append(sinkhorn(s, p.epsilon, p.sinkhorn_iterations)[-zs[i].shape[0] :])
            loss = swapped_prediction_loss(scores, codes, p.temperature)
        self._pending = (
            torch.stack([zs[0].detach(), zs[1].detach()])
            if p.queue_length > 0 and step.step >= p.queue_start_step
            else None
        )
        return StepOutput(
            loss, {"prototypes_frozen": float(bool(self.frozen_modules(step))), "queue_used": float(use_queue)}
        )

    def frozen_modules(self, step: StepInfo) -> list[str]:
        """The prototypes for the first ``freeze_prototypes_steps`` steps (the loop drops their gradient)."""
        return ["prototypes"] if step.step < self.params.freeze_prototypes_steps else []

    @torch.no_grad()
    def after_step(self, step: StepInfo) -> None:
        """Push this step's global-crop projections into the queue (after their own codes were computed)."""
        if self._pending is None:
            return
        new, self._pending = self._pending, None
        n, length = new.shape[1], self.queue.shape[1]
        if n > length:
            raise ValueError(f"cannot enqueue a batch of {n} into a queue of {length} (method.queue_length)")
        self.queue[:, n:] = self.queue[:, :-n].clone()
        self.queue[:, :n] = new.to(self.queue.dtype)
        self.queue_filled.copy_(torch.clamp(self.queue_filled + n, max=length))
