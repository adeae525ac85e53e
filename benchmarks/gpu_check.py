"""One command for a lent GPU machine: the harness's GPU paths against their references, in one report.

    python benchmarks/gpu_check.py [--out gpu_check_report]   # one H100/H200: about 8 minutes at most
    python benchmarks/gpu_check.py --tiny --out DIR            # tiny sizes on any machine: what the test suite runs

Each step runs in a child process of its own under a time limit (and all of them within ``--budget``): a failure, a
crash or a hang is recorded with its one-line error and the figures it had measured, and the next step runs. Each
reports its figures and their ratio to the reference it is measured against.

1. ``throughput``: images/s of the harness's training loop (:func:`harness.train.loop.pretrain`, SimCLR, as
   ``pretrain_throughput.py`` times it) against the limit: a bare forward + backward + SGD step of the same backbone
   and batch in bf16 autocast with channels_last. resnet18 (CIFAR stem, 32 px, batch 512), resnet50 (224 px, 128),
   vit_small_patch16_224 (224 px, 128).
2. ``eval_vs_pretrain``: the evaluation battery's seconds against pretraining's in an end-to-end run (``prepare`` +
   ``execute`` into a throw-away MLflow store; without MLflow, ``prepare`` + ``pretrain`` + ``evaluate``), SimCLR with
   resnet18 on ``shapes`` with 50,000 training images.
3. ``nccl_sync_bn``: the loop in an NCCL process group of one worker with SyncBatchNorm against the single-process
   loop: the largest relative difference of their step losses, and their images/s.
4. ``compile``: ``pretrain.compile`` on against off: images/s, and the first step's seconds (the compiling one).
5. ``faiss_gpu_knn``: faiss's GPU index against the torch matmul + topk path of :mod:`evaluations.search` on random
   features: the share of queries whose top-k are identical, and the seconds of each.

Without CUDA, steps 3 and 5 are skipped ("no CUDA") and step 1's limit is an fp32 step ("no bf16 on this device").
``report.json``, ``report.md`` and each step's log go to ``--out``, rewritten after every step; stdout gets one line
per step. The exit code is 0 once the report is written, whatever the steps did.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from harness.train.loop import TrainResult
    from harness.trial.prepare import Trial

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "simclr_shapes.yaml"
LOSS_TOLERANCE = 1e-3
"""Largest relative difference of a step loss between the NCCL worker and the single process (cuDNN deterministic)."""


class Skipped(Exception):
    """A step that cannot run here; its message is the reason."""


class CheckFailed(Exception):
    """A step that measured, but whose result is wrong (e.g. the two paths' losses differ)."""


def one_line(err: BaseException) -> str:
    """``Type: first words of the message``, on one line of at most 300 characters."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:300] if text else type(err).__name__


# ----------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Model:
    """A backbone and the batch it trains at, under the slot name the report uses (the same at every size)."""

    slot: str
    backbone: str
    image_size: int
    batch: int
    cifar_stem: bool = False
    kwargs: str = "{}"

    def overrides(self) -> list[str]:
        return [
            f"backbone.name={self.backbone}",
            f"backbone.cifar_stem={str(self.cifar_stem).lower()}",
            f"backbone.kwargs={self.kwargs}",
            f"data.image_size={self.image_size}",
            f"pretrain.batch_size={self.batch}",
        ]

    def describe(self) -> str:
        stem = ", CIFAR stem" if self.cifar_stem else ""
        extra = f", {self.kwargs}" if self.kwargs != "{}" else ""
        return f"{self.slot}: {self.backbone}{stem}{extra}, {self.image_size} px, batch {self.batch}"


@dataclass(frozen=True)
class Sizes:
    models: tuple[Model, ...]
    """Step 1's backbones."""
    warmup: int
    steps: int
    """Loop steps before the timing starts, and timed."""
    eval_overrides: tuple[str, ...]
    """Step 2's run, on top of ``configs/simclr_shapes.yaml``."""
    nccl: Model
    nccl_steps: int
    compiled: Model
    knn: tuple[int, int, int, int]
    """Step 5: database rows, dimension, queries, k."""
    limits: dict[str, float] = field(default_factory=dict)
    """Seconds each step may take."""


FULL_EVAL = (
    "data.num_train=50000", "data.num_test=10000", "backbone.name=resnet18", "backbone.cifar_stem=true",
    "pretrain.batch_size=512", "pretrain.epochs=2",
)  # fmt: skip
TINY_EVAL = (
    "data.num_train=64", "data.num_test=32", "data.image_size=16", "method.proj_hidden_dim=32", "method.proj_dim=16",
    "pretrain.batch_size=16", "pretrain.epochs=1", "eval.knn.k=5", "eval.linear.epochs=2", "eval.semi.fractions=[0.25]",
    "eval.semi.epochs=[1]", "eval.batch_size=64",
)  # fmt: skip
"""Step 2's runs, on top of ``configs/simclr_shapes.yaml``."""

FULL = Sizes(
    models=(
        Model("resnet18", "resnet18", 32, 512, cifar_stem=True),
        Model("resnet50", "resnet50", 224, 128),
        Model("vit_small", "vit_small_patch16_224", 224, 128),
    ),
    warmup=3,
    steps=10,
    eval_overrides=FULL_EVAL,
    nccl=Model("model", "resnet18", 32, 256, cifar_stem=True),
    nccl_steps=5,
    compiled=Model("model", "resnet18", 32, 512, cifar_stem=True),
    knn=(50_000, 512, 10_000, 20),
    limits={"throughput": 100, "eval_vs_pretrain": 160, "nccl_sync_bn": 50, "compile": 120, "faiss_gpu_knn": 40},
)
TINY = Sizes(
    models=(
        Model("resnet18", "test_resnet", 16, 8, cifar_stem=True),
        Model("resnet50", "test_resnet", 32, 8),
        Model("vit_small", "test_vit", 32, 8, kwargs="{depth: 2, patch_size: 8}"),
    ),
    warmup=1,
    steps=2,
    eval_overrides=TINY_EVAL,
    nccl=Model("model", "test_resnet", 16, 8, cifar_stem=True),
    nccl_steps=3,
    compiled=Model("model", "test_vit", 16, 8, kwargs="{depth: 1, patch_size: 8}"),  # the fewest kernels to compile
    knn=(2_000, 64, 200, 10),
    limits={"throughput": 120, "eval_vs_pretrain": 120, "nccl_sync_bn": 60, "compile": 180, "faiss_gpu_knn": 60},
)


# ----------------------------------------------------------------------------- a step's record (child side)


def empty_record() -> dict[str, Any]:
    return {"figures": {}, "ratios": [], "checks": {}, "details": {}, "notes": []}


class Record:
    """What a step measured, saved to ``path`` (JSON) after every addition, so that a step killed halfway keeps it.

    ``figures``: finite positive measurements; ``ratios``: ``figures[of] / figures[to]``, each named; ``checks``:
    agreement measures (may be 0); ``details``: other numbers worth keeping; ``notes``: what the reader must know.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"status": "running", **empty_record()}
        self.save()

    def figure(self, name: str, value: float) -> None:
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise CheckFailed(f"{name} = {value}: not a finite positive number")
        self.data["figures"][name] = value
        self.save()

    def ratio(self, name: str, of: str, to: str) -> None:
        figures = self.data["figures"]
        self.data["ratios"].append({"name": name, "of": of, "to": to, "value": figures[of] / figures[to]})
        self.save()

    def check(self, name: str, value: Any) -> None:
        self.data["checks"][name] = value
        self.save()

    def detail(self, name: str, value: Any) -> None:
        self.data["details"][name] = value
        self.save()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.save()

    def finish(self, status: str, **why: str) -> None:
        self.data.update(status=status, **why)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------- measuring (child side)


def sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class LoopRun:
    trial: Trial
    result: TrainResult
    images_per_s: float
    """Source images per second of the steps after the warm-up."""
    first_step_s: float
    """From the call of ``pretrain`` to the end of the first step (set-up and, compiled, the compiling)."""


def loop_run(
    overrides: list[str], batch: int, warmup: int, steps: int, before: Callable[[Trial], None] | None = None
) -> LoopRun:
    """The real training loop for ``warmup + steps`` steps of ``batch`` shapes images (one epoch, no lr warm-up), each
    step timestamped at its end (after a device sync); ``before(trial)`` runs between ``prepare`` and ``pretrain``."""
    from core.contract import StepInfo
    from harness.config.loading import build_config
    from harness.train.loop import pretrain
    from harness.trial.prepare import prepare

    cfg = build_config(
        {},
        [
            "method.name=simclr", "data.num_test=16", "eval.semi.enabled=false", "device=auto", *overrides,
            f"data.num_train={batch * (warmup + steps)}", "pretrain.epochs=1", "pretrain.warmup_epochs=0",
            "pretrain.progress=false",
        ],
    )  # fmt: skip
    trial = prepare(cfg)
    if before is not None:
        before(trial)
    marks: list[float] = []
    original = trial.method.after_step

    def after_step(step: StepInfo) -> None:
        original(step)
        sync(trial.device)
        marks.append(time.perf_counter())

    trial.method.after_step = after_step  # type: ignore[method-assign]  # instrumented on this instance only
    t0 = time.perf_counter()
    result = pretrain(trial.method, trial.data.train.images, cfg, trial.augmenter, trial.device)
    return LoopRun(trial, result, batch * steps / (marks[-1] - marks[warmup - 1]), marks[0] - t0)


def bf16_reference(rec: Record) -> bool:
    """Whether the limit is measured in bf16 autocast + channels_last: on CUDA devices with bf16, else fp32 (noted)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return True
    rec.note("no bf16 on this device: the limit is an fp32 step, contiguous (the harness's loop trains fp32 here)")
    return False


def measure_throughput(rec: Record, size: Sizes) -> None:
    import torch

    bf16 = bf16_reference(rec)
    failures: list[str] = []
    for model in size.models:  # one backbone's failure (out of memory, say) leaves the others measured
        rec.detail(f"{model.slot}.settings", model.describe())
        try:
            throughput_of(rec, model, size, bf16)
        except Exception as err:  # noqa: BLE001 - recorded, and raised once the others are measured
            failures.append(f"{model.slot}: {one_line(err)}")
            traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if failures:
        raise CheckFailed("; ".join(failures))


def throughput_of(rec: Record, model: Model, size: Sizes, bf16: bool) -> None:
    """The loop's images/s of ``model``, the bare step's, and their ratio."""
    from pretrain_throughput import raw_images_per_s  # the same bare step that script times

    run = loop_run(model.overrides(), model.batch, size.warmup, size.steps)
    rec.figure(f"{model.slot}.harness_img_s", run.images_per_s)
    backbone = run.trial.method.backbone
    if backbone is None:
        raise CheckFailed("the method has no backbone to time on its own")
    limit = raw_images_per_s(
        backbone, model.batch, model.image_size, run.trial.data.channels, size.steps, size.warmup, run.trial.device,
        bf16_channels_last=bf16,
    )  # fmt: skip
    rec.figure(f"{model.slot}.limit_img_s", limit)
    rec.ratio(f"{model.slot}.harness/limit", f"{model.slot}.harness_img_s", f"{model.slot}.limit_img_s")


def measure_eval_vs_pretrain(rec: Record, size: Sizes) -> None:
    import importlib.util

    from harness.config.loading import load_config
    from harness.track.mlflow import Run
    from harness.trial import run as trial_run
    from harness.trial.prepare import prepare

    overrides = [
        *size.eval_overrides, "pretrain.warmup_epochs=0", "pretrain.progress=false", "device=auto",
        "eval.baselines=false", "eval.online.enabled=false", "tracking.experiment=gpu_check",
        f"tracking.uri=sqlite:///{Path.cwd() / 'mlflow.db'}", f"pretrain.checkpoint_dir={Path.cwd() / 'checkpoint'}",
    ]  # fmt: skip
    cfg = load_config(CONFIG, overrides)
    rec.detail("settings", " ".join(size.eval_overrides))
    rec.note("baselines and the online monitor are off: the battery alone is timed against pretraining")
    pretrain, evaluate = trial_run.pretrain, trial_run.evaluate

    def timed_pretrain(*args: Any, **kwargs: Any) -> TrainResult:
        result = pretrain(*args, **kwargs)
        rec.figure("pretrain_s", result.time_s)  # recorded at once: kept if the battery runs out of time
        rec.detail("pretrain_img_s", result.images_per_s)
        return result

    def timed_evaluate(trial: Trial, mlrun: Run | None = None, final_loss: float | None = None) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = evaluate(trial, mlrun, final_loss)
        rec.figure("eval_s", time.perf_counter() - t0)  # as execute spends it: its figures logged included
        parts = {k: v for k, v in sorted(metrics.items()) if k.startswith("time/")}
        rec.detail("eval_parts_s", parts)  # the battery's own timings of its parts
        return metrics

    trial_run.pretrain, trial_run.evaluate = timed_pretrain, timed_evaluate  # execute's calls, timed
    if importlib.util.find_spec("mlflow") is not None:
        rec.detail("path", "harness.trial.run.run: prepare + execute, into a throw-away SQLite MLflow store")
        trial_run.run(cfg)
    else:
        rec.detail("path", "no MLflow here: prepare + pretrain + evaluate (execute's body without its logging)")
        trial = prepare(cfg)
        result = timed_pretrain(trial.method, trial.data.train.images, cfg, trial.augmenter, trial.device)
        timed_evaluate(trial, None, result.losses[-1] if result.losses else None)
    rec.ratio("eval/pretrain", "eval_s", "pretrain_s")
    epochs = cfg.pretrain.epochs
    rec.note(f"pretraining ran {epochs} epoch(s): an E-epoch run's ratio is about eval_s / (E * pretrain_s / {epochs})")


def measure_nccl_sync_bn(rec: Record, size: Sizes) -> None:
    import torch
    import torch.distributed as dist

    from harness.train import distributed

    if not torch.cuda.is_available():
        raise Skipped("no CUDA")
    if not dist.is_nccl_available():
        raise Skipped("this torch has no NCCL")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # the same kernels both times
    model, steps = size.nccl, size.nccl_steps
    rec.detail("settings", model.describe() + f", {steps} steps")
    overrides = model.overrides()
    single = loop_run(overrides, model.batch, 1, steps - 1)
    rec.figure("single_img_s", single.images_per_s)
    rec.figure("single_loss", single.result.step_losses[-1])
    reference = single.result.step_losses
    del single  # its model, before the second one
    torch.cuda.set_device(0)
    t0 = time.perf_counter()
    dist.init_process_group(
        "nccl", init_method=f"file://{Path.cwd() / 'rendezvous'}", rank=0, world_size=1,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    try:
        probe = torch.arange(4, dtype=torch.float32, device="cuda")
        dist.all_reduce(probe)  # a collective through NCCL: one worker's sum is its own tensor
        torch.cuda.synchronize()
        if probe.tolist() != [0.0, 1.0, 2.0, 3.0]:
            raise CheckFailed(f"an NCCL all_reduce of one worker gave {probe.tolist()}")
        rec.figure("pg_init_s", time.perf_counter() - t0)
        rec.detail("world", str(distributed.current()))

        def sync_batchnorm(trial: Trial) -> None:  # the loop converts only with several workers: forced here
            distributed.to_sync_batchnorm(trial.method, trial.device)
            layers = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in trial.method.modules())
            rec.check("sync_batchnorm_layers", layers)
            if not layers:
                raise CheckFailed(f"{model.backbone} has no BatchNorm to synchronise")

        nccl = loop_run(overrides, model.batch, 1, steps - 1, before=sync_batchnorm)
    finally:
        distributed.shutdown()
    rec.figure("nccl_img_s", nccl.images_per_s)
    rec.figure("nccl_loss", nccl.result.step_losses[-1])
    rec.ratio("nccl/single", "nccl_img_s", "single_img_s")
    rec.note(
        "torch's SyncBatchNorm normalises locally in a group of one worker: this checks the NCCL set-up and the "
        "loop's distributed path on this GPU, not a reduction across GPUs"
    )
    raise_if_losses_differ(rec, reference, nccl.result.step_losses)


def raise_if_losses_differ(rec: Record, reference: list[float], losses: list[float]) -> None:
    if len(reference) != len(losses):
        raise CheckFailed(f"{len(losses)} step losses against {len(reference)}")
    diff = max(abs(a - b) / max(abs(a), abs(b), 1e-12) for a, b in zip(reference, losses, strict=True))
    rec.check("max_rel_loss_diff", diff)
    rec.check("steps", len(losses))
    if diff > LOSS_TOLERANCE:
        raise CheckFailed(f"the step losses differ: max relative difference {diff:.3g} > {LOSS_TOLERANCE:g}")


def measure_compile(rec: Record, size: Sizes) -> None:
    import torch

    from harness.config.schema import compile_unavailable

    if why := compile_unavailable("cuda" if torch.cuda.is_available() else "cpu"):
        raise Skipped(why)  # the harness's own check: no C++ compiler (CPU) or no triton (CUDA)
    model = size.compiled
    rec.detail("settings", model.describe() + f", {size.warmup} warm-up + {size.steps} timed steps")
    rec.note("cold caches: TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR are new folders for this run")
    eager = loop_run([*model.overrides(), "pretrain.compile=false"], model.batch, size.warmup, size.steps)
    rec.figure("eager_img_s", eager.images_per_s)
    rec.figure("eager_first_step_s", eager.first_step_s)
    del eager
    compiled = loop_run([*model.overrides(), "pretrain.compile=true"], model.batch, size.warmup, size.steps)
    rec.figure("compiled_img_s", compiled.images_per_s)
    rec.figure("compiled_first_step_s", compiled.first_step_s)
    rec.detail("loop_compile_s", compiled.result.compile_s)  # the loop's own figure: its first step, from its start
    rec.ratio("compiled/eager", "compiled_img_s", "eager_img_s")
    rec.ratio("first_step.compiled/eager", "compiled_first_step_s", "eager_first_step_s")


def measure_faiss_gpu_knn(rec: Record, size: Sizes) -> None:
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        raise Skipped("no CUDA")
    try:
        import faiss

        from evaluations import search
    except ImportError as err:
        raise Skipped(f"faiss is not importable ({one_line(err)})") from None
    if not search.gpu_available():
        raise Skipped(f"faiss {faiss.__version__} has no GPU support (faiss-cpu?): install faiss-gpu to compare")
    n, dim, queries, k = size.knn
    rec.detail("settings", f"{n} x {dim} database, {queries} queries, k={k}, L2-normalised Gaussian features")
    rng = np.random.default_rng(0)
    database = rng.standard_normal((n, dim), dtype=np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    query = rng.standard_normal((queries, dim), dtype=np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    device = torch.device("cuda")

    def faiss_gpu() -> np.ndarray:
        return search.inner_product_topk(database, query, k, use_gpu=True)[1]

    def torch_path() -> np.ndarray:
        with search.on_device(device):
            return search.inner_product_topk(database, query, k, backend="torch")[1]

    for fn in (faiss_gpu, torch_path):  # warm-up: faiss's GPU resources, cuBLAS handles
        fn()
    faiss_idx, faiss_s = timed(faiss_gpu, device)
    torch_idx, torch_s = timed(torch_path, device)
    rec.figure("faiss_gpu_s", faiss_s)
    rec.figure("torch_s", torch_s)
    rec.ratio("torch/faiss", "torch_s", "faiss_gpu_s")
    same = np.sort(faiss_idx, axis=1) == np.sort(torch_idx, axis=1)
    overlap = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(faiss_idx, torch_idx, strict=True)])
    rec.check("identical_topk", float(same.all(axis=1).mean()))
    rec.check("topk_overlap", float(overlap))
    rec.note("identical_topk: the share of queries whose k neighbours are the same set on both paths")


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def probe_device(rec: Record, size: Sizes) -> None:
    """The machine, for the report: CUDA or not (the explicit device check the steps follow), the GPU, versions."""
    import torch

    cuda = torch.cuda.is_available()
    rec.detail("cuda", cuda)
    rec.detail("torch", torch.__version__)
    if cuda:
        props = torch.cuda.get_device_properties(0)
        rec.detail("gpu", props.name)
        rec.detail("gpus", torch.cuda.device_count())
        rec.detail("gpu_memory_gib", round(props.total_memory / 2**30, 1))
        rec.detail("capability", f"{props.major}.{props.minor}")
        rec.detail("cuda_version", torch.version.cuda)
        rec.detail("bf16", torch.cuda.is_bf16_supported())
        if torch.distributed.is_nccl_available():
            version = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
            rec.detail("nccl", ".".join(map(str, version)) if isinstance(version, tuple) else str(version))


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    measure: Callable[[Record, Sizes], None]
    needs_cuda: bool = False


STEPS = (
    Step("throughput", "the training loop against the bf16 + channels_last limit (images/s)", measure_throughput),
    Step("eval_vs_pretrain", "the evaluation battery against pretraining, end to end (s)", measure_eval_vs_pretrain),
    Step("nccl_sync_bn", "one NCCL worker with SyncBatchNorm against one process", measure_nccl_sync_bn, True),
    Step("compile", "pretrain.compile on against off", measure_compile),
    Step("faiss_gpu_knn", "faiss's GPU index against the torch kNN path", measure_faiss_gpu_knn, True),
)
PROBE = Step("device", "the device check", probe_device)
BY_NAME = {s.name: s for s in (*STEPS, PROBE)}


def child(name: str, result: Path, tiny: bool, fail: list[str], hang: list[str]) -> int:
    """Run one step in this process, its record at ``result``; 0 unless it failed."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rec = Record(result)
    try:
        if name in fail:
            raise CheckFailed(f"made to fail by --fail-step {name}")
        if name in hang:
            rec.note(f"made to hang by --hang-step {name}")
            while True:
                time.sleep(60)
        BY_NAME[name].measure(rec, TINY if tiny else FULL)
    except Skipped as why:
        rec.finish("skipped", reason=str(why))
    except Exception as err:  # noqa: BLE001 - any failure of a step is its record's one line; the next step runs
        traceback.print_exc()
        rec.finish("failed", error=one_line(err))
        return 1
    else:
        rec.finish("ok")
    return 0


# ----------------------------------------------------------------------------- running the steps (parent side)


def child_env(work: Path, tiny: bool) -> dict[str, str]:
    """The steps' environment: the repository importable, unbuffered logs, cold compile caches of this run's own."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
    )}  # fmt: skip
    env |= {"TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"), "TRITON_CACHE_DIR": str(work / "triton")}
    if tiny:  # a busy machine's spinning OpenMP threads can slow tiny work many-fold (compiling keeps its workers)
        env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return env


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End the step's process group (its own: started with a new session), SIGTERM then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def last_line(log: Path) -> str:
    """The log's last non-blank line (a traceback's exception), shortened."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:240] if lines else "(empty log)"


def read_record(path: Path) -> dict[str, Any]:
    try:
        record: dict[str, Any] = json.loads(path.read_text())
        return record
    except (OSError, ValueError):
        return {"status": "running", **empty_record()}


def run_step(step: Step, args: argparse.Namespace, work: Path, limit: float, log: Path) -> dict[str, Any]:
    """Run ``step`` in a child process for at most ``limit`` seconds; its record, completed with the outcome."""
    folder = work / step.name
    folder.mkdir()
    result = folder / "record.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", step.name, "--result", str(result)]
    cmd += ["--tiny"] * args.tiny
    for flag, names in (("--fail-step", args.fail_step), ("--hang-step", args.hang_step)):
        cmd += [part for name in names for part in (flag, name)]
    t0 = time.perf_counter()
    timed_out = False
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=folder, env=child_env(work, args.tiny), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout ends its helpers (compile workers) too
        )  # fmt: skip
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop(proc)
        except BaseException:  # Ctrl-C, SIGTERM: the step goes with this process
            stop(proc)
            raise
    record = read_record(result)
    record["seconds"] = time.perf_counter() - t0
    if timed_out:
        record.update(status="failed", error=f"timed out after {limit:.0f} s (its limit); its processes were ended")
    elif record["status"] not in ("ok", "skipped", "failed"):  # it died before finishing: a crash, a signal
        record.update(status="failed", error=f"exit code {proc.returncode}: {last_line(log)}")
    return record


def versions() -> dict[str, str]:
    names = ("torch", "timm", "numpy", "scikit-learn", "pandas", "faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "mlflow",
             "mlflow-skinny", "pydantic", "ray")  # fmt: skip
    found = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def fmt(value: Any) -> str:
    """A number to 4 significant digits; anything else as it is."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_line(entry: dict[str, Any]) -> str:
    """``name status seconds figures | ratios | checks``, or the error or reason: one line of the stdout table."""
    head = f"{entry['name']:<17} {entry['status']:<8} {entry.get('seconds', 0.0):6.1f} s  "
    if entry["status"] == "skipped":
        return head + entry.get("reason", "")
    parts = [" ".join(f"{k}={fmt(v)}" for k, v in entry["figures"].items())]
    parts.append(" ".join(f"{r['name']}={fmt(r['value'])}" for r in entry["ratios"]))
    parts.append(" ".join(f"{k}={fmt(v)}" for k, v in entry["checks"].items()))
    text = " | ".join(p for p in parts if p)
    if entry["status"] == "failed":
        text = f"error: {entry.get('error', '?')}" + (f" | {text}" if text else "")
    return head + text


