"""Distributed correctness on the CPU: two gloo workers, each with half of a global batch, give the
single-process loss and parameter gradients of that batch for every method that gathers and every ViT method that
masks patches at random, and the queues of MoCo v2 and NNCLR end equal to the single-process queue.

BatchNorm makes per-worker statistics differ from global ones (SyncBatchNorm needs CUDA), so the
methods are built on a small convolutional backbone with their BatchNorm layers removed; everything
else is the methods' own ``training_step`` / ``after_step``. The spawned run does every check at once
(spawning is the slow part) and the tests below compare its results with the single-process ones.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from core.backbones import create_backbone
from core.contract import StepInfo
from methods import create_method, registry
from methods.base import Method
from methods.distributed import average_gradients, gather, gather_no_grad, is_distributed, rank, world_size
from tests.helpers.ddp import run_distributed
from tests.helpers.method_params import small_backbone_spec, small_params

WORLD = 2
BATCH = 8
"""The global batch; each of the WORLD workers takes BATCH // WORLD consecutive rows."""

ELSEWHERE = {"clip": "image-text pairs", "simcse": "sentences", "cmc": "channel groups"}
"""Methods with ``gather`` whose data the image views below are not: their own test files check them."""
GATHERING = sorted(n for n, cls in registry().items() if "gather" in cls.Params.model_fields and n not in ELSEWHERE)
"""The image methods that gather across workers (a ``gather`` parameter); each is built with its small parameters
(tests/helpers/method_params.py) and trained on the views it declares for 16 px images, at half their size."""
IMAGE_SIZE = 16
"""The image size the views are declared for; the test's views are half as large (global views of 8 px: on 16 px
views the variance hinge of VICReg's loss, about 0.99, hides the parts that depend on the batch)."""
QUEUES = {"moco_v2": "queue.queue", "nnclr": "support.queue"}
"""The buffer holding each queue method's queue."""
PER_SAMPLE = {"moco_v2", "dino"}
"""Losses that are a mean over samples and gather nothing: each worker's loss is its rows' mean (MoCo v2 gathers its
keys for the queue, DINO the teacher's batch mean for the centre, after the step: test_dino.py checks it over two steps)."""
MASKED_VIT = {"dinov2": {"koleo_weight": 0.0}, "mae": {}, "msn": {}, "simmim": {}}
"""ViT methods whose patches are masked at random (:func:`methods.vit.random_masking`: a sample gets the mask it gets on
one process) and whose loss is a mean over samples, with their test parameters here: DINOv2's KoLeo is left out, its
nearest neighbours being each worker's own (as in the paper's code). Built on the small ViT of their test sizes, at the
full size of their views; checked with :func:`average_gradients` (DDP would need ``find_unused_parameters``)."""
SWAV_QUEUE = {"queue_length": BATCH, "queue_start_step": 0}
TOL = {"atol": 1e-5, "rtol": 1e-4}
"""Losses, in float32. Gradients: rtol 1e-4 and atol 1e-4 of the largest gradient entry of the method
(their scales differ by 10^3 between methods; the observed differences are float rounding, below 1e-5 of it)."""


class TinyBackbone(nn.Module):
    """Conv, ReLU, global average pooling: any image size, no BatchNorm."""

    num_features = 12

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, self.num_features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def _without_batch_norm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            _without_batch_norm(child)


def build(name: str, **params: Any) -> Method:
    """The same method, with the same weights, in every process."""
    torch.manual_seed(0)
    if name in MASKED_VIT:
        spec = small_backbone_spec(name)
        backbone: nn.Module = create_backbone(spec.pop("name"), img_size=IMAGE_SIZE, **spec)
        params = {**MASKED_VIT[name], **params}
    else:
        backbone = TinyBackbone()
    method = create_method(name, backbone, **small_params(name, **params))
    _without_batch_norm(method)
    return method


@functools.cache
def view_sizes(name: str) -> tuple[int, ...]:
    """Half the side of each view the method declares (built apart: the global random state is left as it was)."""
    with torch.random.fork_rng():
        return tuple(view.size // (1 if name in MASKED_VIT else 2) for view in build(name).views(IMAGE_SIZE))


def global_views(name: str, step: int = 0) -> list[torch.Tensor]:
    """Fixed views of the global batch, of the sizes the method declares."""
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(BATCH, 3, s, s, generator=g) for s in view_sizes(name)]


