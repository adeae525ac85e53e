"""A deterministic procedural dataset: coloured geometric shapes on cluttered backgrounds.

Each image shows one large shape (the label), drawn with a soft signed distance function (Inigo Quilez, "2D distance
functions", https://iquilezles.org/articles/distfunctions2d/), so edges are anti-aliased at any resolution. Colour,
gradient background, scale, position, rotation and pixel noise are nuisances drawn per image; all shapes of one scale
have the same area. The nuisances dominate pixel space while the shapes stay easy to tell apart, so the dataset
rewards representations invariant to colour and placement (self-supervised methods need strong colour augmentation).

Images are generated in fixed-size chunks, each from a generator seeded by ``(seed, chunk index)``: the same
``(n, image_size, seed)`` always gives identical tensors, and the first ``k`` images do not depend on ``n``.
"""

from __future__ import annotations

import hashlib
import math

import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
"""Class names; the label of an image is its index here."""

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.8, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
}
"""The shape colours, RGB in [0, 1]."""

SIZES: tuple[str, ...] = ("small", "medium", "large")
"""Size attribute: thirds of the radius range :data:`RADIUS_RANGE`."""

POSITIONS: tuple[str, ...] = (
    "top left", "top centre", "top right",
    "middle left", "centre", "middle right",
    "bottom left", "bottom centre", "bottom right",
)  # fmt: skip
"""Position attribute: the cell of a 3x3 grid that holds the shape's centre, row-major."""

RADIUS_RANGE: tuple[float, float] = (0.32, 0.48)
"""Scale of a shape, as a fraction of the image side: the circumradius of the triangle, the
shape with the least area for its outline. Other shapes are drawn with the same area as the
triangle of that scale (a circle's radius is 0.64 of it), so that the area of the shape is
not a pixel-space cue to its class. Shapes are large (a triangle's circumradius is 10 to 15
px at 32 px) so that their outlines survive the early downsampling of ImageNet-style
backbones; with small shapes (0.22 to 0.46) SimCLR features barely separate the classes."""

MAX_NOISE_STD: float = 0.08
"""Upper bound of the per-image Gaussian pixel-noise std (pixel values in [0, 1])."""

MIN_CONTRAST: float = 0.5
"""Minimum RGB distance between the shape colour and the background under it; below it
the background is inverted (when that helps)."""

MAX_OVERHANG: float = 0.2
"""How far a shape may reach past the image border, as a fraction of its circumradius: its
centre stays at least ``1 - MAX_OVERHANG`` circumradii from each side. The slack widens the
range of positions of the (large) shapes, which keeps their silhouettes from lining up in
pixel space, while leaving almost all of every shape in view."""

_PIXELS_PER_CHUNK = 2**19


def generate_shapes(
    n: int, image_size: int = 32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, str]]]:
    """Generate ``n`` shape images.

    Returns ``(images, labels, attributes)``: images uint8 ``(n, 3, S, S)``, labels int64
    ``(n,)`` indexing :data:`SHAPES`, and per image a dict with ``"shape"``, ``"colour"``
    (a :data:`COLOURS` key), ``"size"`` (a :data:`SIZES` value) and ``"position"`` (a
    :data:`POSITIONS` value). Labels cycle through the classes in a shuffled order within
    each chunk of images, so classes are balanced to within one image per full chunk.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    chunk = max(8, _PIXELS_PER_CHUNK // (image_size * image_size))
    images = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)
    attributes: list[dict[str, str]] = []
    for index, start in enumerate(range(0, n, chunk)):
        count = min(chunk, n - start)
        params = _draw_params(chunk, image_size, start, _chunk_generator(seed, index))
        params = {key: value[:count] for key, value in params.items()}
        images[start : start + count] = _render(params, image_size)
        labels[start : start + count] = params["label"]
        attributes.extend(_attributes(params))
    return images, labels, attributes


def _chunk_generator(seed: int, chunk_index: int) -> torch.Generator:
    """A generator for one chunk, seeded from a hash of ``(seed, chunk_index)``."""
    digest = hashlib.blake2b(f"shapes:{seed}:{chunk_index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _draw_params(count: int, image_size: int, start: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw every random quantity of a full chunk, in a fixed order (so prefixes are stable)."""
    k = len(SHAPES)
    order = torch.randperm(count, generator=gen)
    label = (torch.arange(count) + start) % k
    label = label[order]
    colour = torch.randint(len(COLOURS), (count,), generator=gen)
    bg_from = torch.rand(count, 3, generator=gen)
    bg_to = torch.rand(count, 3, generator=gen)
    gradient = torch.rand(count, generator=gen)  # 0: flat background, 1: full bg_from -> bg_to ramp
    gradient_angle = torch.rand(count, generator=gen) * (2 * math.pi)
    lo, hi = RADIUS_RANGE
    scale = lo + (hi - lo) * torch.rand(count, generator=gen)
    radius = scale * _EQUAL_AREA_FACTOR[label]  # circumradius of this shape
    margin = (1 - MAX_OVERHANG) * radius[:, None]  # how far the centre stays from each border
    centre = margin + (1 - 2 * margin) * torch.rand(count, 2, generator=gen)  # (x, y)
    rotation = torch.rand(count, generator=gen) * (2 * math.pi)
    noise_std = MAX_NOISE_STD * torch.rand(count, generator=gen)
    noise = torch.randn(count, 3, image_size, image_size, generator=gen)
    return {
        "label": label,
        "colour": colour,
        "bg_from": bg_from,
        "bg_to": bg_to,
        "gradient": gradient,
        "gradient_angle": gradient_angle,
        "scale": scale,
        "radius": radius,
        "centre": centre,
        "rotation": rotation,
        "noise_std": noise_std,
        "noise": noise,
    }


