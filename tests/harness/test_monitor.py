"""The online monitor (eval.online): its epochs, its numbers against evaluations.knn on the same subsets computed
independently, that it changes no training number (every method: no state, no global random generator; a whole run:
the same losses and final metrics with and without it), that a resumed run logs no epoch twice, and bad input."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from core.errors import ConfigError
from core.metrics import ONLINE_LINEAR, ONLINE_METRICS
from evaluations.collapse import rankme
from evaluations.features import extract_embeddings
from evaluations.knn import knn_evaluate
from harness.cli import main
from harness.config.loading import build_config
from harness.config.schema import OnlineConfig
from harness.sweep.config import EPOCH_METRICS, load_sweep
from harness.track.mlflow import metric_history, search_runs
from harness.train.loop import pretrain
from harness.trial.evaluate import eval_inputs
from harness.trial.monitor import OnlineMonitor
from harness.trial.prepare import prepare
from harness.trial.run import run
from methods import list_methods
from tests.helpers.method_params import small_backbone_spec, small_params
from tests.helpers.runs import tiny_run, write_sweep

# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("epochs", "every", "expected"),
    [
        (5, 2, [2, 4, 5]),  # every 2nd epoch, and the last one
        (6, 2, [2, 4, 6]),
        (5, 5, [5]),
        (30, None, [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]),  # the default: about ten points
        (25, None, [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 25]),  # round(2.5) = 2
        (4, None, [1, 2, 3, 4]),
        (1, None, [1]),
        (0, None, []),
    ],
)
def test_the_monitor_evaluates_every_n_epochs_and_after_the_last(epochs, every, expected) -> None:
    assert OnlineConfig(every=every).schedule(epochs) == expected
    assert OnlineConfig(every=every, enabled=False).schedule(epochs) == []


# ----------------------------------------------------------------------------- the numbers


def test_the_monitor_is_knn_and_rankme_of_fixed_subsets_computed_independently(tiny_overrides) -> None:
    cfg = build_config({}, [*tiny_overrides, "eval.online.num_train=96", "eval.online.num_test=40"])
    trial = prepare(cfg)
    monitor = OnlineMonitor.build(trial)
    assert len(monitor.train_idx) == 96 and len(np.unique(monitor.train_idx)) == 96 and np.all(np.diff(monitor.train_idx) > 0)
    assert len(monitor.test_idx) == 40 and monitor.test_idx.max() < len(trial.data.test)
    got = monitor.evaluate()

    # the same items embedded here, without harness.trial.evaluate: the method's eval inputs, its embed, eval mode
    def embed(split, idx):
        inputs = eval_inputs(trial.method, split, trial.augmenter.normalize)
        return extract_embeddings(trial.method.embed, inputs.data[torch.from_numpy(idx)], inputs.prepare, batch_size=cfg.eval.batch_size, module=trial.method)

    train_x, test_x = embed(trial.data.train, monitor.train_idx), embed(trial.data.test, monitor.test_idx)
    ytr, yte = trial.data.train.labels.numpy()[monitor.train_idx], trial.data.test.labels.numpy()[monitor.test_idx]
    assert got["online/knn_top1"] == knn_evaluate(train_x, ytr, test_x, yte, k=cfg.eval.knn.k, temperature=cfg.eval.knn.temperature)["top1"]
    assert got["online/rankme"] == pytest.approx(rankme(train_x), rel=1e-9)
    assert set(got) == set(ONLINE_METRICS)


def test_the_subsets_are_drawn_once_from_the_data_seed(tiny_overrides) -> None:
    small = [*tiny_overrides, "eval.online.num_train=32", "eval.online.num_test=16"]
    first = OnlineMonitor.build(prepare(build_config({}, small)))
    other_trial_seed = OnlineMonitor.build(prepare(build_config({}, [*small, "seed=3"])))
    other_data_seed = OnlineMonitor.build(prepare(build_config({}, [*small, "data.seed=3"])))
    assert np.array_equal(first.train_idx, other_trial_seed.train_idx) and np.array_equal(first.test_idx, other_trial_seed.test_idx)
    assert not np.array_equal(first.train_idx, other_data_seed.train_idx)
    whole = OnlineMonitor.build(prepare(build_config({}, tiny_overrides)))
    assert np.array_equal(whole.test_idx, np.arange(64))  # a split smaller than the subset (512 by default): all of it
    assert first.epochs == {1, 2}  # 2 epochs, every unset: max(1, round(2 / 10)) = 1
    assert first(3) == {} and first.seconds == []
    assert set(first(2)) == set(ONLINE_METRICS) and len(first.seconds) == 1


@pytest.mark.parametrize("name", list_methods())
def test_the_monitor_leaves_every_method_and_the_random_generators_alone(name: str, tiny_overrides) -> None:
    """Eval mode really leaves BatchNorm's running statistics (and every other buffer) as they were, the modules'
    train/eval flags come back, and neither torch's nor numpy's global generator is drawn from."""
    spec = small_backbone_spec(name)
    raw = {"method": {"name": name, **small_params(name)}, "backbone": {"name": spec.pop("name"), "kwargs": spec}}
    overrides = [o for o in tiny_overrides if not o.startswith(("method.", "backbone."))]
    cfg = build_config(raw, [*overrides, "eval.semi.enabled=false", "eval.online.num_train=48", "eval.online.num_test=24", "eval.online.linear=true"])
    trial = prepare(cfg)
    method = trial.method
    method.train()  # as the training loop leaves it; a forward in this mode would move BatchNorm's running statistics
    state = {k: v.clone() for k, v in method.state_dict().items()}
    modes = {n: m.training for n, m in method.named_modules()}
    torch_rng, numpy_rng = torch.random.get_rng_state(), np.random.get_state()
    out = OnlineMonitor.build(trial).evaluate()
    assert set(out) == {*ONLINE_METRICS, ONLINE_LINEAR} and all(np.isfinite(v) for v in out.values())
    after = method.state_dict()
    changed = [k for k, v in state.items() if not torch.equal(v, after[k])]
    assert changed == [], f"{name}: the monitor changed {changed[:5]}"
    assert {n: m.training for n, m in method.named_modules()} == modes
    assert torch.equal(torch.random.get_rng_state(), torch_rng)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state()[1:3], numpy_rng[1:3]))


def test_every_metric_a_trial_reports_each_epoch_is_one_asha_accepts(tiny_overrides) -> None:
    cfg = build_config({}, [*tiny_overrides, "eval.online.every=1"])
    trial = prepare(cfg)
    reported: list[set[str]] = []
    pretrain(trial.method, trial.data.train.images, cfg, trial.augmenter, trial.device, epoch_metrics=OnlineMonitor.build(trial), on_epoch_end=lambda e, m, p: reported.append(set(m)))
    assert len(reported) == 2
    for keys in reported:
        assert set(ONLINE_METRICS) <= keys
        assert all(k in EPOCH_METRICS or k in ONLINE_METRICS or k.startswith("train/") for k in keys), keys


# ----------------------------------------------------------------------------- a whole run


FAST = ["pretrain.epochs=5", "data.num_train=64", "eval.linear.epochs=2", "eval.semi.enabled=false"]


def histories(run_id: str, uri: str, keys) -> dict[str, list[tuple[int, float]]]:
    return {k: metric_history(run_id, k, uri) for k in keys}


def test_the_monitor_changes_no_training_number_and_logs_at_its_epochs(tiny_overrides, tracking_uri, tmp_path) -> None:
    on = run(build_config({}, [*tiny_overrides, *FAST, "eval.online.every=2", "eval.online.linear=true", "tracking.experiment=monitor-on"]))
    off = run(build_config({}, [*tiny_overrides, *FAST, "eval.online.enabled=false", f"pretrain.checkpoint_dir={tmp_path / 'off'}", "tracking.experiment=monitor-off"]))
    (run_on,), (run_off,) = search_runs("monitor-on", tracking_uri), search_runs("monitor-off", tracking_uri)
    assert metric_history(run_on["run_id"], "train/loss", tracking_uri) == metric_history(run_off["run_id"], "train/loss", tracking_uri)
    timing = ("time/", "memory/", "train/images_per_s")
    final = {k: v for k, v in on.items() if not k.startswith(timing)}
    assert final == {k: v for k, v in off.items() if not k.startswith(timing)}
    assert "eval/knn/top1" in final and "time/online_s" in on and "time/online_s" not in off
    for key in (*ONLINE_METRICS, ONLINE_LINEAR):  # every 2nd epoch and the last, once each
        assert [step for step, _ in metric_history(run_on["run_id"], key, tracking_uri)] == [2, 4, 5]
        assert metric_history(run_off["run_id"], key, tracking_uri) == []
    assert 0.0 <= run_on["metrics"]["online/knn_top1"] <= 1.0


def test_a_resumed_run_logs_no_online_epoch_twice(tiny_overrides, tracking_uri, tmp_path) -> None:
    """Interrupted after epoch 4 was logged, resumed from the checkpoint of epoch 3: epoch 4 runs (and is evaluated) again."""
    overrides = [*tiny_overrides, *FAST, "eval.online.every=2", "tracking.experiment=resume"]
    ckpt, saved = tmp_path / "ckpt" / "checkpoint.pt", tmp_path / "epoch3" / "checkpoint.pt"

    def stop_after_4(epoch, metrics, path) -> None:
        if epoch == 3:
            saved.parent.mkdir()
            shutil.copy(ckpt, saved)
        if epoch == 4:
            assert "online/knn_top1" in metrics
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        run(build_config({}, overrides), on_epoch_end=stop_after_4)
    (killed,) = search_runs("resume", tracking_uri)
    before = metric_history(killed["run_id"], "online/knn_top1", tracking_uri)
    assert [step for step, _ in before] == [2, 4]
    run(build_config({}, [*overrides, f"pretrain.resume={saved}"]))
    (resumed,) = search_runs("resume", tracking_uri)
    assert resumed["run_id"] == killed["run_id"] and resumed["status"] == "FINISHED"
    for key in ("train/loss", *ONLINE_METRICS):
        steps = [step for step, _ in metric_history(resumed["run_id"], key, tracking_uri)]
        assert steps == ([1, 2, 3, 4, 5] if key == "train/loss" else [2, 4, 5]), (key, steps)
    assert metric_history(resumed["run_id"], "online/knn_top1", tracking_uri)[:2] == before


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pretrain.epochs=5", "eval.online.every=6"], "eval.online.every: 6 is larger than pretrain.epochs (5); give 1 to 5"),
        (["pretrain.epochs=0", "eval.online.every=1"], "eval.online.every: 1 is larger than pretrain.epochs (0)"),
        (["eval.online.every=0"], "eval.online.every: "),
        (["eval.online.num_test=0"], "eval.online.num_test: "),
    ],
)
def test_bad_online_settings_are_one_line_exit_2(tmp_path, tracking_uri, capsys, overrides, message) -> None:
    with pytest.raises(ConfigError, match="^eval.online."):
        build_config({}, overrides)
    path = tmp_path / "run.yaml"
    path.write_text("{}\n")
    assert main(["-q", "run", str(path), *overrides]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert search_runs("harness", tracking_uri) == []


def test_every_larger_than_epochs_is_fine_when_the_monitor_is_off() -> None:
    assert build_config({}, ["pretrain.epochs=5", "eval.online.every=6", "eval.online.enabled=false"]).eval.online.schedule(5) == []


ASHA = {"name": "asha", "mode": "max", "grace_period": 1, "reduction_factor": 2}


@pytest.mark.parametrize("metric", ["online/knn_top1", "online/rankme", "train/loss", "train/lr", "train/images_per_s", "train/queue_fill", "epoch"])
def test_asha_accepts_the_metrics_trials_report_each_epoch(tmp_path, metric) -> None:
    load_sweep(write_sweep(tmp_path, scheduler={**ASHA, "metric": metric}))


def test_asha_accepts_the_online_linear_probe_only_where_every_trial_trains_one(tmp_path, capsys) -> None:
    linear = tiny_run()
    linear["eval"] = {"online": {"linear": True}}
    load_sweep(write_sweep(tmp_path, run=linear, scheduler={**ASHA, "metric": ONLINE_LINEAR}))
    path = write_sweep(tmp_path, scheduler={**ASHA, "metric": ONLINE_LINEAR})
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: scheduler.metric: 'online/linear_top1' is reported only by trials with eval.online.enabled=true and "
        "eval.online.linear=true, and some of these trials disable one of them"
    ), err


def test_the_online_linear_probe_ends_within_a_few_points_of_the_offline_one(tiny_overrides, tracking_uri) -> None:
    """The same run's embeddings: the online probe's last value (the whole train and test splits as its subsets) and
    the battery's linear probe."""
    overrides = ["data.num_train=512", "data.num_test=256", "pretrain.epochs=6", "eval.online.every=3", "eval.online.linear=true"]
    run(build_config({}, [*tiny_overrides, *overrides, "eval.linear.epochs=30", "eval.semi.enabled=false", "tracking.experiment=probe"]))
    (probed,) = search_runs("probe", tracking_uri)
    metrics = probed["metrics"]
    assert abs(metrics[ONLINE_LINEAR] - metrics["eval/linear/top1"]) <= 0.05, metrics


