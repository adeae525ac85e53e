"""Stop signals: SIGTERM is handled like SIGINT (Ctrl-C) everywhere, and the one that arrived is remembered.

Slurm, Kubernetes and Ray send SIGTERM before killing a job. :func:`install` makes it
take the same path as Ctrl-C: it is passed on to whatever handles SIGINT at that moment
(Python's, which raises ``KeyboardInterrupt`` where the program is, or Ray Tune's, which
stops a sweep gracefully), so runs end KILLED, checkpoints stay, and the process exits
with ``128 + signal`` (130 for SIGINT, 143 for SIGTERM).

    install()                          # once, in the CLI (again after ray.init, which replaces it)
    ...
    except KeyboardInterrupt:
        return exit_code()             # 130 or 143
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["exit_code", "exit_quietly", "held", "install", "received", "stop_reason"]

_received: list[int] = []


def install() -> None:
    """Route SIGTERM to the current SIGINT handler and record every stop signal (main thread only)."""
    signal.signal(signal.SIGTERM, _on_term)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_int)


def _on_int(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    raise KeyboardInterrupt


def _on_term(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not _on_int:
        handler(signal.SIGINT, frame)  # e.g. Ray Tune's graceful stop
    else:
        raise KeyboardInterrupt


def exit_quietly(code: int) -> None:
    """Once the command is done: a stop signal while the interpreter shuts down (torchrun ends every worker when one
    fails; atexit handlers may still run) exits with ``code`` at once instead of a KeyboardInterrupt traceback."""

    def leave(signum: int, frame: FrameType | None) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, leave)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A block a stop signal must not cut short, such as writing a run's final status: a SIGINT or SIGTERM that
    arrives inside it is recorded, and delivered once the block ends unless the process is ending on an exception
    anyway (one being handled where the block began, or one leaving it). Outside the main thread, a plain block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = (signal.SIGINT, signal.SIGTERM)
    before = {stop: signal.getsignal(stop) for stop in stops}
    arrived: list[int] = []
    for stop in stops:
        signal.signal(stop, lambda signum, frame: arrived.append(signum))
    ending = sys.exc_info()[1] is not None
    try:
        yield
    except BaseException:
        ending = True
        raise
    finally:
        for stop, handler in before.items():
            signal.signal(stop, handler)
        if arrived and ending:
            _received.extend(s for s in arrived if s not in _received)
        elif arrived:
            signal.raise_signal(arrived[0])  # to the handler the block replaced


def received() -> int | None:
    """The first stop signal received, or None."""
    return _received[0] if _received else None


def stop_reason() -> str:
    """What stopped the process, for the ``harness.stopped`` tag: ``SIGTERM``, else ``SIGINT`` (Ctrl-C)."""
    return signal.Signals(received() or signal.SIGINT).name


def exit_code() -> int:
    """``128 + signal``: 143 after SIGTERM, 130 after SIGINT or a plain KeyboardInterrupt."""
    return 128 + int(received() or signal.SIGINT)
