"""SimCLR views, drawn per image and per view, vectorised over the batch on the images' device.

The recipe of Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"
(arXiv:2002.05709, appendix A): random resized crop + horizontal flip, colour jitter with probability 0.8, random
grayscale with probability 0.2, optional Gaussian blur, optional solarisation (BYOL's addition, Grill et al. 2020),
then normalisation (knobs: :class:`harness.config.schema.AugmentConfig`; a view may carry its own values,
:attr:`core.views.View.recipe`). Keyed draws (:class:`KeyedDraws`) make an image's views a function of
(epoch key, image index, view index) alone, the same whichever batch or data-parallel worker the image lands in
(:mod:`core.keyed`); the jitter order of a call is keyed by (key, view, step).

Differences from ``torchvision.transforms`` applied image by image:

* one ``(B, NUM_DRAWS)`` uniform draw and one ``randperm(4)`` per call, in a fixed order whatever the config: the same
  on the CPU and on CUDA, and switching one op off does not change what the others draw (keyed draws); sequential
  draws from a generator take the solarisation column only for a recipe that solarises, so recipes without it draw
  what they drew before it existed (and turning it on shifts the generator's later calls);
* random resized crop: one draw per image, the crop's sides clamped to the image (torchvision redraws up to 10 times,
  then centre-crops); continuous boxes, crop + resize + flip in one bilinear ``grid_sample`` without antialiasing
  (aliased when the crop is much more than ~2x the output side);
* colour jitter: one op order per call (torchvision: per image); an image not jittered gets identity factors
  (exact but for the hue round trip's float rounding) rather than being skipped;
* single-channel images get brightness and contrast only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from core.keyed import keyed_uniforms, mix64, signed64
from core.views import (
    BLUR,
    BRIGHT,
    CONTRAST,
    CX,
    CY,
    FLIP,
    GRAY,
    HUE,
    JITTER,
    NUM_DRAWS,
    RATIO,
    SAT,
    SCALE,
    SIGMA,
    SOLARIZE,
    View,
    crop_box,
)
from harness.config.schema import AugmentConfig

__all__ = ["Augmenter", "KeyedDraws", "ViewDraw", "draw_sequential"]

# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma; torchvision writes 0.2989 for 0.299).
_LUMA = (0.2989, 0.587, 0.114)


class ViewDraw(NamedTuple):
    """One call's randomness, drawn already: the jitter ops' order and the uniforms (B, NUM_DRAWS) float64."""

    order: list[int]
    uniforms: torch.Tensor


def draw_sequential(batch: int, generator: torch.Generator, solarize: bool = False) -> ViewDraw:
    """The randomness of one call for ``batch`` images from a CPU generator, in the augmenter's fixed order (the
    jitter order, the uniforms, then, when the recipe ``solarize`` s, its column): draw first to crop streamed
    originals with the same uniforms. Without ``solarize`` the last column is NaN (solarising nothing)."""
    if generator.device.type != "cpu":
        raise ValueError(
            f"the generator must be a CPU generator (parameters are drawn on the CPU), got {generator.device}"
        )
    order = torch.randperm(4, generator=generator).tolist()
    u = torch.rand(batch, SOLARIZE, generator=generator, dtype=torch.float64)
    last = (
        torch.rand(batch, 1, generator=generator, dtype=torch.float64)
        if solarize
        else torch.full((batch, 1), math.nan, dtype=torch.float64)
    )
    return ViewDraw(order, torch.cat([u, last], dim=1))


class KeyedDraws:
    """The randomness of one step's views, keyed rather than sequential (see the module docstring).

    Args:
        key: the epoch's key (the loop's ``epoch_seed(seed, epoch)``).
        indices: (B,) the batch's rows in the training split: an image's draws depend on its row alone.
        step: the step within the epoch (keys the per-call jitter order, which every worker of a step shares).
        view_index: which of the step's views.
    """

    def __init__(self, key: int, indices: torch.Tensor, step: int, view_index: int = 0):
        self.key, self.indices, self.step, self.view_index = key, indices, step, view_index

    def view(self, view_index: int) -> KeyedDraws:
        """The draws of view ``view_index`` of the same images."""
        return KeyedDraws(self.key, self.indices, self.step, view_index)

    def _view_key(self) -> int:
        return int(mix64(torch.tensor([signed64(self.key * 1_000_003 + self.view_index)], dtype=torch.int64)))

    def uniforms(self, columns: int) -> torch.Tensor:
        return keyed_uniforms(self._view_key(), self.indices, columns)

    def order(self) -> list[int]:
        """The jitter ops' order for this call: a permutation of 4 keyed by (key, view, step)."""
        u = keyed_uniforms(self._view_key() ^ 0x5DEECE66D, torch.tensor([self.step]), 4)[0]
        return torch.argsort(u).tolist()


