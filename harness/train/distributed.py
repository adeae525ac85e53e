"""Data-parallel pretraining, the torch.distributed side: who this worker is, its device, its slice of a batch,
SyncBatchNorm, broadcasts and means over the workers.

    world = current()                          # World(rank, size, local_rank); World() without a process group
    rows = shard(batch_rows, world)            # this worker's slice of the step's global batch
    loss = mean_over_workers(loss.detach())    # the same value on every worker

Ray-free: Ray Train (:mod:`harness.launch.raytrain`) or ``torchrun`` (:func:`init_from_env`) sets up the
process group; the loop (:mod:`harness.train.loop`) asks this module. Gathering inside losses and gradient
averaging are the methods' side (:mod:`methods.distributed`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from core.errors import BadInput, WorkerFailed

__all__ = [
    "GlobalBatchNorm",
    "World",
    "all_gather_object",
    "backend_for",
    "broadcast_module",
    "current",
    "device_for",
    "from_sync_batchnorm",
    "init_from_env",
    "lost_worker",
    "mean_over_workers",
    "record_peers",
    "shard",
    "shutdown",
    "to_sync_batchnorm",
    "wants_sync_batchnorm",
]

TIMEOUT = timedelta(minutes=60)
"""Collectives wait this long: rank 0 alone computes the baselines before training and the online monitor between
epochs, while the others wait at their next collective."""


@dataclass(frozen=True)
class World:
    """This worker's place: rank among ``size`` workers, and its rank on its node (its GPU)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the worker that logs, checkpoints and evaluates."""
        return self.rank == 0


def current() -> World:
    """The process group's view of this worker; ``World()`` (rank 0 of 1) without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    rank = dist.get_rank()
    return World(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def device_for(spec: str, world: World) -> torch.device:
    """The device a worker trains on: ``auto`` -> CUDA when available (``cuda:<local rank>`` with several workers),
    else the CPU; ``cuda`` without CUDA is BadInput."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"device: {spec!r} requested but CUDA is not available here; use device=cpu or device=auto")
    if spec == "cuda" and world.size > 1:
        return torch.device("cuda", world.local_rank % torch.cuda.device_count())
    return torch.device(spec)


def backend_for(spec: str, device: torch.device) -> str:
    """``auto`` -> NCCL on CUDA, gloo on the CPU; NCCL for a CPU device is BadInput."""
    if spec == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if spec == "nccl" and device.type != "cuda":
        raise BadInput(
            "distributed.backend: nccl needs CUDA, and this run "
            f"trains on {device}; use distributed.backend=gloo or auto"
        )
    return spec


def init_from_env(backend: str, device: torch.device) -> World:
    """Join the ``env://`` rendezvous torchrun sets up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method="env://", timeout=TIMEOUT)
    return current()


def shutdown() -> None:
    """Leave the process group, if there is one."""
    _PEERS.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_PEERS: list[tuple[str, int]] = []
"""Every rank's (host, pid), recorded by :func:`record_peers` once the process group is up."""


def record_peers() -> list[tuple[str, int]]:
    """Gather every rank's (host, pid) (a collective: every rank calls it), kept to name a worker that dies."""
    _PEERS[:] = all_gather_object((socket.gethostname(), os.getpid()))
    return list(_PEERS)


