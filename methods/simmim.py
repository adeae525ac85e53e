"""SimMIM: a Simple Framework for Masked Image Modeling (Xie et al., CVPR 2022).

A random ``mask_ratio`` of each image's patches is replaced by a learnable mask token before the position embedding;
the encoder (a timm ViT, :func:`core.backbones.vit_parts`) sees every position, and a linear head on each patch token
regresses that patch's raw pixels. The loss is the L1 distance over the masked patches' pixels only. The
representation for evaluation is the encoder on all patches, pooled (the mean of the patch tokens by default, the
paper's linear probe).

Differences from the paper: patches are masked at the ViT's own patch size (the paper masks 32 px blocks of 16 px
patches at 192 px, a coarser grid); the target is the view as the model sees it (normalised, as the reference code's).
Swin, which the paper also trains, is not one of the timm models :func:`core.backbones.vit_parts` takes apart.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from core.backbones import vit_parts
from core.contract import MethodParams, StepInfo, StepOutput
from core.errors import ConfigError
from core.splits import DataSplits
from core.views import View
from methods import register
from methods.base import Method
from methods.vit import PooledViT, check_image_size, encode_all, patchify, random_masking


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the pixels of the masked patches only (SimMIM's ``loss_recon * mask`` summed over
    ``mask.sum()`` pixels): pred, target (N, L, P), mask (N, L), 1 = masked. Unmasked patches do not enter it."""
    if pred.shape != target.shape or pred.dim() != 3 or mask.shape != pred.shape[:2]:
        raise ValueError(
            "expected pred and target (N, L, P) and mask (N, L), got "
            f"{tuple(pred.shape)}, {tuple(target.shape)}, {tuple(mask.shape)}"
        )
    mask = mask.float()
    per_patch = (pred.float() - target.float()).abs().sum(dim=-1)
    return (per_patch * mask).sum() / (mask.sum() * pred.shape[-1])


class SimMIMParams(MethodParams):
    mask_ratio: float = Field(0.6, gt=0, lt=1, description="fraction of patches masked per image (paper: 0.6)")
    pool: Literal["cls", "mean"] = Field(
        "mean", description="representation: mean of the patch tokens (the paper's probe) or the class token"
    )


@register
class SimMIM(Method):
    name = "simmim"
    Params = SimMIMParams
    uses_negatives = False
    networks = 1
    loss_name = "masked L1"
    paper = "Xie et al., CVPR 2022, SimMIM: a Simple Framework for Masked Image Modeling"

    params: SimMIMParams

    def __init__(self, backbone: nn.Module, params: SimMIMParams) -> None:
        super().__init__(backbone, params)
        parts = vit_parts(backbone, "method simmim")
        self.parts = parts
        num_masked = round(params.mask_ratio * parts.num_patches)
        if not 0 < num_masked < parts.num_patches:
            raise ConfigError(
                f"method.mask_ratio: {params.mask_ratio} of {parts.num_patches} patches masks {num_masked}; at "
                f"least one must be masked and one visible (more patches: a smaller backbone.kwargs.patch_size "
                f"than {parts.patch_size})"
            )
        if params.pool == "cls" and not parts.has_class_token:
            raise ConfigError("method.pool: 'cls' needs a class token and this ViT has none; use pool=mean")
        in_chans: int = parts.model.patch_embed.proj.in_channels
        self.mask_token = nn.Parameter(torch.zeros(1, 1, parts.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Linear(parts.embed_dim, parts.patch_size**2 * in_chans)

    def setup(self, data: DataSplits) -> None:
        check_image_size(self.parts, data)

    def views(self, image_size: int) -> list[View]:
        return [View(image_size)]

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The predicted pixels of every patch (B, L, p*p*C), the patches where ``mask`` is 1 hidden."""
        parts = self.parts
        tokens = parts.patch_tokens(images, mask, self.mask_token)
        encoded = parts.encode(torch.cat([parts.prefix_tokens(images.shape[0]), tokens], dim=1))
        return self.decoder(encoded[:, parts.num_prefix_tokens :])

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        x = views[0]
        _, mask, _ = random_masking(x.shape[0], self.parts.num_patches, self.params.mask_ratio, device=x.device)
        return StepOutput(masked_l1(self.reconstruct(x, mask), patchify(x, self.parts.patch_size), mask))

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return encode_all(self.parts, images, self.params.pool)

    def trunk(self, projector_layers: int = 0) -> tuple[nn.Module, int]:
        super().trunk(projector_layers)  # refuses fine-tuning from a projection head: SimMIM has none
        return PooledViT(self.backbone, self.params.pool, "method simmim"), self.parts.embed_dim
