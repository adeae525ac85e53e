"""Streamed images: image folders and tar shards read image by image, never held in memory as a whole.

A :class:`ImageSource` lists the images (paths in a folder, or members of WebDataset-style tar shards) with their
labels and reads one image's bytes, for large datasets that are not decoded into one tensor. Two consumers:

* pretraining, :class:`TrainLoader`: DataLoader workers decode each image and take every view's random resized crop
  from the original (antialiased), keyed as :class:`harness.data.augment.KeyedDraws` draws, so an image's views
  depend on (seed, epoch, image, view) alone; the rest of the recipe runs on the training device
  (:class:`harness.data.augment.Augmenter` with ``cropped=True``);
* evaluation, :class:`StreamedImages`: a lazy stand-in for a split's uint8 tensor that decodes the indexed images
  with the linear protocol's transform (resize to ``eval_resize``, centre crop) in a thread pool.

Shards (``n01440764_10026.jpg`` + ``n01440764_10026.cls``, the class index as text) are indexed once and read by
random access, so an epoch's order is one seeded permutation; they must sit on a file system, not an object store.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import tarfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from core.errors import BadInput, DataNotFound, RunFailed
from core.views import CX, CY, NUM_DRAWS, RATIO, SCALE, View, crop_box
from harness.config.schema import AugmentConfig
from harness.data.augment import KeyedDraws

__all__ = [
    "IMAGE_SUFFIXES",
    "CorruptImage",
    "ImageSource",
    "StreamedImages",
    "TrainLoader",
    "folder_source",
    "shard_source",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""What counts as an image, in a folder or a shard (case-insensitive)."""

LABEL_SUFFIX = ".cls"
"""A shard sample's class index, as text (WebDataset's convention)."""


class CorruptImage(RunFailed):
    """An image that cannot be read or decoded, found while streaming (the trial fails with this line)."""


def corrupt_message(name: str, err: BaseException) -> str:
    return (
        f"data: cannot read image {name} ({type(err).__name__}: {err}); set data.skip_corrupt=true to skip such images"
    )


# ----------------------------------------------------------------------------- sources


@dataclass
class ImageSource:
    """The images of one split: where each one's bytes are, and its label.

    ``locations[i]`` is a file path (an image folder) or ``(shard path, offset, size)`` of a
    tar member; ``names[i]`` is what an error message calls it.
    """

    names: list[str]
    labels: torch.Tensor
    locations: list[Any]
    classes: tuple[str, ...]
    channels: int = 3
    """What every image is decoded to: 1 (Pillow's ``L``) or 3 (``RGB``); see :func:`detect_channels`."""
    root: str = ""
    """The split's folder (names in :func:`listing` are relative to it); empty for shards."""
    _files: dict[tuple[int, str], Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, rows: Sequence[int] | torch.Tensor | np.ndarray) -> ImageSource:
        rows = [int(r) for r in rows]
        return ImageSource(
            [self.names[r] for r in rows],
            self.labels[rows],
            [self.locations[r] for r in rows],
            self.classes,
            self.channels,
            self.root,
        )

    def with_channels(self, channels: int) -> ImageSource:
        return ImageSource(self.names, self.labels, self.locations, self.classes, channels, self.root)

    def read(self, i: int) -> bytes:
        """The encoded bytes of image ``i`` (shards: one seek + read on a handle kept per process and thread)."""
        location = self.locations[i]
        if isinstance(location, str):
            with open(location, "rb") as f:
                return f.read()
        path, offset, size = location
        key = (os.getpid(), f"{threading.get_ident()}:{path}")  # a forked loader worker opens its own handles
        handle = self._files.get(key)
        if handle is None:
            handle = self._files[key] = open(path, "rb")  # noqa: SIM115 - kept open for the process's lifetime
        handle.seek(offset)
        return handle.read(size)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers under spawn: no open handles travel
        return {**self.__dict__, "_files": {}}


