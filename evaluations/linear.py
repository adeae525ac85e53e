"""Linear probe on cached (frozen) embeddings, with the weight decay picked on a held-out split.

Protocol (MAE's linear probe head; SimCLR / lightly's optimiser):

* head: ``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, C)``, weight ~ N(0, 0.01^2), bias 0;
* cross-entropy, SGD momentum 0.9, lr ``lr * batch_size / 256`` on a cosine over all steps without warm-up, weight
  decay on weight and bias; a fresh seeded permutation each epoch, the last incomplete batch dropped (as MAE);
* model selection: one head per weight decay on all but a class-stratified ``val_fraction``, the best validation
  top-1 wins (ties: the earlier), then a head with that decay is retrained on the whole training set and tested once.
  With a single weight decay: no split, one fit, ``val_top1`` NaN.

The step is written out by hand, without autograd (nothing upstream of the linear layer needs a gradient), and the
heads of the grid share their batches, so the whole grid trains as one wider matmul;
``tests/evaluations/test_linear.py`` checks it against the ``torch.nn`` reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from core.schedules import cosine_lr
from evaluations.checks import check_features, remap_labels

__all__ = ["linear_probe"]

_EVALUATION = "linear probe"
BN_EPS = 1e-6  # MAE: BatchNorm1d(affine=False, eps=1e-6)
BN_MOMENTUM = 0.1  # torch default
MOMENTUM = 0.9
INIT_STD = 0.01
_EVAL_CHUNK = 8192  # rows per forward pass at evaluation


def stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices: per class, round(val_fraction * n_c) go to val, at least one stays in train."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        n_val = min(round(val_fraction * members.shape[0]), members.shape[0] - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _fit_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decays: Sequence[float],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train one BN(affine=False) + Linear head per weight decay on the same batches.

    x: (N, D) float32, y: (N,) int64 on the training device.
    Returns (W (G, C, D), b (G, C), running_mean (D,), running_var (D,)).

    Random draws, in order, from ``torch.Generator().manual_seed(seed)`` on the CPU:
    the (C, D) initial weight (``randn * 0.01``, shared by all heads), then one
    ``randperm(N)`` per epoch. The first ``steps_per_epoch * B`` entries of the
    permutation are the epoch's batches, B = min(batch_size, N).
    """
    n, d = x.shape
    g_count, c = len(weight_decays), num_classes
    dev = x.device
    gen = torch.Generator().manual_seed(int(seed))
    w0 = torch.randn(c, d, generator=gen) * INIT_STD
    w = w0.repeat(g_count, 1).to(dev)  # (G*C, D): all heads in one matmul
    b = torch.zeros(g_count * c, device=dev)
    wd = torch.tensor([float(v) for v in weight_decays]).repeat_interleave(c).to(dev)
    wd_col = wd[:, None]
    buf_w, buf_b = torch.zeros_like(w), torch.zeros_like(b)
    running_mean = torch.zeros(d, device=dev)
    running_var = torch.ones(d, device=dev)
    onehot = torch.nn.functional.one_hot(y, c).to(torch.float32)

    bsz = min(int(batch_size), n)
    steps_per_epoch = n // bsz
    total = epochs * steps_per_epoch
    lrs = [cosine_lr(t, total, 0, float(lr) * bsz / 256.0) for t in range(total)]
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(dev)
        for s in range(steps_per_epoch):
            idx = perm[s * bsz : (s + 1) * bsz]
            xhat = torch.nn.functional.batch_norm(
                x.index_select(0, idx), running_mean, running_var, training=True, momentum=BN_MOMENTUM, eps=BN_EPS
            )
            logits = torch.addmm(b, xhat, w.t()).view(bsz, g_count, c)
            # d(mean CE)/d logits = (softmax - onehot) / B, per head
            grad = torch.softmax(logits, dim=2).sub_(onehot.index_select(0, idx)[:, None, :]).view(bsz, g_count * c)
            # torch.optim.SGD: buf = 0.9 buf + (grad + wd p); p -= lr buf
            buf_w.mul_(MOMENTUM).addmm_(grad.t(), xhat, alpha=1.0 / bsz).addcmul_(w, wd_col)
            buf_b.mul_(MOMENTUM).add_(grad.sum(0), alpha=1.0 / bsz).addcmul_(b, wd)
            w.add_(buf_w, alpha=-lrs[step])
            b.add_(buf_b, alpha=-lrs[step])
            step += 1
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{_EVALUATION}: weights became NaN/inf; lr={lr} is too large for these features")
    return w.view(g_count, c, d), b.view(g_count, c), running_mean, running_var


