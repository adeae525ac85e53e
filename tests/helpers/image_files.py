"""Small datasets in real on-disk formats, written by the tests: JPEG class folders and WebDataset-style tar shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image(rng: np.random.Generator, label: int, width: int, height: int) -> Image.Image:
    """A class-dependent picture: a coloured disc (class -> hue) at a random place on noise."""
    pixels = rng.integers(0, 80, size=(height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy, r = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height, min(width, height) * rng.uniform(0.15, 0.35)
    colour = np.array([(label * 97) % 256, (label * 53 + 128) % 256, (label * 151 + 64) % 256], dtype=np.uint8)
    pixels[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = colour
    return Image.fromarray(pixels)


def write_folder(root: Path, per_class: int, classes: int = 4, size: tuple[int, int] = (64, 48), seed: int = 0, fmt: str = "JPEG") -> Path:
    """``root/<class_i>/<n>.jpg`` (or .png): ``per_class`` images of ``size`` (width, height) per class; returns root."""
    rng = np.random.default_rng(seed)
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            image(rng, c, *size).save(folder / f"{n:05d}{suffix}", fmt, quality=90) if fmt == "JPEG" else image(rng, c, *size).save(folder / f"{n:05d}{suffix}", fmt)
    return root


def write_imagefolder(root: Path, train_per_class: int, val_per_class: int, classes: int = 4, size: tuple[int, int] = (64, 48), seed: int = 0) -> Path:
    """An ImageNet-style ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``; returns root."""
    write_folder(root / "train", train_per_class, classes, size, seed)
    write_folder(root / "val", val_per_class, classes, size, seed + 1)
    return root


def write_shards(folder: Path, prefix: str, count: int, per_shard: int, classes: int = 4, size: tuple[int, int] = (64, 48), seed: int = 0, labels: bool = True) -> list[Path]:
    """``count`` images as WebDataset shards ``folder/<prefix>-000000.tar``...: ``<key>.jpg`` + ``<key>.cls`` per sample."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, count, per_shard)):
        path = folder / f"{prefix}-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for n in range(start, min(count, start + per_shard)):
                label = n % classes
                buf = io.BytesIO()
                image(rng, label, *size).save(buf, "JPEG", quality=90)
                members = {f"{n:08d}.jpg": buf.getvalue()}
                if labels:
                    members[f"{n:08d}.cls"] = str(label).encode()
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
