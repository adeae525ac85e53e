"""Schedules at known steps, parameter groups, and LARS against a hand-computed step."""

import itertools
import math

import pytest
import torch

from harness.config import PretrainConfig
from harness.optim import LARS, build_optimizer, param_groups
from harness.schedules import cosine_lr


def test_cosine_lr_known_values():
    # 10 warmup steps to 1.0, then cosine over 90 steps to 0.
    assert cosine_lr(0, 100, 10, 1.0) == 0.0
    assert cosine_lr(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert cosine_lr(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 10, 1.0) == pytest.approx(0.5)  # half way through the cosine
    assert cosine_lr(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(40, 100, 10, 2.0, 0.2) == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 30 / 90)))


def test_cosine_lr_without_warmup_and_past_the_end():
    assert cosine_lr(0, 50, 0, 0.3) == pytest.approx(0.3)
    assert cosine_lr(80, 50, 0, 0.3, 0.01) == pytest.approx(0.01)


def test_effective_lr_is_scaled_by_batch_over_256():
    assert PretrainConfig(base_lr=0.3, batch_size=512).lr == pytest.approx(0.6)
    assert PretrainConfig(base_lr=0.3, batch_size=64).lr == pytest.approx(0.075)


def test_param_groups_exclude_biases_and_norms_from_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_lars_step_matches_hand_computation():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    w.grad = torch.tensor([0.6, 0.8])
    opt = LARS([{"params": [w], "weight_decay": 0.1, "lars": True}], lr=0.5, momentum=0.9, eta=0.01)
    opt.step()
    g = torch.tensor([0.6, 0.8]) + 0.1 * torch.tensor([3.0, 4.0])  # (0.9, 1.2), norm 1.5
    g = g * (0.01 * 5.0 / 1.5)
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) - 0.5 * g)


def test_lars_skips_adaptation_for_excluded_group():
    b = torch.nn.Parameter(torch.tensor([1.0]))
    b.grad = torch.tensor([2.0])
    opt = LARS([{"params": [b], "weight_decay": 0.0, "lars": False}], lr=0.1)
    opt.step()
    assert b.item() == pytest.approx(1.0 - 0.1 * 2.0)


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("lars", LARS)])
def test_build_optimizer_uses_effective_lr(name, cls):
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, PretrainConfig(optimizer=name, base_lr=0.4, batch_size=128))
    assert isinstance(opt, cls)
    assert all(g["lr"] == pytest.approx(0.2) for g in opt.param_groups)


def test_cosine_without_warmup_is_the_linear_probe_schedule():
    lrs = [cosine_lr(t, 8, 0, 0.4) for t in range(8)]
    assert len(lrs) == 8 and lrs[0] == 0.4
    assert lrs[4] == pytest.approx(0.2)
    assert all(a > b > 0 for a, b in itertools.pairwise(lrs))
