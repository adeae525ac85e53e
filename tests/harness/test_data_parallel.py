"""One loop for every world size: 2 gloo workers reproduce the 1-process run of the same global batch and seed.

The backbone is a small timm ViT and the methods' heads keep their BatchNorm (synchronised over the
workers by default), so every difference would come from the loop: the slices, the views, the
gathering, the gradient averaging, the synchronised statistics, the loss logged.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from core.errors import BadInput
from harness.config.loading import build_config
from harness.train import distributed
from harness.train.loop import pretrain
from harness.trial.prepare import prepare
from tests.helpers.ddp import run_distributed

VIT = {"name": "vit_tiny_patch16_224", "kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}}


def raw_config(method: str, **params) -> dict:
    return {
        "device": "cpu",
        "data": {"num_train": 64, "num_test": 16, "image_size": 16},
        "backbone": VIT,
        "method": {"name": method, "proj_hidden_dim": 32, "proj_dim": 16, **params},
        "pretrain": {"epochs": 2, "batch_size": 16, "warmup_epochs": 0.5, "progress": False, "optimizer": "sgd", "base_lr": 0.01},
        "eval": {"online": {"enabled": False}, "semi": {"enabled": False}},
    }


def _pretrain(rank: int, world_size: int, raw: dict) -> dict:
    torch.set_num_threads(1)
    cfg = build_config(raw, [])
    trial = prepare(cfg)
    result = pretrain(trial.method, trial.data.train.images, cfg, trial.augmenter, trial.device)
    return {"losses": torch.tensor(result.step_losses, dtype=torch.float64), "state": trial.method.state_dict()}


def _relative(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    """max |a - b| over max |b| (at least ``floor``: a tensor of values near 0, say a bias the loss barely moves,
    is compared on the scale of the floor)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(floor))


@pytest.mark.slow  # two gloo training processes
@pytest.mark.parametrize("method", ["simclr", "barlow_twins"])
def test_two_workers_reproduce_one_process(method: str, tmp_path) -> None:
    raw = raw_config(method)
    one = _pretrain(0, 1, raw)
    two = run_distributed(_pretrain, tmp_path, world_size=2, args=(raw,), timeout=300)
    assert len(one["losses"]) == 8  # 2 epochs of 64 // 16 steps
    for rank in (0, 1):
        assert _relative(two[rank]["losses"], one["losses"]) < 1e-5, (rank, two[rank]["losses"], one["losses"])
    for name, weight in one["state"].items():
        for rank in (0, 1):
            assert _relative(two[rank]["state"][name], weight, floor=1e-2) < 1e-4, (rank, name)


@pytest.mark.slow  # two gloo training processes
def test_without_gathering_two_workers_differ(tmp_path) -> None:
    """The comparison above can fail: each worker contrasting only its own slice is a different objective."""
    raw = raw_config("simclr", gather=False)
    one = _pretrain(0, 1, raw)
    two = run_distributed(_pretrain, tmp_path, world_size=2, args=(raw,), timeout=300)
    assert _relative(two[0]["losses"], one["losses"]) > 1e-3


def _world_and_shard(rank: int, world_size: int) -> dict:
    world = distributed.current()
    rows = torch.arange(12)
    return {"rank": world.rank, "size": world.size, "rows": distributed.shard(rows, world), "mean": distributed.mean_over_workers(torch.tensor(float(rank)))}


@pytest.mark.slow  # two gloo training processes
def test_each_worker_takes_its_slice_and_the_slices_make_the_batch(tmp_path) -> None:
    results = run_distributed(_world_and_shard, tmp_path, world_size=2)
    assert [r["rank"] for r in results] == [0, 1] and all(r["size"] == 2 for r in results)
    assert torch.equal(torch.cat([r["rows"] for r in results]), torch.arange(12))
    assert all(float(r["mean"]) == 0.5 for r in results)


def test_a_batch_that_does_not_split_over_the_workers_is_bad_input() -> None:
    with pytest.raises(BadInput, match=r"pretrain.batch_size: the global batch 30 does not split over distributed.workers=4; give a multiple of 4 \(e.g. 28 or 32\)"):
        build_config(raw_config("simclr") | {"distributed": {"workers": 4}}, ["pretrain.batch_size=30"])


