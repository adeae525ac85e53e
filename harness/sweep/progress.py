"""A sweep's live progress: per running trial its epoch, last loss and online kNN, the sweep's done/total and an
estimate of the time left, read from the trials' MLflow runs every few seconds.

On a terminal it is one status block redrawn in place under the driver's event lines; elsewhere (a log file, CI)
plain lines, less often. ``-q`` shows nothing.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["Progress"]

TERMINAL_EVERY_S = 5.0
"""How often a terminal's status block is redrawn."""
PLAIN_EVERY_S = 60.0
"""How often plain progress lines are printed when the output is not a terminal."""


class Progress:
    """Event lines (``line``) and, in between, the running trials' progress (a thread polling MLflow).

    ``latest(key)`` returns what a running trial has logged so far: ``(epoch, loss, online kNN or None)``, or None
    when it has logged no epoch yet."""

    def __init__(
        self,
        total: int,
        epochs: dict[str, int],
        latest: Callable[[str], tuple[int, float, float | None] | None],
        started: float,
        stream: TextIO | None = None,
        every_s: float | None = None,
    ) -> None:
        self.total, self.epochs, self.latest, self.started = total, epochs, latest, started
        self.stream = stream or sys.stdout
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s if every_s is not None else (TERMINAL_EVERY_S if self.terminal else PLAIN_EVERY_S)
        self.done = 0
        self.done_here = 0  # ended in this invocation: the basis of the estimate (a resumed sweep's earlier ones not)
        self.running: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._drawn = 0  # lines of the status block now on the terminal
        self._thread: threading.Thread | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def line(self, text: str) -> None:
        """An event line (a trial started, finished, failed); the status block stays below it."""
        with self._lock:
            self._clear()
            print(text, file=self.stream, flush=True)
            if self.terminal and self.running:
                self._draw(self._status(dict(self.running)))

    def start_trial(self, key: str) -> None:
        with self._lock:
            self.running[key] = time.perf_counter()

    def end_trial(self, key: str) -> None:
        with self._lock:
            self.running.pop(key, None)
            self.done += 1
            self.done_here += 1

    def __enter__(self) -> Progress:
        self._thread = threading.Thread(target=self._loop, name="sweep-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            self._clear()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            with contextlib.suppress(Exception):  # progress is a courtesy: a store hiccup must not end the sweep
                with self._lock:
                    running = dict(self.running)
                lines = self._status(running)
                with self._lock:
                    if self.terminal:
                        self._clear()
                        self._draw(lines)
                    else:
                        for text in lines:
                            print(text, file=self.stream, flush=True)

    def _status(self, running: dict[str, float]) -> list[str]:
        """The block: one line per running trial, then the sweep's totals and the estimate of the time left."""
        lines = []
        for key in sorted(running):
            seen = self.latest(key)
            if seen is None:
                what = "starting"
            else:
                epoch, loss, knn = seen
                what = f"epoch {epoch}/{self.epochs.get(key, '?')}  loss {loss:.4f}"
                what += f"  online kNN {knn:.3f}" if knn is not None else ""
            lines.append(f"  running {key}: {what} ({time.perf_counter() - running[key]:.0f} s)")
        elapsed = self.elapsed()
        left = ""
        if self.done_here:
            left = f", about {_duration(elapsed / self.done_here * (self.total - self.done))} left"
        lines.append(f"  {self.done}/{self.total} trials done, {len(running)} running, {elapsed:.0f} s{left}")
        return lines

    def _draw(self, lines: list[str]) -> None:
        print("\n".join(lines), file=self.stream, flush=True)
        self._drawn = len(lines)

    def _clear(self) -> None:
        if self.terminal and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # up to the block's first line, erase to the end
            self.stream.flush()
        self._drawn = 0


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
