"""InfoNCE: closed forms, a 2x2 case by hand, the targets argument, invariances, the checks on its input, and the
five methods' contrastive losses (CLIP, CMC, SimCSE, NNCLR, MoCo v3) as expressions of it."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.clip import clip_loss
from methods.cmc import cmc_loss
from methods.losses import info_nce
from methods.moco_v3 import mocov3_loss
from methods.nnclr import nnclr_loss
from methods.simcse import simcse_loss


def _numpy_info_nce(anchors: np.ndarray, candidates: np.ndarray, temperature: float, targets: np.ndarray) -> float:
    a = anchors / np.linalg.norm(anchors, axis=1, keepdims=True)
    c = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    logits = a @ c.T / temperature
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_softmax[np.arange(len(a)), targets].mean())


def _pair(seed: int, n: int = 6, m: int | None = None, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n if m is None else m, d, generator=g)


# ----------------------------------------------------------------------------- closed forms and a hand computation


@pytest.mark.parametrize("n", [1, 2, 8, 256])
def test_collapsed_embeddings_give_log_n(n: int) -> None:
    collapsed = torch.randn(1, 7).repeat(n, 1)
    for temperature in (0.05, 0.5, 2.0):  # every logit equal: the temperature does not matter
        assert info_nce(collapsed, 3 * collapsed, temperature).item() == pytest.approx(math.log(n), abs=1e-6)
        assert info_nce(collapsed, collapsed, temperature, symmetric=True).item() == pytest.approx(math.log(n), abs=1e-6)


def test_a_2x2_case_by_hand() -> None:
    anchors = np.array([[1.0, 0.0], [1.0, 1.0]])
    candidates = np.array([[2.0, 0.0], [0.0, 0.5]])
    # cosines [[1, 0], [1/sqrt2, 1/sqrt2]]; at T = 0.5 the logits are [[2, 0], [sqrt2, sqrt2]]:
    # anchor 0: -log(e^2 / (e^2 + 1)) = log(1 + e^-2); anchor 1: both candidates equal, log 2
    by_hand = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    targets = np.arange(2)
    assert _numpy_info_nce(anchors, candidates, 0.5, targets) == pytest.approx(by_hand, rel=1e-12)
    loss = info_nce(torch.tensor(anchors, dtype=torch.float32), torch.tensor(candidates, dtype=torch.float32), 0.5)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


def test_against_numpy_with_more_candidates_than_anchors_and_given_targets() -> None:
    anchors, candidates = _pair(0, n=5, m=9)
    targets = torch.tensor([8, 0, 3, 3, 1])
    expected = _numpy_info_nce(anchors.double().numpy(), candidates.double().numpy(), 0.1, targets.numpy())
    assert info_nce(anchors, candidates, 0.1, targets=targets).item() == pytest.approx(expected, rel=1e-5)


def test_targets_follow_the_candidates() -> None:
    anchors, candidates = _pair(1)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    # candidate perm[j] moves to row j: the positive of anchor i is now at row argsort(perm)[i]
    moved = info_nce(anchors, candidates[perm], 0.2, targets=torch.argsort(perm))
    torch.testing.assert_close(moved, info_nce(anchors, candidates, 0.2))
    wrong = info_nce(anchors, candidates[perm], 0.2)
    assert not torch.allclose(wrong, info_nce(anchors, candidates, 0.2))


def test_invariances_and_normalize_false() -> None:
    anchors, candidates = _pair(2)
    loss = info_nce(anchors, candidates, 0.3)
    # cosine logits: positive rescaling of any row changes nothing
    torch.testing.assert_close(info_nce(anchors * (torch.rand(6, 1, generator=torch.Generator().manual_seed(2)) + 0.1), 5 * candidates, 0.3), loss)
    # the same permutation of the pairs changes nothing (a mean over anchors)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(info_nce(anchors[perm], candidates[perm], 0.3), loss)
    # without normalisation the logits are the dot products as given
    a, c = F.normalize(anchors, dim=1), F.normalize(candidates, dim=1)
    torch.testing.assert_close(info_nce(a, c, 0.3, normalize=False), loss)
    torch.testing.assert_close(info_nce(a / 0.3, c, 1.0, normalize=False), loss)
    assert not torch.allclose(info_nce(anchors, candidates, 0.3, normalize=False), loss)


def test_symmetric_is_the_mean_of_both_directions() -> None:
    anchors, candidates = _pair(3)
    both = (info_nce(anchors, candidates, 0.1) + info_nce(candidates, anchors, 0.1)) / 2
    torch.testing.assert_close(info_nce(anchors, candidates, 0.1, symmetric=True), both)
    assert not torch.allclose(info_nce(anchors, candidates, 0.1), both)  # the two directions differ here


def test_low_precision_inputs_are_computed_in_float32() -> None:
    anchors, candidates = _pair(4)
    a16, c16 = anchors.bfloat16(), candidates.bfloat16()
    loss = info_nce(a16, c16, 0.1)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, info_nce(a16.float(), c16.float(), 0.1))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("temperature", [0.0, -0.1, float("nan")])
def test_a_temperature_not_above_zero_is_refused(temperature: float) -> None:
    anchors, candidates = _pair(5)
    with pytest.raises(ValueError, match=re.escape(f"temperature must be > 0, got {temperature}")):
        info_nce(anchors, candidates, temperature)


def test_bad_shapes_are_refused() -> None:
    anchors, candidates = _pair(6, n=4, m=5)
    with pytest.raises(ValueError, match=r"must both be \(N, D\), got \(4, 5\) and \(5, 5\)"):
        info_nce(anchors, candidates, 0.1)  # default targets need M == N
    with pytest.raises(ValueError, match=r"anchors must be \(N, D\) and candidates \(M, D\)"):
        info_nce(anchors, candidates[:, :3], 0.1, targets=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"anchors must be \(N, D\) and candidates \(M, D\)"):
        info_nce(anchors[0], candidates, 0.1)
    with pytest.raises(ValueError, match=r"targets must be \(4,\)"):
        info_nce(anchors, candidates, 0.1, targets=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="symmetric InfoNCE takes the default targets"):
        info_nce(anchors, candidates, 0.1, targets=torch.zeros(4, dtype=torch.long), symmetric=True)


# ----------------------------------------------------------------------------- the methods' losses


@pytest.mark.parametrize("seed", range(3))
def test_the_methods_contrastive_losses_are_info_nce(seed: int) -> None:
    a, b = _pair(10 + seed, n=8, d=6)
    t = (0.05, 0.2, 1.0)[seed]
    # SimCSE: the second pass's N embeddings are the candidates
    torch.testing.assert_close(simcse_loss(a, b, t), info_nce(a, b, t), rtol=1e-6, atol=0)
    # NNCLR: the support neighbours against the other view's predictions
    torch.testing.assert_close(nnclr_loss(a, b, t), info_nce(a, b, t), rtol=1e-6, atol=0)
    # MoCo v3: queries against keys, times 2T
    torch.testing.assert_close(mocov3_loss(a, b, t), info_nce(a, b, t) * 2 * t, rtol=1e-6, atol=0)
    # CMC: L anchors against ab candidates plus ab anchors against L candidates, summed
    torch.testing.assert_close(cmc_loss(a, b, t), info_nce(a, b, t) + info_nce(b, a, t), rtol=1e-6, atol=0)
    # CLIP: the logit scale is the inverse temperature; the two directions averaged
    scale = 1 / t
    expected = (info_nce(a, b, t) + info_nce(b, a, t)) / 2
    torch.testing.assert_close(clip_loss(a, b, scale), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(clip_loss(a, b, torch.tensor(scale)), expected, rtol=1e-5, atol=0)
    # and none of them is the trivial answer
    assert not torch.allclose(info_nce(a, b, t), info_nce(b, a, t))


def test_the_methods_losses_validate_through_info_nce() -> None:
    a, b = _pair(20, n=4, m=3)
    for loss in (simcse_loss, nnclr_loss, mocov3_loss, cmc_loss):
        with pytest.raises(ValueError, match=r"temperature must be > 0, got 0\.0"):
            loss(a, a, 0.0)
        with pytest.raises(ValueError, match=r"\(N, D\)"):
            loss(a, b, 0.1)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        clip_loss(a, b, 10.0)
