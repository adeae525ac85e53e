"""Pretraining throughput: the harness's full step against a raw timm forward + backward.

The full step is what ``harness.train.loop.pretrain`` does per batch (index the uint8 images, two augmented views on
the device, backbone + projector, NT-Xent, backward, optimiser step, lr schedule, NaN guard); the raw reference is
``timm`` forward + backward + SGD on pre-made float tensors of the same shape. Images/s counts source images in both,
so the ratio is the share of the raw model's speed the harness keeps. On CUDA the raw limit is also measured in bf16
autocast with channels_last, as the harness trains there.

``--peer`` adds the usual peer pipeline: the ``torchvision.transforms.v2`` SimCLR recipe per image, twice, in
``--workers`` DataLoader processes, then the same model step. ``--profile`` profiles one harness step
(``torch.profiler``) and prints the top ops and their sum per part of the step. ``--tiny`` is what the test suite runs.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from core.contract import StepInfo, StepOutput
from core.views import View
from harness.config.loading import build_config
from harness.config.schema import AugmentConfig
from harness.data.augment import Augmenter, KeyedDraws, ViewDraw
from harness.train.loop import pretrain
from harness.train.optim import build_optimizer
from harness.trial.prepare import Trial, prepare


def raw_images_per_s(
    model: torch.nn.Module,
    batch: int,
    size: int,
    channels: int,
    steps: int,
    warmup: int,
    device: torch.device,
    *,
    bf16_channels_last: bool = False,
) -> float:
    """timm forward + backward + SGD step on pre-made tensors of shape (2 * batch, C, size, size).

    ``bf16_channels_last`` (CUDA): the model and the tensors in channels_last, the forward in bf16 autocast (what the
    harness's step does on CUDA). ``model`` is left as it was: a copy is timed.
    """
    model = copy.deepcopy(model).to(device)
    x = torch.randn(2 * batch, channels, size, size, device=device)
    autocast: AbstractContextManager[Any] = nullcontext()
    if bf16_channels_last:
        if device.type != "cuda":
            raise ValueError(f"bf16 autocast + channels_last is measured on CUDA only, not on {device}")
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(x)
        out.float().mean().backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - t0)


def harness_images_per_s(overrides: list[str], steps: int, warmup: int, batch: int) -> float:
    """The real training loop on ``batch * (warmup + steps)`` shapes images, timed after the warm-up steps."""
    cfg = build_config(
        {},
        [
            *overrides,
            f"data.num_train={batch * (warmup + steps)}",
            "pretrain.epochs=1",
            "pretrain.warmup_epochs=0",
            "pretrain.progress=false",
        ],
    )
    trial = prepare(cfg)
    marks: list[float] = []

    original = trial.method.after_step

    def after_step(step: StepInfo) -> None:  # timestamps each completed step
        original(step)
        if trial.device.type == "cuda":
            torch.cuda.synchronize(trial.device)
        marks.append(time.perf_counter())

    trial.method.after_step = after_step  # type: ignore[method-assign]  # the method's own hook, instrumented on this instance
    pretrain(trial.method, trial.data.train.images, cfg, trial.augmenter, trial.device)
    return batch * steps / (marks[-1] - marks[warmup - 1])


# ----------------------------------------------------------------------------- the peer pipeline


def simclr_transform(
    augment: AugmentConfig, side: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The run's SimCLR recipe per image as ``torchvision.transforms.v2`` on a uint8 (C, H, W) tensor (lightly's,
    solo-learn's)."""
    from torchvision.transforms import v2

    ops: list[Any] = [
        v2.ToImage(),
        v2.RandomResizedCrop(side, scale=augment.crop_scale, ratio=augment.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(augment.hflip_p),
        v2.RandomApply(
            [v2.ColorJitter(augment.brightness, augment.contrast, augment.saturation, augment.hue)], p=augment.jitter_p
        ),
        v2.RandomGrayscale(augment.grayscale_p),
    ]
    if augment.blur_p > 0:
        kernel = 2 * max(1, side // 20) + 1  # ~10% of the side, odd: the harness's kernel
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=augment.blur_sigma)], p=augment.blur_p))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    transform: Callable[[torch.Tensor], torch.Tensor] = v2.Compose(ops)
    return transform


