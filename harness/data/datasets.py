"""Datasets as in-memory uint8 tensors: a registry of loaders, one per dataset name.

Every loader returns a :class:`DataSplits` whose images are uint8 ``(N, C, S, S)`` with
``S == image_size``, labels int64 ``(N,)``, and the per-channel mean/std used to
normalise them. Nothing is downloaded: real datasets are read from ``data.root`` in their
usual on-disk format, and a missing folder or file is a one-line :class:`DataNotFound`.

    splits = load_dataset("cifar10", root="~/data", num_train=10_000)
    splits.train.images.shape        # (10000, 3, 32, 32)
    list_datasets()                  # ['cifar10', 'cifar100', 'digits', 'fashion_mnist', 'imagefolder', ...]

Loading is deterministic for given arguments; ``num_train``/``num_test`` below a split's
size take a class-stratified subset drawn with ``seed``. Every dataset keeps its native channels
(1 for the MNIST family, digits and grey folders or shards, 3 for the others; ``channels`` converts), and
:attr:`DataSplits.provenance` says what was loaded: a fingerprint, the normalisation, any resize
and the digests of the subsets' indices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import datasets as tv_datasets
from torchvision.datasets.utils import check_integrity

from core.errors import BadInput, DataNotFound, suggest
from core.splits import DataSplits, Images, Split
from harness.data import idx, streaming
from harness.data.shapes import SHAPES, generate_shapes

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
STL10_MEAN, STL10_STD = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LUMA = (0.2989, 0.587, 0.114)
"""ITU-R 601-2 luma weights (torchvision's ``rgb_to_grayscale``): 3 channels to 1, and ImageNet's stats for 1."""
NORMALIZE = ("dataset", "imagenet", "none")
"""``data.normalize``: the training split's own per-channel mean and std (published ones for CIFAR and STL-10, which
are those), ImageNet's (their luma for 1 channel), or none (mean 0, std 1: pixels in [0, 1])."""
STATS_SAMPLE = 2000
"""Streamed images: ``normalize: dataset`` computes the stats on this many training images (evenly spaced)."""
log = logging.getLogger(__name__)

STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")

SHAPES_TEST_SEED_OFFSET = 1_000_003
"""The shapes test split is generated from ``seed + SHAPES_TEST_SEED_OFFSET``."""


@dataclass(frozen=True)
class DatasetRequest:
    """What a loader is asked for (the ``data`` config section, with ``root`` resolved)."""

    name: str
    root: Path | None
    image_size: int
    num_train: int | None
    num_test: int | None
    seed: int
    verify_checksums: bool
    in_memory: bool | Literal["auto"] = "auto"
    memory_budget_gb: float = 4.0
    eval_resize: int | None = None
    threads: int = 4
    skip_corrupt: bool = False
    shards: str | None = None
    val_shards: str | None = None
    channels: int | Literal["auto"] = "auto"
    normalize: str = "dataset"


