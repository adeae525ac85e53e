"""The typed run configuration: one pydantic model per section, validated before anything runs.

Every section forbids unknown keys, so a typo is an error naming the dotted key, never an ignored
option; a method's own parameters are validated by that method's ``Params`` model (:mod:`methods`).
Reading YAML and ``key=value`` overrides is :mod:`harness.config.loading`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import ConfigError
from harness.config.messages import first_error

NAME_MAX = 200
"""Longest experiment (or sweep) name: it is a folder name, which file systems limit to 255 bytes."""
RUN_NAME_MAX = 5000
"""Longest run name: MLflow keeps it as a tag value (at most 8,000 characters)."""


class Section(BaseModel):
    """A config section: unknown keys are refused, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


class DataConfig(Section):
    """Which dataset, where it lives and at what resolution."""

    name: str = "shapes"
    root: Path | None = None
    """Folder holding real datasets (``<root>/cifar-10-batches-py``, ``<root>/stl10_binary``, the IDX files of the
    MNIST family, ...); ``fashion_mnist`` defaults to Debian's ``/usr/share/datasets/fashion-mnist``."""
    image_size: int = Field(32, ge=8, le=1024)
    """Side of the square images the model sees (generated, resized or centre-cropped to it)."""
    num_train: int | None = Field(None, ge=1)
    """Training images: the number generated for ``shapes``; the first n (seeded, per class) otherwise."""
    num_test: int | None = Field(None, ge=1)
    seed: int = 0
    """Seed of the data itself (generated images, subsets); the trial seed does not change the data."""
    verify_checksums: bool = False
    """Check the files against published digests: CIFAR and STL-10 (torchvision's md5 sums), MNIST, Fashion-MNIST and
    KMNIST (the archive's md5, or the md5 of its content: :mod:`harness.data.idx`); refused for the other datasets."""
    channels: Literal["auto", 1, 3] = "auto"
    """Image channels: auto keeps what the data is (1 for the MNIST family, digits and grayscale folders or shards, 3
    otherwise); 1 converts colour to luma, 3 repeats a grey channel. The backbone's ``in_chans`` follows."""
    normalize: Literal["dataset", "imagenet", "none"] = "dataset"
    """Per-channel standardisation: the training split's own mean and std (computed once and logged; published for
    CIFAR and STL-10), ImageNet's (their luma for 1 channel), or none (pixels in [0, 1])."""
    shards: str | None = None
    """Training shards of dataset ``shards``: a glob (``/data/in100-train-*.tar``) or a folder of WebDataset-style
    ``.tar``."""
    val_shards: str | None = None
    """Evaluation shards of dataset ``shards``, as ``shards``."""
    in_memory: bool | Literal["auto"] = "auto"
    """``imagefolder``/``shards``: decode every image once into memory (true), stream them (false), or hold them
    when the decoded splits fit ``memory_budget_gb`` (auto). Other datasets are always in memory."""
    memory_budget_gb: float = Field(4.0, gt=0)
    num_workers: int | None = Field(None, ge=0)
    """DataLoader processes that decode streamed images (0: in the training process); default the trial's CPUs."""
    prefetch: int = Field(2, ge=1)
    """Steps each loader process prepares ahead."""
    eval_resize: int | None = Field(None, ge=1)
    """Streamed evaluation: shorter side resized to this, then the centre ``image_size`` crop; default 256/224 of it."""
    skip_corrupt: bool = False
    """Skip (and count) images that cannot be decoded instead of failing the run."""

    def streaming_options(self, threads: int) -> dict[str, Any]:
        """The keyword arguments :func:`harness.data.datasets.load_dataset` takes for streaming."""
        keys = (
            "in_memory", "memory_budget_gb", "eval_resize", "skip_corrupt", "shards", "val_shards", "channels",
            "normalize",
        )  # fmt: skip
        return {k: getattr(self, k) for k in keys} | {"threads": threads}


class BackboneConfig(Section):
    """Any timm model by name, used as a feature extractor (``num_classes=0``)."""

    name: str = "resnet18"
    cifar_stem: bool = False
    """Replace a ResNet's 7x7/2 conv + max-pool with a 3x3/1 conv and no pool (for 32 px inputs)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments passed to ``timm.create_model`` (e.g. ``drop_path_rate``, ``patch_size``)."""


