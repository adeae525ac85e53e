"""Schedules at known steps, parameter groups, LARS against a hand-computed step, and what the loop does between
backward and the optimiser step (the weight-decay schedule on the decaying group, clipping, dropped gradients)."""

import itertools
import math

import pytest
import torch

from core.schedules import cosine_lr, cosine_weight_decay
from harness.config.schema import PretrainConfig
from harness.train.optim import LARS, build_optimizer, clip_gradients, drop_gradients, param_groups, set_schedule


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


# ----------------------------------------------------------------------------- weight-decay schedule, groups, clipping, freezing


def test_weight_decay_schedule_closed_form():
    def closed(k, total, start, end):
        return end + (start - end) * (1 + math.cos(math.pi * k / total)) / 2

    for k in (0, 1, 25, 50, 99, 100):
        assert cosine_weight_decay(k, 100, 0.04, 0.4) == pytest.approx(closed(k, 100, 0.04, 0.4))
    assert cosine_weight_decay(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_weight_decay(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine_weight_decay(100, 100, 0.04, 0.4) == pytest.approx(0.4)
    assert cosine_weight_decay(150, 100, 0.04, 0.4) == pytest.approx(0.4)  # past the end: the end value
    assert [cosine_weight_decay(k, 100, 0.05) for k in (0, 50, 100)] == [0.05] * 3  # no end: constant


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 2)
        self.ln = torch.nn.LayerNorm(2)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_biases_and_norm_parameters_get_no_decay_with_every_optimiser(name):
    net = _Net()
    opt = build_optimizer(net, PretrainConfig(optimizer=name, weight_decay=0.05))
    decay, no_decay = opt.param_groups
    assert {id(p) for p in decay["params"]} == {id(net.conv.weight), id(net.fc.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in (net.conv.bias, net.bn.weight, net.bn.bias, net.fc.bias, net.ln.weight, net.ln.bias)}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["decay"] and not no_decay["decay"]


def test_an_explicit_no_decay_rule_overrides_the_default():
    method = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    decay, no_decay = param_groups(method, 0.1, no_decay=lambda n, p: n.startswith("1.") or p.ndim <= 1)
    assert {id(p) for p in decay["params"]} == {id(method[0].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(method[0].bias), id(method[1].weight), id(method[1].bias)}
    assert len(param_groups(method, 0.1, no_decay=lambda n, p: False)[0]["params"]) == 4


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_the_schedule_sets_the_lr_everywhere_and_the_decay_on_the_decaying_group_only(name):
    opt = build_optimizer(_Net(), PretrainConfig(optimizer=name, weight_decay=0.04))
    set_schedule(opt, 0.123, 0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.123, 0.123]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]


def _with_grads(scale):
    torch.manual_seed(0)
    net = _Net()
    for p in net.parameters():
        p.grad = torch.randn_like(p) * scale
    return net


def test_clip_gradients_is_torchs_global_norm_clip():
    net = _with_grads(10.0)
    copy = _with_grads(10.0)
    total = clip_gradients(net.parameters(), 3.0)
    expected_total = torch.nn.utils.clip_grad_norm_(list(copy.parameters()), 3.0)
    torch.testing.assert_close(total, expected_total)
    assert total.item() > 3.0
    for p, q in zip(net.parameters(), copy.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert clipped.item() == pytest.approx(3.0, rel=1e-5)


def test_clip_gradients_leaves_smaller_gradients_unchanged():
    net = _with_grads(1e-3)
    before = [p.grad.clone() for p in net.parameters()]
    total = clip_gradients(net.parameters(), 3.0)
    assert total.item() < 3.0
    assert all(torch.equal(p.grad, b) for p, b in zip(net.parameters(), before, strict=True))
    net.fc.weight.grad = None  # parameters without a gradient are left out
    clip_gradients(net.parameters(), 3.0)
    assert net.fc.weight.grad is None


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_a_dropped_gradient_leaves_the_parameter_as_it_is_despite_momentum_and_weight_decay(name):
    net = _with_grads(1.0)
    opt = build_optimizer(net, PretrainConfig(optimizer=name, weight_decay=0.5, momentum=0.9))
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if n.startswith("fc.")}
    others = {n: p.detach().clone() for n, p in net.named_parameters() if not n.startswith("fc.")}
    for _ in range(2):
        drop_gradients(net, ["fc"])
        assert net.fc.weight.grad is None and net.fc.bias.grad is None
        opt.step()
        for p in net.parameters():
            if p.grad is None:
                p.grad = torch.randn_like(p)
    params = dict(net.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert all(not torch.equal(params[n], v) for n, v in others.items())


def test_drop_gradients_takes_modules_or_parameters_and_refuses_other_names():
    net = _with_grads(1.0)
    drop_gradients(net, ["bn.weight"])
    assert net.bn.weight.grad is None and net.bn.bias.grad is not None
    with pytest.raises(ValueError, match="'head', which is neither a submodule nor a parameter"):
        drop_gradients(net, ["head"])
