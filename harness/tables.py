"""Tables and plots of a sweep, rebuilt from MLflow alone.

    python -m harness table sweeps/temperature.yaml     # or: python -m harness table temperature

writes ``results/<sweep>/table.md``, ``table.tex`` (booktabs), ``table.csv`` and one
``<metric>_vs_<key>.png`` per headline metric and numeric swept key. One row per
point of the search space: mean ± sample std (ddof 1) over the seeds that
finished, their number, the point's status (failed, stopped early or interrupted
trials are counted there), the method taxonomy, and every metric the trials
logged (final values). The best mean of each metric column is in bold (lower is
better for losses, times, memory, alignment and uniformity; chosen settings such as
the linear probe's weight decay, the learning rate and throughput are not ranked).

Everything is a pure function of the runs, so deleting ``results/<sweep>/`` and
running ``table`` again gives the same files.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.errors import BadInput
from harness.tracking import search_runs

TAXONOMY = ("uses_negatives", "networks", "loss")
LOWER_IS_BETTER = re.compile(r"(loss|^time/|^memory/|alignment|uniformity)")
UNRANKED = re.compile(r"(^train/lr$|^epoch$|weight_decay$|images_per_s)")
"""Columns that are settings or rates, not scores: never bold."""
METRIC_ORDER = ("eval/", "baseline/", "collapse/", "train/", "time/", "memory/")
BASELINE_STYLES = ("--", ":", "-.")
"""Line styles of the baselines (``baseline/*`` columns: raw pixels or bag of words, random init) in plots."""


@dataclass
class SweepRuns:
    """The runs a table is built from."""

    experiment: str
    parent: dict[str, Any] | None
    children: list[dict[str, Any]]
    swept: list[str]
    headline: list[str]


def collect(experiment: str, uri: str | None = None) -> SweepRuns:
    """The newest sweep of ``experiment`` (its parent's children), or, without a sweep, all its top-level runs."""
    runs = search_runs(experiment, uri)
    if not runs:
        raise BadInput(f"table: experiment {experiment!r} has no runs in this MLflow store; run the sweep first (python -m harness sweep ...)")
    parents = [r for r in runs if r["tags"].get("harness.role") == "sweep"]
    if parents:
        parent = parents[0]  # newest first
        children = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parent["run_id"]]
        swept = json.loads(parent["tags"].get("harness.swept_keys", "[]"))
        headline = json.loads(parent["tags"].get("harness.headline", '["eval/knn/top1"]'))
        return SweepRuns(experiment, parent, children, swept, headline)
    top = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    return SweepRuns(experiment, None, top, [], ["eval/knn/top1"])


def aggregate(runs: SweepRuns) -> pd.DataFrame:
    """One row per point: swept keys, taxonomy, ``seeds``, ``status``, and ``<metric>`` / ``<metric> std`` columns."""
    records = []
    for r in runs.children:
        tags = r["tags"]
        point = {k: _load(tags.get(f"swept.{k}")) for k in runs.swept}
        if not runs.swept:  # plain runs: one row per (method, backbone, dataset)
            point = {"method": tags.get("method"), "backbone": tags.get("backbone"), "dataset": tags.get("dataset")}
        taxonomy = {k: _load(tags.get(f"taxonomy.{k}")) for k in TAXONOMY}
        records.append({"point": point, "taxonomy": taxonomy, "status": r["status"], "stopped": "harness.stopped" in tags, "metrics": r["metrics"]})
    keys = runs.swept or ["method", "backbone", "dataset"]
    metrics = sorted({m for rec in records if rec["status"] == "FINISHED" for m in rec["metrics"]}, key=_metric_sort_key)
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(json.dumps([rec["point"][k] for k in keys]), []).append(rec)
    rows = []
    for members in groups.values():
        row: dict[str, Any] = dict(members[0]["point"])
        row.update({k: next((m["taxonomy"][k] for m in members if m["taxonomy"][k] is not None), None) for k in TAXONOMY})
        done = [m for m in members if m["status"] == "FINISHED"]
        row["seeds"] = len(done)
        row["status"] = _status(members)
        for metric in metrics:
            values = np.array([m["metrics"][metric] for m in done if metric in m["metrics"]], dtype=float)
            row[metric] = float(values.mean()) if values.size else math.nan
            row[f"{metric} std"] = float(values.std(ddof=1)) if values.size > 1 else math.nan
        rows.append(row)
    frame = pd.DataFrame(rows, columns=[*keys, *TAXONOMY, "seeds", "status", *(c for m in metrics for c in (m, f"{m} std"))])
    return frame.sort_values(keys, key=lambda col: col.map(_sortable), kind="stable").reset_index(drop=True)


def best_rows(frame: pd.DataFrame) -> dict[str, set[int]]:
    """For each ranked metric column, the row positions holding its best mean."""
    best: dict[str, set[int]] = {}
    for metric in metric_columns(frame):
        if UNRANKED.search(metric):
            continue
        col = frame[metric].to_numpy(dtype=float)
        if np.isnan(col).all():
            continue
        target = np.nanmin(col) if LOWER_IS_BETTER.search(metric) else np.nanmax(col)
        best[metric] = {i for i, v in enumerate(col) if v == target}
    return best


def metric_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if f"{c} std" in frame.columns]


def build(experiment: str, out_dir: Path, uri: str | None = None) -> list[Path]:
    """Write the tables and plots of ``experiment`` into ``out_dir``; log them to the sweep's parent run. Returns the files."""
    from harness.tracking import open_run

    runs = collect(experiment, uri)
    frame = aggregate(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "table.csv", out_dir / "table.md", out_dir / "table.tex"]
    frame.to_csv(written[0], index=False, float_format="%.6g")
    cells = formatted(frame)
    written[1].write_text(to_markdown(cells, title=f"{experiment}: mean ± std over seeds; best in bold"))
    written[2].write_text(to_latex(cells, caption=f"{experiment}: mean $\\pm$ std over seeds; best in bold."))
    written += plot(frame, runs.swept, runs.headline, out_dir)
    if runs.parent is not None:
        parent = open_run(runs.parent["run_id"], uri)
        for path in written:
            parent.log_artifact(str(path), "results")
    return written


# ----------------------------------------------------------------------------- rendering


def formatted(frame: pd.DataFrame) -> list[dict[str, str]]:
    """Rows of display strings: ``mean ± std`` per metric, ``**bold**`` marks (as a leading ``*``) for the best."""
    best = best_rows(frame)
    metrics = metric_columns(frame)
    plain = [c for c in frame.columns if c not in metrics and not c.endswith(" std")]
    rows = []
    for i, row in frame.iterrows():
        cells = {c: _fmt_value(row[c]) for c in plain}
        for m in metrics:
            mean, std = row[m], row[f"{m} std"]
            if math.isnan(mean):
                text = "failed" if "failed" in row["status"] and row["seeds"] == 0 else "–"
            else:
                text = _fmt_number(mean) + ("" if math.isnan(std) else f" ± {_fmt_number(std, like=mean)}")
            cells[m] = ("*" if i in best.get(m, ()) else "") + text
        rows.append(cells)
    return rows


def to_markdown(rows: list[dict[str, str]], title: str = "") -> str:
    if not rows:
        return f"{title}\n\n(no runs)\n"
    header = list(rows[0])
    body = [[(f"**{v[1:]}**" if v.startswith("*") else v).replace("|", "\\|") for v in r.values()] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return (f"{title}\n\n" if title else "") + "\n".join(lines) + "\n"


def to_latex(rows: list[dict[str, str]], caption: str = "") -> str:
    r"""A booktabs ``table`` environment (needs ``\usepackage{booktabs}``)."""
    if not rows:
        return "% no runs\n"
    header = list(rows[0])

    def cell(v: str) -> str:
        bold = v.startswith("*")
        text = _tex_escape(v[1:] if bold else v).replace("±", "$\\pm$").replace("–", "--")
        return f"\\textbf{{{text}}}" if bold else text

    lines = [
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        f"\\begin{{tabular}}{{{'l' * len(header)}}}",
        "\\toprule",
        " & ".join(_tex_escape(h) for h in header) + " \\\\",
        "\\midrule",
        *(" & ".join(cell(v) for v in r.values()) + " \\\\" for r in rows),
        "\\bottomrule",
        "\\end{tabular}",
        f"\\caption{{{caption}}}" if caption else "",
        "\\end{table}",
    ]
    return "\n".join(line for line in lines if line) + "\n"


def plot(frame: pd.DataFrame, swept: list[str], headline: list[str], out_dir: Path) -> list[Path]:
    """``<metric>_vs_<key>.png``: mean with std error bars over seeds, one line per value of the other swept keys,
    the baselines as horizontal lines when the trials logged them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key in swept:
        values = [v for v in frame[key] if v is not None]
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        others = [k for k in swept if k != key]
        for metric in headline:
            if metric not in frame.columns or frame[metric].isna().all():
                continue
            fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
            groups = frame.groupby(others, sort=False, dropna=False) if others else [((), frame)]
            for label, sub in groups:
                sub = sub.sort_values(key)
                name = ", ".join(f"{k}={v}" for k, v in zip(others, label if isinstance(label, tuple) else (label,), strict=True)) or metric
                ax.errorbar(sub[key], sub[metric], yerr=sub[f"{metric} std"].fillna(0), marker="o", capsize=3, label=name)
            baselines = sorted(c for c in frame.columns if c.startswith("baseline/") and not c.endswith(" std"))
            for base, style in zip(baselines, BASELINE_STYLES, strict=False):  # baselines beyond the styles get no line
                if metric.startswith("eval/") and not frame[base].isna().all():
                    ax.axhline(float(frame[base].mean()), color="grey", linestyle=style, label=base.split("/")[1].replace("_", " "))
            positive = [v for v in values if v > 0]
            if len(positive) == len(values) and max(values) / min(values) >= 20:
                ax.set_xscale("log")
            ax.set_xlabel(key)
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"{_slug(metric)}_vs_{_slug(key)}.png"
            fig.savefig(path, metadata={"Software": None})
            plt.close(fig)
            written.append(path)
    return written


# ----------------------------------------------------------------------------- helpers


def _status(members: list[dict[str, Any]]) -> str:
    n = len(members)
    counts = {s: sum(1 for m in members if m["status"] == s) for s in ("FINISHED", "FAILED", "KILLED")}
    stopped = sum(1 for m in members if m["status"] == "KILLED" and m["stopped"])
    if counts["FINISHED"] == n:
        return "ok"
    parts = []
    if counts["FAILED"]:
        parts.append(f"{counts['FAILED']}/{n} failed")
    if stopped:
        parts.append(f"{stopped}/{n} stopped")
    other = n - counts["FINISHED"] - counts["FAILED"] - stopped
    if other:
        parts.append(f"{other}/{n} unfinished")
    return ", ".join(parts)


def _metric_sort_key(name: str) -> tuple[int, str]:
    for i, prefix in enumerate(METRIC_ORDER):
        if name.startswith(prefix):
            return (i, name)
    return (len(METRIC_ORDER), name)


def _load(text: str | None) -> Any:
    if text is None:
        return None
    if text in ("True", "False"):  # Python bools stored as tags
        return text == "True"
    try:
        return json.loads(text)
    except ValueError:
        return text


def _sortable(value: Any) -> tuple[int, Any]:
    if isinstance(value, bool) or value is None:
        return (2, str(value))
    if isinstance(value, (int, float)):
        return (0, value)
    return (1, str(value))


def _fmt_number(x: float, like: float | None = None) -> str:
    ref = abs(like if like is not None else x)
    if ref >= 100:
        return f"{x:.1f}"
    if ref >= 10:
        return f"{x:.2f}"
    return f"{x:.4f}"


def _fmt_value(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, dict) and "name" in v:  # a swept mapping (e.g. a whole method): its name; the rest is in the params
        return str(v["name"])
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _tex_escape(text: str) -> str:
    return re.sub(r"([_%&#$])", r"\\\1", text)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")