def folder_source(folder: Path, class_to_idx: dict[str, int] | None = None) -> ImageSource:
    """An ImageNet-style split ``folder/<class>/*.jpg``; classes sorted by name unless ``class_to_idx`` is given.

    Hidden folders and files (a name starting with ``.``: ``.ipynb_checkpoints``, ``._x.jpg``) are skipped.
    BadInput (one line) for a missing folder, a folder without class folders, or a class folder without images
    or that cannot be read.
    """
    if not folder.is_dir():
        raise DataNotFound(f"data.root: image folder split not found at {folder}")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_to_idx is None:
        if not class_dirs:
            raise DataNotFound(f"data.root: {folder} has no class folders (expected {folder}/<class>/*.jpg)")
        class_to_idx = {p.name: i for i, p in enumerate(class_dirs)}
    names: list[str] = []
    labels: list[int] = []
    for class_dir in class_dirs:
        if class_dir.name not in class_to_idx:
            raise BadInput(f"data.root: {folder} has class folder {class_dir.name!r} that the training split lacks")
        try:
            os.scandir(class_dir).close()  # rglob would take an unreadable folder for an empty one
        except OSError as err:
            raise BadInput(f"data.root: class folder {class_dir} cannot be read ({err.strerror})") from None
        files = sorted(
            str(p)
            for p in class_dir.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
            and p.is_file()
        )
        if not files:
            raise BadInput(f"data.root: class folder {class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        names += files
        labels += [class_to_idx[class_dir.name]] * len(files)
    classes = tuple(sorted(class_to_idx, key=class_to_idx.__getitem__))
    return ImageSource(names, torch.tensor(labels, dtype=torch.int64), list(names), classes, root=str(folder))


GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
"""Pillow modes of single-channel images (with or without alpha)."""

CHANNEL_SAMPLE = 64
"""``data.channels: auto`` reads the headers of this many images of the training split, evenly spaced."""


def detect_channels(source: ImageSource, sample: int = CHANNEL_SAMPLE) -> int:
    """1 when every one of ``sample`` evenly spaced images of ``source`` is grayscale (:data:`GRAYSCALE_MODES`, read
    from the header alone), else 3. An unreadable image counts as neither (it fails later, or is skipped)."""
    n = len(source)
    count = min(n, sample)
    rows = sorted({round(i * (n - 1) / max(1, count - 1)) for i in range(count)})
    for row in rows:
        try:
            mode = Image.open(io.BytesIO(source.read(row))).mode
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
        if mode not in GRAYSCALE_MODES:
            return 3
    return 1


def listing(source: ImageSource) -> list[str]:
    """One line per image, ``name<TAB>bytes<TAB>label``: a folder's files relative to its folder, a shard's members
    as ``shard file name:member``. What a streamed dataset's fingerprint hashes."""
    lines = []
    for name, location, label in zip(source.names, source.locations, source.labels.tolist(), strict=True):
        if isinstance(location, str):
            size = os.stat(location).st_size
            name = os.path.relpath(location, source.root) if source.root else name
        else:
            size = location[2]
            name = f"{os.path.basename(location[0])}:{name.rpartition(':')[2]}"
        lines.append(f"{name}\t{size}\t{label}")
    return lines


def shard_files(pattern: str, key: str) -> list[Path]:
    """The ``.tar`` files of ``pattern`` (a glob, or a folder of ``.tar``), sorted; BadInput naming ``key`` if none."""
    path = Path(pattern).expanduser()
    files = (
        sorted(path.glob("*.tar"))
        if path.is_dir()
        else sorted(Path(p) for p in glob.glob(str(path)) if p.endswith(".tar"))
    )
    if not files:
        raise DataNotFound(
            f"{key}: {pattern} matches no .tar shards (give a glob like /data/train-*.tar or a folder of .tar files)"
        )
    return files


def shard_source(pattern: str, key: str = "data.shards") -> ImageSource:
    """WebDataset-style shards: every sample is an image member plus a ``.cls`` member with its class index.

    Indexed once (member offsets from the tar headers, nothing decoded). BadInput for a
    glob that matches nothing, an unreadable tar, or a sample without a label.
    """
    names: list[str] = []
    labels: list[int] = []
    locations: list[tuple[str, int, int]] = []
    for shard in shard_files(pattern, key):
        images: dict[str, tarfile.TarInfo] = {}
        classes: dict[str, tarfile.TarInfo] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                members = tar.getmembers()
                for member in members:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.rpartition(
                        "/"
                    )  # WebDataset: the key ends at the file name's first dot
                    base_stem, _, suffix = base.partition(".")
                    stem = f"{folder}/{base_stem}" if folder else base_stem
                    if f".{suffix.lower()}" in IMAGE_SUFFIXES:
                        images[stem] = member
                    elif f".{suffix.lower()}" == LABEL_SUFFIX:
                        classes[stem] = member
                for stem, member in images.items():
                    if stem not in classes:
                        raise BadInput(
                            f"{key}: shard {shard} has {member.name} without a "
                            f"label ({stem}{LABEL_SUFFIX}, the class index as text)"
                        )
                    labels.append(_read_label(tar, classes[stem], shard, key))
                    names.append(f"{shard}:{member.name}")
                    locations.append((str(shard), member.offset_data, member.size))
        except (tarfile.TarError, OSError) as err:
            raise BadInput(f"{key}: {shard} is not a readable tar file ({err})") from None
    if not names:
        raise DataNotFound(f"{key}: the shards of {pattern} hold no images ({', '.join(IMAGE_SUFFIXES)} members)")
    label_tensor = torch.tensor(labels, dtype=torch.int64)
    classes_ = tuple(str(c) for c in range(int(label_tensor.max()) + 1))
    return ImageSource(names, label_tensor, locations, classes_)


def _read_label(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: Path, key: str) -> int:
    handle = tar.extractfile(member)
    text = handle.read().decode("utf-8", "replace").strip() if handle is not None else ""
    try:
        label = int(text)
    except ValueError:
        raise BadInput(
            f"{key}: shard {shard} member {member.name} holds {text[:20]!r}, expected a class index (an integer >= 0)"
        ) from None
    if label < 0:
        raise BadInput(f"{key}: shard {shard} member {member.name} holds {label}, expected a class index >= 0")
    return label


# ----------------------------------------------------------------------------- decoding


def decode(
    source: ImageSource, i: int, draft: Callable[[int, int], tuple[int, int] | None] | None = None
) -> tuple[Image.Image, int, int]:
    """Image ``i`` decoded to ``source.channels`` (Pillow's ``L`` or ``RGB``), with its original (width, height).

    ``draft(width, height)`` may name the smallest (width, height) the caller needs: a JPEG is
    then decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps it, which is most of the
    decoding time saved for large photos. Raises CorruptImage naming the image for anything
    unreadable or truncated.
    """
    try:
        image = Image.open(io.BytesIO(source.read(i)))
        width, height = image.size
        wanted = draft(width, height) if draft is not None and image.format == "JPEG" else None
        mode = "L" if source.channels == 1 else "RGB"
        if wanted is not None:
            image.draft(mode, wanted)
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L") and mode == "L":  # 16-bit grey: its high byte, not a clipped one
            return Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)), width, height
        return image.convert(mode), width, height
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptImage(corrupt_message(source.names[i], err)) from None


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array  # L: (H, W)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # HWC -> CHW


