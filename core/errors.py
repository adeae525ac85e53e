"""The two kinds of failure the CLI distinguishes.

``BadInput`` (exit code 2) is raised before anything runs: usage, config, a
missing dataset, an unknown name. ``RunFailed`` (exit code 1) is raised while
running: a diverged loss, an error inside training or evaluation.
Messages are one line and name the bad key, file or value and what would be
accepted.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path


class HarnessError(Exception):
    """Base class for errors the CLI reports as one line."""

    exit_code = 1


class BadInput(HarnessError):
    """The user's input (config, override, path, name) is wrong. Exit code 2."""

    exit_code = 2


class ConfigError(BadInput):
    """A config value or key is wrong; the message starts with the dotted key."""


class DataNotFound(BadInput):
    """A dataset's files are not where the config says they are."""


class RunFailed(HarnessError):
    """A failure while running (diverged loss, runtime error). Exit code 1."""


class Diverged(RunFailed):
    """The training loss became NaN or infinite."""


class WorkerFailed(RuntimeError):
    """A worker of a multi-worker run died or raised (after any restarts); the message is one line naming its rank.
    Not a :class:`RunFailed`: the CLI prints it as ``run failed: WorkerFailed: rank R: ...``."""


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGINT, SIGTERM) ended a run; ``checkpoint`` is its last complete one, to resume from
    (None when no epoch had ended). A KeyboardInterrupt, so every handler of Ctrl-C handles it."""

    def __init__(self, checkpoint: Path | None) -> None:
        super().__init__(str(checkpoint or ""))
        self.checkpoint = checkpoint


def suggest(name: str, known: Iterable[str], n: int = 3) -> str:
    """Return ``" (did you mean 'a', 'b'?)"`` for the closest known names, or ``""``."""
    close = difflib.get_close_matches(name, list(known), n=n, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + ", ".join(repr(c) for c in close) + "?)"
