"""The training loop: determinism, resume with identical numbers, the divergence guard."""

from __future__ import annotations

import pytest
import torch

from core.contract import StepOutput
from core.errors import BadInput, Diverged
from harness.config.loading import build_config
from harness.config.schema import compile_unavailable
from harness.train import loop as train_module
from harness.train.checkpoint import load_checkpoint
from harness.train.loop import batch_indices, pretrain
from harness.trial.prepare import prepare


def train(overrides, checkpoint=None):
    cfg = build_config({}, overrides)
    trial = prepare(cfg)
    result = pretrain(trial.method, trial.data.train.images, cfg, trial.augmenter, trial.device, checkpoint_path=checkpoint)
    return trial.method, result


def weights(method):
    return {k: v.clone() for k, v in method.state_dict().items()}


def test_same_seed_same_numbers(tiny_overrides):
    m1, r1 = train(tiny_overrides)
    m2, r2 = train(tiny_overrides)
    assert r1.losses == r2.losses
    assert all(torch.equal(a, b) for a, b in zip(weights(m1).values(), weights(m2).values()))
    _, r3 = train([*tiny_overrides, "seed=1"])
    assert r3.losses != r1.losses


def test_resume_continues_with_identical_numbers(tiny_overrides, tmp_path):
    full, full_result = train([*tiny_overrides, "pretrain.epochs=3"])

    ckpt = tmp_path / "one" / "checkpoint.pt"
    # Stop after one epoch by training a config that is identical except for the epochs ...
    cfg3 = build_config({}, [*tiny_overrides, "pretrain.epochs=3"])
    trial = prepare(cfg3)
    stop_after_one = StopAfter(1)
    with pytest.raises(StopAfter.Stop):
        pretrain(trial.method, trial.data.train.images, cfg3, trial.augmenter, trial.device, checkpoint_path=ckpt, on_epoch_end=stop_after_one)
    # ... then resume from its checkpoint in a fresh process-like setting (new model, new optimiser).
    resumed, resumed_result = train([*tiny_overrides, "pretrain.epochs=3", f"pretrain.resume={ckpt}"])
    assert resumed_result.losses == full_result.losses
    for (name, a), b in zip(weights(full).items(), weights(resumed).values()):
        assert torch.equal(a, b), name
    # the totals are over all three epochs: the first epoch's seconds come from the checkpoint
    first = torch.load(ckpt, weights_only=True)["timing"]
    assert first["images"] == 128 // 32 * 32 and 0 < first["steady_s"] <= first["pretrain_s"]
    assert resumed_result.time_s > first["pretrain_s"] and resumed_result.steady_s > first["steady_s"]
    assert resumed_result.images_per_s == pytest.approx(3 * 128 / resumed_result.steady_s)


def test_pretraining_time_leaves_out_the_online_monitor(tiny_overrides):
    """A per-epoch hook (the online monitor) of 0.3 s an epoch is counted in ``online_s``, not in ``time_s``."""
    import time

    cfg = build_config({}, tiny_overrides)
    trial = prepare(cfg)

    def slow_monitor(epoch):
        time.sleep(0.3)
        return {}

    t0 = time.perf_counter()
    result = pretrain(trial.method, trial.data.train.images, cfg, trial.augmenter, trial.device, epoch_metrics=slow_monitor)
    wall = time.perf_counter() - t0
    assert result.online_s == pytest.approx(0.6, abs=0.1)
    assert result.time_s == pytest.approx(wall - result.online_s, abs=0.05)


class StopAfter:
    """An on_epoch_end callback that interrupts training after ``n`` epochs (like a killed process)."""

    class Stop(Exception):
        pass

    def __init__(self, n):
        self.n = n

    def __call__(self, epoch, metrics, path):
        assert path is not None and path.is_file()
        if epoch >= self.n:
            raise self.Stop


