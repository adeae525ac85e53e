"""The text side shared by CLIP and SimCSE: a small transformer over token ids, the tokenised training captions,
and :class:`CaptionedMethod`, the base of methods that read the data's captions.

    tokenizer, captions = caption_bank(data, context_length=32, method="clip")
    tower = TextTower(len(tokenizer), context_length=32, width=256, layers=4, heads=4)
    tokens = captions.sample(step.indices)       # (B, L): one caption per image, a random template each
    features = tower(tokens)                     # (B, 256)
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from core.contract import MethodParams
from core.splits import DataSplits, Split
from methods.base import Method
from methods.captions import captions_for, item_captions, zero_shot_prompts
from methods.tokenizer import EOS_ID, PAD_ID, Tokenizer

Pooling = Literal["eos", "mean"]


class TextTowerParams(MethodParams):
    """The text tower's parameters, shared by the methods that have one (small defaults: generated captions are
    short)."""

    text_width: int = Field(
        256,
        ge=1,
        description=(
            "text transformer width (CLIP: 512 wide, 12 layers, 8 heads; SimCSE: BERT-base, 768 wide, 12 layers)"
        ),
    )
    text_layers: int = Field(4, ge=1)
    text_heads: int = Field(4, ge=1)
    context_length: int = Field(
        32,
        ge=3,
        description=(
            "tokens per caption, <bos> and <eos> included (SimCSE: "
            "32; CLIP: 77 BPE tokens); longer captions are truncated"
        ),
    )
    pooling: Pooling = Field(
        "eos",
        description=(
            "the <eos> token's output (CLIP; a [CLS]-like summary of a bidirectional encoder) or the mean over tokens"
        ),
    )


class TextTower(nn.Module):
    """Token + learned position embeddings, pre-norm transformer encoder layers, a final LayerNorm, then pooling.

    Pooling ``eos`` takes the ``<eos>`` token's output (CLIP, Radford et al. 2021); ``mean``
    averages over the real (non-pad) tokens. Attention is bidirectional (BERT-style, as in
    SimCSE; CLIP's causal mask only matters for language modelling) and ignores padding.
    Dropout inside the layers is SimCSE's augmentation (Gao, Yao & Chen, EMNLP 2021).

    forward: ids int64 ``(B, L)`` with ``L <= context_length`` -> ``(B, width)``.
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        layers: int,
        heads: int,
        dropout: float = 0.0,
        pooling: Pooling = "eos",
    ) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by {heads} heads")
        self.context_length, self.pooling, self.num_features = context_length, pooling, width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.empty(context_length, width))
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # CLIP's initialisation
        nn.init.normal_(self.position_embedding, std=0.01)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] > self.context_length:
            raise ValueError(f"ids must be (B, L) with L <= {self.context_length}, got {tuple(ids.shape)}")
        real = ids != PAD_ID
        width = int(real.sum(1).max())  # drop the columns that are padding in every row
        ids, real = ids[:, :width], real[:, :width]
        x = self.token_embedding(ids) + self.position_embedding[:width]
        x = self.norm(self.encoder(x, src_key_padding_mask=~real))
        if self.pooling == "eos":
            return x[torch.arange(x.shape[0], device=x.device), (ids == EOS_ID).int().argmax(1)]
        weights = real.unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(1) / weights.sum(1)


class CaptionBank(nn.Module):
    """Every caption of every training item, tokenised once; items with the same captions share one row.

    Buffers (not saved: ``setup`` rebuilds them from the data): ``tokens`` int64 ``(U, T, L)`` for the
    U distinct caption lists of T templates, and ``rows`` int64 ``(N,)``, each item's row.
    """

    tokens: torch.Tensor
    rows: torch.Tensor

    def __init__(self, captions: list[list[str]], tokenizer: Tokenizer, context_length: int) -> None:
        super().__init__()
        distinct: dict[tuple[str, ...], int] = {}
        rows = [distinct.setdefault(tuple(c), len(distinct)) for c in captions]
        templates = {len(c) for c in distinct}
        if len(templates) != 1:
            raise ValueError(f"every item needs the same number of captions, got {sorted(templates)}")
        flat = [text for c in distinct for text in c]
        tokens = tokenizer.encode(flat, context_length)[0].view(len(distinct), templates.pop(), context_length)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.int64), persistent=False)

    @property
    def num_templates(self) -> int:
        return int(self.tokens.shape[1])

    def sample(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, L)`` of items ``indices``, each with a template drawn from torch's global generator
        (which the training loop seeds per epoch)."""
        rows = self.rows[indices.to(self.rows.device)]
        choice = torch.randint(self.num_templates, (rows.shape[0],)).to(rows.device)
        return self.tokens[rows, choice]

    def caption(self, indices: torch.Tensor, template: int = 0) -> torch.Tensor:
        """Token ids ``(B, L)`` of items ``indices`` under one template."""
        return self.tokens[self.rows[indices.to(self.rows.device)], template]


def caption_bank(data: DataSplits, context_length: int, method: str) -> tuple[Tokenizer, CaptionBank]:
    """The tokenizer (vocabulary of the training captions and the zero-shot prompts) and the training split's caption
    bank.

    Raises ConfigError for a dataset with neither captions nor class names; captions longer than the context are
    truncated (a logged count).
    """
    captions = captions_for(data.train, data.classes, data.name, method)
    prompts = [p for c in zero_shot_prompts(data.train, data.classes) for p in c]
    tokenizer = Tokenizer.from_texts([text for c in captions for text in c] + prompts)
    return tokenizer, CaptionBank(captions, tokenizer, context_length)


class CaptionedMethod(Method):
    """A method that reads the data's captions (CLIP, SimCSE): ``setup_captions`` in ``setup`` keeps the tokenizer,
    the training captions and what it takes to caption any split of the same data (its class names and name)."""

    tokenizer: Tokenizer
    captions: CaptionBank
    classes: tuple[str, ...]
    dataset: str
    context_length: int

    def setup_captions(self, data: DataSplits, context_length: int) -> None:
        """Build the tokenizer and the training split's caption bank (:func:`caption_bank`)."""
        self.tokenizer, self.captions = caption_bank(data, context_length, self.name)
        self.classes, self.dataset, self.context_length = data.classes, data.name, context_length

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids ``(B, context_length)`` of ``texts``."""
        return self.tokenizer.encode(texts, self.context_length)[0]

    def item_tokens(self, split: Split, template: int = 0) -> torch.Tensor:
        """Token ids ``(N, L)`` of each item's caption under ``template`` (0: the deterministic caption of
        evaluations)."""
        return self.tokenize(item_captions(split, self.classes, template, dataset=self.dataset))
