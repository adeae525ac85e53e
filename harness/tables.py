"""Tables and plots of a sweep, rebuilt from MLflow alone.

    python -m harness table sweeps/temperature.yaml     # or: python -m harness table temperature

writes into ``results/<sweep>/``:

- ``table.md`` and ``table.tex`` (booktabs), the headline table. One row per point of the search
  space: the swept keys, the method's taxonomy (uses negatives, networks, loss), the seeds that
  finished and the point's status (failed, stopped early or interrupted trials are counted there),
  then the metrics of the sweep's ``table.columns`` (default :data:`DEFAULT_COLUMNS`, those the
  runs logged) as mean ± sample std (ddof 1) over the seeds that finished. The baselines
  (``baseline/<name>/<evaluation>_<metric>``, e.g. raw pixels and the random-init backbone under kNN
  top-1) are rows below a rule, in the column of their evaluation (a range when they differ between
  points, e.g. between backbones);
- ``table_full.md``: the same rows with every metric the trials logged (baselines as columns);
- ``table.csv``: every metric's mean and std, unrounded;
- ``<metric>_vs_<key>.png`` per headline metric and numeric swept key, and
  ``online_knn_top1_curves.png``: the online kNN top-1 against the epoch, one line per point (mean
  over seeds, shaded ± std), when the trials logged it.

Each metric column prints at the precision papers use (:func:`column_format`): accuracies and
recalls (values in [0, 1], named top1, top5, recall or map) in percent with one decimal, RankMe and
effective rank with one decimal, seconds as integers (one decimal under 10 s), megabytes as
integers. The best mean of a metric column is bold only where the column varies at that precision
(ties are all bold; lower is better for losses, times, memory, alignment and uniformity); settings
(swept keys, the linear probe's weight decay, the learning rate, throughput), the taxonomy and the
baselines are never bold.

Everything is a pure function of the runs, so deleting ``results/<sweep>/`` and running ``table``
again gives the same bytes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from harness.config import COLLAPSED_METRIC
from harness.errors import BadInput, suggest
from harness.tracking import metric_history, search_runs

if TYPE_CHECKING:
    from harness.sweep_config import TableConfig

TAXONOMY = ("uses_negatives", "networks", "loss")
TAXONOMY_HEADERS = {"uses_negatives": "negatives", "networks": "networks", "loss": "loss"}
DEFAULT_COLUMNS = (
    "eval/knn/top1",
    "eval/linear/top1",
    "eval/semi_1pct/top1",
    "eval/semi_10pct/top1",
    "eval/retrieval/recall_at_1",
    "eval/rank/rankme",
    "time/pretrain_s",
    "memory/peak_rss_mb",
)
"""The headline table's metric columns when the sweep sets no ``table.columns`` (those no run logged are left out)."""
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
TAG_COLUMNS = "harness.table_columns"
"""The sweep parent's tag holding its ``table.columns`` (JSON; null for the default)."""
ONLINE_METRIC = "online/knn_top1"

COLLAPSED = COLLAPSED_METRIC
"""The metric the trials log during pretraining (step = epoch), drawn as learning curves."""
LOWER_IS_BETTER = re.compile(r"(loss|^time/|^memory/|alignment|uniformity)")
UNRANKED = re.compile(r"(^train/lr$|^epoch$|weight_decay$|images_per_s|^baseline/)")
"""Columns that are settings, rates or baselines, not scores: never bold."""
PERCENT = re.compile(r"(^|[/_])(top\d+|recall|map)")
RANKS = re.compile(r"(rankme|effective_rank)$")
SECONDS = re.compile(r"(^time/|(?<!per)_s$)")
MEGABYTES = re.compile(r"(^memory/|_mb$)")
METRIC_ORDER = ("eval/", "baseline/", "collapse/", "train/", "time/", "memory/")
BASELINE_STYLES = ("--", ":", "-.")
"""Line styles of the baselines (``baseline/*`` columns: raw pixels or bag of words, random init) in plots."""
MISSING = "–"