def test_checkpoint_holds_config_and_loads_weights_only(tiny_overrides, tmp_path):
    ckpt = tmp_path / "c.pt"
    method, _ = train(tiny_overrides, checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 2 and state["config"]["pretrain"]["epochs"] == 2
    assert set(state) >= {"model", "optimizer", "epoch", "config", "provenance"}
    fresh = prepare(build_config({}, tiny_overrides)).method
    assert load_checkpoint(ckpt, fresh, None, None)[0] == 2
    assert set(load_checkpoint(ckpt, fresh, None, None)[2]) == {"pretrain_s", "online_s", "images", "steady_s"}
    assert all(torch.equal(a, b) for a, b in zip(weights(method).values(), weights(fresh).values()))


def test_a_checkpoint_from_before_a_key_existed_resumes_when_the_key_is_at_its_default(tiny_overrides, tmp_path):
    """A checkpoint written before ``data.normalize`` and ``augment.solarize_p`` existed (its config lacks them, and
    it has no timing totals) resumes with them at their defaults, and is refused when one is set otherwise."""
    ckpt = tmp_path / "c.pt"
    train(tiny_overrides, checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    del state["config"]["data"]["normalize"], state["config"]["augment"]["solarize_p"], state["timing"]
    torch.save(state, ckpt)
    _, result = train([*tiny_overrides, f"pretrain.resume={ckpt}"])  # nothing left to train: the losses it had
    assert len(result.losses) == 2 and result.steady_s < 0.01  # no totals in it: this call's alone
    with pytest.raises(BadInput, match=r"trained with augment.solarize_p=0.0, this config has 0.2"):
        train([*tiny_overrides, "augment.solarize_p=0.2", f"pretrain.resume={ckpt}"])


def test_resume_with_a_different_config_is_refused(tiny_overrides, tmp_path):
    ckpt = tmp_path / "c.pt"
    train(tiny_overrides, checkpoint=ckpt)
    with pytest.raises(BadInput, match=r"pretrain.resume: .* trained with method.temperature=0.5, this config has 0.1"):
        train([*tiny_overrides, "method.temperature=0.1", f"pretrain.resume={ckpt}"])
    with pytest.raises(BadInput, match="checkpoint .* not found"):
        train([*tiny_overrides, f"pretrain.resume={tmp_path / 'absent.pt'}"])


@pytest.mark.parametrize("check_every", [1, 3, 1000], ids=["every step", "every 3 steps", "epoch ends"])
def test_non_finite_loss_stops_with_epoch_and_step(tiny_overrides, monkeypatch, check_every):
    # On an accelerator the loss is read every few steps only (no sync per step): the step named is still the first
    # non-finite one, whenever it is read.
    monkeypatch.setattr(train_module, "loss_check_every", lambda device: check_every)
    cfg = build_config({}, tiny_overrides)
    trial = prepare(cfg)
    calls = {"n": 0}
    real_step = trial.method.training_step

    def step(views, info):
        calls["n"] += 1
        out = real_step(views, info)
        return StepOutput(out.loss * float("nan")) if calls["n"] == 6 else out

    monkeypatch.setattr(trial.method, "training_step", step)
    # 128 images / batch 32 = 4 steps per epoch: the 6th step is epoch 2, step 2.
    with pytest.raises(Diverged, match=r"^loss diverged at epoch 2 step 2 "):
        pretrain(trial.method, trial.data.train.images, cfg, trial.augmenter, trial.device)


def test_reading_the_loss_less_often_changes_no_number(tiny_overrides, monkeypatch):
    cfg = build_config({}, tiny_overrides)
    results = []
    for every in (1, 3):
        monkeypatch.setattr(train_module, "loss_check_every", lambda device, every=every: every)
        trial = prepare(cfg)
        results.append(pretrain(trial.method, trial.data.train.images, cfg, trial.augmenter, trial.device))
    assert results[0].step_losses == results[1].step_losses and len(results[0].step_losses) == results[0].steps
    assert results[0].losses == results[1].losses


def test_batches_are_a_permutation_without_the_partial_tail():
    batches = list(batch_indices(10, 3, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [3, 3, 3]
    assert len(set(torch.cat(batches).tolist())) == 9


def test_batch_larger_than_dataset_is_bad_input(tiny_overrides):
    with pytest.raises(BadInput, match=r"pretrain.batch_size: 256 is larger than the shapes training set \(128 images\)"):
        prepare(build_config({}, [*tiny_overrides, "pretrain.batch_size=256"]))


def test_epoch_metrics_join_the_epoch_before_it_is_logged_and_reported(tiny_overrides):
    cfg = build_config({}, tiny_overrides)
    trial = prepare(cfg)
    calls, logged, reported = [], {}, {}

    def extra(epoch):
        calls.append(epoch)
        return {"online/x": float(epoch)} if epoch == 2 else {}

    pretrain(
        trial.method, trial.data.train.images, cfg, trial.augmenter, trial.device, epoch_metrics=extra,
        log_metrics=lambda m, e: logged.__setitem__(e, dict(m)), on_epoch_end=lambda e, m, p: reported.__setitem__(e, dict(m)),
    )  # fmt: skip
    assert calls == [1, 2]
    assert logged == reported
    assert "online/x" not in logged[1] and logged[2]["online/x"] == 2.0 and "train/loss" in logged[2]


@pytest.mark.slow  # torch.compile's C++ build
@pytest.mark.skipif(compile_unavailable("cpu") is not None, reason="torch.compile needs a C++ compiler on the CPU")
def test_compiled_modules_train_to_the_same_losses(tiny_overrides):
    # torch.compile changes how the step runs, not what it computes: the same losses to float tolerance, the same
    # parameter names (checkpoints load either way), and the compile time kept out of the throughput. A one-block ViT
    # is the fewest kernels to compile (half test_resnet's cold compile); the projector's BatchNorm is still in the graph.
    overrides = [*tiny_overrides, "pretrain.epochs=1", "backbone.name=test_vit", "backbone.kwargs={depth: 1, patch_size: 8}"]
    runs = {}
    for compiled in (False, True):
        cfg = build_config({}, [*overrides, f"pretrain.compile={str(compiled).lower()}"])
        trial = prepare(cfg)
        runs[compiled] = (pretrain(trial.method, trial.data.train.images, cfg, trial.augmenter, trial.device), trial.method)
    (plain, plain_method), (compiled, compiled_method) = runs[False], runs[True]
    assert compiled.step_losses == pytest.approx(plain.step_losses, rel=1e-4, abs=1e-5)
    assert list(compiled_method.state_dict()) == list(plain_method.state_dict())
    assert compiled.compile_s > 0 and plain.compile_s == 0
