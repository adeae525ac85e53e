"""Projection and prediction heads shared by methods."""

from __future__ import annotations

from torch import nn


def mlp(
    in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, *, batch_norm: bool = True, last_bn: bool = False
) -> nn.Sequential:
    """An MLP head: ``num_layers`` Linear layers, BN + ReLU between them (SimCLR, BYOL, SimSiam style).

    SimCLR uses 2 layers (v1) or 3 (v2); ``last_bn`` adds a BatchNorm without
    affine after the last layer (SimSiam's projector, MoCo v3).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)
