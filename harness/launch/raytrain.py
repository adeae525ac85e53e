"""Ray Train behind one small module: the rest of the harness never imports ``ray.train``.

A multi-worker trial is a ``TorchTrainer`` fitted (:func:`fit`) from the process that owns the trial's MLflow run:
``harness run ... distributed.workers=W`` on a local Ray, or a sweep's Tune trial (Ray's "train driver" pattern: a
Tune function that builds and fits a ``TorchTrainer``; a trainer is never passed to ``Tuner``).

Facts this module relies on (Ray 2.60, Train V2): every worker must call :func:`report` the same number of times (it
is a barrier); ``TuneReportCallback`` forwards rank 0's metrics as one Tune result per report; a failed worker group
raises ``TrainingFailedError`` (``WorkerGroupError`` holds each failed rank's exception); with ``max_failures`` the
whole group restarts and calls the worker function again (it resumes from its own checkpoint).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.errors import WorkerFailed
from harness import signals

PLACEMENT_GROUP_FILE = "placement_group"
"""Written by rank 0 next to a multi-worker trial's checkpoint: the id of its workers' placement group."""

__all__ = [
    "PLACEMENT_GROUP_FILE",
    "WorkerFailed",
    "current_node",
    "current_placement_group",
    "describe_failure",
    "fit",
    "quiet_train_worker",
    "remove_placement_group",
    "report",
]

log = logging.getLogger(__name__)


def fit(
    worker_fn: Callable[[dict[str, Any]], None],
    job: dict[str, Any],
    *,
    workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    backend: str,
    name: str,
    storage: Path,
    max_failures: int,
    in_tune: bool,
) -> None:
    """Run ``worker_fn(job)`` on ``workers`` Ray Train workers in one process group; raises :class:`WorkerFailed`."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    resources = {"CPU": cpus_per_worker} | ({"GPU": gpus_per_worker} if gpus_per_worker else {})
    callbacks: list[Any] = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config=job,
        torch_config=TorchConfig(backend=backend, timeout_s=3600),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(  # type: ignore[call-arg]  # Train V2 RunConfig at run time, V1 in the stubs
            name=name,
            storage_path=str(storage.resolve()),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise WorkerFailed(describe_failure(err)) from None
    except SystemExit as stop:
        # In the main thread Ray Train handles SIGINT (and SIGTERM, routed to it by harness.signals) by aborting
        # the job gracefully, workers and placement group included; the pending wait then ends in SystemExit.
        if signals.received() is None:
            raise
        raise KeyboardInterrupt from stop


def describe_failure(err: BaseException) -> str:
    """One line naming the failed rank and its error. A rank whose peer died usually fails too, with a
    communication error: the first rank whose own error is something else is the one named."""
    failures: dict[int, BaseException] = dict(getattr(err, "worker_failures", None) or {})
    if not failures:
        return _last_line(err)
    lines = {rank: _last_line(e) for rank, e in sorted(failures.items())}
    own = [r for r, line in lines.items() if not _is_peer_failure(line)]
    rank = own[0] if own else min(lines)
    more = f" ({len(lines) - 1} other rank(s) failed with it)" if len(lines) > 1 else ""
    return f"rank {rank}: {lines[rank]}{more}"


def _is_peer_failure(line: str) -> bool:
    return any(
        s in line for s in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL", "timed out")
    )


def _last_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    kind = type(err).__name__
    if lost := re.search(r"its node has died\. Node Id: ([0-9a-f]+)", str(err)):  # a node lost (preempted, crashed)
        return f"its node {lost[1][:12]} was lost ({kind}: {text})"
    if "ActorDied" in kind or "died" in text.lower():
        return f"worker process died ({kind}): {text}" if text else f"worker process died ({kind})"
    return text if text.startswith(kind) or not text else f"{kind}: {text}"


def quiet_train_worker() -> None:
    """In a Ray Train worker: Ray Train logs every report at INFO under a logger named by its file's path, which
    ``LoggingConfig`` does not reach; keep it to warnings."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def report(metrics: dict[str, float]) -> None:
    """From every worker, the same number of times: rank 0's metrics become one Tune result (in a Tune trial)."""
    import ray.train

    ray.train.report(dict(metrics))


def current_node() -> str:
    """In a worker: the first 12 hex digits of its Ray node's id (several nodes may share a host name)."""
    import ray

    return ray.get_runtime_context().get_node_id()[:12]


def current_placement_group() -> str | None:
    """In a worker: the id (hex) of the placement group holding the job's workers."""
    from ray.util import get_current_placement_group

    group = get_current_placement_group()
    return group.id.hex() if group is not None else None


def remove_placement_group(group_id: str) -> bool:
    """Remove a job's placement group (ending any worker still in it), unless it is gone already; True if removed.

    A Tune trial stopped by a scheduler is ended with its process; the Ray Train job it was fitting then leaves
    its workers' placement group behind (Ray Train's own cleaner needs the dashboard's state API, which a local
    instance does not run), holding the resources the next trials wait for. The sweep removes it.
    """
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table
    from ray.util.placement_group import remove_placement_group as remove

    group = PlacementGroup(PlacementGroupID(bytes.fromhex(group_id)))
    if placement_group_table(group).get("state") in (None, "REMOVED"):
        return False
    remove(group)
    log.debug("removed the placement group %s of an ended trial", group_id)
    return True
