"""SimCSE: Simple Contrastive Learning of Sentence Embeddings (Gao, Yao & Chen, EMNLP 2021), unsupervised.

A text method: the same caption passes through the text tower twice, and the two dropout
masks are its only augmentation; the other captions of the batch are the negatives. The
captions are the data's own (:mod:`harness.captions`), one per item per step, a random
template each. ``setup`` replaces the image backbone the run builds with the text tower,
so ``self.backbone`` is the text tower and ``embed`` takes token ids (:meth:`SimCSE.tokenize`);
the run embeds each split's captions for the battery, labelled by the item's class
(``modality = "text"``, see :func:`harness.run.split_inputs`). Semi-supervised fine-tuning of
an image backbone does not apply and is refused before training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import Field

from harness.augment import ViewSpec
from harness.errors import ConfigError
from methods import register
from methods.base import Method, StepInfo, StepOutput
from methods.distributed import gather
from methods.text_tower import CaptionBank, TextTower, TextTowerParams, caption_bank

if TYPE_CHECKING:
    from harness.datasets import DataSplits


def simcse_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """InfoNCE with dropout positives (SimCSE eq. 1): ``CE(cos(z1_i, z2_j) / T, arange)``.

    The N candidates of anchor z1_i are the second pass only (z2_j); T = 0.05 in the paper.
    Collapsed embeddings give ``log N``.

    z1, z2: (N, D), the two passes of the same N sentences.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    logits = F.normalize(z1.float(), dim=1) @ F.normalize(z2.float(), dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(z1.shape[0], device=z1.device))


class SimCSEParams(TextTowerParams):
    temperature: float = Field(0.05, gt=0, description="SimCSE: 0.05")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout of the text tower, the augmentation (BERT's 0.1, as in SimCSE)")
    gather: bool = Field(True, description="with several workers, contrast against the global batch (false: each worker's own batch)")


@register
class SimCSE(Method):
    name = "simcse"
    Params = SimCSEParams
    modality = "text"
    uses_negatives = True
    networks = 1
    loss_name = "InfoNCE (dropout positives)"
    paper = "Gao, Yao & Chen 2021, SimCSE: Simple Contrastive Learning of Sentence Embeddings"

    params: SimCSEParams
    captions: CaptionBank

    def setup(self, data: DataSplits) -> None:
        """Build the text tower on the data's vocabulary (it becomes ``self.backbone``) and tokenise the training captions."""
        p = self.params
        self.tokenizer, self.captions = caption_bank(data, p.context_length, self.name)
        self.backbone = TextTower(len(self.tokenizer), p.context_length, p.text_width, p.text_layers, p.text_heads, p.dropout, p.pooling)

    def views(self, image_size: int) -> list[ViewSpec]:
        """No image views: the positives come from dropout."""
        return []

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids (B, context_length) of ``texts``: what ``embed`` takes."""
        return self.tokenizer.encode(texts, self.params.context_length)[0]

    def two_passes(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same token ids (B, L) through the tower twice, in one batch of 2B: two dropout masks per caption."""
        z = self.backbone(tokens.repeat(2, 1))
        return z[: tokens.shape[0]], z[tokens.shape[0] :]

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        if step.indices is None:
            raise ValueError("SimCSE needs step.indices, the batch's rows in the training split, to find their captions")
        z1, z2 = self.two_passes(self.captions.sample(step.indices))
        if self.params.gather:
            z1, z2 = gather(z1), gather(z2)
        return StepOutput(simcse_loss(z1, z2, self.params.temperature))

    def trunk(self, projector_layers: int = 0) -> tuple[torch.nn.Module, int]:
        raise ConfigError(f"eval.semi.enabled: method {self.name!r} learns text embeddings; semi-supervised fine-tuning of an image backbone does not apply: set eval.semi.enabled=false")
