"""Reconstruction methods: the masked MSE, MAE's masking and encoder, the (denoising) autoencoder's corruption and
loss, and their bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.backbones import create_backbone, spatial_features, vit_parts
from core.contract import StepInfo
from core.errors import ConfigError
from harness.cli import main
from harness.config.loading import build_config
from harness.data.datasets import load_dataset
from methods import create_method
from methods.autoencoder import corrupt, reconstruction_loss
from methods.mae import masked_mse, normalize_patches, patchify, random_masking
from tests.helpers.method_params import small_backbone_spec, small_params
from tests.helpers.runs import REPO

SMALL_DECODER = small_params("mae")
"""MAE's small decoder (tests/helpers/method_params.py)."""


def tiny_vit(img_size: int = 16, **kwargs) -> torch.nn.Module:
    """MAE's small test ViT (``"_backbone"`` entry in tests/helpers/method_params.py), ``kwargs`` overriding its settings."""
    spec = small_backbone_spec("mae")
    return create_backbone(spec.pop("name"), in_chans=3, img_size=img_size, **{**spec, **kwargs})


# ----------------------------------------------------------------------------- masked MSE and masking


def test_masked_mse_ignores_visible_patches_and_matches_a_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 16, 12, generator=g), torch.randn(3, 16, 12, generator=g)
    _, mask, _ = random_masking(3, 16, 0.75, generator=g)
    loss = masked_mse(pred, target, mask)
    visible = (mask == 0)[..., None]
    changed = masked_mse(pred + 5 * visible * torch.randn(pred.shape, generator=g), target - 3 * visible, mask)
    assert changed.item() == loss.item()  # exactly: visible patches do not enter the loss
    p, t, m = pred.numpy(), target.numpy(), mask.numpy()
    by_hand = [np.mean((p[i, j] - t[i, j]) ** 2) for i in range(3) for j in range(16) if m[i, j] == 1]
    assert len(by_hand) == 3 * 12
    assert loss.item() == pytest.approx(float(np.mean(by_hand)), rel=1e-6)


@pytest.mark.parametrize("ratio,length", [(0.75, 16), (0.5, 64), (0.3, 10), (0.9, 49)])
def test_random_masking_masks_exactly_round_ratio_l_per_sample(ratio: float, length: int) -> None:
    n = 8
    ids_keep, mask, ids_restore = random_masking(n, length, ratio, generator=torch.Generator().manual_seed(1))
    num_masked = round(ratio * length)
    assert mask.shape == (n, length) and ids_keep.shape == (n, length - num_masked)
    assert mask.sum(dim=1).tolist() == [num_masked] * n
    assert len({tuple(row.tolist()) for row in mask}) == n  # a different mask per sample
    assert (mask.gather(1, ids_keep) == 0).all()  # the kept positions are the visible ones
    tokens = torch.arange(n * length).reshape(n, length)
    masked = torch.stack([row[m == 1] for row, m in zip(tokens, mask)])
    shuffled = torch.cat([tokens.gather(1, ids_keep), masked], dim=1)
    torch.testing.assert_close(shuffled.gather(1, ids_restore).sort(dim=1).values, tokens)
    # ids_restore inverts the shuffle itself: kept first, then the masked ones in shuffle order
    ids_shuffle = ids_restore.argsort(dim=1)
    torch.testing.assert_close(tokens.gather(1, ids_shuffle).gather(1, ids_restore), tokens)
    torch.testing.assert_close(ids_shuffle[:, : length - num_masked], ids_keep)