def test_nccl_without_cuda_is_bad_input() -> None:
    with pytest.raises(BadInput, match="distributed.backend: nccl needs CUDA"):
        distributed.backend_for("nccl", torch.device("cpu"))
    assert distributed.backend_for("auto", torch.device("cpu")) == "gloo"


def test_sync_batchnorm_round_trip_keeps_parameters_and_buffers() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
    params = {id(p) for p in net.parameters()}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    distributed.to_sync_batchnorm(net, torch.device("cpu"))
    assert isinstance(net[1], distributed.GlobalBatchNorm) and isinstance(net[2][0], distributed.GlobalBatchNorm)
    assert {id(p) for p in net.parameters()} == params and net.state_dict().keys() == state.keys()
    distributed.from_sync_batchnorm(net)
    assert type(net[1]) is torch.nn.BatchNorm2d and type(net[2][0]) is torch.nn.BatchNorm1d
    assert {id(p) for p in net.parameters()} == params
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_sync_batchnorm_is_on_with_several_workers_unless_turned_off() -> None:
    assert distributed.wants_sync_batchnorm(None, distributed.World(0, 2, 0))
    assert not distributed.wants_sync_batchnorm(False, distributed.World(0, 2, 0))
    assert not distributed.wants_sync_batchnorm(True, distributed.World())


class _StopAfterFirstEpoch(Exception):
    pass


def _first_epoch_then_stop(rank: int, world_size: int, raw: dict, checkpoint: str) -> dict:
    torch.set_num_threads(1)
    cfg = build_config(raw, [])
    trial = prepare(cfg)

    def stop(epoch: int, metrics: dict, path) -> None:
        raise _StopAfterFirstEpoch

    with contextlib.suppress(_StopAfterFirstEpoch):
        pretrain(trial.method, trial.data.train.images, cfg, trial.augmenter, trial.device, checkpoint_path=Path(checkpoint), on_epoch_end=stop)
    return {}


@pytest.mark.slow  # two gloo training processes
def test_a_checkpoint_of_two_workers_resumes_on_one(tmp_path) -> None:
    """Epoch 1 on 2 workers, epoch 2 on 1 process from its checkpoint: the 2-epoch, 1-process run."""
    raw = raw_config("barlow_twins")
    whole = _pretrain(0, 1, raw)
    checkpoint = tmp_path / "checkpoint.pt"
    run_distributed(_first_epoch_then_stop, tmp_path, world_size=2, args=(raw, str(checkpoint)), timeout=300)
    resumed = _pretrain(0, 1, {**raw, "pretrain": {**raw["pretrain"], "resume": str(checkpoint)}, "distributed": {"workers": 1}})
    assert _relative(resumed["losses"], whole["losses"][4:]) < 1e-5  # the second epoch's 4 steps
    for name, weight in whole["state"].items():
        assert _relative(resumed["state"][name], weight, floor=1e-2) < 1e-4, name


def test_a_collective_that_failed_because_a_worker_died_names_its_rank(monkeypatch) -> None:
    import os
    import socket
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", "pass"])  # ends at once; not waited for: a zombie, as under torchrun
    deadline = time.monotonic() + 30
    while not distributed._gone(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    host = socket.gethostname()
    try:
        monkeypatch.setattr(distributed, "_PEERS", [(host, os.getpid()), (host, child.pid)])
        err = distributed.lost_worker(RuntimeError("[pair.cc:545] Read error: Connection reset by peer.\nmore"))
        assert str(err) == (
            f"rank 1: its process (pid {child.pid} on {host}) ended while the others trained, so a collective failed "
            "(RuntimeError: [pair.cc:545] Read error: Connection reset by peer.)"
        )
        assert str(distributed.lost_worker(KeyboardInterrupt())) == (  # torchrun's SIGTERM once a worker ended
            f"rank 1: its process (pid {child.pid} on {host}) ended while the others trained, so the launcher stopped "
            "the others"
        )
        assert distributed.lost_worker(ValueError("not a collective")) is None
        monkeypatch.setattr(distributed, "_PEERS", [(host, os.getpid()), (host, os.getppid())])  # every worker alive
        assert distributed.lost_worker(RuntimeError("Connection reset by peer")) is None
        assert distributed.lost_worker(KeyboardInterrupt()) is None  # Ctrl-C: a stop, not a failure
    finally:
        child.wait()