Loader = Callable[[DatasetRequest], DataSplits]
_REGISTRY: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator adding a loader to the registry under ``name``."""

    def add(loader: Loader) -> Loader:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is already registered")
        _REGISTRY[name] = loader
        return loader

    return add


def list_datasets() -> list[str]:
    """Names of the registered datasets, sorted."""
    return sorted(_REGISTRY)


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    image_size: int = 32,
    num_train: int | None = None,
    num_test: int | None = None,
    seed: int = 0,
    verify_checksums: bool = False,
    **streaming_options: Any,
) -> DataSplits:
    """Load dataset ``name`` as uint8 tensors of side ``image_size`` (or, for the datasets of :data:`STREAMABLE`,
    as streamed images when they do not fit the memory budget).

    ``streaming_options``: ``in_memory``, ``memory_budget_gb``, ``eval_resize``, ``threads``, ``skip_corrupt``,
    ``shards``, ``val_shards``, ``channels``, ``normalize`` (see :class:`harness.config.schema.DataConfig`). Raises
    BadInput for an unknown name or a bad size, DataNotFound when its files are missing.
    """
    if name not in _REGISTRY:
        known = list_datasets()
        raise BadInput(f"data.name: unknown dataset {name!r}{suggest(name, known)}; known: {', '.join(known)}")
    if image_size < 1:
        raise BadInput(f"data.image_size: must be >= 1, got {image_size}")
    for key, value in (("num_train", num_train), ("num_test", num_test)):
        if value is not None and value < 1:
            raise BadInput(f"data.{key}: must be >= 1, got {value}")
    if streaming_options.get("channels", "auto") not in ("auto", 1, 3):
        raise BadInput(f"data.channels: must be auto, 1 or 3, got {streaming_options['channels']!r}")
    if streaming_options.get("normalize", "dataset") not in NORMALIZE:
        raise BadInput(f"data.normalize: must be one of {', '.join(NORMALIZE)}, got {streaming_options['normalize']!r}")
    request = DatasetRequest(
        name=name,
        root=Path(root).expanduser().resolve() if root is not None else None,
        image_size=image_size,
        num_train=num_train,
        num_test=num_test,
        seed=seed,
        verify_checksums=verify_checksums,
        **streaming_options,
    )
    if verify_checksums and name not in CHECKSUMMED:
        raise BadInput(
            f"data.verify_checksums: {name!r} has no published checksums (those of {', '.join(CHECKSUMMED)}); "
            "set data.verify_checksums=false"
        )
    if request.in_memory is False and name not in STREAMABLE:
        raise BadInput(
            f"data.in_memory: false streams {' and '.join(STREAMABLE)} "
            f"only; {name!r} is always held in memory (use auto or true)"
        )
    return _normalized(_converted(_REGISTRY[name](request), request.channels), request.normalize)


def _converted(data: DataSplits, channels: int | str) -> DataSplits:
    """In-memory images converted to ``channels`` (1 -> 3 repeats the channel, 3 -> 1 takes the luma); streamed ones
    were decoded with them already."""
    if channels == "auto" or channels == data.channels or data.streamed:
        return data

    def convert(split: Split) -> Split:
        images = split.images
        assert isinstance(images, torch.Tensor)
        if channels == 3:
            out = images.expand(-1, 3, -1, -1).contiguous()
        else:
            weights = torch.tensor(LUMA, dtype=torch.float32).view(1, 3, 1, 1)
            out = (images.float() * weights).sum(dim=1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        return Split(out, split.labels, split.attributes)

    train, test = convert(data.train), convert(data.test)
    mean, std = channel_stats(train.images)
    note = f"{data.channels} -> {channels} ({'repeated' if channels == 3 else 'luma'}, data.channels)"
    return dataclasses.replace(
        data, train=train, test=test, mean=mean, std=std, provenance={**data.provenance, "channels": note}
    )


def _normalized(data: DataSplits, normalize: str) -> DataSplits:
    """``data`` with the mean/std of ``normalize`` (the loader gives the dataset's own) and its fingerprint."""
    channels = data.channels
    mean: tuple[float, ...]
    std: tuple[float, ...]
    if normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if channels == 1:
            mean, std = (
                (float(sum(w * m for w, m in zip(LUMA, mean, strict=True))),),
                (float(sum(w * s for w, s in zip(LUMA, std, strict=True))),),
            )
    elif normalize == "none":
        mean, std = (0.0,) * channels, (1.0,) * channels
    else:
        mean, std = data.mean, data.std
        if not all(math.isfinite(v) for v in (*mean, *std)) or min(std) <= 0:
            raise BadInput(
                f"data.normalize: the training split of {data.name!r} gives mean {list(mean)} and std {list(std)} "
                "(no images, or every pixel the same); use data.normalize=imagenet or none"
            )
    stats = f"mean {', '.join(f'{m:.4f}' for m in mean)}; std {', '.join(f'{s:.4f}' for s in std)}"
    provenance = {**fingerprint(data), **data.provenance, "normalize": f"{normalize} ({stats})"}
    return dataclasses.replace(data, mean=tuple(mean), std=tuple(std), provenance=provenance)


def fingerprint(data: DataSplits) -> dict[str, str]:
    """``fingerprint`` (16 hex digits of a sha256) and ``fingerprint_of`` (what it hashes) of ``data`` as loaded.

    In memory: the uint8 images and labels of both splits, as the model sees them (after any subset and resize).
    Streamed: every image's file name (relative to its split's folder, or its shard's name and member), byte size and
    label, in order: the files are not read, so an edit that keeps a file's size is not seen.
    """
    digest = hashlib.sha256()
    for split in (data.train, data.test):
        images = split.images
        digest.update(np.ascontiguousarray(split.labels.numpy()).tobytes())
        if isinstance(images, torch.Tensor):
            digest.update(str(tuple(images.shape)).encode())
            digest.update(np.ascontiguousarray(images.numpy()).tobytes())
        elif isinstance(images, streaming.StreamedImages):
            digest.update("\n".join(streaming.listing(images.source)).encode())
    what = (
        "content: sha256 of the uint8 images and labels as loaded"
        if not data.streamed
        else ("files: sha256 of each image's name, byte size and label (contents not read)")
    )
    return {"fingerprint": digest.hexdigest()[:16], "fingerprint_of": what}


def class_counts(data: DataSplits) -> dict[str, dict[str, int]]:
    """Images per class name in each split: ``{"train": {"T-shirt/top": 6000, ...}, "test": {...}}``."""
    out = {}
    for name, split in (("train", data.train), ("test", data.test)):
        counts = torch.bincount(split.labels, minlength=data.num_classes).tolist()
        out[name] = {cls: int(n) for cls, n in zip(data.classes, counts, strict=False)}
    return out


# ----------------------------------------------------------------------------- shared steps


def resize_images(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Bilinear resize of uint8 ``(N, C, H, W)`` to ``(N, C, size, size)`` (antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        batch = images[start : start + chunk].float()
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + chunk] = batch.round().clamp(0, 255).to(torch.uint8)
    return out


def stratified_subset(labels: torch.Tensor, n: int | None, seed: int, key: str) -> torch.Tensor | None:
    """Indices (sorted) of a seeded class-stratified subset of ``n`` items, or None for all.

    Each class gets its share of ``n`` in proportion to its frequency (largest remainders
    break ties), drawn by a seeded permutation within the class. ``key`` names the config
    key in the error raised when ``n`` exceeds ``len(labels)``.
    """
    total = int(labels.shape[0])
    if n is None or n == total:
        return None
    if n > total:
        raise BadInput(f"data.{key}: {n} images requested but only {total} are available")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * n / total
    share = exact.floor().long()
    remainder = n - int(share.sum())
    order = torch.argsort(share.double() - exact, stable=True)  # largest fractional part first
    share[order[:remainder]] += 1
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for cls, k in zip(classes.tolist(), share.tolist(), strict=True):
        members = (labels == cls).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=gen)[:k]])
    return torch.cat(chosen).sort().values


