"""DINO: the loss against closed forms and its centring invariance, the teacher-temperature schedule, the centre's
EMA (one process and two gloo workers), the multi-crop views and what the teacher sees, the last-layer freeze, ViTs,
and bad input. The registry-wide contract (tests/methods/test_methods.py) covers dino too."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.backbones import create_backbone
from core.contract import StepInfo
from core.errors import ConfigError
from core.views import View
from harness.config.loading import build_config
from harness.train.optim import drop_gradients
from harness.trial.prepare import check_method
from methods import create_method
from methods.dino import DINO, dino_loss, multi_crop_loss, teacher_temperature
from methods.distributed import average_gradients, rank, world_size
from methods.momentum import cosine_momentum
from tests.helpers.ddp import run_distributed
from tests.helpers.method_params import small_params


def _method(backbone: nn.Module | None = None, **params: Any) -> DINO:
    torch.manual_seed(0)
    backbone = backbone if backbone is not None else create_backbone("test_resnet", in_chans=3, img_size=16)
    method = create_method("dino", backbone, **small_params("dino", **params))
    assert isinstance(method, DINO)
    return method


def _views(method: DINO, batch: int = 6, seed: int = 0, image_size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, v.size, v.size, generator=g) for v in method.views(image_size)]


# ----------------------------------------------------------------------------- the loss


def test_a_student_equal_to_the_teacher_gives_the_teachers_entropy() -> None:
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    temp = 0.5
    logits = temp * probs.log()  # softmax(logits / temp) = probs
    entropy = [-sum(p * math.log(p) for p in row) for row in probs.tolist()]
    loss = dino_loss(logits, logits, torch.zeros(4), temp, temp)
    assert loss.item() == pytest.approx(sum(entropy) / 2, rel=1e-6)
    assert entropy[1] == pytest.approx(math.log(4))
    # a student sharper or flatter than the teacher pays more than the entropy (cross entropy >= entropy)
    assert dino_loss(logits, logits, torch.zeros(4), temp / 2, temp).item() > loss.item()


def test_collapsed_outputs_give_log_k() -> None:
    """Every output equal, the centre at it: uniform targets; a uniform student pays log K, the declared collapse loss."""
    same = torch.full((4, 16), 0.3)
    assert dino_loss(same, same, same[0], 0.1, 0.04).item() == pytest.approx(math.log(16), rel=1e-6)
    assert _method().collapse_loss(64) == pytest.approx(math.log(16))


def test_centring_removes_a_constant_added_to_every_teacher_output() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher, center = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), torch.randn(7, generator=g)
    shift = torch.randn(7, generator=g) * 10  # a different constant per output dimension, the same for every image
    base = dino_loss(student, teacher, center, 0.1, 0.04)
    torch.testing.assert_close(dino_loss(student, teacher + shift, center + shift, 0.1, 0.04), base)
    torch.testing.assert_close(dino_loss(student, teacher + 3.0, center, 0.1, 0.04), base)  # a scalar: softmax-invariant
    assert not torch.allclose(dino_loss(student, teacher + shift, center, 0.1, 0.04), base)  # without the centre it is not


def test_the_loss_is_the_mean_over_pairs_of_different_views() -> None:
    g = torch.Generator().manual_seed(1)
    students = [torch.randn(3, 5, generator=g) for _ in range(4)]  # 2 global + 2 local
    teachers = [torch.randn(3, 5, generator=g) for _ in range(2)]
    center = torch.randn(5, generator=g)
    pairs = [(i, v) for i in range(2) for v in range(4) if v != i]
    assert len(pairs) == 6
    expected = sum(dino_loss(students[v], teachers[i], center, 0.1, 0.05) for i, v in pairs) / len(pairs)
    torch.testing.assert_close(multi_crop_loss(students, teachers, center, 0.1, 0.05), expected)


def test_the_loss_refuses_bad_temperatures_and_shapes() -> None:
    x = torch.randn(2, 3)
    for student_temp, teacher_temp in [(0.1, 0.0), (0.1, -0.04), (0.0, 0.04)]:
        with pytest.raises(ValueError, match="temperatures must be > 0"):
            dino_loss(x, x, torch.zeros(3), student_temp, teacher_temp)
    with pytest.raises(ValueError, match="centre"):
        dino_loss(x, x, torch.zeros(4), 0.1, 0.04)


def test_no_gradient_reaches_the_teacher() -> None:
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6, requires_grad=True)
    dino_loss(student, teacher, torch.zeros(6), 0.1, 0.04).backward()
    assert teacher.grad is None and student.grad is not None
    method = _method()
    method.training_step(_views(method), StepInfo(0, 0, 10)).loss.backward()
    assert not any(p.requires_grad or p.grad is not None for p in method.teacher.parameters())
    assert all(p.grad is not None for p in method.backbone.parameters() if p.requires_grad)
    assert method.head.last_layer.weight_v.grad is not None


# ----------------------------------------------------------------------------- schedules and the centre


def test_teacher_temperature_schedule() -> None:
    assert teacher_temperature(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert teacher_temperature(15, 0.04, 0.07, 30) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert teacher_temperature(29, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(30, 0.04, 0.07, 30) == 0.07
    assert teacher_temperature(299, 0.04, 0.07, 30) == 0.07
    assert teacher_temperature(0, 0.04, 0.07, 0) == 0.07  # no warm-up
    assert [teacher_temperature(e, 0.04, 0.07, 1) for e in (0, 1)] == [0.04, 0.07]
    # the method takes it from the step's epoch, and logs it with the teacher's momentum
    method = _method(warmup_teacher_temp_epochs=4)
    out = method.training_step(_views(method), StepInfo(epoch=2, step=25, total_steps=100))
    assert out.logs["teacher_temp"] == pytest.approx(0.04 + 0.03 * 2 / 3)
    assert out.logs["momentum"] == pytest.approx(cosine_momentum(25, 100, 0.996))


def test_the_centre_is_the_ema_of_the_teachers_batch_mean() -> None:
    method = _method(center_momentum=0.8)
    with torch.no_grad():
        method.center.copy_(torch.linspace(-1, 1, 16))
    before = method.center.clone()
    views = _views(method)
    method.training_step(views, StepInfo(0, 0, 10))
    with torch.no_grad():  # the teacher as it was during the step (after_step moves it)
        teacher = method.teacher(torch.cat(views[:2]))
    method.after_step(StepInfo(0, 0, 10))
    torch.testing.assert_close(method.center, 0.8 * before + 0.2 * teacher.mean(dim=0))


def test_the_teacher_is_the_ema_of_the_student() -> None:
    method = _method()
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    teacher_before = [p.clone() for p in method.teacher.parameters()]
    info = StepInfo(0, 3, 10)
    method.training_step(_views(method), info).loss.backward()
    optimizer.step()
    method.after_step(info)
    tau = cosine_momentum(3, 10, 0.996)
    student = [*method.backbone.parameters(), *method.head.parameters()]
    for t, b, s in zip(method.teacher.parameters(), teacher_before, student, strict=True):
        torch.testing.assert_close(t, tau * b + (1 - tau) * s)


# ----------------------------------------------------------------------------- views, teacher inputs, freezing


def test_views_are_two_global_then_the_local_crops() -> None:
    method = create_method("dino", create_backbone("test_resnet", in_chans=3, img_size=16), out_dim=16, hidden_dim=32, bottleneck_dim=8)
    g1, g2 = ({"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2})  # the paper's, appendix
    assert method.views(224) == [View(224, (0.4, 1.0), g1), View(224, (0.4, 1.0), g2)] + [View(96, (0.05, 0.4), {"blur_p": 0.5})] * 6
    def geometry(views: list[View]) -> list[tuple[int, tuple[float, float] | None]]:
        return [(v.size, v.scale) for v in views]

    assert geometry(method.views(32)) == [(32, (0.4, 1.0))] * 2 + [(14, (0.05, 0.4))] * 6
    assert geometry(_method(num_local_crops=0).views(16)) == [(16, (0.4, 1.0))] * 2
    assert geometry(_method(num_local_crops=3).views(16)[2:]) == [(8, (0.05, 0.4))] * 3


def test_the_teacher_sees_only_the_global_crops() -> None:
    method = _method(num_local_crops=3)
    teacher_inputs: list[tuple[int, ...]] = []
    student_inputs: list[tuple[int, ...]] = []
    method.teacher.register_forward_hook(lambda m, args, out: teacher_inputs.append(tuple(args[0].shape)))
    method.backbone.register_forward_hook(lambda m, args, out: student_inputs.append(tuple(args[0].shape)))
    views = _views(method, batch=5)
    assert [v.shape[-1] for v in views] == [16, 16, 8, 8, 8]
    out = method.training_step(views, StepInfo(0, 0, 10))
    assert teacher_inputs == [(10, 3, 16, 16)]  # one call, the 2 global crops of 5 images
    assert student_inputs == [(10, 3, 16, 16), (15, 3, 8, 8)]  # one call per crop size, every crop
    assert torch.isfinite(out.loss)


def test_the_last_layer_is_frozen_for_the_first_epochs() -> None:
    method = _method(freeze_last_layer=2)
    assert method.frozen_modules(StepInfo(0, 0, 100)) == ["head.last_layer"]
    assert method.frozen_modules(StepInfo(1, 57, 100)) == ["head.last_layer"]
    assert method.frozen_modules(StepInfo(2, 58, 100)) == []
    info = StepInfo(0, 0, 100)
    out = method.training_step(_views(method), info)
    assert out.logs["last_layer_frozen"] == 1.0
    out.loss.backward()
    drop_gradients(method, method.frozen_modules(info))
    assert method.head.last_layer.weight_v.grad is None
    assert method.head.mlp[0].weight.grad is not None
    assert _method(freeze_last_layer=0).frozen_modules(info) == []


def test_the_last_layers_norm_is_fixed_unless_asked() -> None:
    fixed = _method()
    assert not fixed.head.last_layer.weight_g.requires_grad and torch.equal(fixed.head.last_layer.weight_g, torch.ones(16, 1))
    rows = F.normalize(fixed.head.last_layer.weight_v, dim=1)
    torch.testing.assert_close(fixed.head.last_layer(torch.eye(8)), rows.T)  # unit-norm rows
    assert _method(norm_last_layer=False).head.last_layer.weight_g.requires_grad


def test_the_head_is_the_papers_mlp_with_batch_norm_on_request() -> None:
    head = _method().head
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert [m.out_features for m in head.mlp if isinstance(m, nn.Linear)] == [32, 32, 8]
    with_bn = _method(use_bn_in_head=True)
    assert [type(m).__name__ for m in with_bn.head.mlp] == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    assert torch.isfinite(with_bn.training_step(_views(with_bn), StepInfo(0, 0, 10)).loss)


def test_embed_is_the_backbone_and_project_the_normalised_bottleneck() -> None:
    method = _method().eval()
    x = torch.randn(3, 3, 16, 16)
    features = method.embed(x)
    torch.testing.assert_close(features, method.backbone(x))
    z = method.project(features)
    assert z is not None and z.shape == (3, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))


def _vit(**kwargs: Any) -> nn.Module:
    return create_backbone("vit_tiny_patch16_224", in_chans=3, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, **kwargs)


def test_a_vit_takes_the_local_crops_with_dynamic_image_size() -> None:
    method = _method(_vit(dynamic_img_size=True))
    check_method(method, 8, 16, None)
    out = method.training_step(_views(method, batch=4), StepInfo(0, 0, 10))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert method.backbone.pos_embed.grad is not None
    with pytest.raises(ConfigError, match=r"^backbone.kwargs.dynamic_img_size: .*method.num_local_crops=0"):
        check_method(_method(_vit()), 8, 16, None)
    check_method(_method(_vit(), num_local_crops=0), 8, 16, None)  # global crops only: the ViT's own size


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"teacher_temp": 0}, "method.teacher_temp: Input should be greater than 0"),
        ({"teacher_temp": -0.07}, "method.teacher_temp: Input should be greater than 0"),
        ({"warmup_teacher_temp": 0}, "method.warmup_teacher_temp: Input should be greater than 0"),
        ({"local_crop_size_ratio": 1.5}, "method.local_crop_size_ratio: Input should be less than or equal to 1"),
        ({"local_crop_scale": [0.05, 1.2]}, "method.local_crop_scale: must be an area range"),
    ],
)
def test_bad_parameters_are_config_errors(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        build_config({"method": {"name": "dino", **params}})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"local_crop_scale": [0.05, 0.6], "global_crop_scale": [0.4, 0.5]}, r"method.local_crop_scale: \[0.05, 0.6\] lies above method.global_crop_scale \[0.4, 0.5\]"),
        ({"local_crop_scale": [0.5, 0.6]}, r"method.local_crop_scale: \[0.5, 0.6\] lies above"),
        ({"local_crop_size_ratio": 0.3}, "method.local_crop_size_ratio: 0.3 of 16 px images gives 5 px local crops"),
    ],
)
def test_local_crops_larger_than_the_global_ones_are_refused_before_training(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{message}"):
        check_method(_method(**params), 8, 16, None)


def test_bad_input_exits_2_with_one_line(tmp_path, tracking_uri, capsys) -> None:
    from harness.cli import main

    config = tmp_path / "dino.yaml"
    config.write_text("method: {name: dino, out_dim: 16, hidden_dim: 32, bottleneck_dim: 8, num_local_crops: 2, local_crop_size_ratio: 0.5}\n")
    small = ["data.num_train=64", "data.num_test=32", "data.image_size=16", "backbone.name=test_resnet", "pretrain.batch_size=16", "eval.semi.enabled=false", "device=cpu"]
    for overrides, message in [
        (["method.teacher_temp=0"], "error: method.teacher_temp: Input should be greater than 0"),
        (["method.local_crop_scale=[0.3,0.9]", "method.global_crop_scale=[0.4,0.8]"], "error: method.local_crop_scale: [0.3, 0.9] lies above"),
    ]:
        assert main(["-q", "run", str(config), *small, *overrides]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(message), err


# ----------------------------------------------------------------------------- two gloo workers


class _TinyBackbone(nn.Module):
    num_features = 12

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, self.num_features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


BATCH = 8


def _two_steps(gather: bool = True) -> dict[str, Any]:
    """Two steps on this worker's rows of a fixed global batch (gradients averaged, an optimiser step between): the
    centre after each step, and the second step's loss and gradients (which see the first step's centre)."""
    torch.manual_seed(0)
    method = create_method("dino", _TinyBackbone(), **small_params("dino", gather=gather, freeze_last_layer=0))
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    n = BATCH // world_size()
    centres, loss = [], torch.zeros(())
    for k in range(2):
        g = torch.Generator().manual_seed(100 + k)
        views = [torch.randn(BATCH, 3, s, s, generator=g)[rank() * n : (rank() + 1) * n] for s in (8, 8, 4, 4)]
        info = StepInfo(0, k, 10)
        optimizer.zero_grad(set_to_none=True)
        loss = method.training_step(views, info).loss
        loss.backward()
        average_gradients(method)
        if k == 0:
            optimizer.step()
        method.after_step(info)
        centres.append(method.center.clone())
    grads = {name: p.grad.clone() for name, p in method.named_parameters() if p.grad is not None}
    return {"centres": centres, "loss": loss.detach(), "grads": grads}


def _worker(rank_: int, world: int) -> dict[str, Any]:
    return {"gather": _two_steps(), "own": _two_steps(gather=False)}


@pytest.mark.slow  # two gloo training processes
def test_two_workers_keep_the_single_process_centre(tmp_path) -> None:
    """The centre is the EMA of the global batch's mean on every worker; the second step (which uses it) gives the
    single-process loss (the mean of the workers' per-sample losses) and gradients. Without ``gather`` each worker
    centres with its own half: the centres differ from each other and from the single-process one."""
    single = _two_steps()
    workers = run_distributed(_worker, tmp_path, 2)
    for w in workers:
        for got, expected in zip(w["gather"]["centres"], single["centres"], strict=True):
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        tol = {"atol": 1e-4 * max(v.abs().max().item() for v in single["grads"].values()), "rtol": 1e-4}
        for name, value in single["grads"].items():
            torch.testing.assert_close(w["gather"]["grads"][name], value, **tol, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(torch.stack([w["gather"]["loss"] for w in workers]).mean(), single["loss"], atol=1e-5, rtol=1e-4)
    own = [w["own"]["centres"][0] for w in workers]
    assert not torch.allclose(own[0], own[1]) and not torch.allclose(own[0], single["centres"][0])
    torch.testing.assert_close((own[0] + own[1]) / 2, single["centres"][0], atol=1e-6, rtol=1e-5)  # halves of one batch
