"""Feature extraction: run a frozen encoder once, in eval mode, and cache the embeddings for every evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from core.splits import Images


def on_accelerator(
    device: torch.device | str,
) -> tuple[contextlib.AbstractContextManager[object], Callable[[torch.Tensor], torch.Tensor]]:
    """``(precision, layout)`` for work on ``device``: on CUDA, bf16 autocast and channels_last images (the precision
    and layout pretraining uses); elsewhere, float32 and the images as they are."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext(), lambda x: x
    return torch.autocast(
        "cuda", dtype=torch.bfloat16
    ), lambda x: x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


@contextmanager
def eval_mode(module: nn.Module | None) -> Iterator[None]:
    """``module`` in eval mode inside the block (BatchNorm on its running statistics, dropout off), then back in
    the mode it came in, whatever happens; ``None`` is a no-op."""
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        if module is not None:
            module.train(was_training)


@torch.inference_mode()
def extract_embeddings(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    images: Images,
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    module: nn.Module | None = None,
) -> np.ndarray:
    """Embed ``images`` (uint8 (N, C, H, W)) -> float32 (N, D) numpy array.

    ``preprocess`` turns a uint8 batch on ``device`` into the encoder's input
    (normalisation, no augmentation). ``module`` (default: ``encoder`` itself if
    it is a module) is put in eval mode for the extraction, so BatchNorm uses its
    running statistics and dropout is off, and restored to its mode afterwards.
    On CUDA the encoder runs in bf16 autocast on channels_last images (:func:`on_accelerator`).
    """
    module = module if module is not None else (encoder if isinstance(encoder, nn.Module) else None)
    precision, layout = on_accelerator(device)
    with eval_mode(module), precision:
        chunks = []
        for start in range(0, images.shape[0], batch_size):
            x = layout(preprocess(images[start : start + batch_size].to(device)))
            chunks.append(encoder(x).float().cpu())
        return torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), np.float32)


def raw_pixels(
    images: Images, preprocess: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 2048
) -> np.ndarray:
    """The raw-pixel baseline's "embedding": normalised pixels, flattened to (N, C*H*W)."""
    return extract_embeddings(lambda x: x.flatten(1), images, preprocess, batch_size=batch_size)
