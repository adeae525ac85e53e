"""A FIFO feature queue (MoCo's negatives, NNCLR's support set), saved with the model.

    queue = FeatureQueue(size=65536, dim=128)
    loss = moco_loss(q, k, queue.features(), T)   # the loss sees the queue BEFORE ...
    queue.enqueue(k)                               # ... the current keys are added

The queue is a registered buffer (``state_dict`` holds it and its pointer), filled
with random unit vectors at start as in MoCo's reference code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError

__all__ = ["FeatureQueue"]


class FeatureQueue(nn.Module):
    """``size`` rows of ``dim`` features; :meth:`enqueue` overwrites the oldest rows."""

    queue: torch.Tensor
    """(size, dim) buffer."""
    ptr: torch.Tensor
    """0-d int64 buffer: the next row to write."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dim must be >= 1, got size={size}, dim={dim}")
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def check_holds_batch(self, batch_size: int, key: str = "method.queue_size") -> None:
        """Refuse a queue smaller than one batch (ConfigError naming ``key``), before training."""
        size = self.queue.shape[0]
        if size < batch_size:
            raise ConfigError(
                f"{key}: {size} is smaller than pretrain.batch_size "
                f"{batch_size}; the queue must hold at least one batch"
            )

    def features(self) -> torch.Tensor:
        """The current contents, (size, dim), detached."""
        return self.queue.detach()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (n, dim), n <= size, at the pointer, wrapping around."""
        n, size = keys.shape[0], self.queue.shape[0]
        if n > size:
            raise ValueError(f"cannot enqueue {n} keys into a queue of {size}")
        idx = (self.ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys.detach().to(self.queue.dtype)
        self.ptr.copy_((self.ptr + n) % size)
