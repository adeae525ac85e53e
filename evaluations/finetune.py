"""Semi-supervised fine-tuning on class-balanced label subsets (SimCLR's 1% / 10% protocol).

The pretrained trunk (the backbone, or for SimCLRv2 the backbone plus the first layers of its projection head) and a
new linear head are fine-tuned together on a class-balanced subset of the training labels
(:func:`evaluations.semi_supervised.balanced_subset`), with random resized crops and flips only; top-1/top-5 are
measured on the full test set in eval mode. SGD with Nesterov momentum 0.9, no weight decay, lr ``lr * batch/256`` on
a cosine over all steps. The trunk is deep-copied: the pretrained model is left untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from core.schedules import cosine_lr
from core.splits import Images
from evaluations.features import on_accelerator

__all__ = [
    "Augment",
    "Finetuned",
    "Normalize",
    "classification_accuracy",
    "classifier",
    "finetune_subset",
    "train_on_batches",
]

Augment = Callable[[Images, torch.Tensor, torch.Generator], torch.Tensor]
"""``augment(images, rows, generator)``: one random training view ``(B, C, S, S)``, float on the device, of the B
images ``images[rows]`` (uint8; streamed images crop from their originals)."""
Normalize = Callable[[torch.Tensor], torch.Tensor]
"""``normalize(x)``: uint8 ``(B, C, S, S)`` on the device -> the un-augmented, normalised float images."""


@dataclass
class Finetuned:
    """A fine-tuned classifier (trunk copy + linear head, in eval mode) and its test metrics."""

    metrics: dict[str, float]
    """``{"top1", "top5"}`` on the test set."""
    model: nn.Module
    num_classes: int


def classifier(trunk: nn.Module, dim: int, num_classes: int) -> nn.Sequential:
    """A copy of ``trunk`` (features of size ``dim``) followed by a zero-initialised linear head; ``trunk`` is
    untouched."""
    head = nn.Linear(dim, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return nn.Sequential(copy.deepcopy(trunk), head)


def finetune_subset(
    trunk: nn.Module,
    dim: int,
    images: Images,
    labels: torch.Tensor,
    subset: np.ndarray,
    test_images: Images,
    test_labels: torch.Tensor,
    augment: Augment,
    normalize: Normalize,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
    device: torch.device | str = "cpu",
    eval_batch_size: int = 512,
) -> Finetuned:
    """Fine-tune a copy of ``trunk`` (features of size ``dim``) plus a linear head on ``images[subset]``.

    ``augment`` makes one training view per batch (crop + flip: the caller leaves out colour
    distortion); the test images are ``normalize``d. Returns the fine-tuned model and its
    ``{"top1", "top5"}`` on the test set (top5 counts min(5, C) classes).
    """
    device = torch.device(device)
    num_classes = int(max(labels.max(), test_labels.max())) + 1
    model = classifier(trunk, dim, num_classes).to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    rows = torch.as_tensor(np.asarray(subset), dtype=torch.long)
    train_on_batches(
        model, images, rows, augment, lambda x, idx: F.cross_entropy(model(x), labels[idx].to(device)),
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
    )  # fmt: skip
    metrics = classification_accuracy(model, test_images, test_labels, normalize, device, eval_batch_size)
    return Finetuned(metrics, model, num_classes)


def train_on_batches(
    model: nn.Module,
    images: Images,
    rows: torch.Tensor,
    augment: Augment,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
) -> None:
    """Train ``model`` in place, in train mode, on ``images[rows]``: seeded random batches, each augmented once by
    ``augment`` (from the same seeded generator), ``loss(x, idx)`` on the batch's images and rows; SGD with Nesterov
    momentum 0.9, no weight decay, ``lr * batch_size / 256`` on a cosine to 0 over the steps taken. A batch of one is
    skipped (BatchNorm in train mode needs two samples). The fine-tuning and the distillation schedule alike."""
    base_lr = lr * batch_size / 256
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=base_lr, momentum=0.9, nesterov=True, weight_decay=0.0
    )
    sizes = [min(batch_size, len(rows) - start) for start in range(0, len(rows), batch_size)]
    total = sum(size >= 2 for size in sizes) * epochs
    generator = torch.Generator().manual_seed(seed)
    precision, layout = on_accelerator(device)  # bf16 + channels_last on CUDA
    step = 0
    model.train()
    for _ in range(epochs):
        order = rows[torch.randperm(len(rows), generator=generator)]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, 0, base_lr, 0.0)
            with precision:
                value = loss(layout(augment(images, idx, generator)), idx)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            step += 1


@torch.inference_mode()
def classification_accuracy(
    model: nn.Module,
    images: Images,
    labels: torch.Tensor,
    normalize: Normalize,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
) -> dict[str, float]:
    """Top-1 and top-5 (of min(5, C) classes) of a classifier on un-augmented, normalised images; leaves it in eval
    mode."""
    device = torch.device(device)
    model.eval()
    precision, layout = on_accelerator(device)
    hits1 = hits5 = torch.zeros((), dtype=torch.long, device=device)  # read once, at the end
    for start in range(0, images.shape[0], batch_size):
        with precision:
            logits = model(layout(normalize(images[start : start + batch_size].to(device)))).float()
        y = labels[start : start + batch_size].to(device)
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits1 = hits1 + (ranked[:, 0] == y).sum()
        hits5 = hits5 + (ranked == y[:, None]).any(dim=1).sum()
    n = images.shape[0]
    return {"top1": int(hits1) / n, "top5": int(hits5) / n}