def subset_digest(rows: torch.Tensor, total: int) -> str:
    """``<n> of <total>, sha256 <16 hex digits>`` of a subset's sorted row indices (int64, little-endian)."""
    digest = hashlib.sha256(np.ascontiguousarray(rows.numpy().astype("<i8")).tobytes()).hexdigest()[:16]
    return f"{len(rows)} of {total}, sha256 {digest}"


def _subset(split: Split, n: int | None, seed: int, key: str) -> tuple[Split, str | None]:
    idx = stratified_subset(split.labels, n, seed, key)
    if idx is None:
        return split, None
    attributes = [split.attributes[i] for i in idx.tolist()] if split.attributes is not None else None
    return Split(split.images[idx], split.labels[idx], attributes), subset_digest(idx, len(split))


def _finish(
    request: DatasetRequest,
    train: Split,
    test: Split,
    classes: Sequence[str],
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    stored_size: int | None = None,
) -> DataSplits:
    """Subset to num_train/num_test (train with ``seed``, test with ``seed + 1``), fill mean/std from train if not
    given; ``stored_size``: the side of the images as stored, when they were resized to ``image_size``."""
    train, train_subset = _subset(train, request.num_train, request.seed, "num_train")
    test, test_subset = _subset(test, request.num_test, request.seed + 1, "num_test")
    if mean is None or std is None:
        mean, std = channel_stats(train.images)
    provenance = {}
    for split, digest in (("train", train_subset), ("test", test_subset)):
        if digest is not None:
            provenance[f"subset.{split}"] = digest
    if stored_size is not None and stored_size != request.image_size:
        provenance["resized"] = resized_note(stored_size, request.image_size)
    return DataSplits(request.name, train, test, tuple(classes), mean, std, provenance=provenance)


