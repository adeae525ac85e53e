"""Streamed pretraining throughput: the harness's full SimCLR step on a folder of JPEGs against the usual peer pipeline.

Both pipelines run the same full training step (backbone, SimCLR head, NT-Xent, SGD, built from the same config) on
the same cores, with SimCLR's ImageNet recipe, the same batch and loader workers:

* harness: ``harness.train.loop.pretrain`` on ``data.name=imagefolder`` with ``data.in_memory=false``: workers decode
  and crop from the original, the rest of the recipe runs batched on the device (``Augmenter(cropped=True)``);
* peer, as lightly and solo-learn do: ``ImageFolder`` + ``DataLoader`` with a per-image ``transforms.v2`` recipe
  applied twice in the workers, then ``method.training_step([v1, v2])``, backward and an optimiser step.

Images/s is source images per second over ``--steps`` timed steps after ``--warmup``. Also measured: decode images/s
per core of the harness's worker work (``harness.data.streaming.crop_views``), a plain PIL decode and the peer's
per-image work. The photo-like JPEGs are written once into ``--folder`` and reused. ``--tiny`` is what the test suite
runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pretrain_throughput import harness_images_per_s  # the same timed loop (a hook on the method's after_step)

from core.contract import StepInfo
from core.views import NUM_DRAWS, View
from harness.config.loading import build_config
from harness.config.schema import AugmentConfig, RunConfig
from harness.data.augment import KeyedDraws
from harness.data.streaming import crop_views, folder_source
from harness.train.optim import build_optimizer
from harness.trial.prepare import Trial, prepare

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_PER_CLASS = 2
"""Validation images per class: the imagefolder layout needs a val split; nothing is evaluated here."""


# ----------------------------------------------------------------------------- the JPEG folder


def photo(rng: np.random.Generator, label: int, side: int) -> Image.Image:
    """A photo-like square picture: a smooth random colour field, a class-coloured disc, fine noise (JPEGs of ~30 KB at
    256 px)."""
    field = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)).resize(
        (side, side), Image.Resampling.BICUBIC
    )
    pixels = np.asarray(field, dtype=np.int16).copy()
    yy, xx = np.ogrid[0:side, 0:side]
    cx, cy = rng.uniform(0.3, 0.7, 2) * side
    r = side * rng.uniform(0.15, 0.35)
    pixels[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = [
        (label * 97) % 256,
        (label * 53 + 128) % 256,
        (label * 151 + 64) % 256,
    ]
    pixels += rng.integers(-24, 25, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def jpeg_folder(folder: Path, images: int, side: int, classes: int) -> Path:
    """``folder/train/class_<c>/*.jpg`` (``images`` in all) and ``folder/val/...``, written once (atomically) if
    absent."""
    if (folder / "train").is_dir() and (folder / "val").is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        rng = np.random.default_rng(0)
        for split, count in (("train", images), ("val", VAL_PER_CLASS * classes)):
            for c in range(classes):
                (tmp / split / f"class_{c}").mkdir(parents=True)
            for k in range(count):
                photo(rng, k % classes, side).save(
                    tmp / split / f"class_{k % classes}" / f"{k:06d}.jpg", "JPEG", quality=90
                )
        os.replace(tmp, folder)  # an interrupted write leaves no half-written folder to be reused
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def warm_page_cache(paths: list[str]) -> float:
    """Read every file once, so that neither pipeline pays for the disk; returns the mean file size in KB."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            total += len(f.read())
    return total / len(paths) / 1e3


# ----------------------------------------------------------------------------- the peer pipeline


def simclr_transform(side: int) -> Callable[[Image.Image], torch.Tensor]:
    """SimCLR's ImageNet recipe per image, as torchvision transforms v2 on a PIL image (lightly's and solo-learn's)."""
    from torchvision.transforms import v2

    kernel = 2 * max(1, side // 20) + 1  # ~10% of the side, odd: the harness's kernel
    transform: Callable[[Image.Image], torch.Tensor] = v2.Compose(
        [
            v2.RandomResizedCrop(side, scale=(0.08, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    return transform


class TwoViews:
    """Two independent draws of ``transform`` of one image (a picklable DataLoader transform)."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [self.transform(image), self.transform(image)]


def peer_images_per_s(trial: Trial, train_folder: Path, side: int, workers: int, steps: int, warmup: int) -> float:
    """ImageFolder + DataLoader + per-image transforms, then the trial's method step; timed after ``warmup`` steps."""
    from torchvision.datasets import ImageFolder

    cfg, method, device = trial.cfg, trial.method, trial.device
    cuda = device.type == "cuda"
    batch = cfg.pretrain.batch_size
    dataset = ImageFolder(str(train_folder), transform=TwoViews(simclr_transform(side)))
    kw: dict[str, Any] = (
        {"prefetch_factor": cfg.data.prefetch} if workers else {}
    )  # the harness's prefetch (2 steps per worker)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=cuda,
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    method.to(device)
    if cuda and cfg.pretrain.channels_last:
        method.to(memory_format=torch.channels_last)
    method.train()
    optimizer = build_optimizer(method, cfg.pretrain)  # the harness's SGD, as in (a)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.pretrain.amp else nullcontext()
    total = warmup + steps
    marks: list[float] = []
    for step, (views, _) in enumerate(loader):
        if step == total:
            break
        xs = [v.to(device, non_blocking=True) for v in views]
        if cuda and cfg.pretrain.channels_last:
            xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
        info = StepInfo(epoch=0, step=step, total_steps=total)
        with autocast:
            out = method.training_step(xs, info)
        out.loss.detach().item()  # the loss a peer logs every step: a device sync per step, as in its loop
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        method.after_step(info)
        if cuda:
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
    if len(marks) < total:
        raise SystemExit(
            f"streamed_throughput: the peer loader gave {len(marks)} steps "
            f"of batch {batch}, {total} wanted; write more images (--images)"
        )
    return batch * steps / (marks[-1] - marks[warmup - 1])


# ----------------------------------------------------------------------------- decoding, one process


def decode_per_core(train_folder: Path, side: int, count: int) -> dict[str, float]:
    """Images/s of one process and one thread: the harness's crop_views, a PIL full decode, the peer's per-image
    work."""
    from torchvision.datasets.folder import pil_loader

    source = folder_source(train_folder)
    rows = np.linspace(0, len(source) - 1, min(count, len(source))).round().astype(int).tolist()  # every class
    augment = AugmentConfig(crop_scale=(0.08, 1.0), blur_p=0.5)
    views = [View(side), View(side)]
    draws = KeyedDraws(0, torch.tensor(rows), 0)
    uniforms = [draws.view(v).uniforms(NUM_DRAWS) for v in range(len(views))]
    two_views = TwoViews(simclr_transform(side))
    paths = [source.locations[r] for r in rows]

    def harness() -> None:
        for k, row in enumerate(rows):
            crop_views(source, row, [u[k] for u in uniforms], views, augment)

    def pil() -> None:
        for path in paths:
            with Image.open(path) as image:
                image.convert("RGB")

    def peer() -> None:
        for path in paths:
            two_views(pil_loader(path))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loader worker's setting (both pipelines' workers run one thread)
    try:
        rates = {}
        for name, work in (("harness", harness), ("pil", pil), ("peer", peer)):
            work()  # warm-up pass: first-call costs, caches
            t0 = time.perf_counter()
            work()
            rates[name] = len(rows) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return rates


# ----------------------------------------------------------------------------- main


def overrides_for(folder: Path, args: argparse.Namespace) -> list[str]:
    """The run config of pipeline (a); the peer's step uses a trial of the same config."""
    return [
        f"backbone.name={args.backbone}",
        "data.name=imagefolder",
        f"data.root={folder}",
        "data.in_memory=false",
        f"data.image_size={args.view}",
        f"data.num_workers={args.workers}",
        "eval.semi.enabled=false",  # nothing is evaluated here
        f"pretrain.batch_size={args.batch_size}",
        f"device={args.device}",
        "method.name=simclr",
        "augment.crop_scale=[0.08,1.0]",  # SimCLR's ImageNet recipe, as the peer's
        "augment.blur_p=0.5",
    ]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="training JPEGs in the folder (default 5000)")
    parser.add_argument("--image-px", type=int, default=256, help="side of the square JPEGs (default 256)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument(
        "--folder",
        type=Path,
        default=None,
        help="where the JPEGs are (written if absent); default /tmp/ssl-bench-jpegs-<images>-<px>",
    )
    parser.add_argument("--view", type=int, default=96, help="side of each view (data.image_size; default 96)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per pipeline (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="DataLoader processes of both pipelines (default os.cpu_count())",
    )
    parser.add_argument(
        "--decode-images", type=int, default=500, help="images decoded in the per-core measurement (default 500)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the training process (default torch's, one per core)",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="64 JPEGs at 64 px, view 32, test_resnet, 2 steps, 1 worker: seconds, to check the script runs",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.image_px, args.classes, args.view, args.backbone = 64, 64, 4, 32, "test_resnet"
        args.batch_size, args.steps, args.warmup, args.workers, args.decode_images = 16, 2, 1, 1, 32
        args.threads = 1
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (timing starts at the end of the last warm-up step)")
    needed = args.batch_size * (args.warmup + args.steps)
    if needed > args.images:
        parser.error(
            f"--images {args.images} is fewer than --batch-size x (--warmup "
            f"+ --steps) = {needed}: each pipeline runs within one epoch"
        )
    folder = args.folder or Path(tempfile.gettempdir()) / f"ssl-bench-jpegs-{args.images}-{args.image_px}"

    t0 = time.perf_counter()
    jpeg_folder(folder, args.images, args.image_px, args.classes)
    written = time.perf_counter() - t0
    train = folder / "train"
    files = folder_source(train).names
    if len(files) != args.images:
        raise SystemExit(
            f"streamed_throughput: {train} holds {len(files)} images, not "
            f"--images {args.images}; give another --folder or remove it"
        )
    kb = warm_page_cache(files)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    decode = decode_per_core(train, args.view, args.decode_images)
    overrides = overrides_for(folder, args)
    harness = harness_images_per_s(overrides, args.steps, args.warmup, args.batch_size)
    cfg: RunConfig = build_config({}, [*overrides, "pretrain.progress=false"])
    trial = prepare(cfg)
    peer = peer_images_per_s(trial, train, args.view, args.workers, args.steps, args.warmup)

    print(
        f"data: {args.images} JPEGs of {args.image_px}x{args.image_px} px (mean {kb:.1f} KB) in {args.classes} "
        f"classes at {folder}" + (f" (written in {written:.0f} s)" if written > 1 else "")
    )
    print(
        f"settings: view {args.view} px, batch {args.batch_size}, {args.backbone}, SimCLR (crop "
        f"scale 0.08-1, blur p=0.5), {args.workers} loader worker(s), {torch.get_num_threads()} "
        f"torch thread(s) in the training process, {os.cpu_count()} CPUs, device {trial.device}"
    )
    print(
        f"timing: {args.warmup} warm-up step(s), then {args.steps} timed steps of "
        "the full training step; images/s = source images (2 views each) per second"
    )
    print(f"{'pipeline':<76} {'images/s':>9}")
    print(f"{'harness  pretrain, data.in_memory=false: crops in workers, rest on the device':<76} {harness:9.1f}")
    print(f"{'peer     ImageFolder + DataLoader + per-image transforms.v2 recipe, twice':<76} {peer:9.1f}")
    print(f"ratio harness / peer: {harness / peer:.3f}")
    print(
        "decode images/s per core (1 process, 1 thread, "
        f"{min(args.decode_images, args.images)} images, 2 views of {args.view} px):"
    )
    print(f"  harness crop_views (read + draft decode + 2 crops): {decode['harness']:8.1f}")
    print(f"  PIL full decode (Image.open + convert RGB):         {decode['pil']:8.1f}")
    print(f"  peer per-image work (ImageFolder load + recipe x2): {decode['peer']:8.1f}")
    return {"harness": harness, "peer": peer, "ratio": harness / peer, **{f"decode_{k}": v for k, v in decode.items()}}


if __name__ == "__main__":
    main()
