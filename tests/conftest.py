"""Shared fixtures: a tiny run config, and an MLflow store per test in a temporary folder."""

from __future__ import annotations

import pytest

TINY = [
    "data.num_train=128",
    "data.num_test=64",
    "data.image_size=16",
    "backbone.name=resnet10t",
    "method.proj_hidden_dim=32",
    "method.proj_dim=16",
    "pretrain.epochs=2",
    "pretrain.batch_size=32",
    "pretrain.warmup_epochs=0.5",
    "pretrain.progress=false",
    "eval.knn.k=5",
    "eval.linear.epochs=5",
    "eval.semi.fractions=[0.25]",
    "eval.semi.epochs=[1]",
    "device=cpu",
]


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store; the process's working directory is the test's tmp dir."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def tiny_overrides(tmp_path):
    return [*TINY, f"pretrain.checkpoint_dir={tmp_path / 'ckpt'}"]
