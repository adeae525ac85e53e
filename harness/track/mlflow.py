"""MLflow behind one small module: the rest of the harness never imports mlflow.

:func:`start_run` opens a run that ends FINISHED on success, FAILED on an exception and KILLED on Ctrl-C. The store
is MLflow's own default, ``sqlite:///mlflow.db`` in the working directory (so plain ``mlflow ui`` there shows the
runs), unless ``tracking.uri`` or ``MLFLOW_TRACKING_URI`` names another (an MLflow server beyond one machine). A
SQLite store is created and migrated once per process under a file lock (``<db>.lock``), so any number of processes
may start on a new store together; one that cannot be opened or migrated is :class:`BadInput` naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from core.errors import BadInput, RunFailed
from harness import signals

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


STOPPED_TAG = "harness.stopped"
"""Set on a run ended KILLED by a stop signal or a scheduler: what stopped it."""


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
        """Set the final status: FINISHED, FAILED or KILLED. A run that finishes after it was stopped and resumed
        no longer says it is stopped: ``harness.stopped`` becomes ``harness.resumed_after``."""
        if status == "FINISHED":
            stopped = _retry(lambda: self.client.get_run(self.run_id)).data.tags.get(STOPPED_TAG)
            if stopped is not None:
                self.set_tags({"harness.resumed_after": stopped})
                _retry(lambda: self.client.delete_tag(self.run_id, STOPPED_TAG))
        _retry(lambda: self.client.set_terminated(self.run_id, status=status))

    def set_status(self, status: str) -> None:
        """Set a non-final status (SCHEDULED, RUNNING) without an end time."""
        _retry(lambda: self.client.update_run(self.run_id, status=status))

    def history(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every logged value of metric ``key``, in step order."""
        return sorted((m.step, m.value) for m in _retry(lambda: self.client.get_metric_history(self.run_id, key)))

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which metric ``key`` has been logged (a resumed run skips them)."""
        return {m.step for m in _retry(lambda: self.client.get_metric_history(self.run_id, key))}

    def info(self) -> dict[str, Any]:
        """Status, params, metrics and tags as stored now."""
        r = _retry(lambda: self.client.get_run(self.run_id))
        return _as_dict(r)


def _param_str(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= _MAX_PARAM_LEN else text[: _MAX_PARAM_LEN - 3] + "..."


_READY: set[str] = set()
"""Store URIs this process has opened (and so created or migrated) once."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def ensure_store(uri: str) -> None:
    """Create or migrate the store at ``uri`` now (a SQLite file: under its lock), not in a server's workers;
    BadInput naming it when it cannot be opened."""
    _client(uri)


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    if not os.environ.get("HARNESS_DEBUG"):  # its store logs each failed query with a traceback; the error reaches us
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # Each run that ends on a tracking server would print two "View run ... at" lines (from every trial, through
    # Ray's log forwarding): the sweep prints the UI's links itself.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    if uri in _READY:
        return MlflowClient(tracking_uri=uri)
    path = sqlite_path(uri)
    if path is None:
        client = MlflowClient(tracking_uri=uri)
    else:  # the first open creates or migrates the schema: one process at a time
        if not path.parent.is_dir():
            raise BadInput(
                f"tracking.uri: the folder of {path} does not exist; create it or point tracking.uri elsewhere"
            )
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise BadInput(
                f"tracking.uri: {path} is read-only for this user; every run writes to its store: make it writable "
                "or point tracking.uri elsewhere"
            )
        try:
            lock = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 - closed by the with below
        except OSError as err:
            raise BadInput(
                f"tracking.uri: cannot write in the folder of {path} ({err.strerror}); SQLite writes its journal "
                "and the harness its lock file beside the store: give a folder this user can write"
            ) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                client = MlflowClient(tracking_uri=uri)
                _retry(lambda: client.search_experiments(max_results=1))
            except Exception as err:  # noqa: BLE001 - any failure to open or migrate is the same bad store
                reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
                raise BadInput(
                    f"tracking.uri: {path} is not a usable MLflow store ({type(err).__name__}: "
                    f"{reason}); move it away or use another tracking.uri"
                ) from None
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    _READY.add(uri)
    return client


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


