"""CMC: the RGB -> CIELAB conversion against known colours, the cross-view loss against a loop and
closed forms, the L/ab encoders' inputs, the concatenated representation, and the refusal of
images without colour."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.backbones import create_backbone
from core.contract import StepInfo
from core.errors import BadInput, ConfigError
from harness.config.loading import build_config
from harness.config.schema import AugmentConfig
from harness.data.augment import Augmenter
from harness.data.datasets import load_dataset
from harness.trial.prepare import prepare
from methods import create_method, taxonomy
from methods.cmc import LAB_CENTER, LAB_HALF_RANGE, SplitEncoder, cmc_loss, rgb_to_lab
from tests.helpers.method_params import small_params

SMALL = small_params("cmc")
"""CMC's small heads (tests/helpers/method_params.py)."""

# sRGB colour -> CIE L*a*b* (D65), the usual published values (e.g. scikit-image's rgb2lab)
KNOWN = [
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),
    ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
    ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),
    ((1.0, 0.0, 1.0), (60.3199, 98.2343, -60.8249)),
    ((1.0, 1.0, 0.0), (97.1393, -21.5537, 94.4780)),
    ((0.5, 0.5, 0.5), (53.3890, 0.0, 0.0)),
]


def _image(colour: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(colour).view(1, 3, 1, 1).expand(1, 3, 2, 2)


@pytest.mark.parametrize("rgb,lab", KNOWN)
def test_rgb_to_lab_known_colours(rgb, lab) -> None:
    out = rgb_to_lab(_image(rgb))
    assert out.shape == (1, 3, 2, 2)
    np.testing.assert_allclose(out[0, :, 0, 0].numpy(), lab, atol=0.01)


def _lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """The inverse, written independently from the CIE definitions: (..., 3) L*a*b* -> (..., 3) sRGB."""
    m = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], -1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * m.sum(1)
    linear = xyz @ np.linalg.inv(m).T
    return np.where(linear > 0.0031308, 1.055 * np.abs(linear) ** (1 / 2.4) - 0.055, 12.92 * linear)


def test_rgb_to_lab_round_trip_and_greys() -> None:
    rgb = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    lab = rgb_to_lab(rgb).double().permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(_lab_to_rgb(lab), rgb.double().permute(0, 2, 3, 1).numpy(), atol=1e-4)
    greys = rgb_to_lab(torch.linspace(0, 1, 11).view(11, 1, 1, 1).expand(11, 3, 1, 1))
    assert torch.all(greys[:, 1:].abs() < 1e-3)  # no colour in greys
    assert torch.all(torch.diff(greys[:, 0].flatten()) > 0)  # L rises with the grey level