@torch.no_grad()
def _logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Eval-mode forward: (N, D) -> (N, G, C) logits for heads (G, C, D) / (G, C)."""
    g_count, c, d = w.shape
    flat_w, flat_b = w.reshape(g_count * c, d), b.reshape(g_count * c)
    out = []
    for start in range(0, x.shape[0], _EVAL_CHUNK):
        xhat = torch.nn.functional.batch_norm(x[start : start + _EVAL_CHUNK], mean, var, training=False, eps=BN_EPS)
        out.append(torch.addmm(flat_b, xhat, flat_w.t()).view(-1, g_count, c))
    return torch.cat(out)


def _topk_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """Fraction of rows of (N, C) logits whose label is among the k largest."""
    top = logits.topk(k, dim=1).indices
    return int((top == y[:, None]).any(dim=1).sum()) / y.shape[0]


def _check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{_EVALUATION}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_weight_decays(weight_decays: Sequence[float]) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in weight_decays)
    except (TypeError, ValueError):
        raise ValueError(
            f"{_EVALUATION}: weight_decays must be a sequence of numbers >= 0, got {weight_decays!r}"
        ) from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(
            f"{_EVALUATION}: weight_decays must be a non-empty sequence of finite numbers >= 0, got {weight_decays!r}"
        )
    return values


@torch.no_grad()
def linear_probe(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    *,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.1,
    weight_decays: Sequence[float] = (0.0, 1e-5, 1e-4, 1e-3),
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Linear probe top-1/top-5 on frozen embeddings (MAE head, SimCLR optimiser; see the module doc).

    Args:
        train_x: (N_train, D), test_x: (N_test, D) embeddings (numpy or torch, any real dtype).
        train_y, test_y: labels of any sortable dtype; remapped to 0..C-1 over their union
            (a test-only class is an output the head never learns to predict).
        epochs: passes over the training data, for every fit (selection and retrain).
        batch_size: B (clipped to N); lr: base lr for B = 256, the effective lr is ``lr * B / 256``.
        weight_decays: the grid; with one value no validation split is made.
        val_fraction: class-stratified share of the training set held out for selection,
            in (0, 1) (per class round(val_fraction * n_c), at least one kept for training).
        seed: seeds the split, the initial weight and every epoch's shuffle.
        device: where to train ("cpu", "cuda", ...).

    Returns:
        ``top1``, ``top5`` (fractions of the test set; ``top5`` is omitted when there
        are fewer than 5 classes), ``weight_decay`` (the chosen one), ``val_top1``
        (its validation top-1; NaN with a single weight decay),
        ``val_top1_by_weight_decay`` ({decay: val top-1}; empty with a single decay),
        ``num_classes``, ``epochs``, ``batch_size``, ``lr`` (base) and ``lr_effective``.

    Cost: with G > 1 decays, one fit of G heads on (1 - val_fraction) N rows plus one
    fit of one head on N rows (the G heads share each batch's BN and matmul).
    """
    train_x, train_y = check_features(train_x, train_y, evaluation=_EVALUATION)
    test_x, test_y = check_features(test_x, test_y, evaluation=_EVALUATION)
    if test_x.shape[1] != train_x.shape[1]:
        raise ValueError(
            f"{_EVALUATION}: test embeddings have dimension {test_x.shape[1]} "
            f"but training embeddings have {train_x.shape[1]}"
        )
    epochs = _check_positive_int(epochs, "epochs")
    batch_size = _check_positive_int(batch_size, "batch_size", 2)
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"{_EVALUATION}: lr must be a finite number > 0, got {lr!r}")
    decays = _check_weight_decays(weight_decays)
    (train_y, test_y), num_classes = remap_labels(train_y, test_y)
    if num_classes < 2:
        raise ValueError(f"{_EVALUATION}: needs at least 2 classes, got {num_classes}")
    if train_x.shape[0] < 2:
        raise ValueError(f"{_EVALUATION}: BatchNorm needs at least 2 training rows, got {train_x.shape[0]}")
    dev = torch.device(device)
    hyper: dict[str, Any] = {"epochs": epochs, "batch_size": batch_size, "lr": float(lr), "seed": int(seed)}

    by_decay: dict[float, float] = {}
    if len(decays) > 1:
        if (
            isinstance(val_fraction, bool)
            or not isinstance(val_fraction, (int, float, np.floating))
            or not 0 < val_fraction < 1
        ):
            raise ValueError(f"{_EVALUATION}: val_fraction must be a number in (0, 1), got {val_fraction!r}")
        fit_idx, val_idx = stratified_split(train_y, float(val_fraction), int(seed))
        if val_idx.shape[0] == 0 or fit_idx.shape[0] < 2:
            raise ValueError(
                f"{_EVALUATION}: val_fraction={val_fraction} of {train_x.shape[0]} "
                f"training rows leaves {val_idx.shape[0]} for validation and "
                f"{fit_idx.shape[0]} for training; use more data or a larger val_fraction"
            )
        xt = torch.from_numpy(train_x).to(dev)
        yt = torch.from_numpy(train_y).to(dev)
        fit_i, val_i = torch.from_numpy(fit_idx).to(dev), torch.from_numpy(val_idx).to(dev)
        heads = _fit_heads(xt[fit_i], yt[fit_i], num_classes, decays, **hyper)
        val_logits = _logits(xt[val_i], *heads)
        accs = [_topk_accuracy(val_logits[:, g], yt[val_i], 1) for g in range(len(decays))]
        best = int(np.argmax(accs))  # first maximum: ties go to the earlier decay
        by_decay = dict(zip(decays, accs, strict=True))
        chosen, val_top1 = decays[best], accs[best]
    else:
        chosen, val_top1 = decays[0], float("nan")

    xt = torch.from_numpy(train_x).to(dev)
    yt = torch.from_numpy(train_y).to(dev)
    head = _fit_heads(xt, yt, num_classes, (chosen,), **hyper)
    logits = _logits(torch.from_numpy(test_x).to(dev), *head)[:, 0]
    yq = torch.from_numpy(test_y).to(dev)
    out: dict[str, Any] = {"top1": _topk_accuracy(logits, yq, 1)}
    if num_classes >= 5:
        out["top5"] = _topk_accuracy(logits, yq, 5)
    out.update(
        weight_decay=chosen,
        val_top1=val_top1,
        val_top1_by_weight_decay=by_decay,
        num_classes=num_classes,
        epochs=epochs,
        batch_size=batch_size,
        lr=float(lr),
        lr_effective=float(lr) * min(batch_size, train_x.shape[0]) / 256.0,
    )
    return out
