"""IDX files (LeCun et al.'s MNIST format): MNIST, Fashion-MNIST and KMNIST as uint8 tensors.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one big-endian
uint32 per dimension, then the values in row-major order. Only unsigned bytes (type 0x08) occur in these
datasets. Files may be gzipped (``.gz``) or plain; the four standard names are looked up in ``data.root``:

    images, labels = read_split(root, "train", spec)     # (60000, 1, 28, 28) uint8, (60000,) int64

``verify_checksums`` compares each file with the digests of :class:`IdxDataset`: the md5 of the ``.gz`` file as
published (torchvision's ``resources``, the authors' archives), or the md5 of the decompressed content (for
Fashion-MNIST computed from Debian's ``dataset-fashion-mnist`` 0.0~git20200523.55506a9-1, whose ``.gz`` files
were recompressed, so their own md5 differs from Zalando's while the content is the same).
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.errors import BadInput, DataNotFound

__all__ = ["FILES", "IDX_DATASETS", "IdxDataset", "read_idx", "read_split"]

UBYTE = 0x08
"""The IDX type code of unsigned bytes, the only one MNIST-like datasets use."""

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""The standard file names (without ``.gz``) of each split: images, then labels."""


@dataclass(frozen=True)
class IdxDataset:
    """An MNIST-like dataset: its title, class names (in the dataset's own index order), default folder and digests.

    ``gz_md5``: file name (with ``.gz``) -> md5 of the published archive; ``raw_md5``: file name (without) -> md5 of
    the decompressed content. A file passes ``verify_checksums`` when either matches.
    """

    title: str
    classes: tuple[str, ...]
    default_root: Path | None = None
    install_hint: str = ""
    gz_md5: dict[str, str] = field(default_factory=dict)
    raw_md5: dict[str, str] = field(default_factory=dict)


IDX_DATASETS = {
    "mnist": IdxDataset(
        "MNIST",
        tuple(str(d) for d in range(10)),
        gz_md5={  # torchvision.datasets.MNIST.resources
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion_mnist": IdxDataset(
        "Fashion-MNIST",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        default_root=Path("/usr/share/datasets/fashion-mnist"),
        install_hint="install Debian's package (apt-get install -y dataset-fashion-mnist) or set data.root",
        gz_md5={  # Zalando's archives, as torchvision.datasets.FashionMNIST.resources lists them
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        raw_md5={  # the decompressed files of Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
    ),
    "kmnist": IdxDataset(
        "KMNIST",
        ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),  # Clanuwat et al. 2018, romanised
        gz_md5={  # torchvision.datasets.KMNIST.resources
            "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
            "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
            "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
            "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
        },
    ),
}


def find_file(folder: Path, name: str) -> Path | None:
    """``folder/name.gz`` or ``folder/name``, whichever exists (the gzipped one first)."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _content(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if path.suffix == ".gz" else data
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise BadInput(f"data.root: cannot read {path} ({type(err).__name__}: {err})") from None


def read_idx(path: Path, ndim: int, spec: IdxDataset | None = None, verify: bool = False) -> np.ndarray:
    """The uint8 array of IDX file ``path`` (gzipped or not), which must have ``ndim`` dimensions.

    BadInput naming the file for a wrong magic number, a size that does not match the header, or (``verify``) a
    digest that matches none of ``spec``'s.
    """
    data = _content(path)
    if verify and spec is not None:
        _verify(path, data, spec)
    expected_magic = UBYTE << 8 | ndim
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else -1
    if magic != expected_magic:
        raise BadInput(
            f"data.root: {path} is not an IDX file of {ndim}-d unsigned bytes: magic number {magic:#010x}, "
            f"expected {expected_magic:#010x}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise BadInput(f"data.root: {path} ends inside its IDX header ({len(data)} bytes, the header is {header})")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise BadInput(f"data.root: {path} holds {len(data)} bytes but its IDX header {dims} needs {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _verify(path: Path, data: bytes, spec: IdxDataset) -> None:
    accepted = []
    if path.suffix == ".gz" and path.name in spec.gz_md5:
        accepted.append(spec.gz_md5[path.name] == hashlib.md5(path.read_bytes()).hexdigest())
    raw_name = path.name.removesuffix(".gz")
    if raw_name in spec.raw_md5:
        accepted.append(spec.raw_md5[raw_name] == hashlib.md5(data).hexdigest())
    if not accepted:
        raise BadInput(
            f"data.verify_checksums: no digest of {path.name} is known for {spec.title} "
            f"(known: the archives {', '.join(spec.gz_md5) or 'none'}); set data.verify_checksums=false"
        )
    if not any(accepted):
        raise BadInput(
            f"data.verify_checksums: {path} matches none of {spec.title}'s published digests (the md5 of the "
            "archive or of its content); the file is damaged or not the dataset's"
        )


def read_split(folder: Path, split: str, spec: IdxDataset, verify: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 ``(N, 1, H, W)`` and labels int64 ``(N,)`` of ``split`` (train or test) from ``folder``."""
    image_name, label_name = FILES[split]
    paths = {name: find_file(folder, name) for name in (image_name, label_name)}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        wanted = ", ".join(f"{n}[.gz]" for pair in FILES.values() for n in pair)
        raise DataNotFound(f"data.root: {spec.title} at {folder} lacks {', '.join(missing)} (expected {wanted})")
    image_path, label_path = paths[image_name], paths[label_name]
    assert image_path is not None and label_path is not None
    images = read_idx(image_path, 3, spec, verify)
    labels = read_idx(label_path, 1, spec, verify)
    if len(images) != len(labels):
        raise BadInput(f"data.root: {image_path} holds {len(images)} images but {label_path} {len(labels)} labels")
    if len(labels) and int(labels.max()) >= len(spec.classes):
        raise BadInput(
            f"data.root: {label_path} holds label {int(labels.max())}; {spec.title} has {len(spec.classes)} classes"
        )
    return torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64))
