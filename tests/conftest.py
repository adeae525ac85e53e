"""Shared fixtures: a tiny run config, an MLflow store per test in a temporary folder, one Ray for the session."""

from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of two workers on two cores: one thread each, for its subprocesses too
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # (two threads each spin against the other worker's)

from tests.helpers.runs import TINY, new_store


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """A fresh, empty SQLite MLflow store; the process's working directory is the test's tmp dir."""
    monkeypatch.chdir(tmp_path)
    uri = new_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def unmade_tracking_uri(tmp_path, monkeypatch):
    """As ``tracking_uri``, but the store is not made: for the tests that check that bad input makes none."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def tiny_overrides(tmp_path):
    return [*TINY, f"pretrain.checkpoint_dir={tmp_path / 'ckpt'}"]


def place(item: pytest.Item) -> int:
    """Where ``item`` runs in the order below: the cluster's tests, those of the session's Ray, the end-to-end run (the
    longest of the others), the other slow tests, the quick ones."""
    if "cluster" in item.fixturenames:
        return 0
    if "ray_address" in item.fixturenames:
        return 1
    if item.get_closest_marker("slow") is None:
        return 4
    return 2 if item.path.name == "test_end_to_end.py" else 3


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The order and the one group for ``-n 2 --dist loadgroup`` (pyproject's addopts): the tests that connect this
    process to a Ray form one group that one worker runs in order, the cluster's first (a process connected to the
    session's Ray cannot start a cluster; the session's Ray is started once, by the first test that needs it). The
    longest units go first, the quick tests last, where they fill both workers' last minutes."""
    for item in items:
        if place(item) < 2:
            item.add_marker(pytest.mark.xdist_group("ray"))
    items.sort(key=place)


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray for every test that only needs a running Ray: sweeps in this process reuse it (a sweep leaves a
    running instance alone), subprocess drivers reach it with ``RAY_ADDRESS`` set to the address yielded. The tests of
    the local-instance path itself (signals, the reaper) start their own."""
    import ray

    from harness.launch import raytune

    started = raytune.init(None)
    yield ray.get_runtime_context().gcs_address
    if started:
        raytune.shutdown()
