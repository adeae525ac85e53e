"""MSN: Masked Siamese Networks for Label-Efficient Learning (Assran et al., ECCV 2022).

An anchor view with a random ``mask_ratio`` of its patches dropped goes through the ViT (:func:`core.backbones.
vit_parts`) and a projection head; an EMA target network sees another view of the image unmasked. Both projections,
L2-normalised, are softly assigned to ``num_prototypes`` learnable, normalised prototypes (softmax of the cosine
similarities over ``temperature``); the target's assignment is sharpened (``p^(1/T)`` renormalised, T =
``sharpen_temperature``) and detached. The loss is the cross entropy from the target's to the anchor's assignment,
minus ``me_max_weight`` times the entropy of the anchors' mean assignment (mean-entropy maximisation: every prototype
used). The representation for evaluation is the ViT's class token on all patches.

Differences from the paper: one anchor view and no focal views (the paper adds 10 masked 96 px focal crops, which
:class:`core.backbones.ViTParts`, adding the full grid's position embedding, does not take); no label smoothing of the
prototypes. With several workers the mean assignment of ME-MAX is the global batch's (the reference's AllReduce).
"""

from __future__ import annotations

import math
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
from methods.distributed import gather
from methods.heads import mlp
from methods.momentum import cosine_momentum, ema_update, frozen_copy
from methods.vit import PooledViT, check_image_size, encode_all, random_masking


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``p^(1/T)``, renormalised over the last dimension: T < 1 sharpens, T = 1 leaves ``p`` as it is."""
    if not temperature > 0:
        raise ValueError(f"the sharpening temperature must be > 0, got {temperature}")
    sharp = probs ** (1.0 / temperature)
    return sharp / sharp.sum(dim=-1, keepdim=True)


def me_max(probs: torch.Tensor) -> torch.Tensor:
    """The entropy of the mean assignment, ``H(mean_n p_n)`` of probs (N, K): log K when the prototypes are used
    evenly, 0 when every sample goes to the same one. MSN maximises it (subtracts it from the loss)."""
    mean = probs.float().mean(dim=0)
    return -(mean * torch.log(mean.clamp_min(1e-12))).sum()


def msn_loss(
    anchor_logits: torch.Tensor,
    target_probs: torch.Tensor,
    me_max_weight: float,
    mean_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, cross entropy, ME-MAX entropy): ``mean_n H(target_n, softmax(anchor_n)) - w * H(mean anchor p)``.

    anchor_logits, target_probs: (N, K); ``mean_probs`` the anchor probabilities ME-MAX averages (default: these N;
    with several workers the gathered ones)."""
    log_p = F.log_softmax(anchor_logits.float(), dim=-1)
    cross_entropy = -(target_probs.float() * log_p).sum(dim=-1).mean()
    entropy = me_max(log_p.exp() if mean_probs is None else mean_probs)
    return cross_entropy - me_max_weight * entropy, cross_entropy, entropy


class MSNParams(MethodParams):
    mask_ratio: float = Field(0.15, gt=0, lt=1, description="patches dropped from the anchor (paper, ViT-S/16: 0.15)")
    num_prototypes: int = Field(1024, description="learnable prototypes (paper: 1024)")
    temperature: float = Field(0.1, gt=0, description="softmax temperature of the assignments (paper: 0.1)")
    sharpen_temperature: float = Field(0.25, gt=0, le=1, description="target sharpening T (paper: 0.25)")
    me_max_weight: float = Field(1.0, ge=0, description="weight of the mean-entropy maximisation (paper: 1)")
    proj_hidden_dim: int = Field(2048, ge=1)
    proj_dim: int = Field(256, ge=1, description="projection and prototype width (paper: 256)")
    base_momentum: float = Field(0.996, ge=0, lt=1, description="target EMA momentum at step 0, cosine to 1")
    crop_scale: tuple[float, float] = Field((0.3, 1.0), description="crop area range of both views (paper: 0.3-1)")
    pool: Literal["cls", "mean"] = Field("cls", description="representation: the class token (paper) or the mean")

    @field_validator("num_prototypes")
    @classmethod
    def _prototypes(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"MSN needs at least 2 prototypes to assign views to, got {v}")
        return v

    @field_validator("crop_scale")
    @classmethod
    def _area_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        return check_area_range(v)


