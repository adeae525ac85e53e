"""What a dataset is once loaded: splits of uint8 images and labels, with class names and normalisation.

A leaf module (it imports only torch): the methods receive a :class:`DataSplits` in
``setup`` and the evaluations' callers pass :class:`Split` s around, without depending on
the loaders in :mod:`harness.data.datasets`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

__all__ = ["DataSplits", "Images", "Split"]


class Images(Protocol):
    """uint8 images ``(N, C, S, S)`` indexed by rows (a slice, an index tensor or array) -> a uint8 tensor: a tensor
    held in memory, or :class:`harness.data.streaming.StreamedImages`, which decodes the rows when indexed."""

    @property
    def shape(self) -> torch.Size: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def ndim(self) -> int: ...

    def __getitem__(self, index: Any) -> torch.Tensor: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True, eq=False)
class Split:
    """One split: uint8 images ``(N, C, S, S)`` (in memory, or streamed: see :class:`Images`) and int64 labels
    ``(N,)``."""

    images: Images
    labels: torch.Tensor
    attributes: list[dict[str, str]] | None = None
    """Per-image nuisance attributes (``shapes`` only): shape, colour, size, position."""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[-1] != self.images.shape[-2]:
            raise ValueError(f"images must be uint8 (N, C, S, S), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be int64 ({self.images.shape[0]},), got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.attributes is not None and len(self.attributes) != len(self.labels):
            raise ValueError(f"{len(self.attributes)} attributes for {len(self.labels)} images")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True, eq=False)
class DataSplits:
    """A dataset's train and test splits, class names and normalisation constants."""

    name: str
    train: Split
    test: Split
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    """Per-channel mean of the pixel values in [0, 1] units."""
    std: tuple[float, ...]
    storage: str = "in memory"
    """Where the images are: ``in memory`` or ``streamed ...``, with the reason (``data.in_memory``)."""
    provenance: Mapping[str, str] = field(default_factory=dict)
    """What a run records about its data beyond the config (``fingerprint``, ``fingerprint_of``, ``normalize``,
    ``resized``, ``subset.train`` / ``subset.test`` digests, ...): see :func:`harness.data.datasets.load_dataset`."""

    @property
    def streamed(self) -> bool:
        return isinstance(self.train.images, torch.Tensor) is False

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)
