"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022).

A random ``mask_ratio`` of each image's patches is removed; the encoder (a timm ViT, :func:`core.backbones.vit_parts`)
sees the visible patches, and a light transformer decoder with a mask token at every removed position predicts the
pixels of every patch. The loss is the MSE over the masked patches only (each target patch normalised with
``norm_pix_loss``). The representation for evaluation is the encoder on all patches, pooled by the class token or the
mean of the patch tokens.

Differences from the reference code:

* the encoder keeps timm's learned position embedding (MAE fixes it to sin-cos);
* the decoder blocks are ``nn.TransformerEncoderLayer`` (pre-norm, GELU, MLP ratio 4), MAE's timm blocks without qk
  bias;
* ``round(mask_ratio * L)`` patches are masked (MAE keeps ``int(L * (1 - mask_ratio))``; equal for L divisible by 4);
* augmentation is the run's ``augment`` config (MAE's recipe: crop (0.2, 1) + flip only).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from core.backbones import vit_parts
from core.contract import MethodParams, StepInfo, StepOutput
from core.errors import ConfigError
from core.splits import DataSplits
from core.views import View
from methods import register
from methods.base import Method
from methods.vit import PooledViT, check_image_size, encode_all, patchify, random_masking, sincos_2d

__all__ = ["MAE", "masked_mse", "normalize_patches", "patchify", "random_masking"]

NORM_PIX_EPS = 1e-6
"""Added to each target patch's variance with ``norm_pix_loss`` (MAE ``models_mae.py``)."""


def normalize_patches(target: torch.Tensor, eps: float = NORM_PIX_EPS) -> torch.Tensor:
    """``norm_pix_loss`` target: each patch minus its mean, over sqrt(its variance + eps); the variance is the
    unbiased one (``torch.var``'s default, as in MAE). target: (N, L, P)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE per patch, averaged over the masked patches only: ``(loss * mask).sum() / mask.sum()`` (MAE eq. in
    ``forward_loss``); visible patches do not enter it. pred, target: (N, L, P); mask: (N, L), 1 = masked.
    Computed in float32; a perfect reconstruction gives 0."""
    if pred.shape != target.shape or pred.dim() != 3 or mask.shape != pred.shape[:2]:
        raise ValueError(
            "expected pred and target (N, L, P) and mask (N, L), got "
            f"{tuple(pred.shape)}, {tuple(target.shape)}, {tuple(mask.shape)}"
        )
    mask = mask.float()
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class MAEParams(MethodParams):
    mask_ratio: float = Field(
        0.75, gt=0, lt=1, description="fraction of patches masked per image (He et al. 2022: 0.75)"
    )
    decoder_dim: int = Field(512, ge=4, description="decoder width (paper: 512)")
    decoder_depth: int = Field(8, ge=1, description="decoder blocks (paper: 8)")
    decoder_heads: int = Field(16, ge=1, description="decoder attention heads (paper: 16)")
    norm_pix_loss: bool = Field(
        True, description="normalise each target patch by its mean and std (the paper's best setting)"
    )
    pool: Literal["cls", "mean"] = Field(
        "cls", description="representation: class token (the paper's linear probe) or mean of patch tokens"
    )

    @field_validator("decoder_dim")
    @classmethod
    def _multiple_of_4(cls, v: int) -> int:
        if v % 4:
            raise ValueError("must be a multiple of 4 (2-D sin-cos position embedding)")
        return v

    @field_validator("decoder_heads")
    @classmethod
    def _divides_dim(cls, v: int, info: ValidationInfo) -> int:
        dim = info.data.get("decoder_dim")
        if dim is not None and dim % v:
            raise ValueError(f"must divide method.decoder_dim {dim}")
        return v


