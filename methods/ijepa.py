"""I-JEPA: Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture
(Assran et al., CVPR 2023).

A context encoder (the run's timm ViT) sees one large block of each image's patches; a narrow ViT predictor, given its
tokens and a mask token at each target position, predicts the target encoder's layer-normalised representation of
every patch of 4 target blocks. The target encoder, an EMA of the context encoder (0.996 -> 1, linear in the step),
sees the full image; average-pooled, it is the representation for evaluation, and fine-tuning starts from a copy.

Masks (the reference's ``MaskCollator``): per step one target and one context block size; per image 4 target blocks
and a context block with every target patch removed, truncated to the batch's smallest context in raster order. The
draws are keyed (:func:`core.keyed.keyed_uniforms`) by the step and the image's row, so an image's blocks are the same
on any device, batch or worker (only the truncation depends on the batch). :func:`check_blocks` refuses blocks that
cannot fit the grid before training.

Differences from the reference code (facebookresearch/ijepa):

* loss ``l2`` (default, the paper's) or ``smooth_l1`` (the code's Huber), both averaged over every element;
* block scale and aspect are independent draws (the reference draws both from one uniform);
* blocks may be g wide, corners in [0, g - h] inclusive: every patch can be masked (the reference's never the last
  row or column);
* the context never contains a target patch: the targets are redrawn (:data:`ROUNDS`) where the reference lets the
  context overlap them;
* augmentation is the run's recipe: set ``augment.jitter_p: 0, augment.grayscale_p: 0`` (and ``augment.hflip_p: 0``)
  for the reference's crops only;
* the predictor's head count is a parameter (the reference uses the encoder's).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from core.backbones import ViTParts, vit_parts
from core.contract import MethodParams, StepInfo, StepOutput
from core.errors import ConfigError, RunFailed
from core.keyed import keyed_uniforms
from core.splits import DataSplits
from core.views import View, check_area_range
from methods import register
from methods.base import Method
from methods.momentum import ema_update, frozen_copy
from methods.vit import PooledViT, check_image_size, encode_all, sincos_2d

CONTEXT_TRIES = 20
"""Context block positions drawn per image and round (the reference's timeout of 20 tries)."""
ROUNDS = 4
"""Rounds of (target positions, context positions) drawn per image; the next rounds serve only when no context draw of
round 0 keeps more than :data:`MIN_KEEP` patches (where the reference lets the context overlap targets instead)."""
MIN_KEEP = 4
"""A context draw is accepted when it keeps more than this many patches (the reference's default ``min_keep``)."""
_SIZE_KEY = 0x1EFA_0001
_POSITION_KEY = 0x1EFA_0002
"""Keys of the mask draws, apart from the augmenter's (which are hashes of the epoch key and view)."""

Shape = tuple[int, int]
"""A block's (h, w): rows and columns of patches."""


def linear_momentum(step: int, total_steps: int, base: float) -> float:
    """I-JEPA's EMA schedule: ``base + (1 - base) * step / total``, from ``base`` at step 0 to 1 at the end (reference
    ``momentum_scheduler`` with ``ipe_scale`` 1: step ``i`` uses ``ema[0] + i * (ema[1] - ema[0]) / total``)."""
    if total_steps <= 0:
        return base
    return base + (1.0 - base) * min(max(step / total_steps, 0.0), 1.0)


def block_shape(grid: int, scale: float, aspect: float) -> Shape:
    """(h, w) of a block covering ``scale`` of a grid x grid patch grid at aspect h/w ``aspect`` (reference
    ``_sample_block_size``): ``keep = int(grid**2 * scale)``, ``h = round(sqrt(keep * aspect))``,
    ``w = round(sqrt(keep / aspect))``."""
    keep = int(grid * grid * scale)
    return round(math.sqrt(keep * aspect)), round(math.sqrt(keep / aspect))


def block_shapes(grid: int, scale: tuple[float, float], aspect: tuple[float, float]) -> set[Shape]:
    """Every (h, w) :func:`block_shape` gives for a scale and an aspect in the (closed) ranges: for each reachable
    ``keep``, the aspects where h or w changes value are ``(k + 1/2)**2 / keep`` and ``keep / (k + 1/2)**2``; the
    ends of the range and the midpoints between those breakpoints cover every shape."""
    n = grid * grid
    shapes: set[Shape] = set()
    lo, hi = aspect
    for keep in range(int(n * scale[0]), int(n * scale[1]) + 1):
        if keep == 0:
            shapes.add((0, 0))
            continue
        top = int(math.sqrt(keep * max(hi, 1 / lo))) + 2
        points = {lo, hi}
        for k in range(top):
            points.update(p for p in ((k + 0.5) ** 2 / keep, keep / (k + 0.5) ** 2) if lo < p < hi)
        ordered = sorted(points)
        for a in [*ordered, *((x + y) / 2 for x, y in pairwise(ordered))]:
            shapes.add((round(math.sqrt(keep * a)), round(math.sqrt(keep / a))))
    return shapes


def _grid_words(grid: int, patch_size: int) -> str:
    return (
        f"the {grid}x{grid} patch grid (data.image_size {grid * patch_size} / backbone.kwargs.patch_size {patch_size})"
    )


def check_blocks(
    grid: int,
    patch_size: int,
    num_targets: int,
    target_scale: tuple[float, float],
    target_aspect: tuple[float, float],
    context_scale: tuple[float, float],
) -> None:
    """Refuse, as a one-line ConfigError naming the key, blocks the grid cannot hold: a target block taller or wider
    than the grid; an empty target or context block (``int(g*g * scale) == 0``); and a grid too small for the targets
    plus a context: ``num_targets`` of the smallest target blocks, side by side, fill the largest context block
    (then only overlapping targets leave a context, and draws fail often)."""
    where = _grid_words(grid, patch_size)
    targets = block_shapes(grid, target_scale, target_aspect)
    contexts = block_shapes(grid, context_scale, (1.0, 1.0))
    too_big = [s for s in targets if max(s) > grid]
    if too_big:
        h, w = max(too_big, key=max)
        raise ConfigError(
            f"method.target_scale: target blocks of scale up to {target_scale[1]} and "
            f"aspect (h/w) {list(target_aspect)} reach {h}x{w} patches, larger than "
            f"{where}; use a smaller method.target_scale or a method.target_aspect nearer 1"
        )
    for key, shapes, scale in (("target_scale", targets, target_scale), ("context_scale", contexts, context_scale)):
        if min(h * w for h, w in shapes) == 0:
            raise ConfigError(
                f"method.{key}: a block of scale {scale[0]} on {where} keeps int({grid * grid} * {scale[0]}) "
                f"= {int(grid * grid * scale[0])} patches; use a larger method.{key} or a smaller patch size"
            )
    least = min(h * w for h, w in targets)
    most = max(h * w for h, w in contexts)
    if num_targets * least >= most:
        raise ConfigError(
            f"method.target_scale: {num_targets} target blocks of at least {least} patches fill the "
            f"context block of at most {most} patches on {where}, leaving no room for a context; "
            "use a smaller method.target_scale, fewer method.num_targets or a smaller patch size"
        )


@dataclass(frozen=True)
class BlockMasks:
    """One step's masks, as patch indices in row-major order on the grid."""

    context: torch.Tensor
    """(B, Kc) the context patches of each image (no target patch among them), the first Kc in raster order."""
    targets: torch.Tensor
    """(B, M, Kt) the patches of each image's M target blocks, each block h x w = Kt patches in raster order."""
    context_available: torch.Tensor
    """(B,) each image's context patches before the truncation to Kc = their minimum."""


def _uniforms(key: int, step: int, rows: torch.Tensor, columns: int) -> torch.Tensor:
    """U[0, 1) float64 (len(rows), columns), a hash of (key, step, row, column)."""
    return keyed_uniforms(key * 1_000_003 + step, rows, columns)


def _place(u: torch.Tensor, shape: Shape, grid: int) -> torch.Tensor:
    """Uniforms (..., 2) -> bool (..., grid, grid): an h x w block, its top-left corner uniform where it fits."""
    h, w = shape
    top = (u[..., 0] * (grid - h + 1)).floor().long().clamp(max=grid - h)[..., None]
    left = (u[..., 1] * (grid - w + 1)).floor().long().clamp(max=grid - w)[..., None]
    cells = torch.arange(grid)
    in_rows = torch.logical_and(cells >= top, cells < top + h)  # (..., grid)
    in_cols = torch.logical_and(cells >= left, cells < left + w)
    return torch.logical_and(
        in_rows[..., :, None], in_cols[..., None, :]
    )  # logical_and: `&` broadcasts bools slowly on the CPU


def sample_masks(
    grid: int,
    step: int,
    rows: torch.Tensor,
    *,
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
) -> BlockMasks:
    """I-JEPA's multi-block masks for the images at ``rows`` (their rows in the training split) at ``step``; see
    the module docstring. On the CPU; the block sizes must fit the grid (:func:`check_blocks`).

    Each image draws :data:`ROUNDS` rounds of (target positions, :data:`CONTEXT_TRIES` context positions) at once
    and takes the first context draw, in round order, that keeps more than :data:`MIN_KEEP` patches, else the one
    that keeps the most, with its round's targets: almost always a draw of round 0, as the reference's. An image
    left with no context patch in every draw is a RunFailed (blocks too large for the grid)."""
    rows = rows.reshape(-1).cpu()
    b = rows.numel()
    u_size = _uniforms(_SIZE_KEY, step, torch.zeros(1, dtype=torch.long), 3)[0].tolist()
    target_shape = block_shape(
        grid,
        target_scale[0] + u_size[0] * (target_scale[1] - target_scale[0]),
        target_aspect[0] + u_size[1] * (target_aspect[1] - target_aspect[0]),
    )
    context_shape = block_shape(grid, context_scale[0] + u_size[2] * (context_scale[1] - context_scale[0]), 1.0)
    per_round = num_targets + CONTEXT_TRIES
    u = _uniforms(_POSITION_KEY, step, rows, 2 * ROUNDS * per_round).view(b, ROUNDS, per_round, 2)
    target_blocks = _place(u[:, :, :num_targets], target_shape, grid)  # (B, R, M, g, g)
    free = torch.logical_not(target_blocks.any(dim=2, keepdim=True))  # (B, R, 1, g, g)
    candidates = torch.logical_and(_place(u[:, :, num_targets:], context_shape, grid), free)  # (B, R, T, g, g)
    counts = candidates.flatten(3).sum(dim=3).view(b, ROUNDS * CONTEXT_TRIES)
    accepted = counts > MIN_KEEP
    choice = torch.where(
        accepted.any(dim=1), accepted.long().argmax(dim=1), counts.argmax(dim=1)
    )  # argmax: the first maximum
    best = counts.gather(1, choice[:, None])[:, 0]
    if bool((best == 0).any()):
        row = int(rows[int((best == 0).nonzero()[0])])
        raise RunFailed(
            f"method.target_scale: image {row} at step {step} has no context patch left in "
            f"{ROUNDS * CONTEXT_TRIES} draws: {num_targets} target blocks of {target_shape[0]}x{target_shape[1]} "
            f"cover its {context_shape[0]}x{context_shape[1]} context block on the {grid}x{grid} patch grid; use "
            "smaller method.target_scale, fewer method.num_targets or a smaller patch size"
        )
    pick = torch.arange(b)
    rounds = choice // CONTEXT_TRIES
    context = candidates[pick, rounds, choice % CONTEXT_TRIES].flatten(1)  # (B, g*g)
    available = context.sum(dim=1)
    keep = int(available.min())
    context_ids = torch.sort(torch.logical_not(context).to(torch.uint8), dim=1, stable=True).indices[
        :, :keep
    ]  # the first `keep`, raster order
    targets = target_blocks[pick, rounds].flatten(2)  # (B, M, g*g)
    target_ids = torch.nonzero(targets)[:, 2].view(
        b, num_targets, target_shape[0] * target_shape[1]
    )  # nonzero: (image, block, patch) order
    return BlockMasks(context_ids, target_ids, available)


def take(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, L, D) tokens at positions ``ids`` (B, K) -> (B, K, D)."""
    return tokens.gather(1, ids[..., None].expand(-1, -1, tokens.shape[-1]))


def ijepa_loss(
    pred: torch.Tensor, target_features: torch.Tensor, targets: torch.Tensor, kind: str = "l2"
) -> torch.Tensor:
    """The I-JEPA loss: predictions ``pred`` (B, M, K, D) of the target blocks against the target encoder's patch
    tokens ``target_features`` (B, L, D) of the full images, layer-normalised over D (no affine) and taken at the
    target positions ``targets`` (B, M, K). ``l2``: mean squared error over blocks, positions and dimensions (the
    paper's L2); ``smooth_l1``: the reference code's Huber loss (beta 1). The targets are detached; float32."""
    b, m, k = targets.shape
    d = target_features.shape[-1]
    if pred.shape != (b, m, k, d):
        raise ValueError(f"expected pred (B, M, K, D) = {(b, m, k, d)}, got {tuple(pred.shape)}")
    h = F.layer_norm(take(target_features.detach().float(), targets.reshape(b, m * k)), (d,)).view(b, m, k, d)
    if kind == "l2":
        return F.mse_loss(pred.float(), h)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred.float(), h)
    raise ValueError(f"unknown loss {kind!r}; use 'l2' or 'smooth_l1'")


class LayerNorm6(nn.LayerNorm):
    """LayerNorm with eps 1e-6, the reference's ``partial(nn.LayerNorm, eps=1e-6)`` as a class (timm's
    ``norm_layer``)."""

    def __init__(self, dim: int, **kwargs: Any) -> None:
        super().__init__(dim, **{"eps": 1e-6, **kwargs})  # timm passes device and dtype


class Predictor(nn.Module):
    """The narrow ViT predictor (reference ``VisionTransformerPredictor``): context tokens (B, Kc, E) embedded to
    ``dim`` plus their position embedding; for each of the M target blocks, a copy of them followed by one mask
    token plus position embedding per target patch; ``depth`` transformer blocks, a norm, and a projection back to
    E of the mask tokens' outputs: (B, M, Kt, E). The target blocks are predicted separately (batched as B*M)."""

    pos_embed: torch.Tensor
    """Non-persistent buffer (1, g*g, dim): the fixed 2-D sin-cos position embedding, a function of the grid."""

    def __init__(self, embed_dim: int, grid: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, grid)[None], persistent=False)
        self.blocks = nn.Sequential(
            *(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=LayerNorm6) for _ in range(depth))
        )
        self.norm = LayerNorm6(dim)
        self.proj = nn.Linear(dim, embed_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """The reference's: truncated normal (std 0.02) for Linear weights and the mask token, zero biases, and each
        block's output projections divided by sqrt(2 * layer) (``fix_init_weight``)."""
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            for layer, block in enumerate(self.blocks, start=1):
                for name, weight in block.named_parameters():
                    if name in ("attn.proj.weight", "mlp.fc2.weight"):
                        weight.div_(math.sqrt(2.0 * layer))

    def forward(self, context: torch.Tensor, context_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        b, m, k = target_ids.shape
        pos = self.pos_embed.expand(b, -1, -1)
        x = self.embed(context) + take(pos, context_ids)  # (B, Kc, dim)
        queries = self.mask_token + take(pos, target_ids.reshape(b, m * k)).view(b * m, k, -1)
        x = torch.cat([x.repeat_interleave(m, dim=0), queries], dim=1)  # image-major: rows i*M .. i*M + M-1 are image i
        y = self.proj(self.norm(self.blocks(x))[:, -k:])
        return y.view(b, m, k, -1)


def _range(v: tuple[float, float], what: str) -> tuple[float, float]:
    lo, hi = v
    if not 0 < lo <= hi:
        raise ValueError(f"must be a {what} range (low, high) with 0 < low <= high, got {list(v)}")
    return v


class IJEPAParams(MethodParams):
    num_targets: int = Field(4, ge=1, description="target blocks per image (paper: 4)")
    target_scale: tuple[float, float] = Field(
        (0.15, 0.2), description="target block area range, fraction of the patches (paper: 0.15-0.2)"
    )
    target_aspect: tuple[float, float] = Field(
        (0.75, 1.5), description="target block aspect range, rows/columns (paper: 0.75-1.5)"
    )
    context_scale: tuple[float, float] = Field(
        (0.85, 1.0), description="context block area range, aspect 1 (paper: 0.85-1.0)"
    )
    base_momentum: float = Field(
        0.996, ge=0, le=1, description="target EMA momentum at step 0, linear to 1 (paper: 0.996)"
    )
    pred_dim: int = Field(384, ge=4, description="predictor width (reference: 384)")
    pred_depth: int = Field(6, ge=1, description="predictor blocks (reference ViT-H/14: 12; 6 for smaller encoders)")
    pred_heads: int = Field(12, ge=1, description="predictor attention heads (reference: the encoder's)")
    loss: Literal["l2", "smooth_l1"] = Field("l2", description="l2 (the paper's) or smooth_l1 (the reference code's)")

    @field_validator("target_scale", "context_scale")
    @classmethod
    def _area(cls, v: tuple[float, float]) -> tuple[float, float]:
        return check_area_range(v)

    @field_validator("target_aspect")
    @classmethod
    def _aspect(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _range(v, "aspect")

    @field_validator("pred_dim")
    @classmethod
    def _multiple_of_4(cls, v: int) -> int:
        if v % 4:
            raise ValueError("must be a multiple of 4 (2-D sin-cos position embedding)")
        return v

    @field_validator("pred_heads")
    @classmethod
    def _divides_dim(cls, v: int, info: ValidationInfo) -> int:
        dim = info.data.get("pred_dim")
        if dim is not None and dim % v:
            raise ValueError(f"must divide method.pred_dim {dim}")
        return v


@register
class IJEPA(Method):
    name = "ijepa"
    Params = IJEPAParams
    uses_negatives = False
    networks = 2
    loss_name = "latent L2 (EMA target)"
    paper = (
        "Assran et al., CVPR 2023, Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture"
    )

    params: IJEPAParams

    def __init__(self, backbone: nn.Module, params: IJEPAParams) -> None:
        super().__init__(backbone, params)
        self.parts: ViTParts = vit_parts(backbone, "method ijepa")
        g = self.parts.grid_size
        check_blocks(
            g,
            self.parts.patch_size,
            params.num_targets,
            params.target_scale,
            params.target_aspect,
            params.context_scale,
        )
        self.predictor = Predictor(self.parts.embed_dim, g, params.pred_dim, params.pred_depth, params.pred_heads)
        self.target = frozen_copy(backbone)
        self.target_parts: ViTParts = vit_parts(self.target, "method ijepa")

    def setup(self, data: DataSplits) -> None:
        check_image_size(self.parts, data)

    def views(self, image_size: int) -> list[View]:
        return [View(image_size)]

    def sample_masks(self, batch: int, step: StepInfo) -> BlockMasks:
        """This step's masks for its batch (rows ``step.indices``, else 0..batch-1), on the CPU."""
        rows = step.indices if step.indices is not None else torch.arange(batch)
        p = self.params
        return sample_masks(
            self.parts.grid_size,
            step.step,
            rows,
            num_targets=p.num_targets,
            target_scale=p.target_scale,
            target_aspect=p.target_aspect,
            context_scale=p.context_scale,
        )

    def encode_context(self, images: torch.Tensor, context_ids: torch.Tensor) -> torch.Tensor:
        """The context encoder on the context patches only (plus its prefix tokens): (B, C, H, W), (B, Kc) -> (B, Kc,
        E)."""
        parts = self.parts
        tokens = take(parts.patch_tokens(images), context_ids)
        return parts.encode(torch.cat([parts.prefix_tokens(images.shape[0]), tokens], dim=1))[
            :, parts.num_prefix_tokens :
        ]

    @torch.no_grad()
    def target_features(self, images: torch.Tensor) -> torch.Tensor:
        """The target encoder's patch tokens of the full images (after its final norm): (B, C, H, W) -> (B, L, E)."""
        parts = self.target_parts
        tokens = torch.cat([parts.prefix_tokens(images.shape[0]), parts.patch_tokens(images)], dim=1)
        return parts.encode(tokens)[:, parts.num_prefix_tokens :]

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        x = views[0]
        masks = self.sample_masks(x.shape[0], step)
        context_ids, target_ids = masks.context.to(x.device), masks.targets.to(x.device)
        pred = self.predictor(self.encode_context(x, context_ids), context_ids, target_ids)
        loss = ijepa_loss(pred, self.target_features(x), target_ids, self.params.loss)
        logs: dict[str, float | torch.Tensor] = {
            "momentum": linear_momentum(step.step, step.total_steps, self.params.base_momentum),
            "context_patches": float(context_ids.shape[1]),
            "target_patches": float(target_ids.shape[2]),
        }
        return StepOutput(loss, logs)

    def after_step(self, step: StepInfo) -> None:
        ema_update(self.target, self.backbone, linear_momentum(step.step, step.total_steps, self.params.base_momentum))

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The target encoder on all patches, average-pooled over the patch tokens: (B, C, H, W) -> (B, E)."""
        return encode_all(self.target_parts, images, "mean")

    def trunk(self, projector_layers: int = 0) -> tuple[nn.Module, int]:
        super().trunk(projector_layers)  # refuses fine-tuning from a projection head: I-JEPA has none
        encoder = copy.deepcopy(self.target).requires_grad_(True)  # the evaluated encoder, trainable
        return PooledViT(encoder, "mean", "method ijepa"), self.parts.embed_dim