class PretrainConfig(Section):
    """Optimisation of the self-supervised objective. The training loop owns all of it."""

    epochs: int = Field(10, ge=0)
    batch_size: int = Field(256, ge=2)
    optimizer: Literal["sgd", "lars", "adamw"] = "sgd"
    base_lr: float = Field(0.3, gt=0)
    """Learning rate for a batch of 256; the effective lr is ``base_lr * batch_size / 256``."""
    weight_decay: float = Field(1e-4, ge=0)
    """On the weights; biases and norm parameters get none with every optimiser
    (:func:`harness.train.optim.is_bias_or_norm`)."""
    weight_decay_end: float | None = Field(None, ge=0)
    """None: ``weight_decay`` throughout. Else half a cosine from ``weight_decay`` at the first step to this at the
    last, set on the decaying group every step (DINO: 0.04 -> 0.4); logged as ``train/weight_decay``."""
    clip_grad: float | None = Field(None, ge=0)
    """Clip the gradients to this global L2 norm after they are averaged over the workers, before the optimiser step
    (DINO: 3.0); None or 0: off. The epoch's mean norm before clipping is logged as ``train/grad_norm``."""
    momentum: float = Field(0.9, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = Field(1.0, ge=0)
    final_lr: float = Field(0.0, ge=0)
    """Learning rate at the end of the cosine schedule (absolute, not scaled)."""
    amp: bool = True
    """bf16 autocast on CUDA; ignored on the CPU."""
    channels_last: bool = True
    """channels_last memory format on CUDA; ignored on the CPU."""
    compile: bool = False
    """``torch.compile`` the method's modules (backbone, heads, momentum copies) in place before training; the first
    step, which compiles them, is timed apart (``time/compile_s``) and left out of the throughput."""
    checkpoint_dir: Path | None = None
    """Where the per-epoch checkpoint goes; default ``outputs/<experiment>/<run id>``."""
    resume: Path | None = None
    """A checkpoint to continue from (weights, optimiser, epoch); the config must match."""
    progress: bool = True
    """Show a progress bar when stderr is a terminal."""
    sync_batchnorm: bool | None = None
    """With several workers, normalise every BatchNorm (momentum copies and predictors included) over the global batch
    while pretraining: ``nn.SyncBatchNorm`` on CUDA, the harness's gloo equivalent on the CPU. Default (None): on with
    more than one worker, so W workers compute what one process computes; false: each worker normalises its own
    slice (as DDP without SyncBatchNorm; MoCo's shuffle-BN concern)."""

    @property
    def lr(self) -> float:
        """Effective peak learning rate, linearly scaled by batch size (Goyal et al. 2017)."""
        return self.base_lr * self.batch_size / 256

    @model_validator(mode="after")
    def _warmup_within_training(self) -> PretrainConfig:
        if self.epochs and self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")
        return self


class AugmentConfig(Section):
    """The SimCLR augmentation recipe, applied per image and per view on the training device."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    """Area fraction range of the random resized crop (SimCLR: 0.08-1; 0.2-1 for small images)."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = Field(0.5, ge=0, le=1)
    jitter_p: float = Field(0.8, ge=0, le=1)
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.4, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    blur_p: float = Field(0.0, ge=0, le=1)
    """Gaussian blur probability (SimCLR ImageNet: 0.5; off for 32 px images). A method's own view recipe sits over
    this and ``solarize_p`` (BYOL's views blur with 1.0 and 0.1 whatever it is): change those with ``views``."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = Field(0.0, ge=0, le=1)
    """Solarisation probability: pixels at or above half the range inverted (torchvision's ``RandomSolarize(0.5)``
    on [0, 1]), after the blur (BYOL's order)."""
    views: list[dict[str, float]] = Field(default_factory=list)
    """Per-view recipes over the method's own (``[{blur_p: 1.0}, {blur_p: 0.1, solarize_p: 0.2}]``): entry i sets
    keys of view i; the method's view recipes sit over ``augment.*``, these over both (:mod:`core.views`)."""

    @field_validator("views")
    @classmethod
    def _view_recipes(cls, v: list[dict[str, float]]) -> list[dict[str, float]]:
        from core.views import check_recipe  # torch; keep config import light

        for i, recipe in enumerate(v):
            try:
                check_recipe(recipe)
            except ValueError as err:
                raise ValueError(f"entry {i}: {err}") from None
        return v

    @field_validator("crop_ratio", "blur_sigma")
    @classmethod
    def _ordered_positive_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0 < lo <= hi:
            raise ValueError(f"must be a range (low, high) with 0 < low <= high, got {list(v)}")
        return v

    @field_validator("crop_scale")
    @classmethod
    def _area_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        from core.views import check_area_range  # torch; keep config import light

        return check_area_range(v)


class KnnConfig(Section):
    """Weighted kNN on L2-normalised embeddings (Wu et al. 2018; DINO's defaults)."""

    enabled: bool = True
    k: int = Field(20, ge=1)
    temperature: float = Field(0.07, gt=0)
    extra: list[tuple[int, float]] = Field(default_factory=list)
    """More (k, T) pairs scored from the same search, logged as ``eval/knn_k<k>_t<T>/top1``
    (e.g. ``[[200, 0.1]]``, the InstDisc/lightly protocol)."""
    fp16: bool = False
    """Round the features to float16 before the search, as fp16 feature banks do (the CPU index
    still searches in float32, so this changes the numbers, not the memory)."""

    @field_validator("extra")
    @classmethod
    def _positive_pairs(cls, v: list[tuple[int, float]]) -> list[tuple[int, float]]:
        for k, t in v:
            if k < 1 or t <= 0:
                raise ValueError(f"each (k, temperature) needs k >= 1 and temperature > 0, got {[k, t]}")
        return v


class LinearConfig(Section):
    """Linear probe on the cached frozen features: BatchNorm without affine + linear layer, SGD + cosine."""

    enabled: bool = True
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.1, gt=0)
    """For a batch of 256; the effective lr is ``lr * batch_size / 256``."""
    weight_decays: list[float] = Field(default_factory=lambda: [0.0, 1e-5, 1e-4, 1e-3], min_length=1)
    """Chosen by top-1 on a validation split carved from the training set, then retrained on all of it."""
    val_fraction: float = Field(0.1, gt=0, lt=1)


class SemiConfig(Section):
    """Semi-supervised fine-tuning: backbone + linear head on class-balanced label subsets, with crop + flip."""

    enabled: bool = True
    fractions: list[float] = Field(default_factory=lambda: [0.01, 0.1], min_length=1)
    epochs: list[int] = Field(default_factory=lambda: [60, 30], min_length=1)
    """Epochs per fraction (SimCLR: 60 for 1%, 30 for 10%); one value applies to all."""
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.05, gt=0)
    """For a batch of 256 (SGD, momentum 0.9, cosine, no weight decay)."""
    from_projector_layer: int = Field(0, ge=0)
    """Fine-tune from this many layers into the projection head (SimCLRv2: 1); 0 is the backbone alone."""
    distill_epochs: int = Field(0, ge=0)
    """Then self-distil each fine-tuned model into a student on all training images, without labels (SimCLRv2);
    0 is off. Batch size and lr are the fine-tuning's; see :mod:`evaluations.distill`."""
    distill_temperature: float = Field(1.0, gt=0)
    """Temperature of the distillation loss, teacher and student alike (SimCLRv2 reports 0.1 for self-distillation,
    1.0 for big-to-small, and little difference between the two)."""

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in v):
            raise ValueError(f"fractions must lie in (0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _epochs_per_fraction(self) -> SemiConfig:
        if len(self.epochs) not in (1, len(self.fractions)):
            raise ValueError(f"epochs: give one value or one per fraction ({len(self.fractions)}), got {self.epochs}")
        return self


class RetrievalConfig(Section):
    """Each test embedding queries the others: Recall@k (any same-label item in the top k) and mAP@R."""

    enabled: bool = True
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1)


