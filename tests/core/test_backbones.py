"""timm backbones from several families at small input sizes, the CIFAR stem, and bad names."""

import pytest
import torch

from core.backbones import create_backbone, list_backbones
from core.errors import ConfigError


@pytest.mark.parametrize(
    "name,kwargs,dim",
    [
        ("resnet18", {}, 512),
        ("vit_tiny_patch16_224", {"patch_size": 8}, 192),
        ("convnext_atto", {}, 320),
    ],
)
def test_families_give_pooled_features_with_gradients(name, kwargs, dim):
    torch.manual_seed(0)
    net = create_backbone(name, in_chans=3, img_size=32, **kwargs)
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, dim) == (2, net.num_features)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_vit_takes_image_size_and_patch_size():
    net = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8)
    assert net.patch_embed.img_size == (32, 32)
    assert net.patch_embed.num_patches == 16


def test_in_chans_is_passed_through():
    net = create_backbone("resnet18", in_chans=1)
    assert net.conv1.in_channels == 1
    assert net(torch.randn(2, 1, 16, 16)).shape == (2, 512)


def test_cifar_stem_keeps_resolution_in_the_first_stage():
    net = create_backbone("resnet18", cifar_stem=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity)
    feats = net.forward_features(torch.randn(1, 3, 32, 32))
    assert feats.shape[-1] == 4  # 32 / 8 with the CIFAR stem (32 / 32 = 1 with the ImageNet stem)


@pytest.mark.parametrize("name", ["test_resnet", "resnet10t"])
def test_cifar_stem_on_a_deep_stem_keeps_28_px_at_4x4_in_the_last_stage(name):
    plain, cifar = create_backbone(name, in_chans=1), create_backbone(name, in_chans=1, cifar_stem=True)
    x = torch.randn(2, 1, 28, 28)
    assert plain.forward_features(x).shape[-1] == 1 and cifar.forward_features(x).shape[-1] == 4
    assert cifar.conv1[0].stride == (1, 1) and isinstance(cifar.maxpool, torch.nn.Identity)
    assert cifar.conv1[0].in_channels == 1  # the rest of the stem as it was


def test_cifar_stem_refused_for_models_without_a_resnet_stem():
    with pytest.raises(ConfigError, match="backbone.cifar_stem"):
        create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, cifar_stem=True)


def test_unknown_name_suggests_close_names():
    with pytest.raises(ConfigError, match=r"backbone.name: unknown timm model 'resnet1B'.*resnet18"):
        create_backbone("resnet1B")


def test_bad_kwargs_name_the_key():
    with pytest.raises(ConfigError, match="backbone.kwargs"):
        create_backbone("resnet18", not_an_argument=3)


def test_list_backbones_filters_by_pattern():
    names = list_backbones("resnet1*")
    assert "resnet18" in names and all(n.startswith("resnet1") for n in names)