@dataclass
class SweepRuns:
    """The runs a table is built from."""

    experiment: str
    parent: dict[str, Any] | None
    children: list[dict[str, Any]]
    swept: list[str]
    headline: list[str]
    columns: list[str] | None = None
    """The sweep's ``table.columns`` as its parent run recorded them (None: the default)."""

    @property
    def keys(self) -> list[str]:
        """What names a row: the swept keys, or for plain runs method, backbone and dataset."""
        return self.swept or ["method", "backbone", "dataset"]


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
        columns = json.loads(parent["tags"].get(TAG_COLUMNS, "null"))
        return SweepRuns(experiment, parent, children, swept, headline, columns)
    top = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    return SweepRuns(experiment, None, top, [], ["eval/knn/top1"])


def aggregate(runs: SweepRuns) -> pd.DataFrame:
    """One row per point: swept keys, taxonomy, ``seeds``, ``status``, and ``<metric>`` / ``<metric> std`` columns."""
    keys = runs.keys
    groups = _by_point(runs)
    metrics = sorted({m for members in groups.values() for rec in members if rec["status"] == "FINISHED" for m in rec["metrics"]}, key=_metric_sort_key)
    rows = []
    for members in groups.values():
        row: dict[str, Any] = dict(members[0]["point"])
        row.update({k: next((m["taxonomy"][k] for m in members if m["taxonomy"][k] is not None), None) for k in TAXONOMY})
        done = [m for m in members if m["status"] == "FINISHED"]
        row["seeds"] = len(done)
        row["collapsed"] = sum(1 for m in done if m["metrics"].get(COLLAPSED, 0.0) >= 0.5)
        row["status"] = _status(members, row["collapsed"])
        for metric in metrics:
            values = np.array([m["metrics"][metric] for m in done if metric in m["metrics"]], dtype=float)
            row[metric] = float(values.mean()) if values.size else math.nan
            row[f"{metric} std"] = float(values.std(ddof=1)) if values.size > 1 else math.nan
        rows.append(row)
    metrics = [m for m in metrics if m != COLLAPSED]  # in the status column instead
    frame = pd.DataFrame(rows, columns=[*keys, *TAXONOMY, "seeds", "collapsed", "status", *(c for m in metrics for c in (m, f"{m} std"))])
    return frame.sort_values(keys, key=lambda col: col.map(_sortable), kind="stable").reset_index(drop=True)


def metric_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if f"{c} std" in frame.columns]


def table_columns(runs: SweepRuns, frame: pd.DataFrame, columns: list[str] | None) -> list[str]:
    """The headline table's metrics: ``columns`` (each must have been logged by some run, else BadInput naming
    the closest logged metric), or the :data:`DEFAULT_COLUMNS` that finished runs logged."""
    if columns is None:
        return [m for m in DEFAULT_COLUMNS if m in frame.columns]
    logged = sorted({m for r in runs.children for m in r["metrics"]})
    for name in columns:
        if name not in logged:
            hint = suggest(name, logged, n=1) or (f" (logged: {', '.join(logged[:6])}{', ...' if len(logged) > 6 else ''})" if logged else " (no run logged any metric)")
            raise BadInput(f"table.columns: no run logged {name!r}{hint}")
    return list(columns)


def build(experiment: str, out_dir: Path, uri: str | None = None, table: TableConfig | None = None) -> list[Path]:
    """Write the tables and plots of ``experiment`` into ``out_dir``; log them to the sweep's parent run. Returns the files.

    ``table`` is the sweep's ``table`` section (from its YAML); without it, the one the sweep's parent run recorded.
    A ``table.columns`` entry no run logged is a BadInput, raised before anything is written."""
    from harness.tracking import open_run

    runs = collect(experiment, uri)
    columns = table.columns if table is not None else runs.columns
    frame = aggregate(runs)
    metrics = table_columns(runs, frame, columns)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / name for name in ("table.csv", "table.md", "table.tex", "table_full.md")]
    frame.to_csv(written[0], index=False, float_format="%.6g")
    note = "mean ± std over seeds; best of each varying column in bold"
    headline = headline_table(frame, runs.keys, metrics)
    written[1].write_text(to_markdown(headline, title=f"{experiment}: {note}; every metric in table_full.md and table.csv"), encoding="utf-8")
    written[2].write_text(to_latex(headline, caption=f"{_tex_escape(experiment)}: mean $\\pm$ std over seeds; best of each varying column in bold."), encoding="utf-8")
    written[3].write_text(to_markdown(full_table(frame, runs.keys), title=f"{experiment}: every metric; {note}"), encoding="utf-8")
    written += plot(frame, runs.swept, runs.headline, out_dir)
    written += curves(runs, frame, out_dir, uri)
    if runs.parent is not None:
        parent = open_run(runs.parent["run_id"], uri)
        if table is not None:  # a later `table EXPERIMENT` rebuilds what this one wrote
            parent.set_tags({TAG_COLUMNS: json.dumps(table.columns)})
        for path in written:
            parent.log_artifact(str(path), "results")
    return written