def create_run(
    experiment: str,
    *,
    run_name: str | None = None,
    tags: dict[str, Any] | None = None,
    uri: str | None = None,
    parent_run_id: str | None = None,
) -> Run:
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


def find_run(run_id: str, uri: str | None = None) -> Run | None:
    """The run ``run_id`` of the store at ``uri``, or None when that store has no such run."""
    run = open_run(run_id, uri)
    try:
        run.info()
    except Exception:  # noqa: BLE001 - MLflow raises its own error types for an unknown id
        return None
    return run


@contextmanager
def start_run(
    experiment: str,
    *,
    run_name: str | None = None,
    tags: dict[str, Any] | None = None,
    uri: str | None = None,
    parent_run_id: str | None = None,
    resume: Run | None = None,
) -> Iterator[Run]:
    """Open a run (or continue ``resume``, set RUNNING again); it ends FINISHED when the block completes, FAILED on
    an exception, KILLED on a stop signal (SIGINT, SIGTERM) or SystemExit, tagged ``harness.stopped`` with the
    signal. A SQLite store deleted or replaced while the run logged is :class:`RunFailed` once the run ends."""
    if resume is not None:
        run = resume
        run.set_status("RUNNING")
    else:
        run = create_run(experiment, run_name=run_name, tags=tags, uri=uri, parent_run_id=parent_run_id)
    store = _store_identity(run.client.tracking_uri)
    try:
        yield run
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (harness.signals)
        with signals.held():  # a second signal must not leave the run RUNNING
            run.set_tags({"harness.stopped": signals.stop_reason()})
            run.end("KILLED")
        raise
    except SystemExit:  # a scheduler stopping the trial
        with signals.held():
            run.end("KILLED")
        raise
    except Exception as err:
        _check_store_kept(run, store)  # a store deleted mid-run fails every write: say that, not the write's error
        with signals.held():  # torchrun stops the other workers when one fails, maybe while this one writes FAILED
            run.set_tags({"harness.error": failure_message(err)})
            run.end("FAILED")
        raise
    except BaseException:
        with signals.held():
            run.end("FAILED")
        raise
    with signals.held():
        run.end("FINISHED")
    _check_store_kept(run, store)


def failure_message(err: BaseException) -> str:
    """What a FAILED run's ``harness.error`` says: ``Type: message`` (a WorkerFailed's message alone, it names the
    rank), at most 5,000 characters."""
    from core.errors import WorkerFailed

    return (str(err) if isinstance(err, WorkerFailed) else f"{type(err).__name__}: {err}")[:5000]


def _store_identity(uri: str) -> tuple[int, int] | None:
    """(device, inode) of a SQLite store's file, to tell at the end of a run whether it is still the one written."""
    path = sqlite_path(uri)
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st is not None else None


def _check_store_kept(run: Run, store: tuple[int, int] | None) -> None:
    """A SQLite file deleted (or replaced) under a running run takes the run's record with it, while SQLite writes
    on into the open, unlinked file without an error: say so instead of reporting results nobody can browse."""
    now = _store_identity(run.client.tracking_uri)
    if store is not None and now != store:
        raise RunFailed(
            f"tracking.uri: the store {sqlite_path(run.client.tracking_uri)} was deleted or replaced while run "
            f"{run.run_id} was logging: its record is lost (its checkpoint stays); keep the store in place during runs"
        )


