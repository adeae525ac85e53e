"""Small runs and sweeps for the tests: the tiny overrides, the fast battery, sweep YAML writers, the CLI command."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "simclr_shapes.yaml")

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
"""Overrides that make ``configs/simclr_shapes.yaml`` a run of seconds."""

FAST_EVAL = ["eval.linear.enabled=false", "eval.semi.enabled=false", "eval.retrieval.enabled=false", "eval.collapse.enabled=false"]
"""The battery reduced to kNN (and the baselines)."""


_template: Path | None = None


def new_store(path: Path) -> str:
    """The URI of an empty MLflow SQLite store at ``path`` whose tables exist: a copy of one store made once per test
    session, since MLflow takes 1.5-3 s to make its tables in each new store. Tests of a store that does not exist
    yet (concurrent writers creating it) name a path of their own instead."""
    global _template
    if _template is None:
        from harness.track.mlflow import search_runs

        folder = tempfile.mkdtemp(prefix="harness-tests-store-")
        atexit.register(shutil.rmtree, folder, True)
        search_runs("template", f"sqlite:///{folder}/mlflow.db")  # makes the tables
        _template = Path(folder) / "mlflow.db"
    assert not path.exists(), f"{path} exists: a new store would replace it"
    shutil.copyfile(_template, path)
    return f"sqlite:///{path}"


def harness_cmd(*args: str) -> list[str]:
    """``python -m harness ARGS`` with this interpreter."""
    return [sys.executable, "-m", "harness", *args]


def env_for(uri: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a harness subprocess: this one, the repository importable, ``uri`` as the tracking URI."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **extra}
    if uri is not None:
        env["MLFLOW_TRACKING_URI"] = uri
    return env


def tiny_run() -> dict:
    """The TINY overrides as a nested ``run:`` mapping."""
    run: dict = {"method": {"name": "simclr"}}
    for item in TINY:
        key, _, text = item.partition("=")
        node = run
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(text)
    return run


def write_sweep(tmp_path: Path, **fields) -> Path:
    """A sweep YAML of tiny SimCLR trials (2 temperatures x 2 seeds unless ``fields`` say otherwise) at ``tmp_path``."""
    body = {"name": "unit", "run": tiny_run(), "space": {"method.temperature": {"grid": [0.1, 0.5]}}, "seeds": [0, 1]}
    body.update(fields)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path