def shard(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """This worker's rows of every view (all rows without a process group)."""
    n = BATCH // world_size()
    return [v[rank() * n : (rank() + 1) * n] for v in views]


class _Loss(nn.Module):
    """A method's training step as ``forward``, for DistributedDataParallel."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(self, views: list[torch.Tensor], info: StepInfo) -> torch.Tensor:
        return self.method.training_step(views, info).loss


def step(method: Method, name: str, *, ddp: bool = False, steps: int = 1) -> dict[str, Any]:
    """``steps`` training steps on this worker's rows (no optimiser step; gradients of the last step),
    gradients averaged over the workers by DDP or :func:`average_gradients`; loss, gradients, queue."""
    model: nn.Module = DistributedDataParallel(_Loss(method)) if ddp and is_distributed() else _Loss(method)
    logs: dict[str, float] = {}
    for k in range(steps):
        method.zero_grad(set_to_none=True)
        info, views = StepInfo(0, k, 10), shard(global_views(name, k))
        if ddp:
            loss = model(views, info)
            loss.backward()
        else:
            out = method.training_step(views, info)
            loss, logs = out.loss, {key: float(v) for key, v in out.logs.items()}
            loss.backward()
            average_gradients(method)
        method.after_step(info)
    result: dict[str, Any] = {
        "loss": loss.detach(),
        "grads": {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None},
        "logs": logs,
    }
    if name in QUEUES:
        result["queue"] = method.get_buffer(QUEUES[name]).clone()
    return result


def run_all() -> dict[str, dict[str, Any]]:
    """Every check's results in this process: single-process without a process group, this worker's with one."""
    results = {}
    for name in GATHERING:
        results[name] = step(build(name), name)
        results[f"{name}/ddp"] = step(build(name), name, ddp=True)
        results[f"{name}/no_gather"] = step(build(name, gather=False), name)
    for name in MASKED_VIT:
        results[name] = step(build(name), name)
    results["swav/queue"] = step(build("swav", **SWAV_QUEUE), "swav", steps=2)
    return results


def _worker(rank_: int, world: int) -> dict[str, Any]:
    assert is_distributed() and rank() == rank_ and world_size() == world
    results: dict[str, Any] = run_all()
    # gather itself: rows in rank order; backward = sum over workers of the full gradient, this worker's rows
    x = torch.full((2, 3), float(rank_ + 1), requires_grad=True)
    y = gather(x)
    weights = torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape)
    (y * weights).sum().backward()
    results["gather"] = {
        "y": y.detach(),
        "grad": x.grad,
        "no_grad": gather_no_grad(x),
        "requires_grad": torch.tensor(gather_no_grad(x).requires_grad),
    }
    return results


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> list[dict[str, Any]]:
    return run_distributed(_worker, tmp_path_factory.mktemp("ddp"), WORLD)


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, Any]]:
    assert not is_distributed()
    return run_all()


def _grad_tol(expected: dict[str, torch.Tensor]) -> dict[str, float]:
    return {"atol": 1e-4 * max(v.abs().max().item() for v in expected.values()), "rtol": 1e-4}


def _assert_same_grads(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == expected.keys(), what
    tol = _grad_tol(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, **tol, msg=lambda m, key=key: f"{what}: {key}: {m}")


def _assert_same_loss(losses: list[torch.Tensor], expected: torch.Tensor, name: str) -> None:
    if name in PER_SAMPLE:  # each worker's mean over its rows; their mean is the global mean
        torch.testing.assert_close(torch.stack(losses).mean(), expected, **TOL)
    else:  # the loss of the gathered global batch, on every worker
        for r, loss in enumerate(losses):
            torch.testing.assert_close(loss, expected, **TOL, msg=lambda m, r=r: f"{name}: rank {r}: {m}")


@pytest.mark.parametrize("name", GATHERING)
@pytest.mark.parametrize("mode", ["", "/ddp"], ids=["average_gradients", "ddp"])
def test_two_workers_give_the_single_process_loss_and_gradients(name: str, mode: str, workers, single) -> None:
    expected = single[name]
    assert expected["grads"], name
    got = [w[name + mode] for w in workers]
    _assert_same_loss([g["loss"] for g in got], expected["loss"], name)
    for r, g in enumerate(got):
        _assert_same_grads(g["grads"], expected["grads"], f"{name}{mode} rank {r}")


@pytest.mark.parametrize("name", sorted(MASKED_VIT))
def test_two_workers_give_a_masked_vit_methods_single_process_loss_and_gradients(name: str, workers, single) -> None:
    """The mean of the workers' losses is the single-process loss: their masks are the single process's rows."""
    expected = single[name]
    assert expected["grads"], name
    got = [w[name] for w in workers]
    torch.testing.assert_close(torch.stack([g["loss"] for g in got]).mean(), expected["loss"], **TOL)
    assert not torch.allclose(got[0]["loss"], got[1]["loss"], **TOL)  # each worker's rows: two different losses
    for r, g in enumerate(got):
        _assert_same_grads(g["grads"], expected["grads"], f"{name} rank {r}")


@pytest.mark.parametrize("name", [n for n in GATHERING if n not in PER_SAMPLE])
def test_without_gathering_a_workers_loss_is_another(name: str, workers, single) -> None:
    """Each worker's own half batch gives another loss than the global batch: the checks above can fail."""
    for w in workers:
        assert not torch.allclose(w[f"{name}/no_gather"]["loss"], single[name]["loss"], **TOL), name


@pytest.mark.parametrize("name", sorted(QUEUES))
def test_queues_end_identical_and_equal_to_the_single_process_queue(name: str, workers, single) -> None:
    expected = single[name]["queue"]
    for r, w in enumerate(workers):
        torch.testing.assert_close(w[name]["queue"], expected, **TOL, msg=lambda m, r=r: f"{name}: rank {r}: {m}")
        torch.testing.assert_close(w[f"{name}/ddp"]["queue"], expected, **TOL)
    # without gathering each worker enqueues only its own keys: the queues differ
    assert not torch.allclose(workers[0][f"{name}/no_gather"]["queue"], workers[1][f"{name}/no_gather"]["queue"])


def test_swav_codes_over_the_global_batch_and_its_queue(workers, single) -> None:
    expected = single["swav/queue"]
    assert expected["logs"]["queue_used"] == 1.0  # the second step's codes use the first step's projections
    for r, w in enumerate(workers):
        assert w["swav/queue"]["logs"]["queue_used"] == 1.0
        torch.testing.assert_close(w["swav/queue"]["loss"], expected["loss"], **TOL)
        _assert_same_grads(w["swav/queue"]["grads"], expected["grads"], f"swav with queue, rank {r}")


@pytest.mark.parametrize("name", sorted(set(GATHERING) - PER_SAMPLE))
def test_without_gathering_the_loss_is_each_workers_own(name: str, workers, single) -> None:
    """gather=False on two workers: each worker's loss of its half batch, not the global loss (the tests above can fail)."""
    expected = single[name]["loss"]
    for w in workers:
        assert not torch.allclose(w[f"{name}/no_gather"]["loss"], expected, **TOL)
    torch.testing.assert_close(single[f"{name}/no_gather"]["loss"], expected)  # the flag changes nothing on one process
    grads, expected_grads = workers[0][f"{name}/no_gather"]["grads"], single[name]["grads"]
    assert any(not torch.allclose(grads[k], v, **_grad_tol(expected_grads)) for k, v in expected_grads.items())


def test_gather_rows_and_gradient(workers) -> None:
    rows = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])
    weights = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    for r, w in enumerate(workers):
        torch.testing.assert_close(w["gather"]["y"], rows)
        torch.testing.assert_close(w["gather"]["no_grad"], rows)
        assert not bool(w["gather"]["requires_grad"])
        torch.testing.assert_close(w["gather"]["grad"], WORLD * weights[2 * r : 2 * r + 2])  # summed over both workers


def test_without_a_process_group_everything_is_the_identity() -> None:
    assert not is_distributed() and world_size() == 1 and rank() == 0
    x = torch.randn(3, 2, requires_grad=True)
    assert gather(x) is x
    assert torch.equal(gather_no_grad(x), x) and not gather_no_grad(x).requires_grad
    layer = nn.Linear(2, 1)
    layer(x).sum().backward()
    before = layer.weight.grad.clone()
    average_gradients(layer)
    assert torch.equal(layer.weight.grad, before)
