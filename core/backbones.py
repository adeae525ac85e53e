"""timm backbones as feature extractors. The only module of ours that imports timm.

net = create_backbone("resnet18", in_chans=3, img_size=32, cifar_stem=True)
net(x).shape == (B, net.num_features)
spatial_features(net, x).shape == (B, net.num_features, h, w)   # the map before pooling (None for token models)
parts = vit_parts(create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4))   # a ViT taken apart (MAE)
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from core.errors import ConfigError, suggest

if TYPE_CHECKING:  # timm itself is imported where a model is made: a config check stays light
    from timm.models.vision_transformer import VisionTransformer


@functools.cache
def _all_models() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def list_backbones(pattern: str | None = None) -> list[str]:
    """timm model names, optionally filtered by a shell-style pattern (``resnet*``, ``vit_*``)."""
    names = _all_models()
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def create_backbone(
    name: str, *, in_chans: int = 3, img_size: int | None = None, cifar_stem: bool = False, **kwargs: Any
) -> nn.Module:
    """A randomly initialised timm model with its classifier removed (``num_classes=0``).

    ``img_size`` is passed only to models whose constructor takes it (ViTs and the
    like); convolutional nets take any size. ``kwargs`` go to ``timm.create_model``
    unchanged; ``None`` values are dropped so that they never override a model's
    own default. Nothing is downloaded: weights are never pretrained.
    """
    if name not in _all_models():
        raise ConfigError(
            f"backbone.name: unknown timm model {name!r}{suggest(name, _all_models())}; "
            "see `python -m harness list backbones PATTERN`"
        )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = _create(name, in_chans, kwargs, img_size)
    if cifar_stem:
        apply_cifar_stem(model, name)
    return model


def _create(name: str, in_chans: int, kwargs: dict[str, Any], img_size: int | None) -> nn.Module:
    """timm.create_model, with ``img_size`` offered first and dropped if the model has no such argument."""
    import timm

    if img_size is not None and "img_size" not in kwargs:
        try:
            return timm.create_model(
                name, pretrained=False, num_classes=0, in_chans=in_chans, img_size=img_size, **kwargs
            )
        except TypeError as err:
            if "img_size" not in str(err):
                raise ConfigError(f"backbone.kwargs: timm model {name!r} refused its arguments: {err}") from None
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    except TypeError as err:  # an unexpected keyword from backbone.kwargs
        raise ConfigError(f"backbone.kwargs: timm model {name!r} refused its arguments: {err}") from None


def apply_cifar_stem(model: nn.Module, name: str = "model") -> None:
    """Take the downsampling out of a ResNet stem: no stride, no max-pool before the first stage.

    A plain stem (a 7x7 stride-2 ``conv1`` + max-pool) becomes a 3x3 stride-1 conv and no pool: the standard
    adaptation for 32 px images (He et al. 2016, CIFAR section; solo-learn, lightly). A deep stem (timm's ``*t`` /
    ``*d`` ResNets and ``test_resnet``: ``conv1`` a Sequential of three 3x3 convs, the first of stride 2) keeps its
    convs with the first at stride 1, and loses the pool: 28 px images reach the last stage at 4 x 4 instead of
    1 x 1. Anything else is a ConfigError rather than silent surgery.
    """
    conv = getattr(model, "conv1", None)
    first = conv[0] if isinstance(conv, nn.Sequential) and len(conv) and isinstance(conv[0], nn.Conv2d) else None
    if not (isinstance(conv, nn.Conv2d) or first is not None) or not isinstance(
        getattr(model, "maxpool", None), nn.Module
    ):
        raise ConfigError(
            f"backbone.cifar_stem: {name!r} has no ResNet stem (conv1, a Conv2d or a deep stem, + maxpool); "
            "use it with resnet18/resnet50-style models"
        )
    if isinstance(conv, nn.Conv2d):
        model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    else:
        assert first is not None
        first.stride = (1, 1)
    model.maxpool = nn.Identity()


def spatial_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The last feature map before pooling, (B, C, h, w), or None for models whose features are tokens (ViTs).

    timm's ``forward_features``: convolutional nets give NCHW; models declaring ``output_fmt == "NHWC"`` (Swin)
    are permuted to NCHW.
    """
    forward_features = cast(Callable[[torch.Tensor], torch.Tensor], model.forward_features)  # every timm model has one
    features = forward_features(x)
    if features.ndim != 4:
        return None
    return features.permute(0, 3, 1, 2) if getattr(model, "output_fmt", "NCHW") == "NHWC" else features


