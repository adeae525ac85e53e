"""Shared fixtures: a tiny run config, an MLflow store per test in a temporary folder, one Ray for the session."""

from __future__ import annotations

import pytest

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that share the session's Ray run last (in their order), so that its daemons, once started, take
    no CPU from the tests that do not need them."""
    items.sort(key=lambda item: "ray_address" in getattr(item, "fixturenames", ()))


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