class CollapseConfig(Section):
    """RankMe, effective rank, std of normalised embeddings, alignment and uniformity, spectrum plot."""

    enabled: bool = True


class OnlineConfig(Section):
    """The online monitor: during pretraining, kNN top-1 (the ``eval.knn`` protocol) and RankMe of the method's
    embeddings, in eval mode, of fixed seeded subsets of the train and test splits, logged as ``online/knn_top1`` and
    ``online/rankme`` at the epochs it evaluates (an ASHA metric). It changes no training number."""

    enabled: bool = True
    every: int | None = Field(None, ge=1)
    """Evaluate after every this many epochs, and after the last one; default (None) ``max(1, round(epochs / 10))``,
    about ten points over the run. At most ``pretrain.epochs``."""
    num_train: int = Field(512, ge=1)
    """Training items in the kNN bank: a subset drawn once from ``data.seed`` (the same for every trial seed); all
    of them when the split is smaller."""
    num_test: int = Field(256, ge=1)
    """Test items classified, drawn likewise."""
    linear: bool = False
    """Also an online linear probe (:mod:`evaluations.online_linear`): one linear classifier trained, at each
    evaluation, on the train subset's embeddings, its weights kept from one evaluation to the next; its top-1 on the
    test subset is logged as ``online/linear_top1`` (an ASHA metric). It changes no training number either."""
    linear_epochs: int = Field(10, ge=1)
    """Passes of the online linear probe over the train subset at each evaluation."""

    def schedule(self, epochs: int) -> list[int]:
        """The epochs (1-based) after which the monitor evaluates: every ``every``-th, and always the last one."""
        if not self.enabled or epochs < 1:
            return []
        every = self.every if self.every is not None else max(1, round(epochs / 10))
        return sorted({*range(every, epochs + 1, every), epochs})