class TwoViews(torch.utils.data.Dataset):
    """Image ``i`` of an in-memory uint8 (N, C, H, W) tensor as two independent draws of ``transform`` (picklable)."""

    def __init__(self, images: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        return self.transform(image), self.transform(image)


def peer_images_per_s(trial: Trial, workers: int, steps: int, warmup: int) -> float:
    """DataLoader of per-image transforms.v2 views of the trial's in-memory images, then the trial's method step (as the
    harness runs it: precision, memory format, optimiser); images/s of the source images, timed after ``warmup``
    steps."""
    cfg, method, device = trial.cfg, trial.method, trial.device
    images = trial.data.train.images
    if not isinstance(images, torch.Tensor):
        raise SystemExit("pretrain_throughput: the peer pipeline reads in-memory images; this dataset is streamed")
    cuda = device.type == "cuda"
    batch = cfg.pretrain.batch_size
    dataset = TwoViews(
        images, simclr_transform(cfg.augment, cfg.data.image_size, trial.augmenter.mean, trial.augmenter.std)
    )
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
    channels_last = cuda and cfg.pretrain.channels_last
    if channels_last:
        method.to(memory_format=torch.channels_last)
    method.train()
    optimizer = build_optimizer(method, cfg.pretrain)  # the harness's optimiser, at the config's lr
    autocast: AbstractContextManager[Any] = (
        torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.pretrain.amp else nullcontext()
    )
    total = warmup + steps
    marks: list[float] = []
    for step, views in enumerate(loader):
        if step == total:
            break
        xs = [v.to(device, non_blocking=True) for v in views]
        if channels_last:
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
            f"pretrain_throughput: the peer loader gave {len(marks)} steps of batch {batch}, {total} wanted"
        )
    return batch * steps / (marks[-1] - marks[warmup - 1])


# ----------------------------------------------------------------------------- profiling one step

PARTS = ("augmentation", "forward", "loss", "backward", "optimiser", "other")
"""The parts of a step the profile is grouped into."""


class LabelledAugmenter(Augmenter):
    """The trial's augmenter, each call inside a ``bench::augmentation`` profiler range."""

    def __call__(
        self, images: torch.Tensor, view: View, draws: torch.Generator | KeyedDraws | ViewDraw, *, cropped: bool = False
    ) -> torch.Tensor:
        with torch.profiler.record_function("bench::augmentation"):
            return super().__call__(images, view, draws, cropped=cropped)


