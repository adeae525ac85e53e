"""Self-supervised methods, one file each, registered by name.

    from methods import create_method, list_methods
    method = create_method("simclr", backbone, temperature=0.2)
    method = create_method("cmc", backbone, backbone_factory=partial(create_backbone, "resnet18"))

A new method is a new file in this package with a ``@register`` class
(see :class:`methods.base.Method` for the interface); it is discovered the first time the registry is read, so
importing this package (or :mod:`methods.base`) imports no method module.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from torch import nn

from core.errors import ConfigError, suggest
from methods.base import Method

_REGISTRY: dict[str, type[Method]] = {}
_discovered = False

DEFAULT_METHOD = "simclr"
"""The method of a run config that names none."""


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a Method subclass to the registry under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute 'name'")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(
            f"method name {cls.name!r} registered twice ({_REGISTRY[cls.name].__qualname__}, {cls.__qualname__})"
        )
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Method]]:
    """Every registered method by name (the package's modules are imported on the first call)."""
    global _discovered
    if not _discovered:
        _discover()  # a method module that fails to import raises here, and again on the next call
        _discovered = True
    return _REGISTRY


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

    names = sorted(registry())
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def get_method_class(name: str) -> type[Method]:
    """The registered class for ``name``; an unknown name is a ConfigError listing the known ones."""
    known = registry()
    if name not in known:
        raise ConfigError(
            f"method.name: unknown method {name!r}{suggest(str(name), known)}; known: {', '.join(list_methods())}"
        )
    return known[name]


def taxonomy(name: str) -> dict[str, object]:
    """The row method ``name`` contributes to the methods table: negatives?, networks, loss."""
    cls = get_method_class(name)
    return {"method": cls.name, "uses_negatives": cls.uses_negatives, "networks": cls.networks, "loss": cls.loss_name}


def create_method(
    name: str,
    backbone: nn.Module | None = None,
    *,
    backbone_factory: Callable[..., nn.Module] | None = None,
    **params: Any,
) -> Method:
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


__all__ = [
    "DEFAULT_METHOD",
    "Method",
    "create_method",
    "get_method_class",
    "list_methods",
    "register",
    "registry",
    "taxonomy",
]