class EvalConfig(Section):
    """The evaluation battery and its protocol parameters (logged next to every number)."""

    knn: KnnConfig = Field(default_factory=KnnConfig)
    linear: LinearConfig = Field(default_factory=LinearConfig)
    semi: SemiConfig = Field(default_factory=SemiConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    collapse: CollapseConfig = Field(default_factory=CollapseConfig)
    online: OnlineConfig = Field(default_factory=OnlineConfig)
    baselines: bool = True
    """Also score raw pixels and the random-init backbone with the same kNN protocol."""
    baselines_cache: Path | None = None
    """A folder where the baselines' numbers are kept, keyed by everything they depend on (data, kNN protocol, the
    random-init weights, the method's evaluation inputs), so runs that share them compute them once; a sweep's trials
    share ``<storage>/<sweep name>/baselines`` unless this is given. None: computed by every run."""
    batch_size: int = Field(512, ge=1)
    """Batch size of feature extraction."""


class DistributedConfig(Section):
    """Data-parallel pretraining: one loop for every world size (``pretrain.batch_size`` is the global batch).

    ``python -m harness run CONFIG distributed.workers=W`` starts W local workers through Ray Train; under
    ``torchrun`` the world size is torchrun's; a sweep sets it from ``resources.workers``.
    """

    workers: int = Field(1, ge=1)
    """Worker processes (one GPU each on CUDA). ``pretrain.batch_size`` must be divisible by it."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """``auto``: NCCL on CUDA, gloo on the CPU."""
    cpus: float = Field(1.0, gt=0)
    """CPUs (threads) per worker, when ``run`` starts the workers through Ray Train."""
    max_failures: int = Field(0, ge=0)
    """When ``run`` starts the workers through Ray Train: times the worker group is restarted from the last checkpoint
    after a worker dies or raises."""


class TrackingConfig(Section):
    """Where runs are logged. ``uri`` falls back to MLFLOW_TRACKING_URI, then ``sqlite:///mlflow.db``."""

    uri: str | None = None
    experiment: str = Field("harness", min_length=1, max_length=NAME_MAX)
    """The MLflow experiment, also the folder of the default checkpoint path ``outputs/<experiment>/<run id>``: one
    path component (no ``/``, ``\\``, control characters, ``.`` or ``..``)."""
    run_name: str | None = Field(None, min_length=1, max_length=RUN_NAME_MAX)
    """The MLflow run name (default ``<method>-<backbone>-<data>-s<seed>``; a sweep's trials take their trial key);
    MLflow keeps it as a tag, it names no file."""

    @field_validator("experiment")
    @classmethod
    def _one_path_component(cls, v: str) -> str:
        if v in (".", "..") or any(c in v for c in "/\\") or not v.isprintable():
            raise ValueError(
                "must be one folder name: no '/', '\\', control characters, '.' or '..' (it names the folder of the "
                "default checkpoint path outputs/<experiment>/<run id>)"
            )
        return v

    @field_validator("run_name")
    @classmethod
    def _printable(cls, v: str | None) -> str | None:
        if v is not None and not v.isprintable():
            raise ValueError("must be printable text (no control characters or line breaks)")
        return v


class RunConfig(Section):
    """Everything one trial needs; a trial is a pure function of it."""

    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    method: dict[str, Any] = Field(default_factory=lambda: {"name": default_method()}, validate_default=True)
    """``name`` plus that method's own parameters, validated by its ``Params`` model (default: the registry's
    :data:`methods.DEFAULT_METHOD`)."""
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"unknown device {v!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")

    @field_validator("method", mode="before")
    @classmethod
    def _method_params(cls, v: Any) -> dict[str, Any]:
        from methods import get_method_class  # the registry imports torch; keep config import light

        if isinstance(v, str):
            v = {"name": v}
        if not isinstance(v, dict) or "name" not in v:
            raise ValueError(
                "must be a mapping with a 'name' and that method's parameters (e.g. "
                "{name: NAME, temperature: 0.5}; python -m harness list methods)"
            )
        params = dict(v)
        name = params.pop("name")
        method_cls = get_method_class(name)  # BadInput with suggestions when unknown
        try:
            validated = method_cls.Params(**params)
        except ValidationError as err:
            message = first_error(err, method_cls.Params, prefix="method")
            if err.errors()[0]["type"] == "extra_forbidden":
                message += f"; {name} takes: {', '.join(['name', *method_cls.Params.model_fields])}"
            raise ConfigError(message) from None
        return {"name": name, **validated.model_dump()}

    @model_validator(mode="after")
    def _online_within_training(self) -> RunConfig:
        online, epochs = self.eval.online, self.pretrain.epochs
        if online.enabled and online.every is not None and online.every > epochs:
            accepted = f"give 1 to {epochs} or leave it unset" if epochs else "leave it unset"
            raise ConfigError(
                f"eval.online.every: {online.every} is larger than pretrain.epochs ({epochs}); "
                f"{accepted} (about ten points over the run), or set eval.online.enabled=false"
            )
        return self

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> RunConfig:
        check_batch_splits(self.pretrain.batch_size, self.distributed.workers, "distributed.workers={}")
        return self

    @model_validator(mode="after")
    def _compiler_available(self) -> RunConfig:
        if self.pretrain.compile and (why := compile_unavailable(self.device)):
            raise ConfigError(f"pretrain.compile: true, but {why}; set pretrain.compile=false")
        return self

    def as_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe nested dict (paths as strings)."""
        return self.model_dump(mode="json")


def check_batch_splits(batch: int, workers: int, over: str) -> None:
    """ConfigError unless the global ``batch`` splits into equal slices over ``workers``: the one check of every
    launcher (``over`` names where the count comes from, ``{}`` standing for it)."""
    if batch % workers:
        lower, upper = batch - batch % workers, batch + workers - batch % workers
        raise ConfigError(
            f"pretrain.batch_size: the global batch {batch} does not split over {over.format(workers)}; "
            f"give a multiple of {workers} (e.g. {lower or upper} or {upper})"
        )


def compile_unavailable(device: str) -> str | None:
    """Why ``torch.compile`` cannot run here (None when it can), without importing torch: its default backend
    (Inductor) generates Triton kernels on CUDA and C++ on the CPU, so it needs the ``triton`` package or a C++
    compiler (``$CXX``, ``g++``, ``c++`` or ``clang++`` on the PATH)."""
    import importlib.util
    import shutil

    has_cxx = any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)
    has_triton = importlib.util.find_spec("triton") is not None
    if device.startswith("cuda") and not has_triton:
        return "torch.compile needs the triton package on CUDA and it is not installed"
    if device == "cpu" and not has_cxx:
        return (
            "torch.compile needs a C++ compiler on the CPU (g++, "
            "c++ or clang++ on the PATH, or $CXX) and none was found"
        )
    if device == "auto" and not (has_cxx or has_triton):
        return "torch.compile needs a C++ compiler (CPU) or the triton package (CUDA) and neither was found"
    return None


def default_method() -> str:
    from methods import DEFAULT_METHOD  # the registry imports torch; keep config import light

    return DEFAULT_METHOD
