"""Ray Tune's per-trial overhead: a sweep of N trivial trials against the same trials in a plain loop.

Two levels, each as wall time per trial:
  tune    Ray Tune alone: a trainable that reports one number (Ray started once, outside the timing)
  harness the harness's sweep of N trivial run configs (no pretraining epoch, kNN only),
          against ``harness.trial.run.run`` on the same configs in a loop; includes Ray's start and
          the MLflow parent/child bookkeeping, excludes writing the tables

    python benchmarks/sweep_overhead.py [--trials 8]
    python benchmarks/sweep_overhead.py --tiny    # 2 trials, 1 torch thread; the test suite runs it (Ray starts twice)

Goal: overhead <= 3 s per trial on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml


def trivial(config: dict) -> None:
    from harness.launch import raytune

    raytune.report({"value": float(len(raytune.trial_key(config)))})


def tune_level(n: int, storage: Path) -> tuple[float, float]:
    from harness.launch import raytune

    keys = [f"trial {i}" for i in range(n)]
    t0 = time.perf_counter()
    for key in keys:
        float(len(key))  # what the trainable computes
    loop = time.perf_counter() - t0
    raytune.init(None)
    try:
        outcome = raytune.run_trials(
            trivial,
            keys,
            name="overhead",
            storage=storage,
            cpus=1,
            gpus=0,
            max_concurrent=None,
            scheduler=None,
            max_failures=0,
            events=raytune.TrialEvents(),
        )
    finally:
        raytune.shutdown()
    assert len(outcome.results) == n, outcome.errors
    return outcome.wall_s / n, loop / n


def harness_level(n: int, work: Path, backbone: str = "resnet10t") -> tuple[float, float]:
    from harness.config.loading import load_config
    from harness.sweep.driver import load_sweep, run_sweep
    from harness.trial.run import run

    run_cfg = {
        "data": {"num_train": 64, "num_test": 32, "image_size": 16},
        "backbone": {"name": backbone},
        "method": {"name": "simclr", "proj_hidden_dim": 32, "proj_dim": 16},
        "pretrain": {"epochs": 0, "batch_size": 32, "warmup_epochs": 0, "progress": False},
        "eval": {
            "baselines": False,
            "knn": {"k": 5},
            **{e: {"enabled": False} for e in ("linear", "semi", "retrieval", "collapse")},
        },
        "device": "cpu",
    }
    sweep_file = work / "overhead.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "name": "overhead",
                "run": run_cfg,
                "space": {"method.temperature": [0.1 + 0.01 * i for i in range(n)]},
                "storage": str(work / "outputs"),
            }
        )
    )
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    sweep = load_sweep(sweep_file)
    t0 = time.perf_counter()
    for cfg in sweep.configs.values():
        run(load_config(None, []).model_validate({**cfg.as_dict(), "tracking": {"experiment": "overhead-loop"}}))
    loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    outcome = run_sweep(sweep, verbose=0)
    wall = time.perf_counter() - t0
    assert len(outcome.finished) == n, outcome.failed
    return wall / n, loop / n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="2 trials, test_resnet, 1 torch thread in the loop: to check the script runs (Ray's start-ups dominate)",
    )
    args = parser.parse_args(argv)
    backbone = "resnet10t"
    if args.tiny:
        import torch

        args.trials, backbone = 2, "test_resnet"
        torch.set_num_threads(
            1
        )  # as a Tune trial of resources.cpus=1; a busy machine's spinning OpenMP threads slow tiny work many-fold
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sweep_s, loop_s = tune_level(args.trials, work / "tune")
        print(
            f"tune     {args.trials} trials: {sweep_s:.2f} s/trial in Tune, "
            f"{loop_s * 1e3:.3f} ms/trial in a loop -> overhead {sweep_s - loop_s:.2f} s/trial"
        )
        sweep_s, loop_s = harness_level(args.trials, work, backbone)
        print(
            f"harness  {args.trials} trials: {sweep_s:.2f} s/trial as a sweep, {loop_s:.2f} "
            f"s/trial with `run` in a loop -> overhead {sweep_s - loop_s:.2f} s/trial (goal <= 3 s)"
        )


if __name__ == "__main__":
    main()
