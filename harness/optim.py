"""Optimisers: SGD, LARS and AdamW over two parameter groups (weights with decay; biases and norms without).

The learning-rate schedule is :func:`harness.schedules.cosine_lr`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from harness.config import PretrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay, and biases / norm parameters (1-D tensors) without.

    The no-decay group is also excluded from LARS adaptation (SimCLR, BYOL).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars": True},
        {"params": no_decay, "weight_decay": 0.0, "lars": False},
    ]


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise adaptive rate scaling (You et al. 2017), as used by SimCLR and BYOL.

    Per parameter tensor with ``lars=True`` in its group:
    ``g <- g + wd * w``; ``g <- g * eta * ||w|| / ||g||`` (when both norms are > 0);
    then heavy-ball momentum: ``v <- m v + g``; ``w <- w - lr v``.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001) -> None:
        if lr < 0 or eta <= 0:
            raise ValueError(f"LARS needs lr >= 0 and eta > 0, got lr={lr}, eta={eta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
                    g = g * trust
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """The configured optimiser over ``model``'s trainable parameters, at the effective lr."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        for g in groups:
            g.pop("lars")
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        for g in groups:
            g.pop("lars")
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    return LARS(groups, lr=cfg.lr, momentum=cfg.momentum)
