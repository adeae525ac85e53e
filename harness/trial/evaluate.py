"""The evaluation battery of a trained trial, and the baselines it is read against.

Embeddings are extracted once (model in eval mode) from what the method says it embeds
(:meth:`methods.base.Method.evaluation`, a :class:`core.contract.Evaluation`), then every enabled evaluation of
:mod:`evaluations` runs on them; the method's own evaluations (``Evaluation.extra``) and semi-supervised fine-tuning
of its trunk follow. Nothing here depends on which method runs.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.contract import EvalContext, EvalInputs, Prepare
from core.metrics import COLLAPSED_METRIC
from core.splits import Images, Split
from core.views import View, override_views
from evaluations.battery import evaluate_embeddings
from evaluations.distill import self_distill
from evaluations.features import eval_mode, extract_embeddings, raw_pixels
from evaluations.finetune import classification_accuracy, classifier, finetune_subset
from evaluations.knn import knn_evaluate
from evaluations.semi_supervised import balanced_subset
from harness.config.schema import RunConfig
from harness.data.augment import Augmenter, draw_sequential
from harness.data.streaming import StreamedImages
from harness.track.mlflow import Run
from harness.trial.prepare import Trial
from methods.base import Method

log = logging.getLogger(__name__)

__all__ = ["baselines", "embed_splits", "evaluate", "knn_top1", "semi_supervised"]

Extract = Callable[[Callable[[torch.Tensor], torch.Tensor], EvalInputs], np.ndarray]


def evaluate(trial: Trial, mlrun: Run | None = None, final_loss: float | None = None) -> dict[str, float]:
    """The evaluation battery of ``cfg.eval`` on the trained method: embeddings extracted once (eval mode),
    then every enabled evaluation on them, the method's own evaluations, and semi-supervised fine-tuning.
    Figures and the label subsets go to ``mlrun`` as artifacts. ``eval/collapsed`` (0 or 1) says whether
    the run collapsed (:func:`collapsed`), judged from ``final_loss`` (the last epoch's training loss) and the
    collapse diagnostics."""
    cfg, data, method = trial.cfg, trial.data, trial.method
    ytr, yte = data.train.labels.numpy(), data.test.labels.numpy()
    t0 = time.perf_counter()
    train_x, test_x = embed_splits(trial, method.embed, method)
    metrics = {"time/extract_s": time.perf_counter() - t0}
    views = projections = None
    if cfg.eval.collapse.enabled:
        views = embed_views(trial)
        projections = _projections(method, train_x, trial.device)
    battery, figures = evaluate_embeddings(
        cfg.eval, train_x, ytr, test_x, yte, views=views, projections=projections, seed=cfg.seed, device=trial.device
    )
    metrics.update(battery)
    limit = method.collapse_loss(cfg.pretrain.batch_size)
    metrics[COLLAPSED_METRIC] = float(
        collapsed(final_loss, limit, battery.get("eval/rank/std_of_normalized"), train_x.shape[1])
    )
    ks = tuple(cfg.eval.retrieval.ks) if cfg.eval.retrieval.enabled else None
    context = EvalContext(data, test_x, _extractor(trial, method), ks)
    for name, extra in method.evaluation().extra.items():
        t0 = time.perf_counter()
        metrics.update(extra(context))
        metrics[f"time/eval/{name}_s"] = time.perf_counter() - t0
    if cfg.eval.semi.enabled:
        t0 = time.perf_counter()
        metrics.update(semi_supervised(trial, mlrun))
        metrics["time/eval/semi_s"] = time.perf_counter() - t0
    if mlrun is not None:
        for name, figure in figures.items():
            mlrun.log_figure(figure, f"eval/{name}")
    _close(figures)
    return metrics


COLLAPSE_LOSS_TOLERANCE = 0.02
"""A final loss within 2% of the method's closed-form collapse value counts as collapsed (a collapsed MoCo v2 on
shapes ends at 6.86 against log(1025) = 6.93: the positive is a little closer than the queue)."""

COLLAPSE_STD_RATIO = 0.1
"""Std of L2-normalised embeddings below this fraction of a healthy 1/sqrt(d) counts as collapsed."""


def collapsed(final_loss: float | None, collapse_loss: float | None, std_of_normalized: float | None, dim: int) -> bool:
    """Whether a run collapsed: its final training loss at the method's closed-form collapse value (within
    :data:`COLLAPSE_LOSS_TOLERANCE`), or the per-dimension std of its L2-normalised embeddings near 0 (below
    :data:`COLLAPSE_STD_RATIO` / sqrt(d); healthy embeddings have about 1/sqrt(d))."""
    if (
        final_loss is not None
        and collapse_loss is not None
        and final_loss >= collapse_loss - COLLAPSE_LOSS_TOLERANCE * abs(collapse_loss)  # MMCR's value is negative
    ):
        return True
    return std_of_normalized is not None and dim > 0 and std_of_normalized * math.sqrt(dim) < COLLAPSE_STD_RATIO


def semi_supervised(trial: Trial, mlrun: Run | None = None) -> dict[str, float]:
    """Fine-tune the method's trunk + a linear head on each balanced label fraction; the subsets' indices are logged.

    The trunk is what the method fine-tunes from (:meth:`methods.base.Method.trunk`,
    ``eval.semi.from_projector_layer``). With ``distill_epochs`` > 0 each fine-tuned model then teaches a student on
    all training images, without labels (SimCLRv2's self-distillation, which applies to any fine-tuned model), logged
    as ``distilled_top1``/``distilled_top5`` next to its own numbers."""
    cfg, data, method = trial.cfg, trial.data, trial.method
    semi = cfg.eval.semi
    trunk, dim = method.trunk(semi.from_projector_layer)
    light = cfg.augment.model_copy(  # crop + flip only
        update={"jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0, "views": []}
    )
    augmenter = Augmenter(light, data.mean, data.std)
    view = View(data.image_size)

    def augment(images: Images, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if isinstance(images, StreamedImages):  # the crops from the original images, with the same draws as the rest
            drawn = draw_sequential(len(rows), generator)
            return augmenter(images.crops(rows, drawn[1], view, light).to(trial.device), view, drawn, cropped=True)
        return augmenter(images[rows].to(trial.device), view, generator)

    epochs = semi.epochs * len(semi.fractions) if len(semi.epochs) == 1 else semi.epochs
    out: dict[str, float] = {}
    for fraction, n_epochs in zip(semi.fractions, epochs):  # noqa: B905 - the config matches their lengths
        name = f"semi_{fraction * 100:g}pct"
        subset = balanced_subset(data.train.labels.numpy(), fraction, cfg.seed)
        if mlrun is not None:
            mlrun.log_dict(
                {
                    "fraction": fraction,
                    "seed": cfg.seed,
                    "dataset": cfg.data.name,
                    "num_train": len(data.train),
                    "indices": subset.tolist(),
                },
                f"eval/{name}_indices.json",
            )
        result = finetune_subset(
            trunk, dim, data.train.images, data.train.labels, subset, data.test.images, data.test.labels, augment,
            augmenter.normalize, epochs=n_epochs, batch_size=semi.batch_size, lr=semi.lr, seed=cfg.seed,
            device=trial.device,
        )  # fmt: skip
        out.update({f"eval/{name}/{k}": v for k, v in result.metrics.items()})
        if semi.distill_epochs:
            student = self_distill(
                result.model, classifier(trunk, dim, result.num_classes), data.train.images, augment,
                epochs=semi.distill_epochs, batch_size=semi.batch_size, lr=semi.lr, seed=cfg.seed, device=trial.device,
                temperature=semi.distill_temperature,
            )  # fmt: skip
            distilled = classification_accuracy(
                student, data.test.images, data.test.labels, augmenter.normalize, trial.device
            )
            out.update({f"eval/{name}/distilled_{k}": v for k, v in distilled.items()})
    return out


def embed_splits(
    trial: Trial, encoder: Callable[[torch.Tensor], torch.Tensor], module: torch.nn.Module
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test embeddings of what the method embeds, by a frozen encoder in eval mode (extracted once,
    reused by every evaluation)."""
    module.to(trial.device)
    extract = _extractor(trial, module)
    train, test = (
        eval_inputs(trial.method, split, trial.augmenter.normalize) for split in (trial.data.train, trial.data.test)
    )
    return extract(encoder, train), extract(encoder, test)


def _images(split: Split, normalize: Prepare) -> EvalInputs:
    """The image default of what is embedded, and of the input baseline: the split's images, normalised."""
    return EvalInputs(split.images, normalize)


def eval_inputs(method: Method, split: Split, normalize: Prepare) -> EvalInputs:
    """What ``method.embed`` takes for every item of ``split``: its :class:`~core.contract.Evaluation`'s inputs, else
    the normalised images."""
    return (method.evaluation().inputs or _images)(split, normalize)


def embed_views(trial: Trial) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of two independently augmented views of the test items (alignment), seeded by the trial."""
    generator = torch.Generator().manual_seed(trial.cfg.seed + 1)

    def augment(x: torch.Tensor, spec: View) -> torch.Tensor:
        return trial.augmenter(x, spec, generator)

    own = trial.method.evaluation().alignment
    if own is not None:
        first, second = own(trial.data.test, augment)
    else:  # the method's first training view, drawn twice
        view = override_views(trial.method.views(int(trial.data.test.images.shape[-1])), trial.cfg.augment.views)[0]
        first = second = EvalInputs(trial.data.test.images, lambda x: augment(x, view))
    extract = _extractor(trial, trial.method)
    return extract(trial.method.embed, first), extract(trial.method.embed, second)


def knn_top1(cfg: RunConfig, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """kNN top-1 with the run's protocol (the baselines' and the learning curve's number)."""
    return knn_evaluate(train_x, train_y, test_x, test_y, k=cfg.eval.knn.k, temperature=cfg.eval.knn.temperature)[
        "top1"
    ]


def baselines(trial: Trial) -> dict[str, float]:
    """kNN of the method's input baseline (raw pixels; for a text method, bag of words of the captions) and of
    the random-init backbone, with the same protocol as the trained model; read from ``eval.baselines_cache``
    when a run with the same inputs computed them already (:func:`baseline_key`)."""
    folder = trial.cfg.eval.baselines_cache
    if folder is None:
        return _baselines(trial)
    return cached_json(Path(folder) / f"{baseline_key(trial)}.json", lambda: _baselines(trial))


def baseline_key(trial: Trial) -> str:
    """A digest of everything the baselines depend on: the data config and fingerprint, the kNN protocol, the device
    type, the random-init backbone's weights (so a method that draws its initial weights differently gets its own), and,
    when the method has its own evaluation or input-baseline inputs, its name and parameters."""
    cfg, method = trial.cfg, trial.method
    spec = method.evaluation()
    own_inputs = spec.inputs is not None or spec.baseline is not None
    described = {
        "data": cfg.data.model_dump(mode="json"),
        "fingerprint": trial.data.provenance.get("fingerprint"),
        "knn": cfg.eval.knn.model_dump(mode="json"),
        "device": trial.device.type,
        "inputs": cfg.method if own_inputs else None,
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    for name, tensor in method.backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def cached_json(path: Path, compute: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``compute()``, kept as JSON at ``path`` for the next caller with the same key. Concurrent callers (a sweep's
    trials) take a lock on ``path.lock`` so one computes and the others read; the file is written atomically (tmp +
    rename), so a reader never sees half of it. Where the file system has no locks, each computes and the last
    write wins (the same numbers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            try:
                values = {k: float(v) for k, v in json.loads(path.read_text()).items()}
                log.info("baselines read from %s", path)
                return values
            except (OSError, ValueError, AttributeError):
                pass  # unreadable: computed again
        values = compute()
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
        tmp.write_text(json.dumps(values, sort_keys=True))
        os.replace(tmp, path)
        return values


def _baselines(trial: Trial) -> dict[str, float]:
    cfg, data, method = trial.cfg, trial.data, trial.method
    ytr, yte = data.train.labels.numpy(), data.test.labels.numpy()
    name, inputs = method.evaluation().baseline or ("raw_pixels", _images)
    train, test = (inputs(split, trial.augmenter.normalize) for split in (data.train, data.test))
    if data.streamed:  # N x 3 x S x S floats would not fit: the pixels of a streamed dataset are pooled first
        train, test = (
            EvalInputs(inputs.data, _pooled(inputs.prepare, STREAMED_RAW_PIXELS_SIDE)) for inputs in (train, test)
        )
    out = {
        f"baseline/{name}/knn_top1": knn_top1(
            cfg, raw_pixels(train.data, train.prepare), ytr, raw_pixels(test.data, test.prepare), yte
        )
    }
    untrained = copy.deepcopy(method.backbone)
    train_x, test_x = embed_splits(trial, untrained, untrained)
    out["baseline/random_init/knn_top1"] = knn_top1(cfg, train_x, ytr, test_x, yte)
    return out


STREAMED_RAW_PIXELS_SIDE = 32
"""The raw-pixel baseline of a streamed dataset reads its images average-pooled to at most this side."""


def _pooled(prepare: Callable[[torch.Tensor], torch.Tensor], side: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def pooled(x: torch.Tensor) -> torch.Tensor:
        y = prepare(x)
        return torch.nn.functional.adaptive_avg_pool2d(y, side) if y.ndim == 4 and y.shape[-1] > side else y

    return pooled


def _extractor(trial: Trial, module: torch.nn.Module) -> Extract:
    """``extract(encoder, inputs)``: the trial's batched, eval-mode feature extraction with ``module`` frozen."""
    kw: dict[str, Any] = {"batch_size": trial.cfg.eval.batch_size, "device": trial.device, "module": module}
    return lambda encoder, inputs: extract_embeddings(encoder, inputs.data, inputs.prepare, **kw)


def _projections(method: Method, features: np.ndarray, device: torch.device) -> np.ndarray | None:
    with eval_mode(method):
        out = method.project(torch.from_numpy(features).to(device))
    return None if out is None else out.float().cpu().numpy()


def _close(figures: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    for figure in figures.values():
        plt.close(figure)