def test_norm_pix_target_has_zero_mean_and_unit_variance_per_patch() -> None:
    target = 3 + 2 * torch.randn(4, 16, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    normed = normalize_patches(target)
    torch.testing.assert_close(normed.mean(-1), torch.zeros(4, 16, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(normed.var(-1), torch.ones(4, 16, dtype=torch.float64), atol=1e-5, rtol=0)  # eps 1e-6 on var ~4


def test_patchify_order_is_row_major_with_pixels_as_p_p_c() -> None:
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # patch 1 = top-right block; its element (row 2, col 3, channel 1) at index (2 * 4 + 3) * 3 + 1
    assert patches[1, 1, (2 * 4 + 3) * 3 + 1] == images[1, 1, 2, 4 + 3]


def test_a_perfect_reconstruction_gives_zero() -> None:
    x = torch.randn(2, 3, 8, 8)
    assert reconstruction_loss(x, x).item() == 0.0
    target = patchify(x, 4)
    _, mask, _ = random_masking(2, 4, 0.5)
    assert masked_mse(target, target, mask).item() == 0.0
    assert reconstruction_loss(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 3.0)).item() == 9.0


# ----------------------------------------------------------------------------- the denoising corruption


def test_corruption_has_the_configured_std_and_masking_fraction() -> None:
    n = 1_000_000
    x = torch.randn(10, 1, 100, 1000, generator=torch.Generator().manual_seed(3))
    noisy = corrupt(x, noise_std=0.3, generator=torch.Generator().manual_seed(4))
    assert (noisy - x).std().item() == pytest.approx(0.3, abs=5 * 0.3 / math.sqrt(2 * n))
    masked = corrupt(x, mask_prob=0.25, generator=torch.Generator().manual_seed(5))
    zeroed = masked == 0
    assert zeroed.float().mean().item() == pytest.approx(0.25, abs=5 * math.sqrt(0.25 * 0.75 / n))
    torch.testing.assert_close(masked[~zeroed], x[~zeroed])  # the rest is untouched
    both = corrupt(x, noise_std=0.3, mask_prob=0.25, generator=torch.Generator().manual_seed(6))
    kept = both != 0
    assert 1 - kept.float().mean().item() == pytest.approx(0.25, abs=5 * math.sqrt(0.25 * 0.75 / n))
    assert (both - x)[kept].std().item() == pytest.approx(0.3, abs=5 * 0.3 / math.sqrt(2 * 0.75 * n))


@pytest.mark.parametrize("params", [{"noise_std": 0.5, "mask_prob": 0.0}, {"mask_prob": 0.3}, {"noise_std": 0.2, "mask_prob": 0.1}])
def test_denoising_loss_is_against_the_clean_image(params: dict) -> None:
    data = load_dataset("shapes", image_size=16, num_train=8, num_test=4, seed=0)
    method = create_method("denoising_autoencoder", create_backbone("test_resnet", in_chans=3, img_size=16), decoder_width=16, **params)
    method.setup(data)
    method.reconstruct = lambda x: x  # an identity network: the loss is the corruption's energy
    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(7)
    loss = method.training_step([x], StepInfo(0, 0, 1)).loss
    torch.manual_seed(7)
    noise = corrupt(x, **{"noise_std": 0.0, **params}) - x
    assert loss.item() == pytest.approx((noise**2).mean().item(), rel=1e-6) and loss.item() > 0
    plain = create_method("autoencoder", create_backbone("test_resnet", in_chans=3, img_size=16), decoder_width=16)
    plain.reconstruct = lambda x: x
    assert plain.training_step([x], StepInfo(0, 0, 1)).loss.item() == 0.0


# ----------------------------------------------------------------------------- decoders and encoders


@pytest.mark.parametrize("backbone,size", [("test_resnet", 16), ("test_resnet", 28), ("vit", 16), ("vit", 8)])
def test_autoencoder_reconstructs_at_the_input_size(backbone: str, size: int) -> None:
    data = load_dataset("shapes", image_size=size, num_train=4, num_test=2, seed=0)
    net = tiny_vit(size) if backbone == "vit" else create_backbone("test_resnet", in_chans=3, img_size=size)
    method = create_method("autoencoder", net, decoder_width=16)
    method.setup(data)
    x = torch.randn(2, 3, size, size)
    assert method.reconstruct(x).shape == x.shape
    assert method.from_map == (spatial_features(net, x) is not None) == (backbone != "vit")
    assert method.embed(x).shape == (2, net.num_features) and method.project(method.embed(x)) is None


def test_mae_encoder_sees_only_the_visible_patches() -> None:
    backbone = tiny_vit(16)
    method = create_method("mae", backbone, mask_ratio=0.75, **SMALL_DECODER)
    seen: list[int] = []
    backbone.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    x = torch.randn(3, 3, 16, 16)
    out = method.training_step([x], StepInfo(0, 0, 1))
    assert seen == [1 + 16 - 12]  # the class token and the 4 visible patches
    assert torch.isfinite(out.loss)
    method.eval()
    rep = method.embed(x)
    assert seen[-1] == 1 + 16  # evaluation: every patch
    torch.testing.assert_close(rep, backbone(x))  # cls pooling is timm's own forward (global_pool='token')
    trunk, dim = method.trunk(0)
    torch.testing.assert_close(trunk(x), rep)
    assert dim == backbone.num_features
    mean = create_method("mae", backbone, pool="mean", **SMALL_DECODER)
    torch.testing.assert_close(mean.embed(x), backbone.forward_features(x)[:, 1:].mean(1))


def test_mae_decoder_gets_prefix_tokens_from_register_and_no_embed_class_vits() -> None:
    backbone = tiny_vit(16, reg_tokens=2, no_embed_class=True)
    assert vit_parts(backbone).num_prefix_tokens == 3
    method = create_method("mae", backbone, **SMALL_DECODER)
    x = torch.randn(2, 3, 16, 16)
    assert torch.isfinite(method.training_step([x], StepInfo(0, 0, 1)).loss)
    method.eval()
    torch.testing.assert_close(method.embed(x), backbone(x))


# ----------------------------------------------------------------------------- bad input


def test_mae_refuses_a_non_vit_backbone() -> None:
    with pytest.raises(ConfigError, match=r"^backbone.name: method mae needs a timm ViT \(vit_\*\), got 'test_resnet'$"):
        create_method("mae", create_backbone("test_resnet", in_chans=3, img_size=16))


def test_mae_refuses_an_image_size_not_divisible_by_the_patch_size() -> None:
    with pytest.raises(ConfigError, match=r"^data.image_size: 30 px images do not split into 4 px ViT patches \(backbone.kwargs.patch_size\)"):
        create_method("mae", tiny_vit(30), **SMALL_DECODER)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mae_mask_ratio_outside_0_1_is_a_config_error(ratio: float) -> None:
    with pytest.raises(ConfigError, match=r"^method.mask_ratio: "):
        build_config({"method": {"name": "mae", "mask_ratio": ratio}})


def test_mae_refuses_a_ratio_that_masks_all_or_no_patches_and_a_bad_decoder() -> None:
    with pytest.raises(ConfigError, match=r"^method.mask_ratio: 0.99 of 16 patches masks 16"):
        create_method("mae", tiny_vit(16), mask_ratio=0.99, **SMALL_DECODER)
    with pytest.raises(ConfigError, match=r"^method.mask_ratio: 0.75 of 1 patches"):  # 16 px at patch 16: one patch
        create_method("mae", tiny_vit(16, patch_size=16), **SMALL_DECODER)
    with pytest.raises(ConfigError, match=r"^method.decoder_heads: must divide method.decoder_dim 32"):
        build_config({"method": {"name": "mae", "decoder_dim": 32, "decoder_heads": 3}})
    with pytest.raises(ConfigError, match=r"^method.pool: 'cls' needs a class token"):
        create_method("mae", tiny_vit(16, class_token=False, global_pool="avg"), **SMALL_DECODER)


def test_denoising_without_any_corruption_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^method.mask_prob: noise_std and mask_prob are both 0"):
        build_config({"method": {"name": "denoising_autoencoder", "mask_prob": 0}})
    with pytest.raises(ConfigError, match=r"^method.mask_prob: "):
        build_config({"method": {"name": "denoising_autoencoder", "mask_prob": 1.0}})


def test_cli_mae_on_a_resnet_exits_2_with_one_line(tracking_uri, capsys) -> None:
    config = str(REPO / "configs" / "simclr_shapes.yaml")
    small = ["data.num_train=128", "data.num_test=32", "eval.semi.enabled=false", "device=cpu"]  # quick to load; the error comes before training
    code = main(["-q", "run", config, "method=mae", "backbone.name=test_resnet", *small])
    _, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert lines == ["error: backbone.name: method mae needs a timm ViT (vit_*), got 'test_resnet'"], err
