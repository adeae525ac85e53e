"""Self-distillation of a fine-tuned classifier on unlabelled images (SimCLRv2: Chen et al., NeurIPS 2020, Sec. 2).

SimCLRv2's third step: the fine-tuned network is the teacher and labels the training images for a student of the
same architecture, which learns from those soft labels alone, ``L = -sum_x sum_y P_T(y|x; τ) log P_S(y|x; τ)``.

Choices, next to the paper's:

- no labels: the distillation loss alone (the paper's default), on every training image;
- temperature 1.0 by default (``eval.semi.distill_temperature``), for teacher and student alike, without a τ² factor
  (SimCLRv2 reports 0.1 for self-distillation and 1.0 for big-to-small, and little difference);
- the student starts where the teacher's fine-tuning started (the pretrained trunk and a zero-initialised head,
  :func:`evaluations.finetune.classifier`), so that a few epochs suffice (the paper trains it like a pretraining run);
- augmentation and optimiser are fine-tuning's: crop + flip, the frozen teacher seeing the student's images; SGD with
  Nesterov momentum 0.9, no weight decay, lr ``lr * batch/256`` on a cosine.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from core.splits import Images
from evaluations.finetune import Augment, train_on_batches

__all__ = ["distillation_loss", "self_distill"]


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``-sum_y P_T(y|x; τ) log P_S(y|x; τ)``, the mean over the batch (SimCLRv2's distillation loss).

    ``P = softmax(logits / τ)``; no gradient reaches the teacher's logits. Equal logits give the
    entropy of the teacher's distribution at τ; a one-hot teacher gives the student's cross-entropy
    against that class. Computed in float32.

    student_logits, teacher_logits: (B, C).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            "student and teacher logits must both be (B, C), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    targets = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    return -(targets * F.log_softmax(student_logits.float() / temperature, dim=1)).sum(dim=1).mean()


def self_distill(
    teacher: nn.Module,
    student: nn.Module,
    images: Images,
    augment: Augment,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
    device: torch.device | str = "cpu",
    temperature: float = 1.0,
) -> nn.Module:
    """Train ``student`` to match the frozen ``teacher``'s predictions on ``images``, without labels; returns it.

    Both map normalised images ``(B, C, S, S)`` to logits ``(B, K)``. ``images`` are uint8 (all the
    training images); each batch is augmented once by ``augment`` (crop + flip: the caller leaves
    out colour distortion) and shown to both. The teacher is left unchanged, in the mode it
    came in; the student is trained in place and returned in train mode. See the module docstring.
    """
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 0, batch_size >= 1 and lr > 0; got {epochs}, {batch_size} and {lr}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    device = torch.device(device)
    teacher_was_training = teacher.training
    teacher.to(device).eval()
    student.to(device)

    def loss(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(x)
        return distillation_loss(student(x), teacher_logits, temperature)

    try:
        train_on_batches(
            student,
            images,
            torch.arange(images.shape[0]),
            augment,
            loss,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            device=device,
        )
    finally:
        teacher.train(teacher_was_training)
    return student
