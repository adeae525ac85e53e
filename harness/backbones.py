"""timm backbones as feature extractors. The only module of ours that imports timm.

    net = create_backbone("resnet18", in_chans=3, img_size=32, cifar_stem=True)
    net(x).shape == (B, net.num_features)
"""

from __future__ import annotations

import fnmatch
import functools
from typing import Any

import timm
from torch import nn

from harness.errors import ConfigError, suggest


@functools.cache
def _all_models() -> tuple[str, ...]:
    return tuple(timm.list_models())


def list_backbones(pattern: str | None = None) -> list[str]:
    """timm model names, optionally filtered by a shell-style pattern (``resnet*``, ``vit_*``)."""
    names = _all_models()
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def create_backbone(name: str, *, in_chans: int = 3, img_size: int | None = None, cifar_stem: bool = False, **kwargs: Any) -> nn.Module:
    """A randomly initialised timm model with its classifier removed (``num_classes=0``).

    ``img_size`` is passed only to models whose constructor takes it (ViTs and the
    like); convolutional nets take any size. ``kwargs`` go to ``timm.create_model``
    unchanged; ``None`` values are dropped so that they never override a model's
    own default. Nothing is downloaded: weights are never pretrained.
    """
    if name not in _all_models():
        raise ConfigError(f"backbone.name: unknown timm model {name!r}{suggest(name, _all_models())}; see `python -m harness list backbones PATTERN`")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = _create(name, in_chans, kwargs, img_size)
    if cifar_stem:
        apply_cifar_stem(model, name)
    return model


def _create(name: str, in_chans: int, kwargs: dict[str, Any], img_size: int | None) -> nn.Module:
    """timm.create_model, with ``img_size`` offered first and dropped if the model has no such argument."""
    if img_size is not None and "img_size" not in kwargs:
        try:
            return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, img_size=img_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise ConfigError(f"backbone.kwargs: timm model {name!r} refused its arguments: {err}") from None
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    except TypeError as err:  # an unexpected keyword from backbone.kwargs
        raise ConfigError(f"backbone.kwargs: timm model {name!r} refused its arguments: {err}") from None


def apply_cifar_stem(model: nn.Module, name: str = "model") -> None:
    """Replace a ResNet stem (7x7 stride-2 conv + max-pool) with a 3x3 stride-1 conv and no pool.

    The standard adaptation for 32 px images (He et al. 2016, CIFAR section;
    solo-learn, lightly). Only models with ``conv1`` (a Conv2d) and ``maxpool``
    are supported; anything else is a ConfigError rather than silent surgery.
    """
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ConfigError(f"backbone.cifar_stem: {name!r} has no ResNet stem (conv1 Conv2d + maxpool); use it with resnet18/resnet50-style models")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
