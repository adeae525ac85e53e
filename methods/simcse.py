"""SimCSE: Simple Contrastive Learning of Sentence Embeddings (Gao, Yao & Chen, EMNLP 2021), unsupervised.

A text method: the same caption passes through the text tower twice, and the two dropout
masks are its only augmentation; the other captions of the batch are the negatives. The
captions are the data's own (:mod:`methods.captions`), one per item per step, a random
template each. The method builds its own network (``builds_backbone``): ``setup`` makes the
text tower ``self.backbone``, so ``embed`` takes token ids. The battery embeds each split's
first captions, labelled by the item's class (:meth:`SimCSE.evaluation`); the alignment
diagnostic compares two templates of the same item, and the baseline without a network is a
bag of words. Semi-supervised fine-tuning of an image backbone does not apply and is refused
before training.
"""

from __future__ import annotations

import torch
from pydantic import Field

from core.contract import Augment, EvalInputs, Evaluation, Prepare, StepInfo, StepOutput, unchanged
from core.errors import ConfigError
from core.splits import DataSplits, Split
from core.views import View
from methods import register
from methods.distributed import gather
from methods.losses import info_nce
from methods.text_tower import CaptionedMethod, TextTower, TextTowerParams
from methods.tokenizer import word_counts


def simcse_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """InfoNCE with dropout positives (SimCSE eq. 1): ``CE(cos(z1_i, z2_j) / T, arange)``.

    The N candidates of anchor z1_i are the second pass only (z2_j); T = 0.05 in the paper.
    Collapsed embeddings give ``log N``.

    z1, z2: (N, D), the two passes of the same N sentences.
    """
    return info_nce(z1, z2, temperature)


class SimCSEParams(TextTowerParams):
    temperature: float = Field(0.05, gt=0, description="SimCSE: 0.05")
    dropout: float = Field(
        0.1, ge=0, lt=1, description="dropout of the text tower, the augmentation (BERT's 0.1, as in SimCSE)"
    )
    gather: bool = Field(
        True, description="with several workers, contrast against the global batch (false: each worker's own batch)"
    )


@register
class SimCSE(CaptionedMethod):
    name = "simcse"
    Params = SimCSEParams
    builds_backbone = True
    uses_negatives = True
    networks = 1
    loss_name = "InfoNCE (dropout positives)"
    paper = "Gao, Yao & Chen 2021, SimCSE: Simple Contrastive Learning of Sentence Embeddings"

    params: SimCSEParams

    def setup(self, data: DataSplits) -> None:
        """Build the text tower on the data's vocabulary (it becomes ``self.backbone``) and tokenise the training
        captions."""
        p = self.params
        self.setup_captions(data, p.context_length)
        self.backbone = TextTower(
            len(self.tokenizer), p.context_length, p.text_width, p.text_layers, p.text_heads, p.dropout, p.pooling
        )

    def views(self, image_size: int) -> list[View]:
        """No image views: the positives come from dropout."""
        return []

    def two_passes(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same token ids (B, L) through the tower twice, in one batch of 2B: two dropout masks per caption."""
        z = self.backbone(tokens.repeat(2, 1))
        return z[: tokens.shape[0]], z[tokens.shape[0] :]

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        if step.indices is None:
            raise ValueError(
                "SimCSE needs step.indices, the batch's rows in the training split, to find their captions"
            )
        z1, z2 = self.two_passes(self.captions.sample(step.indices))
        if self.params.gather:
            z1, z2 = gather(z1), gather(z2)
        return StepOutput(simcse_loss(z1, z2, self.params.temperature))

    def evaluation(self) -> Evaluation:
        """Text throughout: each item's first caption is embedded, two different captions are its two views for
        the alignment diagnostic, and the input baseline is their word counts."""
        return Evaluation(
            inputs=self.caption_inputs, alignment=self.caption_views, baseline=("bag_of_words", self.word_counts)
        )

    def caption_inputs(self, split: Split, normalize: Prepare) -> EvalInputs:
        """The token ids of each item's first caption: ``embed`` takes text."""
        return EvalInputs(self.item_tokens(split), unchanged)

    def caption_views(self, split: Split, augment: Augment) -> tuple[EvalInputs, EvalInputs]:
        """Two different captions of each item (its first two templates): the text's two views."""
        first, second = (EvalInputs(self.item_tokens(split, template), unchanged) for template in (0, 1))
        return first, second

    def word_counts(self, split: Split, normalize: Prepare) -> EvalInputs:
        """Word counts of each item's first caption."""
        vocab = len(self.tokenizer)
        return EvalInputs(self.item_tokens(split), lambda ids: word_counts(ids, vocab))

    def trunk(self, projector_layers: int = 0) -> tuple[torch.nn.Module, int]:
        raise ConfigError(
            f"eval.semi.enabled: method {self.name!r} learns text embeddings; semi-supervised "
            "fine-tuning of an image backbone does not apply: set eval.semi.enabled=false"
        )
