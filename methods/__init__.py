"""Self-supervised methods, one file each, registered by name.

    from methods import create_method, list_methods
    method = create_method("simclr", backbone, temperature=0.2)
    method = create_method("cmc", backbone, backbone_factory=partial(create_backbone, "resnet18"))

A new method is a new file in this package with a ``@register`` class
(see :class:`methods.base.Method` for the interface); it is discovered on import.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from torch import nn

from harness.errors import ConfigError, suggest
from methods.base import Method, StepInfo, StepOutput

REGISTRY: dict[str, type[Method]] = {}

DEFAULT_METHOD = "simclr"
"""The method of a run config that names none."""

def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a Method subclass to the registry under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute 'name'")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise TypeError(f"method name {cls.name!r} registered twice ({REGISTRY[cls.name].__qualname__}, {cls.__qualname__})")
    REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    """Import every module of the package whose name does not start with ``_``: each ``@register`` class adds
    itself; the shared modules (base, heads, losses, ...) define no such class and add nothing, so no list of
    them is kept."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def list_methods(pattern: str | None = None) -> list[str]:
    """Registered method names, sorted; ``pattern`` is a shell-style filter (``moco*``)."""
    import fnmatch

    names = sorted(REGISTRY)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def get_method_class(name: str) -> type[Method]:
    """The registered class for ``name``; an unknown name is a ConfigError listing the known ones."""
    if name not in REGISTRY:
        raise ConfigError(f"method.name: unknown method {name!r}{suggest(str(name), REGISTRY)}; known: {', '.join(list_methods())}")
    return REGISTRY[name]


def create_method(name: str, backbone: nn.Module | None = None, *, backbone_factory: Callable[..., nn.Module] | None = None, **params: Any) -> Method:
    """Build method ``name`` on ``backbone``, else on ``backbone_factory()``; params are validated by the method's
    Params model first.

    ``backbone_factory(in_chans=C)`` makes fresh backbones of the run's model with C input channels; it becomes
    ``method.backbone_factory``. A method that builds its own networks in ``setup`` (``builds_backbone``: CMC,
    SimCSE) is given no backbone by the factory.
    """
    cls = get_method_class(name)
    validated = cls.Params(**params)
    if backbone is None and not cls.builds_backbone:
        if backbone_factory is None:
            raise ValueError(f"create_method({name!r}): give a backbone or a backbone_factory")
        backbone = backbone_factory()
    method = cls(backbone, validated)
    method.backbone_factory = backbone_factory
    return method


_discover()

__all__ = ["DEFAULT_METHOD", "REGISTRY", "Method", "StepInfo", "StepOutput", "create_method", "get_method_class", "list_methods", "register"]
