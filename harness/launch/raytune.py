"""Ray Tune behind one small module: the rest of the harness never imports ray.

The driver side (:func:`run_trials`) starts or joins Ray, runs one Tune trial per trial key and tells a
:class:`TrialEvents` what happened to each trial; the trial side (:func:`report`, :func:`restored_checkpoint`) is
what a trainable calls.

Facts this module relies on (Ray 2.60): every :func:`report` is one ``training_iteration``; when a scheduler stops a
trial, the current :func:`report` raises ``SystemExit`` inside the trial, so code after the training loop does not
run there; ``Tuner.fit`` does not raise when trials fail.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import BadInput
from harness.launch import reaper

log = logging.getLogger(__name__)

_TRIAL_KEY = "trial"
"""The single entry of Tune's param space: the harness's trial key, one grid value per trial."""


@dataclass
class TrialEvents:
    """Driver-side hooks, called with the harness's trial key as trials start, recover, end."""

    on_start: Callable[[str], None] = lambda key: None
    on_recover: Callable[[str, str], None] = lambda key, error: None
    on_complete: Callable[[str, dict[str, Any]], None] = lambda key, result: None
    on_error: Callable[[str, str], None] = lambda key, error: None


@dataclass
class Outcome:
    """What became of each trial: its last reported metrics, or its error, or neither (never ran or interrupted)."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0

    def unfinished(self, keys: list[str]) -> list[str]:
        return [k for k in keys if k not in self.results and k not in self.errors]


# ----------------------------------------------------------------------------- driver side


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a Ray address that does not answer (BadInput naming it), before anything starts."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise BadInput(f"address: {address!r} is not a Ray address; expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise BadInput(
            f"address: Ray cluster at {address!r} does not answer ({err.strerror or err}); "
            "start one with `ray start --head` or leave address unset for a local instance"
        ) from None


def cluster_address(configured: str | None) -> str | None:
    """The Ray cluster to join: the config's address, else ``RAY_ADDRESS``, else None (a local instance)."""
    return configured or os.environ.get("RAY_ADDRESS") or None


WORKER_NICENESS_ENV = "RAY_worker_niceness"
"""Ray's setting of its workers' niceness (its default 15); a local instance sets 0 unless it is given."""


def init(address: str | None, min_cpus: int = 1) -> bool:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local instance; True if we started one.

    A local instance offers this machine's cores as logical CPUs, at least ``min_cpus`` (so that one trial of
    several workers fits even on a small machine; the workers then share the cores).
    """
    import ray

    if ray.is_initialized():
        return False
    quiet = {"worker_process_setup_hook": "harness.launch.raytune.quiet_worker"}
    address = cluster_address(address)
    if address:  # every node imports the harness anyway (its trials run there)
        check_address(address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, runtime_env=quiet)
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local instance needs no token
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # one node, never preempted (it warns on start)
    # Ray starts workers at nice 15, for a cluster node that serves others; on a local instance the trials are the
    # work the user asked for, and at 15 anything else running starves them. RAY_worker_niceness=15 restores Ray's.
    os.environ.setdefault(WORKER_NICENESS_ENV, "0")
    context = ray.init(
        num_cpus=max(os.cpu_count() or 1, min_cpus), include_dashboard=False, object_store_memory=2**28,
        logging_level=logging.WARNING, runtime_env=quiet,
    )  # fmt: skip
    session_dir = getattr(context, "address_info", {}).get("session_dir")
    if session_dir:  # its processes end with this one, even after kill -9
        reaper.watch(session_dir)
    return True


def quiet_worker() -> None:
    """Run by every worker process of the harness's Ray jobs: library log noise stays out of the terminal. Without a
    dashboard (a local instance has none) Ray Train's placement-group cleaner cannot query actor states and would
    warn every few seconds; the instance's processes end with it anyway (:mod:`harness.launch.reaper`)."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    logging.getLogger("faiss").setLevel(logging.WARNING)
    sys.unraisablehook = _quiet_exit(sys.unraisablehook)


def _quiet_exit(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """Ray ends an idle worker with SIGTERM, whose handler raises SystemExit wherever the worker is: inside a weakref
    callback Python can only print it ("Exception ignored in ... SystemExit: 1"), and Ray forwards that to the
    driver's terminal. The exit is intended: only that case is silenced, every other unraisable error still shows."""

    def quiet(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, SystemExit):
            hook(unraisable)

    return quiet


def node_count() -> int:
    """How many live nodes the Ray cluster joined by :func:`init` has."""
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def cluster_capacity() -> tuple[float, float]:
    """(CPUs, GPUs) of the Ray cluster joined by :func:`init`."""
    import ray

    resources = ray.cluster_resources()
    return float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))


def shutdown() -> None:
    import ray

    ray.shutdown()
    reaper.release()


def can_restore(path: Path) -> bool:
    from ray import tune

    return path.is_dir() and tune.Tuner.can_restore(str(path))


