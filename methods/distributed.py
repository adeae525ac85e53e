"""Gathering across workers, for the methods whose loss couples the samples of a batch.

Losses stay plain functions of tensors; methods gather their inputs before calling them (in ``training_step`` and
``after_step``), behind their ``gather`` parameter. Without an initialised process group of more than one worker
every function here is the identity.

Gradient convention: each worker computes the loss of the gathered global batch, equal to the single-process loss.
``gather``'s backward returns the sum of the W workers' gradients for this worker's rows, W times the single-process
gradient; averaging the parameter gradients over the workers (DDP, or :func:`average_gradients`) divides by W, so every
parameter gradient equals the single-process one. Per-sample losses need no gather. Every worker must pass the same
shape (full batches).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["average_gradients", "gather", "gather_no_grad", "is_distributed", "own_rows", "rank", "world_size"]


def is_distributed() -> bool:
    """True when torch.distributed is available and initialised with more than one worker."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of workers (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This worker's index (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _Gather(torch.autograd.Function):
    """all_gather + cat forward; backward: the sum over workers of the full gradient, this worker's rows
    (all_reduce and a slice: gloo has no reduce_scatter)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return _all_gather(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce is in place: not on autograd's buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return own_rows(grad, ctx.rows)


def gather(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each of W workers -> (W * B, ...) in rank order on every worker, with gradient (see the module
    docstring)."""
    return _Gather.apply(x) if is_distributed() else x


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """As :func:`gather`, detached: keys, codes, features to enqueue."""
    return _all_gather(x.detach()) if is_distributed() else x.detach()


def own_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """This worker's ``n`` rows of ``x``, rows of the global batch in rank order (what :func:`gather` returns, or
    what every worker draws alike); ``x[:n]`` with one worker."""
    start = rank() * n
    return x[start : start + n]


_BUCKET_BYTES = 32 * 2**20


@torch.no_grad()
def average_gradients(module: nn.Module) -> None:
    """Replace every parameter's ``.grad`` by its mean over the workers (what DDP does), after ``backward``.

    Gradients travel flattened in buckets of about 32 MiB (one all_reduce each, not one per parameter).
    Parameters without a gradient are skipped; it must be None on every worker or on none.
    """
    if not is_distributed():
        return
    w = dist.get_world_size()
    bucket: list[torch.Tensor] = []
    size = 0
    for p in module.parameters():
        if p.grad is None:
            continue
        if bucket and (p.grad.dtype != bucket[0].dtype or p.grad.device != bucket[0].device or size >= _BUCKET_BYTES):
            _reduce_bucket(bucket, w)
            bucket, size = [], 0
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
    if bucket:
        _reduce_bucket(bucket, w)


def _reduce_bucket(grads: list[torch.Tensor], world: int) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
