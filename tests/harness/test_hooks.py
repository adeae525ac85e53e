"""The training loop's generic hooks, through ``pretrain`` itself: the weight-decay schedule on the decaying group at
every step, gradient clipping by global norm, modules a method freezes for its first steps, and the schedules'
values in the epoch's metrics."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import harness.train.loop as train_module
from harness.config.loading import build_config
from harness.train.loop import pretrain
from harness.trial.prepare import prepare

STEPS_PER_EPOCH = 4
"""TINY: 128 images, batch 32."""
FAST = "backbone.name=test_resnet"
"""timm's tiny ResNet: these tests check the loop, not the network."""


def _closed_form_wd(k: int, total: int, start: float, end: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * k / total)) / 2


def _run(tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch, *overrides: str, freeze_steps: int = 0) -> dict[str, Any]:
    """Train TINY (2 epochs of 4 steps) with SimCLR, its projector frozen for ``freeze_steps`` steps through the
    method's hook; record, at every optimiser step, the groups' settings, the global gradient norm and whether the
    projector has gradients, and the parameters after each epoch."""
    cfg = build_config({}, [*tiny_overrides, FAST, *overrides])
    trial = prepare(cfg)
    method = trial.method
    monkeypatch.setattr(method, "frozen_modules", lambda step: ["projector"] if step.step < freeze_steps else [])
    record: dict[str, Any] = {"groups": [], "norms": [], "projector_grads": [], "logged": {}, "params": {}}
    real_build = train_module.build_optimizer

    def build(model: torch.nn.Module, p: Any) -> torch.optim.Optimizer:
        optimizer = real_build(model, p)
        real_step = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            record["groups"].append([(g["decay"], g["weight_decay"], g["lr"]) for g in optimizer.param_groups])
            grads = [q.grad.flatten() for q in model.parameters() if q.grad is not None]
            record["norms"].append(torch.linalg.vector_norm(torch.cat(grads)).item())
            record["projector_grads"].append([q.grad is not None for q in method.projector.parameters()])
            return real_step(*args, **kwargs)

        optimizer.step = step  # type: ignore[method-assign]
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", build)
    record["params"][0] = {n: q.detach().clone() for n, q in method.named_parameters()}

    def on_epoch_end(epoch: int, metrics: dict[str, float], path: Any) -> None:
        record["params"][epoch] = {n: q.detach().clone() for n, q in method.named_parameters()}

    pretrain(method, trial.data.train.images, cfg, trial.augmenter, trial.device, log_metrics=lambda m, e: record["logged"].__setitem__(e, dict(m)), on_epoch_end=on_epoch_end)
    return record


def test_the_weight_decay_follows_its_cosine_on_the_decaying_group_only(tiny_overrides, monkeypatch) -> None:
    record = _run(tiny_overrides, monkeypatch, "pretrain.weight_decay=0.04", "pretrain.weight_decay_end=0.4")
    total = 2 * STEPS_PER_EPOCH
    assert len(record["groups"]) == total
    for k, groups in enumerate(record["groups"]):
        (decay, wd, _), (no_decay, no_wd, _) = groups
        assert decay and not no_decay
        assert wd == pytest.approx(_closed_form_wd(k, total, 0.04, 0.4)), k
        assert no_wd == 0.0, k  # biases and norm parameters: never
    assert record["groups"][0][0][1] == pytest.approx(0.04)
    for epoch in (1, 2):  # logged: the value at the epoch's last step, as train/lr
        assert record["logged"][epoch]["train/weight_decay"] == pytest.approx(_closed_form_wd(epoch * STEPS_PER_EPOCH - 1, total, 0.04, 0.4))
    assert "train/grad_norm" not in record["logged"][1]  # no clipping, no norm


def test_a_constant_weight_decay_without_an_end(tiny_overrides, monkeypatch) -> None:
    record = _run(tiny_overrides, monkeypatch)
    assert {groups[0][1] for groups in record["groups"]} == {1e-4} and {groups[1][1] for groups in record["groups"]} == {0.0}
    assert record["logged"][2]["train/weight_decay"] == 1e-4


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "lars"])
def test_frozen_modules_stay_bit_identical_then_train_and_clipping_bounds_the_norm(tiny_overrides, monkeypatch, optimizer) -> None:
    """The projector frozen for the first epoch (4 steps) while weight decay and momentum are on; gradients clipped
    to a norm well below their own."""
    clip = 0.05
    record = _run(tiny_overrides, monkeypatch, f"pretrain.optimizer={optimizer}", "pretrain.weight_decay=0.1", f"pretrain.clip_grad={clip}", freeze_steps=STEPS_PER_EPOCH)
    start, first, second = record["params"][0], record["params"][1], record["params"][2]
    projector = [n for n in start if n.startswith("projector.")]
    backbone = [n for n in start if n.startswith("backbone.")]
    assert projector and backbone
    assert all(torch.equal(first[n], start[n]) for n in projector), "a frozen parameter moved"
    assert any(not torch.equal(first[n], start[n]) for n in backbone), "the rest did not train"
    assert all(not torch.equal(second[n], first[n]) for n in projector), "the projector did not train after its freeze"
    assert record["projector_grads"] == [[False] * len(projector)] * STEPS_PER_EPOCH + [[True] * len(projector)] * STEPS_PER_EPOCH
    assert all(norm <= clip * (1 + 1e-5) for norm in record["norms"]), record["norms"]
    assert all(record["logged"][e]["train/grad_norm"] > clip for e in (1, 2))  # the mean norm before clipping


def test_a_method_logs_its_schedules_per_epoch(tiny_overrides, monkeypatch) -> None:
    """What a method puts in StepOutput.logs joins the epoch's metrics (DINO: teacher_temp, momentum)."""
    cfg = build_config(
        {}, [*tiny_overrides, FAST, "method={name: dino, out_dim: 16, hidden_dim: 32, bottleneck_dim: 8, num_local_crops: 1, local_crop_size_ratio: 0.5, warmup_teacher_temp_epochs: 2}"]
    )
    trial = prepare(cfg)
    logged: dict[int, dict[str, float]] = {}
    pretrain(trial.method, trial.data.train.images, cfg, trial.augmenter, trial.device, log_metrics=lambda m, e: logged.__setitem__(e, dict(m)))
    assert logged[1]["train/teacher_temp"] == pytest.approx(0.04) and logged[2]["train/teacher_temp"] == pytest.approx(0.07)
    assert logged[1]["train/last_layer_frozen"] == 1.0 and logged[2]["train/last_layer_frozen"] == 0.0
    assert 0.996 < logged[1]["train/momentum"] < logged[2]["train/momentum"] < 1.0
