"""Data-parallel pretraining on this machine: 1 worker x T threads against T workers x 1 thread, and what a
multi-worker trial costs to start on Ray Train.

Both layouts train the same global batch with the real loop (``harness.train.loop.pretrain``: the
workers join a gloo group and each takes its slice of every step, gathering, synchronised
BatchNorm and gradient averaging included); images/s counts the global batch per step, timed
after the warm-up steps. The start-up cost is the wall time of fitting a Ray Train job of 2
workers whose function returns at once, on an already running local Ray (the part every
multi-worker trial pays on top of its training), next to the local Ray's own start.

    python benchmarks/data_parallel.py                 # resnet18 (CIFAR stem), 32 px, batch 256, SimCLR
    python benchmarks/data_parallel.py --tiny          # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pretrain_throughput import harness_images_per_s  # the same timed loop, here run in each worker


def _train(
    rank: int, world: int, threads: int, overrides: list[str], steps: int, warmup: int, batch: int, folder: str
) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{folder}/rendezvous",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=300),
        )
    speed = harness_images_per_s(
        overrides, steps, warmup, batch
    )  # global batch per step: every rank times the same steps
    if rank == 0:
        Path(folder, "images_per_s").write_text(str(speed))
    if world > 1:
        dist.destroy_process_group()


def images_per_s(workers: int, threads: int, overrides: list[str], steps: int, warmup: int, batch: int) -> float:
    """Global-batch images/s of ``workers`` processes of ``threads`` threads each."""
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_train, args=(r, workers, threads, overrides, steps, warmup, batch, folder))
            for r in range(workers)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise SystemExit(f"a worker failed: exit codes {[p.exitcode for p in procs]}")
        return float(Path(folder, "images_per_s").read_text())


def _empty_worker(config: dict[str, Any]) -> None:
    return None


def ray_train_startup_s(workers: int) -> tuple[float, float]:
    """(local Ray start, fitting an empty ``workers``-worker Ray Train job on it), in seconds."""
    from harness.launch import raytrain, raytune

    t0 = time.perf_counter()
    started = raytune.init(None, min_cpus=workers)
    ray_s = time.perf_counter() - t0
    try:
        with tempfile.TemporaryDirectory() as storage:
            t0 = time.perf_counter()
            raytrain.fit(
                _empty_worker,
                {},
                workers=workers,
                cpus_per_worker=1,
                gpus_per_worker=0,
                backend="gloo",
                name="startup",
                storage=Path(storage),
                max_failures=0,
                in_tune=False,
            )
            return ray_s, time.perf_counter() - t0
    finally:
        if started:
            raytune.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="T: 1 worker x T threads against T workers x 1 thread")
    parser.add_argument(
        "--tiny", action="store_true", help="resnet10t, 16 px, batch 32, 3 steps: checks the script, measures nothing"
    )
    args = parser.parse_args()
    if args.tiny:
        args.backbone, args.image_size, args.batch_size, args.steps, args.warmup = "resnet10t", 16, 32, 3, 1
    overrides = [
        f"backbone.name={args.backbone}",
        f"backbone.cifar_stem={str(args.backbone in ('resnet18', 'resnet34', 'resnet50')).lower()}",  # 32 px ResNets
        f"data.image_size={args.image_size}",
        "data.num_test=16",
        f"pretrain.batch_size={args.batch_size}",
        "device=cpu",
        "eval.semi.enabled=false",
    ]
    t = args.threads
    print(
        f"SimCLR, {args.backbone}, {args.image_size} px, global batch {args.batch_size}, "
        f"{args.steps} timed steps after {args.warmup}, {os.cpu_count()} cores"
    )
    one = images_per_s(1, t, overrides, args.steps, args.warmup, args.batch_size)
    print(f"1 worker x {t} threads:  {one:8.1f} img/s")
    many = images_per_s(t, 1, overrides, args.steps, args.warmup, args.batch_size)
    print(f"{t} workers x 1 thread:  {many:8.1f} img/s")
    print(f"ratio {t} workers / 1 worker: {many / one:.2f}")
    ray_s, fit_s = ray_train_startup_s(2)
    print(
        "Ray Train start-up, 2 workers (empty job on a running local "
        f"Ray): {fit_s:.1f} s  (starting the local Ray: {ray_s:.1f} s)"
    )


if __name__ == "__main__":
    main()
