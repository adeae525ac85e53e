"""The evaluation battery on cached embeddings: which evaluations run, and their protocol
parameters, come from the run config's ``eval`` section and are logged next to every number.

    metrics, figures = evaluate_embeddings(cfg.eval, train_x, train_y, test_x, test_y, views=(v1, v2))
    metrics["eval/knn/top1"], metrics["eval/linear/top1"], metrics["eval/rank/rankme"]

Metric names are ``<prefix>/<evaluation>/<metric>``; each evaluation's wall time is
``time/<prefix>/<evaluation>_s``. Semi-supervised fine-tuning needs the model and
the images, not only embeddings: it is :func:`evaluations.finetune.finetune_subset`,
driven by :mod:`harness.trial.run`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from evaluations import collapse, search
from evaluations.checks import check_features, remap_labels
from evaluations.knn import knn_evaluate_many
from evaluations.linear import linear_probe
from evaluations.retrieval import map_at_r, recall_at_k

__all__ = ["evaluate_embeddings"]


def evaluate_embeddings(
    ev: Any,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    views: tuple[np.ndarray, np.ndarray] | None = None,
    projections: np.ndarray | None = None,
    prefix: str = "eval",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, float], dict[str, Any]]:
    """Run the enabled evaluations of ``ev`` (an :class:`harness.config.schema.EvalConfig`).

    ``device``: where the linear probe trains and the kNN and retrieval searches run (the trial's device: on a
    GPU, faiss's GPU index or an exact torch matmul; see :mod:`evaluations.search`).
    ``views``: embeddings of two augmented views of the same test images (alignment).
    ``projections``: the projector's outputs on the test images, where the method has
    a projector (collapse diagnostics of the projector too).
    Returns ``(metrics, figures)``; figures are matplotlib figures keyed by artifact file name.
    """
    train_x, train_y = check_features(train_x, train_y, evaluation=f"{prefix} (train embeddings)")
    test_x, test_y = check_features(test_x, test_y, evaluation=f"{prefix} (test embeddings)")
    (train_y, test_y), _ = remap_labels(train_y, test_y)  # any integer labels -> 0..C-1
    metrics: dict[str, float] = {}
    figures: dict[str, Any] = {}

    def timed(name: str, fn: Callable[[], dict[str, float]]) -> None:
        t0 = time.perf_counter()
        metrics.update(fn())
        metrics[f"time/{prefix}/{name}_s"] = time.perf_counter() - t0

    with search.on_device(device):
        if ev.knn.enabled:
            timed("knn", lambda: _knn(ev.knn, train_x, train_y, test_x, test_y, prefix))
        if ev.linear.enabled:
            timed("linear", lambda: _linear(ev.linear, train_x, train_y, test_x, test_y, prefix, seed, device))
        if ev.retrieval.enabled:
            timed("retrieval", lambda: _retrieval(ev.retrieval, test_x, test_y, prefix))
    if ev.collapse.enabled:
        spectra: dict[str, np.ndarray] = {}
        on_gpu = torch.device(device) if torch.device(device).type == "cuda" else None  # the CPU keeps numpy's LAPACK
        timed("rank", lambda: _collapse(train_x, test_x, views, projections, prefix, spectra, on_gpu))
        figures["spectrum.png"] = collapse.spectrum_figure(spectra)
    return metrics, figures


def _knn(
    cfg: Any, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, prefix: str
) -> dict[str, float]:
    if cfg.fp16:
        train_x, test_x = train_x.astype(np.float16), test_x.astype(np.float16)
    settings = [(cfg.k, cfg.temperature), *((int(k), float(t)) for k, t in cfg.extra)]
    results = knn_evaluate_many(train_x, train_y, test_x, test_y, settings)
    out = {f"{prefix}/knn/{m}": v for m, v in results[settings[0]].items()}
    for k, t in settings[1:]:
        out.update({f"{prefix}/knn_k{k}_t{t:g}/{m}": v for m, v in results[(k, t)].items()})
    return out


def _linear(
    cfg: Any,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    prefix: str,
    seed: int,
    device: str | torch.device,
) -> dict[str, float]:
    result = linear_probe(
        train_x, train_y, test_x, test_y, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        weight_decays=tuple(cfg.weight_decays), val_fraction=cfg.val_fraction, seed=seed, device=device,
    )  # fmt: skip
    return {
        f"{prefix}/linear/{k}": float(result[k]) for k in ("top1", "top5", "val_top1", "weight_decay") if k in result
    }


def _retrieval(cfg: Any, test_x: np.ndarray, test_y: np.ndarray, prefix: str) -> dict[str, float]:
    out = {f"{prefix}/retrieval/recall_at_{k}": float(v) for k, v in recall_at_k(test_x, test_y, tuple(cfg.ks)).items()}
    out[f"{prefix}/retrieval/map_at_r"] = float(map_at_r(test_x, test_y))
    return out


def _collapse(
    train_x: np.ndarray,
    test_x: np.ndarray,
    views: tuple[np.ndarray, np.ndarray] | None,
    projections: np.ndarray | None,
    prefix: str,
    spectra: dict[str, np.ndarray],
    device: torch.device | None = None,
) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, z in (("rank", train_x), ("rank_projector", projections)):
        if z is None:
            continue
        rankme, effective_rank, s = collapse.ranks(z, device)  # one decomposition for the three
        out[f"{prefix}/{name}/rankme"] = rankme
        out[f"{prefix}/{name}/effective_rank"] = effective_rank
        out[f"{prefix}/{name}/std_of_normalized"] = float(collapse.std_of_normalized(z))
        spectra["embedding" if name == "rank" else "projector"] = s
    out[f"{prefix}/rank/uniformity"] = float(collapse.uniformity(test_x))
    if views is not None:
        out[f"{prefix}/rank/alignment"] = float(collapse.alignment(*views))
    return out
