"""Several Ray nodes on this host (Ray's own ``ray.cluster_utils.Cluster``: a raylet per node, each with its own node
id and resources), as a cluster user meets them: the checks at the start of a sweep that spans nodes, trials whose
workers land on different nodes and log over HTTP to ``harness server``, and a node lost in the middle of a trial.

The cluster: three nodes of 1 CPU each (a head and two workers), so the 2 workers of a trial always sit on two
different nodes, and after a worker node is lost the other two still hold a run's workers.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.cli import main
from harness.sweep.driver import child_runs, latest_parent
from harness.track.mlflow import metric_history, search_runs
from tests.helpers.processes import answers, children, free_port, started, stop, wait_for_runs, wait_until
from tests.helpers.runs import CONFIG, TINY, env_for, harness_cmd, new_store, tiny_run, write_sweep

pytestmark = pytest.mark.slow  # three raylets

TWO = ["backbone.name=test_resnet", "eval.baselines=false", "eval.semi.enabled=false"]
"""Trials of timm's smallest ResNet (gloo's all-reduce between 1-thread workers is most of a resnet10t step)."""


@pytest.fixture(scope="module")
def cluster():
    """A head node and two worker nodes of 1 CPU each, started once for the module (3 raylets take 12-20 s)."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("a Ray is already connected in this process")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.delenv("RAY_ADDRESS", raising=False)
        made = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            yield made
        finally:
            if ray.is_initialized():
                ray.shutdown()
            made.shutdown()


@pytest.fixture
def nodes(cluster):
    """The module's cluster with its two worker nodes (a test that removed one gets a new one); no Ray connected in
    this process afterwards."""
    import ray

    while len(cluster.worker_nodes) < 2:
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()


def workers_of(run: dict) -> dict[int, tuple[int, str]]:
    """Rank -> (pid, node id prefix), from the run's ``harness.workers`` tag."""
    found = re.findall(r"rank (\d+): pid (\d+) on \S+ \(node ([0-9a-f]{12})\)", run["tags"].get("harness.workers", ""))
    return {int(rank): (int(pid), node) for rank, pid, node in found}