def eval_view(source: ImageSource, i: int, size: int, resize: int) -> torch.Tensor:
    """The linear protocol's view of image ``i``: shorter side resized to ``resize`` (antialiased), centre crop
    ``size``.

    uint8 (C, size, size), C = ``source.channels``.
    """

    def needed(width: int, height: int) -> tuple[int, int]:
        scale = resize / min(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))

    image, width, height = decode(source, i, needed)
    scale = resize / min(width, height)
    left, top = (width * scale - size) / 2, (height * scale - size) / 2
    box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)  # the crop, in original pixels
    return _to_tensor(_resize(image, width, height, box, size))


def _resize(
    image: Image.Image, width: int, height: int, box: tuple[float, float, float, float], size: int
) -> Image.Image:
    """The region ``box`` of the original (width, height) image, resized to (size, size); ``image`` may be a draft."""
    sx, sy = image.size[0] / width, image.size[1] / height
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box)


def crop_views(
    source: ImageSource, i: int, uniforms: Sequence[torch.Tensor], views: Sequence[View], cfg: AugmentConfig
) -> list[torch.Tensor]:
    """Image ``i``'s random resized crop for each view, from the original image: the crop of
    :func:`core.views.crop_box` for the view's uniforms (NUM_DRAWS,) and this image's sides, resized to the view's
    side (bilinear, antialiased). uint8 (C, s, s) each.
    """
    boxes: list[tuple[float, float, float, float]] = []

    def needed(width: int, height: int) -> tuple[int, int] | None:
        for u, spec in zip(uniforms, views, strict=True):
            v = u.tolist()  # Python floats: the tensor version's ~20 tiny ops cost as much as decoding a JPEG
            boxes.append(
                crop_box(v[SCALE], v[RATIO], v[CX], v[CY], spec.scale or cfg.crop_scale, cfg.crop_ratio, height, width)
            )
        reduce = min(min(w * width, h * height) / spec.size for (w, h, _, _), spec in zip(boxes, views, strict=True))
        if reduce < 2:
            return None
        return int(width / reduce) + 1, int(height / reduce) + 1  # JPEG draft keeps at least this

    image, width, height = decode(source, i, needed)
    if not boxes:  # not a JPEG: the draft callback did not run
        needed(width, height)
    out = []
    for (w, h, cx, cy), spec in zip(boxes, views, strict=True):
        left, top = (cx + 1) / 2 * width - w * width / 2, (cy + 1) / 2 * height - h * height / 2
        out.append(
            _to_tensor(_resize(image, width, height, (left, top, left + w * width, top + h * height), spec.size))
        )
    return out


