"""The pretraining loop. It owns optimisation, precision, devices, seeding, distribution and checkpoints; methods
own losses.

Same config and seed, same numbers on the CPU: each epoch shuffles with a generator seeded by (seed, epoch) and an
image's views are keyed by (seed, epoch, image, view) (:class:`harness.data.augment.KeyedDraws`), so a resumed epoch
sees the batches and views it would have seen. ``pretrain.batch_size`` is the global batch: each of W workers
(:mod:`harness.train.distributed`) takes its contiguous slice of the step's rows, gradients are averaged after
``backward`` (:func:`methods.distributed.average_gradients`), and rank 0 alone logs and checkpoints. Between
``backward`` and ``optimizer.step()`` the frozen modules' gradients are dropped
(:meth:`methods.base.Method.frozen_modules`), the rest averaged and clipped to ``pretrain.clip_grad`` (global norm);
lr and weight decay are functions of the step (:mod:`core.schedules`), logged at each epoch's last step.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core.contract import StepInfo
from core.errors import BadInput, Diverged
from core.schedules import cosine_lr, cosine_weight_decay
from core.splits import Images
from core.views import View, override_views
from harness.config.schema import RunConfig, check_batch_splits
from harness.data.augment import Augmenter, KeyedDraws
from harness.data.streaming import StreamedImages, TrainLoader
from harness.train import distributed
from harness.train.checkpoint import load_checkpoint, save_checkpoint
from harness.train.optim import build_optimizer, clip_gradients, drop_gradients, set_schedule
from methods.base import Method
from methods.distributed import average_gradients

log = logging.getLogger(__name__)

LOSS_CHECK_EVERY = 50
"""Steps between reads of the loss on an accelerator (:func:`loss_check_every`)."""

EpochCallback = Callable[[int, dict[str, float], Path | None], None]
EpochMetrics = Callable[[int], dict[str, float]]
"""``epoch_metrics(epoch)`` (1-based) -> extra metrics of that epoch (``{}`` when it has none), e.g. the online
monitor's."""


