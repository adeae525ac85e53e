"""A trial set up: data, backbone, method and augmenter built and checked, before any MLflow run is opened.

Everything that can be checked before training (config, data, names, batch size, the
method's own checks) is checked here, so bad input never leaves a run behind.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.backbones import create_backbone
from core.errors import ConfigError
from core.splits import DataSplits
from core.views import RECIPE_KEYS, View, override_views
from evaluations.semi_supervised import balanced_subset
from harness.config.schema import RunConfig
from harness.data.augment import Augmenter
from harness.data.datasets import load_dataset
from harness.train.checkpoint import read_checkpoint
from harness.train.loop import check_batch_size, data_workers, resolve_device
from methods import Method, create_method

__all__ = ["Trial", "check_method", "prepare", "seed_everything", "view_record"]


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
    data = load_dataset(
        d.name, root=d.root, image_size=d.image_size, num_train=d.num_train, num_test=d.num_test, seed=d.seed,
        verify_checksums=d.verify_checksums, **d.streaming_options(max(1, data_workers(cfg))),
    )  # fmt: skip
    check_batch_size(cfg.pretrain.batch_size, len(data.train), d.name)
    if cfg.pretrain.resume is not None:  # missing, unreadable or another experiment's: bad input, before any run opens
        read_checkpoint(cfg.pretrain.resume, cfg)
    semi = cfg.eval.semi
    if semi.enabled:  # a subset that cannot be drawn is bad input now, not a failure after training
        for fraction in semi.fractions:
            try:
                balanced_subset(data.train.labels.numpy(), fraction, cfg.seed)
            except ValueError as err:
                raise ConfigError(
                    f"eval.semi.fractions: {fraction} on {d.name} ({len(data.train)} training images): {err}"
                ) from None
    b = cfg.backbone
    factory = functools.partial(create_backbone, b.name, img_size=data.image_size, cifar_stem=b.cifar_stem, **b.kwargs)
    factory = functools.partial(factory, in_chans=data.channels)  # the data's channels, unless a method asks for others
    params = {k: v for k, v in cfg.method.items() if k != "name"}
    method = create_method(cfg.method["name"], backbone_factory=factory, **params)
    method.setup(data)
    finetune_from = semi.from_projector_layer if semi.enabled else None
    check_method(method, cfg.pretrain.batch_size, data.image_size, finetune_from, cfg.augment.views)
    return Trial(cfg, data, method, Augmenter(cfg.augment, data.mean, data.std), resolve_device(cfg.device))


def view_record(trial: Trial) -> list[dict[str, object]]:
    """Each training view as the run draws it: side, crop scale and the whole recipe (``augment.*``, the method's
    view recipe over it, ``augment.views`` over both); the run's ``views.json``."""
    views = override_views(trial.method.views(trial.data.image_size), trial.cfg.augment.views)
    return [_view_entry(trial, view) for view in views]


def _view_entry(trial: Trial, view: View) -> dict[str, object]:
    cfg = trial.augmenter.recipe(view)
    recipe = {k: getattr(cfg, k) for k in RECIPE_KEYS}
    scale = view.scale if view.scale is not None else cfg.crop_scale
    return {"size": view.size, "crop_scale": list(scale), "own": dict(view.recipe), **recipe}


def seed_everything(seed: int) -> None:
    """Seed torch and numpy (model initialisation; the loop seeds each epoch itself)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def check_method(
    method: Method,
    batch_size: int,
    image_size: int,
    finetune_from: int | None,
    view_overrides: Sequence[Mapping[str, float]] = (),
) -> None:
    """Everything a method refuses before a run opens: its own :meth:`~methods.base.Method.check`, its views at
    ``image_size`` (a multi-crop that does not fit the image) with ``augment.views`` over them, and the fine-tuning
    trunk when semi-supervised evaluation will fine-tune from ``finetune_from`` projector layers (None: it will
    not)."""
    method.check(batch_size)
    try:
        override_views(method.views(image_size), view_overrides)
    except ValueError as err:
        raise ConfigError(f"{err} ({len(method.views(image_size))} at {image_size} px)") from None
    if finetune_from is not None:
        method.trunk(finetune_from)