def resized_note(stored: int, size: int) -> str:
    """What a run records (tag ``data.resized``) and logs when stored images are resized to ``data.image_size``."""
    note = f"{stored} -> {size} px (bilinear, antialiased; data.image_size)"
    log.warning("data: images resized %s", note)
    return note


def channel_stats(images: Images, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        batch = images[start : start + chunk].double().div_(255).transpose(0, 1).reshape(channels, -1)
        total += batch.sum(dim=1)
        squares += (batch * batch).sum(dim=1)
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean * mean).clamp(min=0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _require_root(request: DatasetRequest, folder: str) -> Path:
    if request.root is None:
        raise DataNotFound(f"data.root: dataset {request.name!r} needs data.root, the folder that holds {folder}")
    return request.root


# ----------------------------------------------------------------------------- shapes, digits


@register_dataset("shapes")
def _load_shapes(request: DatasetRequest) -> DataSplits:
    """Procedural shapes (:mod:`harness.data.shapes`); num_train/num_test are the numbers generated."""
    size = request.image_size
    train = Split(*generate_shapes(request.num_train or 5000, size, request.seed))
    test = Split(*generate_shapes(request.num_test or 1000, size, request.seed + SHAPES_TEST_SEED_OFFSET))
    mean, std = channel_stats(train.images)
    return DataSplits(request.name, train, test, SHAPES, mean, std)


@register_dataset("digits")
def _load_digits(request: DatasetRequest) -> DataSplits:
    """scikit-learn's 8x8 handwritten digits (UCI optdigits test set), 75/25 stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(np.rint(digits.images * (255 / 16)).astype(np.uint8))[:, None]  # (1797, 1, 8, 8)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.25, stratify=digits.target, random_state=0
    )
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    images = resize_images(images, request.image_size)
    train = Split(images[train_idx], labels[train_idx])
    test = Split(images[test_idx], labels[test_idx])
    return _finish(request, train, test, [str(d) for d in range(10)], stored_size=8)


# ----------------------------------------------------------------------------- CIFAR, STL-10


def _files_present(folder: Path, names: Sequence[str]) -> bool:
    return all((folder / name).is_file() for name in names)


class _CIFAR10(tv_datasets.CIFAR10):
    """torchvision's CIFAR-10 reader; md5 sums are checked only when ``verify_checksums``."""

    meta: dict[str, Any]  # torchvision's class attribute: the file with the class names, and its md5

    def __init__(self, root: Path, train: bool, verify_checksums: bool) -> None:
        self._verify = verify_checksums
        if not verify_checksums:
            self.meta = {**type(self).meta, "md5": None}  # _load_meta then only checks that the file exists
        super().__init__(root, train=train, download=False)

    def _check_integrity(self) -> bool:
        if self._verify:
            return super()._check_integrity()
        folder = Path(self.root) / self.base_folder
        return _files_present(folder, [name for name, _ in self.train_list + self.test_list])


class _CIFAR100(_CIFAR10, tv_datasets.CIFAR100):
    """torchvision's CIFAR-100 reader (fine labels) with the same integrity rule."""


def _require_files(folder: Path, expected: Sequence[str], title: str, layout: str) -> None:
    """DataNotFound naming ``folder`` when it, or any of the ``expected`` files in it, is missing."""
    if not folder.is_dir():
        raise DataNotFound(f"data.root: {title} not found at {folder} ({layout}); nothing is downloaded")
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise DataNotFound(
            f"data.root: {title} at {folder} lacks {', '.join(missing)} ({layout}); nothing is downloaded"
        )


def _load_cifar(
    request: DatasetRequest, reader: type[_CIFAR10], title: str, mean: tuple[float, ...], std: tuple[float, ...]
) -> DataSplits:
    """CIFAR python version (Krizhevsky 2009): pickled batches of (n, 3072) uint8 rows, CHW order."""
    folder_name = reader.base_folder
    root = _require_root(request, folder_name)
    folder = root / folder_name
    expected = [name for name, _ in reader.train_list + reader.test_list] + [reader.meta["filename"]]
    layout = f"expected the python version: {_describe_files(expected)}"
    _require_files(folder, expected, title, layout)
    splits = []
    for train in (True, False):
        try:
            data = reader(root, train=train, verify_checksums=request.verify_checksums)
        except RuntimeError as err:
            raise DataNotFound(
                f"data.root: {title} at {folder} failed torchvision's check "
                f"({err}); set data.verify_checksums=false to skip md5 sums"
            ) from None
        images = torch.from_numpy(np.ascontiguousarray(data.data)).permute(0, 3, 1, 2)  # HWC -> CHW
        labels = torch.as_tensor(data.targets, dtype=torch.int64)
        splits.append(Split(resize_images(images, request.image_size).contiguous(), labels))
    return _finish(request, splits[0], splits[1], data.classes, mean, std, stored_size=32)


def _describe_files(names: Sequence[str]) -> str:
    """``data_batch_1..5, test_batch, batches.meta`` for CIFAR-10's list, else the names joined."""
    batches = [n for n in names if n.startswith("data_batch_")]
    if len(batches) > 1:
        rest = [n for n in names if n not in batches]
        return ", ".join([f"data_batch_1..{len(batches)}", *rest])
    return ", ".join(names)


@register_dataset("cifar10")
def _load_cifar10(request: DatasetRequest) -> DataSplits:
    return _load_cifar(request, _CIFAR10, "CIFAR-10", CIFAR10_MEAN, CIFAR10_STD)


@register_dataset("cifar100")
def _load_cifar100(request: DatasetRequest) -> DataSplits:
    return _load_cifar(request, _CIFAR100, "CIFAR-100", CIFAR100_MEAN, CIFAR100_STD)


class _STL10(tv_datasets.STL10):
    """torchvision's STL-10 reader; checks only the files of the split it loads.

    torchvision's own check wants ``unlabeled_X.bin`` (2.7 GB) even for the labelled splits;
    here only ``{split}_X.bin`` and ``{split}_y.bin`` are required, md5-checked with
    torchvision's sums when ``verify_checksums``.
    """

    def __init__(self, root: Path, split: str, verify_checksums: bool) -> None:
        self._verify = verify_checksums
        self._split_files = self.train_list[:2] if split == "train" else self.test_list
        super().__init__(root, split=split, download=False)

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all(check_integrity(folder / name, md5 if self._verify else None) for name, md5 in self._split_files)


@register_dataset("stl10")
def _load_stl10(request: DatasetRequest) -> DataSplits:
    """STL-10 labelled splits (Coates et al. 2011): 96 px uint8 binaries, column-major per channel, labels 1..10."""
    root = _require_root(request, _STL10.base_folder)
    folder = root / _STL10.base_folder
    expected = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]
    layout = f"expected the binary version: {', '.join(expected)}"
    _require_files(folder, expected, "STL-10", layout)
    splits = []
    for split in ("train", "test"):
        try:
            data = _STL10(root, split=split, verify_checksums=request.verify_checksums)
        except RuntimeError as err:
            raise DataNotFound(
                f"data.root: STL-10 at {folder} failed torchvision's check "
                f"({err}); set data.verify_checksums=false to skip md5 sums"
            ) from None
        images = torch.from_numpy(np.ascontiguousarray(data.data))  # (N, 3, 96, 96), already transposed to row-major
        labels = torch.from_numpy(data.labels.astype(np.int64))  # torchvision subtracts 1: 0-based
        splits.append(Split(resize_images(images, request.image_size), labels))
    classes = tuple(getattr(data, "classes", STL10_CLASSES))  # from class_names.txt when present
    return _finish(request, splits[0], splits[1], classes, STL10_MEAN, STL10_STD, stored_size=96)


