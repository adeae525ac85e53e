"""Real data: the IDX format (MNIST, Fashion-MNIST, KMNIST), native channels, normalisation and what a run records.

The format is tested on small IDX files written here; the tests marked ``fashion_mnist`` read Debian's package
(``apt-get install -y dataset-fashion-mnist``) and are skipped where it is not installed.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import BadInput, DataNotFound
from harness.data import idx
from harness.data.datasets import class_counts, load_dataset
from harness.track.mlflow import search_runs
from tests.helpers.runs import CONFIG, env_for, harness_cmd, new_store

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(), reason="no dataset-fashion-mnist")


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, idx.UBYTE, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(folder: Path, rng: np.random.Generator, n_train: int = 40, n_test: int = 20, gz: bool = True) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        for name, array in zip(idx.FILES[split], (images, labels), strict=True):
            data = _idx_bytes(array)
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
            arrays[name] = array
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files_load_exactly_with_the_datasets_own_classes(tmp_path: Path, gz: bool) -> None:
    arrays = _write_idx(tmp_path, np.random.default_rng(0), gz=gz)
    data = load_dataset("kmnist", root=tmp_path, image_size=28)
    assert data.train.images.shape == (40, 1, 28, 28) and data.channels == 1
    assert np.array_equal(data.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(data.test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert data.classes[:3] == ("o", "ki", "su")
    pixels = arrays["train-images-idx3-ubyte"] / 255
    assert data.mean == pytest.approx((pixels.mean(),)) and data.std == pytest.approx((pixels.std(),))
    assert "resized" not in data.provenance
    assert "28 -> 32 px" in load_dataset("mnist", root=tmp_path, image_size=32).provenance["resized"]


def test_a_bad_idx_file_is_one_line_naming_it_and_both_numbers(tmp_path: Path) -> None:
    _write_idx(tmp_path, np.random.default_rng(0), gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(good[:2] + bytes([0x0D]) + good[3:])  # float type code
    with pytest.raises(BadInput, match=r"train-images-idx3-ubyte is not an IDX file .* magic number 0x00000d03, expected 0x00000803"):
        load_dataset("mnist", root=tmp_path, image_size=28)
    images.write_bytes(good[:-5])
    with pytest.raises(BadInput, match=rf"{images} holds {len(good) - 5} bytes but its IDX header \[40, 28, 28\] needs {len(good)}"):
        load_dataset("mnist", root=tmp_path, image_size=28)
    images.write_bytes(good)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(_idx_bytes(np.zeros(39, dtype=np.uint8)))
    with pytest.raises(BadInput, match="holds 40 images but .*train-labels-idx1-ubyte 39 labels"):
        load_dataset("mnist", root=tmp_path, image_size=28)
    labels.unlink()
    with pytest.raises(DataNotFound, match="lacks train-labels-idx1-ubyte"):
        load_dataset("mnist", root=tmp_path, image_size=28)


def test_checksums_name_the_file_and_are_refused_where_none_are_published(tmp_path: Path) -> None:
    _write_idx(tmp_path, np.random.default_rng(0))
    with pytest.raises(BadInput, match=r"train-images-idx3-ubyte.gz matches none of Fashion-MNIST's published digests"):
        load_dataset("fashion_mnist", root=tmp_path, image_size=28, verify_checksums=True)
    load_dataset("fashion_mnist", root=tmp_path, image_size=28)  # not asked: not checked
    with pytest.raises(BadInput, match="'shapes' has no published checksums"):
        load_dataset("shapes", num_train=8, num_test=8, verify_checksums=True)


def test_fashion_mnist_without_files_or_root_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = dataclasses.replace(idx.IDX_DATASETS["fashion_mnist"], default_root=tmp_path / "absent")
    monkeypatch.setitem(idx.IDX_DATASETS, "fashion_mnist", spec)
    with pytest.raises(DataNotFound, match=r"not found at .*absent, its default place; install Debian's package \(apt-get install -y dataset-fashion-mnist\) or set data.root"):
        load_dataset("fashion_mnist")
    with pytest.raises(DataNotFound, match="needs data.root"):
        load_dataset("mnist")


@needs_debian
def test_debians_fashion_mnist_is_the_default_and_passes_its_checksums() -> None:
    data = load_dataset("fashion_mnist", image_size=28, verify_checksums=True)
    assert (len(data.train), len(data.test), data.channels) == (60_000, 10_000, 1)
    counts = class_counts(data)
    assert set(counts["train"].values()) == {6000} and set(counts["test"].values()) == {1000}
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"
    assert data.mean == pytest.approx((0.2860,), abs=1e-4) and data.std == pytest.approx((0.3530,), abs=1e-4)  # as published
    assert data.provenance["root"] == str(DEBIAN)


# ----------------------------------------------------------------------------- channels, normalisation, provenance


def _folder(root: Path, mode: str) -> None:
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                colour = 40 * c + 20 * i + 10
                Image.new(mode, (10, 10), colour if mode == "L" else (colour, 255 - colour, colour // 2)).save(root / split / cls / f"{i}.png")


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_grey_folder_stays_one_channel_and_an_rgb_folder_three(tmp_path: Path, in_memory: bool) -> None:
    _folder(tmp_path / "grey", "L")
    _folder(tmp_path / "rgb", "RGB")
    grey = load_dataset("imagefolder", root=tmp_path / "grey", image_size=8, in_memory=in_memory)
    rgb = load_dataset("imagefolder", root=tmp_path / "rgb", image_size=8, in_memory=in_memory)
    assert grey.channels == 1 and grey.train.images[:].shape == (6, 1, 8, 8) and len(grey.mean) == 1
    assert rgb.channels == 3 and rgb.train.images[:].shape == (6, 3, 8, 8)
    assert sorted(grey.train.images[:][:, 0, 4, 4].tolist()) == [10, 30, 50, 50, 70, 90]
    forced = load_dataset("imagefolder", root=tmp_path / "grey", image_size=8, in_memory=in_memory, channels=3)
    assert forced.channels == 3 and torch.equal(forced.train.images[:][:, 0], grey.train.images[:][:, 0])


def test_a_small_folder_is_read_whole_to_tell_its_channels(tmp_path: Path) -> None:
    """Fewer images than the sample: every one is looked at (a grey first class does not make a colour folder grey)."""
    _folder(tmp_path, "L")
    Image.new("RGB", (10, 10), (200, 10, 10)).save(tmp_path / "train" / "b" / "9.png")  # the last image, in colour
    assert load_dataset("imagefolder", root=tmp_path, image_size=8).channels == 3


def test_constant_images_cannot_be_standardised_by_their_own_stats(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), 128).save(tmp_path / split / "a" / f"{i}.png")
    with pytest.raises(BadInput, match=r"data.normalize: the training split of 'imagefolder' gives mean \[.*\] and std \[0.0\]"):
        load_dataset("imagefolder", root=tmp_path, image_size=8)
    assert load_dataset("imagefolder", root=tmp_path, image_size=8, normalize="none").std == (1.0,)


def test_normalisation_choices(tmp_path: Path) -> None:
    _write_idx(tmp_path, np.random.default_rng(1))
    none = load_dataset("mnist", root=tmp_path, image_size=28, normalize="none")
    assert (none.mean, none.std) == ((0.0,), (1.0,)) and none.provenance["normalize"].startswith("none")
    imagenet = load_dataset("mnist", root=tmp_path, image_size=28, normalize="imagenet")
    luma = (0.2989, 0.587, 0.114)
    assert imagenet.mean == pytest.approx((float(np.dot(luma, (0.485, 0.456, 0.406))),))
    with pytest.raises(BadInput, match="data.normalize: must be one of dataset, imagenet, none, got 'z'"):
        load_dataset("mnist", root=tmp_path, normalize="z")
    with pytest.raises(BadInput, match="data.channels: must be auto, 1 or 3, got 2"):
        load_dataset("mnist", root=tmp_path, channels=2)
    rgb = load_dataset("mnist", root=tmp_path, image_size=28, channels=3)
    assert rgb.channels == 3 and torch.equal(rgb.train.images[:, 2], none.train.images[:, 0])


def test_the_fingerprint_follows_the_content_and_the_subset_has_a_digest(tmp_path: Path) -> None:
    _write_idx(tmp_path, np.random.default_rng(2))
    a = load_dataset("mnist", root=tmp_path, image_size=28).provenance
    assert a == load_dataset("mnist", root=tmp_path, image_size=28).provenance and len(a["fingerprint"]) == 16
    _write_idx(tmp_path, np.random.default_rng(3))
    assert load_dataset("mnist", root=tmp_path, image_size=28).provenance["fingerprint"] != a["fingerprint"]
    sub = load_dataset("mnist", root=tmp_path, image_size=28, num_train=20, seed=0).provenance
    assert sub["subset.train"].startswith("20 of 40, sha256 ") and "subset.test" not in sub
    assert sub["subset.train"] != load_dataset("mnist", root=tmp_path, image_size=28, num_train=20, seed=1).provenance["subset.train"]


# ----------------------------------------------------------------------------- a run on Fashion-MNIST


def _cosine_knn(train: np.ndarray, ytr: np.ndarray, test: np.ndarray, yte: np.ndarray, k: int = 20, t: float = 0.07) -> float:
    """The protocol of PROTOCOLS.md written again: cosine similarities, top k, votes exp(s / T), ties to the lower class."""
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    b = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = b @ a.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(b), 10))
    for i in range(len(b)):
        np.add.at(votes[i], ytr[top[i]], np.exp(sims[i, top[i]] / t))
    return float((votes.argmax(axis=1) == yte).mean())


@needs_debian
@pytest.mark.slow
def test_a_run_on_fashion_mnist_needs_no_data_setting_and_records_its_data(tmp_path: Path) -> None:
    uri = new_store(tmp_path / "mlflow.db")
    overrides = ["data.name=fashion_mnist", "data.image_size=28", "data.num_train=2000", "data.num_test=500", "pretrain.epochs=0",
                 "eval.linear.enabled=false", "eval.semi.enabled=false", "eval.retrieval.enabled=false", "eval.collapse.enabled=false",
                 "eval.online.enabled=false", "device=cpu", f"pretrain.checkpoint_dir={tmp_path / 'ckpt'}"]  # fmt: skip
    proc = subprocess.run(harness_cmd("run", CONFIG, *overrides), env=env_for(uri), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = search_runs("simclr-shapes", uri)
    data = load_dataset("fashion_mnist", image_size=28, num_train=2000, num_test=500)
    assert run["params"]["data.fingerprint"] == data.provenance["fingerprint"]
    assert run["tags"]["data.num_train_images"] == "2000" and run["tags"]["data.subset.train"].startswith("2000 of 60000")
    # the raw-pixel baseline, computed again from the files with the same subset and normalisation
    mean, std = data.mean[0], data.std[0]
    x = [(split.images.numpy().reshape(len(split), -1) / 255 - mean) / std for split in (data.train, data.test)]
    expected = _cosine_knn(x[0], data.train.labels.numpy(), x[1], data.test.labels.numpy())
    assert run["metrics"]["baseline/raw_pixels/knn_top1"] == pytest.approx(expected, abs=0.002)
    from mlflow.tracking import MlflowClient

    folder = Path(MlflowClient(uri).download_artifacts(run["run_id"], "", str(tmp_path / "artifacts")))
    record = json.loads((folder / "data.json").read_text())
    assert record["channels"] == 1 and record["classes"]["0"] == "T-shirt/top" and record["counts"]["test"]["Trouser"] == 50
    views = json.loads((folder / "views.json").read_text())["views"]
    assert [v["solarize_p"] for v in views] == [0.0, 0.0]  # SimCLR's symmetric views