@pytest.mark.parametrize(
    ("fields", "overrides", "expected"),
    [
        ({"scheduler": {**ASHA, "metric": "eval/knn/top1"}}, [], "scheduler.metric: 'eval/knn/top1' is reported only at the end of a trial"),
        ({"scheduler": {**ASHA, "metric": "online/knn_top"}}, [], "scheduler.metric: 'online/knn_top' is not reported by the trials (did you mean 'online/knn_top1'?)"),
        ({"scheduler": {**ASHA, "metric": "train/final_loss"}}, [], "'train/final_loss' is reported only at the end of a trial"),
        (
            {"scheduler": {**ASHA, "metric": "loss"}},
            [],
            "ASHA can stop trials on a metric reported during training: train/loss, train/lr, train/images_per_s, train/<a key the method logs>, online/knn_top1, online/rankme, epoch",
        ),
        ({"scheduler": {**ASHA, "metric": "online/knn_top1"}}, ["eval.online.enabled=false"], "scheduler.metric: 'online/knn_top1' is reported only by trials with eval.online.enabled=true"),
        ({"scheduler": {**ASHA, "metric": "online/knn_top1"}, "space": {"eval.online.enabled": [True, False]}}, [], "eval.online.enabled=true"),
        ({"scheduler": {**ASHA, "metric": "train/loss"}}, ["eval.online.every=9"], "eval.online.every: 9 is larger than pretrain.epochs (2)"),
    ],
)
def test_bad_asha_metrics_exit_2_before_ray_starts(tmp_path, unmade_tracking_uri, capsys, fields, overrides, expected) -> None:
    path = write_sweep(tmp_path, **fields)
    assert main(["sweep", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "outputs").exists()