def _substitute(source: ImageSource, i: int, attempt: Any, skip_corrupt: bool, skipped: list[str]) -> Any:
    """``attempt(i)``; on a corrupt image, raise, or (``skip_corrupt``) record it and try the next rows in turn."""
    n = len(source)
    for offset in range(n):
        j = (i + offset) % n
        try:
            return attempt(j)
        except CorruptImage:
            if not skip_corrupt:
                raise
            skipped.append(source.names[j])
    raise CorruptImage(f"data: no image of {n} could be read (first: {source.names[0]})")


# ----------------------------------------------------------------------------- evaluation


class StreamedImages:
    """A split's images, decoded when indexed: stands in for a uint8 ``(N, C, S, S)`` tensor.

    ``images[rows]`` (a slice, an index tensor or array) decodes those rows with the
    evaluation transform (:func:`eval_view`) in a pool of ``threads`` (Pillow releases the
    GIL while decoding). A corrupt image raises :class:`CorruptImage`, or with
    ``skip_corrupt`` is replaced by a black image and counted in :attr:`skipped`.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(
        self,
        source: ImageSource,
        image_size: int,
        eval_resize: int,
        *,
        threads: int = 4,
        skip_corrupt: bool = False,
        quiet: bool = False,
    ) -> None:
        self.source, self.image_size, self.eval_resize = source, image_size, eval_resize
        self.threads, self.skip_corrupt, self.quiet = max(1, threads), skip_corrupt, quiet
        self.skipped: list[str] = []

    def _skip(self, name: str) -> None:
        if name not in self.skipped:
            if not self.quiet:
                log.warning("skipped an unreadable image (a blank image in its place): %s", name)
            self.skipped.append(name)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.source), self.source.channels, self.image_size, self.image_size))

    def __len__(self) -> int:
        return len(self.source)

    def subset(self, rows: Sequence[int] | torch.Tensor | np.ndarray) -> StreamedImages:
        """The images of ``rows`` only, still streamed."""
        return StreamedImages(
            self.source.subset(rows),
            self.image_size,
            self.eval_resize,
            threads=self.threads,
            skip_corrupt=self.skip_corrupt,
        )

    def __getitem__(self, index: slice | torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
        rows = (
            range(len(self))[index]
            if isinstance(index, slice)
            else [int(r) for r in torch.as_tensor(index).reshape(-1)]
        )
        size = self.image_size

        def decode(row: int) -> torch.Tensor:
            try:
                return eval_view(self.source, row, size, self.eval_resize)
            except CorruptImage:
                if not self.skip_corrupt:
                    raise
                self._skip(self.source.names[row])
                return torch.zeros((self.source.channels, size, size), dtype=torch.uint8)

        if len(rows) > 1 and self.threads > 1:  # the pool's threads return plain tensors; the caller's mode stacks them
            with ThreadPoolExecutor(max_workers=min(self.threads, len(rows))) as pool:
                images = list(pool.map(decode, rows))
        else:
            images = [decode(row) for row in rows]
        return torch.stack(images) if images else torch.empty((0, self.source.channels, size, size), dtype=torch.uint8)

    def crops(self, rows: torch.Tensor, uniforms: torch.Tensor, view: View, cfg: AugmentConfig) -> torch.Tensor:
        """The random resized crops of ``rows`` for uniforms (B, NUM_DRAWS), from the original images
        (:func:`crop_views`), each of side ``view.size``: uint8 (B, C, s, s). Fine-tuning's views."""
        size, rows_ = view.size, [int(r) for r in rows]

        def make(k: int) -> torch.Tensor:
            try:
                return crop_views(self.source, rows_[k], [uniforms[k]], [view], cfg)[0]
            except CorruptImage:
                if not self.skip_corrupt:
                    raise
                self._skip(self.source.names[rows_[k]])
                return torch.zeros((self.source.channels, size, size), dtype=torch.uint8)

        with ThreadPoolExecutor(max_workers=max(1, min(self.threads, len(rows_)))) as pool:
            made = list(pool.map(make, range(len(rows_))))
        return torch.stack(made) if made else torch.empty((0, self.source.channels, size, size), dtype=torch.uint8)


