"""What the training loop and the evaluation battery exchange with a method, as plain types.

A step gets a :class:`StepInfo` and returns a :class:`StepOutput`; a method's parameters are a :class:`MethodParams`;
what the battery embeds, and what it compares the embeddings with, is an :class:`Evaluation` of
:class:`EvalInputs`. The interface that uses these types is :class:`methods.base.Method`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from core.splits import DataSplits, Images, Split
from core.views import View

Prepare = Callable[[torch.Tensor], torch.Tensor]
"""A batch of inputs on the device -> what the encoder takes (normalisation, augmentation, nothing)."""

Augment = Callable[[torch.Tensor, View], torch.Tensor]
"""``augment(x, view)``: one augmented view of a uint8 batch, drawn from the battery's seeded generator."""


def feature_dim(backbone: torch.nn.Module) -> int:
    """The output size of a backbone: its ``num_features`` (timm's attribute; :class:`~torch.nn.Module` types an
    unknown attribute as a submodule or a tensor, so it is read here, once, as the int it is)."""
    return int(cast(int, backbone.num_features))


def unchanged(x: torch.Tensor) -> torch.Tensor:
    """The identity :data:`Prepare` (inputs the encoder takes as they are, e.g. token ids)."""
    return x


class MethodParams(BaseModel):
    """Base of every method's parameter model: unknown keys are refused, defaults are the paper's."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


@dataclass(frozen=True)
class StepInfo:
    """Where training is: pure schedules (EMA momentum, temperatures) are functions of these."""

    epoch: int
    step: int
    """Global optimisation step, from 0."""
    total_steps: int
    indices: torch.Tensor | None = None
    """Positions of this batch's images in the training split (for per-image data such as captions)."""


@dataclass
class StepOutput:
    """The loss to minimise and scalars to log (floats or 0-d tensors; logged as ``train/<key>``)."""

    loss: torch.Tensor
    logs: dict[str, float | torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalInputs:
    """What ``embed`` (or a baseline) takes for every item of a split, and how one batch of it is prepared."""

    data: Images
    """One row per item: uint8 images (N, C, S, S) (in memory or streamed), or token ids (N, L) for a text method."""
    prepare: Prepare


@dataclass(frozen=True)
class EvalContext:
    """What an extra evaluation (:attr:`Evaluation.extra`) gets from the battery."""

    data: DataSplits
    test_features: np.ndarray
    """The cached (N_test, D) evaluation features of the test split."""
    extract: Callable[[Callable[[torch.Tensor], torch.Tensor], EvalInputs], np.ndarray]
    """``extract(encoder, inputs)`` -> float32 (N, D): ``encoder`` over every row of ``inputs``, batched, eval mode."""
    retrieval_ks: tuple[int, ...] | None
    """The battery's Recall@k (None: retrieval is disabled)."""


@dataclass(frozen=True)
class Evaluation:
    """How the battery evaluates a method: every field left None is the image default.

    ``inputs(split, normalize)``: what ``embed`` takes for each item (default: the normalised images).
    ``alignment(split, augment)``: two views of each item for the alignment diagnostic (default: the method's first
    training view, drawn twice). ``baseline``: the baseline without a network, ``(name, inputs)`` (default:
    ``raw_pixels``, the normalised pixels). ``extra``: evaluations the method adds, by name, each returning
    ``eval/...`` metrics (CLIP's zero-shot and image-text retrieval).
    """

    inputs: Callable[[Split, Prepare], EvalInputs] | None = None
    alignment: Callable[[Split, Augment], tuple[EvalInputs, EvalInputs]] | None = None
    baseline: tuple[str, Callable[[Split, Prepare], EvalInputs]] | None = None
    extra: Mapping[str, Callable[[EvalContext], dict[str, float]]] = field(default_factory=dict)
