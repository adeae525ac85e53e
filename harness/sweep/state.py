"""A sweep's bookkeeping in MLflow and on disk: the parent run, one child run per trial, and the state file
``--resume`` reads.

The driver opens the parent run before any trial starts (which also creates a new SQLite store's schema once,
before any concurrent writer). Each trial opens its own child run when it starts, found again by its trial key
(tag ``harness.trial``) when it is retried or resumed, so a child's start and end are its trial's.
``<storage>/<name>/state.json`` records the parent, the children opened so far and a digest of the trials'
configs, so a resumed sweep reuses the same runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from core.errors import BadInput
from harness.config.loading import flatten
from harness.launch import raytune
from harness.sweep.config import Sweep, TrialSpec
from harness.track.mlflow import create_run, search_runs
from harness.track.provenance import git_commit

__all__ = [
    "STATE_FILE",
    "child_runs",
    "child_tags",
    "hold_name",
    "latest_parent",
    "load_state",
    "new_state",
    "trial_runs",
    "write_json",
]

STATE_FILE = "state.json"
LOCK_FILE = "sweep.lock"
TAG_SWEEP, TAG_TRIAL, TAG_SWEPT_KEYS = "harness.sweep", "harness.trial", "harness.swept_keys"
TAG_REFERENCES = "harness.references"
SWEPT_TAG_PREFIX = "swept."


@contextlib.contextmanager
def hold_name(root: Path, name: str) -> Iterator[None]:
    """Hold sweep ``name``'s folder ``root`` (``<storage>/<name>``) for as long as the sweep runs.

    The folder must be writable (checked here, before any MLflow run exists), and a second sweep of the same
    name on the same storage is refused while the first runs: both would write one ``state.json``, and the first
    could then not be resumed. The hold is an advisory lock on ``sweep.lock``, released by the kernel when the
    process ends, however it ends."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise BadInput(
            f"storage: cannot write the sweep's folder {root} ({err.strerror}); "
            "give storage=PATH, a folder this user can create and write"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise BadInput(
                f"sweep {name!r} is already running on storage {root.parent} ({holder}); wait for it to end, "
                "or give the sweep another name (name=...) or storage (storage=PATH)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def new_state(sweep: Sweep, uri: str, root: Path) -> dict[str, Any]:
    """Open the parent run; write the state file that ``--resume`` reads (the trials open their own runs).

    If anything fails on the way (the store, the state file), the parent is ended FAILED with the error tagged,
    so it is not left RUNNING, and the error goes on up."""
    opened: list[Any] = []
    try:
        return _new_state(sweep, uri, root, opened)
    except BaseException as err:
        for run in reversed(opened):
            with contextlib.suppress(Exception):
                run.set_tags({"harness.error": f"the sweep could not start: {type(err).__name__}: {err}"[:500]})
                run.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise


def _new_state(sweep: Sweep, uri: str, root: Path, opened: list[Any]) -> dict[str, Any]:
    cfg = sweep.cfg
    swept = list(cfg.space)
    tags = {
        TAG_SWEEP: cfg.name,
        TAG_SWEPT_KEYS: json.dumps(swept),
        "harness.headline": json.dumps(cfg.headline),
        "git_commit": git_commit(),
        "harness.role": "sweep",
    }
    tags["harness.table_columns"] = json.dumps(cfg.table.columns)  # what `table EXPERIMENT` shows (null: the default)
    tags[TAG_REFERENCES] = json.dumps([r.model_dump() for r in cfg.references])
    parent = create_run(cfg.name, run_name=f"{cfg.name} sweep", uri=uri, tags=tags)
    opened.append(parent)
    parent.log_params({
        "sweep.space": json.dumps({k: v.model_dump(exclude_none=True) for k, v in cfg.space.items()}),
        "sweep.seeds": cfg.seeds, "sweep.num_samples": cfg.num_samples, "sweep.trials": len(sweep.trials),
        "sweep.scheduler": cfg.scheduler.name, "sweep.max_concurrent": cfg.max_concurrent,
        "sweep.resources.cpus": cfg.resources.cpus, "sweep.resources.gpus": cfg.resources.gpus,
    })  # fmt: skip
    parent.log_text(sweep.text, f"sweep/{sweep.source.name if sweep.source else 'sweep.yaml'}")
    parent.log_text(
        yaml.safe_dump(sweep.configs[sweep.keys[0]].as_dict(), sort_keys=False), "sweep/first_trial_config.yaml"
    )
    state = {
        "sweep": cfg.name,
        "tune_name": time.strftime("%Y%m%d-%H%M%S"),
        "parent_run_id": parent.run_id,
        "uri": uri,
        "trials": {},  # trial key -> its child run, as the trials open them
        "digest": _digest(sweep),
        "complete": False,
    }
    write_json(root / STATE_FILE, state)
    return state


def load_state(state_path: Path, sweep: Sweep, uri: str) -> dict[str, Any]:
    """The saved state of an interrupted sweep, checked against the sweep as it is now."""
    name = sweep.cfg.name
    if not state_path.is_file():
        raise BadInput(f"--resume: nothing to resume for sweep {name!r}: no saved state at {state_path}")
    state = json.loads(state_path.read_text())
    if state.get("digest") != _digest(sweep):
        raise BadInput(
            f"--resume: sweep {name!r} changed since it started (its trials "
            "or their configs differ); run it without --resume to start again"
        )
    if state["uri"] != uri:
        raise BadInput(
            f"--resume: sweep {name!r} logged to {state['uri']}, not "
            f"{uri}; set tracking.uri or MLFLOW_TRACKING_URI to it"
        )
    finished = {
        r["tags"].get(TAG_TRIAL) for r in child_runs(name, state["parent_run_id"], uri) if r["status"] == "FINISHED"
    }
    if all(key in finished for key in sweep.keys):
        raise BadInput(
            f"--resume: nothing to resume for sweep {name!r}: all {len(state['trials'])} "
            "trials finished; run it without --resume to start again"
        )
    if not raytune.can_restore(state_path.parent / state["tune_name"]):
        raise BadInput(
            f"--resume: nothing to resume for sweep {name!r}: no Ray "
            f"Tune state at {state_path.parent / state['tune_name']}"
        )
    _check_trusted(state_path, state_path.parent / state["tune_name"])
    return state


def _check_trusted(state_path: Path, tune_dir: Path) -> None:
    """Ray Tune's saved state is pickled: restoring it runs whatever code its writer put there. Refuse state that
    another user wrote or that anyone may change (what can be checked of a shared folder: owner and mode)."""
    me = os.getuid()
    for path in [state_path, tune_dir, *sorted(p for p in tune_dir.iterdir() if p.is_file())]:
        st = path.stat()
        if st.st_uid not in (me, 0):
            why = f"is owned by user id {st.st_uid}, not this user ({me})"
        elif st.st_mode & 0o002:
            why = f"may be changed by any user (mode {st.st_mode & 0o777:o})"
        else:
            continue
        raise BadInput(
            f"--resume: {path} {why}; Ray Tune's saved state runs code when restored: resume only state this "
            "user wrote (chmod o-w it if you did), or run the sweep without --resume"
        )


def _digest(sweep: Sweep) -> str:
    """What must not change between a sweep and its resumption: the trials and their run configs."""
    ignore = ("pretrain.progress",)
    body = {k: {p: v for p, v in flatten(c.as_dict()).items() if p not in ignore} for k, c in sweep.configs.items()}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def child_runs(experiment: str, parent_run_id: str, uri: str | None = None) -> list[dict[str, Any]]:
    """The child runs of one sweep invocation."""
    return search_runs(experiment, uri, f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def trial_runs(experiment: str, parent_run_id: str, uri: str | None = None) -> dict[str, str]:
    """Trial key -> child run id, for the trials of a sweep that have opened their runs (the oldest run of a key, if
    a store ever held two)."""
    found: dict[str, str] = {}
    for run in reversed(child_runs(experiment, parent_run_id, uri)):  # newest first: oldest wins
        if TAG_TRIAL in run["tags"]:
            found.setdefault(run["tags"][TAG_TRIAL], run["run_id"])
    return found


def child_tags(sweep: Sweep, trial: TrialSpec) -> dict[str, str]:
    """The tags a trial's child run opens with: the run's own (:func:`harness.trial.run.run_tags`), the sweep, the
    trial key and point, and each swept value as the sweep wrote it."""
    from harness.trial.run import run_tags  # run imports torch: keep this module light to import

    key = trial.key
    tags = run_tags(sweep.configs[key]) | {TAG_SWEEP: sweep.cfg.name, TAG_TRIAL: key, "harness.point": trial.point_key}
    tags |= {SWEPT_TAG_PREFIX + k: json.dumps(trial.labels.get(k, v)) for k, v in trial.point.items()}
    return {k: str(v) for k, v in tags.items()}


def latest_parent(experiment: str, uri: str | None = None) -> dict[str, Any] | None:
    """The newest sweep parent run of an experiment, or None."""
    runs = search_runs(experiment, uri, "tags.`harness.role` = 'sweep'")
    return runs[0] if runs else None
