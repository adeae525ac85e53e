"""The CLI end to end: exit codes, one-line errors, and what a run leaves in MLflow."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.cli import main
from harness.track.mlflow import search_runs
from methods.simclr import SimCLR
from tests.helpers.runs import env_for

EXPERIMENT = "cli-test"


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"tracking: {{experiment: {EXPERIMENT}}}\nmethod: {{name: simclr, temperature: 0.2}}\n")
    return path


def test_run_logs_params_metrics_tags_and_artifacts(config_file, tiny_overrides, tracking_uri, capsys):
    code, out, err = run_cli(["-q", "run", str(config_file), *tiny_overrides], capsys)
    assert code == 0, err
    assert "eval/knn/top1" in out
    (run,) = search_runs(EXPERIMENT, tracking_uri)
    assert run["status"] == "FINISHED"
    params, metrics, tags = run["params"], run["metrics"], run["tags"]
    assert params["method.temperature"] == "0.2" and params["pretrain.base_lr"] == "0.3"
    assert float(params["pretrain.lr"]) == pytest.approx(0.3 * 32 / 256)  # effective lr logged next to the base lr
    for key in ["train/loss", "eval/knn/top1", "eval/knn/top5", "baseline/raw_pixels/knn_top1", "baseline/random_init/knn_top1", "time/pretrain_s", "memory/peak_rss_mb"]:
        assert key in metrics, key
    assert 0.0 <= metrics["eval/knn/top1"] <= metrics["eval/knn/top5"] <= 1.0
    assert tags["method"] == "simclr" and tags["backbone"] == "resnet10t" and tags["dataset"] == "shapes" and tags["seed"] == "0"
    assert tags["git_commit"] and tags["taxonomy.loss"] == "NT-Xent" and tags["taxonomy.uses_negatives"] == "True"
    import torch

    assert tags["machine.cpu"] and tags["machine.torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    assert {a.path for a in client.list_artifacts(run["run_id"])} >= {"config.yaml", "provenance.json"}
    history = client.get_metric_history(run["run_id"], "train/loss")
    assert sorted(m.step for m in history) == [1, 2]


def test_failure_while_running_exits_1_and_marks_the_run_failed(config_file, tiny_overrides, tracking_uri, capsys, monkeypatch):
    def boom(self, views, step):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(SimCLR, "training_step", boom)
    code, _, err = run_cli(["-q", "run", str(config_file), *tiny_overrides], capsys)
    assert code == 1
    assert err.strip().splitlines()[-1] == "error: run failed: RuntimeError: kaboom"
    (run,) = search_runs(EXPERIMENT, tracking_uri)
    assert run["status"] == "FAILED"


def test_diverged_loss_exits_1_with_epoch_and_step(config_file, tiny_overrides, tracking_uri, capsys):
    code, _, err = run_cli(["-q", "run", str(config_file), *tiny_overrides, "pretrain.base_lr=1e30"], capsys)
    assert code == 1
    assert "error: loss diverged at epoch" in err
    assert [r["status"] for r in search_runs(EXPERIMENT, tracking_uri)] == ["FAILED"]


BAD_INPUTS = [
        ("pretrain: {epochs: [1, 2\n", [], "malformed YAML"),
        ("pretrain: {epoch: 2}\n", [], "pretrain.epoch: unknown key (did you mean 'pretrain.epochs'?)"),
        ("pretrain: {batch_size: big}\n", [], "pretrain.batch_size: "),
        ("method: {name: simclr, temperature: 0}\n", [], "method.temperature: "),
        ("method: {name: simclr, temperature: -0.5}\n", [], "method.temperature: "),
        ("method: {name: mocov9}\n", [], "method.name: unknown method 'mocov9'"),
        ("data: {name: shapez}\n", [], "unknown dataset 'shapez'"),
        ("backbone: {name: resnet181}\n", [], "backbone.name: unknown timm model 'resnet181'"),
        ("data: {name: cifar10}\n", [], "data.root"),
        ("data: {name: cifar10, root: /nonexistent/data}\n", [], "/nonexistent/data"),
        ("{}\n", ["pretrain.batch_size=100000"], "pretrain.batch_size: 100000 is larger than"),
        ("{}\n", ["pretrain.epochz=3"], "unknown key 'pretrain.epochz'"),
    ]
"""(config YAML, overrides, what the one line says): bad input the README promises to report in one line."""


@pytest.mark.parametrize("yaml_text,overrides,message", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_no_finished_run(tmp_path, tracking_uri, capsys, yaml_text, overrides, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    code, _, err = run_cli(["-q", "run", str(path), *overrides], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not any(r["status"] == "FINISHED" for r in search_runs("harness", tracking_uri))


@pytest.mark.parametrize("yaml_text,overrides,message", BAD_INPUTS)
def test_bad_input_is_one_line_on_stderr_from_a_fresh_process(tmp_path, yaml_text, overrides, message):
    """As a user sees it, logging as configured by default: the one line and nothing else (no library's log)."""
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    env = env_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.run([sys.executable, "-m", "harness", "run", str(path), *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_usage_errors_exit_2(capsys):
    assert run_cli(["frobnicate"], capsys)[0] == 2
    assert run_cli(["run"], capsys)[0] == 2
    code, _, err = run_cli(["list", "colours"], capsys)
    assert code == 2 and "invalid choice" in err


def test_list_methods_and_datasets(capsys):
    code, out, _ = run_cli(["list", "methods"], capsys)
    assert code == 0 and any(line.startswith("simclr ") for line in out.splitlines()) and "NT-Xent" in out
    assert len({line.index("negatives=") for line in out.splitlines()}) == 1  # one column, also after the longest name
    code, out, _ = run_cli(["list", "datasets"], capsys)
    assert code == 0 and {"shapes", "digits", "cifar10", "cifar100", "stl10", "imagefolder"} <= set(out.split())
    code, out, _ = run_cli(["list", "backbones", "convnext_a*"], capsys)
    assert code == 0 and "convnext_atto" in out.split()


@pytest.mark.parametrize("verb", [[], ["run"], ["list"], ["config"]])
def test_help_on_every_verb(verb):
    proc = subprocess.run([sys.executable, "-m", "harness", *verb, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout


def test_config_verb_prints_the_resolved_config(config_file, capsys):
    code, out, _ = run_cli(["config", str(config_file), "pretrain.epochs=4"], capsys)
    assert code == 0 and "epochs: 4" in out and "temperature: 0.2" in out and "proj_dim: 128" in out


def test_config_with_data_prints_what_a_run_would_record(config_file, capsys):
    """``config --data``: the data's fingerprint, subset digest, counts per class and each view's recipe, before any
    run exists (and the same fingerprint a loader call gives)."""
    import yaml

    from harness.data.datasets import load_dataset

    overrides = ["data.num_train=64", "data.num_test=32", "data.image_size=16", "pretrain.batch_size=32", "eval.semi.enabled=false"]
    code, out, _ = run_cli(["config", str(config_file), *overrides, "--data"], capsys)
    assert code == 0
    _, record = yaml.safe_load_all(out)
    expected = load_dataset("shapes", image_size=16, num_train=64, num_test=32).provenance["fingerprint"]
    assert record["data"]["fingerprint"] == expected and record["data"]["images"] == {"train": 64, "test": 32}
    assert sum(record["data"]["counts"]["train"].values()) == 64 and record["data"]["channels"] == 3
    assert [v["size"] for v in record["views"]] == [16, 16] and record["views"][0]["solarize_p"] == 0.0


@pytest.mark.parametrize("verb", ["ui", "server"])
def test_a_port_in_use_is_one_line_exit_2(verb, tmp_path, tracking_uri, capsys):
    import socket

    with socket.socket() as other:  # another process's server on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        extra = ["--store", tracking_uri, "--artifacts", str(tmp_path / "a")] if verb == "server" else []
        assert main([verb, "--port", str(port), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --port {port}: 127.0.0.1:{port} is in use by another process; give a free one, e.g. --port ")
    assert "\n" not in err
