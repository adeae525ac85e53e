"""Sweeps on a real local Ray instance: a failing trial, Ctrl-C and --resume, ASHA stopping trials early.

Every test checks MLflow afterwards: one parent, one child per trial, none left RUNNING.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import raytune
from harness.cli import main
from harness.sweep import child_runs, latest_parent
from harness.tracking import metric_history, search_runs
from tests.test_sweep import write_sweep

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray for the module's in-process sweeps (a sweep leaves a running instance alone)."""
    started = raytune.init(None)
    yield
    if started:
        raytune.shutdown()


def children_by_name(experiment: str, uri: str) -> dict[str, dict]:
    parent = latest_parent(experiment, uri)
    assert parent is not None
    return {r["run_name"]: r for r in child_runs(experiment, parent["run_id"], uri)}


def test_a_failing_trial_does_not_stop_the_others(ray_instance, tmp_path, tracking_uri, capsys) -> None:
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


def test_asha_stops_trials_and_no_run_is_left_running(ray_instance, tmp_path, tracking_uri) -> None:
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


def test_interrupt_then_resume_reruns_nothing_that_finished(tmp_path, tracking_uri) -> None:
    path = write_sweep(tmp_path, space={"method.temperature": [0.1, 0.2, 0.5]}, seeds=[0], max_concurrent=1)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "harness", "-q", "sweep", str(path), "pretrain.epochs=3"]
    assert search_runs("unit", tracking_uri) == []  # creates the store now: two processes must not both migrate it
    driver = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        finished: list[dict] = []
        while time.monotonic() < deadline and driver.poll() is None:
            time.sleep(1)
            runs = search_runs("unit", tracking_uri)
            finished = [r for r in runs if r["status"] == "FINISHED" and "mlflow.parentRunId" in r["tags"]]
            if finished:
                break
        assert finished, "no trial finished before the deadline"
        driver.send_signal(signal.SIGINT)  # Ctrl-C
        out, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, out
    assert "--resume" in out
    assert not (tmp_path / "results").exists()  # no half-written tables: they come with the completed sweep
    before = children_by_name("unit", tracking_uri)
    assert len(before) == 3
    assert {r["status"] for r in before.values()} <= {"FINISHED", "KILLED"}, {n: r["status"] for n, r in before.items()}
    done_before = {n: r for n, r in before.items() if r["status"] == "FINISHED"}
    history = {n: metric_history(r["run_id"], "train/loss", tracking_uri) for n, r in done_before.items()}
    assert latest_parent("unit", tracking_uri)["status"] == "KILLED"

    resumed = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = children_by_name("unit", tracking_uri)
    assert set(after) == set(before)  # no run duplicated
    assert [r["run_id"] for r in after.values()] == [before[n]["run_id"] for n in after]
    assert all(r["status"] == "FINISHED" and "eval/knn/top1" in r["metrics"] for r in after.values())
    for name, run in done_before.items():  # not rerun: same end time, same logged losses
        assert metric_history(run["run_id"], "train/loss", tracking_uri) == history[name]
        assert after[name]["metrics"] == run["metrics"]
    assert len([r for r in search_runs("unit", tracking_uri) if r["tags"].get("harness.role") == "sweep"]) == 1
    assert latest_parent("unit", tracking_uri)["status"] == "FINISHED"
    table = (tmp_path / "results" / "unit" / "table.csv").read_text().splitlines()
    assert len(table) == 1 + 3 and all(",ok," in line for line in table[1:])
    assert json.loads((tmp_path / "outputs" / "sweeps" / "unit" / "state.json").read_text())["complete"] is True
