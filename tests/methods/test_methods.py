"""Methods: losses against closed forms and invariances, the shared EMA target and queue, and a
contract every registered method must meet (finite losses, gradients everywhere, representation
shape, state round trip)."""

from __future__ import annotations

import functools
import importlib
import math
import sys

import pytest
import torch
from torch import nn

import methods
from core.backbones import create_backbone
from core.contract import StepInfo
from core.errors import ConfigError
from harness.config.schema import AugmentConfig
from harness.data.augment import Augmenter
from harness.data.datasets import load_dataset
from harness.trial.evaluate import eval_inputs
from methods import create_method, list_methods
from methods.barlow_twins import barlow_twins_loss
from methods.byol import byol_loss
from methods.moco import moco_loss
from methods.moco_v3 import mocov3_loss
from methods.momentum import cosine_momentum, ema_update, frozen_copy
from methods.nnclr import nearest_neighbour, nnclr_loss
from methods.queue import FeatureQueue
from methods.simsiam import simsiam_loss
from tests.helpers.method_params import SMALL, small_backbone_spec, small_params

# ----------------------------------------------------------------------------- losses


def test_moco_loss_with_equal_logits_is_log_k_plus_1() -> None:
    q = torch.nn.functional.normalize(torch.ones(4, 8), dim=1)
    queue = q[:1].repeat(31, 1)
    assert moco_loss(q, q, queue, 0.2).item() == pytest.approx(math.log(32), abs=1e-5)


def test_moco_loss_against_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = (torch.nn.functional.normalize(torch.randn(5, 6, generator=g), dim=1) for _ in range(2))
    queue = torch.nn.functional.normalize(torch.randn(9, 6, generator=g), dim=1)
    expected = 0.0
    for i in range(5):
        logits = torch.cat([(q[i] * k[i]).sum()[None], q[i] @ queue.T]) / 0.1
        expected += -torch.log_softmax(logits, 0)[0].item() / 5
    assert moco_loss(q, k, queue, 0.1).item() == pytest.approx(expected, rel=1e-5)


def test_byol_and_simsiam_of_identical_inputs() -> None:
    x = torch.randn(6, 10)
    assert byol_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert simsiam_loss(x, x).item() == pytest.approx(-1.0, abs=1e-6)
    assert byol_loss(x, -x).item() == pytest.approx(4.0, abs=1e-5)


def test_barlow_twins_closed_form_and_invariance() -> None:
    # perfectly correlated, decorrelated: orthogonal zero-mean columns with equal norms -> C = I -> 0
    h = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    z = h[:, 1:]  # three zero-mean, mutually orthogonal columns
    assert barlow_twins_loss(z, z).item() == pytest.approx(0.0, abs=1e-4)
    x, y = torch.randn(32, 8), torch.randn(32, 8)
    assert barlow_twins_loss(x, y).item() == pytest.approx(barlow_twins_loss(2 * x + 4, y).item(), rel=1e-4)
    # by hand: C of uncorrelated views, lambda weighting
    c = ((x - x.mean(0)) / x.std(0, unbiased=False)).T @ ((y - y.mean(0)) / y.std(0, unbiased=False)) / 32
    by_hand = ((1 - c.diagonal()) ** 2).sum() + 0.01 * (c**2).sum() - 0.01 * (c.diagonal() ** 2).sum()
    assert barlow_twins_loss(x, y, 0.01).item() == pytest.approx(by_hand.item(), rel=1e-3)


# ----------------------------------------------------------------------------- shared parts


