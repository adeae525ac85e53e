"""Tracking: MLflow behind one module, and the provenance every run records."""
