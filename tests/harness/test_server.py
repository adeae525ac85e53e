"""``harness server`` for a cluster: the Host headers it accepts (MLflow refuses any other with 403, its defence
against DNS rebinding) and MLflow's login. Network tests use loopback addresses only."""

from __future__ import annotations

import base64
import json
import signal
import socket
import urllib.error
import urllib.request

import pytest

from harness.cli import main
from harness.track import mlflow as adapter
from tests.helpers.processes import answers, free_port, started, stop, wait_until
from tests.helpers.runs import env_for, harness_cmd


def test_allowed_hosts_are_the_given_names_or_this_machines_with_mlflows_defaults() -> None:
    given = adapter.allowed_hosts("127.0.0.1", 5000, "head, 10.0.0.5:5000,*.example.org")
    assert given[:4] == ["head", "head:5000", "10.0.0.5:5000", "*.example.org"]
    assert "localhost:*" in given and "10.*" in given  # MLflow's own defaults are kept
    derived = adapter.allowed_hosts("0.0.0.0", 5001)
    assert f"{socket.gethostname()}:5001" in derived and "0.0.0.0:5001" not in derived


@pytest.mark.parametrize(("environment", "expected"), [(None, "false"), ("true", "true")])
def test_a_server_runs_no_mlflow_job_runner_unless_the_environment_asks(monkeypatch, environment, expected) -> None:
    """MLflow's job runner (8 processes for GenAI evaluation jobs, which the harness never submits) costs a server
    three times the CPU of its start; it stays off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION says otherwise."""
    seen: list[dict[str, str]] = []

    class Finished:
        def __init__(self, command: list[str], **kwargs) -> None:
            seen.append(kwargs["env"])
            self.pid = -1

        def wait(self) -> int:
            return 0

    if environment is None:
        monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", environment)
    monkeypatch.setattr(adapter.subprocess, "Popen", Finished)
    monkeypatch.setattr(adapter, "stop_group", lambda proc: None)
    assert adapter.serve(["mlflow", "server"], {"OTHER": "1"}) == 0
    assert seen[0]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == expected and seen[0]["OTHER"] == "1"


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--allowed-hosts", "head,,10.0.0.5"], {}, "error: --allowed-hosts 'head,,10.0.0.5': an empty entry; give comma-separated host names or addresses (e.g. head-node,head-node.example.org,10.0.0.5)"),
        (["--login"], {}, "error: --login: no first user: set MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD (or give --login-config FILE, MLflow's basic_auth.ini with admin_username and admin_password); credentials never go on the command line"),
        (["--login"], {"MLFLOW_AUTH_ADMIN_USERNAME": "alice"}, "error: --login: no first user: set MLFLOW_AUTH_ADMIN_USERNAME and MLFLOW_AUTH_ADMIN_PASSWORD (or give --login-config FILE, MLflow's basic_auth.ini with admin_username and admin_password); credentials never go on the command line"),
        (["--login-config", "auth.ini"], {}, "error: --login-config: given without --login; add --login to serve with MLflow's login"),
    ],
)
def test_bad_server_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys, args, env, expected) -> None:
    monkeypatch.chdir(tmp_path)
    for name in adapter.LOGIN_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(adapter, "serve", lambda *a, **k: pytest.fail("a server was started"))
    assert main(["server", "--port", str(free_port()), "--store", f"sqlite:///{tmp_path / 'm.db'}", *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [expected]


def test_serving_beyond_loopback_without_a_login_warns_who_can_write(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    served = []
    monkeypatch.setattr(adapter, "check_port", lambda host, port: None)  # no other interface is bound in tests
    monkeypatch.setattr(adapter, "serve", lambda command, env=None: served.append(command) or 0)
    assert main(["server", "--host", "192.0.2.10", "--port", "5999", "--store", f"sqlite:///{tmp_path / 'm.db'}"]) == 0
    (warning,) = capsys.readouterr().err.strip().splitlines()
    assert warning == "warning: serving on 192.0.2.10 without a login: anyone who reaches port 5999 can read and change every run; add --login"
    (command,) = served
    hosts = command[command.index("--allowed-hosts") + 1].split(",")
    assert hosts[:2] == ["192.0.2.10", "192.0.2.10:5999"] and "--app-name" not in command


def _call(base: str, path: str, body: dict | None = None, host: str | None = None, user: tuple[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode() if body is not None else None, method="POST" if body is not None else "GET")
    request.add_header("Content-Type", "application/json")
    if host:
        request.add_header("Host", host)
    if user:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, {}


@pytest.mark.slow  # an MLflow server with its login app
def test_a_server_takes_runs_from_its_allowed_hosts_and_logged_in_users_only(tmp_path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    login = ("alice", "correct-horse-battery-staple")
    env = env_for(MLFLOW_AUTH_ADMIN_USERNAME=login[0], MLFLOW_AUTH_ADMIN_PASSWORD=login[1])
    command = harness_cmd("server", "--port", str(port), "--store", f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts", str(tmp_path / "srv" / "artifacts"), "--allowed-hosts", "head-node", "--login")
    with started(command, cwd=tmp_path, env=env, output=False) as server:
        wait_until(lambda: answers(base), 120, "the tracking server did not answer")
        create = {"name": "cluster"}
        assert _call(base, "/api/2.0/mlflow/experiments/create", create, host=f"rebound.example:{port}", user=login)[0] == 403
        assert _call(base, "/api/2.0/mlflow/experiments/create", create, host=f"head-node:{port}")[0] == 401  # no login
        assert _call(base, "/api/2.0/mlflow/experiments/create", create, host=f"head-node:{port}", user=("alice", "wrong"))[0] == 401
        code, made = _call(base, "/api/2.0/mlflow/experiments/create", create, host=f"head-node:{port}", user=login)
        assert code == 200, made
        code, run = _call(base, "/api/2.0/mlflow/runs/create", {"experiment_id": made["experiment_id"]}, host=f"head-node:{port}", user=login)
        assert code == 200 and run["run"]["info"]["status"] == "RUNNING"
        assert stop(server, signal.SIGTERM, 60)[0] == 143
    assert (tmp_path / "srv" / "basic_auth.db").is_file()  # the users beside the artifacts, not in the working folder
