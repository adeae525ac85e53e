"""One trial: data -> views -> backbone + method -> pretraining -> frozen embeddings -> evaluations -> MLflow.

Everything that can be checked before training (config, data, names, batch size)
is checked before the MLflow run is opened, so bad input never leaves a run behind.
"""

from __future__ import annotations

import copy
import functools
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
from harness.captions import item_captions, zero_shot_prompts
from harness.backbones import create_backbone
from harness.config import RunConfig, build_config, flatten
from harness.datasets import DataSplits, Split, load_dataset
from harness.provenance import git_commit, library_versions, peak_rss_mb
from harness.tracking import Run, open_run, start_run, tracking_uri
from harness.errors import BadInput, ConfigError
from harness.text import bag_of_words
from harness.train import EpochCallback, check_batch_size, load_checkpoint, pretrain, resolve_device
from evaluations.battery import evaluate_embeddings
from evaluations.features import extract_embeddings, raw_pixels
from evaluations.distill import self_distill
from evaluations.finetune import classification_accuracy, classifier, finetune_subset
from evaluations.knn import knn_evaluate
from evaluations.semi_supervised import balanced_subset
from evaluations.zero_shot import class_embeddings, cross_modal_recall, zero_shot_top1
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
    if cfg.eval.semi.enabled:  # a subset that cannot be drawn is bad input now, not a failure after training
        for fraction in cfg.eval.semi.fractions:
            try:
                balanced_subset(data.train.labels.numpy(), fraction, cfg.seed)
            except ValueError as err:
                raise ConfigError(f"eval.semi.fractions: {fraction} on {d.name} ({len(data.train)} training images): {err}") from None
    device = resolve_device(cfg.device)
    b = cfg.backbone
    factory = functools.partial(create_backbone, b.name, img_size=data.image_size, cifar_stem=b.cifar_stem, **b.kwargs)
    backbone = factory(in_chans=data.channels)
    params = {k: v for k, v in cfg.method.items() if k != "name"}
    method = create_method(cfg.method["name"], backbone, backbone_factory=factory, **params)
    method.setup(data)
    method.check(cfg.pretrain.batch_size)
    method.views(data.image_size)  # a multi-crop that does not fit the image is bad input now, before any run
    if cfg.eval.semi.enabled:
        method.trunk(cfg.eval.semi.from_projector_layer)  # fine-tuning from the head: only where the method has one
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

    provenance = {"git_commit": git_commit(), "mlflow_run_id": mlrun.run_id, "tracking_uri": tracking_uri(cfg.tracking.uri), **library_versions()}
    result = pretrain(
        method, data.train.images, cfg, trial.augmenter, device,
        checkpoint_path=checkpoint_path, provenance=provenance,
        log_metrics=mlrun.log_metrics, on_epoch_end=on_epoch_end,
    )  # fmt: skip
    metrics["time/pretrain_s"] = result.time_s
    metrics["train/images_per_s_mean"] = result.images_per_s
    if result.losses:
        metrics["train/final_loss"] = result.losses[-1]

    metrics.update(evaluate(trial, mlrun))
    metrics["memory/peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        metrics["memory/peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    mlrun.log_metrics(metrics)
    log.info("results: %s", ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return metrics


def evaluate(trial: Trial, mlrun: Run | None = None) -> dict[str, float]:
    """The evaluation battery of ``cfg.eval`` on the trained method: embeddings extracted once (eval mode),
    then every enabled evaluation on them, plus semi-supervised fine-tuning, and zero-shot and image<->text
    retrieval for image-text methods (:func:`cross_modal`). Text methods are evaluated on caption embeddings
    (:func:`split_inputs`). Figures and the label subsets go to ``mlrun`` as artifacts."""
    cfg, data, method = trial.cfg, trial.data, trial.method
    ytr, yte = data.train.labels.numpy(), data.test.labels.numpy()
    t0 = time.perf_counter()
    train_x, test_x = embed_splits(trial, method.embed, method)
    metrics = {"time/extract_s": time.perf_counter() - t0}
    views = projections = None
    if cfg.eval.collapse.enabled:
        views = embed_views(trial)
        projections = _projections(method, train_x, trial.device)
    battery, figures = evaluate_embeddings(cfg.eval, train_x, ytr, test_x, yte, views=views, projections=projections, seed=cfg.seed)
    metrics.update(battery)
    if hasattr(method, "encode_text"):
        t0 = time.perf_counter()
        metrics.update(cross_modal(trial, test_x))
        metrics["time/eval/cross_modal_s"] = time.perf_counter() - t0
    if cfg.eval.semi.enabled:
        t0 = time.perf_counter()
        metrics.update(semi_supervised(trial, mlrun))
        metrics["time/eval/semi_s"] = time.perf_counter() - t0
    if mlrun is not None:
        for name, figure in figures.items():
            mlrun.log_figure(figure, f"eval/{name}")
    _close(figures)
    return metrics


def semi_supervised(trial: Trial, mlrun: Run | None = None) -> dict[str, float]:
    """Fine-tune the trunk + a linear head on each balanced label fraction; the subsets' indices are logged.
    With ``distill_epochs`` > 0 each fine-tuned model then teaches a student on all training images, without
    labels (SimCLRv2's self-distillation), logged as ``distilled_top1``/``distilled_top5`` next to its own numbers."""
    cfg, data, method = trial.cfg, trial.data, trial.method
    semi = cfg.eval.semi
    trunk, dim = method.trunk(semi.from_projector_layer)
    light = cfg.augment.model_copy(update={"jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0})  # crop + flip only
    augmenter = Augmenter(light, data.mean, data.std)
    epochs = semi.epochs * len(semi.fractions) if len(semi.epochs) == 1 else semi.epochs
    out: dict[str, float] = {}
    for fraction, n_epochs in zip(semi.fractions, epochs):
        name = f"semi_{fraction * 100:g}pct"
        subset = balanced_subset(data.train.labels.numpy(), fraction, cfg.seed)
        if mlrun is not None:
            mlrun.log_dict({"fraction": fraction, "seed": cfg.seed, "dataset": cfg.data.name, "num_train": len(data.train), "indices": subset.tolist()}, f"eval/{name}_indices.json")
        result = finetune_subset(
            trunk, dim, data.train.images, data.train.labels, subset, data.test.images, data.test.labels, augmenter,
            epochs=n_epochs, batch_size=semi.batch_size, lr=semi.lr, seed=cfg.seed, device=trial.device,
        )  # fmt: skip
        out.update({f"eval/{name}/{k}": v for k, v in result.metrics.items()})
        if semi.distill_epochs:
            student = self_distill(
                result.model, classifier(trunk, dim, result.num_classes), data.train.images, augmenter, epochs=semi.distill_epochs,
                batch_size=semi.batch_size, lr=semi.lr, seed=cfg.seed, device=trial.device, temperature=semi.distill_temperature,
            )  # fmt: skip
            distilled = classification_accuracy(student, data.test.images, data.test.labels, augmenter, trial.device)
            out.update({f"eval/{name}/distilled_{k}": v for k, v in distilled.items()})
    return out


def embed_views(trial: Trial) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of two independently augmented views of the test images (alignment), seeded by the trial."""
    kw: dict[str, Any] = {"batch_size": trial.cfg.eval.batch_size, "device": trial.device, "module": trial.method}
    if trial.method.modality == "text":  # two different captions of each test item
        texts = [item_captions(trial.data.test, trial.data.classes, template) for template in (0, 1)]
        return tuple(extract_embeddings(trial.method.embed, trial.method.tokenize(t), _unchanged, **kw) for t in texts)  # type: ignore[return-value]
    generator = torch.Generator().manual_seed(trial.cfg.seed + 1)
    images = trial.data.test.images
    spec = trial.method.views(images.shape[-1])[0]
    return tuple(extract_embeddings(trial.method.embed, images, lambda x: trial.augmenter(x, spec, generator), **kw) for _ in range(2))  # type: ignore[return-value]


def _projections(method: Method, features: np.ndarray, device: torch.device) -> np.ndarray | None:
    was_training = method.training
    method.eval()
    try:
        out = method.project(torch.from_numpy(features).to(device))
    finally:
        method.train(was_training)
    return None if out is None else out.float().cpu().numpy()


def _close(figures: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    for figure in figures.values():
        plt.close(figure)


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
            raise BadInput(f"eval: {target!r} is neither a checkpoint file nor an MLflow run id in {tracking_uri()}") from None
        if "checkpoint" not in tags:
            raise BadInput(f"eval: run {target} has no checkpoint tag; give the checkpoint file instead")
        path = Path(tags["checkpoint"])
        if not path.is_file():
            raise BadInput(f"eval: run {target}'s checkpoint {path} does not exist (any more)")
    saved = load_saved_config(path)
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith(("eval.", "device"))]
    if bad:
        raise BadInput(f"eval: only eval.* and device may be overridden on a trained model, got {bad[0]!r}")
    cfg = build_config(saved["config"], list(overrides))
    run_id = run_id or saved["provenance"].get("mlflow_run_id")
    uri = saved["provenance"].get("tracking_uri") if uri is None else uri
    if not run_id:
        raise BadInput(f"eval: {path} records no MLflow run; re-run `harness run` to get one")
    trial = prepare(cfg)
    load_checkpoint(path, trial.method, None, None)
    trial.method.to(trial.device)
    mlrun = open_run(run_id, uri)
    metrics = evaluate(trial, mlrun)
    mlrun.log_metrics(metrics)
    mlrun.log_text(yaml.safe_dump(cfg.as_dict()["eval"], sort_keys=False), "eval/protocol.yaml")
    return run_id, metrics


def load_saved_config(path: Path) -> dict[str, Any]:
    """The config and provenance stored in a checkpoint."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same bad input
        raise BadInput(f"eval: {path} is not a readable checkpoint ({type(err).__name__})") from None
    return {"config": state["config"], "provenance": state.get("provenance", {})}


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
    train, test = (split_inputs(trial, split) for split in (trial.data.train, trial.data.test))
    return extract_embeddings(encoder, *train, **kw), extract_embeddings(encoder, *test, **kw)


def split_inputs(trial: Trial, split: Split) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """What the method's ``embed`` takes for ``split``, and its preprocessing: the images and their normalisation,
    or for a text method (``modality == "text"``) the token ids of each item's first caption, labelled like the item."""
    if trial.method.modality == "text":
        return trial.method.tokenize(item_captions(split, trial.data.classes, dataset=trial.data.name)), _unchanged
    return split.images, trial.augmenter.normalize


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def cross_modal(trial: Trial, test_x: np.ndarray) -> dict[str, float]:
    """Image-text evaluations of a method with ``encode_text`` (CLIP) on the test split: zero-shot top-1 with the
    class prompts (their embeddings averaged per class) and image->text / text->image Recall@k against each
    image's first caption (images with the same caption match it alike), at ``eval.retrieval.ks``.
    The image side is the method's projector on the cached image features."""
    cfg, data, method = trial.cfg, trial.data, trial.method
    kw: dict[str, Any] = {"batch_size": cfg.eval.batch_size, "device": trial.device, "module": method}
    image = _projections(method, test_x, trial.device)
    out: dict[str, float] = {}
    if data.classes:
        prompts = [p for c in zero_shot_prompts(data.test, data.classes) for p in c]
        text = extract_embeddings(method.encode_text, method.tokenize(prompts), _unchanged, **kw)
        out["eval/zero_shot/top1"] = zero_shot_top1(image, class_embeddings(text, len(data.classes)), data.test.labels.numpy())
    if cfg.eval.retrieval.enabled:
        captions = item_captions(data.test, data.classes, dataset=data.name)
        text = extract_embeddings(method.encode_text, method.tokenize(captions), _unchanged, **kw)
        groups = np.unique(np.array(captions), return_inverse=True)[1]
        for name, (query, gallery) in (("i2t", (image, text)), ("t2i", (text, image))):
            recall = cross_modal_recall(query, gallery, cfg.eval.retrieval.ks, groups)
            out.update({f"eval/retrieval_{name}/recall_at_{k}": v for k, v in recall.items()})
    return out


def knn_top1(cfg: RunConfig, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """kNN top-1 with the run's protocol (the baselines' and the learning curve's number)."""
    return knn_evaluate(train_x, train_y, test_x, test_y, k=cfg.eval.knn.k, temperature=cfg.eval.knn.temperature)["top1"]


def baselines(trial: Trial) -> dict[str, float]:
    """kNN of raw pixels (text methods: bag of words of the captions) and of the random-init backbone (or text
    tower), with the same protocol as the trained model."""
    cfg, data = trial.cfg, trial.data
    k, temp = cfg.eval.knn.k, cfg.eval.knn.temperature
    ytr, yte = data.train.labels.numpy(), data.test.labels.numpy()
    out: dict[str, float] = {}
    if trial.method.modality == "text":
        vocab = len(trial.method.tokenizer)
        train_bow, test_bow = (bag_of_words(split_inputs(trial, split)[0], vocab) for split in (data.train, data.test))
        out["baseline/bag_of_words/knn_top1"] = knn_evaluate(train_bow, ytr, test_bow, yte, k=k, temperature=temp)["top1"]
    else:
        prep = trial.augmenter.normalize
        raw = knn_evaluate(raw_pixels(data.train.images, prep), ytr, raw_pixels(data.test.images, prep), yte, k=k, temperature=temp)
        out["baseline/raw_pixels/knn_top1"] = raw["top1"]
    untrained = copy.deepcopy(trial.method.backbone)
    train_x, test_x = embed_splits(trial, untrained, untrained)
    out["baseline/random_init/knn_top1"] = knn_evaluate(train_x, ytr, test_x, yte, k=k, temperature=temp)["top1"]
    return out
