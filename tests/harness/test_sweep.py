"""Sweep YAML: validation, search-space expansion, command-line overrides, bad input (no Ray needed)."""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest
import yaml

from core.errors import ConfigError
from harness.cli import main
from harness.sweep.config import SweepConfig, expand, load_sweep
from tests.helpers.runs import write_sweep

# ----------------------------------------------------------------------------- expansion


def test_grid_times_seeds_in_order() -> None:
    cfg = SweepConfig(name="s", space={"method.temperature": [0.1, 0.2, 0.5], "pretrain.batch_size": {"grid": [32, 64]}}, seeds=[3, 4])
    trials = expand(cfg)
    assert len(trials) == 3 * 2 * 2
    assert [t.seed for t in trials[:4]] == [3, 4, 3, 4]
    assert trials[0].point == {"method.temperature": 0.1, "pretrain.batch_size": 32}
    assert trials[2].point == {"method.temperature": 0.1, "pretrain.batch_size": 64}
    assert trials[-1].point == {"method.temperature": 0.5, "pretrain.batch_size": 64}
    assert len({t.key for t in trials}) == len(trials)
    assert trials[0].key == "method.temperature=0.1 pretrain.batch_size=32 seed=3"


def test_random_domains_are_seeded_bounded_and_shared_across_seeds() -> None:
    space = {"pretrain.base_lr": {"loguniform": [1e-3, 1.0]}, "method.temperature": {"uniform": [0.1, 0.3]}, "pretrain.optimizer": {"choice": ["sgd", "lars"]}, "pretrain.epochs": [1, 2]}
    cfg = SweepConfig(name="s", space=space, seeds=[0, 1, 2], num_samples=4, sample_seed=7)
    trials = expand(cfg)
    assert len(trials) == 4 * 2 * 3
    again = expand(SweepConfig(name="s", space=space, seeds=[0, 1, 2], num_samples=4, sample_seed=7))
    assert [t.key for t in trials] == [t.key for t in again]
    assert [t.key for t in expand(SweepConfig(name="s", space=space, num_samples=4, sample_seed=8))] != [t.key for t in trials[::3]]
    for t in trials:
        assert 1e-3 <= t.point["pretrain.base_lr"] <= 1.0
        assert 0.1 <= t.point["method.temperature"] <= 0.3
        assert t.point["pretrain.optimizer"] in ("sgd", "lars")
    # every seed of a point sees the same drawn values
    for i in range(0, len(trials), 3):
        assert trials[i].point == trials[i + 1].point == trials[i + 2].point
    # the 4 draws x 2 grid values are distinct points
    assert len({t.point_key for t in trials}) == 8
    logs = [math.log10(t.point["pretrain.base_lr"]) for t in trials]
    assert min(logs) < -0.5 and max(logs) > -2.5  # spread over the log range, not clumped at one end


def test_load_sweep_builds_every_trial_config(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"method": {"name": "simclr", "temperature": 0.3}, "pretrain": {"epochs": 7}}))
    path = write_sweep(tmp_path, base="base.yaml", space={"method.proj_dim": [8, 16]}, seeds=[5])
    sweep = load_sweep(path, ["pretrain.epochs=1", "seeds=[5,6]"])
    assert len(sweep.trials) == 4
    cfg = sweep.configs["method.proj_dim=16 seed=6"]
    assert cfg.method["proj_dim"] == 16 and cfg.seed == 6
    assert cfg.method["temperature"] == 0.3  # from base
    assert cfg.pretrain.epochs == 1  # command line over run: over base
    assert cfg.data.num_train == 128  # from run:
    assert cfg.tracking.experiment == "unit"
    assert cfg.tracking.run_name == "method.proj_dim=16 seed=6"