# ----------------------------------------------------------------------------- MNIST, Fashion-MNIST, KMNIST


def _load_idx(request: DatasetRequest) -> DataSplits:
    """An MNIST-like dataset (:mod:`harness.data.idx`): 1-channel uint8 images, the dataset's own class indices."""
    spec = idx.IDX_DATASETS[request.name]
    folder = request.root
    if folder is None:
        if spec.default_root is None:
            raise DataNotFound(
                f"data.root: dataset {request.name!r} needs data.root, the folder that holds its four IDX files "
                "(train-images-idx3-ubyte[.gz], ...)"
            )
        folder = spec.default_root
        if not folder.is_dir():
            raise DataNotFound(f"data.root: {spec.title} not found at {folder}, its default place; {spec.install_hint}")
    elif not folder.is_dir():
        raise DataNotFound(f"data.root: {spec.title} not found at {folder} (a folder of its four IDX files)")
    splits = []
    for split in ("train", "test"):
        images, labels = idx.read_split(folder, split, spec, request.verify_checksums)
        splits.append(Split(resize_images(images, request.image_size).contiguous(), labels))
    data = _finish(request, splits[0], splits[1], spec.classes, stored_size=int(images.shape[-1]))
    return dataclasses.replace(data, provenance={**data.provenance, "root": str(folder)})


