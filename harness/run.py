"""One trial: data -> views -> backbone + method -> pretraining -> frozen embeddings -> evaluations -> MLflow.

Everything that can be checked before training (config, data, names, batch size)
is checked before the MLflow run is opened, so bad input never leaves a run behind.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from harness.augment import Augmenter
from harness.backbones import create_backbone
from harness.config import RunConfig, flatten
from harness.datasets import DataSplits, load_dataset
from harness.provenance import git_commit, library_versions, peak_rss_mb
from harness.tracking import Run, start_run
from harness.train import EpochCallback, check_batch_size, pretrain, resolve_device
from evaluations.features import extract_embeddings, raw_pixels
from evaluations.knn import knn_evaluate
from methods import Method, create_method, get_method_class

log = logging.getLogger(__name__)


@dataclass
class Trial:
    """A trial with everything built and checked, ready to train."""

    cfg: RunConfig
    data: DataSplits
    method: Method
    augmenter: Augmenter
    device: torch.device


def prepare(cfg: RunConfig) -> Trial:
    """Load the data and build the model; raises BadInput for anything wrong, before any run is opened."""
    seed_everything(cfg.seed)
    d = cfg.data
    data = load_dataset(d.name, root=d.root, image_size=d.image_size, num_train=d.num_train, num_test=d.num_test, seed=d.seed, verify_checksums=d.verify_checksums)
    check_batch_size(cfg.pretrain.batch_size, len(data.train), d.name)
    device = resolve_device(cfg.device)
    b = cfg.backbone
    backbone = create_backbone(b.name, in_chans=data.channels, img_size=data.image_size, cifar_stem=b.cifar_stem, **b.kwargs)
    params = {k: v for k, v in cfg.method.items() if k != "name"}
    method = create_method(cfg.method["name"], backbone, **params)
    return Trial(cfg, data, method, Augmenter(cfg.augment, data.mean, data.std), device)


def seed_everything(seed: int) -> None:
    """Seed torch and numpy (model initialisation; the loop seeds each epoch itself)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def run_tags(cfg: RunConfig) -> dict[str, str]:
    """The tags every run carries, for filtering in the MLflow UI."""
    return {"method": cfg.method["name"], "backbone": cfg.backbone.name, "dataset": cfg.data.name, "seed": str(cfg.seed), "git_commit": git_commit()}


def default_run_name(cfg: RunConfig) -> str:
    return cfg.tracking.run_name or f"{cfg.method['name']}-{cfg.backbone.name}-{cfg.data.name}-s{cfg.seed}"


def run(cfg: RunConfig, *, on_epoch_end: EpochCallback | None = None, parent_run_id: str | None = None) -> dict[str, float]:
    """Pretrain, evaluate and log one trial; returns its final metrics. The MLflow run ends FAILED on any error."""
    trial = prepare(cfg)
    with start_run(cfg.tracking.experiment, run_name=default_run_name(cfg), tags=run_tags(cfg), uri=cfg.tracking.uri, parent_run_id=parent_run_id) as mlrun:
        return execute(trial, mlrun, on_epoch_end=on_epoch_end)