def lost_worker(err: BaseException) -> WorkerFailed | None:
    """When another worker's process is gone (kill -9, out of memory), a :class:`WorkerFailed` naming its rank, for
    the two ways this worker learns of it: a collective that failed (a RuntimeError), or a stop signal from the
    launcher (a KeyboardInterrupt: torchrun stops the other workers when one ends). None for any other error, or
    when every worker is alive. Only this host's workers can be checked."""
    if not _PEERS or isinstance(err, WorkerFailed) or not isinstance(err, (RuntimeError, KeyboardInterrupt)):
        return None
    host = socket.gethostname()
    dead = [(rank, pid) for rank, (h, pid) in enumerate(_PEERS) if h == host and pid != os.getpid() and _gone(pid)]
    if not dead:
        return None
    rank, pid = dead[0]
    if isinstance(err, KeyboardInterrupt):
        then = "so the launcher stopped the others"
    else:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        then = f"so a collective failed ({type(err).__name__}: {reason})"
    return WorkerFailed(f"rank {rank}: its process (pid {pid} on {host}) ended while the others trained, {then}")


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie its parent has not reaped yet included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def all_gather_object(obj: Any) -> list[Any]:
    """Every worker's ``obj`` (picklable), by rank; ``[obj]`` with one worker."""
    if current().size == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(rows: torch.Tensor, world: World) -> torch.Tensor:
    """This worker's contiguous slice of a step's global batch (whose size the world size divides)."""
    per = rows.shape[0] // world.size
    return rows[world.rank * per : (world.rank + 1) * per]


def mean_over_workers(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the workers (``x`` itself with one worker)."""
    if current().size == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.div_(dist.get_world_size())


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Every worker takes rank 0's parameters and buffers (after initialisation or loading a checkpoint)."""
    if current().size == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def wants_sync_batchnorm(setting: bool | None, world: World) -> bool:
    """Whether to train with synchronised BatchNorm: ``pretrain.sync_batchnorm``, default on with several workers."""
    return world.size > 1 and setting is not False


_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _SumOverWorkers(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: every worker's output depends on every worker's input, so the gradient
    of an input is the sum over workers of the output gradients, all_reduce(SUM) again."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):  # noqa: SLF001 - the base of every torch BatchNorm, SyncBatchNorm too
    """BatchNorm over the global batch for any device and backend (gloo on the CPU): what ``nn.SyncBatchNorm`` does
    on CUDA, in two all_reduces per layer (the sum, then the centred sum of squares, as a two-pass variance). In
    eval mode, or outside a process group of several workers, it is plain BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and current().size > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.tensor([xf.numel() / xf.shape[1]], dtype=torch.float32, device=x.device)
        total = _SumOverWorkers.apply(torch.cat([xf.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = xf - mean.view(shape)
        var = _SumOverWorkers.apply(centred.pow(2).sum(dims)) / n  # biased, as BatchNorm normalises
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
                tracked = float(self.num_batches_tracked) if self.num_batches_tracked is not None else 1.0
                m = self.momentum if self.momentum is not None else 1.0 / tracked
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def to_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm in ``module`` (in place, children of any depth) by one normalising over the global
    batch, sharing its parameters and buffers: ``nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` elsewhere.
    :func:`from_sync_batchnorm` undoes it. Returns ``module``."""
    kind = nn.SyncBatchNorm if device.type == "cuda" else GlobalBatchNorm
    for name, child in module.named_children():
        if type(child) in _BATCHNORMS:
            bn = cast(nn.BatchNorm2d, child)
            sync = kind(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
            _share_state(bn, sync)
            sync.__dict__["harness_batchnorm"] = type(bn)  # what from_sync_batchnorm restores
            module.add_module(name, sync)
        else:
            to_sync_batchnorm(child, device)
    return module


def from_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`to_sync_batchnorm` (evaluation runs on rank 0 alone, so no statistic may be synchronised)."""
    for name, child in module.named_children():
        original = child.__dict__.get("harness_batchnorm")
        if original is not None:
            bn = cast(nn.BatchNorm2d, child)
            plain = original(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
            _share_state(child, plain)
            module.add_module(name, plain)
        else:
            from_sync_batchnorm(child)
    return module


def _share_state(src: nn.Module, dst: nn.Module) -> None:
    dst.training = src.training
    for name, param in src.named_parameters(recurse=False):
        setattr(dst, name, param)  # the same Parameter objects: an optimiser built on either keeps working
    for name, buf in src.named_buffers(recurse=False):
        setattr(dst, name, buf)
