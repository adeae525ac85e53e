"""DCL and DCLW: Decoupled Contrastive Learning (Yeh et al., ECCV 2022, arXiv:2110.06848).

SimCLR with the positive pair taken out of the InfoNCE denominator (eq. 6), which removes the negative-positive
coupling that makes NT-Xent need large batches; DCLW also weights each positive term by a negative von Mises-Fisher
weight of the pair's similarity. Views and projector are SimCLR's. Checked against lightly's ``DCLLoss`` and
``DCLWLoss`` (lightly/loss/dcl_loss.py) with two documented differences: lightly adds two log-sum-exps, one per view's
negatives, where eq. 6 has one log over all 2N - 2 (lightly PR #1826); and lightly weights over each worker's own
rows, here over the gathered global batch, so that several workers give the single-process loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from methods import register
from methods.simclr import SimCLR, SimCLRParams


def dcl_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, sigma: float | None = None) -> torch.Tensor:
    """Decoupled contrastive loss over 2N views (DCL eq. 6), the mean over all 2N anchors.

    For anchor i with positive j and cosine similarities s: ``l_i = -w_i s_ij/T + log sum_{k != i, j} exp(s_ik/T)``,
    the 2N - 2 negatives being the other samples of both views. ``sigma`` None: DCL, w = 1; else DCLW with
    ``w_i = 2 - N softmax_i(s_i / sigma)`` over the N pairs, s_i the detached cosine of pair i (the same weight in
    both directions). Collapsed embeddings give ``log(2N - 2)`` for both (the DCLW weights are then all 1).

    z1, z2: (N, D) projections of the two views, N >= 2, not necessarily normalised.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if sigma is not None and sigma <= 0:
        raise ValueError(f"sigma must be > 0 (or None for unweighted DCL), got {sigma}")
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"dcl_loss needs N >= 2 samples (the negatives are the other samples), got N = {n}")
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    rows = torch.arange(2 * n, device=z.device)
    partner = (rows + n) % (2 * n)
    positive = logits[rows, partner]
    coupled = torch.zeros_like(logits, dtype=torch.bool)
    coupled[rows, rows] = True  # an anchor is not its own negative
    coupled[rows, partner] = True  # nor, decoupled, is its positive
    negative = torch.logsumexp(logits.masked_fill(coupled, float("-inf")), dim=1)
    if sigma is not None:
        cosine = (z[:n] * z[n:]).sum(dim=1).detach()
        positive = positive * (2 - n * torch.softmax(cosine / sigma, dim=0)).repeat(2)
    return (negative - positive).mean()


class DCLParams(SimCLRParams):
    temperature: float = Field(0.1, gt=0, description="DCL temperature (0.1: lightly and the reference code)")


class DCLWParams(DCLParams):
    sigma: float = Field(0.5, gt=0, description="vMF weighting's scale of the positive similarity (0.5 in the paper)")


@register
class DCL(SimCLR):
    """SimCLR's views, projector and gathering (the paper uses SimCLR's augmentations) with the decoupled loss."""

    name = "dcl"
    Params = DCLParams
    loss_name = "DCL"
    paper = "Yeh et al. 2022, Decoupled Contrastive Learning"

    params: DCLParams

    @property
    def sigma(self) -> float | None:
        """The DCLW weighting's sigma; None: unweighted DCL."""
        return None

    def contrast(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return dcl_loss(z1, z2, self.params.temperature, self.sigma)

    def collapse_loss(self, batch_size: int) -> float | None:
        # all cosines 1: -1/T + log((2N - 2) e^{1/T}); the DCLW weights are then all 1
        return math.log(2 * batch_size - 2) if batch_size >= 2 else None


@register
class DCLW(DCL):
    name = "dclw"
    Params = DCLWParams
    loss_name = "DCLW"

    params: DCLWParams

    @property
    def sigma(self) -> float | None:
        return self.params.sigma
