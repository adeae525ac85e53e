"""DINO: Emerging Properties in Self-Supervised Vision Transformers (Caron et al., ICCV 2021).

Self-distillation with no labels: a student (backbone + DINO head) matches, by cross entropy, the centred and
sharpened output distribution of an EMA teacher; every crop goes through the student, the 2 global crops through the
teacher, and every student crop is compared with every teacher crop of another view. The head, temperatures, EMA,
centre and multi-crop follow the paper and facebookresearch/dino (defaults in :class:`DINOParams`). The paper's
optimisation, as ``pretrain.*`` keys: ``clip_grad=3.0``, ``weight_decay=0.04`` to ``weight_decay_end=0.4`` on a
cosine, no decay on biases and norms (:func:`harness.train.optim.is_bias_or_norm`, as ``get_params_groups``).

Differences from the reference code:

* ``pretrain.clip_grad`` bounds the global gradient norm (the reference clips each tensor's norm separately);
* the loop drops the frozen last layer's gradient before clipping (the reference after);
* the teacher temperature warms up 0.04 -> 0.07 over 30 epochs, the paper's ViT-S/16 recipe (the reference code's
  command-line default is 0.04 throughout).
"""

from __future__ import annotations

import itertools
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
from methods.distributed import gather_no_grad, world_size
from methods.momentum import cosine_momentum, ema_update, frozen_copy
from methods.multicrop import check_small_crops, multi_crop_views, per_view


def dino_loss(
    student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, student_temp: float, teacher_temp: float
) -> torch.Tensor:
    """DINO's loss for one pair of views: ``mean_b sum_k -P_t[b, k] log P_s[b, k]``.

    student_out, teacher_out: (B, K) head outputs (logits) of two different views of the same images; center: (K,).
    ``P_t = softmax((teacher_out - center) / teacher_temp)``, without gradient (the teacher is detached here);
    ``log P_s = log_softmax(student_out / student_temp)``. Computed in float32. Equal inputs at equal temperatures
    with a zero centre give the teacher's entropy; adding a constant to the teacher's outputs and to the centre
    changes nothing.
    """
    if student_temp <= 0 or teacher_temp <= 0:
        raise ValueError(f"temperatures must be > 0, got student_temp={student_temp}, teacher_temp={teacher_temp}")
    if student_out.shape != teacher_out.shape or student_out.dim() != 2 or center.shape[-1] != student_out.shape[1]:
        raise ValueError(
            "need (B, K) student and teacher outputs and a (K,) centre, got "
            f"{tuple(student_out.shape)}, {tuple(teacher_out.shape)}, {tuple(center.shape)}"
        )
    with torch.autocast(device_type=student_out.device.type, enabled=False):
        targets = F.softmax((teacher_out.detach().float() - center.float()) / teacher_temp, dim=-1)
        return -(targets * F.log_softmax(student_out.float() / student_temp, dim=-1)).sum(dim=-1).mean()


def multi_crop_loss(
    student_out: Sequence[torch.Tensor],
    teacher_out: Sequence[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """The mean of :func:`dino_loss` over the pairs (teacher crop i, student crop v) with v != i.

    ``student_out``: one (B, K) tensor per crop, the global crops first, in the teacher's order; ``teacher_out``:
    one per global crop. With 2 global and N local crops: 2 * (N + 1) pairs (the reference code's ``DINOLoss``).
    """
    if not teacher_out or len(student_out) < 2 or len(teacher_out) > len(student_out):
        raise ValueError(
            f"need at least 2 student crops and 1 to {len(student_out)} "
            f"teacher crops, got {len(student_out)} and {len(teacher_out)}"
        )
    terms = [
        dino_loss(s, t, center, student_temp, teacher_temp)
        for i, t in enumerate(teacher_out)
        for v, s in enumerate(student_out)
        if v != i
    ]
    return torch.stack(terms).mean()


def teacher_temperature(epoch: int, warmup_temp: float, final_temp: float, warmup_epochs: int) -> float:
    """The teacher temperature at ``epoch`` (from 0): linear from ``warmup_temp`` at epoch 0 to ``final_temp`` at epoch
    ``warmup_epochs - 1``, then ``final_temp`` (the reference code's ``np.linspace(warmup, final, warmup_epochs)``)."""
    if epoch >= warmup_epochs:
        return final_temp
    if warmup_epochs == 1:
        return warmup_temp
    return warmup_temp + (final_temp - warmup_temp) * epoch / (warmup_epochs - 1)


class WeightNormLinear(nn.Module):
    """A linear layer without bias whose rows are ``g * v / ||v||`` (``nn.utils.weight_norm(nn.Linear(...))`` with
    ``weight_g`` filled with 1, as DINO's last layer). ``fix_norm``: ``g`` stays 1 (``requires_grad`` off)."""

    def __init__(self, in_dim: int, out_dim: int, *, fix_norm: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())  # nn.Linear's init
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=1))


