"""A view a method asks for, and the one random-resized-crop geometry of the in-memory and the streamed paths.

Each image's view is drawn from ``NUM_DRAWS`` uniforms in a fixed column order (:data:`SCALE` ... :data:`SOLARIZE`);
:func:`crop_box` turns the first four into the crop, on tensors (the augmenter, a batch at once) or on Python
floats (a streamed loader's worker, one image at a time), with the same operations in the same order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

# Columns of the per-image uniform draw, in draw order.
SCALE, RATIO, CX, CY, FLIP, JITTER, BRIGHT, CONTRAST, SAT, HUE, GRAY, BLUR, SIGMA, SOLARIZE = range(14)
NUM_DRAWS = 14
"""Uniforms per image and view (keyed draws: column c of an image is a hash of (key, image, c) alone, so the solarise
column, the last, left the 13 before it as they were)."""

RECIPE_KEYS = (
    "hflip_p", "jitter_p", "brightness", "contrast", "saturation", "hue", "grayscale_p", "blur_p", "solarize_p",
)  # fmt: skip
"""What a view's own recipe may set, over the run's ``augment.*`` values (probabilities end in ``_p``)."""


def check_area_range(scale: tuple[float, float], what: str = "") -> tuple[float, float]:
    """A crop's area range (low, high) as fractions of the image: ValueError unless 0 < low <= high <= 1.

    The one check of every crop range: the config's ``augment.crop_scale``, a method's own crops, a :class:`View`.
    """
    low, high = scale
    if not 0 < low <= high <= 1:
        prefix = f"{what} " if what else ""
        raise ValueError(f"{prefix}must be an area range (low, high) with 0 < low <= high <= 1, got {list(scale)}")
    return scale


@dataclass(frozen=True)
class View:
    """One view a method asks for.

    ``size``: output side in pixels; ``scale``: crop area range (None: the config's ``augment.crop_scale``);
    ``recipe``: this view's own values of :data:`RECIPE_KEYS` over the config's (BYOL blurs its first view always
    and its second rarely, and solarises only the second); empty: the config's recipe as it is.
    """

    size: int
    scale: tuple[float, float] | None = None
    recipe: Mapping[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"view size must be positive, got {self.size}")
        if self.scale is not None:
            check_area_range(self.scale, "view scale")
        check_recipe(self.recipe)


def check_recipe(recipe: Mapping[str, float]) -> Mapping[str, float]:
    """ValueError naming the key for a key not in :data:`RECIPE_KEYS` or a value outside its range (probabilities
    in [0, 1], hue in [0, 0.5], strengths >= 0): the bounds of ``augment.*``."""
    for key, value in recipe.items():
        if key not in RECIPE_KEYS:
            raise ValueError(f"view recipe: unknown key {key!r}; accepted: {', '.join(RECIPE_KEYS)}")
        high = 1.0 if key.endswith("_p") else 0.5 if key == "hue" else math.inf
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not (0 <= value <= high)
        ):
            bound = "in [0, 0.5]" if high == 0.5 else "a finite value >= 0"
            bound = "a probability in [0, 1]" if key.endswith("_p") else bound
            raise ValueError(f"view recipe: {key} must be {bound}, got {value!r}")
    return recipe


def override_views(views: Sequence[View], overrides: Sequence[Mapping[str, float]]) -> list[View]:
    """``views`` with ``overrides[i]`` over view i's own recipe (``augment.views`` in YAML); fewer overrides than views
    leave the rest as they are, more are a ValueError."""
    if len(overrides) > len(views):
        raise ValueError(f"augment.views has {len(overrides)} entries but the method has {len(views)} views")
    return [
        dataclasses.replace(view, recipe={**view.recipe, **overrides[i]}) if i < len(overrides) and overrides[i]
        else view
        for i, view in enumerate(views)
    ]  # fmt: skip


Number = TypeVar("Number", float, torch.Tensor)


def crop_box(
    u_area: Number,
    u_ratio: Number,
    u_cx: Number,
    u_cy: Number,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    height: float | torch.Tensor,
    width: float | torch.Tensor,
) -> tuple[Number, ...]:
    """The random resized crop of uniforms in [0, 1): ``(w, h, cx, cy)``.

    ``w``, ``h``: the crop's width and height as fractions of the image's (area uniform in ``scale``, log aspect
    ratio uniform in ``ratio``, as torchvision's ``RandomResizedCrop``, clamped to 1 instead of redrawn); ``cx``,
    ``cy``: its centre in normalised [-1, 1] coordinates, uniform where the crop fits. ``height``, ``width``: the
    image's sides in pixels. The uniforms are (B,) float64 tensors or Python floats, the results alike.
    """
    exp, sqrt = (torch.exp, torch.sqrt) if isinstance(u_area, torch.Tensor) else (math.exp, math.sqrt)
    area = scale[0] + (scale[1] - scale[0]) * u_area
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = exp(log_lo + (log_hi - log_lo) * u_ratio)  # width / height, in pixels
    # torchvision: w = sqrt(area * H * W * ratio) pixels; here as a fraction of each side, clamped.
    w, h = sqrt(area * aspect * height / width), sqrt(area / aspect * width / height)
    if isinstance(w, torch.Tensor):
        w, h = w.clamp(max=1.0), h.clamp(max=1.0)
    else:
        w, h = min(w, 1.0), min(h, 1.0)
    return w, h, (1 - w) * (2 * u_cx - 1), (1 - h) * (2 * u_cy - 1)