def markdown(report: dict[str, Any]) -> str:
    dev = report["device"]
    where = f"{dev.get('gpu', 'no GPU')} (CUDA {dev.get('cuda_version')})" if dev.get("cuda") else "CPU (no CUDA)"
    lines = [
        "# GPU check",
        "",
        f"- device: {where}; torch {dev.get('torch', '?')}; {report['cpus']} CPUs; python {report['python']}",
        f"- sizes: {'tiny' if report['tiny'] else 'full'}; budget {report['budget_s']:.0f} s; wall time "
        f"{report['wall_s']:.1f} s; started {report['started']}; commit {report['commit']}",
        f"- libraries: {', '.join(f'{k} {v}' for k, v in report['versions'].items())}",
        "",
        "| step | status | time (s) | figures | ratios | checks | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in report["steps"]:
        figures = "<br>".join(f"{k} = {fmt(v)}" for k, v in e["figures"].items())
        ratios = "<br>".join(f"{r['name']} = {fmt(r['value'])}" for r in e["ratios"])
        checks = "<br>".join(f"{k} = {fmt(v)}" for k, v in e["checks"].items())
        why = [f"**{e['error']}**"] if "error" in e else [e["reason"]] if "reason" in e else []
        notes = "<br>".join([*why, *e["notes"], *(f"{k}: {v}" for k, v in e["details"].items())]).replace("|", "/")
        lines.append(
            f"| {e['name']}: {e['title']} | {e['status']} | {e.get('seconds', 0.0):.1f} | {figures} | {ratios} | "
            f"{checks} | {notes} |"
        )
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> None:
    for name, text in (("report.json", json.dumps(report, indent=2) + "\n"), ("report.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def entry(step: Step, status: str, **fields: Any) -> dict[str, Any]:
    return {"name": step.name, "title": step.title, **empty_record(), "seconds": 0.0, **fields, "status": status}


def run_all(args: argparse.Namespace, out: Path, work: Path) -> int:
    size = TINY if args.tiny else FULL
    limits = {**size.limits, **args.limit}
    t_start = time.perf_counter()
    deadline = t_start + args.budget
    report: dict[str, Any] = {
        "script": "benchmarks/gpu_check.py", "tiny": args.tiny, "budget_s": args.budget,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "wall_s": 0.0,
        "python": platform.python_version(), "cpus": os.cpu_count(), "commit": git_commit(), "versions": versions(),
        "device": {}, "steps": [],
    }  # fmt: skip
    probe = run_step(PROBE, args, work, min(60.0, args.budget), out / "device.log")
    report["device"] = probe["details"] | ({"probe_error": probe["error"]} if "error" in probe else {})
    cuda = probe["details"].get("cuda")  # None: the probe failed; each step checks for itself
    where = f"{report['device'].get('gpu')} (CUDA)" if cuda else "no CUDA" if cuda is False else "device unknown"
    print(f"gpu_check: {where}, torch {report['device'].get('torch', '?')}, {'tiny' if args.tiny else 'full'} sizes")
    print(f"{'step':<17} {'status':<8} {'time':>8}  figures | ratios | checks")
    todo = list(STEPS)
    try:
        while todo:
            step = todo.pop(0)
            left = deadline - time.perf_counter()
            if step.name not in args.steps:
                record = entry(step, "skipped", reason="not selected (--steps)")
            elif step.needs_cuda and cuda is False:
                record = entry(step, "skipped", reason="no CUDA")
            elif left < 5:
                record = entry(step, "skipped", reason=f"not run: the budget of {args.budget:.0f} s was spent")
            else:
                limit = min(limits[step.name], left)
                record = {"name": step.name, "title": step.title, "limit_s": limit}
                record |= run_step(step, args, work, limit, out / f"{step.name}.log")
                record["log"] = f"{step.name}.log"
            report["steps"].append(record)
            report["wall_s"] = time.perf_counter() - t_start
            write_report(out, report)
            print(summary_line(record), flush=True)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what was measured stays in the report
        if not report["steps"] or report["steps"][-1]["name"] != step.name:
            report["steps"].append(entry(step, "failed", error="stopped (Ctrl-C or SIGTERM) while it ran"))
        report["steps"] += [entry(s, "skipped", reason="not run: stopped") for s in todo]
        report["wall_s"] = time.perf_counter() - t_start
        write_report(out, report)
        print(f"stopped; report: {out / 'report.json'}")
        return 130
    print(f"report: {out / 'report.json'}, {out / 'report.md'} ({report['wall_s']:.0f} s)")
    return 0


def limit_arg(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in {s.name for s in STEPS} or not seconds:
        raise argparse.ArgumentTypeError(f"expected STEP=SECONDS with STEP one of {', '.join(s.name for s in STEPS)}")
    return name, float(seconds)


def raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    names = [s.name for s in STEPS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_report"), help="report folder (%(default)s)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, CPU-friendly: what the test suite runs")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all steps (default 470; tiny 900)")
    parser.add_argument("--steps", default=",".join(names), help="comma-separated steps to run (default all)")
    parser.add_argument("--limit", type=limit_arg, action="append", default=[], metavar="STEP=SECONDS",
                        help="another time limit for a step")  # fmt: skip
    parser.add_argument("--fail-step", action="append", default=[], choices=names, help="for the tests: STEP raises")
    parser.add_argument("--hang-step", action="append", default=[], choices=names, help="for the tests: STEP hangs")
    parser.add_argument("--child", choices=list(BY_NAME), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.result, args.tiny, args.fail_step, args.hang_step)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := [s for s in args.steps if s not in names]:
        parser.error(f"--steps: unknown {', '.join(unknown)}; the steps are {', '.join(names)}")
    args.limit = dict(args.limit)
    args.budget = args.budget or (900.0 if args.tiny else 470.0)
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        return run_all(args, args.out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