class DINOHead(nn.Module):
    """MLP (``num_layers`` Linear layers, GELU between them, BatchNorm before each GELU with ``use_bn``) to
    ``bottleneck_dim``, L2 normalisation, then a weight-normalised linear layer to ``out_dim``:
    (B, in_dim) -> (B, out_dim) logits."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        *,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(b))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck (B, bottleneck_dim) the last layer takes."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))


DINO_GLOBAL_RECIPES = ({"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})
"""DINO's global crops (Caron et al. 2021, arXiv:2104.14294, appendix, and facebookresearch/dino's
``DataAugmentationDINO``): blur with probability 1.0 and 0.1, the second solarised with 0.2 (BYOL's)."""
DINO_LOCAL_RECIPE = {"blur_p": 0.5}
"""DINO's local crops: blur with probability 0.5, no solarisation."""


class DINOParams(MethodParams):
    out_dim: int = Field(65536, ge=2, description="K, the size of the output distributions (paper: 65536)")
    hidden_dim: int = Field(2048, ge=1, description="hidden width of the head's MLP (paper: 2048)")
    bottleneck_dim: int = Field(256, ge=1, description="the head's L2-normalised bottleneck (paper: 256)")
    head_layers: int = Field(3, ge=1, description="Linear layers of the head's MLP (paper: 3)")
    use_bn_in_head: bool = Field(False, description="BatchNorm in the head's MLP (reference code: off; solo-learn: on)")
    norm_last_layer: bool = Field(
        True, description="fix the weight norm of the last layer to 1 (paper: true; false helps ViT-S/16 a little)"
    )
    student_temp: float = Field(0.1, gt=0, description="student softmax temperature (paper: 0.1)")
    teacher_temp: float = Field(0.07, gt=0, description="teacher softmax temperature after the warm-up (paper: 0.07)")
    warmup_teacher_temp: float = Field(0.04, gt=0, description="teacher temperature at epoch 0 (paper: 0.04)")
    warmup_teacher_temp_epochs: int = Field(
        30, ge=0, description="epochs of the linear teacher-temperature warm-up (paper: 30)"
    )
    base_momentum: float = Field(
        0.996, ge=0, lt=1, description="teacher EMA momentum at step 0, cosine to 1 (paper: 0.996)"
    )
    center_momentum: float = Field(
        0.9, ge=0, le=1, description="EMA momentum of the centre (paper: 0.9; 1: no centering)"
    )
    num_local_crops: int = Field(
        6, ge=0, description="local crops besides the 2 global ones (paper: 6 or 10 x 96 px at 224 px)"
    )
    local_crop_size_ratio: float = Field(
        3 / 7, gt=0, le=1, description="local crop side / image side, rounded (3/7: 96 px at 224, 14 px at 32)"
    )
    global_crop_scale: tuple[float, float] = Field(
        (0.4, 1.0), description="crop area range of the 2 global crops (paper: 0.4-1)"
    )
    local_crop_scale: tuple[float, float] = Field(
        (0.05, 0.4), description="crop area range of the local crops (paper: 0.05-0.4)"
    )
    freeze_last_layer: int = Field(
        1, ge=0, description="epochs at the start without updates of the head's last layer (paper: 1)"
    )
    gather: bool = Field(
        True,
        description="with several workers, the centre is the EMA of the global batch's mean (false: each worker's own)",
    )

    @field_validator("global_crop_scale", "local_crop_scale")
    @classmethod
    def _area_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        return check_area_range(v)


@register
class DINO(Method):
    name = "dino"
    Params = DINOParams
    uses_negatives = False
    networks = 2
    loss_name = "cross entropy to a centred, sharpened EMA teacher"
    paper = "Caron et al., ICCV 2021, Emerging Properties in Self-Supervised Vision Transformers"

    params: DINOParams
    center: torch.Tensor
    """Buffer (out_dim,): the EMA of the teacher's mean output, subtracted before the teacher's softmax."""

    def __init__(self, backbone: nn.Module, params: DINOParams) -> None:
        super().__init__(backbone, params)
        self.head = DINOHead(
            feature_dim(backbone),
            params.out_dim,
            params.hidden_dim,
            params.bottleneck_dim,
            params.head_layers,
            norm_last_layer=params.norm_last_layer,
            use_bn=params.use_bn_in_head,
        )
        self.teacher = frozen_copy(nn.Sequential(backbone, self.head))
        self.register_buffer("center", torch.zeros(params.out_dim))
        self._pending: tuple[torch.Tensor, int] | None = None

    # ------------------------------------------------------------------ configuration

    def views(self, image_size: int) -> list[View]:
        """Two global crops of ``image_size`` px, then ``num_local_crops`` local crops, with the paper's recipes
        (:data:`DINO_GLOBAL_RECIPES`, :data:`DINO_LOCAL_RECIPE`); ConfigError for local crops larger than the global
        ones (in pixels or in area range) or too small for a network."""
        p = self.params
        (local_low, local_high), (global_low, global_high) = p.local_crop_scale, p.global_crop_scale
        if p.num_local_crops and (local_low > global_low or local_high > global_high):
            raise ConfigError(
                f"method.local_crop_scale: {list(p.local_crop_scale)} lies above method.global_crop_scale "
                f"{list(p.global_crop_scale)}; local crops are the smaller ones (paper: [0.05, 0.4] and [0.4, 1.0])"
            )
        return multi_crop_views(
            image_size,
            p.global_crop_scale,
            p.num_local_crops,
            p.local_crop_size_ratio,
            p.local_crop_scale,
            "method.local_crop_size_ratio",
            "local",
            DINO_GLOBAL_RECIPES,
            DINO_LOCAL_RECIPE,
        )

    def check(self, batch_size: int) -> None:
        check_small_crops(self.backbone, self.params.num_local_crops, "DINO's local crops", "method.num_local_crops")

    def frozen_modules(self, step: StepInfo) -> list[str]:
        """The head's last layer during the first ``freeze_last_layer`` epochs (the loop drops its gradient)."""
        return ["head.last_layer"] if step.epoch < self.params.freeze_last_layer else []

    # ------------------------------------------------------------------ training

    def _student(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Head outputs of every crop: one backbone call per run of equal-sized crops, one head call for all."""
        return list(self.head(torch.cat(per_view(self.backbone, views))).chunk(len(views)))

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        if len(views) < 2:
            raise ValueError(f"DINO needs at least the 2 global crops, got {len(views)} views")
        p = self.params
        student = self._student(views)
        with torch.no_grad():
            teacher = self.teacher(torch.cat(views[:2])).float()
        temp = teacher_temperature(step.epoch, p.warmup_teacher_temp, p.teacher_temp, p.warmup_teacher_temp_epochs)
        loss = multi_crop_loss(student, teacher.chunk(2), self.center, p.student_temp, temp)
        self._pending = (teacher.sum(dim=0), teacher.shape[0])
        logs: dict[str, float | torch.Tensor] = {
            "teacher_temp": temp,
            "momentum": cosine_momentum(step.step, step.total_steps, p.base_momentum),
            "last_layer_frozen": float(bool(self.frozen_modules(step))),
        }
        return StepOutput(loss, logs)

    @torch.no_grad()
    def after_step(self, step: StepInfo) -> None:
        """EMA update of the teacher, then of the centre with this step's teacher outputs (global batch with
        ``gather``)."""
        p = self.params
        ema_update(
            self.teacher,
            nn.Sequential(self.backbone, self.head),
            cosine_momentum(step.step, step.total_steps, p.base_momentum),
        )
        if self._pending is None:
            return
        (total, rows), self._pending = self._pending, None
        if p.gather:  # the sum over the workers of their sums: (W, K) gathered, not the (W * 2B, K) outputs
            total, rows = gather_no_grad(total[None]).sum(dim=0), rows * world_size()
        self.center.mul_(p.center_momentum).add_(total / rows, alpha=1 - p.center_momentum)

    def collapse_loss(self, batch_size: int) -> float | None:
        """log K: with every output equal the centre converges to it and the teacher's targets are uniform, and the
        student's cross entropy to uniform targets is at least log K, reached when its own outputs are uniform (the
        collapse DINO's centring tends to; the one-hot collapse, loss 0, shows in the embeddings' std instead)."""
        return math.log(self.params.out_dim)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def project(self, features: torch.Tensor) -> torch.Tensor | None:
        """The head's L2-normalised bottleneck (the collapse diagnostics' projection; not the out_dim logits)."""
        return self.head.bottleneck(features)
