"""Tests of the dataset loaders and the procedural shapes generator.

Real datasets are stood in for by tiny files written in their real on-disk formats.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import BadInput, DataNotFound
from harness.data.datasets import DataSplits, list_datasets, load_dataset, stratified_subset
from harness.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, generate_shapes

# ----------------------------------------------------------------------------- shapes


def test_shapes_same_seed_is_identical_and_prefix_stable() -> None:
    a_images, a_labels, a_attrs = generate_shapes(600, image_size=16, seed=7)
    b_images, b_labels, b_attrs = generate_shapes(600, image_size=16, seed=7)
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels) and a_attrs == b_attrs
    c_images, c_labels, c_attrs = generate_shapes(100, image_size=16, seed=7)
    assert torch.equal(c_images, a_images[:100]) and torch.equal(c_labels, a_labels[:100]) and c_attrs == a_attrs[:100]


def test_shapes_different_seeds_differ() -> None:
    a, _, _ = generate_shapes(50, image_size=16, seed=0)
    b, _, _ = generate_shapes(50, image_size=16, seed=1)
    assert not torch.equal(a, b)
    assert (a.float() - b.float()).abs().mean() > 20  # not a near-copy either


def test_shapes_tensors_and_attributes() -> None:
    images, labels, attrs = generate_shapes(1200, image_size=24, seed=3)
    assert images.shape == (1200, 3, 24, 24) and images.dtype == torch.uint8
    assert labels.shape == (1200,) and labels.dtype == torch.int64
    assert images.min() < 30 and images.max() > 225  # the full range is used
    counts = torch.bincount(labels, minlength=len(SHAPES))
    assert len(counts) == len(SHAPES) and counts.min() >= 0.8 * 1200 / len(SHAPES)
    assert len(attrs) == 1200
    for label, attr in zip(labels.tolist(), attrs):
        assert set(attr) == {"shape", "colour", "size", "position"}
        assert attr["shape"] == SHAPES[label]
        assert attr["colour"] in COLOURS and attr["size"] in SIZES and attr["position"] in POSITIONS
    for values, name in ((COLOURS, "colour"), (SIZES, "size"), (POSITIONS, "position")):
        assert {a[name] for a in attrs} == set(values), name  # every nuisance value occurs


def test_shapes_colour_attribute_matches_pixels() -> None:
    """A large shape's centre pixel is (up to noise) its named colour."""
    images, _, attrs = generate_shapes(400, image_size=32, seed=5)
    checked = 0
    for image, attr in zip(images, attrs):
        if attr["size"] == "large" and attr["position"] == "centre" and attr["shape"] in ("circle", "square"):
            centre = image[:, 15:17, 15:17].float().mean(dim=(1, 2)) / 255
            assert (centre - torch.tensor(COLOURS[attr["colour"]])).abs().max() < 0.2, attr
            checked += 1
    assert checked >= 5


def test_load_shapes_splits() -> None:
    splits = load_dataset("shapes", image_size=16, num_train=300, num_test=120, seed=2)
    assert isinstance(splits, DataSplits)
    assert len(splits.train) == 300 and len(splits.test) == 120
    assert splits.classes == SHAPES and splits.num_classes == len(SHAPES)
    assert splits.channels == 3 and splits.image_size == 16
    assert not torch.equal(splits.train.images[:120], splits.test.images)
    assert splits.train.attributes is not None and splits.test.attributes is not None
    mean = splits.train.images.float().div(255).mean(dim=(0, 2, 3))
    assert torch.allclose(torch.tensor(splits.mean), mean, atol=1e-4)
    assert all(0.1 < s < 0.5 for s in splits.std)
    again = load_dataset("shapes", image_size=16, num_train=300, num_test=120, seed=2)
    assert torch.equal(again.train.images, splits.train.images) and torch.equal(again.test.labels, splits.test.labels)


# ----------------------------------------------------------------------------- digits