@dataclass(frozen=True)
class ViTParts:
    """A timm VisionTransformer taken apart for masked image modelling; the modules are the model's own, not copies.

    ``encode(cat([prefix_tokens(B), patch_tokens(x)[:, keep]], 1))`` is timm's ``forward_features`` on the kept
    patches only (without ``patch_drop``, a training-time dropout of patches that masking replaces).
    """

    model: VisionTransformer
    patch_size: int
    grid_size: int
    """Patches per side (square images)."""
    embed_dim: int
    num_prefix_tokens: int
    """Class and register tokens before the patch tokens."""
    has_class_token: bool

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def patch_tokens(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, D): patch embeddings plus their position embeddings; with ``mask`` (B, L), 1 =
        masked, the embedding of each masked patch is replaced by ``mask_token`` (1, 1, D) before the position
        embedding is added (SimMIM)."""
        m = self.model
        tokens = m.patch_embed(x)
        tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])  # NHWC with dynamic_img_size
        if mask is not None and mask_token is not None:
            w = mask.to(tokens.dtype)[..., None]
            tokens = tokens * (1 - w) + mask_token.to(tokens.dtype) * w
        if m.pos_embed is not None:
            tokens = tokens + (m.pos_embed if m.no_embed_class else m.pos_embed[:, self.num_prefix_tokens :])
        return tokens

    def prefix_tokens(self, batch: int) -> torch.Tensor:
        """(B, P, D): class and register tokens, plus their position embeddings where the model gives them one."""
        m = self.model
        tokens: list[torch.Tensor] = [t for t in (m.cls_token, m.reg_token) if t is not None]
        if not tokens:
            return m.patch_embed.proj.weight.new_zeros(batch, 0, self.embed_dim)
        prefix = torch.cat(tokens, dim=1)
        if m.pos_embed is not None and not m.no_embed_class:
            prefix = prefix + m.pos_embed[:, : self.num_prefix_tokens]
        return prefix.expand(batch, -1, -1)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) embedded tokens -> (B, T, D) after the pre-norm, the blocks and the final norm."""
        m = self.model
        return m.norm(m.blocks(m.norm_pre(m.pos_drop(tokens))))


def vit_parts(model: nn.Module, needed_by: str = "this method") -> ViTParts:
    """The parts of a timm VisionTransformer (``vit_*``); any other model is a ConfigError naming ``backbone.name``."""
    from timm.layers import PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    embed = getattr(model, "patch_embed", None)
    prefix = sum(
        int(t.shape[1]) for t in (getattr(model, "cls_token", None), getattr(model, "reg_token", None)) if t is not None
    )
    if (
        not isinstance(model, VisionTransformer)
        or not isinstance(embed, PatchEmbed)
        or prefix != model.num_prefix_tokens
    ):
        raise ConfigError(f"backbone.name: {needed_by} needs a timm ViT (vit_*), got {name!r}")
    patch, grid, size = embed.patch_size, embed.grid_size, embed.img_size
    if patch[0] != patch[1] or grid[0] != grid[1]:
        raise ConfigError(
            f"backbone.kwargs: {needed_by} needs square patches on square "
            f"images, got patch_size {list(patch)} and a {grid[0]}x{grid[1]} grid"
        )
    if size is not None and (size[0] % patch[0] or size[1] % patch[1]):
        raise ConfigError(
            f"data.image_size: {size[0]} px images do not split into {patch[0]} "
            "px ViT patches (backbone.kwargs.patch_size); use an image size "
            f"divisible by {patch[0]} or a patch size dividing {size[0]}"
        )
    return ViTParts(
        model,
        int(patch[0]),
        int(grid[0]),
        int(model.embed_dim),
        int(model.num_prefix_tokens),
        model.cls_token is not None,
    )
