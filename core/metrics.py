"""Metric names that more than one layer reads (the loop and monitor log them; sweeps, ASHA and tables read them)."""

from __future__ import annotations

ONLINE_KNN, ONLINE_RANKME = "online/knn_top1", "online/rankme"
ONLINE_METRICS = (ONLINE_KNN, ONLINE_RANKME)
"""What the online monitor (:mod:`harness.trial.monitor`) logs at each epoch it evaluates."""
ONLINE_LINEAR = "online/linear_top1"
"""What it logs besides with ``eval.online.linear`` (:mod:`evaluations.online_linear`)."""

COLLAPSED_METRIC = "eval/collapsed"
"""1.0 for a run that collapsed (:func:`harness.trial.evaluate.collapsed`): tables and the sweep print no numbers."""

HEADLINE_METRIC = "eval/knn/top1"
"""A sweep's headline metric when its YAML names none."""
