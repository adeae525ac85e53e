"""SwAV: Sinkhorn-Knopp codes, the swapped-prediction loss against a loop, multi-crop views and their
config errors, prototype normalisation and freezing, the optional queue, and the method contract."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from core.backbones import create_backbone
from core.contract import StepInfo
from core.errors import ConfigError
from core.views import View
from harness.config.loading import build_config
from harness.train.optim import drop_gradients
from methods import create_method, swav, taxonomy
from methods.swav import sinkhorn, swapped_prediction_loss
from tests.helpers.method_params import small_params

SMALL_SWAV = small_params("swav")
"""SwAV's small heads (its small parameters (tests/helpers/method_params.py); 16 px images: 8 px small crops)."""


def _random_scores(seed: int = 0, n: int = 256, k: int = 32, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.T


def _method(**params) -> swav.SwAV:
    torch.manual_seed(0)
    return create_method("swav", create_backbone("test_resnet", in_chans=3, img_size=16), **{**SMALL_SWAV, **params})


# ----------------------------------------------------------------------------- Sinkhorn


def test_sinkhorn_rows_are_assignments() -> None:
    scores = _random_scores()
    for iterations in (1, 3, 10):
        q = sinkhorn(scores, 0.05, iterations)
        assert q.shape == scores.shape
        assert bool((q >= 0).all())
        torch.testing.assert_close(q.sum(dim=1), torch.ones(256), atol=1e-5, rtol=0)


def test_sinkhorn_balances_the_prototypes_more_with_each_iteration() -> None:
    scores = _random_scores()
    equal = 256 / 32

    def deviation(eps: float, iterations: int) -> float:
        return (sinkhorn(scores, eps, iterations).sum(dim=0) - equal).abs().max().item()

    # the paper's epsilon: the prototype marginals move towards B / K at every iteration ...
    devs = [deviation(0.05, it) for it in range(1, 11)]
    assert all(later < earlier for earlier, later in itertools.pairwise(devs)), devs
    assert devs[0] > 1.0  # ... from far off: exp(scores / 0.05) alone is far from balanced
    # ... and converge: at epsilon 0.05 the entries span e^(+-14), so it takes ~40 iterations;
    # a softer epsilon balances to 1e-4 in 10
    assert deviation(0.05, 40) < 1e-4 * equal
    assert deviation(0.2, 10) < 1e-4 * equal


def test_sinkhorn_matches_the_reference_code() -> None:
    scores = _random_scores(1, n=64, k=12)

    def distributed_sinkhorn(out, epsilon=0.05, iterations=3):  # facebookresearch/swav main_swav.py, one process
        q = torch.exp(out / epsilon).t()
        b, k = q.shape[1], q.shape[0]
        q /= torch.sum(q)
        for _ in range(iterations):
            q /= torch.sum(q, dim=1, keepdim=True)
            q /= k
            q /= torch.sum(q, dim=0, keepdim=True)
            q /= b
        q *= b
        return q.t()

    torch.testing.assert_close(sinkhorn(scores), distributed_sinkhorn(scores.double()).float(), atol=1e-6, rtol=1e-5)
    # finite where exp(scores / epsilon) overflows float32 (> 88) and where whole rows of it underflow
    for eps in (0.005, 0.001):
        assert not bool(torch.isfinite(distributed_sinkhorn(scores, eps)).all())  # the reference code fails here
        q = sinkhorn(scores, eps)
        assert bool(torch.isfinite(q).all())
        torch.testing.assert_close(q.sum(dim=1), torch.ones(64), atol=1e-5, rtol=0)


def test_sinkhorn_is_float32_for_half_inputs_and_under_autocast() -> None:
    scores = _random_scores(2, n=32, k=8)
    reference = sinkhorn(scores)
    for dtype in (torch.float16, torch.bfloat16):
        q = sinkhorn(scores.to(dtype))
        assert q.dtype == torch.float32
        torch.testing.assert_close(q.sum(dim=1), torch.ones(32), atol=1e-5, rtol=0)
        torch.testing.assert_close(q, sinkhorn(scores.to(dtype).float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = sinkhorn(scores)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, reference)
    assert not sinkhorn(scores.requires_grad_()).requires_grad


def test_sinkhorn_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(torch.zeros(4, 3), epsilon=0)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        sinkhorn(torch.zeros(4))


# ----------------------------------------------------------------------------- the loss


def test_swapped_prediction_loss_against_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    b, k, crops, t = 3, 5, 4, 0.1
    scores = [torch.randn(b, k, generator=g) for _ in range(crops)]
    codes = [torch.softmax(torch.randn(b, k, generator=g), dim=1) for _ in range(2)]
    expected = 0.0
    for i in range(2):  # codes of the global crops 0 and 1
        terms = []
        for v in range(crops):
            if v == i:
                continue
            for n in range(b):
                logits = [scores[v][n, j].item() / t for j in range(k)]
                log_z = math.log(sum(math.exp(x) for x in logits))
                terms.append(-sum(codes[i][n, j].item() * (logits[j] - log_z) for j in range(k)))
        expected += sum(terms) / len(terms) / 2
    assert swapped_prediction_loss(scores, codes, t).item() == pytest.approx(expected, rel=1e-5)
    # a code is never predicted from its own crop: crop 0's scores get a gradient from crop 1's code only
    leaves = [s.clone().requires_grad_() for s in scores]
    swapped_prediction_loss(leaves, codes, t).backward()
    grad_0 = (torch.softmax(scores[0] / t, dim=1) - codes[1]) / t / b / (crops - 1) / 2
    torch.testing.assert_close(leaves[0].grad, grad_0)
    with pytest.raises(ValueError):
        swapped_prediction_loss(scores[:1], codes[:1], t)


def test_swapped_prediction_loss_of_matching_one_hot_codes_is_small() -> None:
    codes = [F.one_hot(torch.arange(4), 4).float()] * 2
    scores = [10 * c for c in codes] * 2  # confident and right
    assert swapped_prediction_loss(scores, codes, 0.1).item() < 1e-6
    wrong = [10 * c.roll(1, dims=1) for c in codes] * 2
    assert swapped_prediction_loss(wrong, codes, 0.1).item() == pytest.approx(100.0, rel=1e-4)


# ----------------------------------------------------------------------------- views and config


def test_views_are_two_globals_then_the_small_crops() -> None:
    method = create_method("swav", create_backbone("test_resnet", in_chans=3, img_size=16))  # paper defaults
    views = method.views(32)
    assert views == [View(32, (0.14, 1.0))] * 2 + [View(14, (0.05, 0.14))] * 6
    assert [v.size for v in method.views(224)] == [224, 224] + [96] * 6  # the paper's 2 x 224 + 6 x 96
    assert create_method("swav", method.backbone, num_small_crops=0).views(16) == [View(16, (0.14, 1.0))] * 2
    assert _method().views(16) == [View(16, (0.14, 1.0))] * 2 + [View(8, (0.05, 0.14))] * 2


def test_bad_multi_crop_configs_are_config_errors() -> None:
    method = create_method("swav", create_backbone("test_resnet", in_chans=3, img_size=16))
    with pytest.raises(ConfigError, match=r"method.small_crop_size_ratio: .* gives 7 px small crops"):
        method.views(16)  # 16 * 96/224 = 7 px < 8
    method.views(20)  # 9 px: fine
    with pytest.raises(ConfigError, match="method.num_small_crops"):
        build_config({"method": {"name": "swav", "num_small_crops": -1}})
    with pytest.raises(ConfigError, match="method.small_crop_size_ratio"):
        build_config({"method": {"name": "swav", "small_crop_size_ratio": 1.5}})
    with pytest.raises(ConfigError, match="method.small_crop_scale"):
        build_config({"method": {"name": "swav", "small_crop_scale": [0.2, 0.1]}})
    cfg = build_config({"method": {"name": "swav", "num_small_crops": 0, "small_crop_scale": [0.1, 0.2]}})
    assert cfg.method["num_small_crops"] == 0


def test_too_few_prototypes_and_a_short_queue_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="method.num_prototypes"):
        build_config({"method": {"name": "swav", "num_prototypes": 1}})
    build_config({"method": {"name": "swav", "num_prototypes": 2}})
    with pytest.raises(ConfigError, match="method.queue_length: 16 is smaller than pretrain.batch_size 32"):
        _method(queue_length=16).check(32)
    _method(queue_length=32).check(32)
    _method().check(4096)


def test_taxonomy() -> None:
    assert taxonomy("swav") == {"method": "swav", "uses_negatives": False, "networks": 1, "loss": "swapped prediction (Sinkhorn codes)"}


# ----------------------------------------------------------------------------- training step


def _views(method: swav.SwAV, batch: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, v.size, v.size, generator=g) for v in method.views(16)]