@dataclass
class TrainResult:
    """What pretraining did: per-epoch mean losses (and this call's per-step losses), wall time and throughput
    (images of the global batch per second)."""

    losses: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    epochs: int = 0
    steps: int = 0
    time_s: float = 0.0
    """Pretraining's wall time over all epochs (those before a resume included, from the checkpoint), without the
    online monitor's evaluations (:attr:`online_s`)."""
    images_per_s: float = 0.0
    """Images per second of training steps alone (no monitor, no compiling step), over all epochs."""
    online_s: float = 0.0
    """Time in the per-epoch hook (the online monitor), over all epochs."""
    compile_s: float = 0.0
    """Time of the first step, which compiled the modules (``pretrain.compile``); not in ``images_per_s``."""
    steady_s: float = 0.0
    """Seconds of training steps alone (no monitor, no compiling step), over all epochs: ``images_per_s``'s."""
    skipped: list[str] = field(default_factory=list)
    """Streamed images that could not be read (``data.skip_corrupt``), each once."""


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA if there is one (this worker's GPU with several workers), else the CPU; ``cuda`` without CUDA
    is BadInput."""
    return distributed.device_for(spec, distributed.current())


def data_workers(cfg: RunConfig) -> int:
    """Processes (threads, in evaluation) that decode streamed images: ``data.num_workers``, default the trial's
    CPUs."""
    return cfg.data.num_workers if cfg.data.num_workers is not None else torch.get_num_threads()


def check_batch_size(batch_size: int, num_images: int, dataset: str = "") -> None:
    """Full batches only: a batch larger than the training set is bad input, before anything runs."""
    if batch_size > num_images:
        where = f"the {dataset} training set" if dataset else "the training set"
        raise BadInput(f"pretrain.batch_size: {batch_size} is larger than {where} ({num_images} images)")


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible seed per (trial seed, epoch)."""
    return (seed * 1_000_003 + epoch * 7919 + 12345) % (2**63 - 1)


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """A random permutation of ``range(n)`` in full batches (the last partial batch is dropped)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def pretrain(
    method: Method,
    images: Images,
    cfg: RunConfig,
    augmenter: Augmenter,
    device: torch.device,
    *,
    checkpoint_path: Path | None = None,
    provenance: dict[str, Any] | None = None,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    on_epoch_end: EpochCallback | None = None,
    epoch_metrics: EpochMetrics | None = None,
) -> TrainResult:
    """Pretrain ``method`` on ``images`` (uint8 (N, C, H, W), in memory or streamed) for ``cfg.pretrain.epochs`` epochs.

    After each epoch: ``epoch_metrics(epoch)`` merged into the epoch's metrics,
    ``log_metrics({"train/loss": ..., ...}, epoch)``, an atomic checkpoint at
    ``checkpoint_path`` (if given), then ``on_epoch_end(epoch, metrics,
    checkpoint_path)`` (Ray Tune reports from there, so a scheduler sees the
    ``epoch_metrics`` too). ``epoch_metrics`` must leave the model's state and the
    random generators alone; its time is not counted in the throughput. If
    ``cfg.pretrain.resume`` names a checkpoint, training continues after its epoch.
    Raises :class:`Diverged` on a non-finite loss.

    In a process group (see the module docstring) every worker calls this with the same
    arguments; only rank 0's ``checkpoint_path``, ``log_metrics`` and ``epoch_metrics`` are used.
    """
    world = distributed.current()
    if not world.is_main:
        checkpoint_path = log_metrics = epoch_metrics = None
    p = cfg.pretrain
    n = images.shape[0]
    check_batch_size(p.batch_size, n)
    check_batch_splits(p.batch_size, world.size, "{} workers")
    cuda = device.type == "cuda"

    method.to(device)
    if cuda and p.channels_last:
        method.to(memory_format=torch.channels_last)
    sync_bn = distributed.wants_sync_batchnorm(p.sync_batchnorm, world)
    if sync_bn:
        distributed.to_sync_batchnorm(method, device)
    optimizer = build_optimizer(method, p)
    if p.compile:
        compile_modules(method)
    result = TrainResult()
    start_epoch = 0
    if p.resume is not None:
        start_epoch, result.losses, timing = load_checkpoint(p.resume, method, optimizer, cfg)
        result.time_s, result.online_s = timing.get("pretrain_s", 0.0), timing.get("online_s", 0.0)
        result.images_per_s = timing.get("images", 0.0)  # images so far; made a rate at the end
        result.steady_s = timing.get("steady_s", 0.0)
        log.info("resumed from %s after epoch %d", p.resume, start_epoch)
    distributed.broadcast_module(method)  # every worker starts from rank 0's weights
    setup = _Setup(method, images, cfg, augmenter, device, optimizer, world)
    hooks = _EpochHooks(checkpoint_path, provenance or {}, log_metrics, on_epoch_end, epoch_metrics)
    try:
        _train_epochs(setup, hooks, result, start_epoch)
    finally:
        if sync_bn:
            distributed.from_sync_batchnorm(method)
    return result


@dataclass(frozen=True)
class _Setup:
    """What the epochs train, with what, where: fixed for the whole call."""

    method: Method
    images: Images
    cfg: RunConfig
    augmenter: Augmenter
    device: torch.device
    optimizer: torch.optim.Optimizer
    world: distributed.World


@dataclass(frozen=True)
class _EpochHooks:
    """What happens after each epoch (see :func:`pretrain`); rank 0's alone are used."""

    checkpoint_path: Path | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    log_metrics: Callable[[dict[str, float], int], None] | None = None
    on_epoch_end: EpochCallback | None = None
    epoch_metrics: EpochMetrics | None = None


def _train_epochs(setup: _Setup, hooks: _EpochHooks, result: TrainResult, start_epoch: int) -> None:
    method, images, cfg, augmenter, device, optimizer, world = (
        setup.method, setup.images, setup.cfg, setup.augmenter, setup.device, setup.optimizer, setup.world
    )  # fmt: skip
    checkpoint_path, epoch_metrics = hooks.checkpoint_path, hooks.epoch_metrics
    p = cfg.pretrain
    n = images.shape[0]
    steps_per_epoch = n // p.batch_size
    total_steps = steps_per_epoch * p.epochs
    warmup_steps = round(p.warmup_epochs * steps_per_epoch)
    cuda = device.type == "cuda"
    views = override_views(method.views(images.shape[-1]), cfg.augment.views)
    batches = _batches(images, views, cfg, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and p.amp else nullcontext()
    show_bar = p.progress and sys.stderr.isatty() and world.is_main
    check_every = loss_check_every(device)
    step = start_epoch * steps_per_epoch
    lr = cosine_lr(step, total_steps, warmup_steps, p.lr, p.final_lr)
    wd = cosine_weight_decay(step, total_steps, p.weight_decay, p.weight_decay_end)
    t0 = time.perf_counter()
    seen, hook_s, monitor_s = 0, 0.0, 0.0
    before = (result.time_s, result.online_s, result.images_per_s)  # a resumed run's totals over earlier epochs
    steady_before = result.steady_s
    for epoch in range(start_epoch, p.epochs):
        method.train()
        key = epoch_seed(cfg.seed, epoch)
        generator = torch.Generator().manual_seed(key)
        torch.manual_seed(key + world.rank)  # dropout, masks and other in-model randomness: a stream per worker
        epoch_loss, epoch_t0 = 0.0, time.perf_counter()
        grad_norm = torch.zeros((), device=device)  # summed over the epoch's steps, read once at its end
        pending, checked = torch.zeros(steps_per_epoch, device=device), 0  # the epoch's step losses; those read so far
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{p.epochs}", disable=not show_bar, leave=False)
        steps = [distributed.shard(rows, world) for rows in batch_indices(n, p.batch_size, generator)]
        for i, (idx, raw) in enumerate(batches.epoch(key, steps)):
            lr = cosine_lr(step, total_steps, warmup_steps, p.lr, p.final_lr)
            wd = cosine_weight_decay(step, total_steps, p.weight_decay, p.weight_decay_end)
            set_schedule(optimizer, lr, wd)
            draws = KeyedDraws(key, idx, i)
            xs = [
                augmenter(x, spec, draws.view(v), cropped=batches.cropped)
                for v, (x, spec) in enumerate(zip(raw, views, strict=True))
            ]
            if cuda and p.channels_last:
                xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
            info = StepInfo(epoch=epoch, step=step, total_steps=total_steps, indices=idx)
            with autocast:
                out = method.training_step(xs, info)
            pending[i] = out.loss.detach()
            if (i + 1) % check_every == 0 or i + 1 == steps_per_epoch:  # the only reads of the loss: no sync in between
                losses = _finite_losses(pending[checked : i + 1], epoch, checked)
                epoch_loss += sum(losses)
                result.step_losses.extend(losses)
                checked = i + 1
                bar.set_postfix(
                    loss=f"{losses[-1]:.4f}", img_s=f"{(seen + p.batch_size) / (time.perf_counter() - t0):.0f}"
                )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            drop_gradients(method, method.frozen_modules(info))  # the same on every worker: a function of the step
            average_gradients(method)
            if p.clip_grad:
                grad_norm += clip_gradients(method.parameters(), p.clip_grad).to(device)
            optimizer.step()
            method.after_step(info)
            if p.compile and seen == 0:  # the first step compiled the modules: timed apart
                if cuda:
                    torch.cuda.synchronize(device)
                result.compile_s = time.perf_counter() - t0
                hook_s += result.compile_s
            step += 1
            seen += p.batch_size
            bar.update(1)
        bar.close()
        mean_loss = epoch_loss / steps_per_epoch
        result.losses.append(mean_loss)
        epoch_time = time.perf_counter() - epoch_t0
        metrics = {
            "train/loss": mean_loss,
            "train/lr": lr,
            "train/weight_decay": wd,
            "train/images_per_s": steps_per_epoch * p.batch_size / epoch_time,
        }
        if p.clip_grad:
            metrics["train/grad_norm"] = grad_norm.item() / steps_per_epoch
        metrics.update({f"train/{k}": float(v) for k, v in out.logs.items()})
        if epoch_metrics is not None:
            hook_t0 = time.perf_counter()
            metrics.update(epoch_metrics(epoch + 1))
            monitor_s += time.perf_counter() - hook_t0
        log.info(
            "epoch %d/%d  loss %.4f  lr %.4g  %.0f img/s",
            epoch + 1,
            p.epochs,
            mean_loss,
            lr,
            metrics["train/images_per_s"],
        )
        if hooks.log_metrics is not None:
            hooks.log_metrics(metrics, epoch + 1)
        if checkpoint_path is not None:
            elapsed = time.perf_counter() - t0 - monitor_s
            timing = {
                "pretrain_s": before[0] + elapsed,
                "online_s": before[1] + monitor_s,
                "images": before[2] + seen,
                "steady_s": steady_before + elapsed - hook_s,
            }
            save_checkpoint(checkpoint_path, method, optimizer, epoch + 1, result.losses, cfg, hooks.provenance, timing)
        if hooks.on_epoch_end is not None:
            hooks.on_epoch_end(epoch + 1, metrics, checkpoint_path)
    if isinstance(batches, _Streamed):
        result.skipped = list(batches.loader.skipped)
    elapsed = time.perf_counter() - t0 - monitor_s
    result.time_s, result.online_s = before[0] + elapsed, before[1] + monitor_s
    result.epochs = p.epochs - start_epoch
    result.steps = result.epochs * steps_per_epoch
    steady_s = steady_before + elapsed - hook_s
    result.images_per_s = (before[2] + seen) / steady_s if steady_s > 0 else 0.0
    result.steady_s = steady_s


def compile_modules(method: Method) -> None:
    """``torch.compile`` each of the method's top-level modules in place (``nn.Module.compile``: parameter names,
    checkpoints and the method's own code are unchanged); compilation happens on the first call."""
    if not torch._dynamo.is_dynamo_supported():  # noqa: SLF001 (no public equivalent)
        raise BadInput(
            "pretrain.compile: true, but torch.compile does not support this Python "
            f"({sys.version.split()[0]}) with torch {torch.__version__}; set pretrain.compile=false"
        )
    for module in method.children():
        module.compile()


def loss_check_every(device: torch.device) -> int:
    """Steps between reads of the loss (each read waits for the device): every step on the CPU, where reading costs
    nothing; every :data:`LOSS_CHECK_EVERY` steps (and each epoch's last) on an accelerator, so the host queues steps
    ahead of the GPU. The first non-finite loss is still reported with its own epoch and step; the steps run after it
    until the read change nothing that is kept (no checkpoint is written from a diverged epoch)."""
    return 1 if device.type == "cpu" else LOSS_CHECK_EVERY


def _finite_losses(losses: torch.Tensor, epoch: int, first_step: int) -> list[float]:
    """The workers' mean of each step loss in ``losses`` (steps ``first_step + 1 ...`` of ``epoch``, 0-based), read
    to the host; :class:`Diverged` naming the first non-finite one."""
    values = distributed.mean_over_workers(losses).tolist()
    for j, loss in enumerate(values):
        if not math.isfinite(loss):
            raise Diverged(f"loss diverged at epoch {epoch + 1} step {first_step + j + 1} (loss={loss})")
    return values


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``; to CUDA from pinned memory without blocking (a copy from pageable memory waits for the
    stream, a hidden synchronisation per step)."""
    if device.type != "cuda" or x.is_cuda:
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


class _InMemory:
    """Every step's images from the tensor held on the device: each view is cropped from the same batch."""

    cropped = False

    def __init__(self, images: torch.Tensor, views: int, device: torch.device) -> None:
        self.images, self.views, self.device = images.to(device), views, device

    def epoch(self, key: int, steps: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        for idx in steps:
            yield idx, [self.images[to_device(idx, self.device)]] * self.views


class _Streamed:
    """Every step's views as crops from the original images, made by DataLoader workers
    (:mod:`harness.data.streaming`)."""

    cropped = True

    def __init__(self, images: StreamedImages, views: list[View], cfg: RunConfig, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.loader = TrainLoader(
            images.source,
            views,
            cfg.augment,
            num_workers=data_workers(cfg),
            prefetch=cfg.data.prefetch,
            pin_memory=cuda,
            skip_corrupt=cfg.data.skip_corrupt,
        )
        self.device = device

    def epoch(self, key: int, steps: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
        for idx, crops in self.loader.epoch(key, steps):
            yield idx, [x.to(self.device, non_blocking=True) for x in crops]


def _batches(images: Images, views: list[View], cfg: RunConfig, device: torch.device) -> _InMemory | _Streamed:
    if isinstance(images, StreamedImages):
        log.info("streaming the training images with %d loader process(es)", data_workers(cfg))
        return _Streamed(images, views, cfg, device)
    assert isinstance(images, torch.Tensor)
    return _InMemory(images, len(views), device)