@register
class MSN(Method):
    name = "msn"
    Params = MSNParams
    uses_negatives = False
    networks = 2
    loss_name = "cross entropy to a sharpened EMA target's prototype assignment + ME-MAX"
    paper = "Assran et al., ECCV 2022, Masked Siamese Networks for Label-Efficient Learning"

    params: MSNParams
    projector: nn.Sequential

    def __init__(self, backbone: nn.Module, params: MSNParams) -> None:
        super().__init__(backbone, params)
        self.parts = vit_parts(backbone, "method msn")
        keep = self.parts.num_patches - round(params.mask_ratio * self.parts.num_patches)
        if keep < 1:
            raise ConfigError(f"method.mask_ratio: {params.mask_ratio} leaves no patch of {self.parts.num_patches}")
        if params.pool == "cls" and not self.parts.has_class_token:
            raise ConfigError("method.pool: 'cls' needs a class token and this ViT has none; use pool=mean")
        self.projector = mlp(self.parts.embed_dim, params.proj_hidden_dim, params.proj_dim, 3)
        self.prototypes = nn.Parameter(torch.empty(params.num_prototypes, params.proj_dim))
        nn.init.uniform_(self.prototypes, -(1.0 / math.sqrt(params.proj_dim)), 1.0 / math.sqrt(params.proj_dim))
        self.target = frozen_copy(nn.Sequential(backbone, self.projector))

    def setup(self, data: DataSplits) -> None:
        check_image_size(self.parts, data)

    def views(self, image_size: int) -> list[View]:
        """The target's view, then the anchor's: full size, crops of ``crop_scale``, the run's recipe."""
        return [View(image_size, self.params.crop_scale), View(image_size, self.params.crop_scale)]

    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        p = self.parts.num_prefix_tokens
        return tokens[:, 0] if self.params.pool == "cls" else tokens[:, p:].mean(dim=1)

    def encode_masked(self, images: torch.Tensor) -> torch.Tensor:
        """The anchor's pooled representation (B, D), a random ``mask_ratio`` of its patches dropped."""
        parts = self.parts
        tokens = parts.patch_tokens(images)
        b, length, d = tokens.shape
        ids_keep, _, _ = random_masking(b, length, self.params.mask_ratio, device=images.device)
        visible = tokens.gather(1, ids_keep[..., None].expand(-1, -1, d))
        return self._pool(parts.encode(torch.cat([parts.prefix_tokens(b), visible], dim=1)))

    def assignment_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Cosine similarities of the normalised projections to the normalised prototypes, over the temperature."""
        return F.normalize(z.float(), dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).T / self.params.temperature

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        p = self.params
        target_view, anchor_view = views[0], views[1]
        anchor_logits = self.assignment_logits(self.projector(self.encode_masked(anchor_view)))
        with torch.no_grad():
            target_backbone, target_projector = list(self.target.children())
            pooled = encode_all(vit_parts(target_backbone, "method msn"), target_view, p.pool)
            target_logits = self.assignment_logits(target_projector(pooled))
            target_probs = sharpen(torch.softmax(target_logits, dim=-1), p.sharpen_temperature)
        anchor_probs = torch.softmax(anchor_logits.float(), dim=-1)
        loss, cross_entropy, entropy = msn_loss(anchor_logits, target_probs, p.me_max_weight, gather(anchor_probs))
        logs: dict[str, float | torch.Tensor] = {
            "msn_cross_entropy": cross_entropy.detach(),
            "msn_me_max": entropy.detach(),
            "momentum": cosine_momentum(step.step, step.total_steps, p.base_momentum),
        }
        return StepOutput(loss, logs)

    @torch.no_grad()
    def after_step(self, step: StepInfo) -> None:
        """EMA update of the target network (backbone and projector)."""
        momentum = cosine_momentum(step.step, step.total_steps, self.params.base_momentum)
        ema_update(self.target, nn.Sequential(self.backbone, self.projector), momentum)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return encode_all(self.parts, images, self.params.pool)

    def trunk(self, projector_layers: int = 0) -> tuple[nn.Module, int]:
        super().trunk(projector_layers)
        return PooledViT(self.backbone, self.params.pool, "method msn"), self.parts.embed_dim
