"""Running a sweep: the driver. One trial per point and seed, scheduled by Ray Tune, logged to MLflow parent and
child runs.

The driver opens the parent run and one child run per trial (status SCHEDULED) before any trial starts
(:mod:`harness.sweep.state`); each trial (:func:`harness.sweep.trial.train_trial`) logs into its child; the driver
sets each child's final status (FINISHED, FAILED, or KILLED when stopped early or interrupted), so no run is left
RUNNING and none is duplicated across retries or ``--resume``. The sweep comes from
:func:`harness.sweep.config.load_sweep`; its tables are :mod:`harness.tables`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import BadInput, RunFailed
from core.metrics import COLLAPSED_METRIC as COLLAPSED
from harness import signals
from harness.config.schema import RunConfig
from harness.launch import raytrain, raytune
from harness.sweep.config import Sweep, load_sweep
from harness.sweep.progress import Progress
from harness.sweep.state import (
    STATE_FILE,
    child_runs,
    child_tags,
    hold_name,
    latest_parent,
    load_state,
    new_state,
    trial_runs,
    write_json,
)
from harness.sweep.trial import FINISHED_KEY, train_trial, worker_folder
from harness.track.mlflow import Run, absolute_uri, create_run, open_run, tracking_uri

log = logging.getLogger(__name__)

DRIVER_CPUS = 0.1
"""What the Tune trial of a multi-worker trial holds itself: it only opens the run and fits the Ray Train job."""

__all__ = ["SweepOutcome", "child_runs", "latest_parent", "load_sweep", "run_sweep"]


@dataclass
class SweepOutcome:
    parent_run_id: str
    finished: list[str]
    failed: dict[str, str]
    stopped: list[str]
    interrupted: list[str]
    wall_s: float
    preempted: bool = False
    """Some trial's worker was sent SIGTERM (the driver itself may have received no signal)."""

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 128 + signal.SIGTERM if self.preempted and signals.received() is None else signals.exit_code()
        return 1 if self.failed else 0


def run_sweep(sweep: Sweep, *, resume: bool = False, verbose: int = 1, started: float | None = None) -> SweepOutcome:
    """Run (or resume) a validated sweep to the end; returns what became of each trial.

    MLflow's statuses are the truth on resumption: a trial whose child run is FINISHED is never run again (its
    trial returns at once, :func:`harness.sweep.trial.train_trial`) and its run is not touched. A stop signal
    (SIGINT, SIGTERM) stops Ray Tune gracefully; every unfinished run is then KILLED, tagged with the signal.
    ``started`` (``time.perf_counter()`` when the command started) is where the progress lines count from."""
    cfg = sweep.cfg
    uri = absolute_uri(tracking_uri(next(iter(sweep.configs.values())).tracking.uri))
    root = cfg.storage.resolve() / cfg.name
    state_path = root / STATE_FILE
    with hold_name(root, cfg.name):
        return _start(sweep, uri, root, state_path, resume, verbose, started)


def _start(
    sweep: Sweep, uri: str, root: Path, state_path: Path, resume: bool, verbose: int, started: float | None
) -> SweepOutcome:
    cfg = sweep.cfg
    if resume:
        state = load_state(state_path, sweep, uri)
    else:
        _check_preparable(sweep)
        address = raytune.cluster_address(cfg.address)
        if address:
            raytune.check_address(address)
    r = cfg.resources
    own_ray = raytune.init(cfg.address, min_cpus=math.ceil(r.workers * r.cpus + (DRIVER_CPUS if r.workers > 1 else 0)))
    try:
        signals.install()  # ray.init replaced the SIGTERM handler
        _check_cluster(uri, root)
        max_concurrent = _concurrency(cfg.max_concurrent, r.workers, r.cpus, r.gpus)
        if not resume:
            state = new_state(sweep, uri, root)
        return _run(sweep, state, uri, root, state_path, resume, verbose, max_concurrent, started)
    finally:
        if own_ray:
            raytune.shutdown()


