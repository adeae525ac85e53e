"""The method interface: what a self-supervised method owns, and what it leaves to the training loop.

A method owns its heads, its loss and its between-step state (EMA target, queue,
prototypes). It declares the views it needs and its taxonomy for result tables.
Before training, ``method.setup(data)`` sees the dataset once. The training loop
(:mod:`harness.train`) owns data, augmentation, optimisation,
precision, devices and distribution; it calls, per step::

    views = [augment(images, spec) for spec in method.views(image_size)]
    out = method.training_step(views, step)     # StepOutput(loss, logs); step.indices: the batch's rows
    out.loss.backward(); optimizer.step()
    method.after_step(step)                     # e.g. EMA update of a target network

and for evaluation ``method.embed(images)`` on normalised, un-augmented images.

A method that needs more networks than ``self.backbone`` (CMC: one encoder per channel
group) builds them with ``self.backbone_factory(in_chans=C)``: a fresh, randomly initialised
backbone of the run's timm model and settings, given by ``create_method(..., backbone_factory=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from harness.errors import BadInput

from harness.augment import ViewSpec

if TYPE_CHECKING:
    from harness.datasets import DataSplits


class MethodParams(BaseModel):
    """Base of every method's parameter model: unknown keys are refused, defaults are the paper's."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class Method(nn.Module):
    """Base class of self-supervised methods.

    Subclasses set the class attributes, define ``Params`` (a :class:`MethodParams`
    with the paper's defaults) and implement :meth:`training_step`. ``self.backbone``
    is the timm feature extractor, with ``num_features`` outputs.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    # Taxonomy for the result tables.
    uses_negatives: ClassVar[bool] = False
    networks: ClassVar[int] = 1
    """Networks with their own weights (online only: 1; online + EMA target: 2; one per view: 2)."""
    loss_name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    modality: ClassVar[str] = "image"
    """What ``embed`` takes: ``"image"`` (normalised images) or ``"text"`` (token ids from the method's
    ``tokenize``; ``self.backbone`` is then a text tower, and the run embeds each split's captions)."""
    backbone_factory: Callable[..., nn.Module] | None = None
    """``backbone_factory(in_chans=C)`` -> a fresh, randomly initialised backbone like ``self.backbone`` with C input
    channels (same timm model, image size, stem and kwargs); set by :func:`methods.create_method`, None if not given."""

    def __init__(self, backbone: nn.Module, params: MethodParams) -> None:
        super().__init__()
        self.backbone = backbone
        self.params = params

    def setup(self, data: DataSplits) -> None:
        """Called once with the dataset, before ``check`` and before the optimiser is built: methods that
        need more than images (captions, class names, channel groups) take it here and may add modules
        (a tokenizer's vocabulary sizes a text tower). Raise BadInput/ConfigError for a dataset they
        cannot use. Default: nothing."""

    def views(self, image_size: int) -> list[ViewSpec]:
        """The augmented views one training step needs; default two full-size views."""
        return [ViewSpec(image_size), ViewSpec(image_size)]

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        """Compute the loss on a list of augmented views, each (B, C, H, W)."""
        raise NotImplementedError

    def after_step(self, step: StepInfo) -> None:
        """Called after each optimiser step (EMA updates, queue bookkeeping). Default: nothing."""

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The representation used for evaluation: (B, C, H, W) -> (B, D). Default: backbone features."""
        return self.backbone(images)

    def check(self, batch_size: int) -> None:
        """Refuse a run this method cannot do (raise ConfigError naming the key), before training. Default: nothing."""

    @torch.no_grad()
    def project(self, features: torch.Tensor) -> torch.Tensor | None:
        """The projector's output on evaluation features (collapse diagnostics); None without a projector."""
        projector = getattr(self, "projector", None)
        return projector(features) if isinstance(projector, nn.Module) else None

    def trunk(self, projector_layers: int = 0) -> tuple[nn.Module, int]:
        """What semi-supervised evaluation fine-tunes, and its output size: the backbone; methods whose
        projection head can be fine-tuned from (SimCLRv2) also accept ``projector_layers`` > 0."""
        if projector_layers:
            raise BadInput(f"eval.semi.from_projector_layer: method {self.name!r} cannot fine-tune from its projection head; use 0")
        return self.backbone, int(self.backbone.num_features)

    @classmethod
    def taxonomy(cls) -> dict[str, object]:
        """The row this method contributes to the methods table."""
        return {"method": cls.name, "uses_negatives": cls.uses_negatives, "networks": cls.networks, "loss": cls.loss_name}