def search_runs(experiment: str, uri: str | None = None, filter_string: str = "") -> list[dict[str, Any]]:
    """Runs of an experiment as plain dicts (newest first), optionally filtered
    (MLflow's syntax, e.g. ``tags.mlflow.parentRunId = '...'``); empty if the experiment does not exist."""
    client = _client(tracking_uri(uri))
    exp = _retry(lambda: client.get_experiment_by_name(experiment))
    if exp is None:
        return []
    runs, token = [], None
    while True:
        page = _retry(
            partial(
                client.search_runs,
                [exp.experiment_id],
                filter_string,
                order_by=["attributes.start_time DESC"],
                max_results=1000,
                page_token=token,
            )
        )
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
        "end_time": r.info.end_time,
        "params": dict(r.data.params),
        "metrics": dict(r.data.metrics),
        "tags": dict(r.data.tags),
    }


def metric_history(run_id: str, key: str, uri: str | None = None) -> list[tuple[int, float]]:
    """``(step, value)`` of every logged value of one metric, in step order."""
    client = _client(tracking_uri(uri))
    return sorted((m.step, m.value) for m in _retry(lambda: client.get_metric_history(run_id, key)))


def runs_url(base: str, experiment_id: str) -> str:
    """The UI's page of an experiment's training runs (MLflow 3 opens on its GenAI overview otherwise)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's page comparing ``run_ids``: parallel coordinates, scatter and box plots, a metrics table."""
    from urllib.parse import quote

    def listed(ids: list[str]) -> str:
        return quote(json.dumps(ids, separators=(",", ":")), safe="[],")

    return f"{base.rstrip('/')}/#/compare-runs?runs={listed(run_ids)}&experiments={listed([experiment_id])}"


def experiment_ids(uri: str) -> dict[str, str]:
    """Name -> id of every experiment in the store at ``uri`` (MLflow's empty Default left out), sorted by name."""
    client = _client(tracking_uri(uri))
    experiments = _retry(lambda: client.search_experiments(max_results=1000))
    return {e.name: e.experiment_id for e in sorted(experiments, key=lambda e: e.name) if e.name != "Default"}


def ui_command(uri: str, host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> list[str]:
    """The command that serves MLflow's UI for ``uri`` (a local store or a server's URI)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def server_command(
    store: str,
    artifacts: Path,
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int = 1,
    allowed_hosts: list[str] | None = None,
    login: bool = False,
) -> list[str]:
    """The command of a tracking server for a cluster: runs and artifacts over HTTP (``tracking.uri: http://HOST:PORT``).

    ``allowed_hosts``: the Host headers MLflow's security middleware accepts (its default is localhost and private
    addresses only); ``login``: MLflow's basic-auth app, every request needing a user (:func:`login_environment`)."""
    command = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
        "--artifacts-destination", str(artifacts), "--serve-artifacts",
        "--host", host, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip
    if allowed_hosts:
        command += ["--allowed-hosts", ",".join(allowed_hosts)]
    if login:
        command += ["--app-name", "basic-auth"]
    return command


def allowed_hosts(host: str, port: int, given: str | None = None) -> list[str]:
    """The Host headers a server bound to ``host`` accepts: ``given`` (comma-separated names or addresses, each with
    or without ``:port``, ``*`` wildcards allowed), else the names and addresses this machine is reached by; with
    MLflow's own defaults (localhost and the private address ranges) either way. BadInput on an empty entry."""
    import socket

    from mlflow.server.security_utils import get_default_allowed_hosts

    if given is not None:
        names = [name.strip() for name in given.split(",")]
        if not all(names):
            raise BadInput(
                f"--allowed-hosts {given!r}: an empty entry; give comma-separated host names or addresses "
                "(e.g. head-node,head-node.example.org,10.0.0.5)"
            )
    else:
        names = [socket.gethostname(), socket.getfqdn()]
        if host not in ("0.0.0.0", "::", ""):
            names.insert(0, host)
        for name in list(names):
            with contextlib.suppress(OSError):
                names += socket.gethostbyname_ex(name)[2]
    hosts: list[str] = []
    for name in names:
        for entry in (name, name if ":" in name.strip("[]") or "*" in name else f"{name}:{port}"):
            if entry not in hosts:
                hosts.append(entry)
    return hosts + [h for h in get_default_allowed_hosts() if h not in hosts]


LOGIN_ENV = ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD")
"""Where ``harness server --login`` reads the first user's credentials (MLflow's own variables); clients log in with
``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``."""


def login_environment(config: Path | None, state: Path) -> dict[str, str]:
    """The environment of a server with MLflow's login (basic-auth app): its config file (``config``, MLflow's
    ``basic_auth.ini`` format, else one written into ``state`` with the user database beside it), the first
    user's credentials from :data:`LOGIN_ENV` or the file, never from the command line, and the key MLflow signs its
    login forms with (``MLFLOW_FLASK_SERVER_SECRET_KEY``, else one kept in ``state``, readable by this user only).
    BadInput when no credentials are set and no user database exists yet."""
    import configparser

    if config is not None:
        if not config.is_file():
            raise BadInput(f"--login-config {config}: no such file; give MLflow's basic_auth.ini format")
        parser = configparser.ConfigParser()
        try:
            parser.read(config)
            section = parser["mlflow"]
            has_user = bool(section.get("admin_username") and section.get("admin_password"))
        except (configparser.Error, KeyError) as err:
            raise BadInput(f"--login-config {config}: not MLflow's basic_auth.ini format ({err})") from None
        path = config
        users = section.get("database_uri", "")
    else:
        state.mkdir(parents=True, exist_ok=True)
        users = f"sqlite:///{state / 'basic_auth.db'}"
        path = state / "basic_auth.ini"
        path.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {users}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        has_user = False
    has_user = has_user or all(os.environ.get(name) for name in LOGIN_ENV)
    existing = sqlite_path(users)
    if not has_user and not (existing is not None and existing.is_file()):
        raise BadInput(
            f"--login: no first user: set {LOGIN_ENV[0]} and {LOGIN_ENV[1]} (or give --login-config FILE, MLflow's "
            "basic_auth.ini with admin_username and admin_password); credentials never go on the command line"
        )
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(path)}
    if not os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):  # the login pages' CSRF key: kept, so restarts agree
        secret = state / "flask_secret_key"
        if not secret.is_file():
            import secrets

            state.mkdir(parents=True, exist_ok=True)
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secret.read_text().strip()
    return env


