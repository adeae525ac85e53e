"""CMC: Contrastive Multiview Coding (Tian, Krishnan & Isola, ECCV 2020).

Two views of one image from different channel groups, the L and ab channels of CIELAB, each with its own encoder and
projection head; a cross-view contrastive loss makes the L and ab embeddings of the same image agree. The
representation for evaluation is both encoders' features concatenated (the paper's linear evaluation);
:class:`SplitEncoder` holds both and replaces ``self.backbone``, so every evaluation uses CMC like any method.

Differences from the paper:

- negatives are the other images of the batch (symmetric InfoNCE), not a memory bank with NCE;
- the heads are MLPs (``proj_layers: 1`` gives the paper's linear head to 128 dimensions);
- the augmentation is the run's recipe (the paper: crop + flip only); random grayscale empties the ab view, so
  ``augment.grayscale_p: 0`` is advisable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import nn

from core.contract import MethodParams, StepInfo, StepOutput, feature_dim
from core.errors import ConfigError
from core.splits import DataSplits
from core.views import View
from methods import register
from methods.base import Method
from methods.distributed import gather
from methods.heads import mlp
from methods.losses import info_nce

_SRGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
"""Linear sRGB -> CIE XYZ (D65), the matrix of scikit-image's ``rgb2lab`` (which CMC's reference code calls)."""

LAB_CENTER = (50.0, (-86.183 + 98.233) / 2, (-107.857 + 94.478) / 2)
LAB_HALF_RANGE = (50.0, (86.183 + 98.233) / 2, (107.857 + 94.478) / 2)
"""CMC's fixed standardisation (reference ``train_CMC.py``): the sRGB gamut's range of L, a and b onto [-1, 1]."""


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] ``(B, 3, H, W)`` -> CIELAB ``(B, 3, H, W)``: L in [0, 100], a in about [-86, 98], b in [-108, 94].

    sRGB decoding (IEC 61966-2-1), XYZ under D65, then CIE 1976 L*a*b*. The white point is the
    matrix's image of RGB white, so greys have a = b = 0 exactly. Computed in float32 with
    elementwise operations only (autocast leaves them in float32). Values outside [0, 1] are clamped.
    """
    if rgb.dim() != 4 or rgb.shape[1] != 3:
        raise ValueError(f"rgb must be (B, 3, H, W), got {tuple(rgb.shape)}")
    x = rgb.float().clamp(0, 1)
    linear = torch.where(x > 0.04045, ((x + 0.055) / 1.055).pow(2.4), x / 12.92)
    r, g, b = linear.unbind(1)
    fx, fy, fz = (_lab_f((m[0] * r + m[1] * g + m[2] * b) / sum(m)) for m in _SRGB_TO_XYZ)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def _lab_f(t: torch.Tensor) -> torch.Tensor:
    delta = 6 / 29
    return torch.where(t > delta**3, t.clamp(min=delta**3).pow(1 / 3), t / (3 * delta**2) + 4 / 29)


