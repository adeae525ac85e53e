"""Tables from MLflow: aggregation over seeds against numpy, the headline table cell by cell (columns, precision,
bold, baselines), its LaTeX, the learning curves, bad ``table.columns``, and a byte-identical rebuild."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from core.errors import BadInput
from harness import tables
from harness.cli import main
from harness.sweep.config import SweepConfig, TableConfig
from harness.track.mlflow import create_run, search_runs
from tests.helpers.runs import write_sweep

# ----------------------------------------------------------------------------- a sweep in a real MLflow store

# point (temperature) -> per-seed (top1, loss, status)
RUNS = {
    0.1: [(0.50, 3.0, "FINISHED"), (0.60, 2.8, "FINISHED"), (0.70, 2.9, "FINISHED")],
    0.5: [(0.80, 3.5, "FINISHED"), (0.90, 3.3, "FINISHED"), (None, None, "FAILED")],
    1.0: [(None, None, "FAILED"), (None, None, "FAILED")],
}


@pytest.fixture
def sweep_store(tracking_uri):
    parent = create_run(
        "hand", run_name="hand sweep", tags={"harness.role": "sweep", "harness.swept_keys": json.dumps(["method.temperature"]), "harness.headline": json.dumps(["eval/knn/top1"])}, uri=tracking_uri
    )
    for temp, seeds in RUNS.items():
        for seed, (top1, loss, status) in enumerate(seeds):
            tags = {"swept.method.temperature": json.dumps(temp), "seed": seed, "taxonomy.uses_negatives": True, "taxonomy.networks": 1, "taxonomy.loss": "NT-Xent"}
            child = create_run("hand", run_name=f"t={temp} s{seed}", tags=tags, uri=tracking_uri, parent_run_id=parent.run_id)
            if top1 is not None:
                for epoch in (1, 2):  # the online monitor: step = epoch
                    child.log_metrics({"online/knn_top1": top1 * epoch / 2}, step=epoch)
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


def test_table_command_writes_the_same_files_twice(sweep_store, tracking_uri, tmp_path) -> None:
    assert main(["table", "hand", "--results", str(tmp_path / "results")]) == 0
    out = tmp_path / "results" / "hand"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["eval_knn_top1_vs_method_temperature.png", "online_knn_top1_curves.png", "table.csv", "table.md", "table.tex", "table_full.md"]
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    shutil.rmtree(out)
    assert main(["table", "hand", "--results", str(tmp_path / "results")]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    csv = (out / "table.csv").read_text().splitlines()
    assert csv[0].startswith("method.temperature,uses_negatives,networks,loss,seeds,collapsed,status,eval/knn/top1,eval/knn/top1 std")
    assert len(csv) == 1 + 3 and ",ok," in csv[1]
    md = (out / "table.md").read_text()
    # default columns: only those logged (kNN top-1, pretrain time); the raw-pixels baseline as a row in the kNN column
    assert "| method.temperature | negatives | networks | loss | seeds | status | kNN top-1 (%) | pretrain time (s) |" in md
    assert "| 0.1 | yes | 1 | NT-Xent | 3 | ok | 60.0 ± 10.0 | 11 ± 1 |" in md
    assert "| 0.5 | yes | 1 | NT-Xent | 2 | 1/3 failed | **85.0 ± 7.1** | **10 ± 1** |" in md  # 10.5 s: whole seconds
    assert "| 1 | yes | 1 | NT-Xent | 0 | 2/2 failed | failed | failed |" in md
    assert "| baseline: raw pixels |  |  |  |  |  | 30.0 ± 0.0 |  |" in md
    full = (out / "table_full.md").read_text()
    assert "train/loss" in full and "**2.9000 ± 0.1000**" in full  # every metric, lower loss is better


def test_learning_curves_from_the_metric_history(sweep_store, tracking_uri) -> None:
    curves = tables.learning_curves(tables.collect("hand", tracking_uri))
    assert [c.label for c in curves] == ["0.1", "0.5 (1/3 failed)"]  # the failed point logged no epoch
    assert curves[0].steps == [1, 2]
    np.testing.assert_allclose(curves[0].mean, [0.3, 0.6])
    np.testing.assert_allclose(curves[0].std, [np.std([0.25, 0.3, 0.35], ddof=1), 0.1])
    np.testing.assert_allclose(curves[1].mean, [0.425, 0.85])


def test_a_later_table_section_wins_and_is_recorded(sweep_store, tracking_uri, tmp_path) -> None:
    out = tmp_path / "results" / "hand"
    tables.build("hand", out, tracking_uri, table=TableConfig(columns=["train/loss", "eval/knn/top1"]))
    header = (out / "table.md").read_text().splitlines()[2]
    assert header == "| method.temperature | negatives | networks | loss | seeds | status | train/loss | kNN top-1 (%) |"
    parent = next(r for r in search_runs("hand", tracking_uri) if r["run_id"] == sweep_store.run_id)
    assert json.loads(parent["tags"][tables.TAG_COLUMNS]) == ["train/loss", "eval/knn/top1"]
    shutil.rmtree(out)
    assert main(["table", "hand", "--results", str(tmp_path / "results")]) == 0  # by name: the recorded columns
    assert (out / "table.md").read_text().splitlines()[2] == header


# ----------------------------------------------------------------------------- hand-built runs, no MLflow

SIMCLR = {"uses_negatives": "True", "networks": "1", "loss": "NT-Xent"}
CMC = {"uses_negatives": "True", "networks": "2", "loss": "InfoNCE"}
BYOL = {"uses_negatives": "False", "networks": "2", "loss": "cosine"}


def fake_run(n: int, point: dict, status: str, metrics: dict, taxonomy: dict = SIMCLR, stopped: bool = False) -> dict:
    """A run as :func:`harness.track.mlflow.search_runs` returns it."""
    tags = {"mlflow.parentRunId": "parent", **{f"swept.{k}": json.dumps(v) for k, v in point.items()}, **{f"taxonomy.{k}": v for k, v in taxonomy.items()}}
    if stopped:
        tags["harness.stopped"] = "asha"
    return {"run_id": f"run{n}", "run_name": f"run{n}", "status": status, "start_time": 0, "end_time": 0, "params": {}, "metrics": metrics, "tags": tags}


def fake_parent(swept: list[str], columns: list[str] | None = None) -> dict:
    tags = {"harness.role": "sweep", "harness.swept_keys": json.dumps(swept), "harness.headline": '["eval/knn/top1"]'}
    if columns is not None:
        tags[tables.TAG_COLUMNS] = json.dumps(columns)
    return {"run_id": "parent", "run_name": "sweep", "status": "FINISHED", "start_time": 0, "end_time": 0, "params": {}, "metrics": {}, "tags": tags}


def seed_metrics(knn: float, linear: float, rankme: float, time_s: float, memory: float, random_init: float, **more: float) -> dict:
    base = {"eval/knn/top1": knn, "eval/linear/top1": linear, "eval/rank/rankme": rankme, "time/pretrain_s": time_s, "memory/peak_rss_mb": memory}
    return base | {"train/lr": 1e-7, "train/loss": 3.0, "baseline/raw_pixels/knn_top1": 0.284, "baseline/random_init/knn_top1": random_init} | more


TEMPERATURE_RUNS = [
    fake_run(0, {"method.temperature": 0.1}, "FINISHED", seed_metrics(0.50, 0.62, 40.0, 100.0, 1000.0, 0.24)),
    fake_run(1, {"method.temperature": 0.1}, "FINISHED", seed_metrics(0.60, 0.64, 42.0, 110.0, 1010.0, 0.25)),
    fake_run(2, {"method.temperature": 0.5}, "FINISHED", seed_metrics(0.80, 0.60, 30.0, 90.0, 1005.2, 0.24)),
    fake_run(3, {"method.temperature": 0.5}, "FINISHED", seed_metrics(0.90, 0.66, 30.0, 96.0, 1004.8, 0.25)),
    fake_run(4, {"method.temperature": 0.2}, "FINISHED", seed_metrics(0.70, 0.61, 35.0, 95.0, 1005.0, 0.245)),
    fake_run(5, {"method.temperature": 0.2}, "FAILED", {}),
    fake_run(6, {"method.temperature": 1.0}, "FAILED", {}),
    fake_run(7, {"method.temperature": 1.0}, "FAILED", {}),
]
COLUMNS = ["eval/knn/top1", "eval/linear/top1", "eval/rank/rankme", "time/pretrain_s", "memory/peak_rss_mb"]

EXPECTED_MD = """\
| method.temperature | negatives | networks | loss | seeds | status | kNN top-1 (%) | linear top-1 (%) | RankMe | pretrain time (s) | peak memory (MB) |
|---|---|---|---|---|---|---:|---:|---:|---:|---:|
| 0.1 | yes | 1 | NT-Xent | 2 | ok | 55.0 ± 7.1 | **63.0 ± 1.4** | **41.0 ± 1.4** | 105 ± 7 | 1005 ± 7 |
| 0.2 | yes | 1 | NT-Xent | 1 | 1/2 failed | 70.0 | 61.0 | 35.0 | 95 | 1005 |
| 0.5 | yes | 1 | NT-Xent | 2 | ok | **85.0 ± 7.1** | **63.0 ± 4.2** | 30.0 ± 0.0 | **93 ± 4** | 1005 ± 0 |
| 1 | yes | 1 | NT-Xent | 0 | 2/2 failed | failed | failed | failed | failed | failed |
| baseline: random init |  |  |  |  |  | 24.5 ± 0.7 |  |  |  |  |
| baseline: raw pixels |  |  |  |  |  | 28.4 ± 0.0 |  |  |  |  |
"""


def fake_sweep(monkeypatch, runs: list[dict], swept: list[str], columns: list[str] | None = None) -> tables.SweepRuns:
    monkeypatch.setattr(tables.runs, "search_runs", lambda experiment, uri=None: [fake_parent(swept, columns), *runs])
    return tables.collect("fake")


def test_headline_table_cell_by_cell(monkeypatch) -> None:
    runs = fake_sweep(monkeypatch, TEMPERATURE_RUNS, ["method.temperature"])
    frame = tables.aggregate(runs)
    table = tables.headline_table(frame, runs.keys, tables.table_columns(runs, frame, COLUMNS))
    # percent with one decimal; RankMe one decimal; whole seconds and MB; bold where best (lower time; ties both bold);
    # memory is the same on every row at its precision: no bold; the baselines below, in the kNN column, never bold
    assert tables.to_markdown(table) == EXPECTED_MD
    assert len(table.header) == 6 + len(COLUMNS)


def test_default_columns_of_a_temperature_sweep(monkeypatch) -> None:
    extra = {"eval/knn/top5": 0.99, "eval/semi_1pct/top1": 0.3, "eval/semi_10pct/top1": 0.4, "eval/retrieval/recall_at_1": 0.5, "eval/rank/uniformity": -2.0, "time/eval/knn_s": 0.02}
    runs = [fake_run(i, {"method.temperature": t}, "FINISHED", seed_metrics(0.5 + i / 100, 0.6, 40.0, 80.0, 1100.0, 0.24, **extra)) for i, t in enumerate([0.05, 0.05, 0.1, 0.1])]
    sweep = fake_sweep(monkeypatch, runs, ["method.temperature"])
    frame = tables.aggregate(sweep)
    headline = tables.headline_table(frame, sweep.keys, tables.table_columns(sweep, frame, None))
    labels = ["kNN top-1 (%)", "linear top-1 (%)", "1% top-1 (%)", "10% top-1 (%)", "R@1 (%)", "RankMe", "pretrain time (s)", "peak memory (MB)"]
    assert headline.header == ["method.temperature", "negatives", "networks", "loss", "seeds", "status", *labels]
    assert headline.rows[0][6:8] == [tables.Cell("50.5 ± 0.7"), tables.Cell("60.0 ± 0.0")]
    assert headline.rows[1][6] == tables.Cell("52.5 ± 0.7", bold=True)
    assert not any(c.bold for row in headline.rows for c in row[7:])  # the same on both rows: nothing is best
    # the full table keeps every metric, baselines and settings included, none of them bold
    full = tables.full_table(frame, sweep.keys)
    assert "eval/knn/top5 (%)" in full.header and "train/lr" in full.header and "baseline/random_init/knn_top1 (%)" in full.header
    lr, base = full.header.index("train/lr"), full.header.index("baseline/raw_pixels/knn_top1 (%)")
    assert [row[lr] for row in full.rows] == [tables.Cell("1e-07 ± 0")] * 2
    assert [row[base] for row in full.rows] == [tables.Cell("28.4 ± 0.0")] * 2


def test_swept_values_are_never_bold_and_baselines_that_differ_are_a_range(monkeypatch) -> None:
    runs = [
        fake_run(0, {"method": "simclr", "pretrain.batch_size": 64}, "FINISHED", seed_metrics(0.68, 0.7, 40.0, 80.0, 1100.0, 0.240)),
        fake_run(1, {"method": "cmc", "pretrain.batch_size": 128}, "FINISHED", seed_metrics(0.35, 0.4, 20.0, 160.0, 1500.0, 0.208), taxonomy=CMC),
        fake_run(2, {"method": "byol", "pretrain.batch_size": 64}, "KILLED", {"train/loss": 1.0}, taxonomy=BYOL, stopped=True),
    ]
    sweep = fake_sweep(monkeypatch, runs, ["method", "pretrain.batch_size"])
    frame = tables.aggregate(sweep)
    table = tables.headline_table(frame, sweep.keys, ["eval/knn/top1", "time/pretrain_s"])
    assert [[c.text for c in row] for row in table.rows] == [
        ["byol", "64", "no", "2", "cosine", "0", "1/1 stopped", "–", "–"],  # stopped early: no score, not "failed"
        ["cmc", "128", "yes", "2", "InfoNCE", "1", "ok", "35.0", "160"],
        ["simclr", "64", "yes", "1", "NT-Xent", "1", "ok", "68.0", "80"],
    ]
    assert [[c.bold for c in row] for row in table.rows] == [[False] * 9, [False] * 9, [False] * 7 + [True, True]]
    assert [[c.text for c in row] for row in table.below] == [
        ["baseline: random init", "", "", "", "", "", "", "20.8–24.0", ""],  # CMC's two encoders start elsewhere
        ["baseline: raw pixels", "", "", "", "", "", "", "28.4", ""],
    ]
    full = tables.full_table(frame, sweep.keys)
    random_init = full.header.index("baseline/random_init/knn_top1 (%)")
    assert [row[random_init] for row in full.rows] == [tables.Cell("–"), tables.Cell("20.8"), tables.Cell("24.0")]  # varies, never bold
    without_knn = tables.headline_table(frame, sweep.keys, ["time/pretrain_s"])
    assert without_knn.below == []  # a baseline goes in its evaluation's column, or nowhere (it is in table_full.md)
    # a sweep's published references: rows below, in their metric's column and format, never bold, never in the means
    refs = [{"name": "raw pixels, kNN k=5", "metric": "eval/knn/top1", "value": 0.854, "source": "Xiao et al. 2017"},
            {"name": "elsewhere", "metric": "eval/semi/1pct/top1", "value": 0.5, "source": "x"}]  # fmt: skip
    with_refs = tables.headline_table(frame, sweep.keys, ["eval/knn/top1", "time/pretrain_s"], refs)
    assert [c.text for c in with_refs.below[-1]] == ["reference: raw pixels, kNN k=5 (Xiao et al. 2017)", *[""] * 6, "85.4", ""]
    assert len(with_refs.below) == 3 and not any(c.bold for row in with_refs.below for c in row)
    assert [[c.text for c in row] for row in with_refs.rows] == [[c.text for c in row] for row in table.rows]


@pytest.mark.parametrize(
    ("metric", "means", "value", "text", "unit"),
    [
        ("eval/knn/top1", [0.6834, 0.5], 0.6834, "68.3", "%"),
        ("eval/retrieval/recall_at_1", [0.12], 0.12, "12.0", "%"),
        ("eval/retrieval/map_at_r", [0.111], 0.111, "11.1", "%"),
        ("eval/zero_shot/top5", [1.0], 1.0, "100.0", "%"),
        ("eval/knn/top1", [12.0, 50.0], 12.0, "12.00", ""),  # already a percentage: printed as logged
        ("eval/rank/rankme", [46.3504], 46.3504, "46.4", ""),
        ("eval/rank/effective_rank", [0.51], 0.51, "0.5", ""),
        ("time/pretrain_s", [79.7158, 5.0], 79.7158, "80", "s"),
        ("time/eval/knn_s", [0.0237, 2.2], 2.2257, "2.2", "s"),
        ("memory/peak_rss_mb", [1114.58], 1114.58, "1115", "MB"),
        ("train/loss", [3.52422], 3.52422, "3.5242", ""),
        ("train/images_per_s", [1132.49], 1132.49, "1132.5", ""),
        ("eval/rank/uniformity", [-0.00001, -2.0], -0.00001, "0.0000", ""),  # no "-0.0000"
        ("train/lr", [9.55042e-08], 9.55042e-08, "9.55e-08", ""),
    ],
)
def test_precision_per_metric(metric, means, value, text, unit) -> None:
    fmt = tables.column_format(metric, np.array(means))
    assert (fmt(value), fmt.unit) == (text, unit)


def test_latex_is_the_same_table_in_booktabs(monkeypatch, tmp_path) -> None:
    runs = fake_sweep(monkeypatch, TEMPERATURE_RUNS, ["method.temperature"])
    frame = tables.aggregate(runs)
    tex = tables.to_latex(tables.headline_table(frame, runs.keys, COLUMNS), caption="t\\_1: mean $\\pm$ std")
    lines = tex.splitlines()
    shrink = "\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{%"  # only a table wider than the line
    assert lines[:7] == ["\\begin{table}[t]", "\\centering", "\\small", "\\setlength{\\tabcolsep}{4pt}", shrink, "\\begin{tabular}{llllllrrrrr}", "\\toprule"]
    assert lines[-5:] == ["\\bottomrule", "\\end{tabular}%", "}", "\\caption{t\\_1: mean $\\pm$ std}", "\\end{table}"]
    rules = [(i, line) for i, line in enumerate(lines) if line.endswith("rule")]
    assert [line for _, line in rules] == ["\\toprule", "\\midrule", "\\midrule", "\\bottomrule"]
    body = [line for line in lines[rules[0][0] + 1 : rules[-1][0]] if not line.endswith("rule")]
    assert len(body) == 1 + 4 + 2  # header, four points, two baselines
    for line in body:
        assert line.endswith(" \\\\") and len(re.findall(r"(?<!\\)&", line)) == 11 - 1
        assert line.count("{") == line.count("}") and not re.search(r"(?<!\\)[%_#]|[±–]", line)
    unit = "\\begin{{tabular}}[b]{{@{{}}c@{{}}}}{}\\\\({})\\end{{tabular}}".format  # the unit under the name
    header = [
        "method.temperature",
        "negatives",
        "networks",
        "loss",
        "seeds",
        "status",
        unit("kNN top-1", "\\%"),
        unit("linear top-1", "\\%"),
        "RankMe",
        unit("pretrain time", "s"),
        unit("peak memory", "MB"),
    ]
    assert body[0] == " & ".join(header) + " \\\\"
    assert body[3] == "0.5 & yes & 1 & NT-Xent & 2 & ok & \\textbf{85.0 $\\pm$ 7.1} & \\textbf{63.0 $\\pm$ 4.2} & 30.0 $\\pm$ 0.0 & \\textbf{93 $\\pm$ 4} & 1005 $\\pm$ 0 \\\\"
    assert body[4] == "1 & yes & 1 & NT-Xent & 0 & 2/2 failed & failed & failed & failed & failed & failed \\\\"
    assert lines[rules[2][0] - 1] == body[4] and body[5:] == [
        "baseline: random init &  &  &  &  &  & 24.5 $\\pm$ 0.7 &  &  &  &  \\\\",
        "baseline: raw pixels &  &  &  &  &  & 28.4 $\\pm$ 0.0 &  &  &  &  \\\\",
    ]
    odd = tables.Table(["a_b", "c (%)"], [True, True], [[tables.Cell("-2.1 ± 0.1", bold=True), tables.Cell("–")]])
    assert tables.to_latex(odd).splitlines()[7:10] == ["a\\_b & " + unit("c", "\\%") + " \\\\", "\\midrule", "\\textbf{$-$2.1 $\\pm$ 0.1} & -- \\\\"]
    if shutil.which("pdflatex") is None:
        pytest.skip("no pdflatex: the structure is checked above")
    doc = "\\documentclass{article}\\usepackage[utf8]{inputenc}\\usepackage{booktabs,graphicx}\\begin{document}\n" + tex + "\\end{document}\n"
    (tmp_path / "t.tex").write_text(doc, encoding="utf-8")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "Overfull" not in proc.stdout


def test_a_column_no_run_logged_is_one_line_naming_the_closest(monkeypatch, tmp_path) -> None:
    runs = fake_sweep(monkeypatch, TEMPERATURE_RUNS, ["method.temperature"], columns=["eval/knn/top2"])
    frame = tables.aggregate(runs)
    with pytest.raises(BadInput) as err:
        tables.table_columns(runs, frame, runs.columns)
    assert str(err.value) == "table.columns: no run logged 'eval/knn/top2' (did you mean 'eval/knn/top1'?)"
    with pytest.raises(BadInput, match=r"^table.columns: no run logged 'zzz' \(logged: baseline/random_init/knn_top1, .*\)$"):
        tables.table_columns(runs, frame, ["zzz"])
    with pytest.raises(BadInput, match="no run logged 'eval/knn/top2'"):
        tables.build("fake", tmp_path / "out", table=TableConfig(columns=["eval/knn/top1", "eval/knn/top2"]))
    assert not (tmp_path / "out").exists()  # nothing written
    assert tables.table_columns(runs, frame, None) == COLUMNS  # the defaults nobody logged are left out quietly


def test_no_curve_when_no_run_logged_the_online_metric(monkeypatch, tmp_path) -> None:
    def no_history(*args, **kwargs):
        raise AssertionError("asked MLflow for a history no run has")

    monkeypatch.setattr(tables.plots, "metric_history", no_history)
    runs = fake_sweep(monkeypatch, TEMPERATURE_RUNS, ["method.temperature"])
    assert tables.curves(runs, tables.aggregate(runs), tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_runs_outside_a_sweep_are_rows_by_method_backbone_and_dataset(monkeypatch) -> None:
    plain = [
        {**fake_run(i, {}, "FINISHED", seed_metrics(knn, 0.6, 40.0, 80.0, 1100.0, 0.24)), "tags": {"method": "simclr", "backbone": "resnet18", "dataset": "shapes", "seed": str(i)}}
        for i, knn in enumerate([0.5, 0.7])
    ]
    monkeypatch.setattr(tables.runs, "search_runs", lambda experiment, uri=None: plain)
    runs = tables.collect("plain")
    frame = tables.aggregate(runs)
    table = tables.headline_table(frame, runs.keys, tables.table_columns(runs, frame, ["eval/knn/top1"]))
    assert table.header == ["method", "backbone", "dataset", "negatives", "networks", "loss", "seeds", "status", "kNN top-1 (%)"]
    assert [c.text for c in table.rows[0]] == ["simclr", "resnet18", "shapes", "–", "–", "–", "2", "ok", "60.0 ± 14.1"]


# ----------------------------------------------------------------------------- the sweep's table section


def test_table_section_of_a_sweep(tmp_path) -> None:
    cfg = SweepConfig(name="s", space={"method.temperature": [0.1]}, table={"columns": ["eval/knn/top1", "time/pretrain_s"]})
    assert cfg.table.columns == ["eval/knn/top1", "time/pretrain_s"]
    assert SweepConfig(name="s", space={"method.temperature": [0.1]}).table.columns is None


@pytest.mark.parametrize(
    ("fields", "overrides", "expected"),
    [
        ({"table": {"columns": "eval/knn/top1"}}, [], "table.columns: Input should be a valid list"),
        ({"table": {"columns": []}}, [], "table.columns: List should have at least 1 item"),
        ({"table": {"columns": ["eval/knn/top1", "eval/knn/top1"]}}, [], "table.columns: columns must be distinct"),
        ({"table": {"columns": [{"eval/knn/top1": 1}]}}, [], "table.columns.0: Input should be a valid string"),
        ({"table": {"columns": ["eval/knn/top1 "]}}, [], "table.columns: expected metric names such as eval/knn/top1 (got 'eval/knn/top1 ')"),
        ({"table": {"cols": ["eval/knn/top1"]}}, [], "table.cols: unknown key (did you mean 'table.columns'?)"),
        ({}, ["table.columns=[]"], "table.columns"),
    ],
)
def test_bad_table_section_exits_2_before_anything_runs(tmp_path, unmade_tracking_uri, capsys, fields, overrides, expected) -> None:
    path = write_sweep(tmp_path, **fields)
    assert main(["sweep", str(path), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    assert expected in err
    assert not (tmp_path / "mlflow.db").exists()


def test_table_columns_override(tmp_path) -> None:
    from harness.sweep.config import load_sweep

    sweep = load_sweep(write_sweep(tmp_path), ["table.columns=[eval/linear/top1, time/pretrain_s]"])
    assert sweep.cfg.table.columns == ["eval/linear/top1", "time/pretrain_s"]


def test_a_collapsed_point_shows_collapsed_instead_of_numbers_and_is_never_best(monkeypatch) -> None:
    runs = [
        fake_run(0, {"method.temperature": 0.1}, "FINISHED", seed_metrics(0.50, 0.62, 40.0, 100.0, 1000.0, 0.24, **{"eval/collapsed": 0.0})),
        fake_run(1, {"method.temperature": 0.5}, "FINISHED", seed_metrics(0.90, 0.66, 30.0, 96.0, 1004.8, 0.25, **{"eval/collapsed": 1.0})),
        fake_run(2, {"method.temperature": 0.5}, "FINISHED", seed_metrics(0.80, 0.60, 30.0, 90.0, 1005.2, 0.24, **{"eval/collapsed": 0.0})),
    ]
    sweep = fake_sweep(monkeypatch, runs, ["method.temperature"])
    frame = tables.aggregate(sweep)
    assert frame["status"].tolist() == ["ok", "1/2 collapsed"]
    assert "eval/collapsed" not in tables.metric_columns(frame)  # in the status column, not a metric column
    table = tables.headline_table(frame, sweep.keys, ["eval/knn/top1", "eval/linear/top1"])
    knn, status = table.header.index("kNN top-1 (%)"), table.header.index("status")
    assert [row[status].text for row in table.rows] == ["ok", "1/2 collapsed"]
    assert [row[knn] for row in table.rows] == [tables.Cell("50.0"), tables.Cell("collapsed")]  # 85.0 would have been bold
    assert table.below[0][knn].text == "24.0–24.5"  # the baselines keep their numbers


# ----------------------------------------------------------------------------- a row is one configuration


def plain_run(n: int, seed: int, knn: float, **params: object) -> dict:
    """A run outside a sweep with its params as MLflow holds them (strings) and its kNN top-1."""
    base = {"method.name": "simclr", "backbone.name": "resnet18", "data.name": "shapes", "pretrain.epochs": "3", "seed": str(seed)}
    tags = {"method": "simclr", "backbone": "resnet18", "dataset": "shapes", "seed": str(seed)}
    run = fake_run(n, {}, "FINISHED", {"eval/knn/top1": knn})
    return {**run, "tags": tags, "params": {**base, "pretrain.checkpoint_dir": f"/ckpt/{n}", **{k: str(v) for k, v in params.items()}}}


def plain_frame(monkeypatch, runs: list[dict]):
    monkeypatch.setattr(tables.runs, "search_runs", lambda experiment, uri=None: runs)
    collected = tables.collect("plain")
    return collected, tables.aggregate(collected)


def test_runs_that_differ_in_a_setting_are_rows_of_their_own_never_a_mean(monkeypatch) -> None:
    """Three one-off runs with different pretrain.epochs, all seed 0: three rows, one seed each, the epochs a key."""
    runs = [plain_run(i, 0, knn, **{"pretrain.epochs": epochs}) for i, (epochs, knn) in enumerate([(0, 0.25), (1, 0.5), (3, 0.75)])]
    collected, frame = plain_frame(monkeypatch, runs)
    assert collected.keys == ["method", "backbone", "dataset", "pretrain.epochs"]
    assert frame["pretrain.epochs"].tolist() == [0, 1, 3] and frame["seeds"].tolist() == [1, 1, 1]
    assert frame["eval/knn/top1"].tolist() == [0.25, 0.5, 0.75]
    table = tables.headline_table(frame, collected.keys, ["eval/knn/top1"])
    assert [[c.text for c in row][-3:] for row in table.rows] == [["1", "ok", "25.0"], ["1", "ok", "50.0"], ["1", "ok", "75.0"]]


def test_two_seeds_of_one_configuration_are_one_row_with_seeds_2(monkeypatch) -> None:
    """Checkpoint folders differ (they only locate things): still one configuration."""
    collected, frame = plain_frame(monkeypatch, [plain_run(0, 0, 0.5), plain_run(1, 1, 0.7)])
    assert collected.keys == ["method", "backbone", "dataset"] and len(frame) == 1
    assert frame["seeds"].tolist() == [2]
    assert frame["eval/knn/top1"].iloc[0] == pytest.approx(0.6) and frame["eval/knn/top1 std"].iloc[0] == pytest.approx(0.1414, abs=1e-4)


def test_a_seed_run_twice_counts_once_with_its_newest_numbers(monkeypatch) -> None:
    _, frame = plain_frame(monkeypatch, [plain_run(0, 0, 0.9), plain_run(1, 0, 0.1), plain_run(2, 1, 0.7)])  # newest first
    assert frame["seeds"].tolist() == [2]
    assert frame["eval/knn/top1"].iloc[0] == pytest.approx(0.8)


def test_runs_on_two_data_folders_are_two_rows(monkeypatch) -> None:
    runs = [plain_run(i, seed, 0.5, **{"data.root": root}) for i, (seed, root) in enumerate([(0, "/a"), (1, "/a"), (0, "/b")])]
    collected, frame = plain_frame(monkeypatch, runs)
    assert collected.keys[-1] == "data.root"
    assert frame["data.root"].tolist() == ["/a", "/b"] and frame["seeds"].tolist() == [2, 1]


def test_runs_on_one_folder_whose_files_changed_are_two_rows(monkeypatch) -> None:
    """Same config, same data.root, but the files changed between the runs: the fingerprint keeps them apart."""
    runs = [plain_run(i, seed, 0.5, **{"data.root": "/a", "data.fingerprint": fp}) for i, (seed, fp) in enumerate([(0, "f1"), (1, "f1"), (0, "f2")])]
    collected, frame = plain_frame(monkeypatch, runs)
    assert collected.keys[-1] == "data.fingerprint" and frame["seeds"].tolist() == [2, 1]


def test_a_table_names_the_commits_its_runs_were_made_with() -> None:
    from harness.tables.build import produced_by

    def tagged(commit: str) -> dict:
        return {"tags": {"git_commit": commit}}

    assert produced_by([tagged("0123456789abcdef"), tagged("0123456789abcdef")]) == "commit 0123456789"
    assert produced_by([tagged("0123456789abcdef-dirty")]) == "commit 0123456789 with uncommitted changes"
    assert produced_by([tagged("bbbbbbbbbbbb"), tagged("aaaaaaaaaaaa"), {"tags": {}}]) == "commits aaaaaaaaaa, bbbbbbbbbb, unknown"


def test_a_tree_whose_only_changes_are_generated_tables_is_clean(tmp_path, monkeypatch) -> None:
    import subprocess

    from harness.track import provenance

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.md").write_text("old\n")
    (tmp_path / "loss.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    monkeypatch.setattr(provenance, "_REPO", tmp_path)
    try:
        provenance.git_commit.cache_clear()
        (tmp_path / "results" / "table.md").write_text("new\n")  # a sweep rewrote its table
        assert not provenance.git_commit().endswith("-dirty")
        provenance.git_commit.cache_clear()
        (tmp_path / "loss.py").write_text("x = 2\n")  # code that makes numbers
        assert provenance.git_commit().endswith("-dirty")
    finally:
        provenance.git_commit.cache_clear()  # the repository's own commit again for the tests after this one
