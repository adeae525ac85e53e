"""Counter-based random numbers: uniforms that are a pure function of (key, index, column).

SplitMix64's finaliser (Steele, Lea and Flood 2014) as int64 tensor arithmetic. The
augmentations key an image's views by (seed, epoch, image, view) with it, and methods
that draw per-image randomness (I-JEPA's masks) key it by (step, image) the same way,
so the draws do not depend on which batch or worker an image lands in. A leaf module:
torch only.
"""

from __future__ import annotations

import torch

__all__ = ["keyed_uniforms", "mix64", "signed64"]


# SplitMix64 (Steele, Lea and Flood 2014) on int64 tensors: two's-complement wrapping arithmetic,
# logical right shifts by masking. The constants are the unsigned 64-bit ones, as signed int64.
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic on negatives)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser, elementwise on int64."""
    x = x ^ _shr(x, 30)
    x = x * _MIX1
    x = x ^ _shr(x, 27)
    x = x * _MIX2
    return x ^ _shr(x, 31)


def signed64(value: int) -> int:
    value %= 2**64
    return value - 2**64 if value >= 2**63 else value


def keyed_uniforms(key: int, indices: torch.Tensor, columns: int) -> torch.Tensor:
    """U[0, 1) float64 (len(indices), columns): entry (i, c) a hash of (key, indices[i], c) alone."""
    rows = indices.to(device="cpu", dtype=torch.int64).reshape(-1, 1)
    base = mix64(torch.tensor([signed64(key)], dtype=torch.int64))
    h = mix64(base + rows * _GOLDEN)
    h = mix64(h + torch.arange(1, columns + 1, dtype=torch.int64) * _GOLDEN)
    return _shr(h, 11).to(torch.float64) * 2.0**-53
