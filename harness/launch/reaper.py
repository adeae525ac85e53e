"""Ends a local Ray instance's processes when the process that started it dies, however it dies.

``ray.shutdown()`` stops a local instance when the driver ends normally or by a signal it
handles; after ``kill -9`` of the driver some of Ray's processes (its dashboard and
runtime-env agents) outlive it. :func:`watch` starts this module as a small process of
its own session, which waits for the driver to die and then kills every process that
still holds a file of the instance's session folder. :func:`release` tells it the
instance was shut down cleanly (it then exits without doing anything).

    python -m harness.launch.reaper DRIVER_PID SESSION_DIR      # started by harness.launch.raytune, not by hand
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["holders", "release", "watch"]

_watcher: subprocess.Popen[bytes] | None = None


def watch(session_dir: str) -> None:
    """Start the watcher of this process for ``session_dir`` (Linux; elsewhere, nothing)."""
    global _watcher
    if not Path("/proc/self/fd").is_dir():
        return
    _watcher = subprocess.Popen(
        [sys.executable, "-m", "harness.launch.reaper", str(os.getpid()), session_dir],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )


def release() -> None:
    """The instance was shut down: stop the watcher without reaping anything."""
    global _watcher
    if _watcher is not None and _watcher.poll() is None:
        _watcher.terminate()
        _watcher.wait(timeout=10)
    _watcher = None


def holders(folder: str) -> list[int]:
    """Processes (other than this one) with an open file under ``folder``, from ``/proc``."""
    prefix, me, out = folder.rstrip("/") + "/", os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            links = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
        except OSError:  # gone, or not ours to read
            continue
        if any(link.startswith(prefix) for link in links):
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}").is_dir() and "zombie" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    except (OSError, IndexError):
        return ""


def _main(driver: int, session_dir: str) -> int:
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))  # released: exit quietly
    while not stop[0] and _alive(driver):
        time.sleep(1.0)
    if stop[0]:
        return 0
    time.sleep(3.0)  # let Ray's own clean-up run first
    for pid in holders(session_dir):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(_main(int(sys.argv[1]), sys.argv[2]))
