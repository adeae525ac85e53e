"""Sweeps on a real local Ray instance: a failing trial, Ctrl-C and --resume, ASHA stopping trials early.

Every test checks MLflow afterwards: one parent, one child per trial, none left RUNNING.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.sweep.driver import child_runs, latest_parent
from harness.track.mlflow import metric_history, search_runs
from tests.helpers.processes import children, started, stop, wait_for_runs
from tests.helpers.runs import env_for, harness_cmd, tiny_run, write_sweep

pytestmark = pytest.mark.slow  # every test starts a local Ray (or two) and runs real trials


def children_by_name(experiment: str, uri: str) -> dict[str, dict]:
    parent = latest_parent(experiment, uri)
    assert parent is not None
    return {r["run_name"]: r for r in child_runs(experiment, parent["run_id"], uri)}


def test_a_failing_trial_does_not_stop_the_others(ray_address, tmp_path, tracking_uri, capsys) -> None:
    # a learning rate of 1e12 makes the loss non-finite within the first epoch
    path = write_sweep(tmp_path, space={"pretrain.base_lr": [0.3, 1.0e12]}, seeds=[0, 1], max_concurrent=2)
    assert main(["sweep", str(path), "--results", str(tmp_path / "results")]) == 1
    captured = capsys.readouterr()
    assert "2 of 4 trials failed" in captured.err
    assert "loss diverged at epoch 1" in captured.err
    runs = children_by_name("unit", tracking_uri)
    assert len(runs) == 4
    for name, run in runs.items():
        if "1000000000000.0" in name:
            assert run["status"] == "FAILED", name
            assert "loss diverged at epoch 1" in run["tags"]["harness.error"]
        else:
            assert run["status"] == "FINISHED", name
            assert 0.0 <= run["metrics"]["eval/knn/top1"] <= 1.0
            assert run["params"]["pretrain.base_lr"] == "0.3"
            assert run["tags"]["swept.pretrain.base_lr"] == "0.3"
    assert latest_parent("unit", tracking_uri)["status"] == "FAILED"
    table = (tmp_path / "results" / "unit" / "table.md").read_text()
    assert "2/2 failed" in table and "| ok |" in table


def test_asha_stops_trials_and_no_run_is_left_running(ray_address, tmp_path, tracking_uri) -> None:
    # train/lr is proportional to base_lr, so with trials run one at a time the lower ones lose at the first rung
    space = {"pretrain.base_lr": [0.4, 0.2, 0.1]}
    scheduler = {"name": "asha", "metric": "train/lr", "mode": "max", "grace_period": 1, "reduction_factor": 2}
    path = write_sweep(tmp_path, space=space, seeds=[0], max_concurrent=1, scheduler=scheduler)
    assert main(["sweep", str(path), "pretrain.epochs=3", "--results", str(tmp_path / "results")]) == 0
    runs = children_by_name("unit", tracking_uri)
    assert {r["status"] for r in runs.values()} <= {"FINISHED", "KILLED"}
    first = runs["pretrain.base_lr=0.4 seed=0"]
    assert first["status"] == "FINISHED" and "eval/knn/top1" in first["metrics"]
    stopped = [r for r in runs.values() if r["status"] == "KILLED"]
    assert stopped, "ASHA stopped no trial"
    for r in stopped:
        assert r["tags"]["harness.stopped"].startswith("stopped early by the scheduler after epoch")
        assert "eval/knn/top1" not in r["metrics"]
    assert latest_parent("unit", tracking_uri)["status"] == "FINISHED"
    # each child run opens when its trial starts and ends when it ends: one at a time, the runs follow each other
    spans = sorted((r["start_time"], r["end_time"]) for r in runs.values())
    assert all(start >= before_end - 2000 for (_, before_end), (start, _) in itertools.pairwise(spans)), spans


def test_asha_on_the_online_knn_stops_trials_reported_every_other_epoch(ray_address, tmp_path, tracking_uri) -> None:
    """online/knn_top1 is reported after epochs 2 and 3 only (not in epoch 1's report): ASHA decides at epoch 2.

    On digits the first trial's 128-item kNN bank scores about 0.7; the second's single-item bank predicts one class
    for every test item (about 0.1), so it loses at the first rung, with trials run one at a time."""
    run = {**tiny_run(), "data": {"name": "digits", "num_train": 128, "num_test": 64, "image_size": 16}}
    run["eval"] = {**run["eval"], "online": {"every": 2}, "linear": {"enabled": False}, "semi": {"enabled": False}, "retrieval": {"enabled": False}}
    scheduler = {"name": "asha", "metric": "online/knn_top1", "mode": "max", "grace_period": 1, "reduction_factor": 2}
    path = write_sweep(tmp_path, run=run, space={"eval.online.num_train": [128, 1]}, seeds=[0], max_concurrent=1, scheduler=scheduler)
    assert main(["sweep", str(path), "pretrain.epochs=3", "--results", str(tmp_path / "results")]) == 0
    runs = children_by_name("unit", tracking_uri)
    first, second = runs["eval.online.num_train=128 seed=0"], runs["eval.online.num_train=1 seed=0"]
    assert first["status"] == "FINISHED" and "eval/knn/top1" in first["metrics"]
    assert [step for step, _ in metric_history(first["run_id"], "online/knn_top1", tracking_uri)] == [2, 3]
    assert second["status"] == "KILLED", second["status"]
    assert second["tags"]["harness.stopped"] == "stopped early by the scheduler after epoch 2"
    assert "eval/knn/top1" not in second["metrics"]
    assert second["metrics"]["online/knn_top1"] < first["metrics"]["online/knn_top1"]
    assert latest_parent("unit", tracking_uri)["status"] == "FINISHED"


def test_sigint_sigterm_and_kill_9_each_then_resume_rerun_nothing_that_finished(tmp_path, tracking_uri) -> None:
    """Ctrl-C, a scheduler's SIGTERM and kill -9 of the driver, each after one more trial finished and each followed
    by --resume: no finished trial is rerun, a handled signal leaves nothing RUNNING and says how to continue, and
    the last --resume completes the sweep with one parent and one run per trial."""
    path = write_sweep(tmp_path, space={"method.temperature": [0.1, 0.2, 0.3, 0.5, 1.0]}, seeds=[0], max_concurrent=1)
    env = env_for(tracking_uri)
    cmd = harness_cmd("-q", "sweep", str(path), "pretrain.epochs=3")
    assert search_runs("unit", tracking_uri) == []  # creates the store now: two processes must not both migrate it
    done: dict[str, dict] = {}
    history: dict[str, list] = {}
    for round_, sig in enumerate([signal.SIGINT, signal.SIGTERM, signal.SIGKILL]):
        more = len(done) + 1
        with started([*cmd, "--resume"] if round_ else cmd, cwd=tmp_path, env=env) as driver:
            wait_for_runs("unit", tracking_uri, driver, lambda runs, n=more: len(children(runs, "FINISHED")) >= n, 240, "no trial finished")
            code, out = stop(driver, sig)
        assert not (tmp_path / "results").exists()  # no half-written tables: they come with the completed sweep
        now = children_by_name("unit", tracking_uri)
        assert len(now) <= 5  # a trial that never started has no run yet
        for name, run in done.items():  # not rerun: same end time, same logged losses and metrics
            assert now[name]["status"] == "FINISHED" and now[name]["end_time"] == run["end_time"], name
            assert now[name]["metrics"] == run["metrics"]
            assert metric_history(run["run_id"], "train/loss", tracking_uri) == history[name]
        done = {n: r for n, r in now.items() if r["status"] == "FINISHED"}
        assert len(done) >= more
        history = {n: metric_history(r["run_id"], "train/loss", tracking_uri) for n, r in done.items()}
        if sig != signal.SIGKILL:  # a signal the driver handles: nothing left RUNNING, each run says what stopped it
            assert code == 128 + sig, out
            assert f"continue with: python -m harness sweep {path} pretrain.epochs=3 --resume" in out  # pasteable
            assert "Tuner.restore" not in out  # Ray's own hint, which would start a bare Tune run
            assert {r["status"] for r in now.values()} <= {"FINISHED", "KILLED"}, {n: r["status"] for n, r in now.items()}
            assert all(r["tags"]["harness.stopped"].startswith(sig.name) for r in now.values() if r["status"] == "KILLED")
            assert latest_parent("unit", tracking_uri)["status"] == "KILLED"

    t0 = time.monotonic()
    resumed = subprocess.run(  # not -q: a progress line per trial it runs
        harness_cmd("sweep", str(path), "pretrain.epochs=3", "--resume"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
    )
    wall = time.monotonic() - t0
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    counters = [tuple(map(int, m)) for m in re.findall(r"^\[(\d+)/(\d+) ", resumed.stdout, flags=re.M)]
    assert all(finished <= total == 5 for finished, total in counters), resumed.stdout
    elapsed = [int(s) for s in re.findall(r"^\[\d+/\d+ +(\d+) s\]", resumed.stdout, flags=re.M)]
    assert all(0 <= s <= wall + 1 for s in elapsed), (wall, resumed.stdout)  # counted from when the command started
    assert bool(counters) == (len(done) < 5), resumed.stdout  # a progress line per trial it ran, if any was left
    after = children_by_name("unit", tracking_uri)
    assert len(after) == 5 and set(now) <= set(after)  # one run per trial, none duplicated
    assert [after[n]["run_id"] for n in now] == [r["run_id"] for r in now.values()]
    assert all(r["status"] == "FINISHED" and "eval/knn/top1" in r["metrics"] for r in after.values())
    for name, run in done.items():
        assert metric_history(run["run_id"], "train/loss", tracking_uri) == history[name]
        assert after[name]["metrics"] == run["metrics"] and after[name]["end_time"] == run["end_time"]
    for run in after.values():  # no epoch and no final metric logged twice
        steps = [step for step, _ in metric_history(run["run_id"], "train/loss", tracking_uri)]
        assert steps == [1, 2, 3], steps
        assert len(metric_history(run["run_id"], "eval/knn/top1", tracking_uri)) == 1
    assert len([r for r in search_runs("unit", tracking_uri) if r["tags"].get("harness.role") == "sweep"]) == 1
    assert latest_parent("unit", tracking_uri)["status"] == "FINISHED"
    assert not [r for r in search_runs("unit", tracking_uri) if "harness.stopped" in r["tags"]]  # finished, not stopped
    table = (tmp_path / "results" / "unit" / "table.csv").read_text().splitlines()
    assert len(table) == 1 + 5 and all(",ok," in line for line in table[1:])
    assert json.loads((tmp_path / "outputs" / "sweeps" / "unit" / "state.json").read_text())["complete"] is True


def test_sigterm_to_a_trials_worker_leaves_it_killed_and_resumable(tmp_path, tracking_uri) -> None:
    """A node preempted under a running trial: that trial is KILLED (not FAILED), the others finish, --resume completes it."""
    path = write_sweep(tmp_path, space={"method.temperature": [0.1, 0.5]}, seeds=[0], max_concurrent=1)
    env = env_for(tracking_uri)
    cmd = harness_cmd("-q", "sweep", str(path), "pretrain.epochs=6")
    search_runs("unit", tracking_uri)  # create the store before the driver

    def a_training_worker(runs: list[dict]) -> int | None:
        running = children(runs, "RUNNING")
        if running and metric_history(running[0]["run_id"], "train/loss", tracking_uri):
            return next(iter(_trial_workers(tracking_uri)), None)
        return None

    with started(cmd, cwd=tmp_path, env=env) as driver:
        worker = wait_for_runs("unit", tracking_uri, driver, a_training_worker, 240, "no trial worker found running")
        os.kill(worker, signal.SIGTERM)  # the worker alone, as a preempted node's
        out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 143, out
    runs = children_by_name("unit", tracking_uri)
    killed = [r for r in runs.values() if r["status"] == "KILLED"]
    assert len(killed) == 1 and killed[0]["tags"]["harness.stopped"].startswith("SIGTERM to the trial's worker"), {n: r["status"] for n, r in runs.items()}
    assert [r["status"] for r in runs.values() if r is not killed[0]] == ["FINISHED"]
    assert "harness.error" not in killed[0]["tags"]

    resumed = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = children_by_name("unit", tracking_uri)
    assert all(r["status"] == "FINISHED" for r in after.values())
    assert [s for s, _ in metric_history(killed[0]["run_id"], "train/loss", tracking_uri)] == [1, 2, 3, 4, 5, 6]


def _trial_workers(uri: str) -> list[int]:
    """Ray worker processes running a trial of the driver that logs to ``uri`` (their environment says so)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::ImplicitFunc") and f"MLFLOW_TRACKING_URI={uri}".encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def test_a_local_instance_runs_its_workers_at_normal_priority(ray_address) -> None:
    """Ray's default nice 15 starves a local sweep's trials of a laptop's cores whenever anything else runs."""
    import os

    import ray

    from harness.launch.raytune import WORKER_NICENESS_ENV

    if os.environ.get("RAY_ADDRESS") or os.environ.get(WORKER_NICENESS_ENV, "0") != "0":
        pytest.skip("a cluster's (or the user's) setting, not the local instance's")

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == os.nice(0)