class Augmenter:
    """The SimCLR recipe of ``cfg`` applied to whole uint8 batches; see the module docstring.

    Args:
        cfg: the recipe's knobs.
        mean, std: per-channel normalisation (length C, or 1 to broadcast), for images in [0, 1].
    """

    def __init__(self, cfg: AugmentConfig, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std) or not len(mean):
            raise ValueError(f"mean and std must have the same, non-zero length; got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.cfg = cfg
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._stats: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._recipes: dict[tuple[tuple[str, float], ...], AugmentConfig] = {}

    # ------------------------------------------------------------------ public

    def __call__(
        self, images: torch.Tensor, view: View, draws: torch.Generator | KeyedDraws | ViewDraw, *, cropped: bool = False
    ) -> torch.Tensor:
        """images: uint8 (B, C, H, W) on any device -> float32 (B, C, view.size, view.size), normalised with mean/std.

        ``draws``: a CPU generator (sequential draws), keyed :class:`KeyedDraws` for these B images, or
        the ``(jitter order, uniforms)`` a generator gave :func:`draw_sequential` already.
        ``cropped``: the images are this view's random resized crops already (taken by
        :mod:`harness.data.streaming` from the original images with the same draws, see
        :func:`core.views.crop_box`), of side ``view.size``: the rest of the recipe (flip, colour,
        grayscale, blur, normalisation) is applied with the draws it would use otherwise.
        C must be 1 or 3; with one channel, saturation, hue and grayscale are skipped.
        Float images are accepted too and taken to be in [0, 1].
        """
        batch, channels, height, width = self._check(images)
        cfg = self.recipe(view)
        scale = view.scale if view.scale is not None else cfg.crop_scale  # both checked when they were made

        # All randomness, on the CPU, in a fixed order; then one transfer to the images' device.
        if isinstance(draws, KeyedDraws):
            if draws.indices.numel() != batch:
                raise ValueError(f"the draws are for {draws.indices.numel()} images, the batch has {batch}")
            order, u = draws.order(), draws.uniforms(NUM_DRAWS)
        else:
            solarizes = cfg.solarize_p > 0
            order, u = draw_sequential(batch, draws, solarizes) if isinstance(draws, torch.Generator) else draws
            if u.shape != (batch, NUM_DRAWS):
                raise ValueError(f"the draws are for {tuple(u.shape)} uniforms, the batch needs ({batch}, {NUM_DRAWS})")
            if solarizes and bool(u[:, SOLARIZE].isnan().any()):
                raise ValueError("the draws lack the solarisation column: draw_sequential(..., solarize=True)")
        jitter = u[:, JITTER] < cfg.jitter_p
        gray = (u[:, GRAY] < cfg.grayscale_p) & (channels == 3)
        blur = (u[:, BLUR] < cfg.blur_p) & (view.size >= 2)
        solarize = u[:, SOLARIZE] < cfg.solarize_p  # NaN (not drawn) compares False
        radius = max(1, view.size // 20)  # blur kernel ~10% of the side, odd (SimCLR: side // 10, made odd)
        params = self._params(cfg, u, scale, height, width, jitter, gray, blur, radius, cropped)
        params = (
            params.pin_memory().to(images.device, non_blocking=True) if images.is_cuda else params.to(images.device)
        )

        x = _to_float(images)
        x = _resized_crop(x, params[:, 0:4], params[:, 4], view.size)
        if bool(jitter.any()):  # images not jittered have identity factors
            ops = self._jitter_ops(cfg, channels)
            for i in order:
                if i in ops:
                    x = ops[i](x, params[:, 5 + i])
        if bool(gray.any()):
            x = _random_grayscale_(x, params[:, 9])
        if bool(blur.any()):  # images not blurred have the identity kernel
            x = _gaussian_blur(x, params[:, 10:])
        if bool(solarize.any()):
            x = _random_solarize(x, solarize.to(x.device))
        return self._standardise(x)

    def recipe(self, view: View) -> AugmentConfig:
        """The recipe ``view`` is drawn with: the config's, with the view's own values (:attr:`View.recipe`) over it."""
        if not view.recipe:
            return self.cfg
        key = tuple(sorted(view.recipe.items()))
        if key not in self._recipes:
            self._recipes[key] = self.cfg.model_copy(update=dict(view.recipe))
        return self._recipes[key]

    def normalize(self, images: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """No augmentation: uint8 (B, C, H, W) -> float32 (B, C, S, S), S = size or unchanged, normalised.

        Resizes (bilinear, antialiased, as ``torchvision.transforms.v2.Resize``) only when
        ``size`` is given and differs from the image's side. Used for evaluation.
        """
        _, _, height, width = self._check(images)
        x = _to_float(images)
        if size is not None and (height, width) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self._standardise(x)

    # ------------------------------------------------------------------ internals

    def _check(self, images: torch.Tensor) -> tuple[int, int, int, int]:
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
        channels = images.shape[1]
        if channels not in (1, 3):
            raise ValueError(f"expected 1 or 3 channels, got {channels}")
        if len(self.mean) not in (1, channels):
            raise ValueError(f"mean/std have {len(self.mean)} entries but the images have {channels} channels")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"expected uint8 (or float in [0, 1]) images, got {images.dtype}")
        return tuple(images.shape)  # type: ignore[return-value]

    def _params(
        self,
        cfg: AugmentConfig,
        u: torch.Tensor,
        scale: tuple[float, float],
        height: int,
        width: int,
        jitter: torch.Tensor,
        gray: torch.Tensor,
        blur: torch.Tensor,
        radius: int,
        cropped: bool = False,
    ) -> torch.Tensor:
        """Uniforms (B, NUM_DRAWS) and the per-image op flags (B,) -> parameters (B, 10 + 2 * radius + 1) float32.

        Columns: 0-3 the crop [w, h, cx, cy] (see :func:`_resized_crop`); 4 the x scale sign
        (-1 flips); 5-8 the brightness, contrast, saturation and hue factors (identity where
        ``jitter`` is off); 9 the grayscale weight (0 or 1); 10- the blur kernel (the identity
        kernel where ``blur`` is off).
        """
        w, h, cx, cy = crop_box(u[:, SCALE], u[:, RATIO], u[:, CX], u[:, CY], scale, cfg.crop_ratio, height, width)
        if cropped:  # the crop was taken already (from the original image, by a streamed loader): keep the whole view
            w, h, cx, cy = torch.ones_like(w), torch.ones_like(h), torch.zeros_like(cx), torch.zeros_like(cy)
        sign_x = torch.where(u[:, FLIP] < cfg.hflip_p, -1.0, 1.0)
        factors = torch.stack(
            [
                _uniform(u[:, BRIGHT], max(0.0, 1 - cfg.brightness), 1 + cfg.brightness),
                _uniform(u[:, CONTRAST], max(0.0, 1 - cfg.contrast), 1 + cfg.contrast),
                _uniform(u[:, SAT], max(0.0, 1 - cfg.saturation), 1 + cfg.saturation),
                _uniform(u[:, HUE], -cfg.hue, cfg.hue),
            ],
            dim=1,
        )
        identity = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=factors.dtype)
        factors = torch.where(jitter[:, None], factors, identity)
        kernels = _gaussian_kernels(_uniform(u[:, SIGMA], *cfg.blur_sigma), radius)
        delta = torch.zeros(2 * radius + 1, dtype=kernels.dtype)
        delta[radius] = 1.0
        kernels = torch.where(blur[:, None], kernels, delta)
        columns = [w, h, cx, cy, sign_x, *factors.unbind(1), gray.to(w.dtype)]
        return torch.cat([torch.stack(columns, dim=1), kernels], dim=1).float()

    def _jitter_ops(
        self, cfg: AugmentConfig, channels: int
    ) -> dict[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """The enabled jitter ops by index in torchvision's order (brightness, contrast, saturation, hue)."""
        ops: dict[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
        if cfg.brightness > 0:
            ops[0] = _adjust_brightness_
        if cfg.contrast > 0:
            ops[1] = _adjust_contrast_
        if channels == 3 and cfg.saturation > 0:
            ops[2] = _adjust_saturation_
        if channels == 3 and cfg.hue > 0:
            ops[3] = _adjust_hue_
        return ops

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.shape[1])
        if key not in self._stats:
            n = x.shape[1]
            mean = torch.tensor(self.mean * (n if len(self.mean) == 1 else 1), dtype=torch.float32, device=x.device)
            std = torch.tensor(self.std * (n if len(self.std) == 1 else 1), dtype=torch.float32, device=x.device)
            self._stats[key] = (mean.view(1, n, 1, 1), std.view(1, n, 1, 1))
        mean, std = self._stats[key]
        return x.sub_(mean).div_(std)  # in place: x is always a fresh tensor here


# ---------------------------------------------------------------------- functional ops
# Per-image factors are (B,) tensors on the images' device; images are float (B, C, H, W) in [0, 1].


def _uniform(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Map U(0, 1) draws to U(low, high) (a degenerate range gives ``low``)."""
    return low + (high - low) * u


def _to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> a new float32 tensor in [0, 1] (as torchvision's ``to_dtype(scale=True)``); float is copied."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32, copy=True)


def _resized_crop(x: torch.Tensor, box: torch.Tensor, sign_x: torch.Tensor, size: int) -> torch.Tensor:
    """Crop + resize + flip in one bilinear ``grid_sample``.

    x: (B, C, H, W); box: (B, 4) = [w, h, cx, cy], the crop's width and height as fractions
    of the image side and its centre in normalised [-1, 1] coordinates; sign_x: (B,) -1 to
    flip horizontally, 1 not. Returns (B, C, size, size).
    """
    w, h, cx, cy = box.unbind(1)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w * sign_x, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# The colour ops below work in place on float (B, C, H, W) images in [0, 1] (fresh memory is
# what costs most on the CPU), with per-image factors as (B,) tensors on the images' device.


def _rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> new (B, 1, H, W) luma with torchvision's weights; (B, 1, H, W) is returned as is."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (r * _LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


def _random_grayscale_(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """In place: replace the RGB images with weight (B,) == 1 by their luma, kept 3-channel (0: unchanged)."""
    return x.lerp_(_rgb_to_grayscale(x), weight.reshape(-1, 1, 1, 1))  # exact for weights 0 and 1


def _blend_(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: ``factor * x + (1 - factor) * other``, clamped to [0, 1] (torchvision's ``_blend``).

    other: (B, 1, H, W) or (B, 1, 1, 1), broadcast over the channels.
    """
    f = factor.reshape(-1, 1, 1, 1)
    return x.mul_(f).add_(other * (1.0 - f)).clamp_(0.0, 1.0)


def _adjust_brightness_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: multiply each image by its factor (B,), clamp (torchvision ``adjust_brightness``)."""
    return x.mul_(factor.reshape(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _adjust_contrast_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: blend each image with the mean of its grayscale, factor (B,) (torchvision ``adjust_contrast``)."""
    mean = _rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend_(x, mean, factor)


def _adjust_saturation_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: blend each image with its grayscale, factor (B,) (torchvision ``adjust_saturation``); RGB only."""
    return _blend_(x, _rgb_to_grayscale(x), factor)


# Hue sextant (0-6) at which each RGB channel peaks: the HSV -> RGB closed form is
# channel = v - v * s * clamp(circular_distance(6 * h, peak) - 1, 0, 1), distances on a circle of 6.
_HUE_PEAKS = (3.0, 5.0, 1.0)


def _adjust_hue_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: rotate each image's hue by its factor (B,) in [-0.5, 0.5] turns (torchvision ``adjust_hue``).

    RGB only. RGB -> HSV as Pillow and torchvision compute it (the hue from the channel
    holding the max, ties going to red then green; no hue where max == min), shift, and back
    by the closed form above, which equals torchvision's six-sector table. A hue shift keeps
    the value (max) and the chroma (max - min), so they are reused. Float arithmetic on
    (B, H, W) planes, mostly in place: bool masks, ``where``, ``remainder``, broadcasting over
    C and fresh allocations are each several times slower on the CPU. Agrees with
    torchvision to float rounding (~1e-6). x: (B, 3, H, W) in [0, 1].
    """
    r, g, b = x.unbind(1)
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    span = torch.minimum(r, g)
    torch.minimum(span, b, out=span)
    span.neg_().add_(maxc)  # chroma, max - min
    # 1.0 where the channel holds the max (ties to red, then green), else 0.0; maxc - c >= 0
    is_r = torch.sub(maxc, r).sign_().neg_().add_(1.0)
    is_g = torch.sub(maxc, g).sign_().neg_().add_(1.0)
    is_g.addcmul_(is_g, is_r, value=-1.0)
    # hue in sixths of a turn: (g - b) / span for a red max, 2 + (b - r) / span green, 4 + (r - g) / span blue
    hue6 = torch.sub(g, b).mul_(is_r)
    tmp = torch.sub(b, r).add_(span, alpha=2.0).mul_(is_g)
    hue6.add_(tmp)
    is_b = is_r.add_(is_g).neg_().add_(1.0)  # reuses is_r's memory
    hue6.add_(torch.sub(r, g, out=tmp).add_(span, alpha=4.0).mul_(is_b))
    hue6.div_(torch.clamp_min(span, 1e-30, out=tmp))  # the numerator is 0 where span == 0
    hue6.add_(6.0 * factor.reshape(-1, 1, 1))
    hue6.sub_(torch.mul(hue6, 1.0 / 6.0, out=tmp).floor_(), alpha=6.0)  # mod 6, into [0, 6]
    for c, peak in enumerate(_HUE_PEAKS):
        # circular distance to the peak is 3 - ||d| - 3|, so the ramp clamp(2 - distance, 0, 1) is:
        ramp = torch.sub(hue6, peak, out=tmp).abs_().sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
        torch.addcmul(maxc, span, ramp, value=-1.0, out=x[:, c])
    return x


def _random_solarize(x: torch.Tensor, chosen: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert the pixels at or above ``threshold`` of the images where ``chosen`` (B,) bool holds
    (torchvision's ``solarize``: ``where(x >= threshold, 1 - x, x)``)."""
    return torch.where((x >= threshold) & chosen.reshape(-1, 1, 1, 1), 1.0 - x, x)


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels, (B,) sigmas -> (B, 2 * radius + 1)."""
    offsets = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    return torch.softmax(-0.5 * (offsets / sigma[:, None]) ** 2, dim=1)


def _gaussian_blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable blur of each image with its own kernel: x (B, C, H, W), kernels (B, k), reflect padding.

    One grouped convolution per axis over the batch viewed as (1, B * C, H, W), groups = B * C.
    """
    batch, channels, height, width = x.shape
    k = kernels.shape[1]
    r = k // 2
    weight = kernels.repeat_interleave(channels, dim=0).to(x.dtype)  # (B * C, k)
    y = F.pad(x.reshape(1, batch * channels, height, width), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, weight.view(-1, 1, k, 1), groups=batch * channels)
    y = F.conv2d(y, weight.view(-1, 1, 1, k), groups=batch * channels)
    return y.view(batch, channels, height, width)
