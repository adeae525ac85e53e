"""``harness eval``: re-run the battery on a trained model, into the MLflow run that trained it.

run_id, metrics = reevaluate("3f2a...", ["eval.knn.k=200"])     # an MLflow run id, or a checkpoint file
"""

from __future__ import annotations

from pathlib import Path

import yaml

from core.errors import BadInput
from harness.config.loading import build_config
from harness.track.mlflow import open_run, tracking_uri
from harness.train.checkpoint import load_checkpoint, read_checkpoint
from harness.trial.evaluate import evaluate
from harness.trial.prepare import prepare

__all__ = ["reevaluate"]


def reevaluate(target: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[str, dict[str, float]]:
    """Re-run the battery (``eval.*`` overrides choose the part and the protocol) on a trained model, given
    an MLflow run id or a checkpoint file, and log into the run that trained it. Returns (run id, metrics)."""
    path = Path(target)
    run_id, uri = None, None
    if not path.is_file():
        run_id, uri = target, None
        try:
            tags = open_run(run_id).info()["tags"]
        except Exception:  # noqa: BLE001 - MLflow raises its own error types for unknown ids
            raise BadInput(
                f"eval: {target!r} is neither a checkpoint file nor an MLflow run id in {tracking_uri()}"
            ) from None
        if "checkpoint" not in tags:
            raise BadInput(f"eval: run {target} has no checkpoint tag; give the checkpoint file instead")
        path = Path(tags["checkpoint"])
        if not path.is_file():
            raise BadInput(f"eval: run {target}'s checkpoint {path} does not exist (any more)")
    saved = read_checkpoint(path, key="eval")
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith(("eval.", "device"))]
    if bad:
        raise BadInput(f"eval: only eval.* and device may be overridden on a trained model, got {bad[0]!r}")
    cfg = build_config(saved["config"], list(overrides))
    provenance = saved.get("provenance", {})
    run_id = run_id or provenance.get("mlflow_run_id")
    uri = provenance.get("tracking_uri") if uri is None else uri
    if not run_id:
        raise BadInput(f"eval: {path} records no MLflow run; re-run `harness run` to get one")
    trial = prepare(cfg)
    load_checkpoint(path, trial.method, None, None)
    trial.method.to(trial.device)
    mlrun = open_run(run_id, uri)
    losses = saved.get("losses") or []
    metrics = evaluate(trial, mlrun, final_loss=float(losses[-1]) if losses else None)
    mlrun.log_metrics(metrics)
    mlrun.log_text(yaml.safe_dump(cfg.as_dict()["eval"], sort_keys=False), "eval/protocol.yaml")
    return run_id, metrics
