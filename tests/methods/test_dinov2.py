"""DINOv2's terms against hand computations (KoLeo on 4 points, iBOT blind to unmasked patches, the cross-view loss),
a training step's parts, and its bad input. The registry-wide contract and the monitor's every-method test cover the
rest."""

from __future__ import annotations

import math

import pytest
import torch

from core.backbones import create_backbone
from core.contract import StepInfo
from harness.cli import main
from methods import create_method
from methods.dinov2 import cross_view_loss, ibot_patch_loss, koleo_loss
from tests.helpers.method_params import small_params
from tests.helpers.runs import CONFIG

VIT = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def test_koleo_is_minus_the_mean_log_nearest_neighbour_distance_of_the_normalised_rows() -> None:
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])  # on the circle: 0, 90, 180 and 45 degrees
    chord_45, chord_90 = 2 * math.sin(math.pi / 8), math.sqrt(2)
    nearest = [chord_45, chord_45, chord_90, chord_45]  # 0 -> 45, 90 -> 45, 180 -> 90, 45 -> 0 (or 90) degrees
    expected = -sum(math.log(d) for d in nearest) / 4
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-5)
    assert koleo_loss(x * 5).item() == pytest.approx(expected, rel=1e-5)  # scale-free: rows are normalised


def test_ibot_averages_over_masked_patches_only() -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 4, generator=g)
    targets = torch.softmax(torch.randn(2, 3, 4, generator=g), dim=-1)
    mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    by_hand = [-(targets[b, i] * torch.log_softmax(student[b, i] / 0.1, -1)).sum() for b, i in [(0, 0), (1, 1), (1, 2)]]
    assert ibot_patch_loss(student, targets, mask, 0.1).item() == pytest.approx(
        torch.stack(by_hand).mean().item(), rel=1e-6
    )
    changed = student.clone()
    changed[0, 1:] += 50.0  # unmasked patches
    changed[1, 0] -= 50.0
    assert ibot_patch_loss(changed, targets, mask, 0.1).item() == ibot_patch_loss(student, targets, mask, 0.1).item()


def test_the_cross_view_loss_pairs_each_teacher_crop_with_every_other_student_crop() -> None:
    g = torch.Generator().manual_seed(1)
    s = [torch.randn(3, 5, generator=g) for _ in range(3)]
    t = [torch.softmax(torch.randn(3, 5, generator=g), -1) for _ in range(2)]

    def ce(target: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        return -(target * torch.log_softmax(student / 0.1, -1)).sum(-1).mean()

    expected = (ce(t[0], s[1]) + ce(t[0], s[2]) + ce(t[1], s[0]) + ce(t[1], s[2])) / 4
    assert cross_view_loss(s, t, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_step_gives_the_three_terms_and_the_teacher_no_gradient() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_patch16_224", in_chans=3, img_size=16, **VIT)
    method = create_method("dinov2", backbone, **small_params("dinov2", centering="center"))
    views = [torch.randn(4, 3, 16, 16) for _ in method.views(16)]
    out = method.training_step(views, StepInfo(0, 0, 10))
    p = method.params
    total = out.logs["dino"] + p.ibot_weight * out.logs["ibot"] + p.koleo_weight * out.logs["koleo"]
    torch.testing.assert_close(out.loss.detach(), total)
    out.loss.backward()
    assert all(q.grad is None for q in method.teacher.parameters())
    assert (
        method.mask_token.grad is not None and method.mask_token.grad.abs().sum() > 0
    )  # the student saw masked patches
    method.after_step(StepInfo(0, 0, 10))
    assert method.center.abs().sum() > 0 and method.patch_center.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method.mask_ratio=1.0"], "error: method.mask_ratio: "),
        ([], "error: backbone.name: method dinov2 needs a timm ViT (vit_*), got 'test_resnet'"),
    ],
)
def test_bad_dinov2_settings_are_one_line_exit_2(unmade_tracking_uri, capsys, overrides, message) -> None:
    small = ["data.num_train=128", "data.num_test=32", "eval.semi.enabled=false", "device=cpu"]
    code = main(["-q", "run", CONFIG, "method=dinov2", *small, *overrides])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(message), lines
