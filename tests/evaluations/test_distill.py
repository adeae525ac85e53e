"""SimCLRv2 self-distillation: the loss against closed forms and numpy, the student learning a fixed
teacher's predictions without labels, the config keys, and the metrics next to the teacher's."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from core.errors import ConfigError
from core.views import View
from evaluations.distill import distillation_loss, self_distill
from harness.config.loading import build_config
from harness.config.schema import AugmentConfig
from harness.data.augment import Augmenter
from harness.trial.evaluate import semi_supervised
from harness.trial.prepare import prepare


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("temperature", [0.1, 1.0, 4.0])
def test_equal_logits_give_the_teachers_entropy(temperature) -> None:
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = _softmax(logits.numpy() / temperature)
    entropy = -(p * np.log(p)).sum(axis=1).mean()
    assert distillation_loss(logits, logits, temperature).item() == pytest.approx(entropy, rel=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_a_one_hot_teacher_gives_the_students_cross_entropy(temperature) -> None:
    g = torch.Generator().manual_seed(1)
    student = torch.randn(6, 4, generator=g)
    classes = torch.tensor([0, 3, 1, 1, 2, 0])
    teacher = 1e4 * nn.functional.one_hot(classes, 4).float()  # the softmax at any of these temperatures is one-hot
    s = student.double().numpy() / temperature
    log_p = s - s.max(axis=1, keepdims=True) - np.log(np.exp(s - s.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True))
    cross_entropy = -log_p[np.arange(6), classes.numpy()].mean()
    assert distillation_loss(student, teacher, temperature).item() == pytest.approx(cross_entropy, rel=1e-5)


def test_temperature_scales_both_distributions() -> None:
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(8, 5, generator=g), 3 * torch.randn(8, 5, generator=g)
    t = 2.5
    p_t = _softmax(teacher.double().numpy() / t)
    p_s = _softmax(student.double().numpy() / t)
    by_hand = -(p_t * np.log(p_s)).sum(axis=1).mean()
    assert distillation_loss(student, teacher, t).item() == pytest.approx(by_hand, rel=1e-5)
    assert distillation_loss(student, teacher, t).item() != pytest.approx(distillation_loss(student, teacher, 1.0).item(), rel=1e-3)


def test_no_gradient_reaches_the_teacher_and_bad_arguments_are_refused() -> None:
    student, teacher = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    distillation_loss(student, teacher, 1.0).backward()
    assert teacher.grad is None and student.grad is not None
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, 0.0)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        distillation_loss(student, teacher[:, :3], 1.0)


# ----------------------------------------------------------------------------- self-distillation


def _crop_flip(mean: tuple[float, ...], std: tuple[float, ...], size: int = 8) -> tuple[Augmenter, Callable[[torch.Tensor, torch.Generator], torch.Tensor]]:
    """A crop + flip augmenter and the full-size training view it makes, as fine-tuning builds them."""
    augmenter = Augmenter(AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0), mean, std)
    return augmenter, lambda images, rows, g: augmenter(images[rows], View(size), g)


def _agreement(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((student(x).argmax(1) == teacher(x).argmax(1)).float().mean())


def test_the_student_learns_the_teachers_predictions_without_labels() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (256, 3, 8, 8), dtype=torch.uint8)
    augmenter, augment = _crop_flip((0.5, 0.5, 0.5), (0.29, 0.29, 0.29))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    teacher.eval()
    before_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = augmenter.normalize(images)
    before = _agreement(student, teacher, x)
    out = self_distill(teacher, student, images, augment, epochs=30, batch_size=32, lr=2.0, seed=0, temperature=1.0)
    after = _agreement(out, teacher, x)
    assert out is student
    assert after > before and after >= 0.9, (before, after)
    for key, value in teacher.state_dict().items():  # the teacher is frozen and keeps its mode
        torch.testing.assert_close(value, before_state[key])
    assert not teacher.training


def test_self_distill_is_seeded() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    _, augment = _crop_flip((0.5,) * 3, (0.29,) * 3)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    start = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    a, b = (self_distill(teacher, copy.deepcopy(start), images, augment, epochs=2, batch_size=16, seed=3) for _ in range(2))
    c = self_distill(teacher, copy.deepcopy(start), images, augment, epochs=2, batch_size=16, seed=4)
    torch.testing.assert_close(a.state_dict(), b.state_dict())
    assert not torch.equal(a[1].weight, c[1].weight)
    assert a.training  # returned as trained, in train mode
    student = copy.deepcopy(start)
    with pytest.raises(ValueError, match="epochs"):
        self_distill(teacher, student, images, augment, epochs=-1)


# ----------------------------------------------------------------------------- config and the harness


@pytest.mark.parametrize("key,value", [("distill_epochs", -1), ("distill_temperature", 0.0), ("distill_temperature", -1.0)])
def test_bad_distillation_settings_name_the_key(key, value) -> None:
    with pytest.raises(ConfigError, match=rf"^eval.semi.{key}: "):
        build_config({"eval": {"semi": {key: value}}})
    assert build_config({}).eval.semi.distill_epochs == 0  # off by default


def _tiny_semi(distill_epochs: int) -> dict[str, float]:
    raw = {
        "data": {"num_train": 64, "num_test": 16, "image_size": 8},
        "backbone": {"name": "test_resnet"},
        "method": {"name": "simclr_v2", "proj_hidden_dim": 32, "proj_dim": 16},
        "pretrain": {"batch_size": 16},
        "eval": {"semi": {"fractions": [0.25], "epochs": [1], "batch_size": 16, "from_projector_layer": 1, "distill_epochs": distill_epochs}},
        "device": "cpu",
    }
    return semi_supervised(prepare(build_config(raw)))


def test_semi_supervised_logs_the_distilled_student_next_to_the_teacher() -> None:
    metrics = _tiny_semi(distill_epochs=1)
    assert set(metrics) == {f"eval/semi_25pct/{k}" for k in ("top1", "top5", "distilled_top1", "distilled_top5")}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    off = _tiny_semi(distill_epochs=0)
    assert set(off) == {"eval/semi_25pct/top1", "eval/semi_25pct/top5"}
    assert off["eval/semi_25pct/top1"] == metrics["eval/semi_25pct/top1"]  # the teacher's numbers do not depend on distillation
