"""Run a function in several gloo processes on the CPU and bring each rank's result back to the test.

    results = run_distributed(fn, tmp_path, world_size=2, args=(spec,))   # [rank 0's result, rank 1's result]

``fn(rank, world_size, *args)`` must be a module-level function (the processes are spawned) and
return something ``torch.save`` can write and ``torch.load(weights_only=True)`` can read (tensors,
numbers, strings, and dicts, lists and tuples of them). A rank that raises fails the test with its
traceback; a run that takes longer than ``timeout`` seconds is stopped and fails the test.
"""

from __future__ import annotations

import datetime
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _run_rank(rank: int, world_size: int, folder: str, fn: Callable[..., Any], args: Sequence[Any]) -> None:
    out = Path(folder)
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_distributed(fn: Callable[..., Any], tmp_path: Path, world_size: int = 2, args: Sequence[Any] = (), timeout: float = 120.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined in a gloo group; their results, by rank."""
    folder = Path(tmp_path) / "ddp"
    folder.mkdir(parents=True, exist_ok=False)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_run_rank, args=(r, world_size, str(folder), fn, tuple(args)), daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            break  # the others would wait for it in a collective until the group's timeout
        time.sleep(0.05)
    late = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in late:
        procs[r].terminate()
        procs[r].join(5)
    crashed = any(p.exitcode not in (None, 0) for p in procs)
    late = [] if crashed else late
    errors = [f"rank {r}:\n{(folder / f'rank{r}.err').read_text()}" for r in range(world_size) if (folder / f"rank{r}.err").exists()]
    if errors:
        raise AssertionError("a distributed worker raised\n" + "\n".join(errors))
    if late:
        raise AssertionError(f"ranks {late} did not finish within {timeout:g} s")
    failed = {r: p.exitcode for r, p in enumerate(procs) if p.exitcode != 0}
    if failed:
        raise AssertionError(f"distributed workers exited with codes {failed}")
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