def _check_cluster(uri: str, root: Path) -> None:
    """On a Ray cluster of several nodes, trials run on other machines: a SQLite store is a file on this one (its
    writers on other nodes would each write their own, or corrupt one on a network file system), so it is refused
    before any run; whether ``storage`` is shared cannot be known from here, so that is a warning."""
    nodes = raytune.node_count()
    if nodes < 2:
        return
    if uri.startswith("sqlite:"):
        raise BadInput(
            f"tracking.uri: {uri} is a SQLite file on this machine, but the Ray cluster has {nodes} nodes whose trials "
            "log to it; start `python -m harness server` on the head node and set tracking.uri: http://HEAD:5000"
        )
    log.warning(
        "storage: %s must be one folder every one of the cluster's %d nodes reaches (a shared file system): trials "
        "checkpoint there and resume from there on whichever node runs them",
        root.parent, nodes,
    )  # fmt: skip


def _concurrency(configured: int | None, workers: int, cpus: float, gpus: float) -> int | None:
    """At most as many concurrent trials as the cluster holds, for multi-worker trials: their workers' placement
    groups are not Tune's, so Tune alone would start trials whose workers then wait (or leave groups behind).
    A trial that cannot fit at all is bad input naming both numbers."""
    if workers == 1:
        return configured
    have_cpus, have_gpus = raytune.cluster_capacity()
    if workers * gpus > have_gpus:
        raise BadInput(
            f"resources: {workers} workers x {gpus:g} GPU need {workers * gpus:g} "
            f"GPUs per trial, the Ray cluster has {have_gpus:g}"
        )
    per_trial = workers * cpus + DRIVER_CPUS
    if per_trial > have_cpus:
        raise BadInput(
            f"resources: {workers} workers x {cpus:g} CPU (+{DRIVER_CPUS:g} for the trial's "
            f"driver) need {per_trial:g} CPUs per trial, the Ray cluster has {have_cpus:g}"
        )
    fits = int(have_cpus // per_trial)
    if gpus:
        fits = min(fits, int(have_gpus // (workers * gpus)))
    return min(configured, fits) if configured else fits


def _run(
    sweep: Sweep,
    state: dict[str, Any],
    uri: str,
    root: Path,
    state_path: Path,
    resume: bool,
    verbose: int,
    max_concurrent: int | None,
    started: float | None = None,
) -> SweepOutcome:
    cfg = sweep.cfg
    parent = open_run(state["parent_run_id"], uri)
    parent.set_status("RUNNING")
    # Each trial opens its child run when it starts (harness.sweep.trial.open_trial_run); the driver finds them by key.
    children: dict[str, Run] = {}

    def child(key: str) -> Run | None:
        if key not in children:
            found = trial_runs(cfg.name, parent.run_id, uri)
            children.update({k: open_run(run_id, uri) for k, run_id in found.items() if k not in children})
            state["trials"] = {k: c.run_id for k, c in children.items()}
        return children.get(key)

    child(sweep.keys[0])  # the runs opened before a resume
    todo = [k for k in sweep.keys if k not in children or children[k].info()["status"] != "FINISHED"]
    for key in todo:
        if key in children:  # interrupted before: waits again
            children[key].set_status("SCHEDULED")
    specs: dict[str, dict[str, Any]] = {
        trial.key: {
            "run": _trial_run_dict(sweep.configs[trial.key]), "uri": uri, "experiment": cfg.name,
            "parent_run_id": parent.run_id, "tags": child_tags(sweep, trial), "cpus": cfg.resources.cpus,
            "workers": {"gpus": cfg.resources.gpus, "max_failures": cfg.max_failures, "storage": str(root / "workers")},
        }
        for trial in sweep.trials
    }  # fmt: skip

    def recorded(key: str) -> Run:
        """The trial's run, opened here when the trial failed before it could open one (its error is kept)."""
        run = child(key)
        if run is None:
            spec = specs[key]
            run = children[key] = create_run(
                cfg.name, run_name=key, tags=spec["tags"], uri=uri, parent_run_id=parent.run_id
            )
        return run

    stopped: list[str] = []
    preempted: list[str] = []
    pending = set(todo)  # trials whose end the driver has yet to record

    def latest(key: str) -> tuple[int, float, float | None] | None:
        run = child(key)
        losses = run.history("train/loss") if run is not None else []
        if run is None or not losses:
            return None
        knn = run.history("online/knn_top1")
        return losses[-1][0], losses[-1][1], knn[-1][1] if knn else None

    trial_epochs = {key: c.pretrain.epochs for key, c in sweep.configs.items()}
    progress = Progress(len(sweep.keys), trial_epochs, latest, started if started is not None else time.perf_counter())
    progress.done = len(sweep.keys) - len(todo)

    def say(key: str, what: str) -> None:
        if verbose:
            progress.line(f"[{progress.done}/{len(sweep.keys)} {progress.elapsed():5.0f} s] {key}: {what}")

    def on_start(key: str) -> None:
        if key in pending:
            if (run := child(key)) is not None:  # a retried or resumed trial; a new one opens its run as it starts
                run.set_status("RUNNING")
            progress.start_trial(key)
            say(key, "started")

    def release_workers(key: str) -> None:
        """A multi-worker trial that ended while its Ray Train job ran (stopped by ASHA) leaves the job's placement
        group behind; remove it so that the next trials get the resources."""
        if cfg.resources.workers > 1 and (run := child(key)) is not None:
            group = worker_folder(root / "workers", run.run_id) / raytrain.PLACEMENT_GROUP_FILE
            if group.is_file():
                raytrain.remove_placement_group(group.read_text().strip())

    def on_complete(key: str, result: dict[str, Any]) -> None:
        release_workers(key)
        if key not in pending:  # finished before (a resumed sweep): its run stays as it is
            return
        pending.discard(key)
        progress.end_trial(key)
        run = recorded(key)
        if result.get(FINISHED_KEY):
            run.end("FINISHED")
            if result.get(COLLAPSED, 0.0) >= 0.5:  # its numbers are not a result
                say(key, "finished  COLLAPSED (final loss at the collapse value, or embeddings near constant)")
            else:
                say(key, "finished  " + "  ".join(f"{m} {result[m]:.4f}" for m in cfg.headline if m in result))
        else:
            stopped.append(key)
            run.set_tags({"harness.stopped": f"stopped early by the scheduler after epoch {result.get('epoch', '?')}"})
            run.end("KILLED")
            say(key, f"stopped early by the scheduler after epoch {result.get('epoch', '?')}")

    def on_error(key: str, error: str) -> None:
        release_workers(key)
        if key not in pending:
            return
        if raytune.stopped_by_sigterm(error):  # its worker was preempted: KILLED and resumable, not FAILED
            preempted.append(key)
            say(key, "stopped: its worker received SIGTERM; continue the sweep with --resume")
            return
        pending.discard(key)
        progress.end_trial(key)
        run = recorded(key)
        run.set_tags({"harness.error": error[:5000]})
        run.end("FAILED")
        say(key, f"FAILED: {error}")

    def on_recover(key: str, error: str) -> None:
        if (run := child(key)) is not None:
            run.set_tags({"harness.last_retry_error": error[:5000]})
            run.set_status("SCHEDULED")
        say(key, f"retrying after: {error}")

    events = raytune.TrialEvents(on_start=on_start, on_recover=on_recover, on_complete=on_complete, on_error=on_error)
    epochs = max(c.pretrain.epochs for c in sweep.configs.values())
    scheduler = cfg.scheduler.model_dump() | {"max_t": epochs + 1}  # +1: the evaluation's report after the last epoch
    r = cfg.resources
    # A multi-worker trial is a Tune "driver" holding DRIVER_CPUS; its workers' resources are Ray Train's, and a failed
    # worker group is restarted by Ray Train (from the trial's checkpoint), not by Tune.
    trial_cpus, trial_gpus = (r.cpus, r.gpus) if r.workers == 1 else (DRIVER_CPUS, 0.0)
    try:
        with progress if verbose else contextlib.nullcontext():
            outcome = raytune.run_trials(
                train_trial, sweep.keys, name=state["tune_name"], storage=root, cpus=trial_cpus, gpus=trial_gpus,
                max_concurrent=max_concurrent, scheduler=scheduler, events=events, resume=resume, specs=specs,
                max_failures=cfg.max_failures if r.workers == 1 else 0, reuse_actors=r.workers == 1,
            )  # fmt: skip
    except Exception as err:  # Tune itself failed: no trial may stay SCHEDULED or RUNNING
        for key in todo:
            if (run := child(key)) is not None and run.info()["status"] not in ("FINISHED", "FAILED", "KILLED"):
                run.set_tags({"harness.error": f"sweep failed: {err}"[:5000]})
                run.end("FAILED")
        parent.set_tags({"harness.error": str(err)[:5000]})
        parent.end("FAILED")
        raise RunFailed(f"sweep {cfg.name!r} failed: {raytune.one_line(err)}") from err
    except KeyboardInterrupt:  # a stop signal outside Tune's own handling: nothing may stay RUNNING
        for key in pending:
            if (run := child(key)) is not None:
                run.set_tags({"harness.stopped": f"{signals.stop_reason()}: sweep interrupted; resume with --resume"})
                run.end("KILLED")
        parent.set_tags({"harness.stopped": signals.stop_reason()})
        parent.end("KILLED")
        raise

    finished = [k for k in todo if k in outcome.results and outcome.results[k].get(FINISHED_KEY)]
    finished += [k for k in sweep.keys if k not in todo]
    failed = {k: outcome.errors[k] for k in sweep.keys if k in outcome.errors and k not in preempted}
    interrupted = [k for k in todo if k not in finished and k not in failed and k not in stopped]
    for key in interrupted:  # never started, or cut off by a stop signal: resumable
        if key in pending:
            pending.discard(key)
            reason = (
                "SIGTERM to the trial's worker" if key in preempted else f"{signals.stop_reason()}: sweep interrupted"
            )
            if (run := child(key)) is not None:  # a trial that never started has no run
                run.set_tags({"harness.stopped": f"{reason}; resume with --resume"})
                run.end("KILLED")
    for key, error in failed.items():  # the callback may not have run for a trial whose error surfaced at the end
        on_error(key, error)
    parent.log_metrics(
        {"sweep/trials_finished": len(finished), "sweep/trials_failed": len(failed), "sweep/wall_s": outcome.wall_s}
    )
    if interrupted:
        parent.set_tags(
            {"harness.stopped": "SIGTERM" if preempted and signals.received() is None else signals.stop_reason()}
        )
    parent.end("KILLED" if interrupted else ("FAILED" if failed else "FINISHED"))
    state["complete"] = not interrupted
    state["trials"] = trial_runs(cfg.name, parent.run_id, uri)
    write_json(state_path, state)
    return SweepOutcome(state["parent_run_id"], finished, failed, stopped, interrupted, outcome.wall_s, bool(preempted))


def _check_preparable(sweep: Sweep) -> None:
    """Build data and model once per distinct (data, backbone, method) so a missing dataset or an unknown
    backbone is bad input before Ray starts, not a failure in every trial."""
    from harness.trial.prepare import prepare  # data and models: torch and timm, imported once a sweep runs

    seen: set[str] = set()
    for cfg in sweep.configs.values():
        sig = json.dumps(
            [
                cfg.data.model_dump(mode="json"),
                cfg.backbone.model_dump(mode="json"),
                cfg.method["name"],
                cfg.pretrain.batch_size,
            ]
        )
        if sig not in seen:
            seen.add(sig)
            prepare(cfg)


def _trial_run_dict(cfg: RunConfig) -> dict[str, Any]:
    d = cfg.as_dict()
    if d["data"].get("root"):
        d["data"]["root"] = str(Path(d["data"]["root"]).resolve())
    return d