def test_digits_matches_sklearn() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    splits = load_dataset("digits", image_size=8)
    assert len(splits.train) + len(splits.test) == 1797
    assert splits.train.images.shape[1:] == (1, 8, 8) and splits.channels == 1
    assert set(splits.train.labels.tolist()) == set(range(10)) and set(splits.test.labels.tolist()) == set(range(10))
    expected = {(bytes(np.rint(x * 255 / 16).astype(np.uint8).tobytes()), int(y)) for x, y in zip(digits.images, digits.target)}
    loaded = {(img[0].numpy().tobytes(), int(y)) for split in (splits.train, splits.test) for img, y in zip(split.images, split.labels)}
    assert loaded == expected
    assert splits.classes == tuple(str(d) for d in range(10))


def test_digits_resized() -> None:
    small = load_dataset("digits", image_size=8)
    big = load_dataset("digits", image_size=32)
    assert big.train.images.shape == (len(small.train), 1, 32, 32)
    assert torch.equal(big.train.labels, small.train.labels)
    # bilinear upsampling keeps the mean brightness of each image (up to rounding and borders)
    diff = (big.train.images.float().mean(dim=(1, 2, 3)) - small.train.images.float().mean(dim=(1, 2, 3))).abs()
    assert diff.max() < 8


def test_digits_subset_is_stratified_and_seeded() -> None:
    a = load_dataset("digits", image_size=8, num_train=200, num_test=50, seed=0)
    b = load_dataset("digits", image_size=8, num_train=200, num_test=50, seed=0)
    c = load_dataset("digits", image_size=8, num_train=200, num_test=50, seed=1)
    assert len(a.train) == 200 and len(a.test) == 50
    assert torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.train.images, c.train.images)
    assert torch.bincount(a.train.labels, minlength=10).tolist() == [20] * 10


def test_stratified_subset_proportions() -> None:
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    idx = stratified_subset(labels, 10, seed=0, key="num_train")
    assert idx is not None and torch.bincount(labels[idx]).tolist() == [6, 3, 1]
    assert stratified_subset(labels, 100, seed=0, key="num_train") is None
    with pytest.raises(BadInput, match="data.num_test.*101.*100"):
        stratified_subset(labels, 101, seed=0, key="num_test")


# ----------------------------------------------------------------------------- CIFAR