for _name in idx.IDX_DATASETS:
    register_dataset(_name)(_load_idx)


# ----------------------------------------------------------------------------- image folders


@register_dataset("imagefolder")
def _load_imagefolder(request: DatasetRequest) -> DataSplits:
    """ImageNet-style folders ``<root>/train/<class>/*`` and ``<root>/val/<class>/*``.

    Class indices follow the sorted train folder names; val uses the same. Held in memory
    (converted to RGB, shorter side resized to image_size, centre-cropped) or streamed
    (:mod:`harness.data.streaming`), as ``data.in_memory`` decides.
    """
    root = _require_root(request, "train/ and val/ class folders")
    for part in ("train", "val"):
        if not (root / part).is_dir():
            raise DataNotFound(
                f"data.root: image folder split not found at {root / part} (expected "
                f"{root}/train/<class>/*.png|jpg and {root}/val/<class>/...)"
            )
    train = streaming.folder_source(root / "train")
    val_dirs = {p.name for p in (root / "val").iterdir() if p.is_dir() and not p.name.startswith(".")}
    extra = sorted(val_dirs - set(train.classes))
    if extra:
        raise BadInput(f"data.root: {root / 'val'} has classes that {root / 'train'} lacks: {', '.join(extra)}")
    if not val_dirs:
        raise DataNotFound(f"data.root: no images found under {root / 'val'}")
    test = streaming.folder_source(root / "val", {c: i for i, c in enumerate(train.classes)})
    return _from_sources(request, train, test)


@register_dataset("shards")
def _load_shards(request: DatasetRequest) -> DataSplits:
    """WebDataset-style tar shards (``data.shards`` for training, ``data.val_shards`` for evaluation), each sample an
    image and its ``.cls`` class index; held in memory or streamed as ``data.in_memory`` decides."""
    if request.shards is None or request.val_shards is None:
        missing = "data.shards" if request.shards is None else "data.val_shards"
        raise BadInput(
            f"{missing}: dataset 'shards' needs data.shards and data.val_shards "
            "(a glob like /data/train-*.tar, or a folder of .tar files)"
        )
    train = streaming.shard_source(request.shards, "data.shards")
    test = streaming.shard_source(request.val_shards, "data.val_shards")
    classes = tuple(str(c) for c in range(max(len(train.classes), len(test.classes))))
    return _from_sources(
        request, dataclasses.replace(train, classes=classes), dataclasses.replace(test, classes=classes)
    )


CHECKSUMMED = ("cifar10", "cifar100", "stl10", *idx.IDX_DATASETS)
"""The datasets whose files ``data.verify_checksums`` can check against published digests."""

STREAMABLE = ("imagefolder", "shards")
"""The datasets that can be streamed (``data.in_memory: false``); the others are always held in memory."""


