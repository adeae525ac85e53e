"""A sweep's live progress block: what it shows per running trial, its totals and estimate, on a terminal and not."""

from __future__ import annotations

import io
import time

from harness.sweep.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def seen(key: str):
    return {"a": (3, 1.23456, 0.5), "b": None, "c": (1, 2.0, None)}[key]


def test_plain_lines_name_each_running_trial_its_epoch_loss_and_online_knn() -> None:
    out = io.StringIO()
    progress = Progress(4, {"a": 10, "b": 10, "c": 5}, seen, started=time.perf_counter() - 100, stream=out, every_s=0.05)
    progress.done = 1  # finished before a resume: not the basis of the estimate
    for key in ("a", "b", "c"):
        progress.start_trial(key)
    with progress:
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()  # not a terminal: plain lines
    assert "  running a: epoch 3/10  loss 1.2346  online kNN 0.500 (0 s)" in lines
    assert "  running b: starting (0 s)" in lines
    assert "  running c: epoch 1/5  loss 2.0000 (0 s)" in lines
    assert any(line.startswith("  1/4 trials done, 3 running, 10") and "left" not in line for line in lines)
    progress.end_trial("a")  # one ended here after ~100 s: 2 more to go at that rate
    (totals,) = [line for line in progress._status({}) if "trials done" in line]
    assert totals.startswith("  2/4 trials done, 0 running, 10") and totals.endswith("s, about 3 min left")


def test_on_a_terminal_the_block_is_redrawn_in_place_under_the_event_lines() -> None:
    out = Terminal()
    progress = Progress(2, {"a": 10}, seen, started=time.perf_counter(), stream=out, every_s=0.05)
    progress.start_trial("a")
    with progress:
        time.sleep(0.2)
        progress.line("[0/2 1 s] a: started")
        time.sleep(0.2)
    text = out.getvalue()
    assert "\x1b[2F\x1b[J" in text  # up two lines (the trial and the totals), erased, drawn again
    assert text.count("[0/2 1 s] a: started") == 1
    assert text.endswith("\x1b[2F\x1b[J")  # the block is gone when the sweep ends: the summary follows plainly