def label_step(trial: Trial) -> None:
    """Instrument the trial's method on this instance: ``training_step`` inside ``bench::loss``, the forward of each of
    its direct submodules (backbone, heads) inside ``bench::forward``; so what the step computes outside its modules is
    the loss."""
    method = trial.method
    original = method.training_step

    def training_step(views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        with torch.profiler.record_function("bench::loss"):
            return original(views, step)

    method.training_step = training_step  # type: ignore[method-assign]
    ranges: list[Any] = []

    def enter(module: torch.nn.Module, args: Any) -> None:
        ranges.append(torch.profiler.record_function("bench::forward").__enter__())

    def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
        ranges.pop().__exit__(None, None, None)

    for child in method.children():
        child.register_forward_pre_hook(enter)
        child.register_forward_hook(leave)


def part_of(event: Any) -> str:
    """The part of the step a profiled op belongs to: that of its nearest labelled ancestor (itself included)."""
    while event is not None:
        name = event.name
        if name.startswith("bench::"):
            return str(name.removeprefix("bench::"))
        if name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        if name.startswith(
            "Optimizer."
        ):  # torch.optim's own ranges: Optimizer.step#SGD.step, Optimizer.zero_grad#SGD.zero_grad
            return "optimiser"
        event = event.cpu_parent
    return "other"


def profile_step(overrides: list[str], batch: int) -> dict[str, Any]:
    """Profile the third step of the real training loop on ``3 * batch`` images (two steps of warm-up, untraced)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    cfg = build_config(
        {},
        [
            *overrides,
            f"data.num_train={3 * batch}",
            "pretrain.epochs=1",
            "pretrain.warmup_epochs=0",
            "pretrain.progress=false",
        ],
    )
    trial = prepare(cfg)
    label_step(trial)
    augmenter = LabelledAugmenter(trial.augmenter.cfg, trial.augmenter.mean, trial.augmenter.std)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trial.device.type == "cuda" else [])
    traced: list[Any] = []
    marks: list[float] = []
    with profile(
        activities=activities,
        schedule=schedule(wait=1, warmup=1, active=1, repeat=1),
        on_trace_ready=lambda p: traced.append(p.events()),
    ) as prof:
        original = trial.method.after_step

        def after_step(step: StepInfo) -> None:
            original(step)
            if trial.device.type == "cuda":
                torch.cuda.synchronize(trial.device)
            marks.append(time.perf_counter())
            prof.step()

        trial.method.after_step = after_step  # type: ignore[method-assign]
        pretrain(trial.method, trial.data.train.images, cfg, augmenter, trial.device)
    if not traced:
        raise SystemExit("pretrain_throughput: the profiler traced no step")
    per_part: dict[str, float] = defaultdict(float)
    per_op: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for event in traced[-1]:
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        part = part_of(event)
        per_part[part] += event.self_cpu_time_total / 1e3  # ms
        row = per_op[(part, event.name)]
        row[0] += event.self_cpu_time_total / 1e3
        row[1] += 1
    return {
        "parts": {p: per_part.get(p, 0.0) for p in PARTS},
        "ops": per_op,
        "step_ms": (marks[2] - marks[1]) * 1e3,
        "device": trial.device,
    }


def print_profile(result: dict[str, Any], top: int) -> None:
    parts: dict[str, float] = result["parts"]
    total = sum(parts.values())
    ops = sorted(result["ops"].items(), key=lambda kv: -kv[1][0])[:top]
    print(f"top {len(ops)} ops by self CPU time (one step):")
    print(f"  {'op':<56} {'part':<13} {'calls':>6} {'self CPU ms':>12} {'share':>7}")
    for (part, name), (ms, calls) in ops:
        print(f"  {name[:56]:<56} {part:<13} {calls:6.0f} {ms:12.2f} {ms / total:7.1%}")
    print(
        "self CPU time by part of the step (ProfilerStep*, in "
        "other: the step's time outside any op, the loop's Python):"
    )
    print(f"  {'part':<13} {'ms':>10} {'share':>7}")
    for part in PARTS:
        print(f"  {part:<13} {parts[part]:10.2f} {parts[part] / total:7.1%}")
    print(f"  {'total':<13} {total:10.2f} {1:7.1%}")
    print(f"step wall time (profiled, between the ends of steps 2 and 3): {result['step_ms']:.2f} ms")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cifar-stem", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--peer",
        action="store_true",
        help="also time the per-image transforms.v2 pipeline through a DataLoader, then the same step",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="DataLoader processes of --peer (default os.cpu_count())",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one harness step (torch.profiler) instead of measuring throughput",
    )
    parser.add_argument("--top", type=int, default=20, help="ops listed by --profile (default 20)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the training process (default torch's, one per core)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="test_resnet, 16 px, batch 32, 2 steps, 1 thread, 1 peer worker: seconds, to check the script runs",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.backbone, args.image_size, args.batch_size, args.steps, args.warmup, args.workers = (
            "test_resnet",
            16,
            32,
            2,
            1,
            1,
        )
        args.threads = 1  # a busy machine's spinning OpenMP threads can slow tiny steps 20-fold
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (timing starts at the end of the last warm-up step)")

    overrides = [
        f"backbone.name={args.backbone}",
        f"backbone.cifar_stem={str(args.cifar_stem).lower()}",
        f"data.image_size={args.image_size}",
        "data.num_test=16",
        "eval.semi.enabled=false",  # the 1% subset of a 256-image set cannot hold every class; no evaluation runs here
        f"pretrain.batch_size={args.batch_size}",
        f"device={args.device}",
        "method.name=simclr",
    ]
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = (
        f"backbone {args.backbone}  cifar_stem {args.cifar_stem}  image "
        f"{args.image_size}px  batch {args.batch_size}  threads {torch.get_num_threads()}"
    )
    torch.manual_seed(0)
    if args.profile:
        result = profile_step(overrides, args.batch_size)
        print(f"{settings}  device {result['device']}  (profile of one harness step, torch.profiler)")
        print_profile(result, args.top)
        return {f"profile_{k}_ms": v for k, v in result["parts"].items()}

    full = harness_images_per_s(overrides, args.steps, args.warmup, args.batch_size)
    num_train = (
        args.batch_size * (args.warmup + args.steps) if args.peer else args.batch_size
    )  # the peer runs within one epoch
    cfg = build_config(
        {},
        [
            *overrides,
            f"data.num_train={num_train}",
            "pretrain.epochs=1",
            "pretrain.warmup_epochs=0",
            "pretrain.progress=false",
        ],
    )
    trial = prepare(cfg)  # the raw limits' backbone, and the peer's whole step
    backbone = trial.method.backbone
    if backbone is None:
        raise SystemExit(f"pretrain_throughput: method {trial.method.name!r} has no backbone to time on its own")
    cuda = trial.device.type == "cuda"
    raw = raw_images_per_s(backbone, args.batch_size, args.image_size, 3, args.steps, args.warmup, trial.device)
    raw_bf16 = (
        raw_images_per_s(
            backbone,
            args.batch_size,
            args.image_size,
            3,
            args.steps,
            args.warmup,
            trial.device,
            bf16_channels_last=True,
        )
        if cuda
        else None
    )
    peer = peer_images_per_s(trial, args.workers, args.steps, args.warmup) if args.peer else None

    p = cfg.pretrain
    precision = (
        f"bf16 autocast {'on' if p.amp else 'off'}, channels_last {'on' if p.channels_last else 'off'}"
        if cuda
        else "fp32, contiguous"
    )
    print(f"{settings}  device {trial.device}  (harness step: {precision})")
    print(f"raw timm forward+backward (2x{args.batch_size} pre-made tensors): {raw:8.1f} images/s")
    print(f"harness full step (augment + forward + NT-Xent + backward + opt):  {full:8.1f} images/s")
    print(
        f"ratio full / raw: {full / raw:.3f}  "
        + ("(goal >= 0.90)" if not cuda else "(against fp32; see the bf16 + channels_last limit below)")
    )
    if raw_bf16 is not None:
        print(
            f"raw timm bf16 autocast + channels_last (2x{args.batch_size} pre-made tensors): {raw_bf16:8.1f} images/s"
        )
        print(f"ratio full / raw bf16+channels_last: {full / raw_bf16:.3f}  (goal >= 0.90)")
    else:
        why = "no CUDA" if not torch.cuda.is_available() else f"device {trial.device}"
        print(f"raw timm bf16 autocast + channels_last: skipped (CUDA only; {why})")
        print(f"ratio full / raw bf16+channels_last: skipped ({why})")
    figures = {"full": full, "raw": raw, "ratio": full / raw}
    if raw_bf16 is not None:
        figures.update(raw_bf16=raw_bf16, ratio_bf16=full / raw_bf16)
    if peer is not None:
        print(
            f"peer (transforms.v2 per image in {args.workers} DataLoader "
            f"worker(s), then the same step): {peer:8.1f} images/s"
        )
        print(f"ratio harness / peer: {full / peer:.3f}")
        figures.update(peer=peer, ratio_peer=full / peer)
    return figures


if __name__ == "__main__":
    main()
