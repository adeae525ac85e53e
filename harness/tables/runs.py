"""The runs of a table, read from MLflow and grouped into rows: one row per configuration, mean and std over seeds."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from core.errors import BadInput, suggest
from core.metrics import COLLAPSED_METRIC, HEADLINE_METRIC
from harness.track.mlflow import search_runs

TAXONOMY = ("uses_negatives", "networks", "loss")

DEFAULT_COLUMNS = (
    HEADLINE_METRIC,
    "eval/linear/top1",
    "eval/semi_1pct/top1",
    "eval/semi_10pct/top1",
    "eval/retrieval/recall_at_1",
    "eval/rank/rankme",
    "time/pretrain_s",
    "memory/peak_rss_mb",
)
"""The headline table's metric columns when the sweep sets no ``table.columns`` (those no run logged are left out)."""

TAG_REFERENCES = "harness.references"
"""The sweep parent's tag holding its ``references`` (JSON list)."""
TAG_COLUMNS = "harness.table_columns"
"""The sweep parent's tag holding its ``table.columns`` (JSON; null for the default)."""

COLLAPSED = COLLAPSED_METRIC

LOCATING = (
    "seed",
    "pretrain.checkpoint_dir",
    "pretrain.resume",
    "pretrain.progress",
    "tracking.",
    "eval.baselines_cache",
    "pretrain.lr",  # the effective lr: a function of base_lr and the batch, which are compared themselves
    "pretrain.compile",  # the same numbers compiled or not, on any number of workers or loader processes
    "distributed.",
    "data.num_workers",
)
"""Params that say which seed ran, only locate things, or follow from others: runs that differ in these alone are
seeds of one row."""

NAMED_BY_TAGS = ("method.name", "backbone.name", "data.name")
"""Params a row of plain runs shows already, as its method, backbone and dataset columns."""

METRIC_ORDER = ("eval/", "baseline/", "collapse/", "train/", "time/", "memory/")


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
    varying: list[str] = field(default_factory=list)
    """Params (besides the swept keys) whose values differ between the runs: each is a key column too."""
    references: list[dict[str, Any]] = field(default_factory=list)
    """The sweep's published reference numbers (``name``, ``metric``, ``value``, ``source``), as its parent recorded."""

    @property
    def keys(self) -> list[str]:
        """What names a row: the swept keys (for plain runs method, backbone and dataset), then every other param
        that differs between the runs, so that a row is one configuration."""
        return [*(self.swept or ["method", "backbone", "dataset"]), *self.varying]


def configuration(run: dict[str, Any]) -> dict[str, str]:
    """A run's params without the :data:`LOCATING` ones: what two seeds of one configuration share."""
    return {k: v for k, v in run["params"].items() if not k.startswith(LOCATING)}


def varying_params(runs: list[dict[str, Any]]) -> list[str]:
    """The params of plain runs (outside a sweep) that two runs hold with different values, sorted; a param only
    some runs have (another method's) separates nothing that the method column does not, and the params named by
    tags are key columns already. A sweep's trials share their base config: its points are its rows."""
    configs = [configuration(r) for r in runs]
    names = sorted({k for c in configs for k in c} - set(NAMED_BY_TAGS))
    return [k for k in names if len({c[k] for c in configs if k in c}) > 1]


def collect(experiment: str, uri: str | None = None) -> SweepRuns:
    """The newest sweep of ``experiment`` (its parent's children), or, without a sweep, all its top-level runs."""
    runs = search_runs(experiment, uri)
    if not runs:
        raise BadInput(
            f"table: experiment {experiment!r} has no runs in this MLflow "
            "store; run the sweep first (python -m harness sweep ...)"
        )
    parents = [r for r in runs if r["tags"].get("harness.role") == "sweep"]
    if parents:
        parent = parents[0]  # newest first
        children = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parent["run_id"]]
        swept = json.loads(parent["tags"].get("harness.swept_keys", "[]"))
        headline = json.loads(parent["tags"].get("harness.headline", json.dumps([HEADLINE_METRIC])))
        columns = json.loads(parent["tags"].get(TAG_COLUMNS, "null"))
        references = json.loads(parent["tags"].get(TAG_REFERENCES, "[]"))
        return SweepRuns(experiment, parent, children, swept, headline, columns, references=references)
    top = [r for r in runs if "mlflow.parentRunId" not in r["tags"]]
    return SweepRuns(experiment, None, top, [], [HEADLINE_METRIC], varying=varying_params(top))


