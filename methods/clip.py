"""CLIP: Learning Transferable Visual Models From Natural Language Supervision (Radford et al., ICML 2021).

An image tower (the run's timm backbone + a linear projection) and a text tower (a small
transformer + a linear projection) map images and their captions into one space; the
symmetric InfoNCE loss over the batch matches each image with its own caption and each
caption with its own image, at a learned temperature. Captions come from the data
(:mod:`harness.captions`): each step takes one caption per image, a random template each.
Evaluation embeds images with the image tower (``embed``: backbone features, so the
battery runs as for every method) and adds zero-shot classification and image<->text
retrieval through ``encode_text`` (see :func:`harness.run.cross_modal`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import Field

from harness.augment import ViewSpec
from methods import register
from methods.base import Method, StepInfo, StepOutput
from methods.distributed import gather
from methods.text_tower import CaptionBank, TextTower, TextTowerParams, caption_bank

if TYPE_CHECKING:
    from harness.datasets import DataSplits


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric cross entropy over the batch (CLIP's pseudocode, Radford et al. 2021, figure 3).

    ``logits = logit_scale * I @ T^T`` on L2-normalised features (normalised here; a no-op for
    normalised inputs); ``(CE(logits, arange) + CE(logits^T, arange)) / 2``. ``logit_scale`` is the
    multiplier exp(t), as in OpenCLIP's ``ClipLoss``. Collapsed features give ``log N``.

    image_features, text_features: (N, D), row i of each from the same pair.
    """
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(f"image and text features must both be (N, D), got {tuple(image_features.shape)} and {tuple(text_features.shape)}")
    image, text = F.normalize(image_features.float(), dim=1), F.normalize(text_features.float(), dim=1)
    logits = logit_scale * image @ text.T
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


class CLIPParams(TextTowerParams):
    embed_dim: int = Field(512, ge=1, description="joint embedding size (CLIP ViT-B/32: 512)")
    init_temperature: float = Field(0.07, gt=0, description="the logit scale starts at log(1 / 0.07)")
    max_logit_scale: float = Field(100.0, gt=1, description="exp(t) is clamped at 100")
    text_dropout: float = Field(0.0, ge=0, lt=1, description="CLIP trains without dropout")
    gather: bool = Field(True, description="with several workers, contrast against the global batch (false: each worker's own batch)")


@register
class CLIP(Method):
    name = "clip"
    Params = CLIPParams
    uses_negatives = True
    networks = 2
    loss_name = "symmetric InfoNCE (image-text)"
    paper = "Radford et al. 2021, Learning Transferable Visual Models From Natural Language Supervision"

    params: CLIPParams
    text: TextTower
    text_projection: torch.nn.Linear
    captions: CaptionBank

    def __init__(self, backbone: torch.nn.Module, params: CLIPParams) -> None:
        super().__init__(backbone, params)
        self.projector = torch.nn.Linear(backbone.num_features, params.embed_dim, bias=False)  # the image projection
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / params.init_temperature)))

    def setup(self, data: DataSplits) -> None:
        """Build the text tower on the data's vocabulary and tokenise the training captions."""
        p = self.params
        self.tokenizer, self.captions = caption_bank(data, p.context_length, self.name)
        self.text = TextTower(len(self.tokenizer), p.context_length, p.text_width, p.text_layers, p.text_heads, p.text_dropout, p.pooling)
        self.text_projection = torch.nn.Linear(p.text_width, p.embed_dim, bias=False)

    def views(self, image_size: int) -> list[ViewSpec]:
        """One view of each image: its caption is the other side of the pair."""
        return [ViewSpec(image_size)]

    def scale(self) -> torch.Tensor:
        """The effective logit scale exp(t), t clamped at log(max_logit_scale)."""
        return self.logit_scale.clamp(max=math.log(self.params.max_logit_scale)).exp()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids (B, context_length) of ``texts`` for :meth:`encode_text`."""
        return self.tokenizer.encode(texts, self.params.context_length)[0]

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text features in the joint space (not normalised): token ids (B, L) -> (B, embed_dim)."""
        return self.text_projection(self.text(tokens.to(self.text_projection.weight.device)))

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        if step.indices is None:
            raise ValueError("CLIP needs step.indices, the batch's rows in the training split, to find their captions")
        (x,) = views
        image = self.projector(self.backbone(x))
        text = self.encode_text(self.captions.sample(step.indices))
        if self.params.gather:
            image, text = gather(image), gather(text)
        scale = self.scale()
        return StepOutput(clip_loss(image, text, scale), {"logit_scale": scale.detach()})

    @torch.no_grad()
    def after_step(self, step: StepInfo) -> None:
        """Keep t at or below log(max_logit_scale), as CLIP's training code does after each step."""
        self.logit_scale.clamp_(max=math.log(self.params.max_logit_scale))
