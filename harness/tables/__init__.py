"""Tables and plots from MLflow: collect the runs (``runs``), format the cells (``format``), render Markdown and
LaTeX (``render``), draw the plots (``plots``), and write them all (``build``)."""

from harness.tables.build import build
from harness.tables.format import Cell, Table, column_format, full_table, headline_table
from harness.tables.plots import curves, learning_curves
from harness.tables.render import to_latex, to_markdown
from harness.tables.runs import (
    DEFAULT_COLUMNS,
    TAG_COLUMNS,
    SweepRuns,
    aggregate,
    collect,
    metric_columns,
    table_columns,
)

__all__ = [
    "DEFAULT_COLUMNS",
    "TAG_COLUMNS",
    "Cell",
    "SweepRuns",
    "Table",
    "aggregate",
    "build",
    "collect",
    "column_format",
    "curves",
    "full_table",
    "headline_table",
    "learning_curves",
    "metric_columns",
    "table_columns",
    "to_latex",
    "to_markdown",
]
