"""Momentum (EMA) targets, shared by BYOL, MoCo and friends.

    target = frozen_copy(online)                   # same weights, no gradients
    tau = cosine_momentum(step, total, base=0.996) # BYOL: base -> 1 over training
    ema_update(target, online, tau)                # target <- tau * target + (1 - tau) * online

The target never receives gradients (``requires_grad`` off, updated under
``no_grad``); its BatchNorm statistics follow the online network's (buffers
are copied), as in BYOL's and MoCo's reference code.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["cosine_momentum", "ema_update", "frozen_copy"]


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters never require gradients."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's schedule: ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``: ``base`` at step 0, 1 at the end."""
    if total_steps <= 0:
        return base
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """``target <- tau * target + (1 - tau) * online`` for parameters; buffers (BN statistics) are copied."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(tau).add_(o.detach(), alpha=1.0 - tau)
    for t_buf, o_buf in zip(target.buffers(), online.buffers(), strict=True):
        t_buf.copy_(o_buf)