def test_cmc_constants_map_the_srgb_gamut_onto_minus_one_one() -> None:
    corners = torch.tensor([[r, g, b] for r in (0.0, 1.0) for g in (0.0, 1.0) for b in (0.0, 1.0)]).view(8, 3, 1, 1)
    lab = (rgb_to_lab(corners) - torch.tensor(LAB_CENTER).view(1, 3, 1, 1)) / torch.tensor(LAB_HALF_RANGE).view(1, 3, 1, 1)
    lo, hi = lab.amin(dim=(0, 2, 3)), lab.amax(dim=(0, 2, 3))
    torch.testing.assert_close(lo, -torch.ones(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(hi, torch.ones(3), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- the loss


def test_cmc_loss_against_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    z_l, z_ab = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    a, b = F.normalize(z_l, dim=1), F.normalize(z_ab, dim=1)
    t = 0.2
    expected = 0.0
    for i in range(6):
        l_anchor = torch.stack([a[i] @ b[j] for j in range(6)]) / t
        ab_anchor = torch.stack([b[i] @ a[j] for j in range(6)]) / t
        expected += (-torch.log_softmax(l_anchor, 0)[i] - torch.log_softmax(ab_anchor, 0)[i]).item() / 6
    assert cmc_loss(z_l, z_ab, t).item() == pytest.approx(expected, rel=1e-5)


def test_cmc_loss_closed_forms() -> None:
    for n in (2, 8, 64):
        collapsed = torch.ones(n, 4)
        assert cmc_loss(collapsed, 3 * collapsed, 0.07).item() == pytest.approx(2 * math.log(n), rel=1e-5)  # log N per direction
    eye = torch.eye(4)
    assert cmc_loss(eye, eye, 0.01).item() == pytest.approx(0.0, abs=1e-6)  # aligned, orthogonal
    with pytest.raises(ValueError, match="temperature"):
        cmc_loss(eye, eye, 0.0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        cmc_loss(eye, eye[:3], 0.1)


# ----------------------------------------------------------------------------- the method


@pytest.fixture(scope="module")
def tiny_shapes():
    return load_dataset("shapes", image_size=16, num_train=16, num_test=8, seed=0)


def _cmc(data):
    factory = functools.partial(create_backbone, "test_resnet", img_size=data.image_size)
    method = create_method("cmc", factory(in_chans=data.channels), backbone_factory=factory, **SMALL)
    method.setup(data)
    return method


def test_the_encoders_see_one_and_two_channels(tiny_shapes) -> None:
    torch.manual_seed(0)
    method = _cmc(tiny_shapes)
    assert isinstance(method.backbone, SplitEncoder)
    seen: dict[str, tuple[int, ...]] = {}
    for name in ("l_encoder", "ab_encoder"):
        getattr(method.backbone, name).register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, tuple(args[0].shape)))
    augmenter = Augmenter(AugmentConfig(), tiny_shapes.mean, tiny_shapes.std)
    (spec,) = method.views(16)
    out = method.training_step([augmenter(tiny_shapes.train.images, spec, torch.Generator().manual_seed(0))], StepInfo(0, 0, 1))
    assert torch.isfinite(out.loss)
    assert seen == {"l_encoder": (16, 1, 16, 16), "ab_encoder": (16, 2, 16, 16)}
    assert _in_channels(method.backbone.l_encoder) == 1 and _in_channels(method.backbone.ab_encoder) == 2


def _in_channels(encoder: torch.nn.Module) -> int:
    return next(m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)).in_channels


def test_embed_is_the_concatenation_of_the_two_encoders(tiny_shapes) -> None:
    torch.manual_seed(0)
    method = _cmc(tiny_shapes).eval()
    augmenter = Augmenter(AugmentConfig(), tiny_shapes.mean, tiny_shapes.std)
    images = tiny_shapes.test.images
    x = augmenter.normalize(images)
    # the split undoes the normalisation: L and ab of the raw pixels, standardised by CMC's constants
    lab = rgb_to_lab(images.float() / 255)
    l_view, ab_view = method.backbone.split(x)
    torch.testing.assert_close(l_view, (lab[:, :1] - 50) / 50, atol=1e-4, rtol=0)
    torch.testing.assert_close(ab_view, (lab[:, 1:] - torch.tensor(LAB_CENTER[1:]).view(1, 2, 1, 1)) / torch.tensor(LAB_HALF_RANGE[1:]).view(1, 2, 1, 1), atol=1e-4, rtol=0)
    with torch.no_grad():
        expected = torch.cat([method.backbone.l_encoder(l_view), method.backbone.ab_encoder(ab_view)], dim=1)
    rep = method.embed(x)
    assert rep.shape == (len(images), method.backbone.num_features) and method.backbone.num_features == 2 * 96
    torch.testing.assert_close(rep, expected)
    assert method.project(rep).shape == (len(images), 2 * SMALL["proj_dim"])
    trunk, dim = method.trunk()
    assert trunk is method.backbone and dim == method.backbone.num_features


def test_prepare_builds_both_encoders_from_the_run_backbone() -> None:
    cfg = build_config({"data": {"num_train": 16, "num_test": 8, "image_size": 16}, "backbone": {"name": "test_resnet"}, "method": {"name": "cmc", **SMALL}, "pretrain": {"batch_size": 8}, "eval": {"semi": {"enabled": False}}, "device": "cpu"})
    trial = prepare(cfg)
    encoder = trial.method.backbone
    assert isinstance(encoder, SplitEncoder)
    assert _in_channels(encoder.l_encoder) == 1 and _in_channels(encoder.ab_encoder) == 2
    assert taxonomy("cmc") == {"method": "cmc", "uses_negatives": True, "networks": 2, "loss": "cross-view InfoNCE"}


def test_grey_images_are_refused_naming_the_dataset() -> None:
    cfg = build_config({"data": {"name": "digits", "image_size": 8}, "backbone": {"name": "test_resnet"}, "method": {"name": "cmc", **SMALL}, "eval": {"semi": {"enabled": False}}, "device": "cpu"})
    with pytest.raises(ConfigError, match=r"^data.name: 'digits' has 1-channel images; cmc's L/ab split needs RGB images") as info:
        prepare(cfg)
    assert isinstance(info.value, BadInput) and "\n" not in str(info.value)


def test_setup_without_a_backbone_factory_says_how_to_give_one(tiny_shapes) -> None:
    method = create_method("cmc", create_backbone("test_resnet", img_size=16), **SMALL)
    with pytest.raises(ValueError, match="backbone_factory"):
        method.setup(tiny_shapes)
