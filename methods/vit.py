"""What the ViT methods (MAE, I-JEPA, SimMIM) share: the 2-D sin-cos position embedding, random patch masking,
patchify, and the pooled encoder."""

from __future__ import annotations

import torch
from torch import nn

from core.backbones import ViTParts, vit_parts
from core.errors import ConfigError
from core.splits import DataSplits
from methods.distributed import own_rows, world_size


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


def random_masking(
    n: int,
    length: int,
    ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of uniform noise (MAE ``random_masking``).

    Exactly ``round(ratio * length)`` of the ``length`` positions are masked in each of the ``n`` samples; the
    noise comes from ``generator`` (default: torch's global RNG, which the training loop seeds per epoch). With W
    workers, each of ``n`` rows of the global batch's W * n, every worker draws the whole batch's noise (the same on
    every worker: they draw alike) and keeps its own rows, so a sample gets the mask it gets on one process.
    Returns ``ids_keep`` (n, length - masked), the kept positions in shuffled order; ``mask`` (n, length) float,
    1 = masked, in the original order; ``ids_restore`` (n, length), the inverse of the shuffle:
    ``cat([kept, masked], 1).gather(1, ids_restore)`` puts every token back in place.
    """
    num_masked = round(ratio * length)
    if not 0 <= num_masked <= length:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    keep = length - num_masked
    noise = own_rows(torch.rand(n * world_size(), length, generator=generator, device=device), n)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the smallest noise values are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = torch.ones(n, length, device=noise.device)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], mask.gather(1, ids_restore), ids_restore


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), patches in row-major order, each flattened as (p, p, C) (MAE ``patchify``)."""
    n, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = images.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def check_image_size(parts: ViTParts, data: DataSplits) -> None:
    """ConfigError naming ``backbone.kwargs.img_size`` when the data's images are not the size the ViT is built for."""
    side = parts.grid_size * parts.patch_size
    if data.image_size != side:
        raise ConfigError(
            f"backbone.kwargs.img_size: the ViT is built for {side} px "
            f"images, the data has {data.image_size} px (data.image_size)"
        )


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
