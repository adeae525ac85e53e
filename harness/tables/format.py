"""How a table's cells print: each metric at the precision papers use, the best of a varying column in bold."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from harness.tables.runs import TAXONOMY, metric_columns

TAXONOMY_HEADERS = {"uses_negatives": "negatives", "networks": "networks", "loss": "loss"}

LABELS = {
    "eval/knn/top1": "kNN top-1",
    "eval/knn/top5": "kNN top-5",
    "eval/linear/top1": "linear top-1",
    "eval/linear/top5": "linear top-5",
    "eval/semi_1pct/top1": "1% top-1",
    "eval/semi_10pct/top1": "10% top-1",
    "eval/retrieval/recall_at_1": "R@1",
    "eval/retrieval/map_at_r": "mAP@R",
    "eval/rank/rankme": "RankMe",
    "eval/rank/effective_rank": "eff. rank",
    "time/pretrain_s": "pretrain time",
    "memory/peak_rss_mb": "peak memory",
}
"""Headers of the headline table; another metric is headed by its name."""

LOWER_IS_BETTER = re.compile(r"(loss|^time/|^memory/|alignment|uniformity)")

UNRANKED = re.compile(r"(^train/lr$|^epoch$|weight_decay$|images_per_s|^baseline/)")
"""Columns that are settings, rates or baselines, not scores: never bold."""

PERCENT = re.compile(r"(^|[/_])(top\d+|recall|map)")

RANKS = re.compile(r"(rankme|effective_rank)$")

SECONDS = re.compile(r"(^time/|(?<!per)_s$)")

MEGABYTES = re.compile(r"(^memory/|_mb$)")

MISSING = "–"


@dataclass(frozen=True)
class Format:
    """How a metric column prints: ``value * scale`` with the format ``spec``, and the unit its header names."""

    scale: float = 1.0
    spec: str = ".4f"
    unit: str = ""

    def __call__(self, value: float) -> str:
        text = format(value * self.scale, self.spec)
        return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.0"


def column_format(metric: str, means: np.ndarray) -> Format:
    """Percent with one decimal for accuracies and recalls in [0, 1]; one decimal for RankMe and effective rank;
    whole seconds (one decimal under 10 s) and megabytes; otherwise four decimals, fewer for large values."""
    finite = means[np.isfinite(means)]
    top = float(np.abs(finite).max()) if finite.size else 0.0
    if PERCENT.search(metric) and finite.size and bool(((finite >= 0) & (finite <= 1)).all()):
        return Format(100.0, ".1f", "%")
    if RANKS.search(metric):
        return Format(1.0, ".1f")
    if SECONDS.search(metric):
        return Format(1.0, ".0f" if top >= 10 else ".1f", "s")
    if MEGABYTES.search(metric):
        return Format(1.0, ".0f", "MB")
    if top >= 100:
        return Format(1.0, ".1f")
    if top >= 10:
        return Format(1.0, ".2f")
    return Format(1.0, ".4f" if top >= 0.01 or top == 0 else ".3g")


def best_rows(frame: pd.DataFrame, metric: str, fmt: Format | None = None) -> set[int]:
    """Row positions holding the best mean of ``metric`` as printed; none for a column that is a setting, a
    baseline, or the same on every row."""
    if UNRANKED.search(metric) or metric not in frame.columns:
        return set()
    means = frame[metric].to_numpy(dtype=float)
    fmt = fmt or column_format(metric, means)
    shown = [float(fmt(v)) if math.isfinite(v) else math.nan for v in means]
    distinct = {v for v in shown if not math.isnan(v)}
    if len(distinct) < 2:
        return set()
    target = min(distinct) if LOWER_IS_BETTER.search(metric) else max(distinct)
    return {i for i, v in enumerate(shown) if v == target}


@dataclass(frozen=True)
class Cell:
    text: str
    bold: bool = False


@dataclass
class Table:
    """Display strings: a header, which columns are numbers (right-aligned), the rows, and rows set below a rule."""

    header: list[str]
    numeric: list[bool]
    rows: list[list[Cell]]
    below: list[list[Cell]] = field(default_factory=list)


def metric_cells(frame: pd.DataFrame, metric: str) -> tuple[list[Cell], Format]:
    """``mean ± std`` of ``metric`` per row at its column's precision, bold where best; ``failed`` for a point
    none of whose seeds finished, ``–`` where a finished run did not log it; ``collapsed`` for a point with a
    collapsed seed (``eval/collapsed``: its numbers are not a result), unless ``metric`` is a baseline."""
    n = len(frame)
    means = frame[metric].to_numpy(dtype=float) if metric in frame.columns else np.full(n, math.nan)
    if not metric.startswith("baseline/") and "collapsed" in frame.columns:
        means = np.where(frame["collapsed"].to_numpy() > 0, math.nan, means)
    stds = frame[f"{metric} std"].to_numpy(dtype=float) if metric in frame.columns else np.full(n, math.nan)
    fmt = column_format(metric, means)
    best = best_rows(frame.assign(**{metric: means}), metric, fmt) if metric in frame.columns else set()
    cells = []
    for i in range(n):
        if math.isnan(means[i]):
            failed = "failed" in frame["status"].iloc[i] and frame["seeds"].iloc[i] == 0
            hidden = (
                "collapsed" in frame.columns and frame["collapsed"].iloc[i] > 0 and not metric.startswith("baseline/")
            )
            cells.append(Cell("failed" if failed else "collapsed" if hidden else MISSING))
        else:
            cells.append(Cell(fmt(means[i]) + ("" if math.isnan(stds[i]) else f" ± {fmt(stds[i])}"), i in best))
    return cells, fmt


def headline_table(
    frame: pd.DataFrame, keys: list[str], metrics: list[str], references: list[dict[str, Any]] | None = None
) -> Table:
    """The swept keys, the taxonomy, seeds and status, then ``metrics``; the baselines, then the published
    ``references`` (name, metric, value, source) whose metric is a column, as rows below (never bolded)."""
    plain = [*keys, *TAXONOMY]
    columns = [metric_cells(frame, m) for m in metrics]
    header = [*keys, *(TAXONOMY_HEADERS[k] for k in TAXONOMY), "seeds", "status"]
    header += [_with_unit(LABELS.get(m, m), fmt) for m, (_, fmt) in zip(metrics, columns, strict=True)]
    rows = [_plain_cells(frame, i, plain) + [cells[i] for cells, _ in columns] for i in range(len(frame))]
    below = []
    for base in (m for m in metric_columns(frame) if m.startswith("baseline/")):
        target = _baseline_target(base)
        if target not in metrics:
            continue
        text = _baseline_text(frame, base, columns[metrics.index(target)][1])
        if text is not None:
            label = Cell("baseline: " + base.split("/")[1].replace("_", " "))
            below.append([label] + [Cell("")] * (len(plain) + 1) + [Cell(text if m == target else "") for m in metrics])
    for ref in references or []:
        if ref["metric"] not in metrics:
            continue
        fmt = columns[metrics.index(ref["metric"])][1]
        label = Cell(f"reference: {ref['name']} ({ref['source']})")
        cells = [Cell(fmt(float(ref["value"])) if m == ref["metric"] else "") for m in metrics]
        below.append([label] + [Cell("")] * (len(plain) + 1) + cells)
    return Table(header, [False] * (len(plain) + 2) + [True] * len(metrics), rows, below)


def full_table(frame: pd.DataFrame, keys: list[str]) -> Table:
    """Every metric column of ``frame`` (baselines included), headed by its name and unit."""
    plain = [*keys, *TAXONOMY]
    metrics = metric_columns(frame)
    columns = [metric_cells(frame, m) for m in metrics]
    header = [
        *keys,
        *(TAXONOMY_HEADERS[k] for k in TAXONOMY),
        "seeds",
        "status",
        *(_with_unit(m, fmt) for m, (_, fmt) in zip(metrics, columns, strict=True)),
    ]
    rows = [_plain_cells(frame, i, plain) + [cells[i] for cells, _ in columns] for i in range(len(frame))]
    return Table(header, [False] * (len(plain) + 2) + [True] * len(metrics), rows)


def _plain_cells(frame: pd.DataFrame, i: int, plain: list[str]) -> list[Cell]:
    return [Cell(fmt_value(frame[c].iloc[i])) for c in plain] + [
        Cell(str(frame["seeds"].iloc[i])),
        Cell(str(frame["status"].iloc[i])),
    ]


def _with_unit(label: str, fmt: Format) -> str:
    return f"{label} ({fmt.unit})" if fmt.unit else label


def _baseline_target(base: str) -> str | None:
    """``baseline/random_init/knn_top1`` -> ``eval/knn/top1``: the column a baseline belongs in."""
    evaluation, _, metric = base.rsplit("/", 1)[-1].partition("_")
    return f"eval/{evaluation}/{metric}" if metric else None


def _baseline_text(frame: pd.DataFrame, base: str, fmt: Format) -> str | None:
    """The baseline as its column prints it: one ``mean ± std`` when every point has the same (at that precision),
    else the range of the points' means."""
    finite = [i for i, v in enumerate(frame[base]) if math.isfinite(v)]
    if not finite:
        return None
    shown = {fmt(frame[base].iloc[i]) for i in finite}
    if len(shown) > 1:
        means = frame[base].iloc[finite]
        return f"{fmt(means.min())}–{fmt(means.max())}"
    i = max(finite, key=lambda j: (frame["seeds"].iloc[j], -j))  # the point with the most seeds
    std = frame[f"{base} std"].iloc[i]
    return fmt(frame[base].iloc[i]) + ("" if math.isnan(std) else f" ± {fmt(std)}")


def fmt_value(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    if (
        isinstance(v, dict) and "name" in v
    ):  # a swept mapping (e.g. a whole method): its name; the rest is in the params
        return str(v["name"])
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)
