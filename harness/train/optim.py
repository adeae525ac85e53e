"""Optimisers: SGD, LARS and AdamW over two parameter groups (weights with decay; biases and norms without), and
what the loop does to the gradients and groups between ``backward`` and ``optimizer.step()``.

    optimizer = build_optimizer(method, cfg.pretrain)          # no decay on biases and norms (is_bias_or_norm)
    set_schedule(optimizer, lr, weight_decay)                  # each step: lr everywhere, decay on the decaying group
    drop_gradients(method, method.frozen_modules(info))        # frozen modules: .grad = None, the optimiser skips them
    clip_gradients(method.parameters(), cfg.pretrain.clip_grad)  # global norm, after averaging over workers

The schedules are :func:`core.schedules.cosine_lr` and :func:`core.schedules.cosine_weight_decay`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from harness.config.schema import PretrainConfig

NoDecayRule = Callable[[str, nn.Parameter], bool]
"""``rule(name, param)`` -> True when the parameter gets no weight decay."""


def is_bias_or_norm(name: str, param: torch.Tensor) -> bool:
    """The no-weight-decay rule: biases and normalisation weights, i.e. tensors of at most one dimension
    (SimCLR's and BYOL's LARS exclusion; DINO's ``get_params_groups``: ``name.endswith(".bias") or ndim == 1``)."""
    return param.ndim <= 1


def param_groups(model: nn.Module, weight_decay: float, no_decay: NoDecayRule | None = None) -> list[dict]:
    """Two groups of the trainable parameters: those with decay, and those ``no_decay(name, param)`` leaves out.

    ``no_decay`` defaults to biases and norm parameters (:func:`is_bias_or_norm`). The no-decay group is also
    excluded from LARS adaptation (SimCLR, BYOL). Each group carries ``decay`` (True for the first), the flag
    :func:`set_schedule` reads.
    """
    no_decay = no_decay or is_bias_or_norm
    decay: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (excluded if no_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars": True, "decay": True},
        {"params": excluded, "weight_decay": 0.0, "lars": False, "decay": False},
    ]


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """This step's values: ``lr`` on every group, ``weight_decay`` on the groups with ``decay`` (the others keep 0)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("decay"):
            group["weight_decay"] = weight_decay


def _parameters_of(module: nn.Module, name: str) -> list[nn.Parameter]:
    try:
        return list(module.get_submodule(name).parameters())
    except AttributeError:
        pass
    try:
        return [module.get_parameter(name)]
    except AttributeError:
        raise ValueError(
            f"{type(module).__name__}.frozen_modules names {name!r}, which is neither a submodule nor a parameter"
        ) from None


def drop_gradients(module: nn.Module, names: Iterable[str]) -> None:
    """Set the gradient of every parameter of the submodules (or parameters) ``names`` of ``module`` to None.

    SGD, AdamW and LARS skip a parameter without a gradient entirely: no update, no momentum, no weight decay.
    """
    for name in names:
        for p in _parameters_of(module, name):
            p.grad = None


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global L2 norm (all tensors as one vector) is at most ``max_norm``;
    smaller gradients are left unchanged. Returns the norm before clipping (a 0-d tensor, no host sync).

    ``torch.nn.utils.clip_grad_norm_`` over the parameters that have a gradient. DINO's reference code clips each
    tensor to ``max_norm`` separately (``utils.clip_gradients``); the global norm bounds the whole update instead,
    and is the stricter of the two at the same value.
    """
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(grads, max_norm)


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise adaptive rate scaling (You et al. 2017), as used by SimCLR and BYOL.

    Per parameter tensor with ``lars=True`` in its group:
    ``g <- g + wd * w``; ``g <- g * eta * ||w|| / ||g||`` (when both norms are > 0);
    then heavy-ball momentum: ``v <- m v + g``; ``w <- w - lr v``.
    """

    def __init__(
        self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001
    ) -> None:
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
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm)
                    )
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
    """The configured optimiser over ``model``'s trainable parameters, at the effective lr (:func:`param_groups`)."""
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
