"""An online linear probe: one linear classifier that trains on the embeddings the online monitor extracts, each time
it evaluates, and keeps its weights and momentum from one evaluation to the next (lightly's, solo-learn's and
stable-pretraining's online probes train on every batch's detached features; this one on the monitor's labelled
subset, so that it needs no labels inside the training step and changes no training number).

Each fit: the embeddings standardised with their own mean and std (BatchNorm without affine, as the offline probe's
head), ``epochs`` passes of momentum SGD over a fresh permutation from the probe's own generator, cross entropy; the
gradient is written out by hand (nothing upstream needs one).
"""

from __future__ import annotations

import numpy as np
import torch

from evaluations.checks import check_features

__all__ = ["OnlineLinearProbe"]

EPS = 1e-6


class OnlineLinearProbe:
    """``probe.update(train_x, train_y, test_x, test_y)`` -> top-1 on the test rows after training on the train rows."""

    def __init__(
        self,
        num_classes: int,
        *,
        epochs: int = 10,
        batch_size: int = 256,
        lr: float = 0.1,
        momentum: float = 0.9,
        seed: int = 0,
    ) -> None:
        if num_classes < 2 or epochs < 1 or batch_size < 1 or not lr > 0 or not 0 <= momentum < 1:
            raise ValueError(
                f"online linear probe: num_classes >= 2, epochs >= 1, batch_size >= 1, lr > 0 and momentum in [0, 1), "
                f"got {num_classes}, {epochs}, {batch_size}, {lr}, {momentum}"
            )
        self.num_classes, self.epochs, self.batch_size, self.lr, self.momentum = (
            num_classes,
            epochs,
            batch_size,
            lr,
            momentum,
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.weight: torch.Tensor | None = None  # (C, D), created at the first update
        self.bias = torch.zeros(num_classes)
        self._velocity: tuple[torch.Tensor, torch.Tensor] | None = None

    def _standardise(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    def logits(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        assert self.weight is not None
        return self._standardise(x, mean, std) @ self.weight.T + self.bias

    def update(self, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
        """Train ``epochs`` passes on (train_x, train_y), then the top-1 accuracy on (test_x, test_y)."""
        train_np, labels = check_features(train_x, train_y, evaluation="online linear probe")
        x = torch.as_tensor(train_np)
        y = torch.as_tensor(labels.astype(np.int64))
        if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
            raise ValueError(
                f"online linear probe: labels must be in [0, {self.num_classes}), got {int(y.min())}..{int(y.max())}"
            )
        n, d = x.shape
        if self.weight is None:
            self.weight = torch.randn(self.num_classes, d, generator=self.generator) * 0.01
        elif self.weight.shape[1] != d:
            raise ValueError(f"online linear probe: embeddings changed width from {self.weight.shape[1]} to {d}")
        mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False) + EPS
        xs = self._standardise(x, mean, std)
        w, b = self.weight, self.bias
        vw, vb = self._velocity if self._velocity is not None else (torch.zeros_like(w), torch.zeros_like(b))
        batch = min(self.batch_size, n)
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n - batch + 1, batch):
                rows = order[start : start + batch]
                probs = torch.softmax(xs[rows] @ w.T + b, dim=1)
                probs[torch.arange(batch), y[rows]] -= 1.0
                probs /= batch  # d(mean cross entropy)/d(logits)
                vw.mul_(self.momentum).add_(probs.T @ xs[rows])
                vb.mul_(self.momentum).add_(probs.sum(dim=0))
                w.sub_(self.lr * vw)
                b.sub_(self.lr * vb)
        self._velocity = (vw, vb)
        test = torch.as_tensor(np.asarray(test_x, dtype=np.float32))
        predicted = self.logits(test, mean, std).argmax(dim=1).numpy()
        return float((predicted == np.asarray(test_y)).mean())
