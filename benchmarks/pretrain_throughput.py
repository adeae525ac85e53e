"""Pretraining throughput: the harness's full step against a raw timm forward + backward.

The full step is what ``harness.train.pretrain`` does per batch: index the uint8
images, draw two augmented views on the device, forward both through backbone +
projector, NT-Xent, backward, optimiser step, lr schedule, NaN guard. The raw
reference runs ``timm`` forward + backward + SGD step on pre-made float tensors of
the same shape (2 x batch images per step), with no augmentation, head or loss.
Images/s counts source images (``batch`` per step) in both, so the ratio is the
share of the raw model's speed the harness keeps.

    python benchmarks/pretrain_throughput.py                       # resnet18, 32 px, batch 256
    python benchmarks/pretrain_throughput.py --cifar-stem --steps 4
"""

from __future__ import annotations

import argparse
import time

import torch

from harness.config import build_config
from harness.prepare import prepare
from harness.train import pretrain
from methods.base import StepInfo


def raw_images_per_s(model: torch.nn.Module, batch: int, size: int, channels: int, steps: int, warmup: int, device: torch.device) -> float:
    """timm forward + backward + SGD step on pre-made tensors of shape (2 * batch, C, size, size)."""
    model.to(device)
    x = torch.randn(2 * batch, channels, size, size, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(x).float().mean().backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - t0)


def harness_images_per_s(overrides: list[str], steps: int, warmup: int, batch: int) -> float:
    """The real training loop on ``batch * (warmup + steps)`` shapes images, timed after the warm-up steps."""
    cfg = build_config({}, [*overrides, f"data.num_train={batch * (warmup + steps)}", "pretrain.epochs=1", "pretrain.warmup_epochs=0", "pretrain.progress=false"])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cifar-stem", action="store_true")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

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
    torch.manual_seed(0)
    full = harness_images_per_s(overrides, args.steps, args.warmup, args.batch_size)
    cfg = build_config({}, [*overrides, "data.num_train=256"])
    trial = prepare(cfg)
    if trial.method.backbone is None:
        raise SystemExit(f"pretrain_throughput: method {trial.method.name!r} has no backbone to time on its own")
    raw = raw_images_per_s(trial.method.backbone, args.batch_size, args.image_size, 3, args.steps, args.warmup, trial.device)

    print(f"backbone {args.backbone}  cifar_stem {args.cifar_stem}  image {args.image_size}px  batch {args.batch_size}  threads {torch.get_num_threads()}  device {cfg.device}")
    print(f"raw timm forward+backward (2x{args.batch_size} pre-made tensors): {raw:8.1f} images/s")
    print(f"harness full step (augment + forward + NT-Xent + backward + opt):  {full:8.1f} images/s")
    print(f"ratio full / raw: {full / raw:.3f}  (goal >= 0.85)")


if __name__ == "__main__":
    main()
