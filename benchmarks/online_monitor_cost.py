"""Cost of the online monitor (``eval.online``) against the training epoch it follows.

The settings are the first trial of ``sweeps/temperature.yaml`` with the threads a sweep trial gets
(``resources.cpus``: 1). The real training loop runs ``--epochs`` epochs with the monitor after every one, so each
epoch's training time and each evaluation's time are measured interleaved in one process (a concurrent load slows
both alike). Prints the median seconds per evaluation and per epoch, their ratio, and the monitor's share of a run on
the default schedule. Any run override may follow; ``--tiny`` is what the test suite runs.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from harness.config.loading import build_config
from harness.config.schema import RunConfig
from harness.sweep.config import load_sweep

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "data.num_train=128", "data.num_test=64", "data.image_size=16", "method.proj_hidden_dim=32", "method.proj_dim=16",
    "pretrain.batch_size=32", "eval.online.num_train=64", "eval.online.num_test=32", "eval.knn.k=5",
]  # fmt: skip


def default_config(overrides: list[str]) -> tuple[RunConfig, int]:
    """The first trial's run config of ``sweeps/temperature.yaml`` with ``overrides``, and the threads a trial gets."""
    sweep = load_sweep(REPO / "sweeps" / "temperature.yaml")
    cfg = sweep.configs[sweep.keys[0]]
    return build_config(cfg.as_dict(), overrides), max(1, int(sweep.cfg.resources.cpus))


def measure(cfg: RunConfig, epochs: int) -> dict[str, float]:
    """Train ``epochs`` epochs of ``cfg`` with the monitor after each; median seconds per epoch and per evaluation."""
    from harness.train.loop import pretrain
    from harness.trial.monitor import OnlineMonitor
    from harness.trial.prepare import prepare

    run = build_config(
        cfg.as_dict(),
        [
            f"pretrain.epochs={epochs}",
            "eval.online.every=1",
            "pretrain.warmup_epochs=0",
            "pretrain.progress=false",
            "eval.semi.enabled=false",
            "device=cpu",
        ],
    )
    trial = prepare(run)
    monitor = OnlineMonitor.build(trial)
    epoch_s: list[float] = []
    images = (len(trial.data.train) // run.pretrain.batch_size) * run.pretrain.batch_size

    def log_metrics(metrics: dict[str, float], epoch: int) -> None:
        epoch_s.append(images / metrics["train/images_per_s"])  # the epoch's training loop alone

    pretrain(
        trial.method,
        trial.data.train.images,
        run,
        trial.augmenter,
        trial.device,
        log_metrics=log_metrics,
        epoch_metrics=monitor,
    )
    evaluations = len(cfg.eval.online.model_copy(update={"every": None}).schedule(cfg.pretrain.epochs))
    epoch, evaluation = statistics.median(epoch_s), statistics.median(monitor.seconds)
    return {
        "epoch_s": epoch,
        "evaluation_s": evaluation,
        "ratio": evaluation / epoch,
        "run_share": evaluations * evaluation / (cfg.pretrain.epochs * epoch),
        "evaluations": evaluations,
        "train_items": len(monitor.train_idx),
        "test_items": len(monitor.test_idx),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="run-config overrides on top of the shipped default"
    )
    parser.add_argument(
        "--epochs", type=int, default=4, help="epochs measured, each followed by an evaluation (default 4)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and OpenMP threads (default: resources.cpus of the sweep, 1)"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny config, 2 epochs: seconds, to check the script runs"
    )
    args = parser.parse_args(argv)

    import torch
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # scikit-learn's dependency

    cfg, threads = default_config([*(TINY if args.tiny else []), *args.overrides])
    threads = args.threads or threads
    torch.set_num_threads(threads)
    with threadpool_limits(
        threads
    ):  # OpenMP (faiss, torch) and BLAS (numpy's SVD), as OMP_NUM_THREADS does in a Ray trial
        r = measure(cfg, 2 if args.tiny else args.epochs)
    o = cfg.eval.online
    print(
        f"settings: {cfg.data.name} {cfg.data.image_size} px, {cfg.data.num_train} train "
        f"images, batch {cfg.pretrain.batch_size}, {cfg.backbone.name}, {threads} thread(s)"
    )
    print(
        f"monitor: {r['train_items']:.0f} train / {r['test_items']:.0f} test items "
        f"(eval.online.num_train={o.num_train}, num_test={o.num_test}), kNN k={cfg.eval.knn.k}"
    )
    print(f"epoch (training only, median): {r['epoch_s']:.3f} s")
    print(f"evaluation (median):           {r['evaluation_s']:.3f} s")
    print(f"ratio evaluation / epoch:      {r['ratio']:.1%}")
    print(
        f"share of a {cfg.pretrain.epochs}-epoch run at the default schedule "
        f"({r['evaluations']:.0f} evaluations): {r['run_share']:.1%}"
    )
    return r


if __name__ == "__main__":
    main()
