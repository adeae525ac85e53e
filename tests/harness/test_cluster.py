"""Several Ray nodes on this host (Ray's own ``ray.cluster_utils.Cluster``: a raylet per node, each with its own node
id and resources), as a cluster user meets them: the checks at the start of a sweep that spans nodes."""

from __future__ import annotations

import os

import pytest

from harness.cli import main
from harness.track.mlflow import search_runs
from tests.helpers.runs import write_sweep


@pytest.fixture
def two_nodes(monkeypatch):
    """A head node and a worker node of one CPU each; no Ray connected in this process before or after."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("a Ray is already connected in this process")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow  # two raylets
def test_a_sweep_over_several_nodes_refuses_a_sqlite_store_before_any_run(two_nodes, tmp_path, tracking_uri, capsys) -> None:
    path = write_sweep(tmp_path, seeds=[0], address=two_nodes.address)
    assert main(["-q", "sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: tracking.uri: {tracking_uri} is a SQLite file on this machine, but the Ray cluster has 2 nodes whose "
        "trials log to it; start `python -m harness server` on the head node and set tracking.uri: http://HEAD:5000"
    ], err
    assert search_runs("unit", tracking_uri) == []  # refused before the sweep's parent run
    assert os.environ.get("RAY_ADDRESS") is None
