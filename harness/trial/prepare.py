"""A trial set up: data, backbone, method and augmenter built and checked, before any MLflow run is opened.

Everything that can be checked before training (config, data, names, batch size, the
method's own checks) is checked here, so bad input never leaves a run behind.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from core.backbones import create_backbone
from core.errors import ConfigError
from core.splits import DataSplits
from evaluations.semi_supervised import balanced_subset
from harness.config.schema import RunConfig
from harness.data.augment import Augmenter
from harness.data.datasets import load_dataset
from harness.train.checkpoint import read_checkpoint
from harness.train.loop import check_batch_size, data_workers, resolve_device
from methods import Method, create_method

__all__ = ["Trial", "prepare", "seed_everything"]


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
    check_method(method, cfg.pretrain.batch_size, data.image_size, semi.from_projector_layer if semi.enabled else None)
    return Trial(cfg, data, method, Augmenter(cfg.augment, data.mean, data.std), resolve_device(cfg.device))


def seed_everything(seed: int) -> None:
    """Seed torch and numpy (model initialisation; the loop seeds each epoch itself)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def check_method(method: Method, batch_size: int, image_size: int, finetune_from: int | None) -> None:
    """Everything a method refuses before a run opens: its own :meth:`~methods.base.Method.check`, its views at
    ``image_size`` (a multi-crop that does not fit the image), and the fine-tuning trunk when semi-supervised
    evaluation will fine-tune from ``finetune_from`` projector layers (None: it will not)."""
    method.check(batch_size)
    method.views(image_size)
    if finetune_from is not None:
        method.trunk(finetune_from)