def aggregate(runs: SweepRuns) -> pd.DataFrame:
    """One row per configuration (a sweep's point; for plain runs every param that differs is a key): the keys,
    taxonomy, ``seeds`` (distinct seeds that finished), ``status``, and ``<metric>`` / ``<metric> std`` columns."""
    keys = runs.keys
    groups = by_point(runs)
    metrics = sorted(
        {m for members in groups.values() for rec in members if rec["status"] == "FINISHED" for m in rec["metrics"]},
        key=_metric_sort_key,
    )
    rows = []
    for members in groups.values():
        row: dict[str, Any] = dict(members[0]["point"])
        row.update(
            {k: next((m["taxonomy"][k] for m in members if m["taxonomy"][k] is not None), None) for k in TAXONOMY}
        )
        done = newest_per_seed([m for m in members if m["status"] == "FINISHED"])
        row["seeds"] = len(done)
        row["collapsed"] = sum(1 for m in done if m["metrics"].get(COLLAPSED, 0.0) >= 0.5)
        row["status"] = point_status(members, row["collapsed"])
        for metric in metrics:
            values = np.array([m["metrics"][metric] for m in done if metric in m["metrics"]], dtype=float)
            row[metric] = float(values.mean()) if values.size else math.nan
            row[f"{metric} std"] = float(values.std(ddof=1)) if values.size > 1 else math.nan
        rows.append(row)
    metrics = [m for m in metrics if m != COLLAPSED]  # in the status column instead
    frame = pd.DataFrame(
        rows, columns=[*keys, *TAXONOMY, "seeds", "collapsed", "status", *(c for m in metrics for c in (m, f"{m} std"))]
    )
    return frame.sort_values(keys, key=lambda col: col.map(sortable), kind="stable").reset_index(drop=True)


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
            hint = suggest(name, logged, n=1) or (
                f" (logged: {', '.join(logged[:6])}{', ...' if len(logged) > 6 else ''})"
                if logged
                else " (no run logged any metric)"
            )
            raise BadInput(f"table.columns: no run logged {name!r}{hint}")
    return list(columns)


def by_point(runs: SweepRuns) -> dict[str, list[dict[str, Any]]]:
    """The runs grouped by point (JSON of the key values, in the runs' order), each as a record: ``run_id``,
    ``point``, ``taxonomy``, ``status``, ``stopped`` (by the scheduler), ``metrics``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs.children:
        tags = r["tags"]
        if runs.swept:
            point = {k: _load(tags.get(f"swept.{k}")) for k in runs.swept}
        else:  # plain runs: one row per (method, backbone, dataset)
            point = {"method": tags.get("method"), "backbone": tags.get("backbone"), "dataset": tags.get("dataset")}
        point.update({k: _load(r["params"].get(k)) for k in runs.varying})
        taxonomy = {k: _load(tags.get(f"taxonomy.{k}")) for k in TAXONOMY}
        record = {
            "run_id": r["run_id"],
            "point": point,
            "taxonomy": taxonomy,
            "status": r["status"],
            "stopped": "harness.stopped" in tags,
            "metrics": r["metrics"],
            "seed": r["params"].get("seed", tags.get("seed", r["run_id"])),
        }
        groups.setdefault(json.dumps([point[k] for k in runs.keys]), []).append(record)  # every param that differs
    return groups


def newest_per_seed(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One run per seed, the newest (runs come newest first): a mean over seeds never counts a seed twice."""
    newest: dict[str, dict[str, Any]] = {}
    for m in members:
        newest.setdefault(m["seed"], m)
    return list(newest.values())


def point_status(members: list[dict[str, Any]], collapsed: int = 0) -> str:
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


def sortable(value: Any) -> tuple[int, Any]:
    if isinstance(value, bool) or value is None:
        return (2, str(value))
    if isinstance(value, (int, float)):
        return (0, value)
    return (1, str(value))