def test_prototypes_are_normalised_and_frozen_for_the_first_steps() -> None:
    """The freeze goes through the loop's hook (Method.frozen_modules): their gradient is dropped, and SGD with
    momentum and weight decay leaves them as they are for the frozen steps only."""
    method = _method(freeze_prototypes_steps=2)
    with torch.no_grad():
        method.prototypes.weight.mul_(3.0)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    views = _views(method)
    for step in range(3):
        info = StepInfo(0, step, 3)
        optimizer.zero_grad(set_to_none=True)
        out = method.training_step(views, info)
        torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(10))
        before = method.prototypes.weight.detach().clone()
        out.loss.backward()
        frozen = step < 2
        assert method.frozen_modules(info) == (["prototypes"] if frozen else []), step
        drop_gradients(method, method.frozen_modules(info))
        assert (method.prototypes.weight.grad is None) == frozen, step
        assert out.logs["prototypes_frozen"] == float(frozen)
        assert method.projector[0].weight.grad is not None  # the rest trains throughout
        optimizer.step()
        assert torch.equal(method.prototypes.weight, before) == frozen, step


def test_codes_come_from_the_global_crops_only(monkeypatch) -> None:
    method = _method(num_small_crops=3)
    views = _views(method, batch=6)
    calls = []
    original = swav.sinkhorn

    def spy(scores, epsilon, iterations):
        calls.append(scores.clone())
        return original(scores, epsilon, iterations)

    monkeypatch.setattr(swav, "sinkhorn", spy)
    method.eval()  # BatchNorm on running statistics: the same crop gives the same scores in any batch
    method.training_step(views, StepInfo(0, 0, 1))
    assert len(calls) == 2
    with torch.no_grad():
        w = F.normalize(method.prototypes.weight, dim=1)
        for crop in (0, 1):
            z = F.normalize(method.projector(method.backbone(views[crop])), dim=1)
            torch.testing.assert_close(calls[crop], z @ w.T, atol=1e-5, rtol=1e-4)


