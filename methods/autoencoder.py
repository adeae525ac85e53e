"""Autoencoder and denoising autoencoder (Vincent et al., ICML 2008, "Extracting and Composing Robust Features with
Denoising Autoencoders").

The encoder is the backbone; a light convolutional decoder maps its last feature map (convolutional nets) or,
for models whose features are tokens (ViTs), its pooled vector through a linear layer onto a 4x4 grid, back to
the input's channels and size. The target is the *normalised* input view (the augmented image after mean/std
normalisation), the loss the MSE over all of its values. The denoising variant corrupts the input (masking
noise, additive Gaussian noise) and compares the reconstruction with the clean view. The representation for
evaluation is the pooled encoder output, ``backbone(x)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from core.backbones import spatial_features
from core.contract import MethodParams, StepInfo, StepOutput, feature_dim
from core.splits import DataSplits
from core.views import View
from evaluations.features import eval_mode
from methods import register
from methods.base import Method

TOKEN_GRID = 4
"""Side of the grid a token model's pooled vector is mapped onto before upsampling."""


def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mean((x_hat - x)^2)`` over every value (the PROTOCOLS' ||x - x'||^2, averaged rather than summed);
    a perfect reconstruction gives 0. x_hat, x: (B, C, H, W); computed in float32."""
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat and x must have the same shape, got {tuple(x_hat.shape)} and {tuple(x.shape)}")
    return F.mse_loss(x_hat.float(), x.float())


def corrupt(
    x: torch.Tensor, noise_std: float = 0.0, mask_prob: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Additive Gaussian noise of std ``noise_std``, then masking noise: each value (each channel of each pixel)
    set to 0 with probability ``mask_prob`` (Vincent et al. 2008). In normalised units, so 0 is the dataset's
    mean colour. Drawn from ``generator``, by default torch's global RNG (the training loop seeds it per epoch)."""
    out = x
    if noise_std > 0:
        out = out + noise_std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if mask_prob > 0:
        keep = torch.rand(x.shape, generator=generator, device=x.device) >= mask_prob
        out = out * keep
    return out


class ConvDecoder(nn.Module):
    """(B, C_in, s, s) -> (B, C_out, S, S): a 1x1 conv to ``width`` channels, ceil(log2(S / s)) stride-2 transposed
    convs (4x4 kernels, ReLU, halving the width, not below 16), a 3x3 conv to ``C_out``, and a bilinear resize when
    S / s is not a power of two."""

    def __init__(self, in_channels: int, in_size: int, out_channels: int, out_size: int, width: int) -> None:
        super().__init__()
        self.out_size = out_size
        stages = max(0, math.ceil(math.log2(out_size / in_size)))
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 1), nn.ReLU(inplace=True)]
        dim = width
        for _ in range(stages):
            nxt = max(dim // 2, min(dim, 16))
            layers += [nn.ConvTranspose2d(dim, nxt, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
            dim = nxt
        layers.append(nn.Conv2d(dim, out_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.layers(z)
        if x.shape[-1] != self.out_size or x.shape[-2] != self.out_size:
            x = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return x


class AutoencoderParams(MethodParams):
    decoder_width: int = Field(
        128, ge=1, description="channels of the decoder's first layer (halved per upsampling, down to 16)"
    )


class DenoisingAutoencoderParams(AutoencoderParams):
    noise_std: float = Field(
        0.0,
        ge=0,
        description=(
            "std of additive isotropic Gaussian noise, in normalised units (Vincent et al., JMLR 2010); 0 = off"
        ),
    )
    mask_prob: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="probability of zeroing each input value (masking noise, Vincent et al. 2008; 0.25 mid-range)",
    )

    @field_validator("mask_prob")
    @classmethod
    def _some_corruption(cls, v: float, info: ValidationInfo) -> float:
        if v == 0 and info.data.get("noise_std", 0.0) == 0:
            raise ValueError(
                "noise_std and mask_prob are both 0, which is no corruption; set one > 0 or use method autoencoder"
            )
        return v


@register
class Autoencoder(Method):
    name = "autoencoder"
    Params = AutoencoderParams
    uses_negatives = False
    networks = 1
    loss_name = "MSE reconstruction"
    paper = "Hinton and Salakhutdinov, Science 2006; Vincent et al., ICML 2008"

    params: AutoencoderParams

    def __init__(self, backbone: nn.Module, params: AutoencoderParams) -> None:
        super().__init__(backbone, params)
        self.from_map = True
        self.lift: nn.Module = nn.Identity()
        self.decoder: nn.Module | None = None

    def setup(self, data: DataSplits) -> None:
        """Build the decoder for the dataset's image size and channels, from one dry run of the backbone."""
        size, channels, width = data.image_size, data.channels, self.params.decoder_width
        device = next(self.backbone.parameters()).device
        with eval_mode(self.backbone), torch.no_grad():
            fmap = spatial_features(self.backbone, torch.zeros(1, channels, size, size, device=device))
        self.from_map = fmap is not None
        if fmap is not None:
            self.lift = nn.Identity()
            self.decoder = ConvDecoder(fmap.shape[1], fmap.shape[-1], channels, size, width).to(device)
        else:  # tokens: the pooled vector, through a linear layer, onto a small grid
            grid = min(TOKEN_GRID, size)
            lift = nn.Sequential(
                nn.Linear(feature_dim(self.backbone), width * grid * grid),
                nn.ReLU(inplace=True),
                nn.Unflatten(1, (width, grid, grid)),
            )
            self.lift = lift.to(device)
            self.decoder = ConvDecoder(width, grid, channels, size, width).to(device)

    def views(self, image_size: int) -> list[View]:
        return [View(image_size)]

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W): encoder then decoder."""
        if self.decoder is None:
            raise RuntimeError(f"{self.name}: call setup(data) before training (the decoder is sized from the data)")
        z = spatial_features(self.backbone, x) if self.from_map else self.backbone(x)
        return self.decoder(self.lift(z))

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input; the plain autoencoder sees the clean view."""
        return x

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        x = views[0]
        return StepOutput(reconstruction_loss(self.reconstruct(self.corrupt(x)), x))


@register
class DenoisingAutoencoder(Autoencoder):
    name = "denoising_autoencoder"
    Params = DenoisingAutoencoderParams
    paper = "Vincent et al., ICML 2008, Extracting and Composing Robust Features with Denoising Autoencoders"

    params: DenoisingAutoencoderParams

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        return corrupt(x, self.params.noise_std, self.params.mask_prob)