def _write_cifar(root: Path, hundred: bool, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Write a tiny CIFAR in the python format; returns the HWC images and labels per split.

    The real files are Python 2 pickles: their ``str`` keys read back as ``b"data"`` with
    ``encoding="bytes"`` and as ``"data"`` with torchvision's ``encoding="latin1"``; a protocol 2
    pickle with ``str`` keys reads back the same way.
    """
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    num_classes = 100 if hundred else 10
    label_key = "fine_labels" if hundred else "labels"
    files = {"train": ["train"], "test": ["test"]} if hundred else {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    written = {}
    for split, names in files.items():
        images, labels = [], []
        for name in names:
            chw = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
            y = rng.integers(0, num_classes, size=3).tolist()
            entry = {"batch_label": name, "data": chw.reshape(3, 3072), label_key: y, "filenames": ["x.png"] * 3}
            with open(folder / name, "wb") as f:
                pickle.dump(entry, f, protocol=2)
            images.append(chw.transpose(0, 2, 3, 1))
            labels.extend(y)
        written[split] = (np.concatenate(images), labels)
    meta_name, meta_key = ("meta", "fine_label_names") if hundred else ("batches.meta", "label_names")
    with open(folder / meta_name, "wb") as f:
        pickle.dump({meta_key: [f"class{i}" for i in range(num_classes)]}, f, protocol=2)
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_round_trip(tmp_path: Path, name: str) -> None:
    written = _write_cifar(tmp_path, hundred=name == "cifar100", rng=np.random.default_rng(0))
    splits = load_dataset(name, root=tmp_path)
    for split, (hwc, labels) in zip((splits.train, splits.test), (written["train"], written["test"])):
        assert split.images.shape == (len(labels), 3, 32, 32) and split.images.dtype == torch.uint8
        assert torch.equal(split.images.permute(0, 2, 3, 1), torch.from_numpy(hwc))  # channel order
        assert split.labels.tolist() == labels
    assert splits.num_classes == (100 if name == "cifar100" else 10) and splits.classes[3] == "class3"
    assert splits.mean[0] == pytest.approx(0.5071 if name == "cifar100" else 0.4914)


def test_cifar_resize_and_subset(tmp_path: Path) -> None:
    _write_cifar(tmp_path, hundred=False, rng=np.random.default_rng(1))
    splits = load_dataset("cifar10", root=tmp_path, image_size=16, num_test=2)
    assert splits.train.images.shape == (15, 3, 16, 16) and len(splits.test) == 2
    with pytest.raises(BadInput, match="data.num_train.*16.*15"):
        load_dataset("cifar10", root=tmp_path, num_train=16)


def test_cifar_checksums_only_when_asked(tmp_path: Path) -> None:
    _write_cifar(tmp_path, hundred=False, rng=np.random.default_rng(2))
    with pytest.raises(DataNotFound, match="md5|check"):
        load_dataset("cifar10", root=tmp_path, verify_checksums=True)


def test_cifar_missing(tmp_path: Path) -> None:
    with pytest.raises(DataNotFound) as err:
        load_dataset("cifar10", root=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataNotFound, match="needs data.root.*cifar-100-python"):
        load_dataset("cifar100")
    _write_cifar(tmp_path, hundred=False, rng=np.random.default_rng(3))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataNotFound, match="data_batch_3") as err:
        load_dataset("cifar10", root=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)


# ----------------------------------------------------------------------------- STL-10


def _write_stl10(root: Path, rng: np.random.Generator, class_names: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write tiny STL-10 binaries: per image 3 channels of 96x96 stored column-major; labels 1..10."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    written = {}
    for split, n in (("train", 4), ("test", 3)):
        chw = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)
        labels = rng.integers(1, 11, size=n, dtype=np.uint8)
        (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(chw.transpose(0, 1, 3, 2)).tobytes())
        (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
        written[split] = (chw, labels.astype(np.int64) - 1)
    if class_names:
        (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    return written


def test_stl10_round_trip(tmp_path: Path) -> None:
    written = _write_stl10(tmp_path, np.random.default_rng(0), class_names=True)
    splits = load_dataset("stl10", root=tmp_path, image_size=96)
    for split, (chw, labels) in zip((splits.train, splits.test), (written["train"], written["test"])):
        assert torch.equal(split.images, torch.from_numpy(chw))
        assert split.labels.tolist() == labels.tolist()
    assert splits.classes == tuple(f"c{i}" for i in range(10))


def test_stl10_resized_default_classes(tmp_path: Path) -> None:
    written = _write_stl10(tmp_path, np.random.default_rng(1), class_names=False)
    splits = load_dataset("stl10", root=tmp_path)
    assert splits.train.images.shape == (4, 3, 32, 32)
    expected = torch.from_numpy(written["train"][0]).float().mean(dim=(2, 3))
    assert (splits.train.images.float().mean(dim=(2, 3)) - expected).abs().max() < 2  # antialiased: means kept
    assert splits.classes[0] == "airplane" and splits.num_classes == 10


def test_stl10_missing(tmp_path: Path) -> None:
    with pytest.raises(DataNotFound, match="stl10_binary") as err:
        load_dataset("stl10", root=tmp_path)
    assert str(tmp_path / "stl10_binary") in str(err.value)
    _write_stl10(tmp_path, np.random.default_rng(2), class_names=False)
    (tmp_path / "stl10_binary" / "test_y.bin").unlink()
    with pytest.raises(DataNotFound, match="test_y.bin"):
        load_dataset("stl10", root=tmp_path)


# ----------------------------------------------------------------------------- image folders


def _write_folder(root: Path, layout: dict[str, dict[str, list[tuple[int, int, int]]]], size: tuple[int, int] = (20, 12)) -> None:
    for split, classes in layout.items():
        for cls, colours in classes.items():
            (root / split / cls).mkdir(parents=True)
            for i, colour in enumerate(colours):
                Image.new("RGB", size, colour).save(root / split / cls / f"{i}.png")


def test_imagefolder_labels_and_pixels(tmp_path: Path) -> None:
    red, green, blue, grey = (200, 10, 10), (10, 200, 10), (10, 10, 200), (90, 90, 90)
    _write_folder(tmp_path, {"train": {"zebra": [red, red], "ant": [green], "mole": [blue]}, "val": {"zebra": [grey], "mole": [blue]}})
    Image.new("L", (8, 8), 77).save(tmp_path / "train" / "ant" / "gray.png")  # greyscale -> RGB
    splits = load_dataset("imagefolder", root=tmp_path, image_size=8)
    assert splits.classes == ("ant", "mole", "zebra")
    assert splits.train.images.shape == (5, 3, 8, 8)
    colours = [tuple(img[:, 4, 4].tolist()) for img in splits.train.images]
    assert sorted(zip(splits.train.labels.tolist(), colours)) == sorted(
        [(0, green), (0, (77, 77, 77)), (1, blue), (2, red), (2, red)]
    )
    assert all(bool((img == img[:, :1, :1]).all()) for img in splits.train.images)  # solid colours stay solid
    assert sorted(zip(splits.test.labels.tolist(), [tuple(img[:, 0, 0].tolist()) for img in splits.test.images])) == [(1, blue), (2, grey)]
    # normalize: dataset (the default): the training split's own per-channel mean, here of solid colours
    assert splits.mean == pytest.approx(tuple(np.mean([green, (77, 77, 77), blue, red, red], axis=0) / 255))
    assert load_dataset("imagefolder", root=tmp_path, image_size=8, normalize="imagenet").mean == (0.485, 0.456, 0.406)


def test_imagefolder_missing(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"train": {"a": [(0, 0, 0)]}})
    with pytest.raises(DataNotFound) as err:
        load_dataset("imagefolder", root=tmp_path)
    assert str(tmp_path / "val") in str(err.value)
    _write_folder(tmp_path, {"val": {"b": [(0, 0, 0)]}})
    with pytest.raises(BadInput, match="lacks: b"):
        load_dataset("imagefolder", root=tmp_path)


# ----------------------------------------------------------------------------- registry


def test_registry_and_unknown_name() -> None:
    assert list_datasets() == sorted(
        ["cifar10", "cifar100", "digits", "fashion_mnist", "imagefolder", "kmnist", "mnist", "shapes", "shards", "stl10"]
    )
    with pytest.raises(BadInput, match=r"unknown dataset 'cifar01' \(did you mean 'cifar10'.*known: cifar10, cifar100"):
        load_dataset("cifar01")


def test_bad_sizes() -> None:
    with pytest.raises(BadInput, match="data.num_train"):
        load_dataset("digits", num_train=5000)
    with pytest.raises(BadInput, match="data.num_test"):
        load_dataset("shapes", num_test=0)


def test_imagefolder_skips_hidden_folders_and_files(tmp_path: Path) -> None:
    _write_folder(tmp_path, {"train": {"a": [(0, 0, 0)], "b": [(9, 9, 9)]}, "val": {"a": [(0, 0, 0)]}})
    for hidden in (tmp_path / "train" / ".ipynb_checkpoints", tmp_path / "val" / ".cache", tmp_path / "train" / "a" / ".thumbs"):
        hidden.mkdir()
        Image.new("RGB", (8, 8), (1, 2, 3)).save(hidden / "x.png")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "train" / "b" / "._x.png")  # a macOS resource fork
    splits = load_dataset("imagefolder", root=tmp_path, image_size=8)
    assert splits.classes == ("a", "b") and len(splits.train.labels) == 2 and len(splits.test.labels) == 1


def test_an_unreadable_class_folder_is_named(tmp_path: Path, monkeypatch) -> None:
    import os

    from harness.data import streaming

    _write_folder(tmp_path, {"train": {"a": [(0, 0, 0)], "b": [(9, 9, 9)]}, "val": {"a": [(0, 0, 0)]}})
    real = os.scandir

    def scandir(path):  # as for a folder of mode 000 (this test may run as root, who reads every folder)
        if Path(path) == tmp_path / "train" / "b":
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(streaming.os, "scandir", scandir)
    with pytest.raises(BadInput, match=rf"^data.root: class folder {tmp_path / 'train' / 'b'} cannot be read \(Permission denied\)$"):
        load_dataset("imagefolder", root=tmp_path, image_size=8)