def test_the_queue_enters_the_codes_once_full(monkeypatch) -> None:
    method = _method(queue_length=16, queue_start_step=1)
    batch = 8
    rows = []
    original = swav.sinkhorn

    def spy(scores, epsilon, iterations):
        rows.append(scores.shape[0])
        return original(scores, epsilon, iterations)

    monkeypatch.setattr(swav, "sinkhorn", spy)
    used = []
    for step in range(5):
        out = method.training_step(_views(method, batch, seed=step), StepInfo(0, step, 5))
        used.append(out.logs["queue_used"])
        if step == 4:
            pending = method._pending.clone()
        method.after_step(StepInfo(0, step, 5))
    # step 0: before queue_start_step, nothing stored; steps 1 and 2 fill it; 3 and 4 use it
    assert used == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert rows == [batch] * 6 + [batch + 16] * 4
    torch.testing.assert_close(method.queue[:, :batch], pending)  # newest first
    assert int(method.queue_filled) == 16
    with pytest.raises(ValueError, match="queue"):
        method._pending = torch.zeros(2, 32, 16)
        method.after_step(StepInfo(0, 5, 6))


# ----------------------------------------------------------------------------- the contract


# The registry-wide contract (tests/methods/test_methods.py::test_method_contract) covers swav too.


def test_the_contract_with_the_queue_on(tmp_path) -> None:
    method = _method(queue_length=32)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01)
    for step in range(6):
        out = method.training_step(_views(method, 16, seed=step), StepInfo(0, step, 6))
        assert torch.isfinite(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        method.after_step(StepInfo(0, step, 6))
    assert out.logs["queue_used"] == 1.0
    torch.save(method.state_dict(), tmp_path / "m.pt")
    fresh = _method(queue_length=32)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    torch.testing.assert_close(fresh.queue, method.queue)
    assert int(fresh.queue_filled) == 32
