"""Multi-worker runs: ``run`` over W workers through Ray Train, under ``torchrun``, and a sweep's multi-worker trial.

    metrics = run_workers(cfg)                  # harness run CONFIG distributed.workers=W (Ray Train, local Ray)
    metrics = run_torchrun(cfg, world)          # torchrun --nproc-per-node W -m harness run CONFIG
    fit_workers(cfg, mlrun, checkpoint, ...)    # a sweep's trial with resources.workers > 1 (inside its Tune trial)

Every worker runs :func:`harness.trial.prepare.prepare` and the one loop (:func:`harness.train.loop.pretrain`,
where each takes its slice of the global batch). Rank 0 alone logs into the MLflow run (one run per
trial, opened by the process that launched the workers), writes the checkpoint and runs the
evaluation battery (:func:`harness.trial.run.execute`); the other ranks train and return. After a restart
(Ray Train's ``max_failures``, a sweep's retry or ``--resume``) every worker continues from the
run's last checkpoint, whatever the number of workers; epochs logged before are not logged again.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch

from core.errors import BadInput, Interrupted
from harness import signals
from harness.config.loading import build_config
from harness.config.schema import RunConfig
from harness.launch import raytrain, raytune
from harness.launch.torchrun import TorchrunWorld
from harness.track.mlflow import Run, absolute_uri, open_run, start_run, tracking_uri
from harness.train import distributed
from harness.train.loop import pretrain
from harness.trial.prepare import prepare
from harness.trial.run import default_run_name, execute, run, run_tags, run_to_resume

__all__ = ["fit_workers", "run_torchrun", "run_workers", "worker_main"]

log = logging.getLogger(__name__)


def run_workers(cfg: RunConfig, *, parent_run_id: str | None = None) -> dict[str, float]:
    """``run`` with ``distributed.workers`` > 1: W workers on the local Ray (or ``RAY_ADDRESS``'s cluster), one
    MLflow run opened here; returns its final metrics. A failed worker fails the run, its rank in ``harness.error``."""
    trial = prepare(cfg)  # bad input (data, names, the method's checks) before Ray starts
    d = cfg.distributed
    backend = distributed.backend_for(d.backend, trial.device)
    gpus = 1.0 if trial.device.type == "cuda" else 0.0
    if gpus and not raytune.cluster_address(None) and d.workers > torch.cuda.device_count():
        raise BadInput(
            f"distributed.workers: {d.workers} workers x 1 GPU need "
            f"{d.workers} GPUs, this machine has {torch.cuda.device_count()}"
        )
    started = raytune.init(None, min_cpus=math.ceil(d.workers * d.cpus))
    signals.install()  # ray.init replaced the SIGTERM handler: a stop signal ends the run KILLED, resumable
    try:
        check_capacity(d.workers, d.cpus, gpus)
        with start_run(
            cfg.tracking.experiment,
            run_name=default_run_name(cfg),
            tags=run_tags(cfg),
            uri=cfg.tracking.uri,
            parent_run_id=parent_run_id,
            resume=run_to_resume(cfg),
        ) as mlrun:
            base = Path(
                cfg.pretrain.checkpoint_dir or Path("outputs") / cfg.tracking.experiment / mlrun.run_id
            ).resolve()
            if cfg.pretrain.resume is not None and not (base / "checkpoint.pt").is_file():
                base.mkdir(parents=True, exist_ok=True)  # --resume: the workers continue from the given checkpoint
                shutil.copyfile(cfg.pretrain.resume, base / "checkpoint.pt")
            checkpoint = base / "checkpoint.pt"
            uri = absolute_uri(tracking_uri(cfg.tracking.uri))
            try:
                fit_workers(
                    cfg,
                    mlrun,
                    checkpoint,
                    uri=uri,
                    name=f"run-{mlrun.run_id}",
                    storage=base / "ray",
                    max_failures=d.max_failures,
                    gpus_per_worker=gpus,
                    backend=backend,
                )
            except KeyboardInterrupt as stop:  # the run ends KILLED, resumable from its last checkpoint
                raise Interrupted(checkpoint if checkpoint.is_file() else None) from stop
            return dict(mlrun.info()["metrics"])
    finally:
        if started:
            raytune.shutdown()


def check_capacity(workers: int, cpus: float, gpus: float) -> None:
    """A trial of ``workers`` x (cpus, gpus) must fit the Ray cluster: BadInput naming both numbers otherwise."""
    have_cpus, have_gpus = raytune.cluster_capacity()
    if workers * gpus > have_gpus:
        raise BadInput(
            f"distributed.workers: {workers} workers x {gpus:g} GPU need "
            f"{workers * gpus:g} GPUs, the Ray cluster has {have_gpus:g}"
        )
    if workers * cpus > have_cpus:
        raise BadInput(
            f"distributed.workers: {workers} workers x {cpus:g} CPU need "
            f"{workers * cpus:g} CPUs, the Ray cluster has {have_cpus:g}"
        )


def fit_workers(
    cfg: RunConfig,
    mlrun: Run,
    checkpoint: Path,
    *,
    uri: str,
    name: str,
    storage: Path,
    max_failures: int,
    gpus_per_worker: float,
    backend: str,
    in_tune: bool = False,
    final: dict[str, float] | None = None,
) -> None:
    """Run the trial on ``cfg.distributed.workers`` Ray Train workers, rank 0 logging into ``mlrun``.

    ``uri`` is the run's tracking URI, absolute (the workers' working directory is not this process's).
    ``checkpoint`` (an absolute path every worker can read: shared storage on a cluster) is where rank 0 writes the
    per-epoch checkpoint and where every worker resumes from after a restart. In a Tune trial (``in_tune``) every
    epoch's metrics reach Tune, and after the evaluation the final metrics merged with ``final``.
    """
    run_dict = cfg.as_dict()
    if run_dict["data"].get("root"):
        run_dict["data"]["root"] = str(Path(run_dict["data"]["root"]).resolve())
    run_dict["pretrain"]["resume"] = None
    job = {
        "run": run_dict,
        "run_id": mlrun.run_id,
        "uri": uri,
        "checkpoint": str(checkpoint),
        "cpus": cfg.distributed.cpus,
        "in_tune": in_tune,
        "final": dict(final or {}),
        "log_level": logging.getLogger("harness").getEffectiveLevel(),
    }
    raytrain.fit(
        worker_main, job, workers=cfg.distributed.workers, cpus_per_worker=cfg.distributed.cpus,
        gpus_per_worker=gpus_per_worker, backend=backend, name=name, storage=storage, max_failures=max_failures,
        in_tune=in_tune,
    )  # fmt: skip


def worker_main(job: dict[str, Any]) -> None:
    """One Ray Train worker (the process group is set up): the trial, resumed from the checkpoint when there is one."""
    import torch

    torch.set_num_threads(max(1, int(job["cpus"])))
    raytrain.quiet_train_worker()
    world = distributed.current()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for logger in ("harness", "methods", "evaluations"):
        logging.getLogger(logger).setLevel(job["log_level"] if world.is_main else logging.WARNING)
    cfg = build_config(job["run"])
    checkpoint = Path(job["checkpoint"])
    cfg.pretrain.checkpoint_dir = checkpoint.parent
    cfg.pretrain.progress = False
    restarted = checkpoint.is_file()
    if restarted:
        cfg.pretrain.resume = checkpoint
    trial = prepare(cfg)
    where = distributed.all_gather_object((socket.gethostname(), os.getpid(), raytrain.current_node()))
    tune = job["in_tune"]
    last: dict[str, float] = {}

    def on_epoch_end(epoch: int, metrics: dict[str, float], path: Path | None) -> None:
        last.update(metrics)
        raytrain.report({**metrics, "epoch": epoch})

    if world.is_main:
        group = raytrain.current_placement_group()
        if group is not None:  # for the sweep, which removes it if the trial is stopped while the job runs
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            (checkpoint.parent / raytrain.PLACEMENT_GROUP_FILE).write_text(group)
        mlrun = open_run(job["run_id"], job["uri"])
        ranks = [f"rank {r}: pid {pid} on {host} (node {node})" for r, (host, pid, node) in enumerate(where)]
        mlrun.set_tags({"harness.workers": ", ".join(ranks)})
        if restarted:
            mlrun.set_tags({"harness.resumed": f"from {checkpoint} after a restart ({world.size} workers)"})
        metrics = execute(trial, mlrun, on_epoch_end=on_epoch_end if tune else None)
        if tune:
            raytrain.report({**last, **metrics, "epoch": cfg.pretrain.epochs, **job["final"]})
    else:
        pretrain(
            trial.method,
            trial.data.train.images,
            cfg,
            trial.augmenter,
            trial.device,
            on_epoch_end=on_epoch_end if tune else None,
        )
        if tune:
            raytrain.report({})  # every worker reports as often as rank 0; only rank 0's metrics reach Tune


def run_torchrun(cfg: RunConfig, world: TorchrunWorld) -> dict[str, float]:
    """This process's part of a torchrun launch: rank 0 runs :func:`harness.trial.run.run` (one MLflow run), the others
    train with it. Returns rank 0's metrics ({} on the other ranks)."""
    w = distributed.World(world.rank, world.size, world.local_rank)
    device = distributed.device_for(cfg.device, w)
    backend = distributed.backend_for(cfg.distributed.backend, device)
    cfg.distributed.workers = world.size
    if not w.is_main:
        os.environ.setdefault("TQDM_DISABLE", "1")
        for logger in ("harness", "methods", "evaluations"):
            logging.getLogger(logger).setLevel(logging.WARNING)
    distributed.init_from_env(backend, device)
    distributed.record_peers()  # to name a worker that dies (kill -9, out of memory) in the run's harness.error
    try:
        if w.is_main:
            return run(cfg)
        trial = prepare(cfg)
        pretrain(trial.method, trial.data.train.images, cfg, trial.augmenter, trial.device)
        return {}
    finally:
        distributed.shutdown()
