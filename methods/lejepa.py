"""LeJEPA: Provable and Scalable Self-Supervised Learning Without the Heuristics (Balestriero & LeCun 2025,
arXiv:2511.08544).

One network and a projector; no teacher, no stop-gradient, no schedule of its own. The loss on the projections of
2 global and several local views is

    lambda * SIGReg(every view)  +  (1 - lambda) * invariance(every view, mean of the global views)

SIGReg slices the projections along fresh random unit directions and tests each slice for a standard normal law with
the Epps-Pulley statistic, as the authors' reference implementation (galilai-group/lejepa, MINIMAL.md). With several
workers the projections are gathered (``gather``), so every worker computes the global batch's statistic; the
directions are drawn from the step number, the same on every worker.

Where the peers differ: stable-pretraining does not scale the invariance by 1 - lambda, and lightly changed its
formulation in a 2025 fix; this file follows the paper.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator

from core.contract import MethodParams, StepInfo, StepOutput, feature_dim
from core.views import View, check_area_range
from methods import register
from methods.base import Method
from methods.distributed import gather
from methods.heads import mlp
from methods.multicrop import check_small_crops, multi_crop_views, per_view

DIRECTION_SEED = 0x1E7E9A
"""Added to the step number to seed the step's random directions (every worker draws the same ones)."""


def epps_pulley_weights(knots: int, t_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The points ``t = linspace(0, t_max, knots)`` and their weights: trapezoidal on [0, t_max], doubled for the
    symmetric integral over [-t_max, t_max], times the Gaussian window exp(-t^2 / 2)."""
    t = torch.linspace(0.0, t_max, knots)
    dt = t_max / (knots - 1)
    weights = torch.full((knots,), 2 * dt)
    weights[0] = weights[-1] = dt
    return t, weights * torch.exp(-t.square() / 2)


def sigreg(proj: torch.Tensor, directions: torch.Tensor, knots: int = 17, t_max: float = 3.0) -> torch.Tensor:
    """SIGReg: the Epps-Pulley statistic of each slice ``x = proj @ directions[:, s]`` against N(0, 1).

        N * sum_k w_k [(mean_n cos(t_k x_n) - exp(-t_k^2 / 2))^2 + (mean_n sin(t_k x_n))^2]

    with w_k :func:`epps_pulley_weights`, averaged over the slices (and the views). 0 only where every slice's
    empirical characteristic function equals the normal one at every t_k; large for a collapsed or shifted batch.

    proj: (N, D) or (V, N, D) projections; directions: (D, S) unit columns.
    """
    if proj.dim() not in (2, 3) or proj.shape[-2] < 1:
        raise ValueError(f"proj must be (N, D) or (V, N, D) with N >= 1, got {tuple(proj.shape)}")
    if directions.dim() != 2 or directions.shape[0] != proj.shape[-1] or directions.shape[1] < 1:
        raise ValueError(
            f"directions must be (D, S) with D = {proj.shape[-1]} and S >= 1, got {tuple(directions.shape)}"
        )
    if knots < 2 or not t_max > 0:
        raise ValueError(f"SIGReg needs knots >= 2 and t_max > 0, got {knots} and {t_max}")
    t, weights = epps_pulley_weights(knots, t_max)
    t, weights = t.to(proj.device), weights.to(proj.device)
    with torch.autocast(device_type=proj.device.type, enabled=False):
        x = (proj.float() @ directions.float()).unsqueeze(-1) * t  # (..., N, S, K)
        error = (x.cos().mean(dim=-3) - torch.exp(-t.square() / 2)).square() + x.sin().mean(dim=-3).square()
        return (error @ weights).mean() * proj.shape[-2]


def invariance(all_proj: torch.Tensor, global_proj: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of every view's projection (V, N, D) to the mean of the global views' (G, N, D)."""
    if all_proj.dim() != 3 or global_proj.dim() != 3 or all_proj.shape[1:] != global_proj.shape[1:]:
        raise ValueError(
            "invariance takes (V, N, D) and (G, N, D) of one N and D, "
            f"got {tuple(all_proj.shape)} and {tuple(global_proj.shape)}"
        )
    return (all_proj.float() - global_proj.float().mean(dim=0)).square().mean()


def random_directions(dim: int, slices: int, step: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(dim, slices) unit columns drawn from the step number alone: the same on every worker, fresh every step."""
    generator = torch.Generator().manual_seed(DIRECTION_SEED + step)
    a = torch.randn(dim, slices, generator=generator)
    return (a / a.norm(dim=0)).to(device)


class LeJEPAParams(MethodParams):
    lmbda: float = Field(0.05, description="lambda, the weight of SIGReg (reference: 0.05; paper: 0.01-0.1)")
    num_slices: int = Field(1024, description="random directions drawn each step (reference: 1,024)")
    knots: int = Field(17, ge=2, description="points of the Epps-Pulley integral on [0, t_max]")
    t_max: float = Field(3.0, gt=0, description="upper end of the integral")
    proj_hidden_dim: int = Field(2048, ge=1)
    proj_dim: int = Field(128, ge=1)
    proj_layers: int = Field(3, ge=1)
    num_local_crops: int = Field(6, ge=0, description="local views besides the 2 global ones (paper: 6)")
    local_crop_size_ratio: float = Field(
        3 / 7, gt=0, le=1, description="local view side / image side, rounded (96 px at 224)"
    )
    global_crop_scale: tuple[float, float] = Field((0.3, 1.0), description="crop area range of the global views")
    local_crop_scale: tuple[float, float] = Field((0.05, 0.3), description="crop area range of the local views")
    gather: bool = Field(
        True, description="with several workers, the statistics of the global batch (false: each worker's own)"
    )

    @field_validator("lmbda")
    @classmethod
    def _lambda(cls, v: float) -> float:
        if not (math.isfinite(v) and 0 <= v <= 1):
            raise ValueError(f"lambda weighs SIGReg against the invariance: it must be in [0, 1], got {v}")
        return v

    @field_validator("num_slices")
    @classmethod
    def _slices(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"SIGReg needs at least 1 slice, got {v}")
        return v

    @field_validator("global_crop_scale", "local_crop_scale")
    @classmethod
    def _area_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        return check_area_range(v)


@register
class LeJEPA(Method):
    name = "lejepa"
    Params = LeJEPAParams
    uses_negatives = False
    networks = 1
    loss_name = "SIGReg + invariance"
    paper = "Balestriero & LeCun 2025, LeJEPA"

    params: LeJEPAParams
    projector: torch.nn.Sequential

    def __init__(self, backbone: torch.nn.Module, params: LeJEPAParams) -> None:
        super().__init__(backbone, params)
        self.projector = mlp(feature_dim(backbone), params.proj_hidden_dim, params.proj_dim, params.proj_layers)

    def views(self, image_size: int) -> list[View]:
        """2 global views and ``num_local_crops`` local ones, all with the run's recipe."""
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
        check_small_crops(self.backbone, self.params.num_local_crops, "LeJEPA's local views", "method.num_local_crops")

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        p = self.params
        features = per_view(self.backbone, views)
        proj = list(self.projector(torch.cat(features)).chunk(len(views)))
        if p.gather:
            proj = [gather(z) for z in proj]
        stacked = torch.stack(proj)  # (V, N, D)
        directions = random_directions(stacked.shape[-1], p.num_slices, step.step, stacked.device)
        sig = sigreg(stacked, directions, p.knots, p.t_max)
        inv = invariance(stacked, stacked[:2])
        loss = p.lmbda * sig + (1 - p.lmbda) * inv
        return StepOutput(loss, {"sigreg": sig.detach(), "invariance": inv.detach()})