# ----------------------------------------------------------------------------- formatting


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
            hidden = "collapsed" in frame.columns and frame["collapsed"].iloc[i] > 0 and not metric.startswith("baseline/")
            cells.append(Cell("failed" if failed else "collapsed" if hidden else MISSING))
        else:
            cells.append(Cell(fmt(means[i]) + ("" if math.isnan(stds[i]) else f" ± {fmt(stds[i])}"), i in best))
    return cells, fmt


def headline_table(frame: pd.DataFrame, keys: list[str], metrics: list[str]) -> Table:
    """The swept keys, the taxonomy, seeds and status, then ``metrics``; the baselines as rows below."""
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
    return Table(header, [False] * (len(plain) + 2) + [True] * len(metrics), rows, below)


def full_table(frame: pd.DataFrame, keys: list[str]) -> Table:
    """Every metric column of ``frame`` (baselines included), headed by its name and unit."""
    plain = [*keys, *TAXONOMY]
    metrics = metric_columns(frame)
    columns = [metric_cells(frame, m) for m in metrics]
    header = [*keys, *(TAXONOMY_HEADERS[k] for k in TAXONOMY), "seeds", "status", *(_with_unit(m, fmt) for m, (_, fmt) in zip(metrics, columns, strict=True))]
    rows = [_plain_cells(frame, i, plain) + [cells[i] for cells, _ in columns] for i in range(len(frame))]
    return Table(header, [False] * (len(plain) + 2) + [True] * len(metrics), rows)


# ----------------------------------------------------------------------------- rendering


def to_markdown(table: Table, title: str = "") -> str:
    """A GitHub Markdown table (numbers right-aligned, bold as ``**...**``) under ``title``."""
    head = f"{title}\n\n" if title else ""
    if not table.rows:
        return f"{head}(no runs)\n"

    def cell(c: Cell) -> str:
        text = c.text.replace("|", "\\|")
        return f"**{text}**" if c.bold and text else text

    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in table.header) + " |"]
    lines.append("|" + "|".join("---:" if num else "---" for num in table.numeric) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in [*table.rows, *table.below]]
    return head + "\n".join(lines) + "\n"


