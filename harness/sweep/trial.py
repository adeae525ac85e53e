"""The trial side of a sweep: the function Ray Tune runs in a worker for each trial.

It runs exactly what ``harness run`` runs (:func:`harness.trial.prepare.prepare`,
:func:`harness.trial.run.execute`), logging into its child run of the sweep (opened when the trial first starts,
found again by its key when it is retried or resumed), and reports through :mod:`harness.launch.raytune`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from harness.config.loading import build_config
from harness.config.schema import RunConfig
from harness.launch import raytune
from harness.sweep.state import trial_runs
from harness.track.mlflow import Run, create_run, open_run
from harness.track.provenance import reset_peak_rss

__all__ = ["FINISHED_KEY", "open_trial_run", "train_trial"]

FINISHED_KEY = "trial/finished"
"""Reported (value 1) by a trial after its evaluation: a trial that ends without it was stopped early."""


def train_trial(config: dict[str, Any], specs: dict[str, dict[str, Any]]) -> None:
    """One Tune trial: exactly what ``harness run`` does, logging into the trial's child run (:func:`open_trial_run`).

    Reports ``train/*`` every epoch with the epoch's checkpoint (so a retried or
    resumed trial continues from it) and, after the evaluation, the final metrics
    with :data:`FINISHED_KEY`. When a scheduler stops the trial, the report raises
    ``SystemExit`` and nothing after the training loop runs; the driver marks it.
    A trial whose child run is FINISHED already (Tune had not recorded it before the
    driver was stopped) reports that run's metrics and returns: it never runs twice.
    """
    import torch

    from harness.trial.prepare import prepare
    from harness.trial.run import execute

    logging.getLogger("ray").setLevel(logging.WARNING)
    key = raytune.trial_key(config)
    spec = specs[key]
    torch.set_num_threads(max(1, int(spec["cpus"])))
    cfg = build_config(spec["run"])
    mlrun = open_trial_run(key, spec, cfg)
    info = mlrun.info()
    if info["status"] == "FINISHED":
        raytune.report({**info["metrics"], "epoch": cfg.pretrain.epochs, FINISHED_KEY: 1})
        return
    if cfg.distributed.workers > 1:
        _fit_workers(cfg, mlrun, spec)
        return
    # Working files live outside the trial folder: Ray syncs that folder to storage in the background.
    work = Path(tempfile.mkdtemp(prefix="harness-trial-"))
    try:
        restored = raytune.restored_checkpoint(work / "restored")
        cfg.pretrain.checkpoint_dir = work / "checkpoint"
        cfg.pretrain.progress = False
        if restored is not None:
            cfg.pretrain.resume = restored / "checkpoint.pt"
        mlrun.set_status("RUNNING")
        if restored is not None:
            mlrun.set_tags({"harness.resumed": "from the trial's last checkpoint"})

        last: dict[str, float] = {}

        def on_epoch_end(epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
            last.update(metrics)
            raytune.report({**metrics, "epoch": epoch}, checkpoint_dir=checkpoint.parent if checkpoint else None)

        measured = reset_peak_rss()  # a reused worker process: this trial's peak, not the largest trial's before it
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        mlrun.set_tags({"memory.peak_rss_of": measured})
        trial = prepare(cfg)
        metrics = execute(trial, mlrun, on_epoch_end=on_epoch_end)
        # the last epoch's online metrics again, so a scheduler finds its metric in the final report too
        raytune.report({**last, **metrics, "epoch": cfg.pretrain.epochs, FINISHED_KEY: 1})
    finally:
        shutil.rmtree(work, ignore_errors=True)  # Tune keeps its own copy of the last checkpoint


def open_trial_run(key: str, spec: dict[str, Any], cfg: RunConfig) -> Run:
    """The trial's child run under the sweep's parent: the one it opened before (a retry, ``--resume``), else a new
    one, started now, with the trial's tags and its config's params. Only this trial opens runs under its key."""
    from harness.trial.run import log_run_inputs

    found = trial_runs(spec["experiment"], spec["parent_run_id"], spec["uri"]).get(key)
    if found is not None:
        return open_run(found, spec["uri"])
    mlrun = create_run(
        spec["experiment"], run_name=key, tags=spec["tags"], uri=spec["uri"], parent_run_id=spec["parent_run_id"]
    )
    log_run_inputs(mlrun, cfg)
    return mlrun


def worker_folder(storage: Path, run_id: str) -> Path:
    """Where a multi-worker trial keeps its checkpoint and Ray Train state (under the sweep's storage)."""
    return storage / run_id


def _fit_workers(cfg: RunConfig, mlrun: Run, spec: dict[str, Any]) -> None:
    """A trial of ``resources.workers`` > 1: a Ray Train job fitted from this Tune trial, rank 0 logging into the child
    run. Its checkpoint sits in the sweep's storage under the child run's id, so a retried or resumed trial (or a
    restarted worker group) continues from it."""
    import torch

    from harness.launch.workers import fit_workers
    from harness.train import distributed

    workers = spec["workers"]
    storage = Path(workers["storage"])
    checkpoint = worker_folder(storage, mlrun.run_id) / "checkpoint.pt"
    gpus = float(workers["gpus"])
    backend = distributed.backend_for(
        cfg.distributed.backend, torch.device("cuda" if gpus > 0 else "cpu")
    )  # nccl without GPUs: refused in harness.sweep.config
    cfg.pretrain.progress = False
    mlrun.set_status("RUNNING")
    if checkpoint.is_file():
        mlrun.set_tags({"harness.resumed": "from the trial's last checkpoint"})
    fit_workers(
        cfg, mlrun, checkpoint, uri=spec["uri"], name=f"trial-{mlrun.run_id}",
        storage=worker_folder(storage, mlrun.run_id) / "ray", max_failures=int(workers["max_failures"]),
        gpus_per_worker=gpus, backend=backend, in_tune=True, final={FINISHED_KEY: 1},
    )  # fmt: skip
