"""Schedules as pure functions of the step (nanoGPT's ``get_lr``): the one cosine every loop uses.

    lr = cosine_lr(step, total_steps, warmup_steps, peak_lr, final_lr)
    wd = cosine_weight_decay(step, total_steps, weight_decay, weight_decay_end)   # constant when the end is None

A leaf module (it imports nothing of the project): pretraining (:mod:`harness.train.loop`), the
linear probe and fine-tuning (:mod:`evaluations`) all take their learning rates from here.
"""

from __future__ import annotations

import math

__all__ = ["cosine_lr", "cosine_weight_decay"]


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, final_lr: float = 0.0) -> float:
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then half a cosine down to ``final_lr``.

    ``step`` counts from 0; the lr at step ``warmup_steps`` is ``peak_lr`` and at
    ``total_steps`` it is ``final_lr`` (Loshchilov and Hutter 2017; Goyal et al. 2017).
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_weight_decay(step: int, total_steps: int, start: float, end: float | None = None) -> float:
    """The weight decay at ``step``: ``start`` throughout when ``end`` is None, else half a cosine from ``start`` at
    step 0 to ``end`` at ``total_steps``, without warm-up (DINO's ``cosine_scheduler(wd, wd_end, epochs, niter)``,
    0.04 -> 0.4): ``end + (start - end) * (1 + cos(pi * step / total_steps)) / 2``.
    """
    if end is None:
        return start
    return cosine_lr(step, total_steps, 0, start, end)
