"""Loss functions shared by several methods: InfoNCE, the contrastive loss of CLIP, CMC, SimCSE, NNCLR and MoCo v3.

    loss = info_nce(anchors, candidates, temperature=0.1)           # CE(cos / T, arange)
    loss = info_nce(z_l, z_ab, temperature=0.07, symmetric=True)    # both directions, averaged

SimCLR's NT-Xent (2N - 1 candidates: the other view and both views of the other images) and MoCo's
loss (a shared queue of negatives) have other candidates and stay in their methods.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float,
    targets: torch.Tensor | None = None,
    normalize: bool = True,
    symmetric: bool = False,
) -> torch.Tensor:
    """InfoNCE (van den Oord, Li & Vinyals 2018, "Representation Learning with Contrastive Predictive Coding").

    The cross-entropy of picking each anchor's positive among the candidates, with logits the
    cosine similarities divided by the temperature:
    ``l_i = -log(exp(s(a_i, c_{t_i}) / T) / sum_j exp(s(a_i, c_j) / T))``, averaged over the N anchors.
    Collapsed embeddings (every logit equal) give ``log M``.

    anchors: (N, D); candidates: (M, D); targets: int64 (N,), the index of each anchor's positive
    among the candidates; default ``arange(N)`` (row i of each is a pair), which needs M == N.
    normalize: L2-normalise the rows first, in float32 (``s`` = cosine similarity); False: ``s``
    is the dot product of the rows as given (callers that scale features themselves, CLIP).
    symmetric: also the candidates as anchors against the anchors (CE of the transposed logits,
    default targets only); returns the mean of the two directions.
    Returns a 0-d tensor (float32 with ``normalize``). A temperature that is not > 0 is a ValueError.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if anchors.dim() != 2 or candidates.dim() != 2 or anchors.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"anchors must be (N, D) and candidates (M, D), got {tuple(anchors.shape)} and {tuple(candidates.shape)}"
        )
    if targets is None:
        if anchors.shape != candidates.shape:
            raise ValueError(
                "with the default targets (row i of each is a pair) anchors and candidates "
                f"must both be (N, D), got {tuple(anchors.shape)} and {tuple(candidates.shape)}"
            )
        targets = torch.arange(anchors.shape[0], device=anchors.device)
    elif symmetric:
        raise ValueError("symmetric InfoNCE takes the default targets (row i of each is a pair), not a targets tensor")
    elif targets.shape != (anchors.shape[0],):
        raise ValueError(
            f"targets must be ({anchors.shape[0]},), one candidate index per anchor, got {tuple(targets.shape)}"
        )
    if normalize:
        anchors, candidates = F.normalize(anchors.float(), dim=1), F.normalize(candidates.float(), dim=1)
    logits = anchors @ candidates.T / temperature
    if symmetric:
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    return F.cross_entropy(logits, targets)
