"""Multi-crop (Caron et al. 2020, SwAV): two global views and several small ones, shared by SwAV and DINO.

views = multi_crop_views(32, (0.14, 1.0), 6, 3 / 7, (0.05, 0.14), "method.local_crop_size_ratio", "local")
outputs = per_view(encoder, views)   # one encoder call per run of equal-sized crops, an output per view
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from core.errors import ConfigError
from core.views import View

MIN_CROP_SIZE = 8
"""The smallest crop side a backbone is given (a ResNet's stride-32 map is empty below it)."""


def crop_size(image_size: int, ratio: float) -> int:
    """The small crops' side: ``ratio`` of the image's, rounded (96 px at 224 for the papers' 96/224)."""
    return round(image_size * ratio)


def multi_crop_views(
    image_size: int,
    global_scale: tuple[float, float],
    num_small: int,
    small_ratio: float,
    small_scale: tuple[float, float],
    ratio_key: str,
    word: str,
    global_recipes: tuple[dict[str, float], dict[str, float]] = ({}, {}),
    small_recipe: dict[str, float] | None = None,
) -> list[View]:
    """Two global views of ``image_size`` px, then ``num_small`` views of ``crop_size(image_size, small_ratio)`` px;
    ConfigError naming ``ratio_key`` when the small crops do not fit between :data:`MIN_CROP_SIZE` and the image.
    ``word`` names the small crops in the message (DINO's "local", SwAV's "small"); ``global_recipes`` and
    ``small_recipe``: the views' own recipes (:attr:`core.views.View.recipe`)."""
    views = [View(image_size, global_scale, global_recipes[0]), View(image_size, global_scale, global_recipes[1])]
    if not num_small:
        return views
    size = crop_size(image_size, small_ratio)
    if not MIN_CROP_SIZE <= size <= image_size:
        count_key = ratio_key.replace("_crop_size_ratio", "_crops").replace("method.", "method.num_")
        raise ConfigError(
            f"{ratio_key}: {small_ratio:g} of {image_size} px images gives {size} px {word} crops; "
            f"they must be {MIN_CROP_SIZE} to {image_size} px (raise the ratio, or set {count_key}=0)"
        )
    return views + [View(size, small_scale, small_recipe or {})] * num_small


def check_small_crops(backbone: torch.nn.Module, num_small: int, crops: str, count_key: str) -> None:
    """ConfigError when the backbone is a ViT that takes only its own image size and there are small crops
    (``crops`` names them in the message, e.g. "DINO's local crops"; ``count_key`` is their number's key)."""
    if num_small and getattr(backbone, "dynamic_img_size", None) is False:
        raise ConfigError(
            "backbone.kwargs.dynamic_img_size: this ViT takes only its own image size, and "
            f"{crops} are smaller; set backbone.kwargs.dynamic_img_size=true "
            f"(position embeddings interpolated) or {count_key}=0"
        )


def per_view(encoder: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor]) -> list[torch.Tensor]:
    """``encoder`` of every view, with one call per run of consecutive equal-sized views (the reference code's
    ``MultiCropWrapper``): the outputs, one (B, ...) tensor per view."""
    outputs: list[torch.Tensor] = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[1:] == views[start].shape[1:]:
            end += 1
        outputs += list(encoder(torch.cat(views[start:end])).chunk(end - start))
        start = end
    return outputs
