"""Sweeps: the schema and its expansion (``config``), the driver, its MLflow and on-disk state, the Ray trial
function."""