def _from_sources(request: DatasetRequest, train: streaming.ImageSource, test: streaming.ImageSource) -> DataSplits:
    """Subset the sources, then hold them in memory or stream them (``data.in_memory``; the choice is in
    ``storage``). Channels: ``data.channels``, or with auto what the training images are (:func:`detect_channels`);
    mean and std: the training split's (on :data:`STATS_SAMPLE` images when streamed)."""
    channels = request.channels if request.channels != "auto" else streaming.detect_channels(train)
    train, test = train.with_channels(int(channels)), test.with_channels(int(channels))
    provenance: dict[str, str] = {
        "channels": f"{channels} ({'data.channels' if request.channels != 'auto' else 'auto'})"
    }
    subsets = []
    for source, n, seed, key in ((train, request.num_train, request.seed, "num_train"), (test, request.num_test,
                                  request.seed + 1, "num_test")):  # fmt: skip
        rows = stratified_subset(source.labels, n, seed, key)
        if rows is not None:
            provenance[f"subset.{key.removeprefix('num_')}"] = subset_digest(rows, len(source))
        subsets.append(source if rows is None else source.subset(rows))
    train, test = subsets
    size = request.image_size
    gigabytes = (len(train) + len(test)) * int(channels) * size * size / 1e9
    budget = f"data.memory_budget_gb={request.memory_budget_gb:g}"
    if request.in_memory == "auto":
        in_memory = gigabytes <= request.memory_budget_gb
        reason = f"{gigabytes:.2f} GB decoded at {size} px {'<=' if in_memory else '>'} {budget}"
    else:
        in_memory, reason = bool(request.in_memory), f"data.in_memory={str(request.in_memory).lower()}"
    resize = request.eval_resize or round(size * 256 / 224)
    splits = []
    for source in (train, test):
        streamed = streaming.StreamedImages(
            source, size, resize, threads=request.threads, skip_corrupt=request.skip_corrupt
        )
        splits.append(_decode_all(source, size, request) if in_memory else Split(streamed, source.labels))
    storage = (
        f"in memory ({reason})"
        if in_memory
        else f"streamed from {'shards' if request.name == 'shards' else 'files'} ({reason})"
    )
    provenance["resized"] = f"each image's shorter side to {size} px, centre crop (data.image_size)"
    if in_memory:
        mean, std = channel_stats(splits[0].images)
    else:  # a sample, decoded as the in-memory path decodes all; an unreadable one is left out (the run meets it)
        rows = torch.linspace(0, len(train) - 1, min(len(train), STATS_SAMPLE)).round().long().unique()
        sample = streaming.StreamedImages(train.subset(rows), size, size, threads=request.threads,
                                          skip_corrupt=True, quiet=True)  # fmt: skip
        images = sample[:]
        readable = torch.tensor([name not in set(sample.skipped) for name in sample.source.names], dtype=torch.bool)
        mean, std = channel_stats(images[readable])
        provenance["stats_of"] = f"{len(rows)} of {len(train)} training images, evenly spaced (streamed)"
    return DataSplits(
        request.name, splits[0], splits[1], train.classes, mean, std, storage=storage, provenance=provenance
    )


def _decode_all(source: streaming.ImageSource, size: int, request: DatasetRequest) -> Split:
    """Every image of ``source`` as one uint8 ``(N, C, size, size)`` tensor: shorter side resized to ``size``, centre
    crop. An unreadable image is bad input naming it, or with ``data.skip_corrupt`` left out (and logged)."""
    decoder = streaming.StreamedImages(source, size, size, threads=request.threads, skip_corrupt=request.skip_corrupt)
    try:
        images = decoder[:] if len(source) else torch.empty((0, source.channels, size, size), dtype=torch.uint8)
    except streaming.CorruptImage as err:
        raise BadInput(str(err)) from None
    if not decoder.skipped:
        return Split(images, source.labels)
    bad = set(decoder.skipped)
    keep = torch.tensor([name not in bad for name in source.names])
    log.warning("skipped %d unreadable image(s) of %d, first %s", len(bad), len(source), decoder.skipped[0])
    return Split(images[keep], source.labels[keep])
