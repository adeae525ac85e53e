"""Streamed image folders and tar shards (:mod:`harness.data.streaming`): what streaming promises and what would break it.

* memory: a streamed run's peak RSS does not grow with the dataset, an in-memory run's does;
* crops are random resized crops of the *original* image, with the configured area and aspect ranges;
* order: one seeded permutation per epoch, whatever the loader workers or distributed ranks, with the same crops;
* shards: labels, counts, globs and folders, and the same views as an image folder holding the same bytes;
* bad input is one line at start (exit 2); an unreadable image while streaming fails the run in one line (exit 1)
  unless ``data.skip_corrupt``;
* the evaluation battery logs the same metrics streamed as in memory.

The CLI tests run ``python -m harness run configs/simclr_shapes.yaml`` in a fresh process, as a user does.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.views import CX, CY, NUM_DRAWS, RATIO, SCALE, View, crop_box
from harness.config.schema import AugmentConfig
from harness.data import streaming
from harness.data.augment import KeyedDraws
from harness.data.datasets import load_dataset
from harness.track.mlflow import search_runs
from harness.train.distributed import World, shard
from harness.train.loop import batch_indices, epoch_seed
from tests.helpers.image_files import image, write_folder, write_imagefolder, write_shards
from tests.helpers.runs import REPO, env_for, new_store

CONFIG = REPO / "configs" / "simclr_shapes.yaml"
EXPERIMENT = "streaming-test"

BASE = ["device=cpu", "pretrain.progress=false", "data.num_train=null", "data.num_test=null", "backbone.name=test_resnet"]
"""Every CLI run: the shipped config on a CPU, on all the images of the folder written by the test."""
EVAL_OFF = [
    "eval.baselines=false", "eval.online.enabled=false", "eval.knn.enabled=false", "eval.linear.enabled=false",
    "eval.semi.enabled=false", "eval.retrieval.enabled=false", "eval.collapse.enabled=false",
]  # fmt: skip
"""Everything of the battery that can be switched off (the embeddings of both splits are still extracted)."""


def harness_run(workdir: Path, *overrides: str) -> tuple[subprocess.CompletedProcess[str], str]:
    """``python -m harness -q run configs/simclr_shapes.yaml BASE overrides`` in a fresh process, logging to an
    MLflow store in ``workdir``; returns the finished process and the store's URI."""
    workdir.mkdir(parents=True, exist_ok=True)
    uri = new_store(workdir / "mlflow.db")
    args = [f"tracking.uri={uri}", f"tracking.experiment={EXPERIMENT}", f"pretrain.checkpoint_dir={workdir / 'ckpt'}", *BASE, *overrides]
    env = env_for()
    proc = subprocess.run([sys.executable, "-m", "harness", "-q", "run", str(CONFIG), *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    return proc, uri


def only_run(uri: str) -> dict:
    runs = search_runs(EXPERIMENT, uri)
    assert len(runs) == 1, [r["status"] for r in runs]
    return runs[0]


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed run prints on stderr (with ``-q``, nothing else)."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def single_image_source(tmp_path: Path, pixels: np.ndarray, name: str = "image.png", **save: object) -> streaming.ImageSource:
    """A one-image, one-class image folder holding ``pixels`` (H, W, 3) uint8, as a source."""
    folder = tmp_path / "single" / "only_class"
    folder.mkdir(parents=True)
    Image.fromarray(pixels).save(folder / name, **save)
    return streaming.folder_source(folder.parent)


def crop_boxes(u: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float], height: int, width: int) -> torch.Tensor:
    """The crops of uniforms (B, NUM_DRAWS) as (B, 4) ``[w, h, cx, cy]`` (:func:`core.views.crop_box`)."""
    return torch.stack(crop_box(u[:, SCALE], u[:, RATIO], u[:, CX], u[:, CY], scale, ratio, height, width), dim=1)


def box_in_pixels(box: torch.Tensor, height: int, width: int) -> tuple[float, float, float, float]:
    """A :func:`crop_boxes` row ``[w, h, cx, cy]`` as (left, top, right, bottom) in the image's pixels."""
    w, h, cx, cy = box.tolist()
    left, top = ((cx + 1) / 2 - w / 2) * width, ((cy + 1) / 2 - h / 2) * height
    return left, top, left + w * width, top + h * height


# ----------------------------------------------------------------------------- memory


@pytest.fixture(scope="module")
def memory_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Image folders of 1,000 and 4,000 training JPEGs (4 classes, 128 x 128 px, 10 val images per class): the small
    one holds the first quarter of the large one's files."""
    base = tmp_path_factory.mktemp("memory")
    large = write_imagefolder(base / "large", train_per_class=1000, val_per_class=10, classes=4, size=(128, 128))
    small = base / "small"
    for split, keep in (("train", 250), ("val", 10)):
        for class_dir in sorted((large / split).iterdir()):
            (small / split / class_dir.name).mkdir(parents=True)
            for file in sorted(class_dir.iterdir())[:keep]:
                os.link(file, small / split / class_dir.name / file.name)
    return small, large


@pytest.mark.slow
def test_streamed_peak_memory_does_not_grow_with_the_dataset_in_memory_does(tmp_path: Path, memory_folders: tuple[Path, Path]) -> None:
    """Slow (about 150 s of CPU time, 10 min of wall time on 2 cores shared with other work): four runs, streamed
    and in memory, on 1,000 and 4,000 images.

    Streamed: one epoch of pretraining (crops of the 128 px originals at 16 px) and the embeddings of both splits;
    the peak RSS must not move with 3,000 more images. In memory the decoded images are held:
    3,000 x 3 x 128 x 128 bytes = 147 MB more, which the same metric must see. The in-memory runs do not pretrain
    (``pretrain.epochs=0``) and embed with a ViT of 32 px patches: the images are decoded at load and held to the
    end whatever the model does, and test_resnet on 4,000 images at 128 px would take minutes on 2 CPU cores."""
    streamed = [*EVAL_OFF, "data.name=imagefolder", "data.in_memory=false", "data.num_workers=0", "data.image_size=16", "pretrain.epochs=1", "pretrain.batch_size=250"]
    in_memory = [*EVAL_OFF, "data.name=imagefolder", "data.in_memory=true", "data.image_size=128", "pretrain.epochs=0", "backbone.name=test_vit", "backbone.kwargs={patch_size: 32}"]
    peak: dict[tuple[str, str], float] = {}
    for mode, overrides in (("streamed", streamed), ("in memory", in_memory)):
        for folder in memory_folders:
            proc, uri = harness_run(tmp_path / f"{mode}-{folder.name}".replace(" ", "_"), *overrides, f"data.root={folder}")
            assert proc.returncode == 0, proc.stderr[-3000:]
            run = only_run(uri)
            assert run["status"] == "FINISHED"
            assert run["tags"]["harness.data"].startswith(mode), run["tags"]["harness.data"]
            if mode == "streamed":  # it did pretrain on every image: 4 or 16 full steps of 250
                assert run["metrics"]["train/images_per_s_mean"] > 0 and "train/final_loss" in run["metrics"]
            peak[mode, folder.name] = run["metrics"]["memory/peak_rss_mb"]
    growth_streamed = peak["streamed", "large"] - peak["streamed", "small"]
    growth_in_memory = peak["in memory", "large"] - peak["in memory", "small"]
    assert abs(growth_streamed) < 100, peak
    assert growth_in_memory >= 100, peak  # 147 MB of decoded images (measured: ~250 MB, decoding stacks a copy)


# ----------------------------------------------------------------------------- crops


def test_crops_come_from_the_original_image_border_included(tmp_path: Path) -> None:
    """A 200 x 100 grey image with a pure red 4 px frame: a crop of the original reaches the frame on every side (a
    crop of a centre-cropped square would never see the left and right strips); a crop whose box stays clear of the
    frame (by one output pixel's footprint) has no red at all; a box that starts inside the left or right strip has
    red in its first or last column."""
    width, height, border = 200, 100, 4
    pixels = np.full((height, width, 3), 128, dtype=np.uint8)
    pixels[:border] = pixels[-border:] = pixels[:, :border] = pixels[:, -border:] = (255, 0, 0)
    source = single_image_source(tmp_path, pixels)
    cfg, view = AugmentConfig(crop_scale=(0.08, 1.0)), View(32)
    pure_red, clear, at_left, at_right = 0, 0, 0, 0
    for key in range(500):
        u = KeyedDraws(key, torch.tensor([0]), 0).uniforms(NUM_DRAWS)[0]
        (crop,) = streaming.crop_views(source, 0, [u], [view], cfg)
        assert crop.dtype == torch.uint8 and crop.shape == (3, 32, 32)
        c = crop.int()
        red = c[0] - c[1]  # 0 on the grey, up to 255 on the frame
        pure_red += int(((c[0] > 200) & (c[1] < 60) & (c[2] < 60)).any())
        left, top, right, bottom = box_in_pixels(crop_boxes(u[None], cfg.crop_scale, cfg.crop_ratio, height, width)[0], height, width)
        step_x, step_y = (right - left) / 32, (bottom - top) / 32  # original pixels per output pixel
        if left > border + step_x and right < width - border - step_x and top > border + step_y and bottom < height - border - step_y:
            clear += 1
            assert int(red.abs().max()) == 0, (key, left, top, right, bottom)
        if left <= border / 2:
            at_left += 1
            assert int(red[:, 0].max()) > 128, (key, left)
        if right >= width - border / 2:
            at_right += 1
            assert int(red[:, -1].max()) > 128, (key, right)
    assert pure_red > 0 and clear > 0 and at_left > 0 and at_right > 0, (pure_red, clear, at_left, at_right)


@pytest.mark.parametrize("fmt,tolerance", [("png", 2.5), ("jpeg", 3.0)])
def test_crop_views_takes_the_crop_boxes_region_at_each_views_size(tmp_path: Path, fmt: str, tolerance: float) -> None:
    """The pixels of a crop say where in the original it was taken: on a 512 x 256 image whose red channel is x / 2
    and green y, a bilinear crop's first and last columns (rows) give its left edge and width (top and height). They
    match :func:`crop_boxes` for the view's own area range, to the colour resolution (2 px in x) and rounding, for two views of
    different sizes; a JPEG this large is decoded at a reduced DCT scale (``draft``) for small crops, same geometry."""
    width, height = 512, 256
    xx, yy = np.meshgrid(np.arange(width), np.arange(height))
    pixels = np.stack([xx // 2, yy, np.full_like(xx, 100)], axis=-1).astype(np.uint8)
    save = {"quality": 98} if fmt == "jpeg" else {}
    source = single_image_source(tmp_path, pixels, f"gradient.{'jpg' if fmt == 'jpeg' else 'png'}", **save)
    cfg = AugmentConfig(crop_scale=(0.08, 1.0))
    views = [View(32), View(12, scale=(0.05, 0.3))]
    for key in range(120):
        draws = KeyedDraws(key, torch.tensor([7]), 0)
        uniforms = [draws.view(v).uniforms(NUM_DRAWS)[0] for v in range(len(views))]
        crops = streaming.crop_views(source, 0, uniforms, views, cfg)
        for u, spec, crop in zip(uniforms, views, crops, strict=True):
            assert crop.shape == (3, spec.size, spec.size) and crop.dtype == torch.uint8
            box = crop_boxes(u[None], spec.scale or cfg.crop_scale, cfg.crop_ratio, height, width)[0]
            left, top, right, bottom = box_in_pixels(box, height, width)
            x = crop[0].double().mean(0) * 2  # the x coordinate sampled at each output column
            y = crop[1].double().mean(1)
            n = spec.size
            step_x, step_y = (x[-1] - x[0]) / (n - 1), (y[-1] - y[0]) / (n - 1)  # original pixels per output pixel
            measured = (x[0] + 0.5 - step_x / 2, y[0] + 0.5 - step_y / 2, step_x * n, step_y * n)  # left, top, width, height
            expected = (left, top, right - left, bottom - top)
            assert np.allclose(measured, expected, atol=tolerance), (key, spec, measured, expected)


def test_crop_area_is_uniform_in_the_scale_range_and_the_aspect_ratio_within_its_range() -> None:
    """:func:`crop_boxes` with the keyed draws of 5,000 images (what the streamed loader crops with).

    With aspect ratio 1 and nothing clamped (a square image; or a 2:1 image with areas up to 1/2) the area fraction
    is U(scale): Kolmogorov-Smirnov against it, and every area in the range. With the default ratios on a 2:1 image,
    every crop that is not clamped to the full height (or width) has its pixel aspect ratio in (3/4, 4/3) and its area
    in the range; a clamped one spans the full side, keeps an area at most the range's top, and all crops fit."""
    from scipy import stats

    u = KeyedDraws(12345, torch.arange(5000), 0).view(1).uniforms(NUM_DRAWS)
    for scale, height, width in (((0.08, 1.0), 100, 100), ((0.08, 0.5), 100, 200), ((0.2, 0.9), 64, 64)):
        w, h, _, _ = crop_boxes(u, scale, (1.0, 1.0), height, width).unbind(1)
        area = (w * h).numpy()
        assert area.min() >= scale[0] - 1e-12 and area.max() <= scale[1] + 1e-12, (scale, area.min(), area.max())
        assert np.allclose(w * width, h * height), "ratio 1: square crops in pixels"
        test = stats.kstest(area, "uniform", args=(scale[0], scale[1] - scale[0]))
        assert test.pvalue > 0.01, (scale, height, width, test)
        # the test has the power to see a wrong law: the side (not the area) uniform in the range is rejected
        assert stats.kstest(np.sqrt(area), "uniform", args=(np.sqrt(scale[0]), np.sqrt(scale[1]) - np.sqrt(scale[0]))).pvalue < 1e-6

    scale, ratio, height, width = (0.08, 1.0), (3 / 4, 4 / 3), 100, 200
    w, h, cx, cy = crop_boxes(u, scale, ratio, height, width).unbind(1)
    aspect = (w * width) / (h * height)
    clamped = (w >= 1) | (h >= 1)
    free = ~clamped
    assert 0 < int(clamped.sum()) < len(w), "on a 2:1 image, tall and large crops are clamped to the full height"
    assert bool(((aspect[free] >= ratio[0] - 1e-9) & (aspect[free] <= ratio[1] + 1e-9)).all())
    assert bool(((w[free] * h[free] >= scale[0] - 1e-12) & (w[free] * h[free] <= scale[1] + 1e-12)).all())
    assert bool(((w <= 1) & (h <= 1)).all()) and bool((torch.maximum(w, h)[clamped] == 1).all())
    assert bool((w[clamped] * h[clamped] <= scale[1] + 1e-12).all())
    assert bool(((cx.abs() <= 1 - w + 1e-12) & (cy.abs() <= 1 - h + 1e-12)).all()), "every crop lies inside the image"


# ----------------------------------------------------------------------------- order and determinism

ORDER_VIEWS = [View(16), View(8, scale=(0.05, 0.3))]
ORDER_AUGMENT = AugmentConfig(crop_scale=(0.08, 1.0))
N_IMAGES, BATCH = 48, 8


@pytest.fixture(scope="module")
def order_source(tmp_path_factory: pytest.TempPathFactory) -> streaming.ImageSource:
    """48 JPEGs of 40 x 30 px in 4 class folders."""
    folder = write_folder(tmp_path_factory.mktemp("order") / "train", per_class=N_IMAGES // 4, classes=4, size=(40, 30))
    return streaming.folder_source(folder)


def epoch_steps(seed: int, epoch: int = 0, world: World | None = None) -> tuple[int, list[torch.Tensor]]:
    """An epoch's key and steps as the training loop makes them: full batches of a seeded permutation, each this
    rank's slice."""
    key = epoch_seed(seed, epoch)
    batches = batch_indices(N_IMAGES, BATCH, torch.Generator().manual_seed(key))
    return key, [shard(rows, world or World()) for rows in batches]


def stream_epoch(source: streaming.ImageSource, key: int, steps: list[torch.Tensor], workers: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """The rows and view crops of each step, from a TrainLoader with ``workers`` loader processes."""
    loader = streaming.TrainLoader(source, ORDER_VIEWS, ORDER_AUGMENT, num_workers=workers)
    rows, crops = [], []
    for step_rows, step_crops in loader.epoch(key, steps):
        rows.append(step_rows)
        crops.append(step_crops)
    return rows, crops


def is_permutation(rows: list[torch.Tensor]) -> bool:
    return torch.equal(torch.cat(rows).sort().values, torch.arange(N_IMAGES))


def test_an_epoch_streams_one_seeded_permutation_whatever_the_workers_and_ranks(order_source: streaming.ImageSource) -> None:
    key, steps = epoch_steps(seed=0)
    rows, _ = stream_epoch(order_source, key, steps, workers=2)
    assert len(rows) == N_IMAGES // BATCH and all(torch.equal(r, s) for r, s in zip(rows, steps, strict=True)), "the steps, in order"
    assert is_permutation(rows), "no image twice, none skipped"

    ranks = [stream_epoch(order_source, *epoch_steps(seed=0, world=World(rank=r, size=2)), workers=2)[0] for r in range(2)]
    assert all(len(r) == len(rows) and all(len(step) == BATCH // 2 for step in r) for r in ranks)
    assert is_permutation(ranks[0] + ranks[1]), "the ranks' rows together: every image once"
    for i, step in enumerate(rows):
        assert torch.equal(torch.cat([ranks[0][i], ranks[1][i]]), step), "each step's rows split over the ranks"

    again = stream_epoch(order_source, *epoch_steps(seed=0), workers=2)[0]
    other_seed = stream_epoch(order_source, *epoch_steps(seed=1), workers=2)[0]
    other_epoch = stream_epoch(order_source, *epoch_steps(seed=0, epoch=1), workers=2)[0]
    assert torch.equal(torch.cat(again), torch.cat(rows))
    assert is_permutation(other_seed) and is_permutation(other_epoch)
    assert not torch.equal(torch.cat(other_seed), torch.cat(rows)) and not torch.equal(torch.cat(other_epoch), torch.cat(rows))


def test_crops_are_the_same_with_any_number_of_workers_and_ranks(order_source: streaming.ImageSource) -> None:
    """Byte-identical crops for the same (seed, epoch) with 0, 1 and 2 loader processes and over 2 ranks; an image's
    crops do not depend on the step or position it lands in, and change with the epoch."""
    key, steps = epoch_steps(seed=3)
    by_workers = {workers: stream_epoch(order_source, key, steps, workers)[1] for workers in (0, 1, 2)}
    reference = by_workers[0]
    for i, step in enumerate(steps):
        for v, spec in enumerate(ORDER_VIEWS):
            assert reference[i][v].shape == (len(step), 3, spec.size, spec.size) and reference[i][v].dtype == torch.uint8
            for workers in (1, 2):
                assert torch.equal(by_workers[workers][i][v], reference[i][v]), (workers, i, v)

    ranks = [stream_epoch(order_source, *epoch_steps(seed=3, world=World(rank=r, size=2)), workers=1)[1] for r in range(2)]
    for i in range(len(steps)):
        for v in range(len(ORDER_VIEWS)):
            assert torch.equal(torch.cat([ranks[0][i][v], ranks[1][i][v]]), reference[i][v]), (i, v)

    def crops_by_row(steps: list[torch.Tensor], crops: list[list[torch.Tensor]]) -> dict[int, list[torch.Tensor]]:
        return {int(row): [crops[i][v][k] for v in range(len(ORDER_VIEWS))] for i, step in enumerate(steps) for k, row in enumerate(step)}

    mine = crops_by_row(steps, reference)
    regrouped = [torch.cat(steps)[torch.arange(N_IMAGES).roll(3)][i : i + 6] for i in range(0, N_IMAGES, 6)]  # other steps, sizes, places
    moved = crops_by_row(regrouped, stream_epoch(order_source, key, regrouped, workers=0)[1])
    assert all(torch.equal(a, b) for row in mine for a, b in zip(mine[row], moved[row], strict=True))
    next_key, next_steps = epoch_steps(seed=3, epoch=1)
    later = crops_by_row(next_steps, stream_epoch(order_source, next_key, next_steps, workers=0)[1])
    assert sum(torch.equal(mine[row][0], later[row][0]) for row in mine) == 0, "a new epoch, new crops"


# ----------------------------------------------------------------------------- shards


def test_shard_source_lists_every_sample_with_its_label(tmp_path: Path) -> None:
    paths = write_shards(tmp_path / "train", "train", count=10, per_shard=4, classes=3)
    source = streaming.shard_source(str(tmp_path / "train" / "train-*.tar"))
    assert len(paths) == 3 and len(source) == 10
    assert source.labels.tolist() == [n % 3 for n in range(10)]
    assert source.classes == ("0", "1", "2")
    with tarfile.open(paths[1]) as tar:  # samples 4..7
        member = tar.getmember("00000005.jpg")
        expected = tar.extractfile(member).read()  # type: ignore[union-attr]
    assert source.names[5] == f"{paths[1]}:00000005.jpg"
    assert source.read(5) == expected
    assert Image.open(io.BytesIO(source.read(9))).size == (64, 48)


def test_shards_dataset_loads_from_a_glob_or_a_folder(tmp_path: Path) -> None:
    write_shards(tmp_path / "train", "in-train", count=12, per_shard=5, classes=4, seed=0)
    write_shards(tmp_path / "val", "in-val", count=6, per_shard=4, classes=4, seed=1)
    (tmp_path / "train" / "notes.txt").write_text("not a shard")
    by_glob = load_dataset("shards", image_size=24, shards=str(tmp_path / "train" / "in-train-*.tar"), val_shards=str(tmp_path / "val" / "*.tar"), in_memory=False)
    by_folder = load_dataset("shards", image_size=24, shards=str(tmp_path / "train"), val_shards=str(tmp_path / "val"), in_memory=False)
    for data in (by_glob, by_folder):
        assert data.streamed and data.storage.startswith("streamed from shards"), data.storage
        assert len(data.train) == 12 and len(data.test) == 6 and data.classes == ("0", "1", "2", "3")
        assert data.train.labels.tolist() == [n % 4 for n in range(12)] and data.test.labels.tolist() == [n % 4 for n in range(6)]
        assert data.train.images.shape == (12, 3, 24, 24)
        assert data.train.images[torch.tensor([0, 11])].shape == (2, 3, 24, 24)
    assert torch.equal(by_glob.train.images[:], by_folder.train.images[:]) and torch.equal(by_glob.test.images[:], by_folder.test.images[:])


def test_folder_and_shards_with_the_same_bytes_stream_the_same_views(tmp_path: Path) -> None:
    """The same JPEG files in an image folder and in shards: identical labels, evaluation views (StreamedImages) and
    training crops."""
    rng = np.random.default_rng(5)
    splits = {"train": 6, "val": 3}  # per class, 3 classes
    for split, per_class in splits.items():
        with tarfile.open(tmp_path / f"{split}-000000.tar", "w") as tar:
            for label in range(3):
                for n in range(per_class):
                    buf = io.BytesIO()
                    image(rng, label, 50, 40).save(buf, "JPEG", quality=90)
                    data = buf.getvalue()
                    key = f"c{label}_{n:03d}"
                    folder = tmp_path / "folder" / split / f"class_{label}"
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / f"{key}.jpg").write_bytes(data)
                    for name, payload in ((f"{key}.jpg", data), (f"{key}.cls", str(label).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
    kw = {"image_size": 24, "in_memory": False}
    folder = load_dataset("imagefolder", root=tmp_path / "folder", **kw)
    shards = load_dataset("shards", shards=str(tmp_path / "train-*.tar"), val_shards=str(tmp_path / "val-*.tar"), **kw)
    assert folder.streamed and shards.streamed
    for a, b in ((folder.train, shards.train), (folder.test, shards.test)):
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.images[:], b.images[:])
        assert a.images[:].float().std() > 10, "real pictures, not blank ones"
    key, rows = 99, [torch.arange(len(folder.train))]
    views = [View(16), View(8)]
    crops = [streaming.TrainLoader(d.train.images.source, views, AugmentConfig()).epoch(key, rows) for d in (folder, shards)]
    for (_, from_folder), (_, from_shards) in zip(*crops, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(from_folder, from_shards, strict=True))


# ----------------------------------------------------------------------------- bad input


def _unlabelled_shards(tmp_path: Path) -> tuple[list[str], str]:
    paths = write_shards(tmp_path / "train", "train", count=4, per_shard=4, labels=False)
    write_shards(tmp_path / "val", "val", count=4, per_shard=4)
    return ["data.name=shards", f"data.shards={tmp_path / 'train' / '*.tar'}", f"data.val_shards={tmp_path / 'val' / '*.tar'}"], f"data.shards: shard {paths[0]} has 00000000.jpg without a label"


def _empty_class_folder(tmp_path: Path) -> tuple[list[str], str]:
    root = write_imagefolder(tmp_path / "data", train_per_class=4, val_per_class=2, classes=2)
    (root / "train" / "class_9").mkdir()
    return ["data.name=imagefolder", f"data.root={root}"], f"data.root: class folder {root / 'train' / 'class_9'} holds no images"


def _glob_matching_nothing(tmp_path: Path) -> tuple[list[str], str]:
    write_shards(tmp_path / "val", "val", count=4, per_shard=4)
    pattern = tmp_path / "train" / "train-*.tar"
    return ["data.name=shards", f"data.shards={pattern}", f"data.val_shards={tmp_path / 'val' / '*.tar'}"], f"data.shards: {pattern} matches no .tar shards"


def _negative_workers(tmp_path: Path) -> tuple[list[str], str]:
    root = write_imagefolder(tmp_path / "data", train_per_class=4, val_per_class=2, classes=2)
    return ["data.name=imagefolder", f"data.root={root}", "data.num_workers=-1"], "data.num_workers: "


def _streamed_shapes(tmp_path: Path) -> tuple[list[str], str]:
    return ["data.name=shapes", "data.num_train=256", "data.num_test=64", "data.in_memory=false"], "data.in_memory: false streams imagefolder and shards only"


@pytest.mark.parametrize("case", [_unlabelled_shards, _empty_class_folder, _glob_matching_nothing, _negative_workers, _streamed_shapes])
def test_bad_data_input_exits_2_at_start_with_one_line(tmp_path: Path, case: Callable[[Path], tuple[list[str], str]]) -> None:
    overrides, message = case(tmp_path)
    proc, uri = harness_run(tmp_path / "work", *overrides, "pretrain.batch_size=4", "pretrain.epochs=1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == ""
    assert message in one_line(proc)
    assert not (tmp_path / "work" / "mlflow.db").exists() or search_runs(EXPERIMENT, uri) == [], "no run is opened"


@pytest.fixture
def truncated_folder(tmp_path: Path) -> tuple[Path, Path]:
    """4 classes x 8 training JPEGs (4 validation) at 48 x 40 px; one training image cut to 40% of its bytes."""
    root = write_imagefolder(tmp_path / "data", train_per_class=8, val_per_class=4, classes=4, size=(48, 40))
    bad = root / "train" / "class_1" / "00003.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 4 // 10])
    return root, bad


TRUNCATED_RUN = ["data.name=imagefolder", "data.image_size=16", "pretrain.epochs=1", "pretrain.batch_size=16", *EVAL_OFF]
"""32 training images in 2 full steps: every image, the truncated one included, is read in the one epoch."""


def test_truncated_image_while_streaming_fails_the_run_in_one_line(tmp_path: Path, truncated_folder: tuple[Path, Path]) -> None:
    root, bad = truncated_folder
    proc, uri = harness_run(tmp_path / "work", *TRUNCATED_RUN, f"data.root={root}", "data.in_memory=false", "data.num_workers=1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = one_line(proc)
    assert line.startswith(f"error: data: cannot read image {bad} (") and "data.skip_corrupt=true" in line, line
    run = only_run(uri)
    assert run["status"] == "FAILED" and run["tags"]["harness.data"].startswith("streamed")


def test_truncated_image_is_skipped_and_counted_with_skip_corrupt(tmp_path: Path, truncated_folder: tuple[Path, Path]) -> None:
    root, bad = truncated_folder
    overrides = [*TRUNCATED_RUN, f"data.root={root}", "data.in_memory=false", "data.num_workers=1", "data.skip_corrupt=true", "eval.knn.enabled=true", "eval.knn.k=5"]
    proc, uri = harness_run(tmp_path / "work", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(bad) in proc.stderr, "the skipped image is named in a warning"
    run = only_run(uri)
    assert run["status"] == "FINISHED"
    assert run["metrics"]["data/skipped_images"] == 1
    assert "eval/knn/top1" in run["metrics"]


def test_truncated_image_in_memory_is_bad_input_naming_it(tmp_path: Path, truncated_folder: tuple[Path, Path]) -> None:
    root, bad = truncated_folder
    proc, uri = harness_run(tmp_path / "work", *TRUNCATED_RUN, f"data.root={root}", "data.in_memory=true")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert one_line(proc).startswith(f"error: data: cannot read image {bad} (")
    assert not (tmp_path / "work" / "mlflow.db").exists() or search_runs(EXPERIMENT, uri) == [], "no run is opened"


# ----------------------------------------------------------------------------- the battery


@pytest.mark.slow
def test_streamed_run_logs_the_same_battery_as_in_memory(tmp_path: Path) -> None:
    """Every evaluation on, on 4 classes x 40 training (x 10 validation) JPEGs at 32 px, one epoch: the streamed run
    (one loader process) and the in-memory run log the same eval/*, baseline/* and online/* metric names."""
    root = write_imagefolder(tmp_path / "data", train_per_class=40, val_per_class=10, classes=4)
    battery = [
        "data.name=imagefolder", f"data.root={root}", "data.image_size=32", "pretrain.epochs=1", "pretrain.batch_size=32",
        "eval.knn.k=5", "eval.linear.epochs=3", "eval.semi.fractions=[0.1,0.25]", "eval.semi.epochs=[1]", "eval.batch_size=64",
    ]  # fmt: skip
    keys, storage = {}, {}
    for mode, overrides in (("streamed", ["data.in_memory=false", "data.num_workers=1"]), ("in memory", ["data.in_memory=true"])):
        proc, uri = harness_run(tmp_path / mode.replace(" ", "_"), *battery, *overrides)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run = only_run(uri)
        assert run["status"] == "FINISHED"
        storage[mode] = run["tags"]["harness.data"]
        keys[mode] = {k for k in run["metrics"] if k.startswith(("eval/", "baseline/", "online/"))}
    assert storage["streamed"].startswith("streamed from files") and storage["in memory"].startswith("in memory"), storage
    assert keys["streamed"] == keys["in memory"], keys["streamed"] ^ keys["in memory"]
    expected = {"eval/knn/top1", "eval/linear/top1", "eval/semi_10pct/top1", "eval/semi_25pct/top1", "eval/retrieval/map_at_r", "eval/rank/rankme"}
    assert expected | {"baseline/raw_pixels/knn_top1", "baseline/random_init/knn_top1", "online/knn_top1"} <= keys["streamed"], keys["streamed"]
