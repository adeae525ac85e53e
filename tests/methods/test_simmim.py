"""SimMIM: its loss against a hand computation and blind to unmasked patches, the encoder blind to masked pixels,
and its bad input. The registry-wide contract and the monitor's every-method test cover the rest."""

from __future__ import annotations

import pytest
import torch

from core.backbones import create_backbone
from harness.cli import main
from methods import create_method
from methods.simmim import masked_l1
from methods.vit import patchify
from tests.helpers.runs import CONFIG

VIT = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def test_masked_l1_is_the_mean_absolute_error_of_the_masked_pixels_only() -> None:
    pred = torch.tensor([[[1.0, 2.0], [5.0, 5.0], [0.0, -1.0]]])
    target = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    assert masked_l1(pred, target, mask).item() == pytest.approx((1 + 2 + 1 + 2) / 4)  # 2 masked patches x 2 pixels
    changed = pred.clone()
    changed[0, 1] = 100.0  # the unmasked patch
    assert masked_l1(changed, target, mask).item() == masked_l1(pred, target, mask).item()


def test_the_encoder_sees_no_pixel_of_a_masked_patch() -> None:
    torch.manual_seed(0)
    method = create_method("simmim", create_backbone("vit_tiny_patch16_224", in_chans=3, img_size=16, **VIT))
    method.eval()
    images = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16)
    mask[:, [0, 5, 15]] = 1.0  # patch 5: rows 4-7, columns 4-7
    noisy = images.clone()
    noisy[:, :, 4:8, 4:8] += 10.0
    with torch.no_grad():
        assert torch.equal(method.reconstruct(images, mask), method.reconstruct(noisy, mask))
        unmasked = method.reconstruct(noisy, torch.zeros(2, 16))
        assert not torch.allclose(unmasked, method.reconstruct(images, torch.zeros(2, 16)))
    target = patchify(images, 4)
    assert target.shape == (2, 16, 48) and torch.equal(
        target[:, 5], images[:, :, 4:8, 4:8].permute(0, 2, 3, 1).reshape(2, 48)
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method.mask_ratio=1.0"], "error: method.mask_ratio: "),
        (["method.mask_ratio=0"], "error: method.mask_ratio: "),
        (
            ["backbone.name=test_resnet"],
            "error: backbone.name: method simmim needs a timm ViT (vit_*), got 'test_resnet'",
        ),
    ],
)
def test_bad_simmim_settings_are_one_line_exit_2(unmade_tracking_uri, capsys, overrides, message) -> None:
    small = ["data.num_train=128", "data.num_test=32", "eval.semi.enabled=false", "device=cpu"]
    code = main(["-q", "run", CONFIG, "method=simmim", *small, *overrides])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(message), lines
