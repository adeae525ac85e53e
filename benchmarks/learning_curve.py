"""kNN top-1 of the backbone during pretraining: how fast a config learns, epoch by epoch.

Prints the epoch, mean loss, kNN top-1 on the test split (the run's own protocol) and wall
time every ``--every`` epochs, next to the raw-pixel and random-init baselines.

    python benchmarks/learning_curve.py configs/simclr_shapes.yaml pretrain.epochs=50 --every 5
    python benchmarks/learning_curve.py configs/simclr_shapes.yaml --tiny   # seconds; the test suite runs it
"""

from __future__ import annotations

import argparse
import time

from harness.config.loading import load_config
from harness.train.loop import pretrain
from harness.trial.evaluate import baselines, embed_splits, knn_top1
from harness.trial.prepare import prepare

TINY = [
    "data.num_train=128", "data.num_test=64", "data.image_size=16", "backbone.name=test_resnet", "pretrain.epochs=2",
    "pretrain.batch_size=32", "pretrain.warmup_epochs=0", "eval.knn.k=5",
    "eval.semi.enabled=false",  # the 1% subset of 128 images cannot hold every class
]  # fmt: skip
"""``--tiny``'s overrides, before the command line's: 2 epochs of 4 steps at 16 px."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--every", type=int, default=2, help="evaluate every N epochs")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help=(
            "128 train / 64 test images at 16 px, test_resnet, 2 epochs, "
            "every epoch, 1 thread: seconds, to check the script runs"
        ),
    )
    args = parser.parse_args(argv)
    if args.tiny:
        import torch

        args.every = 1
        torch.set_num_threads(1)  # a busy machine's spinning OpenMP threads slow tiny steps many-fold

    cfg = load_config(args.config, [*(TINY if args.tiny else []), *args.overrides, "pretrain.progress=false"])
    trial = prepare(cfg)
    ytr, yte = trial.data.train.labels.numpy(), trial.data.test.labels.numpy()
    print("baselines:", {k: round(v, 4) for k, v in baselines(trial).items()}, flush=True)
    t0 = time.perf_counter()

    def report(epoch: int, metrics: dict[str, float], _path: object) -> None:
        if epoch % args.every and epoch != cfg.pretrain.epochs:
            return
        train_x, test_x = embed_splits(trial, trial.method.embed, trial.method)
        top1 = knn_top1(cfg, train_x, ytr, test_x, yte)
        trial.method.train()
        print(
            f"epoch {epoch:4d}  loss {metrics['train/loss']:.4f}  "
            f"knn_top1 {top1:.4f}  {time.perf_counter() - t0:6.1f} s",
            flush=True,
        )

    pretrain(trial.method, trial.data.train.images, cfg, trial.augmenter, trial.device, on_epoch_end=report)


if __name__ == "__main__":
    main()
