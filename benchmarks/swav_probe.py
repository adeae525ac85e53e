"""SwAV's early dynamics: does it collapse? Trains a few epochs and prints, every few steps, the loss, the
mean pairwise cosine of different images' projections, of the prototypes, the spread of the prototype
scores across prototypes, and the entropies of the Sinkhorn codes and of the predictions.

A collapse shows as the projections' cosine going to 1, the score spread to 0 and both entropies to
log K (the loss then sits at log K). On shapes at 24 px, batch 64:

    python benchmarks/swav_probe.py "method={name: swav, proj_dim: 32, num_prototypes: 100, num_small_crops: 0}"
    python benchmarks/swav_probe.py "method={name: swav, num_prototypes: 30, temperature: 0.5, num_small_crops: 0}"
    python benchmarks/swav_probe.py --tiny        # seconds; the test suite runs it
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from core.contract import StepInfo
from harness.config.loading import build_config, read_yaml
from harness.train.optim import build_optimizer
from harness.trial.prepare import prepare
from methods.swav import SwAV, sinkhorn

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = [
    "data.image_size=24", "data.num_train=1024", "data.num_test=256", "pretrain.batch_size=64", "pretrain.base_lr=0.3",
    "eval.semi.enabled=false",
    "method={name: swav, proj_hidden_dim: 512, proj_dim: 32, num_prototypes: 100, "
    "num_small_crops: 0, global_crop_scale: [0.6, 1.0], freeze_prototypes_steps: 16}",
]  # fmt: skip


TINY = [
    "data.image_size=16", "data.num_train=128", "data.num_test=64", "pretrain.batch_size=32",
    "backbone.name=test_resnet", "method.proj_hidden_dim=64", "method.freeze_prototypes_steps=2",
]  # fmt: skip
"""``--tiny``'s overrides, after the defaults and before the command line's: 2 epochs of 4 steps at 16 px, printed every
2 steps."""


def entropy(p: torch.Tensor) -> float:
    return float(-(p.clamp_min(1e-12).log() * p).sum(1).mean())


def off_diagonal_mean(x: torch.Tensor) -> float:
    gram = x @ x.T
    return float(gram[~torch.eye(len(x), dtype=torch.bool)].mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="run-config overrides on top of the probe's defaults")
    parser.add_argument(
        "--config",
        default=str(REPO / "configs" / "simclr_shapes.yaml"),
        help="the run config under the defaults (default: the repository's configs/simclr_shapes.yaml)",
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--every", type=int, default=8, help="print every this many steps")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="128 images at 16 px, batch 32, 2 epochs, every 2 steps: seconds, to check the script runs",
    )
    args = parser.parse_args(argv)
    if args.tiny:
        args.epochs, args.every = 2, 2
    torch.set_num_threads(1)
    cfg = build_config(read_yaml(args.config), [*DEFAULTS, *(TINY if args.tiny else []), *args.overrides])
    trial = prepare(cfg)
    method, images, bs = trial.method, trial.data.train.images, cfg.pretrain.batch_size
    if not isinstance(method, SwAV) or method.backbone is None:
        raise SystemExit(
            "swav_probe: the probe reads SwAV's backbone, prototypes "
            f"and Sinkhorn settings; got method {type(method).__name__}"
        )
    backbone = method.backbone
    optimizer = build_optimizer(method, cfg.pretrain)
    generator = torch.Generator().manual_seed(cfg.seed)
    views = method.views(images.shape[-1])
    steps = args.epochs * (len(images) // bs)
    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images) - bs + 1, bs):
            xs = [trial.augmenter(images[order[start : start + bs]], v, generator) for v in views]
            method.train()
            out = method.training_step(xs, StepInfo(epoch, step, steps))
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            method.after_step(StepInfo(epoch, step, steps))
            if step % args.every == 0:
                with torch.no_grad():
                    z = F.normalize(method.projector(backbone(xs[0])), dim=1)
                    prototypes = F.normalize(method.prototypes.weight, dim=1)
                    scores = z @ prototypes.T
                    codes = sinkhorn(scores, method.params.epsilon, method.params.sinkhorn_iterations)
                    predictions = F.softmax(scores / method.params.temperature, dim=1)
                print(
                    f"step {step:4d}  loss {out.loss.item():.3f}  projections cos {off_diagonal_mean(z):.3f}  "
                    f"prototypes cos {off_diagonal_mean(prototypes):.3f}  score spread "
                    f"{float(scores.std(1).mean()):.3f}  H(codes) {entropy(codes):.2f}  H(predictions) "
                    f"{entropy(predictions):.2f}  (log K {torch.log(torch.tensor(float(prototypes.shape[0]))):.2f})",
                    flush=True,
                )
            step += 1


if __name__ == "__main__":
    main()
