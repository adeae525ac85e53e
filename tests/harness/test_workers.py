"""Multi-worker runs on one node, end to end on the CPU (gloo, 2 workers of 1 thread): ``run`` over Ray Train with a
worker killed (FAILED naming its rank) or stopped (KILLED, resumable), torchrun, and the bad input of multi-worker
sweeps. Trials over several nodes, and a node lost (the worker group restarted from the checkpoint), are in
``test_cluster.py``.

Each test checks MLflow afterwards: one run per trial (never one per worker), its per-epoch history complete and
without duplicates, nothing left RUNNING.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import main
from harness.track.mlflow import metric_history, search_runs
from tests.helpers.processes import started, stop, wait_for_runs
from tests.helpers.runs import CONFIG, TINY, env_for, harness_cmd, write_sweep

TWO = [*TINY, "backbone.name=test_resnet", "eval.baselines=false", "eval.semi.enabled=false", "tracking.experiment=workers"]
"""TINY with timm's smallest ResNet: gloo's all-reduce of resnet10t's 5M gradients between 2 workers of one thread
takes most of a step; test_resnet's epochs are 2-3 times faster."""


def _env(uri: str, ray_address: str | None = None) -> dict[str, str]:
    return env_for(uri, OMP_NUM_THREADS="1", **({"RAY_ADDRESS": ray_address} if ray_address else {}))


def _run_cmd(*overrides: str) -> list[str]:
    return harness_cmd("-q", "run", CONFIG, *TWO, "distributed.workers=2", "pretrain.epochs=6", "data.num_train=256", *overrides)


def _kill_rank_after_an_epoch(proc: subprocess.Popen, uri: str, rank: int) -> dict:
    """Wait for the run's first logged epoch, kill -9 the given rank's process; return the run as it was then."""

    def trained_an_epoch(runs: list[dict]) -> dict | None:
        ok = runs and "harness.workers" in runs[0]["tags"] and metric_history(runs[0]["run_id"], "train/loss", uri)
        return runs[0] if ok else None

    run = wait_for_runs("workers", uri, proc, trained_an_epoch, 240, "the run logged no epoch")
    pids = dict(re.findall(r"rank (\d+): pid (\d+)", run["tags"]["harness.workers"]))
    os.kill(int(pids[str(rank)]), signal.SIGKILL)
    return run


@pytest.mark.slow  # Ray Train jobs of 2 worker processes
def test_a_killed_worker_fails_the_run_naming_its_rank(tmp_path, tracking_uri, ray_address) -> None:
    search_runs("workers", tracking_uri)
    with started(_run_cmd(), cwd=tmp_path, env=_env(tracking_uri, ray_address)) as proc:
        run = _kill_rank_after_an_epoch(proc, tracking_uri, rank=1)
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    failed = search_runs("workers", tracking_uri)
    assert len(failed) == 1 and failed[0]["run_id"] == run["run_id"] and failed[0]["status"] == "FAILED"
    error = failed[0]["tags"]["harness.error"]
    assert error.startswith("rank 1: ") and "\n" not in error, error
    assert out.strip().splitlines()[-1].startswith("error: run failed: WorkerFailed: rank 1: "), out