def execute(trial: Trial, mlrun: Run, *, on_epoch_end: EpochCallback | None = None) -> dict[str, float]:
    """The body of a trial, logging into an open MLflow run."""
    cfg, data, method, device = trial.cfg, trial.data, trial.method, trial.device
    checkpoint = cfg.pretrain.checkpoint_dir or Path("outputs") / cfg.tracking.experiment / mlrun.run_id
    checkpoint_path = Path(checkpoint) / "checkpoint.pt"
    log_run_inputs(mlrun, cfg, checkpoint_path)
    metrics: dict[str, float] = {}

    if cfg.eval.baselines:
        metrics.update(baselines(trial))
        mlrun.log_metrics(metrics)

    provenance = {"git_commit": git_commit(), **library_versions()}
    result = pretrain(
        method, data.train.images, cfg, trial.augmenter, device,
        checkpoint_path=checkpoint_path, provenance=provenance,
        log_metrics=mlrun.log_metrics, on_epoch_end=on_epoch_end,
    )  # fmt: skip
    metrics["time/pretrain_s"] = result.time_s
    metrics["train/images_per_s_mean"] = result.images_per_s
    if result.losses:
        metrics["train/final_loss"] = result.losses[-1]

    t0 = time.perf_counter()
    train_x, test_x = embed_splits(trial, method.embed, method)
    metrics["time/extract_s"] = time.perf_counter() - t0
    metrics.update(evaluate(cfg, train_x, data.train.labels.numpy(), test_x, data.test.labels.numpy()))
    metrics["memory/peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        metrics["memory/peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    mlrun.log_metrics(metrics)
    log.info("results: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return metrics


def log_run_inputs(mlrun: Run, cfg: RunConfig, checkpoint_path: Path | None = None) -> None:
    """Params (flattened config, effective lr), taxonomy tags, the resolved config YAML and provenance.

    Params already on the run (a sweep's trial resumed or retried into the child
    run the driver opened) are kept: MLflow params are write-once.
    """
    params = flatten(cfg.as_dict())
    params["pretrain.lr"] = cfg.pretrain.lr  # effective lr next to base_lr
    logged = mlrun.info()["params"]
    mlrun.log_params({k: v for k, v in params.items() if k not in logged})
    tags = {f"taxonomy.{k}": v for k, v in get_method_class(cfg.method["name"]).taxonomy().items() if k != "method"}
    mlrun.set_tags(tags | ({"checkpoint": str(checkpoint_path)} if checkpoint_path else {}))
    mlrun.log_text(yaml.safe_dump(cfg.as_dict(), sort_keys=False), "config.yaml")
    mlrun.log_dict({"git_commit": git_commit(), "libraries": library_versions()}, "provenance.json")


def embed_splits(trial: Trial, encoder: Callable[[torch.Tensor], torch.Tensor], module: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Train and test embeddings from a frozen encoder in eval mode (extracted once, reused by every evaluation)."""
    kw: dict[str, Any] = {"batch_size": trial.cfg.eval.batch_size, "device": trial.device, "module": module}
    module.to(trial.device)
    prep = trial.augmenter.normalize
    return extract_embeddings(encoder, trial.data.train.images, prep, **kw), extract_embeddings(encoder, trial.data.test.images, prep, **kw)


def evaluate(cfg: RunConfig, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, prefix: str = "eval") -> dict[str, float]:
    """The evaluation battery on cached embeddings; metric names ``<prefix>/<evaluation>/<metric>``."""
    t0 = time.perf_counter()
    knn = knn_evaluate(train_x, train_y, test_x, test_y, k=cfg.eval.knn.k, temperature=cfg.eval.knn.temperature)
    out = {f"{prefix}/knn/{k}": v for k, v in knn.items()}
    out[f"time/{prefix}/knn_s"] = time.perf_counter() - t0
    return out


def baselines(trial: Trial) -> dict[str, float]:
    """kNN of raw pixels and of the random-init backbone, with the same protocol as the trained model."""
    cfg, data = trial.cfg, trial.data
    k, temp = cfg.eval.knn.k, cfg.eval.knn.temperature
    ytr, yte = data.train.labels.numpy(), data.test.labels.numpy()
    prep = trial.augmenter.normalize
    out: dict[str, float] = {}
    raw = knn_evaluate(raw_pixels(data.train.images, prep), ytr, raw_pixels(data.test.images, prep), yte, k=k, temperature=temp)
    out["baseline/raw_pixels/knn_top1"] = raw["top1"]
    untrained = copy.deepcopy(trial.method.backbone)
    train_x, test_x = embed_splits(trial, untrained, untrained)
    out["baseline/random_init/knn_top1"] = knn_evaluate(train_x, ytr, test_x, yte, k=k, temperature=temp)["top1"]
    return out
