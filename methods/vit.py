"""What the ViT methods (MAE, I-JEPA) share: the 2-D sin-cos position embedding and the pooled encoder."""

from __future__ import annotations

import torch
from torch import nn

from core.backbones import ViTParts, vit_parts


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sin-cos position embedding, row-major: the first half encodes the column, the
    second the row, each ``[sin(pos * w), cos(pos * w)]`` with ``w_k = 10000^(-k / (dim / 4))`` (MAE
    ``pos_embed.py``)."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def one(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([one(cols), one(rows)], dim=1).float()


def encode_all(parts: ViTParts, images: torch.Tensor, pool: str) -> torch.Tensor:
    """The encoder on all patches, pooled: (B, C, H, W) -> (B, D), the class token or the mean of the patch tokens."""
    x = parts.encode(torch.cat([parts.prefix_tokens(images.shape[0]), parts.patch_tokens(images)], dim=1))
    return x[:, 0] if pool == "cls" else x[:, parts.num_prefix_tokens :].mean(dim=1)


class PooledViT(nn.Module):
    """A ViT's encoder on all patches, pooled (:func:`encode_all`): what semi-supervised fine-tuning trains."""

    def __init__(self, vit: nn.Module, pool: str, needed_by: str) -> None:
        super().__init__()
        self.vit = vit
        self.pool = pool
        self.needed_by = needed_by

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return encode_all(vit_parts(self.vit, self.needed_by), images, self.pool)
