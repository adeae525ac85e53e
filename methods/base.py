"""The method interface: what a self-supervised method owns, and what it leaves to the training loop.

A method owns its heads, its loss and its between-step state (EMA target, queue, prototypes), and declares its
views. The loop (:mod:`harness.train.loop`) owns data, augmentation, optimisation, precision, devices and
distribution; per step it calls::

    views = [augment(images, view) for view in method.views(image_size)]
    out = method.training_step(views, step)     # StepOutput(loss, logs); step.indices: the batch's rows
    out.loss.backward(); drop the gradients of method.frozen_modules(step); average, clip, optimizer.step()
    method.after_step(step)                     # e.g. the EMA update of a target network

The types it exchanges (:class:`~core.views.View`, :class:`~core.contract.StepInfo`, ...) live in :mod:`core`, so
that importing this module imports no method. ARCHITECTURE.md lists every hook.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from core.contract import Evaluation, MethodParams, StepInfo, StepOutput, feature_dim
from core.errors import BadInput
from core.splits import DataSplits
from core.views import View

__all__ = ["BYOL_RECIPES", "Method", "asymmetric_views"]

BYOL_RECIPES = ({"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})
"""BYOL's two asymmetric views (Grill et al. 2020, arXiv:2006.07733, appendix B, Table 6): Gaussian blur with
probability 1.0 and 0.1, solarisation with 0.0 and 0.2; Barlow Twins, VICReg and MoCo v3 took them over. Only the
asymmetric part: the colour jitter's strengths and probabilities stay the run's ``augment.*``."""


def asymmetric_views(image_size: int, recipes: tuple[dict[str, float], ...] = BYOL_RECIPES) -> list[View]:
    """Two full-size views, view i drawn with ``recipes[i]`` over the run's recipe."""
    return [View(image_size, recipe=recipe) for recipe in recipes]


class Method(nn.Module, ABC):
    """Base class of self-supervised methods.

    Subclasses set the class attributes, define ``Params`` (a :class:`MethodParams` with the paper's defaults) and
    implement :meth:`views` and :meth:`training_step`. ``self.backbone`` is the timm feature extractor, with
    ``num_features`` outputs; ``self.projector`` is the projection head, if the method has one.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams
    # Taxonomy for the result tables.
    uses_negatives: ClassVar[bool] = False
    networks: ClassVar[int] = 1
    """Networks with their own weights (online only: 1; online + EMA target: 2; one per view: 2)."""
    loss_name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    builds_backbone: ClassVar[bool] = False
    """True: the method trains other networks than the run's backbone and builds them in ``setup``
    (``self.backbone`` is then whatever ``embed`` runs); :func:`methods.create_method` builds it no backbone."""
    backbone_factory: Callable[..., nn.Module] | None = None
    """``backbone_factory()`` -> a fresh, randomly initialised backbone of the run's timm model and settings;
    ``backbone_factory(in_chans=C)`` with C input channels. Set by :func:`methods.create_method`, None if not given."""

    backbone: nn.Module
    """What ``embed`` runs: the run's timm backbone, or (``builds_backbone``) what ``setup`` builds."""

    def __init__(self, backbone: nn.Module | None, params: MethodParams) -> None:
        super().__init__()
        if backbone is not None:  # else setup() builds it
            self.backbone = backbone
        self.params = params
        self.projector: nn.Module | None = None
        """The projection head (the collapse diagnostics measure its outputs too); None: the method has none."""

    # ------------------------------------------------------------------ required

    @abstractmethod
    def views(self, image_size: int) -> list[View]:
        """The augmented views one training step needs, in the order ``training_step`` takes them."""

    @abstractmethod
    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        """Compute the loss on a list of augmented views, each (B, C, H, W)."""

    # ------------------------------------------------------------------ hooks (defaults do nothing special)

    def setup(self, data: DataSplits) -> None:
        """Called once with the dataset, before ``check`` and before the optimiser is built: methods that need more
        than images (captions, class names, channel groups) take it here and may add modules. Raise
        BadInput/ConfigError for a dataset they cannot use."""

    def check(self, batch_size: int) -> None:
        """Refuse a run this method cannot do (raise ConfigError naming the key), before training."""

    def after_step(self, step: StepInfo) -> None:
        """Called after each optimiser step (EMA updates, queue bookkeeping)."""

    def frozen_modules(self, step: StepInfo) -> list[str]:
        """Submodules (or parameters), by dotted attribute name, that get no update at ``step``: the loop drops their
        gradients after ``backward`` (SwAV's prototypes early on, DINO's last layer in the first epoch). A pure
        function of the step, like every schedule."""
        return []

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The representation used for evaluation: (B, C, H, W) -> (B, D). Default: backbone features."""
        return self.backbone(images)

    @torch.no_grad()
    def project(self, features: torch.Tensor) -> torch.Tensor | None:
        """The projection head's output on evaluation features (collapse diagnostics); None without a head."""
        return self.projector(features) if self.projector is not None else None

    def collapse_loss(self, batch_size: int) -> float | None:
        """The training loss of collapsed embeddings (all equal) at global batch ``batch_size``, in closed form
        (InfoNCE over K candidates: log K), or None where the method has none. A run whose final loss sits at it
        learned nothing, and tables say so instead of printing its numbers."""
        return None

    def trunk(self, projector_layers: int = 0) -> tuple[nn.Module, int]:
        """What semi-supervised evaluation fine-tunes, and its output size: the backbone; methods whose projection
        head can be fine-tuned from (SimCLRv2) also accept ``projector_layers`` > 0."""
        if projector_layers:
            raise BadInput(
                f"eval.semi.from_projector_layer: method {self.name!r} cannot fine-tune from its projection head; use 0"
            )
        return self.backbone, feature_dim(self.backbone)

    def evaluation(self) -> Evaluation:
        """What the battery embeds and compares with, where it is not the images (:class:`Evaluation`): SimCSE's
        captions, CLIP's zero-shot. Default: images throughout."""
        return Evaluation()