@register
class MAE(Method):
    name = "mae"
    Params = MAEParams
    uses_negatives = False
    networks = 1
    loss_name = "masked MSE"
    paper = "He et al., CVPR 2022, Masked Autoencoders Are Scalable Vision Learners"

    params: MAEParams
    decoder_pos_embed: torch.Tensor
    """Non-persistent buffer (1, P + L, decoder_dim): zeros for the prefix tokens, then the fixed 2-D sin-cos
    embedding."""

    def __init__(self, backbone: nn.Module, params: MAEParams) -> None:
        super().__init__(backbone, params)
        parts = vit_parts(backbone, "method mae")
        self.parts = parts
        num_masked = round(params.mask_ratio * parts.num_patches)
        if not 0 < num_masked < parts.num_patches:
            raise ConfigError(
                f"method.mask_ratio: {params.mask_ratio} of {parts.num_patches} patches "
                f"masks {num_masked}; at least one must be masked and one visible (more "
                f"patches: a smaller backbone.kwargs.patch_size than {parts.patch_size})"
            )
        if params.pool == "cls" and not parts.has_class_token:
            raise ConfigError(
                "method.pool: 'cls' needs a class token and this ViT "
                "has none (backbone.kwargs.class_token); use pool=mean"
            )
        in_chans: int = (
            parts.model.patch_embed.proj.in_channels
        )  # parts.model is the backbone; timm leaves patch_embed untyped
        dim = params.decoder_dim
        self.decoder_embed = nn.Linear(parts.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = torch.cat([torch.zeros(parts.num_prefix_tokens, dim), sincos_2d(dim, parts.grid_size)])
        self.register_buffer("decoder_pos_embed", pos[None], persistent=False)  # fixed, a function of the grid
        self.decoder_blocks = nn.Sequential(
            *(
                nn.TransformerEncoderLayer(
                    dim,
                    params.decoder_heads,
                    4 * dim,
                    dropout=0.0,
                    activation="gelu",
                    batch_first=True,
                    norm_first=True,
                )
                for _ in range(params.decoder_depth)
            )
        )
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, parts.patch_size**2 * in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        """MAE's initialisation of its own decoder: mask token N(0, 0.02), Linear xavier-uniform with zero bias."""
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_blocks, self.decoder_pred]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)

    def setup(self, data: DataSplits) -> None:
        check_image_size(self.parts, data)

    def views(self, image_size: int) -> list[View]:
        return [View(image_size)]

    def encode_visible(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> encoded prefix + visible tokens (B, P + L_keep, D), mask (B, L), ids_restore (B, L)."""
        parts = self.parts
        tokens = parts.patch_tokens(images)
        b, length, d = tokens.shape
        ids_keep, mask, ids_restore = random_masking(b, length, self.params.mask_ratio, device=images.device)
        visible = tokens.gather(1, ids_keep[..., None].expand(-1, -1, d))
        return parts.encode(torch.cat([parts.prefix_tokens(b), visible], dim=1)), mask, ids_restore

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Encoded tokens (B, P + L_keep, D) -> predicted pixels of every patch (B, L, p*p*C)."""
        p = self.parts.num_prefix_tokens
        y = self.decoder_embed(latent)
        b, length = ids_restore.shape
        patches = torch.cat([y[:, p:], self.mask_token.expand(b, length - (y.shape[1] - p), -1)], dim=1)
        patches = patches.gather(1, ids_restore[..., None].expand(-1, -1, y.shape[-1]))  # unshuffle
        y = torch.cat([y[:, :p], patches], dim=1) + self.decoder_pos_embed
        return self.decoder_pred(self.decoder_norm(self.decoder_blocks(y)))[:, p:]

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        x = views[0]
        latent, mask, ids_restore = self.encode_visible(x)
        pred = self.decode(latent, ids_restore)
        target = patchify(x, self.parts.patch_size)
        if self.params.norm_pix_loss:
            target = normalize_patches(target.float())
        return StepOutput(masked_mse(pred, target, mask))

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return encode_all(self.parts, images, self.params.pool)

    def trunk(self, projector_layers: int = 0) -> tuple[nn.Module, int]:
        super().trunk(projector_layers)  # refuses fine-tuning from a projection head: MAE has none
        return PooledViT(self.backbone, self.params.pool, "method mae"), self.parts.embed_dim
