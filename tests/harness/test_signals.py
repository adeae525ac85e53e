"""Stop signals in this process: SIGTERM takes Ctrl-C's path, and a signal that arrives while a run's final status is
written waits until it is written (torchrun stops every worker when one dies, maybe while rank 0 writes FAILED)."""

from __future__ import annotations

import os
import signal

import pytest

from harness import signals
from harness.track.mlflow import search_runs, start_run


@pytest.fixture
def routed(monkeypatch):
    """``signals.install()`` for one test, with a fresh record of signals; the process's handlers are put back."""
    monkeypatch.setattr(signals, "_received", [])
    saved = {stop: signal.getsignal(stop) for stop in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signals.install()
    yield
    for stop, handler in saved.items():
        signal.signal(stop, handler)


def test_sigterm_raises_keyboard_interrupt_and_is_remembered(routed) -> None:
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
    assert signals.received() == signal.SIGTERM and signals.exit_code() == 143 and signals.stop_reason() == "SIGTERM"


def test_a_signal_inside_held_is_delivered_when_the_block_ends(routed) -> None:
    done = []
    with pytest.raises(KeyboardInterrupt), signals.held():
        os.kill(os.getpid(), signal.SIGTERM)
        done.append("the rest of the block")
    assert done == ["the rest of the block"]
    assert signals.received() == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signals._on_term  # the handler is back


def test_a_signal_inside_held_while_an_error_is_handled_is_only_recorded(routed) -> None:
    with pytest.raises(ValueError, match="the first error"):
        try:
            raise ValueError("the first error")
        except ValueError:
            with signals.held():
                os.kill(os.getpid(), signal.SIGTERM)
            raise
    assert signals.received() == signal.SIGTERM


def test_a_sigterm_while_a_failed_run_is_written_leaves_it_failed(routed, tracking_uri, monkeypatch) -> None:
    from harness.track import mlflow as tracking

    set_tags = tracking.Run.set_tags

    def set_tags_then_sigterm(self, tags):  # the launcher's SIGTERM lands between the error tag and the status
        set_tags(self, tags)
        if "harness.error" in tags:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tracking.Run, "set_tags", set_tags_then_sigterm)
    with pytest.raises(RuntimeError, match="a collective failed"), start_run("held", uri=tracking_uri):
        raise RuntimeError("a collective failed")
    (run,) = search_runs("held", tracking_uri)
    assert run["status"] == "FAILED" and run["tags"]["harness.error"] == "RuntimeError: a collective failed"


def test_a_second_signal_while_a_killed_run_is_written_leaves_it_killed(routed, tracking_uri, monkeypatch) -> None:
    from harness.track import mlflow as tracking

    end = tracking.Run.end

    def sigint_then_end(self, status):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C pressed again
        end(self, status)

    monkeypatch.setattr(tracking.Run, "end", sigint_then_end)
    with pytest.raises(KeyboardInterrupt), start_run("held", uri=tracking_uri):
        os.kill(os.getpid(), signal.SIGTERM)
    (run,) = search_runs("held", tracking_uri)
    assert run["status"] == "KILLED" and run["tags"]["harness.stopped"] == "SIGTERM"
