"""MSN: sharpening, ME-MAX (the entropy of the mean assignment) and the loss against hand computations, the target
network detached and moved by the EMA only, and its bad input. The registry-wide contract covers the rest."""

from __future__ import annotations

import math

import pytest
import torch

from core.backbones import create_backbone
from core.contract import StepInfo
from harness.cli import main
from methods import create_method
from methods.msn import me_max, msn_loss, sharpen
from tests.helpers.method_params import small_params
from tests.helpers.runs import CONFIG

VIT = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def test_me_max_is_the_entropy_of_the_mean_assignment() -> None:
    assert me_max(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).item() == pytest.approx(math.log(2))
    assert me_max(torch.tensor([[1.0, 0.0], [1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-9)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    mean = [0.4, 0.25, 0.35]
    assert me_max(probs).item() == pytest.approx(-sum(m * math.log(m) for m in mean), rel=1e-6)


def test_sharpening_raises_to_one_over_t_and_renormalises() -> None:
    p = torch.tensor([[0.2, 0.8]])
    torch.testing.assert_close(sharpen(p, 1.0), p)
    torch.testing.assert_close(sharpen(p, 0.5), torch.tensor([[0.04 / 0.68, 0.64 / 0.68]]))


def test_the_loss_is_the_cross_entropy_minus_the_weighted_me_max() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    log_p = [
        [2 - math.log(math.exp(2) + 1), -math.log(math.exp(2) + 1)],
        [-math.log(1 + math.e), 1 - math.log(1 + math.e)],
    ]
    cross_entropy = -sum(t * lp for row_t, row_lp in zip(target.tolist(), log_p) for t, lp in zip(row_t, row_lp)) / 2
    probs = [[math.exp(v) for v in row] for row in log_p]
    mean = [(probs[0][k] + probs[1][k]) / 2 for k in range(2)]
    entropy = -sum(m * math.log(m) for m in mean)
    loss, ce, h = msn_loss(logits, target, 0.5)
    assert ce.item() == pytest.approx(cross_entropy, rel=1e-6) and h.item() == pytest.approx(entropy, rel=1e-6)
    assert loss.item() == pytest.approx(cross_entropy - 0.5 * entropy, rel=1e-6)


def test_the_target_gets_no_gradient_and_follows_the_online_network_by_ema() -> None:
    torch.manual_seed(0)
    method = create_method(
        "msn",
        create_backbone("vit_tiny_patch16_224", in_chans=3, img_size=16, **VIT),
        **small_params("msn", base_momentum=0.5),
    )
    views = [torch.randn(4, 3, 16, 16) for _ in method.views(16)]
    out = method.training_step(views, StepInfo(0, 0, 10))
    out.loss.backward()
    assert all(p.grad is None for p in method.target.parameters())
    assert method.prototypes.grad is not None and method.prototypes.grad.abs().sum() > 0
    before = {k: v.clone() for k, v in method.target.state_dict().items()}
    online = dict(torch.nn.Sequential(method.backbone, method.projector).named_parameters())
    with torch.no_grad():
        for p in online.values():
            p.add_(1.0)
    method.after_step(StepInfo(0, 0, 10))  # momentum 0.5 at step 0
    for name, p in method.target.named_parameters():
        torch.testing.assert_close(p, 0.5 * before[name] + 0.5 * online[name])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method.num_prototypes=1"], "error: method.num_prototypes: "),
        (["method.mask_ratio=1.0"], "error: method.mask_ratio: "),
        ([], "error: backbone.name: method msn needs a timm ViT (vit_*), got 'test_resnet'"),
    ],
)
def test_bad_msn_settings_are_one_line_exit_2(unmade_tracking_uri, capsys, overrides, message) -> None:
    small = ["data.num_train=128", "data.num_test=32", "eval.semi.enabled=false", "device=cpu"]
    code = main(["-q", "run", CONFIG, "method=msn", *small, *overrides])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    if "prototypes" in message:
        assert "at least 2 prototypes" in lines[0]
