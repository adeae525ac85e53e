"""Small method parameters for tests, read from the registry (each method's ``test_params``), so that a new method
needs no edit to the tests.

    spec = small_backbone_spec("mae")                 # {"name": "vit_tiny_patch16_224", "patch_size": 4, ...}
    method = create_method("mae", create_backbone(spec.pop("name"), img_size=16, **spec), **small_params("mae"))
"""

from __future__ import annotations

from typing import Any

from methods import get_method_class

CONTRACT_BACKBONE: dict[str, Any] = {"name": "test_resnet"}
"""The backbone the tests build for a method whose ``test_params`` name none (``"_backbone"``)."""


def small_params(name: str, **overrides: Any) -> dict[str, Any]:
    """Method ``name``'s ``test_params`` (small heads) without the ``_backbone`` entry, updated with ``overrides``."""
    params = {key: value for key, value in get_method_class(name).test_params.items() if key != "_backbone"}
    return {**params, **overrides}


def small_backbone_spec(name: str) -> dict[str, Any]:
    """The backbone the tests build for method ``name``, ``{"name": timm name, **kwargs}`` (a new dict each call):
    its ``test_params["_backbone"]``, else :data:`CONTRACT_BACKBONE`."""
    return {**CONTRACT_BACKBONE, **get_method_class(name).test_params.get("_backbone", {})}