def test_ema_update_and_the_target_has_no_gradient() -> None:
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    target = frozen_copy(online)
    assert not any(p.requires_grad for p in target.parameters())
    before = [p.clone() for p in target.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    online(torch.randn(8, 3))  # moves the BN running statistics
    ema_update(target, online, 0.9)
    for t, b, o in zip(target.parameters(), before, online.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    torch.testing.assert_close(target[1].running_mean, online[1].running_mean)
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)


def test_queue_is_fifo_and_the_loss_sees_it_before_the_enqueue() -> None:
    queue = FeatureQueue(4, 2)
    a = torch.tensor([[1.0, 0], [0, 1]])
    queue.enqueue(a)
    queue.enqueue(2 * a)
    queue.enqueue(3 * a)  # overwrites the oldest rows
    torch.testing.assert_close(queue.features(), torch.cat([3 * a, 2 * a]))
    assert int(queue.ptr) == 2
    # MoCo: the keys of this step are not among the negatives of this step
    torch.manual_seed(0)
    backbone = create_backbone("test_resnet", in_chans=3, img_size=16)
    method = create_method("moco_v2", backbone, **small_params("moco_v2"))
    before = method.queue.features().clone()
    x = torch.randn(8, 3, 16, 16)
    seen = {}
    import methods.moco as moco

    original = moco.moco_loss

    def spy(q, k, queue_, t):
        seen["queue"] = queue_.clone()
        return original(q, k, queue_, t)

    moco.moco_loss = spy
    try:
        method.training_step([x, x], StepInfo(0, 0, 10))
    finally:
        moco.moco_loss = original
    torch.testing.assert_close(seen["queue"], before)
    torch.testing.assert_close(method.queue.features(), before)  # not yet: the keys go in after the step
    method.after_step(StepInfo(0, 0, 10))
    torch.testing.assert_close(method.queue.features()[:8], method._keys)


def test_bad_method_parameters_are_config_errors() -> None:
    from harness.config.loading import build_config

    with pytest.raises(ConfigError, match="method.momentum"):
        build_config({"method": {"name": "moco_v2", "momentum": 1.0}})
    with pytest.raises(ConfigError, match="method.temperature.*unknown key"):
        build_config({"method": {"name": "byol", "temperature": 0.1}})
    backbone = create_backbone("test_resnet", in_chans=3, img_size=16)
    with pytest.raises(ConfigError, match="method.queue_size: 16 is smaller than pretrain.batch_size 32"):
        create_method("moco_v2", backbone, queue_size=16).check(32)


# ----------------------------------------------------------------------------- the contract


@pytest.fixture(scope="module")
def tiny_shapes():
    return load_dataset("shapes", image_size=16, num_train=16, num_test=8, seed=0)


def _contract_method(name: str, data) -> object:
    spec = small_backbone_spec(name)
    factory = functools.partial(create_backbone, spec.pop("name"), img_size=data.image_size, **spec)
    method = create_method(name, factory(in_chans=data.channels), backbone_factory=factory, **small_params(name))
    method.setup(data)
    return method


@pytest.mark.parametrize("name", list_methods())
def test_method_contract(name: str, tiny_shapes, tmp_path) -> None:
    check_contract(name, tiny_shapes, tmp_path)


def check_contract(name: str, tiny_shapes, tmp_path) -> None:
    """Three training steps with finite losses and a gradient for every trainable parameter, the representation's
    shape, and a state round trip, with the method's small parameters (``tests/helpers/method_params.py``)."""
    assert name in SMALL, f"add small parameters for {name!r} to tests/helpers/method_params.py (SMALL)"
    torch.manual_seed(0)
    images = tiny_shapes.train.images
    augmenter = Augmenter(AugmentConfig(), tiny_shapes.mean, tiny_shapes.std)
    method = _contract_method(name, tiny_shapes)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01)
    g = torch.Generator().manual_seed(0)
    indices = torch.arange(len(images))
    for step in range(3):
        views = [augmenter(images, spec, g) for spec in method.views(16)]
        out = method.training_step(views, StepInfo(0, step, 3, indices=indices))
        assert torch.isfinite(out.loss), (name, step)
        optimizer.zero_grad()
        out.loss.backward()
        if step == 1:  # not step 0: timm zero-initialises the last BN of each residual block, so its convs get no gradient yet
            missing = [n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]
            assert missing == [], f"{name}: no gradient for {missing[:5]}"
            frozen = [n for n, p in method.named_parameters() if not p.requires_grad]
            assert all(p.grad is None for n, p in method.named_parameters() if n in frozen)
        optimizer.step()
        method.after_step(StepInfo(0, step, 3, indices=indices))
    method.eval()
    inputs = eval_inputs(method, tiny_shapes.train, augmenter.normalize)  # images, or a text method's token ids
    x = inputs.prepare(inputs.data[:4])
    rep = method.embed(x)
    assert rep.shape == (4, method.backbone.num_features)
    torch.save(method.state_dict(), tmp_path / "m.pt")
    torch.manual_seed(1)  # a fresh initialisation, then the saved state
    fresh = _contract_method(name, tiny_shapes)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    fresh.eval()
    for key, value in method.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, msg=f"{name}: {key}")
    torch.testing.assert_close(fresh.embed(x), rep)


