"""MLflow behind one small module: the rest of the harness never imports mlflow.

    with start_run("harness", run_name="simclr-shapes", tags={...}) as run:
        run.log_params(flatten(cfg.as_dict()))
        run.log_metrics({"train/loss": 4.1}, step=1)
    # FINISHED on success; FAILED on an exception; KILLED on Ctrl-C

The store is MLflow's own default, ``sqlite:///mlflow.db`` in the working
directory (so plain ``mlflow ui`` there shows the runs), unless the config's
``tracking.uri`` or ``MLFLOW_TRACKING_URI`` names another.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_URI = "sqlite:///mlflow.db"
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
"""Experiments the harness creates open on MLflow's training-runs view (not the GenAI overview)."""
_MAX_PARAM_LEN = 6000
_BATCH = 100
T = TypeVar("T")

logging.getLogger("alembic").setLevel(logging.WARNING)


def tracking_uri(configured: str | None = None) -> str:
    """The config's URI, else ``MLFLOW_TRACKING_URI``, else the local SQLite default."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def absolute_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` -> ``sqlite:////abs/cwd/mlflow.db`` (and plain relative paths likewise).

    Trials run in other processes, possibly in other folders: they must write to the
    store the driver means, not to one relative to their own working directory.
    """
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri


def _retry(fn: Callable[[], T], attempts: int = 8) -> T:
    """Call ``fn``, retrying with backoff while SQLite answers 'database is locked'."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:  # MLflow wraps the driver's error in several types
            if "database is locked" not in str(err) or i == attempts - 1:
                raise
            time.sleep(0.05 * 2**i)
    raise AssertionError("unreachable")


class Run:
    """One MLflow run, logged through ``MlflowClient`` (no global active-run state)."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_str(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), _BATCH):
            _retry(partial(self.client.log_batch, self.run_id, params=items[i : i + _BATCH]))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), _BATCH):
            _retry(partial(self.client.log_batch, self.run_id, metrics=items[i : i + _BATCH]))

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        _retry(lambda: self.client.log_batch(self.run_id, tags=items))

    def log_text(self, text: str, artifact_file: str) -> None:
        _retry(lambda: self.client.log_text(self.run_id, text, artifact_file))

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        _retry(lambda: self.client.log_dict(self.run_id, data, artifact_file))

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        _retry(lambda: self.client.log_figure(self.run_id, figure, artifact_file))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        _retry(lambda: self.client.log_artifact(self.run_id, path, artifact_path))

    def end(self, status: str) -> None:
        """Set the final status: FINISHED, FAILED or KILLED."""
        _retry(lambda: self.client.set_terminated(self.run_id, status=status))

    def set_status(self, status: str) -> None:
        """Set a non-final status (SCHEDULED, RUNNING) without an end time."""
        _retry(lambda: self.client.update_run(self.run_id, status=status))

    def info(self) -> dict[str, Any]:
        """Status, params, metrics and tags as stored now."""
        r = _retry(lambda: self.client.get_run(self.run_id))
        return _as_dict(r)


def _param_str(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= _MAX_PARAM_LEN else text[: _MAX_PARAM_LEN - 3] + "..."


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name``, created if needed (tolerating a concurrent creator)."""
    exp = _retry(lambda: client.get_experiment_by_name(name))
    if exp is not None:
        return exp.experiment_id
    try:
        return _retry(lambda: client.create_experiment(name, tags=EXPERIMENT_TAGS))
    except Exception:  # another process created it first
        exp = _retry(lambda: client.get_experiment_by_name(name))
        if exp is None:
            raise
        return exp.experiment_id


def create_run(experiment: str, *, run_name: str | None = None, tags: dict[str, Any] | None = None, uri: str | None = None, parent_run_id: str | None = None) -> Run:
    """Create a run (status RUNNING) in ``experiment``, nested under ``parent_run_id`` if given."""
    client = _client(tracking_uri(uri))
    exp_id = experiment_id(client, experiment)
    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    info = _retry(lambda: client.create_run(exp_id, run_name=run_name, tags=all_tags))
    return Run(client, info.info.run_id)


def open_run(run_id: str, uri: str | None = None) -> Run:
    """An existing run, to log into from another process (a sweep's trial)."""
    return Run(_client(tracking_uri(uri)), run_id)


@contextmanager
def start_run(experiment: str, *, run_name: str | None = None, tags: dict[str, Any] | None = None, uri: str | None = None, parent_run_id: str | None = None) -> Iterator[Run]:
    """Open a run; it ends FINISHED when the block completes, FAILED on an exception, KILLED on Ctrl-C or SystemExit."""
    run = create_run(experiment, run_name=run_name, tags=tags, uri=uri, parent_run_id=parent_run_id)
    try:
        yield run
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or a scheduler stopping the trial
        run.end("KILLED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")


def search_runs(experiment: str, uri: str | None = None, filter_string: str = "") -> list[dict[str, Any]]:
    """Runs of an experiment as plain dicts (newest first), optionally filtered
    (MLflow's syntax, e.g. ``tags.mlflow.parentRunId = '...'``); empty if the experiment does not exist."""
    client = _client(tracking_uri(uri))
    exp = _retry(lambda: client.get_experiment_by_name(experiment))
    if exp is None:
        return []
    runs, token = [], None
    while True:
        page = _retry(partial(client.search_runs, [exp.experiment_id], filter_string, order_by=["attributes.start_time DESC"], max_results=1000, page_token=token))
        runs.extend(page)
        token = page.token
        if not token:
            return [_as_dict(r) for r in runs]


def _as_dict(r: Any) -> dict[str, Any]:
    return {
        "run_id": r.info.run_id,
        "run_name": r.info.run_name,
        "status": r.info.status,
        "start_time": r.info.start_time,
        "params": dict(r.data.params),
        "metrics": dict(r.data.metrics),
        "tags": dict(r.data.tags),
    }


def metric_history(run_id: str, key: str, uri: str | None = None) -> list[tuple[int, float]]:
    """``(step, value)`` of every logged value of one metric, in step order."""
    client = _client(tracking_uri(uri))
    return sorted((m.step, m.value) for m in _retry(lambda: client.get_metric_history(run_id, key)))


def ui_command(uri: str, host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> list[str]:
    """The command that serves MLflow's UI for ``uri`` (a local store or a server's URI)."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", str(workers)]


def serve_ui(uri: str, host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> int:
    """Run MLflow's UI in the foreground until Ctrl-C; returns its exit code."""
    try:
        return subprocess.call(ui_command(uri, host, port, workers))
    except KeyboardInterrupt:
        return 0
