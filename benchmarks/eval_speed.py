"""Evaluation speed on cached embeddings: FAISS kNN against scikit-learn, and the linear probe.

Data: 50,000 x 512 float32 training embeddings and 10,000 queries, 10 classes (class means + Gaussian noise), seeded.

* knn: :func:`evaluations.knn.knn_classify` (k=20, T=0.07, exact faiss search) against sklearn's brute-force cosine
  ``KNeighborsClassifier`` on the same arrays (goal: >= 3x faster). sklearn votes by majority, ours by exp(s/T): the
  agreement is printed as a sanity check.
* linear: one 100-epoch ``linear_probe`` fit with a single weight decay (goal: <= 30 s), then the full default grid.

Thread settings are left to the environment; the load average and ``OMP_WAIT_POLICY`` are printed, because on a busy
machine OpenMP's spinning threads can slow small per-step ops badly (``OMP_WAIT_POLICY=PASSIVE`` avoids that).
``--tiny`` (5,000 x 128, 2 epochs, 1 thread) is what the test suite runs.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def make_data(
    n_train: int = 50_000, n_test: int = 10_000, dim: int = 512, classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)).astype(np.float32) * 0.15
    train_y = rng.integers(0, classes, n_train)
    test_y = rng.integers(0, classes, n_test)
    train_x = means[train_y] + rng.standard_normal((n_train, dim), dtype=np.float32)
    test_x = means[test_y] + rng.standard_normal((n_test, dim), dtype=np.float32)
    return train_x, train_y, test_x, test_y


def secs(t: float) -> str:
    """Seconds to 4 significant digits, right-aligned (full-size times are seconds, tiny ones milliseconds)."""
    return f"{t:>8.4g}"


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--skip-grid", action="store_true", help="time only the single linear-probe fit")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="5,000 x 128 train, 500 queries, 2 epochs, 1 thread: seconds, to check the script runs",
    )
    args = parser.parse_args(argv)
    sizes = {"n_train": 50_000, "n_test": 10_000, "dim": 512}
    if args.tiny:
        sizes, args.epochs = {"n_train": 5_000, "n_test": 500, "dim": 128}, 2

    import torch
    from sklearn.neighbors import KNeighborsClassifier

    from evaluations.knn import knn_classify
    from evaluations.linear import linear_probe

    if args.tiny:  # torch, faiss and BLAS alike: a busy machine's spinning OpenMP threads slow tiny work many-fold
        import faiss
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # scikit-learn's dependency

        torch.set_num_threads(1)
        faiss.omp_set_num_threads(1)
        threadpool_limits(1)  # for the rest of the process (the libraries loaded by now: BLAS, scikit-learn's OpenMP)
    print(
        f"cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')} "
        f"loadavg={' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    train_x, train_y, test_x, test_y = make_data(**sizes)
    print(f"data: train {train_x.shape}, test {test_x.shape}, 10 classes")

    knn_classify(train_x[:1000], train_y[:1000], test_x[:10], k=20, temperature=0.07)  # warm-up
    ours, t_ours = timed(lambda: knn_classify(train_x, train_y, test_x, k=20, temperature=0.07))
    sk = KNeighborsClassifier(n_neighbors=20, algorithm="brute", metric="cosine")
    theirs, t_sk = timed(lambda: sk.fit(train_x, train_y).predict(test_x))
    print(f"knn   faiss knn_classify (k=20, T=0.07): {secs(t_ours)} s   top1 {np.mean(ours == test_y):.4f}")
    print(f"knn   sklearn brute cosine (k=20):       {secs(t_sk)} s   top1 {np.mean(theirs == test_y):.4f}")
    print(f"knn   speed-up {t_sk / t_ours:.2f}x (goal >= 3x); predictions agree on {np.mean(ours == theirs):.1%}")

    one, t_one = timed(
        lambda: linear_probe(train_x, train_y, test_x, test_y, epochs=args.epochs, weight_decays=(1e-4,))
    )
    print(
        f"linear one fit, {args.epochs} epochs, batch 256, wd 1e-4: {secs(t_one)} s (goal <= 30 s)   "
        f"top1 {one['top1']:.4f} top5 {one['top5']:.4f}"
    )
    if not args.skip_grid:
        grid, t_grid = timed(lambda: linear_probe(train_x, train_y, test_x, test_y, epochs=args.epochs))
        print(
            f"linear default grid (4 wd: selection fit of 4 heads + retrain): {secs(t_grid)} s   "
            f"chosen wd {grid['weight_decay']} val_top1 {grid['val_top1']:.4f} top1 {grid['top1']:.4f}"
        )


if __name__ == "__main__":
    main()
