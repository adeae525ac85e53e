"""CLIP: Learning Transferable Visual Models From Natural Language Supervision (Radford et al., ICML 2021).

An image tower (the run's timm backbone + a linear projection) and a text tower (a small
transformer + a linear projection) map images and their captions into one space; the
symmetric InfoNCE loss over the batch matches each image with its own caption and each
caption with its own image, at a learned temperature. Captions come from the data
(:mod:`methods.captions`): each step takes one caption per image, a random template each.
Evaluation embeds images with the image tower (``embed``: backbone features, so the
battery runs as for every method) and adds zero-shot classification and image<->text
retrieval through ``encode_text`` (:meth:`CLIP.image_text_evaluations`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from core.contract import EvalContext, EvalInputs, Evaluation, StepInfo, StepOutput, feature_dim, unchanged
from core.splits import DataSplits
from core.views import View
from evaluations.features import eval_mode
from methods import register
from methods.captions import item_captions, zero_shot_prompts
from methods.distributed import gather
from methods.losses import info_nce
from methods.text_tower import CaptionedMethod, TextTower, TextTowerParams


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Symmetric cross entropy over the batch (CLIP's pseudocode, Radford et al. 2021, figure 3).

    ``logits = logit_scale * I @ T^T`` on L2-normalised features (normalised here; a no-op for
    normalised inputs); ``(CE(logits, arange) + CE(logits^T, arange)) / 2``. ``logit_scale`` is the
    multiplier exp(t), as in OpenCLIP's ``ClipLoss``. Collapsed features give ``log N``.

    That is symmetric InfoNCE at temperature ``1 / logit_scale``; the scale multiplies the normalised
    image features, as CLIP's ``logit_scale * I @ T^T`` does, and the temperature left is 1.

    image_features, text_features: (N, D), row i of each from the same pair.
    """
    image, text = F.normalize(image_features.float(), dim=-1), F.normalize(text_features.float(), dim=-1)
    return info_nce(logit_scale * image, text, 1.0, normalize=False, symmetric=True)


class CLIPParams(TextTowerParams):
    embed_dim: int = Field(512, ge=1, description="joint embedding size (CLIP ViT-B/32: 512)")
    init_temperature: float = Field(0.07, gt=0, description="the logit scale starts at log(1 / 0.07)")
    max_logit_scale: float = Field(100.0, gt=1, description="exp(t) is clamped at 100")
    text_dropout: float = Field(0.0, ge=0, lt=1, description="CLIP trains without dropout")
    gather: bool = Field(
        True, description="with several workers, contrast against the global batch (false: each worker's own batch)"
    )


@register
class CLIP(CaptionedMethod):
    name = "clip"
    Params = CLIPParams
    uses_negatives = True
    networks = 2
    loss_name = "symmetric InfoNCE (image-text)"
    paper = "Radford et al. 2021, Learning Transferable Visual Models From Natural Language Supervision"

    params: CLIPParams
    projector: torch.nn.Linear
    text: TextTower
    text_projection: torch.nn.Linear

    def __init__(self, backbone: torch.nn.Module, params: CLIPParams) -> None:
        super().__init__(backbone, params)
        self.projector = torch.nn.Linear(feature_dim(backbone), params.embed_dim, bias=False)  # the image projection
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / params.init_temperature)))

    def setup(self, data: DataSplits) -> None:
        """Build the text tower on the data's vocabulary and tokenise the training captions."""
        p = self.params
        self.setup_captions(data, p.context_length)
        self.text = TextTower(
            len(self.tokenizer), p.context_length, p.text_width, p.text_layers, p.text_heads, p.text_dropout, p.pooling
        )
        self.text_projection = torch.nn.Linear(p.text_width, p.embed_dim, bias=False)

    def views(self, image_size: int) -> list[View]:
        """One view of each image: its caption is the other side of the pair."""
        return [View(image_size)]

    def scale(self) -> torch.Tensor:
        """The effective logit scale exp(t), t clamped at log(max_logit_scale)."""
        return self.logit_scale.clamp(max=math.log(self.params.max_logit_scale)).exp()

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

    def evaluation(self) -> Evaluation:
        """Images, plus zero-shot classification and image<->text retrieval, timed together as
        ``time/eval/cross_modal_s``."""
        return Evaluation(extra={"cross_modal": self.image_text_evaluations})

    def image_text_evaluations(self, ctx: EvalContext) -> dict[str, float]:
        """Image-text evaluations on the test split: zero-shot top-1 with the class prompts (their embeddings averaged
        per class) and image->text / text->image Recall@k against each image's first caption (images with the same
        caption match it alike), at the battery's retrieval ks. The image side is the projector on the cached
        image features."""
        from evaluations.zero_shot import (
            class_embeddings,
            cross_modal_recall,
            zero_shot_top1,
        )  # FAISS: not for a config check

        data = ctx.data
        with eval_mode(self), torch.no_grad():
            image = (
                self.projector(torch.from_numpy(ctx.test_features).to(self.logit_scale.device)).float().cpu().numpy()
            )
        out: dict[str, float] = {}
        if data.classes:
            prompts = [p for c in zero_shot_prompts(data.test, data.classes) for p in c]
            text = ctx.extract(self.encode_text, EvalInputs(self.tokenize(prompts), unchanged))
            out["eval/zero_shot/top1"] = zero_shot_top1(
                image, class_embeddings(text, len(data.classes)), data.test.labels.numpy()
            )
        if ctx.retrieval_ks is not None:
            captions = item_captions(data.test, data.classes, dataset=data.name)
            text = ctx.extract(self.encode_text, EvalInputs(self.tokenize(captions), unchanged))
            groups = np.unique(np.array(captions), return_inverse=True)[1]
            for name, (query, gallery) in (("i2t", (image, text)), ("t2i", (text, image))):
                recall = cross_modal_recall(query, gallery, ctx.retrieval_ks, groups)
                out.update({f"eval/retrieval_{name}/recall_at_{k}": v for k, v in recall.items()})
        return out

    @torch.no_grad()
    def after_step(self, step: StepInfo) -> None:
        """Keep t at or below log(max_logit_scale), as CLIP's training code does after each step."""
        self.logit_scale.clamp_(max=math.log(self.params.max_logit_scale))