def test_a_sweep_over_several_nodes_refuses_a_sqlite_store_before_any_run(nodes, tmp_path, tracking_uri, capsys) -> None:
    path = write_sweep(tmp_path, seeds=[0], address=nodes.address)
    assert main(["-q", "sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: tracking.uri: {tracking_uri} is a SQLite file on this machine, but the Ray cluster has 3 nodes whose "
        "trials log to it; start `python -m harness server` on the head node and set tracking.uri: http://HEAD:5000"
    ], err
    assert search_runs("unit", tracking_uri) == []  # refused before the sweep's parent run
    assert os.environ.get("RAY_ADDRESS") is None


def test_two_worker_trials_on_different_nodes_log_over_http_and_asha_stops_some(nodes, tmp_path, monkeypatch, capsys) -> None:
    """A sweep of 2-worker trials on the cluster: each trial's workers on two nodes, one MLflow run per trial logged
    through ``harness server`` bound to a loopback address other than localhost (the Host header the server must
    allow), checkpoints in one storage folder, ASHA stopping trials whose Ray Train jobs then end. The driver is killed
    (kill -9) while the first trial trains and ``sweep --resume`` continues it from its checkpoint, each epoch once.
    The first trial's losses equal those of the same run on one node under torchrun (2 nodes x 1 worker == 1 node x 2
    workers)."""
    monkeypatch.chdir(tmp_path)
    host, port, store = "127.0.0.2", free_port(), tmp_path / "server" / "mlflow.db"
    store.parent.mkdir()
    new_store(store)
    uri = f"http://{host}:{port}"
    command = harness_cmd("server", "--host", host, "--port", str(port), "--store", f"sqlite:///{store}", "--artifacts", str(tmp_path / "server" / "artifacts"))
    with started(command, cwd=tmp_path, env=env_for(), output=False) as server:
        wait_until(lambda: answers(uri), 120, "the tracking server did not answer")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        space = {"pretrain.base_lr": [0.4, 0.1]}  # ASHA stops the second at its first rung
        scheduler = {"name": "asha", "metric": "train/lr", "mode": "max", "grace_period": 1, "reduction_factor": 2}
        storage = tmp_path / "shared"
        path = write_sweep(tmp_path, space=space, seeds=[0], max_concurrent=1, scheduler=scheduler, resources={"workers": 2, "cpus": 1}, address=nodes.address, storage=str(storage))
        sweep = ["-q", "sweep", str(path), "pretrain.epochs=3", *TWO, "--results", str(tmp_path / "results")]

        def training(runs: list[dict]) -> dict | None:
            running = children(runs, "RUNNING")
            return running[0] if running and metric_history(running[0]["run_id"], "train/loss", uri) else None

        with started(harness_cmd(*sweep), cwd=tmp_path, env=env_for(uri)) as driver:
            killed = wait_for_runs("unit", uri, driver, training, 240, "no trial logged an epoch")
            driver.kill()  # its Ray job ends with it: the trial and its Ray Train workers
            driver.wait(timeout=30)
        assert main([*sweep, "--resume"]) == 0
        parent = latest_parent("unit", uri)
        assert parent is not None and parent["status"] == "FINISHED"
        runs = {r["run_name"]: r for r in child_runs("unit", parent["run_id"], uri)}
        assert stop(server, signal.SIGTERM, 60)[0] == 143
    out = capsys.readouterr().out
    assert f"browse: {uri}/#/experiments/" in out, out  # the server is the UI
    for noise in ("View run", "Reporting training result", "Loading faiss"):  # MLflow's, Ray Train's, FAISS's
        assert noise not in out, out
    assert len(runs) == 2 and {r["status"] for r in runs.values()} <= {"FINISHED", "KILLED"}
    assert any(r["status"] == "KILLED" for r in runs.values()), "ASHA stopped no trial"
    cluster_nodes = {node.node_id[:12] for node in nodes.list_all_nodes()}
    for run in runs.values():
        where = workers_of(run)
        assert sorted(where) == [0, 1] and where[0][1] != where[1][1], run["tags"]["harness.workers"]  # two nodes
        assert {node for _, node in where.values()} <= cluster_nodes
    assert {r["run_id"] for r in search_runs("unit", f"sqlite:///{store}")} >= {r["run_id"] for r in runs.values()}  # in the server's store
    assert sorted(p.parent.name for p in (storage / "unit" / "workers").glob("*/checkpoint.pt")) == sorted(r["run_id"] for r in runs.values())

    first = runs["pretrain.base_lr=0.4 seed=0"]
    assert first["status"] == "FINISHED", first["tags"].get("harness.error")
    assert first["run_id"] == killed["run_id"] and "harness.resumed" in first["tags"], first["tags"]  # continued
    history = metric_history(first["run_id"], "train/loss", f"sqlite:///{store}")
    assert [step for step, _ in history] == [1, 2, 3]  # each epoch once
    losses = [loss for _, loss in history]
    one_node = new_store(tmp_path / "one_node.db")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run()))  # the sweep's run: section
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "harness", "-q", "run", str(config)]
    overrides = [*TWO, "pretrain.epochs=3", "pretrain.base_lr=0.4", "seed=0", "tracking.experiment=one_node"]
    done = subprocess.run([*torchrun, *overrides], cwd=tmp_path, env=env_for(one_node, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (alone,) = search_runs("one_node", one_node)
    assert alone["params"]["pretrain.lr"] == first["params"]["pretrain.lr"]  # the effective lr: the global batch's
    expected = [loss for _, loss in metric_history(alone["run_id"], "train/loss", one_node)]
    assert len(losses) == len(expected) == 3
    assert losses == pytest.approx(expected, rel=1e-5)


def test_a_node_lost_mid_run_restarts_its_workers_on_the_others_and_a_second_loss_fails_it_naming_the_node(nodes, tmp_path, tracking_uri) -> None:
    """Worker nodes lost while a 2-worker ``run`` trains (preempted machines), with ``distributed.max_failures=1``: after
    the first loss the worker group restarts on the remaining nodes from the last checkpoint, each epoch once; the
    second loss has no restart left, so the run is FAILED and its error names that node."""
    cmd = harness_cmd("-q", "run", CONFIG, *TINY, *TWO, "distributed.workers=2", "distributed.max_failures=1", "pretrain.epochs=8", "data.num_train=256", "tracking.experiment=workers")
    search_runs("workers", tracking_uri)

    def trained(runs: list[dict], restarted: bool = False) -> dict | None:
        if not runs or not workers_of(runs[0]) or restarted != ("after a restart" in runs[0]["tags"].get("harness.resumed", "")):
            return None
        epochs = [step for step, _ in metric_history(runs[0]["run_id"], "train/loss", tracking_uri)]
        return {**runs[0], "epochs": epochs} if epochs and (not restarted or len(epochs) > before) else None

    def lose_a_node_of(run: dict) -> Any:
        held = {node for _, node in workers_of(run).values()}
        lost = next(node for node in nodes.worker_nodes if node.node_id[:12] in held)
        nodes.remove_node(lost)
        return lost

    with started(cmd, cwd=tmp_path, env=env_for(tracking_uri, OMP_NUM_THREADS="1", RAY_ADDRESS=nodes.address)) as proc:
        run = wait_for_runs("workers", tracking_uri, proc, trained, 240, "the run logged no epoch")
        before = len(run["epochs"])
        first = lose_a_node_of(run)
        restarted = wait_for_runs("workers", tracking_uri, proc, lambda runs: trained(runs, True), 240, "no epoch after a restart")
        assert restarted["run_id"] == run["run_id"] and restarted["epochs"] == list(range(1, len(restarted["epochs"]) + 1))
        assert first.node_id[:12] not in {node for _, node in workers_of(restarted).values()}  # restarted on the others
        second = lose_a_node_of(restarted)
        out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 1, out
    (failed,) = search_runs("workers", tracking_uri)
    assert failed["run_id"] == run["run_id"] and failed["status"] == "FAILED"
    epochs = [step for step, _ in metric_history(run["run_id"], "train/loss", tracking_uri)]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) < 8, epochs  # each epoch once, the run cut short
    error = failed["tags"]["harness.error"]
    assert re.fullmatch(rf"rank \d: its node {second.node_id[:12]} was lost \(.+\)( \(1 other rank\(s\) failed with it\))?", error), error
    assert out.strip().splitlines()[-1] == f"error: run failed: WorkerFailed: {error}", out