def test_cases_set_several_keys_per_point(tmp_path: Path) -> None:
    cases = [
        {"method": {"name": "simclr", "temperature": 0.2}},
        {"method": {"name": "barlow_twins", "lambd": 0.01}, "pretrain.optimizer": "lars", "pretrain.base_lr": 0.2},
    ]
    path = write_sweep(tmp_path, space={"method": {"cases": cases}, "pretrain.epochs": [1, 2]}, seeds=[0])
    sweep = load_sweep(path)
    assert len(sweep.trials) == 2 * 2
    by_method = {(c.method["name"], c.pretrain.epochs): c for c in sweep.configs.values()}
    barlow, simclr = by_method[("barlow_twins", 2)], by_method[("simclr", 1)]
    assert barlow.method["lambd"] == 0.01 and barlow.pretrain.optimizer == "lars" and barlow.pretrain.base_lr == 0.2
    assert simclr.method["temperature"] == 0.2
    assert (simclr.pretrain.optimizer, simclr.pretrain.base_lr) != ("lars", 0.2)  # only the barlow case sets them
    domain = sweep.cfg.space["method"]
    assert domain.label("method", cases[1]) == cases[1]["method"]  # the column shows what the case sets the label to
    assert domain.label("recipe", cases[1]) == cases[1]
    assert sweep.keys[0] == 'method={"name": "simclr", "temperature": 0.2} pretrain.epochs=1 seed=0'
    twice = SweepConfig(name="s", space={"method": {"cases": [cases[0], {**cases[0], "pretrain.base_lr": 0.6}]}})
    assert [t.labels["method"] for t in expand(twice)] == twice.space["method"].cases  # same method twice: the whole case names it


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("fields", "overrides", "expected"),
    [
        ({"space": {}}, [], "space"),
        ({"space": {"method.temprature": [0.1]}}, [], "method.temprature"),
        ({"space": {"pretrain.epoch": [1]}}, [], "did you mean 'pretrain.epochs'"),
        ({"space": {"pretrain.base_lr": {"loguniform": [0, 1]}}}, [], "loguniform: bounds must be positive"),
        ({"space": {"pretrain.base_lr": {"loguniform": [-1, 1]}}}, [], "loguniform"),
        ({"space": {"pretrain.epochs": {"grid": [1, "many"]}}}, [], "pretrain.epochs"),
        ({"space": {"method.temperature": [0.1, -1.0]}}, [], "method.temperature"),
        ({"max_concurrent": 0}, [], "max_concurrent"),
        ({"space": {"method": {"cases": [{"method": {"name": "simclr"}, "pretrain.epoks": 1}]}}}, [], "pretrain.epoks"),
        ({"space": {"method": {"cases": [{}]}}}, [], "every case sets at least one run key"),
        ({}, ["max_concurrent=0"], "max_concurrent"),
        ({"space": {"method.temperature": {"grid": [0.1], "uniform": [0.1, 0.2]}}}, [], "exactly one"),
        ({"seeds": [0, 0]}, [], "seeds"),
        ({"num_samples": 3}, [], "num_samples"),
        ({"scheduler": {"name": "asha"}}, [], "scheduler"),
        ({"bogus": 1}, [], "bogus"),
        ({}, ["pretrain.epoks=2"], "pretrain.epoks"),
        ({}, ["max_concurent=2"], "max_concurent"),
    ],
)
def test_bad_sweeps_exit_2_before_anything_runs(tmp_path, unmade_tracking_uri, capsys, fields, overrides, expected) -> None:
    path = write_sweep(tmp_path, **fields)
    assert main(["sweep", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert expected in err
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run, not even a store
    assert not (tmp_path / "outputs").exists()


def test_huge_grids_and_bombs_are_refused_before_they_expand(tmp_path, tracking_uri, capsys) -> None:
    import time

    grid = {"method.temperature": {"grid": [0.1 + i / 1e4 for i in range(1000)]}, "pretrain.base_lr": {"grid": [0.1 + i / 1e4 for i in range(1000)]}}
    start = time.perf_counter()
    assert main(["sweep", str(write_sweep(tmp_path, space=grid, seeds=[0]))]) == 2
    assert time.perf_counter() - start < 5.0
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: space: 1,000,000 trials (1000 x 1000 x 1 draw x 1 seed); a sweep holds at most 10,000 "
        "(split it into several sweeps, or sample the space with choice/uniform and num_samples)"
    )
    bomb = tmp_path / "bomb.yaml"
    lines = ["name: unit", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\nspace: {method.temperature: *a8}\n")
    start = time.perf_counter()
    assert main(["sweep", str(bomb)]) == 2
    assert time.perf_counter() - start < 5.0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bomb.yaml: expands to more than 100,000 values" in err


def test_a_base_that_is_a_sweep_file_is_refused(tmp_path, tracking_uri, capsys) -> None:
    path = write_sweep(tmp_path, base="sweep.yaml")
    assert main(["sweep", str(path)]) == 2
    assert capsys.readouterr().err.strip() == "error: base: sweep.yaml is this sweep file itself; give a run config, e.g. configs/simclr_shapes.yaml"
    (tmp_path / "sub").mkdir()
    path = write_sweep(tmp_path / "sub", base="../sweep.yaml")  # another sweep file as the base
    assert main(["sweep", str(path)]) == 2
    assert "base: ../sweep.yaml is a sweep file (it has name and space), not a run config" in capsys.readouterr().err


def test_unwritable_storage_is_bad_input_before_any_run(tmp_path, unmade_tracking_uri, capsys) -> None:
    path = write_sweep(tmp_path, storage="/proc/nonexist/x")
    assert main(["sweep", str(path), "seeds=[0]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: storage: cannot write the sweep's folder /proc/nonexist/x/unit (") and "\n" not in err
    assert not (tmp_path / "mlflow.db").exists()


def test_a_second_sweep_of_the_same_name_is_refused_while_the_first_runs(tmp_path, unmade_tracking_uri, capsys) -> None:
    from harness.sweep.state import hold_name

    path = write_sweep(tmp_path, storage=str(tmp_path / "st"))
    with hold_name(tmp_path / "st" / "unit", "unit"):  # the first sweep, still running
        assert main(["sweep", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: sweep 'unit' is already running on storage {tmp_path / 'st'} (pid ") and "\n" not in err
        with hold_name(tmp_path / "st" / "other", "other"):  # another name on the same storage is free
            pass
    assert not (tmp_path / "mlflow.db").exists()
    with hold_name(tmp_path / "st" / "unit", "unit"):  # the first has ended: the name is free again
        pass


def test_a_store_error_while_opening_the_runs_leaves_none_running_or_scheduled(tmp_path, tracking_uri, monkeypatch) -> None:
    from harness.sweep import state
    from harness.track.mlflow import search_runs

    sweep = load_sweep(write_sweep(tmp_path, seeds=[0]))

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state, "write_json", full_disk)
    with pytest.raises(OSError, match="No space left"):
        state.new_state(sweep, tracking_uri, tmp_path / "st")
    runs = search_runs("unit", tracking_uri)
    assert len(runs) == 1  # the parent (each trial opens its own run as it starts)
    assert {r["status"] for r in runs} == {"FAILED"}
    assert all("No space left on device" in r["tags"]["harness.error"] for r in runs)


def test_unreachable_ray_address_is_bad_input(tmp_path, unmade_tracking_uri, capsys) -> None:
    with socket.socket() as s:  # a free port: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_sweep(tmp_path, address=f"127.0.0.1:{port}")
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "does not answer" in err
    assert not (tmp_path / "mlflow.db").exists()


def test_resume_with_nothing_to_resume(tmp_path, unmade_tracking_uri, capsys) -> None:
    path = write_sweep(tmp_path)
    assert main(["sweep", str(path), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_missing_dataset_is_refused_before_ray(tmp_path, unmade_tracking_uri, capsys) -> None:
    path = write_sweep(tmp_path)
    assert main(["sweep", str(path), "data.name=cifar10", f"data.root={tmp_path / 'nowhere'}"]) == 2
    assert "cifar" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_table_of_unknown_experiment(tmp_path, tracking_uri, capsys) -> None:
    assert main(["table", "no-such-experiment"]) == 2
    assert "no runs" in capsys.readouterr().err


def test_domain_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"space\.method\.temperature"):
        from harness.config.loading import first_error

        try:
            SweepConfig(name="s", space={"method.temperature": {"uniform": [0.5, 0.1]}})
        except Exception as err:
            raise ConfigError(first_error(err, SweepConfig)) from None


def test_a_trials_peak_memory_is_its_own_after_a_larger_one_in_the_same_process() -> None:
    """A sweep's worker process runs its trials one after another: the peak a small trial reports is measured from
    its start (the reset of :func:`reset_peak_rss`), not the high-water mark a larger trial before it left."""
    import sys

    import numpy as np

    from harness.track.provenance import peak_rss_mb, reset_peak_rss

    if not sys.platform.startswith("linux"):
        pytest.skip("the reset is Linux's /proc/self/clear_refs")
    large = np.ones(300 * 2**20 // 8)  # a large trial: 300 MiB touched, then freed
    del large
    after_large = peak_rss_mb()
    assert "clear_refs" in reset_peak_rss()
    small = np.ones(20 * 2**20 // 8)
    own = peak_rss_mb()
    del small
    assert after_large - own > 250 and own < after_large


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_validates(path: Path) -> None:
    """Every trial's run config of every sweep under sweeps/ builds (the references and table sections too)."""
    from harness.sweep.config import load_sweep

    sweep = load_sweep(path, [])
    assert sweep.trials and all(sweep.configs[t.key].tracking.experiment for t in sweep.trials)


def test_resume_refuses_tune_state_another_user_could_have_written(tmp_path) -> None:
    import os

    from core.errors import BadInput
    from harness.sweep.state import _check_trusted

    state, tune = tmp_path / "state.json", tmp_path / "20261205-000000"
    tune.mkdir()
    state.write_text("{}")
    pickled = tune / "experiment_state.pkl"
    pickled.write_bytes(b"")
    for path in (state, tune, pickled):
        path.chmod(0o700 if path.is_dir() else 0o600)
    _check_trusted(state, tune)  # this user's, no one else may write: restored
    pickled.chmod(0o666)
    with pytest.raises(BadInput, match=rf"^--resume: {pickled} may be changed by any user \(mode 666\); Ray Tune's saved state runs code"):
        _check_trusted(state, tune)
    pickled.chmod(0o600)
    if os.getuid() == 0:  # only root may give a file away
        os.chown(pickled, 12345, -1)
        with pytest.raises(BadInput, match=rf"^--resume: {pickled} is owned by user id 12345, not this user \(0\)"):
            _check_trusted(state, tune)


def test_a_ray_worker_ended_by_sigterm_prints_no_ignored_system_exit(capsys) -> None:
    """Ray's SIGTERM handler raises SystemExit in whatever the worker runs; in a weakref callback Python prints it
    as "Exception ignored", which Ray forwards to the sweep's terminal. That case alone is silenced."""
    import sys
    import weakref

    from harness.launch.raytune import _quiet_exit

    before = sys.unraisablehook
    sys.unraisablehook = _quiet_exit(sys.__unraisablehook__)
    try:

        class Thing:
            pass

        def exit_in_callback(ref) -> None:
            raise SystemExit(1)

        def fail_in_callback(ref) -> None:
            raise ValueError("a real error")

        for callback in (exit_in_callback, fail_in_callback):
            thing = Thing()
            ref = weakref.ref(thing, callback)  # noqa: F841 - kept alive until the object goes
            del thing
    finally:
        sys.unraisablehook = before
    err = capsys.readouterr().err
    assert "SystemExit" not in err and "ValueError: a real error" in err