class SplitEncoder(nn.Module):
    """Normalised RGB ``(B, 3, H, W)`` -> L and ab of CIELAB -> one encoder each -> ``(B, D_L + D_ab)``, concatenated.

    ``mean``/``std`` are the dataset's normalisation, undone before the conversion; L, a and b are
    then standardised by CMC's fixed constants (:data:`LAB_CENTER`, :data:`LAB_HALF_RANGE`).
    ``num_features`` is the sum of both encoders', like a timm backbone's.
    """

    # non-persistent buffers, each (1, 3, 1, 1)
    mean: torch.Tensor
    std: torch.Tensor
    lab_center: torch.Tensor
    lab_scale: torch.Tensor

    def __init__(
        self, l_encoder: nn.Module, ab_encoder: nn.Module, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std must have 3 values (RGB), got {len(mean)} and {len(std)}")
        self.l_encoder = l_encoder
        self.ab_encoder = ab_encoder
        self.num_features = feature_dim(l_encoder) + feature_dim(ab_encoder)
        for name, values in (("mean", mean), ("std", std), ("lab_center", LAB_CENTER), ("lab_scale", LAB_HALF_RANGE)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def split(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised RGB ``(B, 3, H, W)`` -> standardised L ``(B, 1, H, W)`` and ab ``(B, 2, H, W)``."""
        lab = (rgb_to_lab(images.float() * self.std + self.mean) - self.lab_center) / self.lab_scale
        return lab[:, :1], lab[:, 1:]

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The L encoder's ``(B, D_L)`` and the ab encoder's ``(B, D_ab)`` features of the same images."""
        l_view, ab_view = self.split(images)
        return self.l_encoder(l_view), self.ab_encoder(ab_view)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.features(images), dim=1)


def cmc_loss(z_l: torch.Tensor, z_ab: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric cross-view InfoNCE with in-batch negatives (CMC Sec. 3.1, softmax form, without the memory bank).

    Row i of ``z_l`` and of ``z_ab`` are the two views of image i. With cosine similarities
    ``s = norm(z_l) norm(z_ab)^T / T``: ``CE(s, arange)`` (L anchors, the N ab embeddings as
    candidates) + ``CE(s^T, arange)`` (ab anchors), each the mean over the N anchors; the two
    directions are summed, as CMC sums L(V1, V2) and L(V2, V1). Collapsed embeddings give
    ``log N`` per direction, ``2 log N`` in all.

    z_l, z_ab: (N, D) projections of the two views, not necessarily normalised.
    """
    return 2 * info_nce(z_l, z_ab, temperature, symmetric=True)  # the sum of the two directions' means


class CMCParams(MethodParams):
    temperature: float = Field(0.07, gt=0, description="InfoNCE temperature (CMC: 0.07, the reference code's nce_t)")
    proj_hidden_dim: int = Field(2048, ge=1)
    proj_dim: int = Field(128, ge=1, description="CMC: 128 (the reference code's feat_dim)")
    proj_layers: int = Field(2, ge=1, description="layers of each head; 1 is the paper's linear embedding")
    gather: bool = Field(
        True, description="with several workers, contrast against the global batch (false: each worker's own batch)"
    )


@register
class CMC(Method):
    name = "cmc"
    Params = CMCParams
    uses_negatives = True
    networks = 2
    builds_backbone = True
    loss_name = "cross-view InfoNCE"
    paper = "Tian, Krishnan & Isola, ECCV 2020, Contrastive Multiview Coding"

    params: CMCParams
    backbone: SplitEncoder

    def setup(self, data: DataSplits) -> None:
        """Build the L (1 channel) and ab (2 channels) encoders with the backbone factory, and their heads."""
        if data.channels != 3:
            raise ConfigError(
                f"data.name: {data.name!r} has {data.channels}-channel "
                "images; cmc's L/ab split needs RGB images (3 channels)"
            )
        if self.backbone_factory is None:
            raise ValueError(
                "cmc builds one encoder per channel group: create it with create_method(..., backbone_factory=...)"
            )
        p = self.params
        self.backbone = SplitEncoder(
            self.backbone_factory(in_chans=1), self.backbone_factory(in_chans=2), data.mean, data.std
        )
        self.projector_l = mlp(feature_dim(self.backbone.l_encoder), p.proj_hidden_dim, p.proj_dim, p.proj_layers)
        self.projector_ab = mlp(feature_dim(self.backbone.ab_encoder), p.proj_hidden_dim, p.proj_dim, p.proj_layers)

    def views(self, image_size: int) -> list[View]:
        """One augmented view per step: its L and ab are the two views (the paper's single crop)."""
        return [View(image_size)]

    def check(self, batch_size: int) -> None:
        if batch_size < 2:
            raise ConfigError(
                "pretrain.batch_size: cmc contrasts each image with the "
                f"others of its batch and needs at least 2, got {batch_size}"
            )

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        (x,) = views
        f_l, f_ab = self.backbone.features(x)
        z_l, z_ab = self.projector_l(f_l), self.projector_ab(f_ab)
        if self.params.gather:
            z_l, z_ab = gather(z_l), gather(z_ab)
        return StepOutput(cmc_loss(z_l, z_ab, self.params.temperature))

    @torch.no_grad()
    def project(self, features: torch.Tensor) -> torch.Tensor | None:
        """Each head on its encoder's part of the concatenated features, concatenated: (B, 2 * proj_dim)."""
        n_l = feature_dim(self.backbone.l_encoder)
        return torch.cat([self.projector_l(features[:, :n_l]), self.projector_ab(features[:, n_l:])], dim=1)
