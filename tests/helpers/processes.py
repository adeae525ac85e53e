"""Processes the tests start: with a deadline, killed on the way out, and watched through MLflow.

    with started(harness_cmd("-q", "sweep", path), cwd=tmp_path, env=env_for(uri)) as driver:
        runs = wait_for_runs("unit", uri, driver, lambda runs: finished_children(runs), 240, "no trial finished")
        code, out = stop(driver, signal.SIGTERM)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from harness.track.mlflow import search_runs

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, every_s: float = 0.2) -> T:
    """``predicate()``'s first truthy value within ``timeout_s``, else TimeoutError saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every_s)
    raise TimeoutError(f"{what} within {timeout_s} s")


def answers(base: str) -> bool:
    """Whether an MLflow server at ``base`` (http://HOST:PORT) answers its health check."""
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def started(
    cmd: list[str], *, cwd: Path, env: dict[str, str], output: bool = True, stderr_apart: bool = False, **popen: Any
) -> Iterator[subprocess.Popen]:
    """``cmd`` running, its output as text: stdout and stderr together (``stderr_apart``: each its own pipe), or
    none (``output`` False); killed if still running on the way out, whatever happened inside."""
    err = subprocess.PIPE if stderr_apart else subprocess.STDOUT
    streams = {"stdout": subprocess.PIPE, "stderr": err} if output else {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, text=True, **{**streams, **popen})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout_s: float = 120) -> tuple[int, str]:
    """Send ``sig`` and wait: (exit code, what it printed: on stderr alone when that has a pipe of its own)."""
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, (err if proc.stderr is not None else out) or ""


def wait_for_runs(experiment: str, uri: str, proc: subprocess.Popen, found: Callable[[list[dict]], T], timeout_s: float, what: str) -> T:
    """Poll ``experiment``'s runs until ``found(runs)`` is truthy and return it; AssertionError with the process's
    output if it ends first or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if value := found(search_runs(experiment, uri)):
            return value
    out = proc.communicate(timeout=60)[0] if proc.poll() is not None else ""
    raise AssertionError(f"{what} within {timeout_s} s:\n{out}")


def children(runs: list[dict], status: str | None = None) -> list[dict]:
    """The child runs (trials) among ``runs``, with ``status`` if given."""
    return [r for r in runs if "mlflow.parentRunId" in r["tags"] and (status is None or r["status"] == status)]


def pids_with(text: str) -> list[int]:
    """Processes (not this one) whose command line contains ``text``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(entry.name))
            except OSError:
                pass
    return out
