"""One trial, end to end: prepare -> MLflow run -> baselines -> pretraining -> evaluation -> metrics.

    metrics = run(build_config(raw))          # what ``python -m harness run CONFIG`` does

:func:`execute` is the body that logs into an open run; a sweep's trial
(:mod:`harness.sweep.trial`) calls it with the child run its driver opened.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from core.errors import Interrupted
from core.splits import DataSplits
from harness.config.loading import flatten
from harness.config.schema import RunConfig
from harness.data.datasets import class_counts
from harness.data.streaming import StreamedImages
from harness.track.mlflow import Run, absolute_uri, find_run, start_run, tracking_uri
from harness.track.provenance import git_commit, library_versions, machine, peak_rss_mb
from harness.train import distributed
from harness.train.checkpoint import read_checkpoint
from harness.train.loop import EpochCallback, pretrain
from harness.trial.evaluate import baselines, evaluate
from harness.trial.monitor import OnlineMonitor
from harness.trial.prepare import Trial, prepare, view_record
from methods import taxonomy

__all__ = [
    "data_record",
    "default_run_name",
    "execute",
    "log_data",
    "log_run_inputs",
    "run",
    "run_tags",
    "run_to_resume",
]

log = logging.getLogger(__name__)


def run_tags(cfg: RunConfig) -> dict[str, str]:
    """The tags every run carries, for filtering in the MLflow UI."""
    return {
        "method": cfg.method["name"],
        "backbone": cfg.backbone.name,
        "dataset": cfg.data.name,
        "seed": str(cfg.seed),
        "git_commit": git_commit(),
    }


def default_run_name(cfg: RunConfig) -> str:
    return cfg.tracking.run_name or f"{cfg.method['name']}-{cfg.backbone.name}-{cfg.data.name}-s{cfg.seed}"


def run(
    cfg: RunConfig, *, on_epoch_end: EpochCallback | None = None, parent_run_id: str | None = None
) -> dict[str, float]:
    """Pretrain, evaluate and log one trial; returns its final metrics. The MLflow run ends FAILED on any error,
    KILLED on a stop signal (:class:`Interrupted`). Resuming from a checkpoint (``pretrain.resume``) continues the
    MLflow run that wrote it, when it is in this store."""
    trial = prepare(cfg)
    with start_run(
        cfg.tracking.experiment,
        run_name=default_run_name(cfg),
        tags=run_tags(cfg),
        uri=cfg.tracking.uri,
        parent_run_id=parent_run_id,
        resume=run_to_resume(cfg),
    ) as mlrun:
        return execute(trial, mlrun, on_epoch_end=on_epoch_end)


def run_to_resume(cfg: RunConfig) -> Run | None:
    """The MLflow run that wrote ``cfg.pretrain.resume``, when it is in this config's store; else None (a new run)."""
    if cfg.pretrain.resume is None:
        return None
    provenance = read_checkpoint(cfg.pretrain.resume, cfg).get("provenance", {})
    run_id, uri = provenance.get("mlflow_run_id"), tracking_uri(cfg.tracking.uri)
    if not run_id or absolute_uri(provenance.get("tracking_uri", "")) != absolute_uri(uri):
        return None
    return find_run(run_id, uri)


