"""A sweep's tables and plots, rebuilt from MLflow alone into ``results/<sweep>/`` (``python -m harness table``).

``table.md`` / ``table.tex``: the headline table, one row per configuration (mean ± std over its seeds);
``table_full.md``: every metric; ``table.csv``: unrounded; plus the plots. A pure function of the runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.sweep.config import TableConfig
from harness.tables.format import full_table, headline_table
from harness.tables.plots import curves, plot
from harness.tables.render import tex_escape, to_latex, to_markdown
from harness.tables.runs import TAG_COLUMNS, aggregate, collect, table_columns


def build(experiment: str, out_dir: Path, uri: str | None = None, table: TableConfig | None = None) -> list[Path]:
    """Write the tables and plots of ``experiment`` into ``out_dir``; log them to the sweep's parent run. Returns the
    files.

    ``table`` is the sweep's ``table`` section (from its YAML); without it, the one the sweep's parent run recorded.
    A ``table.columns`` entry no run logged is a BadInput, raised before anything is written."""
    from harness.track.mlflow import open_run

    runs = collect(experiment, uri)
    columns = table.columns if table is not None else runs.columns
    frame = aggregate(runs)
    metrics = table_columns(runs, frame, columns)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / name for name in ("table.csv", "table.md", "table.tex", "table_full.md")]
    frame.to_csv(written[0], index=False, float_format="%.6g")
    note = (
        "a row per configuration (runs equal in every setting but the seed), mean ± std over its seeds; "
        "best of each varying column in bold"
    )
    note += f"; runs of {produced_by(runs.children)}"
    headline = headline_table(frame, runs.keys, metrics, runs.references)
    written[1].write_text(
        to_markdown(headline, title=f"{experiment}: {note}; every metric in table_full.md and table.csv"),
        encoding="utf-8",
    )
    written[2].write_text(
        to_latex(
            headline,
            caption=f"{tex_escape(experiment)}: a row per configuration, mean $\\pm$ std over its seeds; "
            f"best of each varying column in bold; runs of {tex_escape(produced_by(runs.children))}.",
        ),
        encoding="utf-8",
    )
    written[3].write_text(
        to_markdown(full_table(frame, runs.keys), title=f"{experiment}: every metric; {note}"), encoding="utf-8"
    )
    written += plot(frame, runs.swept, runs.headline, out_dir)
    written += curves(runs, frame, out_dir, uri)
    if runs.parent is not None:
        parent = open_run(runs.parent["run_id"], uri)
        if table is not None:  # a later `table EXPERIMENT` rebuilds what this one wrote
            parent.set_tags({TAG_COLUMNS: json.dumps(table.columns)})
        for path in written:
            parent.log_artifact(str(path), "results")
    return written


def produced_by(children: list[dict[str, Any]]) -> str:
    """The commits the runs were made with (their ``git_commit`` tag), ``-dirty`` marking uncommitted changes: a
    table names the code behind its numbers."""
    commits = sorted({str(r["tags"].get("git_commit", "unknown")) for r in children})
    named = [
        c if c == "unknown" else c[:10] + (" with uncommitted changes" if c.endswith("-dirty") else "") for c in commits
    ]
    return ("commit " if len(named) == 1 else "commits ") + ", ".join(named) if named else "no runs"
