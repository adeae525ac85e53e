"""The online monitor: whether the representation improves during pretraining, every few epochs.

After each epoch of ``eval.online.schedule(epochs)`` it embeds fixed subsets of the train and test splits exactly as
the final battery does (:func:`harness.trial.evaluate.embed_splits`: the method's :class:`core.contract.Evaluation`
inputs and ``embed``, in eval mode) and returns ``online/knn_top1`` (weighted kNN top-1 of the test subset against the
train subset, :func:`harness.trial.evaluate.knn_top1`) and ``online/rankme`` (:func:`evaluations.collapse.rankme` of
the train subset). As solo-learn's and lightly's online kNN, but it trains nothing and changes nothing a training step
sees (eval and inference mode, no global random generator: the subsets are drawn once from ``data.seed``), so a run's
training numbers are the same with and without it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from core.metrics import ONLINE_LINEAR, ONLINE_METRICS
from core.splits import Split
from evaluations.collapse import rankme
from evaluations.online_linear import OnlineLinearProbe
from harness.data.streaming import StreamedImages
from harness.trial.evaluate import embed_splits, knn_top1
from harness.trial.prepare import Trial

__all__ = ["OnlineMonitor", "subset_indices"]

log = logging.getLogger(__name__)

KNN_TOP1, RANKME = ONLINE_METRICS


def subset_indices(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted int64 indices of ``min(size, n)`` items of ``range(n)``, drawn uniformly without replacement."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size, replace=False)).astype(np.int64)


def _take(split: Split, idx: np.ndarray) -> Split:
    rows = idx.tolist()
    attributes = [split.attributes[i] for i in rows] if split.attributes is not None else None
    images = (
        split.images.subset(idx) if isinstance(split.images, StreamedImages) else split.images[idx]
    )  # streamed: stays streamed
    return Split(images, split.labels[idx], attributes)


@dataclass
class OnlineMonitor:
    """``monitor(epoch)`` -> the online metrics after ``epoch`` (1-based) when it is one of :attr:`epochs`, else
    ``{}``."""

    trial: Trial
    """The run's trial with its data restricted to the subsets (same method, config and device)."""
    train_idx: np.ndarray
    """Rows of the train split in the kNN bank (sorted)."""
    test_idx: np.ndarray
    """Rows of the test split classified (sorted)."""
    epochs: frozenset[int]
    probe: OnlineLinearProbe | None = None
    """The online linear probe, with ``eval.online.linear``."""
    seconds: list[float] = field(default_factory=list)
    """Wall time of each evaluation so far."""

    @classmethod
    def build(cls, trial: Trial) -> OnlineMonitor:
        """The monitor of ``trial.cfg.eval.online``: subsets drawn once, here, from ``data.seed``."""
        cfg, data = trial.cfg, trial.data
        online = cfg.eval.online
        rng = np.random.default_rng(cfg.data.seed)
        train_idx = subset_indices(len(data.train), online.num_train, rng)
        test_idx = subset_indices(len(data.test), online.num_test, rng)
        subsets = dataclasses.replace(data, train=_take(data.train, train_idx), test=_take(data.test, test_idx))
        probe = (
            OnlineLinearProbe(len(data.classes), epochs=online.linear_epochs, seed=cfg.data.seed)
            if online.linear
            else None
        )
        return cls(
            dataclasses.replace(trial, data=subsets),
            train_idx,
            test_idx,
            frozenset(online.schedule(cfg.pretrain.epochs)),
            probe,
        )

    def __call__(self, epoch: int) -> dict[str, float]:
        if epoch not in self.epochs:
            return {}
        t0 = time.perf_counter()
        metrics = self.evaluate()
        self.seconds.append(time.perf_counter() - t0)
        log.info(
            "epoch %d  online kNN top-1 %.4f  RankMe %.1f%s  (%.2f s)",
            epoch,
            metrics[KNN_TOP1],
            metrics[RANKME],
            f"  linear top-1 {metrics[ONLINE_LINEAR]:.4f}" if ONLINE_LINEAR in metrics else "",
            self.seconds[-1],
        )
        return metrics

    def evaluate(self) -> dict[str, float]:
        """The online metrics of the model as it is now."""
        trial = self.trial
        train_x, test_x = embed_splits(trial, trial.method.embed, trial.method)
        train_y, test_y = trial.data.train.labels.numpy(), trial.data.test.labels.numpy()
        metrics = {KNN_TOP1: knn_top1(trial.cfg, train_x, train_y, test_x, test_y), RANKME: rankme(train_x)}
        if self.probe is not None:
            metrics[ONLINE_LINEAR] = self.probe.update(train_x, train_y, test_x, test_y)
        return metrics
