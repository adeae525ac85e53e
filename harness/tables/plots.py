"""Plots of a sweep: each headline metric against each numeric swept key, and the online learning curves."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.metrics import ONLINE_KNN
from harness.tables.format import PERCENT, fmt_value
from harness.tables.runs import SweepRuns, by_point, metric_columns, point_status, sortable
from harness.track.mlflow import metric_history

ONLINE_METRIC = ONLINE_KNN

BASELINE_STYLES = ("--", ":", "-.")
"""Line styles of the baselines (``baseline/*`` columns: raw pixels or bag of words, random init) in plots."""


def plot(frame: pd.DataFrame, swept: list[str], headline: list[str], out_dir: Path) -> list[Path]:
    """``<metric>_vs_<key>.png``: mean with std error bars over seeds, one line per value of the other swept keys,
    the baselines as horizontal lines when the trials logged them."""
    plt = _pyplot()
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
                name = (
                    ", ".join(
                        f"{k}={v}" for k, v in zip(others, label if isinstance(label, tuple) else (label,), strict=True)
                    )
                    or metric
                )
                ax.errorbar(
                    sub[key], sub[metric], yerr=sub[f"{metric} std"].fillna(0), marker="o", capsize=3, label=name
                )
            baselines = sorted(c for c in frame.columns if c.startswith("baseline/") and not c.endswith(" std"))
            for base, style in zip(baselines, BASELINE_STYLES, strict=False):  # baselines beyond the styles get no line
                if metric.startswith("eval/") and not frame[base].isna().all():
                    ax.axhline(
                        float(frame[base].mean()),
                        color="grey",
                        linestyle=style,
                        label=base.split("/")[1].replace("_", " "),
                    )
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


@dataclass
class Curve:
    """One point's learning curve: ``mean`` and sample ``std`` over its seeds at each logged epoch of ``steps``."""

    label: str
    steps: list[int]
    mean: list[float]
    std: list[float]


def learning_curves(runs: SweepRuns, uri: str | None = None, metric: str = ONLINE_METRIC) -> list[Curve]:
    """``metric``'s MLflow history (step = epoch) per point, in the table's row order: at each epoch the mean over
    the seeds that logged it, and their sample std (0 for one seed). The label is the point's values, and its
    status when not ok (a stopped or failed trial's curve ends early). Empty when no run logged ``metric``."""
    groups = by_point(runs)
    histories = {
        rec["run_id"]: metric_history(rec["run_id"], metric, uri)
        for members in groups.values()
        for rec in members
        if metric in rec["metrics"]
    }
    single = len(runs.keys) == 1
    out = []
    for point in sorted(groups, key=lambda p: [sortable(v) for v in json.loads(p)]):
        by_step: dict[int, list[float]] = {}
        for rec in groups[point]:
            for step, value in histories.get(rec["run_id"], []):
                by_step.setdefault(step, []).append(value)
        if not by_step:
            continue
        steps = sorted(by_step)
        label = ", ".join(
            fmt_value(v) if single else f"{k}={fmt_value(v)}" for k, v in zip(runs.keys, json.loads(point), strict=True)
        )
        status = point_status(groups[point])
        mean = [float(np.mean(by_step[s])) for s in steps]
        std = [float(np.std(by_step[s], ddof=1)) if len(by_step[s]) > 1 else 0.0 for s in steps]
        out.append(Curve(label + ("" if status == "ok" else f" ({status})"), steps, mean, std))
    return out


def curves(
    runs: SweepRuns, frame: pd.DataFrame, out_dir: Path, uri: str | None = None, metric: str = ONLINE_METRIC
) -> list[Path]:
    """``<metric>_curves.png``: :func:`learning_curves`, one line per point with its std shaded, the baselines of
    the same metric (``baseline/*/knn_top1`` for ``online/knn_top1``) as horizontal lines; nothing when no run
    logged ``metric``."""
    lines = learning_curves(runs, uri, metric)
    if not lines:
        return []
    values = [v for c in lines for v in c.mean]
    scale, unit = (100.0, " (%)") if PERCENT.search(metric) and all(0 <= v <= 1 for v in values) else (1.0, "")
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for c in lines:
        mean, std = np.array(c.mean) * scale, np.array(c.std) * scale
        line = ax.plot(c.steps, mean, marker="o", markersize=3, label=c.label)[0]
        ax.fill_between(c.steps, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    suffix = metric.rsplit("/", 1)[-1]
    baselines = [m for m in metric_columns(frame) if m.startswith("baseline/") and m.endswith(f"/{suffix}")]
    for base, style in zip(baselines, BASELINE_STYLES, strict=False):
        if not frame[base].isna().all():
            ax.axhline(
                float(frame[base].mean()) * scale,
                color="grey",
                linestyle=style,
                label="baseline: " + base.split("/")[1].replace("_", " "),
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric + unit)
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize=7,
        title=runs.keys[0] if len(runs.keys) == 1 else None,
        title_fontsize=7,
        ncol=2 if len(lines) > 6 else 1,
    )
    fig.tight_layout()
    path = out_dir / f"{_slug(metric)}_curves.png"
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return [path]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")