TOY_METHOD = '''"""A throw-away method: in-batch InfoNCE on a linear projection."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from methods import register
from methods.base import Method
from core.contract import MethodParams, StepInfo, StepOutput
from core.views import View
from methods.losses import info_nce


class ToyParams(MethodParams):
    temperature: float = Field(0.5, gt=0)
    proj_dim: int = Field(128, ge=1)


@register
class Toy(Method):
    name = "toy_info_nce"
    Params = ToyParams
    uses_negatives = True
    loss_name = "InfoNCE"

    def __init__(self, backbone: nn.Module, params: ToyParams) -> None:
        super().__init__(backbone, params)
        self.projector = nn.Linear(backbone.num_features, params.proj_dim)

    def views(self, image_size: int) -> list[View]:
        return [View(image_size), View(image_size)]

    def training_step(self, views: list[torch.Tensor], step: StepInfo) -> StepOutput:
        z1, z2 = (self.projector(self.backbone(v)) for v in views)
        return StepOutput(info_nce(z1, z2, self.params.temperature, symmetric=True))
'''


def test_a_new_method_is_one_new_file(tiny_shapes, tmp_path, monkeypatch) -> None:
    """One new module with a @register class, found by the package's discovery, meets the contract with its small
    parameters next to the tests and no other edit. The registry is restored afterwards."""
    folder = tmp_path / "new_method"
    folder.mkdir()
    (folder / "toy_info_nce.py").write_text(TOY_METHOD)
    before = dict(methods.registry())
    monkeypatch.setitem(SMALL, "toy_info_nce", {"proj_dim": 8})
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(folder)])
    importlib.invalidate_caches()
    try:
        assert "toy_info_nce" not in list_methods()
        methods._discover()
        assert list_methods("toy_*") == ["toy_info_nce"]
        assert small_params("toy_info_nce") == {"proj_dim": 8} and small_backbone_spec("toy_info_nce") == {"name": "test_resnet"}
        check_contract("toy_info_nce", tiny_shapes, tmp_path)
    finally:
        methods.registry().clear()
        methods.registry().update(before)
        sys.modules.pop("methods.toy_info_nce", None)
        if hasattr(methods, "toy_info_nce"):
            delattr(methods, "toy_info_nce")
    assert "toy_info_nce" not in list_methods()


def test_mocov3_loss_closed_form_and_scale() -> None:
    q = torch.ones(8, 4)
    # identical q and k: every logit equal -> CE = log N, times 2T
    assert mocov3_loss(q, q, 0.2).item() == pytest.approx(math.log(8) * 0.4, rel=1e-5)
    eye = torch.eye(4)
    assert mocov3_loss(eye, eye, 0.01).item() == pytest.approx(0.0, abs=1e-6)


def test_nnclr_takes_the_neighbour_from_the_support_set() -> None:
    support = torch.eye(3)
    z = torch.nn.functional.normalize(torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]]), dim=1)
    torch.testing.assert_close(nearest_neighbour(z, support), support[[0, 2]])
    # the support neighbours of perfect predictions: loss as in-batch InfoNCE of one-hot pairs
    assert nnclr_loss(torch.eye(3), torch.eye(3), 0.01).item() == pytest.approx(0.0, abs=1e-6)


def test_simclr_v2_fine_tunes_from_the_middle_of_its_head() -> None:
    method = create_method("simclr_v2", create_backbone("test_resnet", in_chans=3, img_size=16), **small_params("simclr_v2"))
    trunk, dim = method.trunk(1)
    assert dim == 32 and trunk(torch.randn(2, 3, 16, 16)).shape == (2, 32)
    assert method.trunk(0)[1] == method.backbone.num_features
    with pytest.raises(Exception, match="from_projector_layer"):
        method.trunk(3)
    with pytest.raises(Exception, match="from_projector_layer"):
        create_method("simclr", create_backbone("test_resnet", in_chans=3, img_size=16)).trunk(1)
