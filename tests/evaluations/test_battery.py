"""The battery as a whole: metric names from the config, bad embeddings, label subsets, and ``harness eval``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluations.battery import evaluate_embeddings
from evaluations.collapse import alignment, rankme
from evaluations.knn import knn_evaluate
from evaluations.retrieval import map_at_r
from harness.cli import main
from harness.config.schema import EvalConfig
from harness.track.mlflow import metric_history, search_runs


def clustered(n: int, d: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d)) * 3
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_metric_names_and_values_follow_the_config() -> None:
    train_x, train_y = clustered(400, 16, 5, 0)
    test_x, test_y = clustered(100, 16, 5, 1)
    ev = EvalConfig(knn={"k": 7, "temperature": 0.1, "extra": [[3, 0.5]]}, linear={"epochs": 5}, semi={"enabled": False}, retrieval={"ks": [1, 3]})
    views = (test_x, test_x + 0.01)
    metrics, figures = evaluate_embeddings(ev, train_x, train_y, test_x, test_y, views=views, projections=train_x[:, :8])
    assert metrics["eval/knn/top1"] == knn_evaluate(train_x, train_y, test_x, test_y, k=7, temperature=0.1)["top1"]
    assert metrics["eval/knn_k3_t0.5/top1"] == knn_evaluate(train_x, train_y, test_x, test_y, k=3, temperature=0.5)["top1"]
    assert metrics["eval/retrieval/map_at_r"] == pytest.approx(map_at_r(test_x, test_y))
    assert {"eval/retrieval/recall_at_1", "eval/retrieval/recall_at_3"} <= set(metrics)
    assert "eval/retrieval/recall_at_5" not in metrics
    assert {"eval/linear/top1", "eval/rank/rankme", "eval/rank_projector/rankme", "eval/rank/alignment", "eval/rank/uniformity"} <= set(metrics)
    assert metrics["eval/rank/alignment"] == pytest.approx(alignment(*views))
    assert metrics["eval/rank/rankme"] == pytest.approx(rankme(train_x)) and metrics["eval/rank_projector/rankme"] == pytest.approx(rankme(train_x[:, :8]))
    assert {"time/eval/knn_s", "time/eval/linear_s", "time/eval/retrieval_s", "time/eval/rank_s"} <= set(metrics)
    assert list(figures) == ["spectrum.png"]
    off = EvalConfig(knn={"enabled": False}, linear={"enabled": False}, semi={"enabled": False}, retrieval={"enabled": False}, collapse={"enabled": False})
    assert evaluate_embeddings(off, train_x, train_y, test_x, test_y) == ({}, {})


def test_labels_that_are_not_contiguous_are_remapped() -> None:
    train_x, train_y = clustered(200, 8, 3, 2)
    test_x, test_y = clustered(50, 8, 3, 3)
    ev = EvalConfig(linear={"enabled": False}, semi={"enabled": False}, collapse={"enabled": False})
    plain, _ = evaluate_embeddings(ev, train_x, train_y, test_x, test_y)
    sparse, _ = evaluate_embeddings(ev, train_x, train_y * 10 + 7, test_x, test_y * 10 + 7)
    def scores(m: dict) -> dict:
        return {k: v for k, v in m.items() if not k.startswith("time/")}

    assert scores(plain) == scores(sparse) and scores(plain)


def test_nan_embeddings_are_an_error_naming_the_rows() -> None:
    train_x, train_y = clustered(100, 8, 3, 4)
    bad = train_x.copy()
    bad[[3, 7]] = np.nan
    with pytest.raises(ValueError, match=r"2 of 100 embedding rows contain NaN or inf"):
        evaluate_embeddings(EvalConfig(), bad, train_y, train_x, train_y)


def test_semi_fraction_too_small_is_bad_input_before_training(tmp_path, tiny_overrides, tracking_uri, capsys) -> None:
    assert main(["-q", "run", "--", "/dev/null"]) == 2  # a config that is not a mapping of keys
    capsys.readouterr()
    cfg = tmp_path / "run.yaml"
    cfg.write_text("tracking: {experiment: semi}\n")
    assert main(["-q", "run", str(cfg), *tiny_overrides, "eval.semi.fractions=[0.01]"]) == 2
    err = capsys.readouterr().err
    assert "eval.semi.fractions" in err and "0.01" in err
    assert main(["-q", "run", str(cfg), *tiny_overrides, "eval.semi.from_projector_layer=1"]) == 2  # simclr has no such trunk
    assert "eval.semi.from_projector_layer" in capsys.readouterr().err
    assert search_runs("semi", tracking_uri) == []


def test_eval_verb_reruns_the_battery_into_the_same_run(tmp_path, tiny_overrides, tracking_uri, capsys) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("tracking: {experiment: reeval}\n")
    assert main(["-q", "run", str(cfg), *tiny_overrides, "eval.linear.enabled=false"]) == 0
    (run,) = search_runs("reeval", tracking_uri)
    assert "eval/linear/top1" not in run["metrics"]
    first_knn = run["metrics"]["eval/knn/top1"]
    capsys.readouterr()
    assert main(["eval", run["run_id"], "eval.linear.enabled=true", "eval.semi.enabled=false"]) == 0
    out = capsys.readouterr().out
    assert "eval/linear/top1" in out and f"logged into MLflow run {run['run_id']}" in out
    (again,) = search_runs("reeval", tracking_uri)
    assert "eval/linear/top1" in again["metrics"]
    assert again["metrics"]["eval/knn/top1"] == first_knn  # same weights, same protocol, same number
    assert len(metric_history(run["run_id"], "eval/knn/top1", tracking_uri)) == 2
    # by checkpoint file too; overriding anything but eval.* is refused
    ckpt = tmp_path / "ckpt" / "checkpoint.pt"
    assert main(["eval", str(ckpt), "eval.semi.enabled=false", "eval.linear.enabled=false"]) == 0
    assert main(["eval", str(ckpt), "pretrain.epochs=3"]) == 2
    assert "only eval.*" in capsys.readouterr().err
    assert main(["eval", "no-such-run"]) == 2


def test_subset_indices_are_logged(tmp_path, tiny_overrides, tracking_uri) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("tracking: {experiment: subsets}\n")
    assert main(["-q", "run", str(cfg), *tiny_overrides]) == 0
    (run,) = search_runs("subsets", tracking_uri)
    from mlflow.tracking import MlflowClient

    path = MlflowClient(tracking_uri).download_artifacts(run["run_id"], "eval/semi_25pct_indices.json", str(tmp_path))
    saved = json.loads(open(path).read())
    assert saved["fraction"] == 0.25 and len(saved["indices"]) == 32 and saved["num_train"] == 128
    assert "eval/semi_25pct/top1" in run["metrics"]


def test_baselines_are_computed_once_for_runs_that_share_them(tmp_path, tiny_overrides, monkeypatch) -> None:
    # The cache may only return what the run would compute, and only to a run whose baselines are the same: same
    # data and seed (same random-init weights) but another method shares them; another seed does not.
    from harness.config.loading import build_config
    from harness.trial import evaluate as evaluate_module
    from harness.trial.prepare import prepare

    cache = tmp_path / "baselines"
    computed = []
    real = evaluate_module._baselines
    monkeypatch.setattr(evaluate_module, "_baselines", lambda trial: computed.append(trial.cfg.seed) or real(trial))

    def trial(*overrides: str):
        return prepare(build_config({}, [*tiny_overrides, f"eval.baselines_cache={cache}", *overrides]))

    first = evaluate_module.baselines(trial())
    assert first == real(trial()) and computed == [0]
    assert evaluate_module.baselines(trial("method.temperature=0.1")) == first and computed == [0]
    evaluate_module.baselines(trial("seed=1"))  # other random-init weights
    assert computed == [0, 1]
    assert len(list(cache.glob("*.json"))) == 2