@pytest.mark.slow  # Ray Train jobs of 2 worker processes
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun not installed")
def test_torchrun_two_workers_log_one_run(tmp_path, tracking_uri) -> None:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    search_runs("workers", tracking_uri)
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "harness", "-q", "run", CONFIG, *TWO]
    done = subprocess.run(cmd, cwd=tmp_path, env=_env(tracking_uri), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = search_runs("workers", tracking_uri)
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED"
    assert [s for s, _ in metric_history(runs[0]["run_id"], "train/loss", tracking_uri)] == [1, 2]
    assert done.stdout.count("eval/knn/top1") == 1  # rank 0 prints the results, the other rank nothing


@pytest.mark.slow  # two torchrun workers
@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun not installed")
def test_kill_9_of_a_torchrun_worker_fails_the_run_naming_its_rank(tmp_path, tracking_uri) -> None:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    search_runs("workers", tracking_uri)
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "harness", "-q", "run", CONFIG, *TWO, "pretrain.epochs=30", "data.num_train=256"]
    with started(cmd, cwd=tmp_path, env=_env(tracking_uri), stderr_apart=True, start_new_session=True) as proc:
        wait_for_runs("workers", tracking_uri, proc, lambda runs: runs and metric_history(runs[0]["run_id"], "train/loss", tracking_uri), 240, "no epoch logged")
        rank1 = _torchrun_worker(proc.pid, rank=1)
        os.kill(rank1, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    (run,) = search_runs("workers", tracking_uri)
    assert run["status"] == "FAILED"
    error = run["tags"]["harness.error"]
    assert error.startswith(f"rank 1: its process (pid {rank1} on ") and "\n" not in error, error
    ours = [line for line in err.splitlines() if line.startswith("error: ")]  # torchrun's own report follows
    assert ours == [f"error: run failed: WorkerFailed: {error}"], err
    assert "KeyboardInterrupt" not in err, err


def _torchrun_worker(agent: int, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (a child of the agent whose environment says RANK=rank)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
        if ppid == agent and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"torchrun (pid {agent}) has no worker of rank {rank}")


def test_a_half_set_torchrun_environment_is_bad_input(tmp_path, tracking_uri) -> None:
    env = {k: v for k, v in _env(tracking_uri).items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-m", "harness", "run", CONFIG, *TWO], cwd=tmp_path, env={**env, "RANK": "0", "WORLD_SIZE": "2"}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: torchrun environment half set: RANK, WORLD_SIZE set but LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing; launch with `torchrun --nproc-per-node W -m harness run CONFIG`, or unset them to run one process"
    assert not search_runs("workers", tracking_uri)


@pytest.mark.slow  # asks the Ray cluster what it has
def test_more_gpus_per_trial_than_the_cluster_has_is_bad_input(tmp_path, tracking_uri, ray_address, capsys) -> None:
    path = write_sweep(tmp_path, space={"method.temperature": [0.1]}, seeds=[0], resources={"workers": 2, "cpus": 1, "gpus": 1})
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: resources: 2 workers x 1 GPU need 2 GPUs per trial, the Ray cluster has 0", err
    assert not search_runs("unit", tracking_uri)


@pytest.mark.slow  # asks the Ray cluster what it has
def test_a_sweep_batch_that_does_not_split_over_its_workers_is_bad_input(tmp_path, tracking_uri, ray_address, capsys) -> None:
    path = write_sweep(tmp_path, space={"method.temperature": [0.1]}, seeds=[0], resources={"workers": 3})
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "the global batch 32 does not split over distributed.workers=3" in err and len(err.splitlines()) == 1, err


@pytest.mark.slow  # Ray Train jobs of 2 worker processes
def test_sigterm_to_a_multi_worker_run_leaves_it_killed_and_resumable(tmp_path, tracking_uri) -> None:
    search_runs("workers", tracking_uri)

    def trained(runs: list[dict]) -> bool:
        return bool(runs) and bool(metric_history(runs[0]["run_id"], "train/loss", tracking_uri))

    with started(_run_cmd("pretrain.epochs=40"), cwd=tmp_path, env=_env(tracking_uri)) as proc:  # its own local Ray
        wait_for_runs("workers", tracking_uri, proc, trained, 240, "the run logged no epoch")
        code, out = stop(proc, signal.SIGTERM)
    assert code == 143, out
    runs = search_runs("workers", tracking_uri)
    assert len(runs) == 1 and runs[0]["status"] == "KILLED" and runs[0]["tags"]["harness.stopped"] == "SIGTERM", runs
    assert "interrupted by SIGTERM: the MLflow run is KILLED; continue it with: python -m harness run" in out and "--resume " in out, out


def test_a_failed_worker_group_is_described_by_the_rank_that_failed_first() -> None:
    """Ray Train's failure of a worker group, as one line: the rank whose own error is not its peer's loss, and the
    lost node's id when a node died (the texts are Ray 2.60's and gloo's)."""
    from harness.launch.raytrain import describe_failure

    class WorkerHealthCheckFailedError(Exception):
        pass

    node = "dd71e29abeb0de37a00b2ed49b888a66bca8771ad747db4267cd34b6"
    died = WorkerHealthCheckFailedError(
        f"A worker health check failed.\nWorker info: Worker(\n  metadata=ActorMetadata(\n    node_id='{node}',\n  ),\n)\n"
        f"The actor died unexpectedly before finishing this task.\nThe actor died because its node has died. Node Id: {node}\n"
        "\tthe actor's node was terminated expectedly: received SIGTERM"
    )
    peer = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:4004: Connection reset by peer. This is typically caused by a remote worker hanging")
    group = type("TrainingFailedError", (Exception,), {})("group failed")
    group.worker_failures = {0: peer, 1: died}
    assert describe_failure(group) == (
        "rank 1: its node dd71e29abeb0 was lost (WorkerHealthCheckFailedError: the actor's node was terminated "
        "expectedly: received SIGTERM) (1 other rank(s) failed with it)"
    )
    group.worker_failures = {0: ValueError("bad batch"), 1: peer}
    assert describe_failure(group) == "rank 0: ValueError: bad batch (1 other rank(s) failed with it)"