def to_latex(table: Table, caption: str = "") -> str:
    r"""A booktabs ``table`` environment (needs ``\usepackage{booktabs,graphicx}``): a header's unit on a second
    line, the baselines below a rule, shrunk to the line width only when wider; ``caption`` is LaTeX already."""
    if not table.rows:
        return "% no runs\n"

    def cell(c: Cell) -> str:
        text = _tex_escape(c.text).replace("±", "$\\pm$").replace(MISSING, "--")
        text = re.sub(r"(^|(?<= ))-(?=\d)", "$-$", text)  # a minus sign, not a hyphen
        return f"\\textbf{{{text}}}" if c.bold and text else text

    def head(h: str) -> str:
        label, _, unit = h.partition(" (")
        if not unit.endswith(")"):
            return _tex_escape(h)
        return f"\\begin{{tabular}}[b]{{@{{}}c@{{}}}}{_tex_escape(label)}\\\\({_tex_escape(unit)}\\end{{tabular}}"

    spec = "".join("r" if num else "l" for num in table.numeric)
    lines = [
        "\\begin{table}[t]",
        "\\centering",
        "\\small",
        "\\setlength{\\tabcolsep}{4pt}",
        "\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{%",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(head(h) for h in table.header) + " \\\\",
        "\\midrule",
        *(" & ".join(cell(c) for c in row) + " \\\\" for row in table.rows),
        *(["\\midrule"] if table.below else []),
        *(" & ".join(cell(c) for c in row) + " \\\\" for row in table.below),
        "\\bottomrule",
        "\\end{tabular}%",
        "}",
        *([f"\\caption{{{caption}}}"] if caption else []),
        "\\end{table}",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


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
    groups = _by_point(runs)
    histories = {rec["run_id"]: metric_history(rec["run_id"], metric, uri) for members in groups.values() for rec in members if metric in rec["metrics"]}
    single = len(runs.keys) == 1
    out = []
    for point in sorted(groups, key=lambda p: [_sortable(v) for v in json.loads(p)]):
        by_step: dict[int, list[float]] = {}
        for rec in groups[point]:
            for step, value in histories.get(rec["run_id"], []):
                by_step.setdefault(step, []).append(value)
        if not by_step:
            continue
        steps = sorted(by_step)
        label = ", ".join(_fmt_value(v) if single else f"{k}={_fmt_value(v)}" for k, v in zip(runs.keys, json.loads(point), strict=True))
        status = _status(groups[point])
        mean = [float(np.mean(by_step[s])) for s in steps]
        std = [float(np.std(by_step[s], ddof=1)) if len(by_step[s]) > 1 else 0.0 for s in steps]
        out.append(Curve(label + ("" if status == "ok" else f" ({status})"), steps, mean, std))
    return out


def curves(runs: SweepRuns, frame: pd.DataFrame, out_dir: Path, uri: str | None = None, metric: str = ONLINE_METRIC) -> list[Path]:
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
            ax.axhline(float(frame[base].mean()) * scale, color="grey", linestyle=style, label="baseline: " + base.split("/")[1].replace("_", " "))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric + unit)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title=runs.keys[0] if len(runs.keys) == 1 else None, title_fontsize=7, ncol=2 if len(lines) > 6 else 1)
    fig.tight_layout()
    path = out_dir / f"{_slug(metric)}_curves.png"
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------- helpers


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _by_point(runs: SweepRuns) -> dict[str, list[dict[str, Any]]]:
    """The runs grouped by point (JSON of the key values, in the runs' order), each as a record: ``run_id``,
    ``point``, ``taxonomy``, ``status``, ``stopped`` (by the scheduler), ``metrics``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs.children:
        tags = r["tags"]
        if runs.swept:
            point = {k: _load(tags.get(f"swept.{k}")) for k in runs.swept}
        else:  # plain runs: one row per (method, backbone, dataset)
            point = {"method": tags.get("method"), "backbone": tags.get("backbone"), "dataset": tags.get("dataset")}
        taxonomy = {k: _load(tags.get(f"taxonomy.{k}")) for k in TAXONOMY}
        record = {"run_id": r["run_id"], "point": point, "taxonomy": taxonomy, "status": r["status"], "stopped": "harness.stopped" in tags, "metrics": r["metrics"]}
        groups.setdefault(json.dumps([point[k] for k in runs.keys]), []).append(record)
    return groups


def _plain_cells(frame: pd.DataFrame, i: int, plain: list[str]) -> list[Cell]:
    return [Cell(_fmt_value(frame[c].iloc[i])) for c in plain] + [Cell(str(frame["seeds"].iloc[i])), Cell(str(frame["status"].iloc[i]))]


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


def _status(members: list[dict[str, Any]], collapsed: int = 0) -> str:
    n = len(members)
    counts = {s: sum(1 for m in members if m["status"] == s) for s in ("FINISHED", "FAILED", "KILLED")}
    stopped = sum(1 for m in members if m["status"] == "KILLED" and m["stopped"])
    if counts["FINISHED"] == n and not collapsed:
        return "ok"
    parts = [f"{collapsed}/{n} collapsed"] if collapsed else []
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


def _fmt_value(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return MISSING
    if isinstance(v, dict) and "name" in v:  # a swept mapping (e.g. a whole method): its name; the rest is in the params
        return str(v["name"])
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


_TEX_SPECIAL = {"\\": "\\textbackslash{}", "{": "\\{", "}": "\\}", "_": "\\_", "%": "\\%", "&": "\\&", "#": "\\#", "$": "\\$", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}"}


def _tex_escape(text: str) -> str:
    return re.sub(r"[\\{}_%&#$~^]", lambda m: _TEX_SPECIAL[m.group(0)], text)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")
