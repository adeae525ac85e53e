"""The method interface: what a self-supervised method owns, and what it leaves to the training loop.

A method owns its heads, its loss and its between-step state (EMA target, queue,
prototypes). It declares the views it needs and its taxonomy for result tables.
Before training, ``method.setup(data)`` sees the dataset once. The training loop
(:mod:`harness.train`) owns data, augmentation, optimisation,
precision, devices and distribution; it calls, per step::

    views = [augment(images, spec) for spec in method.views(image_size)]
    out = method.training_step(views, step)     # StepOutput(loss, logs); step.indices: the batch's rows
    out.loss.backward()
    drop the gradients of method.frozen_modules(step)   # e.g. SwAV's prototypes, DINO's last layer, early on
    average over workers; clip (pretrain.clip_grad); optimizer.step()
    method.after_step(step)                     # e.g. EMA update of a target network

The optimiser's parameter groups follow :meth:`Method.no_weight_decay` (default: biases and
norm parameters get no weight decay, :func:`is_bias_or_norm`).

and for evaluation ``method.embed(x)`` on what :meth:`Method.eval_inputs` gives for each
split (by default the normalised, un-augmented images).

Everything the orchestration needs from a method is declared here, so it never asks
which method it runs: the views (:meth:`Method.views`), the checks before training
(:meth:`Method.check_run`), what the battery embeds and the input baseline
(:meth:`Method.eval_inputs`, :meth:`Method.alignment_inputs`, :meth:`Method.input_baseline`),
what fine-tuning trains (:meth:`Method.trunk`), and evaluations a method adds to the
battery (:meth:`Method.extra_evaluations`: CLIP's zero-shot and image-text retrieval).

A method that needs other networks than the run's backbone (CMC: one encoder per channel
group; SimCSE: a text tower) sets ``builds_backbone = True`` and builds them in ``setup``,
with ``self.backbone_factory(in_chans=C)`` for fresh, randomly initialised backbones of the
run's timm model and settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from harness.errors import BadInput

if TYPE_CHECKING:
    import numpy as np

    from harness.splits import DataSplits, Images, Split

Prepare = Callable[[torch.Tensor], torch.Tensor]
"""A batch of inputs on the device -> what the encoder takes (normalisation, augmentation, nothing)."""


def check_area_range(scale: tuple[float, float], what: str = "") -> tuple[float, float]:
    """A crop's area range (low, high) as fractions of the image: ValueError unless 0 < low <= high <= 1.

    The one check of every crop range: the config's ``augment.crop_scale``, a method's own crops, a :class:`ViewSpec`.
    """
    low, high = scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"{what + ' ' if what else ''}must be an area range (low, high) with 0 < low <= high <= 1, got {list(scale)}")
    return scale


@dataclass(frozen=True)
class ViewSpec:
    """One view a method asks for: output side in pixels and crop area range (None = use the config's crop_scale)."""

    size: int
    scale: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"view size must be positive, got {self.size}")
        if self.scale is not None:
            check_area_range(self.scale, "view scale")


@dataclass(frozen=True)
class EvalInputs:
    """What ``embed`` (or a baseline) takes for every item of a split, and how one batch of it is prepared on the device."""

    data: Images
    """One row per item: uint8 images (N, C, S, S) (in memory or streamed), or token ids (N, L) for a text method."""
    prepare: Prepare


@dataclass(frozen=True)
class EvalContext:
    """What an extra evaluation (:meth:`Method.extra_evaluations`) gets from the battery."""

    data: DataSplits
    test_features: np.ndarray
    """The cached (N_test, D) evaluation features of the test split (``embed`` of :meth:`Method.eval_inputs`)."""
    extract: Callable[[Callable[[torch.Tensor], torch.Tensor], EvalInputs], np.ndarray]
    """``extract(encoder, inputs)`` -> float32 (N, D): ``encoder`` over every row of ``inputs``, batched, in eval mode."""
    retrieval_ks: tuple[int, ...] | None
    """The battery's Recall@k (None: retrieval is disabled)."""


def feature_dim(backbone: nn.Module) -> int:
    """The output size of a backbone: its ``num_features`` (timm's attribute; :class:`nn.Module` types an unknown
    attribute as a submodule or a tensor, so it is read here, once, as the int it is)."""
    return int(cast(int, backbone.num_features))


