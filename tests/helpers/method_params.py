"""Small method parameters for the tests, by method name: heads of a few units, and the backbone a method needs
when the tests' small ResNet will not do (``"_backbone"``). A new method adds its entry here;
``tests/methods/test_methods.py`` fails for a registered method without one.

    spec = small_backbone_spec("mae")                 # {"name": "vit_tiny_patch16_224", "patch_size": 4, ...}
    method = create_method("mae", create_backbone(spec.pop("name"), img_size=16, **spec), **small_params("mae"))
"""

from __future__ import annotations

from typing import Any

CONTRACT_BACKBONE: dict[str, Any] = {"name": "test_resnet"}
"""The backbone the tests build for a method whose entry names none (``"_backbone"``)."""

SMALL: dict[str, dict[str, Any]] = {
    "autoencoder": {"decoder_width": 32},
    "denoising_autoencoder": {"decoder_width": 32, "noise_std": 0.1},
    "barlow_twins": {"proj_hidden_dim": 32, "proj_dim": 32},
    "byol": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
    "clip": {"embed_dim": 16, "text_width": 32, "text_layers": 1, "text_heads": 2, "context_length": 16},
    "cmc": {"proj_hidden_dim": 32, "proj_dim": 16},
    "dcl": {"proj_hidden_dim": 32, "proj_dim": 16},
    "dclw": {"proj_hidden_dim": 32, "proj_dim": 16},
    "dino": {
        "out_dim": 16,
        "hidden_dim": 32,
        "bottleneck_dim": 8,
        "num_local_crops": 2,
        "local_crop_size_ratio": 0.5,  # 16 px test images: 8 px local crops
    },
    "dinov2": {
        "out_dim": 16,
        "patch_out_dim": 16,
        "hidden_dim": 32,
        "bottleneck_dim": 8,
        "num_local_crops": 0,  # local crops need a ViT with dynamic_img_size
        "_backbone": {"name": "vit_tiny_patch16_224", "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},  # a ViT: DINOv2 masks patches
    },
    "ijepa": {
        "pred_dim": 16,
        "pred_depth": 1,
        "pred_heads": 2,
        "_backbone": {"name": "vit_tiny_patch16_224", "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},  # a ViT: I-JEPA masks patches
    },
    "mae": {
        "decoder_dim": 32,
        "decoder_depth": 1,
        "decoder_heads": 2,
        "_backbone": {"name": "vit_tiny_patch16_224", "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},  # a ViT: MAE masks patches
    },
    "lejepa": {
        "proj_hidden_dim": 32,
        "proj_dim": 16,
        "num_slices": 64,
        "num_local_crops": 2,
        "local_crop_size_ratio": 0.5,  # 16 px test images: 8 px local views
    },
    "mmcr": {"proj_hidden_dim": 32, "proj_dim": 16, "num_views": 3, "lmbda": 0.005},  # three views and the local term
    "moco_v2": {"proj_hidden_dim": 32, "proj_dim": 16, "queue_size": 64},
    "moco_v3": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
    "msn": {
        "num_prototypes": 8,
        "proj_hidden_dim": 32,
        "proj_dim": 16,
        "_backbone": {"name": "vit_tiny_patch16_224", "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},  # a ViT: MSN masks patches
    },
    "nnclr": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32, "queue_size": 64},
    "simclr": {"proj_hidden_dim": 32, "proj_dim": 16},
    "simclr_v2": {"proj_hidden_dim": 32, "proj_dim": 16},
    "simcse": {"text_width": 32, "text_layers": 1, "text_heads": 2, "context_length": 16},
    "simmim": {
        "_backbone": {"name": "vit_tiny_patch16_224", "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},  # a ViT: SimMIM masks patches
    },
    "simsiam": {"proj_dim": 32, "pred_hidden_dim": 8},
    "swav": {
        "proj_hidden_dim": 32,
        "proj_dim": 16,
        "num_prototypes": 10,
        "num_small_crops": 2,
        "small_crop_size_ratio": 0.5,  # 16 px test images: 8 px small crops
        "freeze_prototypes_steps": 0,
    },
    "vicreg": {"proj_hidden_dim": 32, "proj_dim": 32, "std_coeff": 1.0},
}


def small_params(name: str, **overrides: Any) -> dict[str, Any]:
    """Method ``name``'s small parameters without the ``_backbone`` entry, updated with ``overrides``."""
    params = {key: value for key, value in SMALL[name].items() if key != "_backbone"}
    return {**params, **overrides}


def small_backbone_spec(name: str) -> dict[str, Any]:
    """The backbone the tests build for method ``name``, ``{"name": timm name, **kwargs}`` (a new dict each call):
    its ``"_backbone"`` entry, else :data:`CONTRACT_BACKBONE`."""
    return {**CONTRACT_BACKBONE, **SMALL[name].get("_backbone", {})}