def execute(trial: Trial, mlrun: Run, *, on_epoch_end: EpochCallback | None = None) -> dict[str, float]:
    """The body of a trial, logging into an open MLflow run.

    Each epoch logs ``train/*`` and, at the online monitor's epochs (``eval.online``, :mod:`harness.trial.monitor`),
    ``online/knn_top1`` and ``online/rankme``; ``on_epoch_end`` sees the same metrics.

    The run may be one that was interrupted (``run --resume``, a sweep's resumed or retried trial): what it
    logged stays, the baselines are not computed again, and no epoch is logged twice. A stop signal raises
    :class:`Interrupted` with the last complete checkpoint.
    """
    cfg, data, method, device = trial.cfg, trial.data, trial.method, trial.device
    checkpoint = cfg.pretrain.checkpoint_dir or Path("outputs") / cfg.tracking.experiment / mlrun.run_id
    checkpoint_path = (Path(checkpoint) / "checkpoint.pt").resolve()
    log_run_inputs(mlrun, cfg, checkpoint_path)
    log_data(mlrun, data)
    views = view_record(trial)
    mlrun.log_dict({"views": views}, "views.json")
    mlrun.set_tags({"augment.view_recipes": view_summary(views)})
    logged = mlrun.info()["metrics"]
    metrics: dict[str, float] = {}

    if cfg.eval.baselines:
        done = {k: v for k, v in logged.items() if k.startswith("baseline/")}
        metrics.update(done or baselines(trial))
        if not done:
            mlrun.log_metrics(metrics)

    logged_epochs = mlrun.logged_steps("train/loss")

    def log_epoch(epoch_metrics: dict[str, float], epoch: int) -> None:
        if epoch not in logged_epochs:  # an epoch logged before the interruption keeps its one entry, online/* included
            mlrun.log_metrics(epoch_metrics, epoch)

    monitor = OnlineMonitor.build(trial) if cfg.eval.online.enabled else None

    provenance = {
        "git_commit": git_commit(),
        "mlflow_run_id": mlrun.run_id,
        "tracking_uri": tracking_uri(cfg.tracking.uri),
        **library_versions(),
    }
    try:
        result = pretrain(
            method, data.train.images, cfg, trial.augmenter, device,
            checkpoint_path=checkpoint_path, provenance=provenance,
            log_metrics=log_epoch, on_epoch_end=on_epoch_end, epoch_metrics=monitor,
        )  # fmt: skip
        metrics["time/pretrain_s"] = result.time_s
        if cfg.pretrain.compile:
            metrics["time/compile_s"] = result.compile_s
        if monitor is not None and result.online_s:
            metrics["time/online_s"] = result.online_s
        metrics["train/images_per_s_mean"] = result.images_per_s
        skipped = set(result.skipped)
        if result.losses:
            metrics["train/final_loss"] = result.losses[-1]
        metrics.update(evaluate(trial, mlrun, final_loss=result.losses[-1] if result.losses else None))
    except (KeyboardInterrupt, RuntimeError) as err:  # another worker died: a collective fails, or torchrun stops us
        lost = distributed.lost_worker(err)
        if lost is not None:
            raise lost from err
        if isinstance(err, KeyboardInterrupt):
            raise Interrupted(checkpoint_path if checkpoint_path.is_file() else None) from err
        raise
    if data.streamed:  # unreadable images met in training, evaluation or fine-tuning, each once
        skipped |= {
            name
            for split in (data.train, data.test)
            if isinstance(split.images, StreamedImages)
            for name in split.images.skipped
        }
        metrics["data/skipped_images"] = len(skipped)
    metrics["memory/peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        metrics["memory/peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    mlrun.log_metrics({k: v for k, v in metrics.items() if not k.startswith("baseline/")})  # those are logged already
    log.info("results: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return metrics


def view_summary(views: list[dict[str, Any]]) -> str:
    """One line for the tag ``augment.view_recipes``: each view's side and the probabilities of its recipe."""
    keys = ("blur_p", "solarize_p", "jitter_p", "grayscale_p", "hflip_p")
    parts = [f"{v['size']}px " + " ".join(f"{k.removesuffix('_p')} {v[k]:g}" for k in keys) for v in views]
    return " | ".join(parts)


def data_record(data: DataSplits) -> dict[str, Any]:
    """What a run records about its data: provenance, counts per split and class, and the class-to-index mapping."""
    return {
        "dataset": data.name,
        **data.provenance,
        "storage": data.storage,
        "channels": data.channels,
        "image_size": data.image_size,
        "images": {"train": len(data.train), "test": len(data.test)},
        "classes": dict(enumerate(data.classes)),
        "counts": class_counts(data),
    }


def log_data(mlrun: Run, data: DataSplits) -> None:
    """The data's identity on the run: param ``data.fingerprint`` (so that tables never merge runs on different data),
    tags ``data.*`` (provenance, image counts) and the artifact ``data.json`` (:func:`data_record`)."""
    fingerprint, logged = data.provenance.get("fingerprint", ""), mlrun.info()["params"].get("data.fingerprint")
    if logged is None:
        mlrun.log_params({"data.fingerprint": fingerprint})
    elif logged != fingerprint:  # a resumed run whose files changed meanwhile: its numbers mix two datasets
        log.warning("data: fingerprint %s, but the run began on data with fingerprint %s", fingerprint, logged)
        mlrun.set_tags({"data.fingerprint_changed": f"{logged} -> {fingerprint} (resumed on other data)"})
    tags: dict[str, Any] = {f"data.{k}": v for k, v in data.provenance.items() if k != "fingerprint"}
    tags |= {
        "harness.data": data.storage,
        "data.num_train_images": len(data.train),
        "data.num_test_images": len(data.test),
    }
    mlrun.set_tags(tags)
    mlrun.log_dict(data_record(data), "data.json")
    log.info("data: %s %s, %d + %d images, %d channel(s), fingerprint %s", data.name, data.storage, len(data.train),
             len(data.test), data.channels, data.provenance.get("fingerprint", "?"))  # fmt: skip


def log_run_inputs(mlrun: Run, cfg: RunConfig, checkpoint_path: Path | None = None) -> None:
    """Params (flattened config, effective lr), taxonomy tags, the resolved config YAML and provenance.

    Params already on the run (a sweep's trial resumed or retried into the child
    run the driver opened) are kept: MLflow params are write-once.
    """
    params = flatten(cfg.as_dict())
    params["pretrain.lr"] = cfg.pretrain.lr  # effective lr next to base_lr
    logged = mlrun.info()["params"]
    mlrun.log_params({k: v for k, v in params.items() if k not in logged})
    tags = {f"taxonomy.{k}": v for k, v in taxonomy(cfg.method["name"]).items() if k != "method"}
    mlrun.set_tags(tags | ({"checkpoint": str(checkpoint_path)} if checkpoint_path else {}))
    mlrun.log_text(yaml.safe_dump(cfg.as_dict(), sort_keys=False), "config.yaml")
    where = machine()
    mlrun.log_dict({"git_commit": git_commit(), "libraries": library_versions(), "machine": where}, "provenance.json")
    mlrun.set_tags({f"machine.{k}": v for k, v in where.items()})
