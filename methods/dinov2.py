"""DINOv2: Learning Robust Visual Features without Supervision (Oquab et al. 2023): DINO's loss on the class token,
iBOT's masked-patch loss, and the KoLeo regulariser.

The student sees 2 global crops with a random ``mask_ratio`` of their patches replaced by a learned mask token, and
the local crops; the EMA teacher sees the 2 global crops whole. Three terms:

* DINO (:func:`cross_view_loss`): every student crop's class-token head output against the teacher's
  of the other global crop, through the DINO head;
* iBOT (:func:`ibot_patch_loss`): at the masked patches of each global crop, the student's patch output against the
  teacher's for the same patch, through a patch head of its own with its own centre; unmasked patches do not enter;
* KoLeo (:func:`koleo_loss`, weight ``koleo_weight``, 0.1): the student's class tokens of each global crop spread
  apart (minus the mean log distance of each to its nearest neighbour).

The teacher's targets are centred and sharpened as DINO's (``centering: center``) or Sinkhorn-Knopp normalised
(``sinkhorn``, SwAV's :func:`methods.swav.sinkhorn` at the teacher temperature, DINOv2's default). With several workers
the centres are the global batch's means, Sinkhorn-Knopp runs over the global batch, and each sample's mask is the one
it gets on one process; KoLeo's nearest neighbours are each worker's own, as in the paper's code.

Differences from the paper's code: patches are masked at random (DINOv2 masks blocks, a ratio drawn from 0.1-0.5 for
half the images); the teacher temperature is constant; the local crops go through the backbone as a whole (timm's
position-embedding interpolation, ``backbone.kwargs.dynamic_img_size=true``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from core.backbones import vit_parts
from core.contract import MethodParams, StepInfo, StepOutput
from core.errors import ConfigError
from core.splits import DataSplits
from core.views import View, check_area_range
from methods import register
from methods.base import Method
from methods.dino import DINOHead
from methods.distributed import gather_no_grad, own_rows, world_size
from methods.momentum import cosine_momentum, ema_update, frozen_copy
from methods.multicrop import check_small_crops, multi_crop_views, per_view
from methods.swav import sinkhorn
from methods.vit import PooledViT, check_image_size, encode_all, random_masking

KOLEO_EPS = 1e-8
"""Added to the nearest-neighbour distances under the log (DINOv2's ``KoLeoLoss``)."""


def koleo_loss(x: torch.Tensor) -> torch.Tensor:
    """KoLeo (Sablayrolles et al. 2019): ``-mean_i log(min_{j != i} ||x_i - x_j||)`` of the L2-normalised rows of
    x (N, D), N >= 2. Large when rows crowd together; it spreads them over the sphere."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"KoLeo needs (N, D) with N >= 2, got {tuple(x.shape)}")
    z = F.normalize(x.float(), dim=-1)
    distances = torch.cdist(z, z)
    distances = distances + torch.diag(torch.full((z.shape[0],), float("inf"), device=z.device))
    return -torch.log(distances.min(dim=1).values + KOLEO_EPS).mean()


def cross_view_loss(
    student_out: list[torch.Tensor], teacher_targets: list[torch.Tensor], student_temp: float
) -> torch.Tensor:
    """DINO's loss with the teacher's targets given: the mean over the pairs (teacher crop i, student crop v), v != i,
    of ``mean_b -sum_k T_i[b, k] log softmax(S_v[b] / student_temp)_k``."""
    terms = [
        -(t.detach().float() * F.log_softmax(s.float() / student_temp, dim=-1)).sum(dim=-1).mean()
        for i, t in enumerate(teacher_targets)
        for v, s in enumerate(student_out)
        if v != i
    ]
    return torch.stack(terms).mean()


def ibot_patch_loss(
    student_patches: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """iBOT's loss: ``-sum_k P_t log P_s`` at each masked patch, averaged over the masked patches only.

    student_patches (B, L, K) logits; teacher_probs (B, L, K) targets (detached); mask (B, L), 1 = masked."""
    if student_patches.shape != teacher_probs.shape or mask.shape != student_patches.shape[:2]:
        raise ValueError(
            "need (B, L, K) student logits and teacher targets and a (B, L) mask, got "
            f"{tuple(student_patches.shape)}, {tuple(teacher_probs.shape)}, {tuple(mask.shape)}"
        )
    per_patch = -(teacher_probs.detach().float() * F.log_softmax(student_patches.float() / student_temp, dim=-1)).sum(
        -1
    )
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


class DINOv2Params(MethodParams):
    out_dim: int = Field(65536, ge=2, description="K of the class-token head (paper: 65536)")
    patch_out_dim: int = Field(65536, ge=2, description="K of the patch head (paper: 65536, unshared)")
    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    student_temp: float = Field(0.1, gt=0)
    teacher_temp: float = Field(0.07, gt=0, description="teacher temperature (paper: 0.04 -> 0.07; constant here)")
    centering: Literal["center", "sinkhorn"] = Field("sinkhorn", description="teacher normalisation (paper: sinkhorn)")
    center_momentum: float = Field(0.9, ge=0, le=1)
    mask_ratio: float = Field(0.3, gt=0, lt=1, description="patches masked in each global crop of the student")
    ibot_weight: float = Field(1.0, ge=0)
    koleo_weight: float = Field(0.1, ge=0, description="weight of KoLeo (paper: 0.1)")
    base_momentum: float = Field(0.992, ge=0, lt=1, description="teacher EMA momentum at step 0, cosine to 1")
    num_local_crops: int = Field(8, ge=0, description="local crops besides the 2 global ones (paper: 8)")
    local_crop_size_ratio: float = Field(98 / 224, gt=0, le=1, description="local crop side / image side")
    global_crop_scale: tuple[float, float] = Field((0.32, 1.0))
    local_crop_scale: tuple[float, float] = Field((0.05, 0.32))

    @field_validator("global_crop_scale", "local_crop_scale")
    @classmethod
    def _area_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        return check_area_range(v)


@register
class DINOv2(Method):
    name = "dinov2"
    Params = DINOv2Params
    uses_negatives = False
    networks = 2
    loss_name = "DINO (class token) + iBOT (masked patches) + KoLeo"
    paper = "Oquab et al. 2023, DINOv2: Learning Robust Visual Features without Supervision"

    params: DINOv2Params
    center: torch.Tensor
    patch_center: torch.Tensor

    def __init__(self, backbone: nn.Module, params: DINOv2Params) -> None:
        super().__init__(backbone, params)
        self.parts = vit_parts(backbone, "method dinov2")
        if not self.parts.has_class_token:
            raise ConfigError("backbone.kwargs.class_token: DINOv2 trains the class token; this ViT has none")
        dim = self.parts.embed_dim
        self.head = DINOHead(dim, params.out_dim, params.hidden_dim, params.bottleneck_dim)
        self.patch_head = DINOHead(dim, params.patch_out_dim, params.hidden_dim, params.bottleneck_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.teacher = frozen_copy(nn.ModuleList([backbone, self.head, self.patch_head]))
        self.register_buffer("center", torch.zeros(params.out_dim))
        self.register_buffer("patch_center", torch.zeros(params.patch_out_dim))
        self._pending: tuple[torch.Tensor, torch.Tensor, int, int] | None = None

    def setup(self, data: DataSplits) -> None:
        check_image_size(self.parts, data)

    def views(self, image_size: int) -> list[View]:
        p = self.params
        return multi_crop_views(
            image_size,
            p.global_crop_scale,
            p.num_local_crops,
            p.local_crop_size_ratio,
            p.local_crop_scale,
            "method.local_crop_size_ratio",
            "local",
        )

    def check(self, batch_size: int) -> None:
        check_small_crops(self.backbone, self.params.num_local_crops, "DINOv2's local crops", "method.num_local_crops")

    def _tokens(self, parts_model: nn.Module, images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Encoded tokens (B, 1 + L, D) of ``parts_model``'s ViT, the masked patches replaced by the mask token."""
        parts = vit_parts(parts_model, "method dinov2")
        tokens = parts.patch_tokens(images, mask, self.mask_token if mask is not None else None)
        return parts.encode(torch.cat([parts.prefix_tokens(images.shape[0]), tokens], dim=1))

    def _targets(self, logits: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
        """The teacher's (N, K) targets: centred softmax, or Sinkhorn-Knopp at the teacher temperature."""
        p = self.params
        if p.centering == "sinkhorn":  # over the global batch (DINOv2's distributed Sinkhorn-Knopp); this worker's rows
            return own_rows(sinkhorn(gather_no_grad(logits.contiguous()), epsilon=p.teacher_temp), logits.shape[0])
        return F.softmax((logits.float() - center) / p.teacher_temp, dim=-1)

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        p = self.params
        globals_ = torch.cat(views[:2])
        length = self.parts.num_patches
        # each global crop's masks drawn apart: its rows are the global batch's this worker holds (random_masking)
        mask = torch.cat([random_masking(v.shape[0], length, p.mask_ratio, device=v.device)[1] for v in views[:2]])
        student = self._tokens(self.backbone, globals_, mask)
        prefix = self.parts.num_prefix_tokens
        local = per_view(self.backbone, views[2:]) if len(views) > 2 else []
        sizes = [views[0].shape[0], views[1].shape[0], *(v.shape[0] for v in views[2:])]
        crops = list(self.head(torch.cat([student[:, 0], *local])).split(sizes))
        with torch.no_grad():
            t_backbone, t_head, t_patch_head = list(self.teacher.children())
            teacher = self._tokens(t_backbone, globals_, None)
            t_cls, t_patches = t_head(teacher[:, 0]).float(), t_patch_head(teacher[:, prefix:]).float()
            cls_targets = self._targets(t_cls, self.center)
            patch_targets = self._targets(t_patches.reshape(-1, t_patches.shape[-1]), self.patch_center)
        dino = cross_view_loss(crops, list(cls_targets.chunk(2)), p.student_temp)
        student_patches = self.patch_head(student[:, prefix:])
        ibot = ibot_patch_loss(student_patches, patch_targets.reshape(t_patches.shape), mask, p.student_temp)
        koleo = torch.stack([koleo_loss(c) for c in student[:, 0].chunk(2)]).mean()
        self._pending = (t_cls.sum(dim=0), t_patches.sum(dim=(0, 1)), t_cls.shape[0], t_patches.shape[0] * length)
        loss = dino + p.ibot_weight * ibot + p.koleo_weight * koleo
        logs: dict[str, float | torch.Tensor] = {"dino": dino.detach(), "ibot": ibot.detach(), "koleo": koleo.detach()}
        return StepOutput(loss, logs)

    @torch.no_grad()
    def after_step(self, step: StepInfo) -> None:
        """EMA update of the teacher, then of the two centres with this step's teacher outputs (global batch)."""
        p = self.params
        online = nn.ModuleList([self.backbone, self.head, self.patch_head])
        ema_update(self.teacher, online, cosine_momentum(step.step, step.total_steps, p.base_momentum))
        if self._pending is None:
            return
        (cls_sum, patch_sum, cls_rows, patch_rows), self._pending = self._pending, None
        workers = world_size()
        if workers > 1:
            cls_sum, patch_sum = gather_no_grad(cls_sum[None]).sum(0), gather_no_grad(patch_sum[None]).sum(0)
        self.center.mul_(p.center_momentum).add_(cls_sum / (cls_rows * workers), alpha=1 - p.center_momentum)
        self.patch_center.mul_(p.center_momentum).add_(patch_sum / (patch_rows * workers), alpha=1 - p.center_momentum)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return encode_all(self.parts, images, "cls")

    @torch.no_grad()
    def project(self, features: torch.Tensor) -> torch.Tensor | None:
        """The class-token head's L2-normalised bottleneck."""
        return self.head.bottleneck(features)

    def trunk(self, projector_layers: int = 0) -> tuple[nn.Module, int]:
        super().trunk(projector_layers)
        return PooledViT(self.backbone, "cls", "method dinov2"), self.parts.embed_dim