def is_bias_or_norm(name: str, param: torch.Tensor) -> bool:
    """The default no-weight-decay rule: biases and normalisation weights, i.e. tensors of at most one dimension
    (SimCLR's and BYOL's LARS exclusion; DINO's ``get_params_groups``: ``name.endswith(".bias") or ndim == 1``)."""
    return param.ndim <= 1


def unchanged(x: torch.Tensor) -> torch.Tensor:
    """The identity :data:`Prepare` (inputs the encoder takes as they are, e.g. token ids)."""
    return x


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
    test_params: ClassVar[dict[str, Any]] = {}
    """Small parameters for the registry-wide tests (heads of a few units), so a new method needs no edit to the
    tests. An entry ``"_backbone": {"name": ..., **kwargs}`` names the timm backbone the tests build when the
    method needs another than the tests' small ResNet (MAE: a ViT)."""
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

    def frozen_modules(self, step: StepInfo) -> list[str]:
        """Submodules (or parameters), by dotted attribute name, that get no update at ``step``: the loop sets their
        gradients to None after ``backward``, so neither the gradient, momentum nor weight decay moves them
        (SwAV's prototypes for the first steps, DINO's last layer in the first epoch). A pure function of the step,
        like every schedule. Default: none."""
        return []

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """Whether the parameter ``name`` (as ``named_parameters`` gives it) is left out of weight decay, and of
        LARS's adaptation. Default: biases and norm parameters (:func:`is_bias_or_norm`)."""
        return is_bias_or_norm(name, param)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The representation used for evaluation: (B, C, H, W) -> (B, D). Default: backbone features."""
        return self.backbone(images)

    def check(self, batch_size: int) -> None:
        """Refuse a run this method cannot do (raise ConfigError naming the key), before training. Default: nothing."""

    def check_run(self, batch_size: int, image_size: int, finetune_from: int | None) -> None:
        """Everything refused before a run opens, in one call: :meth:`check`, the views at ``image_size`` (a multi-crop
        that does not fit the image), and the fine-tuning trunk when semi-supervised evaluation will fine-tune
        from ``finetune_from`` projector layers (None: it will not)."""
        self.check(batch_size)
        self.views(image_size)
        if finetune_from is not None:
            self.trunk(finetune_from)

    def eval_inputs(self, split: Split, normalize: Prepare) -> EvalInputs:
        """What :meth:`embed` takes for every item of ``split``: default its images, normalised."""
        return EvalInputs(split.images, normalize)

    def alignment_inputs(self, split: Split, augment: Callable[[torch.Tensor, ViewSpec], torch.Tensor]) -> tuple[EvalInputs, EvalInputs]:
        """Two independently augmented views of every item of ``split`` (the alignment diagnostic). ``augment(x, spec)``
        draws from one seeded generator, so the two extractions differ. Default: the first training view, twice."""
        spec = self.views(int(split.images.shape[-1]))[0]
        view = EvalInputs(split.images, lambda x: augment(x, spec))
        return view, view

    def input_baseline(self, split: Split, normalize: Prepare) -> tuple[str, EvalInputs]:
        """The baseline without any network, with its name: default ``raw_pixels``, the normalised pixels
        (flattened by the battery)."""
        return "raw_pixels", EvalInputs(split.images, normalize)

    def extra_evaluations(self) -> dict[str, Callable[[EvalContext], dict[str, float]]]:
        """Evaluations this method adds to the battery, by name (timed as ``time/eval/<name>_s``); each returns
        ``eval/...`` metrics. Default: none."""
        return {}

    def collapse_loss(self, batch_size: int) -> float | None:
        """The training loss of collapsed embeddings (all equal) at global batch ``batch_size``, in closed form
        (InfoNCE over K candidates: log K), or None where the method has none. A run whose final loss sits at it
        learned nothing, and tables say so instead of printing its numbers. Default: None."""
        return None

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
        return self.backbone, feature_dim(self.backbone)

    @classmethod
    def taxonomy(cls) -> dict[str, object]:
        """The row this method contributes to the methods table."""
        return {"method": cls.name, "uses_negatives": cls.uses_negatives, "networks": cls.networks, "loss": cls.loss_name}
