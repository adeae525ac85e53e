"""How a run is launched: one process, ``torchrun``'s workers, or Ray Train's. Light: no torch here.

    world = torchrun_world()        # None outside torchrun; (rank, world size, local rank) under it
    check_launch(cfg, world)        # BadInput for a config that cannot run this way, before anything starts

``torchrun --nproc-per-node W -m harness run CONFIG`` (and Slurm's ``srun`` with the same
variables set) runs W copies of ``run``; they meet through the ``env://`` rendezvous.
``run CONFIG distributed.workers=W`` outside torchrun starts W workers through Ray Train
(:mod:`harness.launch.raytrain`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from core.errors import BadInput
from harness.config.schema import RunConfig, check_batch_splits

__all__ = ["TORCHRUN_VARIABLES", "TorchrunWorld", "check_launch", "torchrun_world"]

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What the ``env://`` rendezvous reads; torchrun sets all of them."""


@dataclass(frozen=True)
class TorchrunWorld:
    rank: int
    size: int
    local_rank: int


def torchrun_world(environ: dict[str, str] | None = None) -> TorchrunWorld | None:
    """This process's place under torchrun (or anything setting its variables); None when none is set.

    Some but not all of :data:`TORCHRUN_VARIABLES` set, or values that are not ranks, is bad input naming them.
    """
    env = os.environ if environ is None else environ
    present = [v for v in TORCHRUN_VARIABLES if env.get(v)]
    if not present:
        return None
    missing = [v for v in TORCHRUN_VARIABLES if v not in present]
    if missing:
        raise BadInput(
            f"torchrun environment half set: {', '.join(present)} set but {', '.join(missing)} missing; "
            "launch with `torchrun --nproc-per-node W -m harness run CONFIG`, or unset them to run one process"
        )
    try:
        rank, size, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    except ValueError:
        raise BadInput(
            f"torchrun environment: RANK={env['RANK']!r}, WORLD_SIZE={env['WORLD_SIZE']!r}, "
            f"LOCAL_RANK={env['LOCAL_RANK']!r} must be integers"
        ) from None
    if not (size >= 1 and 0 <= rank < size and local >= 0):
        raise BadInput(
            f"torchrun environment: RANK={rank} must lie in [0, WORLD_SIZE={size}) and LOCAL_RANK={local} be >= 0"
        )
    return TorchrunWorld(rank, size, local)


def check_launch(cfg: RunConfig, world: TorchrunWorld | None) -> None:
    """Refuse what cannot run as launched: a ``distributed.workers`` that disagrees with torchrun's world size,
    a global batch that does not split over torchrun's workers, NCCL without CUDA (checked by the loop's device
    resolution, :func:`harness.train.distributed.backend_for`)."""
    if world is None:
        return
    workers, batch = cfg.distributed.workers, cfg.pretrain.batch_size
    if workers not in (1, world.size):
        raise BadInput(
            f"distributed.workers: {workers}, but torchrun started WORLD_SIZE={world.size} "
            "workers; leave distributed.workers unset under torchrun"
        )
    check_batch_splits(batch, world.size, "torchrun's WORLD_SIZE={} workers")