def run_trials(
    trainable: Callable[..., Any],
    keys: list[str],
    *,
    name: str,
    storage: Path,
    cpus: float,
    gpus: float,
    max_concurrent: int | None,
    scheduler: dict[str, Any] | None,
    max_failures: int,
    events: TrialEvents,
    resume: bool = False,
    verbose: int = 0,
    reuse_actors: bool = True,
    **trainable_kwargs: Any,
) -> Outcome:
    """Run one Tune trial per key (``trainable(config, **trainable_kwargs)`` reads ``config["trial"]``).

    The experiment lives at ``storage / name``; with ``resume`` it is restored from
    there: finished trials are kept, unfinished and errored ones continue from
    their last checkpoint. Statuses reach ``events`` as they happen. ``reuse_actors=False`` for trainables that
    fit a Ray Train job (Tune cannot reset such an actor for the next trial and would wait for it).
    """
    from ray import tune

    os.environ.setdefault(
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0"
    )  # one checkpoint per epoch is by design
    if (
        not verbose
    ):  # Tune's own progress output (result paths, TensorBoard hints, trial tables) stays out of the terminal
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A scheduler's metric may be one reported only at some epochs (online/*, every eval.online.every epochs): Tune's
    # own check would fail a trial on the first report without it, while ASHA just decides at the next report holding
    # it. The metric's name is checked before Ray starts (harness.sweep.config).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    fn = tune.with_resources(tune.with_parameters(trainable, **trainable_kwargs), {"cpu": cpus, "gpu": gpus})
    path = storage / name
    outcome = Outcome()
    callback = _Callback(events, outcome)
    t0 = time.perf_counter()
    if resume:
        tuner = tune.Tuner.restore(str(path), trainable=fn, resume_unfinished=True, resume_errored=True)
        # the restored run config carries the pickled (inert) callback: install a live one
        internal = tuner._local_tuner  # noqa: SLF001 - Ray offers no public hook for this
        if internal is None:
            raise RuntimeError(f"Ray Tune restored {path} without a local tuner; cannot install the sweep's callback")
        internal.get_run_config().callbacks = [callback]
    else:
        tuner = tune.Tuner(
            fn,
            param_space={_TRIAL_KEY: tune.grid_search(keys)},
            tune_config=tune.TuneConfig(
                scheduler=_scheduler(scheduler),
                max_concurrent_trials=max_concurrent,
                num_samples=1,
                reuse_actors=reuse_actors,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(storage.resolve()),
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[callback],
                verbose=verbose,
            ),
        )
    # Tune's "Resume experiment with: Tuner.restore(...)" after a stop: the harness prints its own `--resume` hint
    logging.getLogger("ray.tune.tune").setLevel(logging.ERROR)
    grid = tuner.fit()
    for result in (grid[i] for i in range(len(grid))):
        key = (result.config or {}).get(_TRIAL_KEY)
        if key is None:
            continue
        if result.error is not None:
            outcome.errors.setdefault(key, one_line(result.error))
        elif key not in outcome.results and result.metrics:
            outcome.results[key] = dict(result.metrics)
    outcome.wall_s = time.perf_counter() - t0
    return outcome


def _scheduler(spec: dict[str, Any] | None) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not spec or spec["name"] == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=spec["metric"],
        mode=spec["mode"],
        max_t=spec["max_t"],
        grace_period=spec["grace_period"],
        reduction_factor=spec["reduction_factor"],
    )


def stopped_by_sigterm(error: str) -> bool:
    """Whether a trial's error is its worker process being sent SIGTERM (a preempted node), not a failure."""
    return "receives a SIGTERM" in error


def one_line(error: BaseException | str) -> str:
    """The last line of a (possibly remote, multi-line) error: usually the original exception."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__


def _error_of(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        return one_line(Path(path).read_text())
    return one_line(getattr(trial, "error_msg", None) or "trial failed")


def _make_callback_class() -> type:
    from ray import tune

    class Callback(tune.Callback):
        """Forwards Tune's trial events to :class:`TrialEvents`, keyed by the harness's trial key."""

        def __init__(self, events: TrialEvents, outcome: Outcome) -> None:
            self.events, self.outcome = events, outcome

        # Tune pickles its run config (callbacks included) into the experiment folder; the
        # driver's hooks hold live clients, so a pickled callback is a no-op and a resumed
        # sweep installs a fresh one.
        def __getstate__(self) -> dict[str, Any]:
            return {}

        def __setstate__(self, state: dict[str, Any]) -> None:
            self.events, self.outcome = TrialEvents(), Outcome()

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.events.on_start(trial.config[_TRIAL_KEY])

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.events.on_recover(trial.config[_TRIAL_KEY], _error_of(trial))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            result = dict(trial.last_result or {})
            self.outcome.results[trial.config[_TRIAL_KEY]] = result
            self.events.on_complete(trial.config[_TRIAL_KEY], result)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            error = _error_of(trial)
            self.outcome.errors[trial.config[_TRIAL_KEY]] = error
            self.events.on_error(trial.config[_TRIAL_KEY], error)

    return Callback


def _Callback(events: TrialEvents, outcome: Outcome) -> Any:  # noqa: N802 - a factory standing in for the class
    return _make_callback_class()(events, outcome)


# ----------------------------------------------------------------------------- trial side


def trial_key(config: dict[str, Any]) -> str:
    """The harness's trial key from the config Tune passes to the trainable."""
    return config[_TRIAL_KEY]


def report(metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
    """Report one iteration (and a checkpoint folder, copied into Tune's storage).

    Raises ``SystemExit`` when a scheduler stops the trial here.
    """
    from ray import tune

    checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
    tune.report(dict(metrics), checkpoint=checkpoint)


def restored_checkpoint(into: Path) -> Path | None:
    """When Tune restarts a trial that had reported a checkpoint: copy it into ``into`` and return that folder."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    return Path(checkpoint.to_directory(str(into)))