# ----------------------------------------------------------------------------- pretraining


@dataclass
class _Batch:
    """One step's crops, made in a loader worker: rows (B,), one uint8 (B, C, s, s) per view, the images skipped,
    or the one-line error that stopped it (raised in the training process, not as a worker's traceback)."""

    rows: torch.Tensor
    views: list[torch.Tensor]
    skipped: list[str]
    error: str | None = None


class _TrainSet(torch.utils.data.Dataset[_Batch]):
    """Items are (epoch key, step, row); ``__getitems__`` makes a whole step's crops at once."""

    def __init__(self, source: ImageSource, views: Sequence[View], cfg: AugmentConfig, skip_corrupt: bool) -> None:
        self.source, self.views, self.cfg, self.skip_corrupt = source, list(views), cfg, skip_corrupt

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int, int]) -> _Batch:
        return self.__getitems__([item])

    def __getitems__(self, items: list[tuple[int, int, int]]) -> _Batch:
        key, step = items[0][0], items[0][1]
        rows = torch.tensor([row for _, _, row in items], dtype=torch.int64)
        draws = KeyedDraws(key, rows, step)
        uniforms = [draws.view(v).uniforms(NUM_DRAWS) for v in range(len(self.views))]
        out = [
            torch.empty((len(items), self.source.channels, spec.size, spec.size), dtype=torch.uint8)
            for spec in self.views
        ]
        skipped: list[str] = []
        try:
            for k, row in enumerate(rows.tolist()):
                own = [u[k] for u in uniforms]  # a substitute image gets the draws of the row it stands in for
                made = _substitute(
                    self.source,
                    row,
                    lambda j, own=own: crop_views(self.source, j, own, self.views, self.cfg),
                    self.skip_corrupt,
                    skipped,
                )
                for v, crop in enumerate(made):
                    out[v][k] = crop
        except CorruptImage as err:
            return _Batch(rows, [], skipped, str(err))
        return _Batch(rows, out, skipped)


def _identity(batch: Any) -> Any:  # a _Batch already: __getitems__ collates a step itself
    return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # a loader worker decodes; the training process owns the cores' BLAS threads


class _StepSampler:
    """Yields the current epoch's steps as lists of (key, step, row); set by :meth:`TrainLoader.epoch`."""

    def __init__(self) -> None:
        self.key = 0
        self.steps: list[torch.Tensor] = []

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for step, rows in enumerate(self.steps):
            yield [(self.key, step, int(r)) for r in rows]

    def __len__(self) -> int:
        return len(self.steps)


class TrainLoader:
    """Pretraining batches streamed from ``source``: every step's views as uint8 crops, made by DataLoader workers.

    Args:
        source: the training images.
        views: the method's views (crop sizes and scale ranges).
        cfg: the augmentation recipe (crop scale and ratio).
        num_workers: loader processes (0: decode in this process).
        prefetch: steps each worker prepares ahead.
        pin_memory: page-locked batches, for asynchronous copies to a GPU.
        skip_corrupt: replace an unreadable image by the next readable one (counted in :attr:`skipped`).
    """

    def __init__(
        self,
        source: ImageSource,
        views: Sequence[View],
        cfg: AugmentConfig,
        *,
        num_workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool = False,
        skip_corrupt: bool = False,
    ) -> None:
        self.sampler = _StepSampler()
        self.skipped: list[str] = []
        kw: dict[str, Any] = {"prefetch_factor": prefetch, "worker_init_fn": _worker_init} if num_workers else {}
        self.loader = torch.utils.data.DataLoader(
            _TrainSet(source, views, cfg, skip_corrupt),
            batch_sampler=self.sampler,
            collate_fn=_identity,
            num_workers=num_workers,
            pin_memory=pin_memory,
            **kw,
        )

    def epoch(self, key: int, steps: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        """(rows, crops per view) of each of ``steps`` (the rows of each step, this worker's share), in order."""
        self.sampler.key, self.sampler.steps = key, list(steps)
        for batch in self.loader:
            if batch.error is not None:
                raise CorruptImage(batch.error)
            for name in batch.skipped:
                if name not in self.skipped:
                    log.warning("skipped an unreadable image: %s", name)
                    self.skipped.append(name)
            yield batch.rows, batch.views
