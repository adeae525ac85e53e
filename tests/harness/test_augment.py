"""The vectorised SimCLR augmentation against torchvision's functional ops and closed forms."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from core.views import BRIGHT, CONTRAST, GRAY, JITTER, NUM_DRAWS, SOLARIZE, View
from harness.config.schema import AugmentConfig
from harness.data import augment as A
from harness.data.augment import Augmenter

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)

# Every random op off: identity crop, no flip, no jitter, no grayscale, no blur.
OFF = dict(
    crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=0.0, jitter_p=0.0,
    brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, grayscale_p=0.0, blur_p=0.0,
)


def _cfg(**overrides: object) -> AugmentConfig:
    return AugmentConfig(**{**OFF, **overrides})


def _images(batch: int = 4, channels: int = 3, side: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, channels, side, side), generator=g, dtype=torch.uint8)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unnormalise(y: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    n = y.shape[1]
    return y * torch.tensor(std[:n]).view(1, n, 1, 1) + torch.tensor(mean[:n]).view(1, n, 1, 1)


def test_all_randomness_off_is_normalize():
    x = _images()
    aug = Augmenter(_cfg(), MEAN, STD)
    out = aug(x, View(16), _gen())
    assert out.dtype == torch.float32 and out.shape == (4, 3, 16, 16)
    ref = aug.normalize(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # and normalize itself is (x / 255 - mean) / std
    manual = (x.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(ref, manual, atol=1e-6, rtol=0)


def test_normalize_resizes_like_torchvision():
    x = _images(side=32)
    aug = Augmenter(_cfg(), MEAN, STD)
    out = aug.normalize(x, size=20)
    ref = TF.resize(x.float() / 255, [20, 20], antialias=True)
    torch.testing.assert_close(_unnormalise(out), ref, atol=1e-5, rtol=0)
    assert aug.normalize(x, size=32).shape == (4, 3, 32, 32)


def test_flip_with_full_crop():
    x = _images()
    aug = Augmenter(_cfg(hflip_p=1.0), MEAN, STD)
    out = aug(x, View(16), _gen())
    torch.testing.assert_close(out, aug.normalize(torch.flip(x, dims=[-1])), atol=1e-5, rtol=0)


def _floats(batch: int = 3, seed: int = 1) -> torch.Tensor:
    x = torch.rand(batch, 3, 12, 12, generator=_gen(seed))
    x[0, :, :2, :2] = 0.5  # some gray pixels (max == min), where hue is undefined
    x[1, 0] = x[1, 1]  # ties between channels
    return x


@pytest.mark.parametrize(
    ("ours", "theirs", "factors"),
    [
        (A._adjust_brightness_, TF.adjust_brightness, [0.0, 0.6, 1.4]),
        (A._adjust_contrast_, TF.adjust_contrast, [0.0, 0.6, 1.4]),
        (A._adjust_saturation_, TF.adjust_saturation, [0.0, 0.6, 1.4]),
        (A._adjust_hue_, TF.adjust_hue, [-0.5, -0.1, 0.37]),
    ],
    ids=["brightness", "contrast", "saturation", "hue"],
)
def test_colour_ops_match_torchvision(ours, theirs, factors):
    x = _floats()
    ref = torch.stack([theirs(img, f) for img, f in zip(x, factors)])
    inplace = x.clone()
    out = ours(inplace, torch.tensor(factors))
    assert out is inplace  # the ops work in place
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert not torch.equal(out[1], x[1])  # the op does something


def test_hue_identity_and_full_turn():
    x = _floats()
    torch.testing.assert_close(A._adjust_hue_(x.clone(), torch.zeros(3)), x, atol=1e-6, rtol=0)
    # half a turn twice is a full turn
    twice = A._adjust_hue_(A._adjust_hue_(x.clone(), torch.full((3,), 0.5)), torch.full((3,), 0.5))
    torch.testing.assert_close(twice, x, atol=1e-5, rtol=0)


def test_drawn_contrast_factors_match_torchvision():
    # one jitter op, so the order does not matter: factor ~ U(1 - c, 1 + c), replayed from the generator
    x = _images()
    cfg = _cfg(jitter_p=1.0, contrast=0.5)
    aug = Augmenter(cfg, MEAN, STD)
    g = _gen(3)
    out = _unnormalise(aug(x, View(16), g))
    # replay the draw: randperm(4), then (B, 13) uniforms
    g = _gen(3)
    torch.randperm(4, generator=g)
    u = torch.rand(4, SOLARIZE, generator=g, dtype=torch.float64)  # the columns before solarisation2019s
    factors = 0.5 + 1.0 * u[:, CONTRAST]
    ref = torch.stack([TF.adjust_contrast(img.float() / 255, float(f)) for img, f in zip(x, factors)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_grayscale_all():
    x = _images()
    aug = Augmenter(_cfg(grayscale_p=1.0), MEAN, STD)
    out = _unnormalise(aug(x, View(16), _gen()))
    torch.testing.assert_close(out[:, 0], out[:, 1], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 0], out[:, 2], atol=1e-6, rtol=0)
    ref = TF.rgb_to_grayscale(x.float() / 255, num_output_channels=3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_grayscale_is_per_image():
    x = _images(batch=64)
    aug = Augmenter(_cfg(grayscale_p=0.5), MEAN, STD)
    out = _unnormalise(aug(x, View(16), _gen()))
    gray = (out[:, 0] - out[:, 1]).abs().amax(dim=(1, 2)) < 1e-5
    assert 10 < int(gray.sum()) < 54
    torch.testing.assert_close(out[~gray], x[~gray].float() / 255, atol=1e-5, rtol=0)  # the others untouched


def test_views_are_independent_per_image_and_per_call():
    x = _images(batch=1).expand(8, -1, -1, -1).contiguous()  # eight copies of one image
    aug = Augmenter(AugmentConfig(), MEAN, STD)
    g = _gen()
    v1, v2 = aug(x, View(16), g), aug(x, View(16), g)
    for v in (v1, v2):
        rows = v.flatten(1)
        distances = torch.cdist(rows, rows)
        assert (distances + torch.eye(8) * 1e3).min() > 1e-3  # every pair of rows differs
    assert (v1 - v2).flatten(1).abs().amax(dim=1).min() > 1e-3  # each image's two views differ


def test_determinism():
    x = _images()
    aug = Augmenter(AugmentConfig(blur_p=0.5), MEAN, STD)
    a = aug(x, View(16), _gen(7))
    b = aug(x, View(16), _gen(7))
    c = aug(x, View(16), _gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_crop_geometry_from_coordinate_ramp():
    side = 64
    ramp = torch.linspace(0, 255, side).round().to(torch.uint8)
    x = ramp.view(1, 1, 1, side).expand(32, 3, side, side).contiguous()  # value encodes x
    aug = Augmenter(_cfg(crop_scale=(0.25, 0.25), hflip_p=0.5), MEAN, STD)
    out = _unnormalise(aug(x, View(side), _gen()))[:, 0]  # (B, side, side), in [0, 1]
    spans = out.amax(dim=(1, 2)) - out.amin(dim=(1, 2))
    # a crop half the side wide spans half the ramp (less one input pixel at the ends)
    torch.testing.assert_close(spans, torch.full_like(spans, 0.5), atol=2 / side, rtol=0)
    # rows are constant (the image is) and positions vary between images
    assert (out - out[:, :1]).abs().max() < 1e-5
    assert out[:, 0, side // 2].std() > 0.05
    # flips: about half the images decrease from left to right
    decreasing = out[:, 0, -1] < out[:, 0, 0]
    assert 4 < int(decreasing.sum()) < 28


def test_crop_aspect_ratio_from_vertical_ramp():
    side = 64
    ramp = torch.linspace(0, 255, side).round().to(torch.uint8)
    x = ramp.view(1, 1, side, 1).expand(8, 3, side, side).contiguous()  # value encodes y
    aug = Augmenter(_cfg(crop_scale=(0.25, 0.25), crop_ratio=(4.0, 4.0)), MEAN, STD)  # w = 1, h = 1/4
    out = _unnormalise(aug(x, View(side), _gen()))[:, 0]
    spans = out.amax(dim=(1, 2)) - out.amin(dim=(1, 2))
    torch.testing.assert_close(spans, torch.full_like(spans, 0.25), atol=2 / side, rtol=0)


def test_crop_of_a_wide_image_is_square_in_pixels():
    height, width = 32, 64
    ramp = torch.linspace(0, 255, width).round().to(torch.uint8)
    x = ramp.view(1, 1, 1, width).expand(8, 3, height, width).contiguous()
    aug = Augmenter(_cfg(crop_scale=(0.25, 0.25)), MEAN, STD)  # a quarter of 32 x 64: 22.6 px square
    out = _unnormalise(aug(x, View(16), _gen()))[:, 0]
    spans = out.amax(dim=(1, 2)) - out.amin(dim=(1, 2))
    expected = (0.25 * height * width) ** 0.5 / width  # 0.354 of the width
    torch.testing.assert_close(spans, torch.full_like(spans, expected), atol=2 / width, rtol=0)


def test_crop_that_overflows_is_clamped_to_the_side():
    # area 1 at ratio 4 would be 2 sides wide and 1/2 high: torchvision redraws, we clamp w to 1
    side = 32
    ramp = torch.linspace(0, 255, side).round().to(torch.uint8)
    x = (ramp.view(1, 1, 1, side).expand(8, 1, side, side), ramp.view(1, 1, side, 1).expand(8, 1, side, side))
    x = torch.cat((*x, torch.zeros(8, 1, side, side, dtype=torch.uint8)), dim=1)  # R encodes x, G encodes y
    aug = Augmenter(_cfg(crop_scale=(1.0, 1.0), crop_ratio=(4.0, 4.0)), MEAN, STD)
    out = _unnormalise(aug(x, View(side), _gen()))
    torch.testing.assert_close(out[:, 0], x[:, 0].float() / 255, atol=1e-5, rtol=0)  # the full width, unscaled
    spans = out[:, 1].amax(dim=(1, 2)) - out[:, 1].amin(dim=(1, 2))
    torch.testing.assert_close(spans, torch.full_like(spans, 0.5), atol=2 / side, rtol=0)  # half the height


def test_view_scale_overrides_config():
    side = 64
    ramp = torch.linspace(0, 255, side).round().to(torch.uint8)
    x = ramp.view(1, 1, 1, side).expand(8, 3, side, side).contiguous()
    aug = Augmenter(_cfg(), MEAN, STD)
    out = _unnormalise(aug(x, View(24, scale=(0.0625, 0.0625)), _gen()))[:, 0]
    assert out.shape == (8, 24, 24)
    spans = out.amax(dim=(1, 2)) - out.amin(dim=(1, 2))
    torch.testing.assert_close(spans, torch.full_like(spans, 0.25), atol=2 / side, rtol=0)


def test_blur_constant_and_impulse():
    side = 32
    aug = Augmenter(_cfg(blur_p=1.0, blur_sigma=(0.5, 2.0)), (0.0,), (1.0,))
    const = torch.full((4, 3, side, side), 77, dtype=torch.uint8)
    torch.testing.assert_close(aug(const, View(side), _gen()), torch.full((4, 3, side, side), 77 / 255), atol=1e-6, rtol=0)
    impulse = torch.zeros(4, 3, side, side, dtype=torch.uint8)
    impulse[:, :, side // 2, side // 2] = 255
    out = aug(impulse, View(side), _gen())
    torch.testing.assert_close(out.sum(dim=(2, 3)), torch.ones(4, 3), atol=1e-5, rtol=0)
    assert out.amax() < 0.9  # it did spread


def test_blur_kernels_match_torchvision():
    x = torch.rand(3, 3, 20, 20, generator=_gen())
    sigma = torch.tensor([0.3, 1.0, 2.5])
    out = A._gaussian_blur(x, A._gaussian_kernels(sigma, 2))
    ref = torch.stack([TF.gaussian_blur(img, [5, 5], [float(s)]) for img, s in zip(x, sigma)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_single_channel():
    x = _images(channels=1)
    aug = Augmenter(AugmentConfig(jitter_p=1.0, grayscale_p=1.0, blur_p=1.0), (0.5,), (0.25,))
    out = aug(x, View(12), _gen())
    assert out.shape == (4, 1, 12, 12) and torch.isfinite(out).all()
    # brightness and contrast only: a full crop, no flip, equals torchvision's ops in the drawn order
    cfg = _cfg(jitter_p=1.0, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.2)
    aug = Augmenter(cfg, (0.5,), (0.25,))
    out = _unnormalise(aug(x, View(16), _gen(5)), (0.5,), (0.25,))
    g = _gen(5)
    order = torch.randperm(4, generator=g).tolist()
    u = torch.rand(4, SOLARIZE, generator=g, dtype=torch.float64)  # the columns before solarisation2019s
    refs = []
    for img, row in zip(x.float() / 255, u):
        for i in order:
            if i == 0:
                img = TF.adjust_brightness(img, 0.5 + float(row[BRIGHT]))
            elif i == 1:
                img = TF.adjust_contrast(img, 0.5 + float(row[CONTRAST]))
        refs.append(img)
    torch.testing.assert_close(out, torch.stack(refs), atol=1e-5, rtol=0)


def test_full_recipe_matches_torchvision_per_image():
    """Full crop, all colour ops: each image equals torchvision's ops in the batch's drawn order."""
    x = _images(batch=6)
    cfg = _cfg(jitter_p=0.5, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, grayscale_p=0.5)
    aug = Augmenter(cfg, MEAN, STD)
    out = _unnormalise(aug(x, View(16), _gen(11)))
    g = _gen(11)
    order = torch.randperm(4, generator=g).tolist()
    u = torch.rand(6, SOLARIZE, generator=g, dtype=torch.float64)  # the columns before solarisation2019s
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    refs = []
    for img, row in zip(x.float() / 255, u):
        if row[JITTER] < cfg.jitter_p:
            for i in order:
                low, width = (-0.1, 0.2) if i == 3 else (0.6, 0.8)  # U(-hue, hue), U(1 - x, 1 + x)
                img = ops[i](img, low + width * float(row[BRIGHT + i]))
        if row[GRAY] < cfg.grayscale_p:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        refs.append(img)
    torch.testing.assert_close(out, torch.stack(refs), atol=1e-4, rtol=0)


def test_bad_inputs():
    aug = Augmenter(AugmentConfig(), MEAN, STD)
    with pytest.raises(ValueError, match="channels"):
        aug(torch.zeros(2, 2, 8, 8, dtype=torch.uint8), View(8), _gen())
    with pytest.raises(ValueError, match="mean/std"):
        aug(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), View(8), _gen())
    with pytest.raises(ValueError, match="scale"):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), View(8, scale=(0.5, 2.0)), _gen())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = _images(batch=16, side=32)
    aug = Augmenter(AugmentConfig(blur_p=0.5), MEAN, STD)
    cpu = aug(x, View(24), _gen(4))
    cuda = aug(x.cuda(), View(24), _gen(4))
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-4, rtol=0)


def test_the_crop_geometry_gives_the_same_box_on_tensors_and_on_python_floats() -> None:
    """A loader worker computes an image's crop in Python floats, the augmenter on (B,) tensors: one box, any sides."""
    from core.views import CX, CY, RATIO, SCALE, crop_box

    u = torch.rand(64, 13, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for height, width in ((100, 200), (256, 256), (375, 500)):
        expected = torch.stack(crop_box(u[:, SCALE], u[:, RATIO], u[:, CX], u[:, CY], (0.08, 1.0), (3 / 4, 4 / 3), height, width), dim=1)
        got = torch.tensor([crop_box(r[SCALE], r[RATIO], r[CX], r[CY], (0.08, 1.0), (3 / 4, 4 / 3), height, width) for r in u.tolist()], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_a_views_own_recipe_is_the_config_with_its_values_over_it() -> None:
    """A view that sets blur_p and grayscale_p draws exactly what an augmenter whose config has those values draws
    for a plain view; the config's other values stay, and a plain view of the same augmenter is unchanged."""
    x = _images()
    base = _cfg(jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    own = View(16, recipe={"blur_p": 1.0, "grayscale_p": 1.0})
    got = Augmenter(base, MEAN, STD)(x, own, _gen(3))
    expected = Augmenter(base.model_copy(update={"blur_p": 1.0, "grayscale_p": 1.0}), MEAN, STD)(x, View(16), _gen(3))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    plain = Augmenter(base, MEAN, STD)
    assert plain.recipe(View(16)) is base and plain.recipe(own).jitter_p == 0.8
    torch.testing.assert_close(plain(x, View(16), _gen(3)), Augmenter(base, MEAN, STD)(x, View(16), _gen(3)), rtol=0, atol=0)
    assert not torch.equal(got, plain(x, View(16), _gen(3)))


@pytest.mark.parametrize(
    "recipe,message",
    [
        ({"solarise_p": 0.2}, "unknown key 'solarise_p'; accepted: hflip_p, jitter_p"),
        ({"blur_p": 1.5}, "blur_p must be a probability in \\[0, 1\\], got 1.5"),
        ({"hue": 0.6}, "hue must be in \\[0, 0.5\\], got 0.6"),
        ({"contrast": float("inf")}, "contrast must be a finite value >= 0, got inf"),
    ],
)
def test_a_bad_view_recipe_names_the_key_and_what_is_accepted(recipe: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        View(16, recipe=recipe)


# ----------------------------------------------------------------------------- solarisation and each view's recipe


@pytest.mark.parametrize("channels", [1, 3])
def test_solarisation_equals_torchvisions_on_fixed_images(channels: int) -> None:
    x = _images(batch=6, channels=channels, side=12, seed=5)
    mean, std = MEAN[:channels], STD[:channels]
    got = Augmenter(_cfg(solarize_p=1.0), mean, std)(x, View(12), _gen(0))
    expected = TF.normalize(TF.solarize(x.float() / 255, 0.5), list(mean), list(std))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)  # the identity crop's float rounding
    kept = Augmenter(_cfg(solarize_p=0.0), mean, std)(x, View(12), _gen(0))
    torch.testing.assert_close(kept, TF.normalize(x.float() / 255, list(mean), list(std)), atol=1e-5, rtol=0)


def test_a_recipe_without_solarisation_draws_what_it_drew_before_the_column_existed() -> None:
    """Sequential draws take the solarisation uniform only when a recipe solarises: the 13 columns before it, and so
    every number of a run without solarisation, are what they were."""
    order, u = A.draw_sequential(5, _gen(7))
    g = _gen(7)
    assert order == torch.randperm(4, generator=g).tolist()
    torch.testing.assert_close(u[:, :SOLARIZE], torch.rand(5, SOLARIZE, generator=g, dtype=torch.float64), rtol=0, atol=0)
    assert bool(u[:, SOLARIZE].isnan().all()) and u.shape == (5, NUM_DRAWS)


def _changed(aug: Augmenter, x: torch.Tensor, view: View, off: dict, draws: A.KeyedDraws) -> torch.Tensor:
    """Per image: does ``view`` give another output than ``view`` with ``off`` over its recipe (the same draws)?"""
    plain = View(view.size, view.scale, {**view.recipe, **off})
    return (aug(x, view, draws) - aug(x, plain, draws)).flatten(1).abs().amax(dim=1) > 1e-6


def test_byols_two_views_differ_in_blur_and_solarisation_as_in_its_paper() -> None:
    """BYOL, appendix B: view 1 always blurred and never solarised, view 2 blurred with p 0.1 and solarised with
    p 0.2. Counted on the drawn outputs of 3,000 images (each op's effect found by switching it off)."""
    from core.backbones import create_backbone
    from methods import create_method
    from tests.helpers.method_params import SMALL

    views = create_method("byol", create_backbone("test_resnet", in_chans=3, img_size=16), **SMALL["byol"]).views(16)
    x = _images(batch=3000, side=16, seed=1)
    aug = Augmenter(_cfg(blur_sigma=(1.0, 2.0)), MEAN, STD)
    draws = A.KeyedDraws(key=11, indices=torch.arange(3000), step=0)
    blurred = [float(_changed(aug, x, v, {"blur_p": 0.0}, draws.view(i)).float().mean()) for i, v in enumerate(views)]
    solarised = [float(_changed(aug, x, v, {"solarize_p": 0.0}, draws.view(i)).float().mean()) for i, v in enumerate(views)]
    assert blurred[0] == 1.0 and blurred[1] == pytest.approx(0.1, abs=0.02)
    assert solarised[0] == 0.0 and solarised[1] == pytest.approx(0.2, abs=0.025)


def test_yaml_overrides_one_views_recipe_over_the_methods() -> None:
    from core.views import override_views
    from harness.config.loading import build_config
    from methods.base import asymmetric_views

    cfg = build_config({"augment": {"views": [{}, {"solarize_p": 1.0, "hue": 0.2}]}})
    first, second = override_views(asymmetric_views(16), cfg.augment.views)
    assert first.recipe == {"blur_p": 1.0, "solarize_p": 0.0}  # an empty entry leaves the method's view as it is
    assert second.recipe == {"blur_p": 0.1, "solarize_p": 1.0, "hue": 0.2}
    aug = Augmenter(cfg.augment, MEAN, STD)
    assert aug.recipe(second).solarize_p == 1.0 and aug.recipe(second).brightness == cfg.augment.brightness
    with pytest.raises(ValueError, match="augment.views has 3 entries but the method has 2 views"):
        override_views(asymmetric_views(16), [{}, {}, {}])


@pytest.mark.parametrize(
    "views,message",
    [
        ([{"blurp": 1.0}], r"augment.views: entry 0: view recipe: unknown key 'blurp'; accepted: hflip_p, .*solarize_p"),
        ([{}, {"solarize_p": 2.0}], r"augment.views: entry 1: view recipe: solarize_p must be a probability in \[0, 1\], got 2.0"),
    ],
)
def test_a_bad_view_override_is_a_config_error_naming_it(views: list, message: str) -> None:
    from core.errors import ConfigError
    from harness.config.loading import build_config

    with pytest.raises(ConfigError, match=message):
        build_config({"augment": {"views": views}})