def _render(p: dict[str, torch.Tensor], image_size: int) -> torch.Tensor:
    """Composite shape over background, add noise, quantise to uint8 ``(B, 3, S, S)``."""
    b = p["label"].shape[0]
    coords = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # (S, S), y grows downwards

    # Background: bg_from + gradient * (bg_to - bg_from) * ramp, ramp in [0, 1] across the image.
    direction = torch.stack([torch.cos(p["gradient_angle"]), torch.sin(p["gradient_angle"])], dim=1)  # (B, 2)
    half_extent = 0.5 * direction.abs().sum(dim=1)  # max of |t| over the unit square

    def ramp(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
        t = (px - 0.5) * direction[:, 0, None, None] + (py - 0.5) * direction[:, 1, None, None]
        return 0.5 + 0.5 * t / half_extent[:, None, None]

    step = (p["gradient"][:, None] * (p["bg_to"] - p["bg_from"]))[:, :, None, None]  # (B, 3, 1, 1)
    background = p["bg_from"][:, :, None, None] + step * ramp(x, y)[:, None]

    # Contrast: the background is linear, so its extremes under the shape lie at centre +- r * direction.
    fg = torch.tensor(list(COLOURS.values()))[p["colour"]]  # (B, 3)
    cx, cy, r = p["centre"][:, 0], p["centre"][:, 1], p["radius"]
    ends = [
        ramp((cx + s * r * direction[:, 0])[:, None, None], (cy + s * r * direction[:, 1])[:, None, None])
        for s in (-1, 1)
    ]
    under = [p["bg_from"] + step[:, :, 0, 0] * e[:, 0] for e in ends]  # (B, 3) each
    contrast = torch.minimum(*[(fg - u).norm(dim=1) for u in under])
    contrast_inverted = torch.minimum(*[(fg - (1 - u)).norm(dim=1) for u in under])
    invert = (contrast < MIN_CONTRAST) & (contrast_inverted > contrast)
    background = torch.where(invert[:, None, None, None], 1 - background, background)

    # Shape: coverage from a signed distance in pixels (soft edge one pixel wide).
    dx = x[None] - cx[:, None, None]
    dy = y[None] - cy[:, None, None]
    cos, sin = torch.cos(p["rotation"])[:, None, None], torch.sin(p["rotation"])[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    distance = torch.empty(b, image_size, image_size)
    for k, name in enumerate(SHAPES):
        idx = (p["label"] == k).nonzero().squeeze(1)
        if idx.numel():
            distance[idx] = _SDF[name](u[idx], v[idx], r[idx, None, None])
    alpha = (0.5 - distance * image_size).clamp(0, 1)[:, None]

    image = background + alpha * (fg[:, :, None, None] - background)
    image = image + p["noise_std"][:, None, None, None] * p["noise"]
    return (image * 255).round().clamp(0, 255).to(torch.uint8)


def _attributes(p: dict[str, torch.Tensor]) -> list[dict[str, str]]:
    """Name the shape, colour, size third and 3x3 grid cell of each image."""
    colour_names = list(COLOURS)
    lo, hi = RADIUS_RANGE
    size = ((p["scale"] - lo) / (hi - lo) * 3).long().clamp(0, 2)
    cell = (p["centre"] * 3).long().clamp(0, 2)  # (B, 2): column from x, row from y
    position = cell[:, 1] * 3 + cell[:, 0]
    return [
        {"shape": SHAPES[k], "colour": colour_names[c], "size": SIZES[s], "position": POSITIONS[q]}
        for k, c, s, q in zip(p["label"].tolist(), p["colour"].tolist(), size.tolist(), position.tolist(), strict=True)
    ]


# ----------------------------------------------------------------------------- distance functions
# Each takes rotated local coordinates u, v (B, S, S) and the circumradius r (B, 1, 1), all in
# units of the image side, and returns the signed distance (negative inside).


def _sd_circle(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(u * u + v * v) - r


def _sd_box(u: torch.Tensor, v: torch.Tensor, half_u: torch.Tensor, half_v: torch.Tensor) -> torch.Tensor:
    qu, qv = u.abs() - half_u, v.abs() - half_v
    outside = torch.sqrt(qu.clamp(min=0) ** 2 + qv.clamp(min=0) ** 2)
    return outside + torch.maximum(qu, qv).clamp(max=0)


def _sd_star(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, points: int, m: float) -> torch.Tensor:
    """Quilez's ``sdStar``: ``points`` tips at radius r; m = 2 gives a regular polygon, larger m a sharper star."""
    an, en = math.pi / points, math.pi / m
    acs = (math.cos(an), math.sin(an))
    ecs = (math.cos(en), math.sin(en))
    bn = torch.remainder(torch.atan2(u, v), 2 * an) - an  # fold into one sector
    rho = torch.sqrt(u * u + v * v)
    px, py = rho * torch.cos(bn) - r * acs[0], rho * torch.sin(bn).abs() - r * acs[1]
    t = (-(px * ecs[0] + py * ecs[1])).clamp(min=0)
    t = torch.minimum(t, r * (acs[1] / ecs[1]))
    px, py = px + ecs[0] * t, py + ecs[1] * t
    return torch.sqrt(px * px + py * py) * torch.sign(px)


_CROSS_ARM, _CROSS_HALF_WIDTH = 0.958, 0.29  # bar half-length and half-width; the corners touch the circumcircle
_RING_INNER = 0.55  # inner radius of the ring over its outer radius
_STAR_INNER = math.cos(math.pi / 5) - math.sin(math.pi / 5) / math.tan(math.pi / 3)  # ~0.47: sdStar with m = 3


def _sd_square(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    half = r / math.sqrt(2)
    return _sd_box(u, v, half, half)


def _sd_triangle(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return _sd_star(u, v, r, points=3, m=2.0)


def _sd_five_point_star(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return _sd_star(u, v, r, points=5, m=3.0)


def _sd_cross(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Union of two perpendicular bars (the min of the two box distances)."""
    long, short = r * _CROSS_ARM, r * _CROSS_HALF_WIDTH
    return torch.minimum(_sd_box(u, v, long, short), _sd_box(u, v, short, long))


def _sd_ring(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Annulus between radii ``_RING_INNER * r`` and ``r``."""
    mid, half_width = 0.5 * (1 + _RING_INNER) * r, 0.5 * (1 - _RING_INNER) * r
    return (torch.sqrt(u * u + v * v) - mid).abs() - half_width


_SDF = {
    "circle": _sd_circle,
    "square": _sd_square,
    "triangle": _sd_triangle,
    "star": _sd_five_point_star,
    "cross": _sd_cross,
    "ring": _sd_ring,
}

_AREA = {  # area of each shape with circumradius 1
    "circle": math.pi,
    "square": 2.0,
    "triangle": 3 * math.sqrt(3) / 4,
    "star": 5 * _STAR_INNER * math.sin(math.pi / 5),
    "cross": 8 * _CROSS_ARM * _CROSS_HALF_WIDTH - 4 * _CROSS_HALF_WIDTH**2,
    "ring": math.pi * (1 - _RING_INNER**2),
}
_EQUAL_AREA_FACTOR = torch.tensor([math.sqrt(min(_AREA.values()) / _AREA[name]) for name in SHAPES])
"""Circumradius of each shape over the scale, so that all shapes of one scale have the same area."""