def check_port(host: str, port: int) -> None:
    """Refuse a port another process listens on (MLflow's server would fail, or the UI would show that process)."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise BadInput(
                    f"--port {port}: {host}:{port} is in use by another process; give a free one, "
                    f"e.g. --port {_free_port(host)}"
                ) from None
            raise BadInput(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve_ui(uri: str, host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> int:
    """Run MLflow's UI in the foreground until Ctrl-C or SIGTERM; returns its exit code."""
    ensure_store(uri)
    return serve(ui_command(uri, host, port, workers))


SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
"""Defaults of the servers started here, each overridden by the environment: no MLflow job runner (its 8 processes
run GenAI evaluation jobs, which no run of the harness submits; a third of a server's start-up CPU)."""


def serve(command: list[str], env: dict[str, str] | None = None) -> int:
    """Run an MLflow server process group in the foreground; whatever ends this process ends all of it.

    The server gets a process group of its own, stopped as a whole (SIGTERM, then SIGKILL after 10 s) when it
    exits, on Ctrl-C or SIGTERM, or on any error here; and on Linux it gets SIGTERM if this process is
    killed outright (``PR_SET_PDEATHSIG``). Returns the server's exit code; 0 after Ctrl-C, 143 after SIGTERM.
    """
    env = {**SERVER_ENV, **os.environ, **(env or {})}
    proc = subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent, env=env)  # prctl only
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0 if signals.stop_reason() == "SIGINT" else signals.exit_code()
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen[Any], grace_s: float = 10.0) -> None:
    """Stop ``proc``'s process group (it leads one): SIGTERM, then SIGKILL after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                proc.poll()
                return
            proc.poll()
            time.sleep(0.1)


def _die_with_parent() -> None:
    """In the server's process, before it starts: SIGTERM when this process dies, even by SIGKILL (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
