"""Tables from MLflow: aggregation over seeds against numpy on a hand-made sweep, bold best, failed points, rebuild."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from harness import tables
from harness.cli import main
from harness.tracking import create_run

# point (temperature) -> per-seed (top1, loss, status)
RUNS = {
    0.1: [(0.50, 3.0, "FINISHED"), (0.60, 2.8, "FINISHED"), (0.70, 2.9, "FINISHED")],
    0.5: [(0.80, 3.5, "FINISHED"), (0.90, 3.3, "FINISHED"), (None, None, "FAILED")],
    1.0: [(None, None, "FAILED"), (None, None, "FAILED")],
}


@pytest.fixture
def sweep_store(tracking_uri):
    parent = create_run("hand", run_name="hand sweep", tags={"harness.role": "sweep", "harness.swept_keys": json.dumps(["method.temperature"]), "harness.headline": json.dumps(["eval/knn/top1"])}, uri=tracking_uri)
    for temp, seeds in RUNS.items():
        for seed, (top1, loss, status) in enumerate(seeds):
            tags = {"swept.method.temperature": json.dumps(temp), "seed": seed, "taxonomy.uses_negatives": True, "taxonomy.networks": 1, "taxonomy.loss": "NT-Xent"}
            child = create_run("hand", run_name=f"t={temp} s{seed}", tags=tags, uri=tracking_uri, parent_run_id=parent.run_id)
            if top1 is not None:
                child.log_metrics({"eval/knn/top1": top1, "train/loss": loss, "time/pretrain_s": 10.0 + seed, "baseline/raw_pixels/knn_top1": 0.3})
            child.end(status)
    parent.end("FINISHED")
    return parent


def test_mean_std_seeds_and_status_against_numpy(sweep_store, tracking_uri) -> None:
    frame = tables.aggregate(tables.collect("hand", tracking_uri))
    assert list(frame["method.temperature"]) == [0.1, 0.5, 1.0]
    assert list(frame["seeds"]) == [3, 2, 0]
    assert list(frame["status"]) == ["ok", "1/3 failed", "2/2 failed"]
    assert list(frame["loss"]) == ["NT-Xent"] * 3
    np.testing.assert_allclose(frame["eval/knn/top1"][:2], [np.mean([0.5, 0.6, 0.7]), np.mean([0.8, 0.9])])
    np.testing.assert_allclose(frame["eval/knn/top1 std"][:2], [np.std([0.5, 0.6, 0.7], ddof=1), np.std([0.8, 0.9], ddof=1)])
    assert np.isnan(frame["eval/knn/top1"][2])
    np.testing.assert_allclose(frame["train/loss"][:2], [2.9, 3.4])


def test_best_is_bold_in_the_right_direction(sweep_store, tracking_uri) -> None:
    frame = tables.aggregate(tables.collect("hand", tracking_uri))
    best = tables.best_rows(frame)
    assert best["eval/knn/top1"] == {1}  # higher is better
    assert best["train/loss"] == {0}  # lower is better
    assert best["time/pretrain_s"] == {1}  # mean 10.5 < 11
    cells = tables.formatted(frame)
    assert cells[1]["eval/knn/top1"] == "*0.8500 ± 0.0707"
    assert cells[0]["eval/knn/top1"] == "0.6000 ± 0.1000"
    assert cells[2]["eval/knn/top1"] == "failed"
    md = tables.to_markdown(cells)
    assert "**0.8500 ± 0.0707**" in md and "| 2/2 failed |" in md
    tex = tables.to_latex(cells)
    assert "\\toprule" in tex and "\\textbf{0.8500 $\\pm$ 0.0707}" in tex and "eval/knn/top1" in tex


def test_table_command_writes_the_same_files_twice(sweep_store, tracking_uri, tmp_path, capsys) -> None:
    assert main(["table", "hand", "--results", str(tmp_path / "results")]) == 0
    out = tmp_path / "results" / "hand"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["eval_knn_top1_vs_method_temperature.png", "table.csv", "table.md", "table.tex"]
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    shutil.rmtree(out)
    assert main(["table", "hand", "--results", str(tmp_path / "results")]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    csv = (out / "table.csv").read_text().splitlines()
    assert csv[0].startswith("method.temperature,uses_negatives,networks,loss,seeds,status,eval/knn/top1,eval/knn/top1 std")
