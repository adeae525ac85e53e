"""The rest of the benchmark scripts run at a tiny size (``--tiny``), so that none can rot: each test runs one in a
subprocess, parses the figures it prints and checks that they are numbers in range and that every printed ratio is
the ratio of the printed figures, within the rounding of the three numbers (tests/benchmarks/test_benchmarks.py has the others)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import REPO, env_for

NUMBER = r"([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
"""A printed number, kept as text so that its rounding is known."""


def run_script(tmp_path: Path, name: str, *args: str, timeout: int = 300) -> str:
    env = env_for()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def figure(pattern: str, out: str) -> str:
    """The one printed number ``NUMBER`` in the line matching ``pattern``, as printed."""
    match = re.search(pattern, out, re.M)
    assert match, f"no line matches {pattern!r} in:\n{out}"
    return match.group(1)


def half_unit(text: str) -> float:
    """Half a unit in the last printed digit of ``text``: how far the value printed may be from the value computed."""
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def ratio_of(ratio: str, numerator: str, denominator: str, scale: float = 1.0) -> bool:
    """Whether the printed ``ratio`` is ``scale * numerator / denominator`` for some values that print as these three."""
    num, den, r = float(numerator), float(denominator), float(ratio)
    dn, dd, dr = half_unit(numerator), half_unit(denominator), half_unit(ratio)
    assert den - dd > 0, f"the denominator {denominator} is too small to check a ratio against"
    low, high = scale * (num - dn) / (den + dd), scale * (num + dn) / (den - dd)
    return low - dr - 1e-9 <= r <= high + dr + 1e-9


def test_ratio_of_accepts_rounding_only() -> None:
    assert ratio_of("0.500", "50.0", "100.0") and ratio_of("0.501", "50.0", "100.0")  # 50.05 / 99.95 = 0.5008
    assert not ratio_of("0.503", "50.0", "100.0")
    assert ratio_of("2.00", "0.002", "0.001") and ratio_of("3.00", "0.002", "0.001")  # 0.0025 / 0.0005 = 5: rounding dominates
    assert ratio_of("12.3", "0.123", "1.000", scale=100) and not ratio_of("12.5", "0.123", "1.000", scale=100)
    assert half_unit("1.2e-05") == 0.5e-6 and half_unit("1235") == 0.5


def test_pretrain_throughput_prints_raw_harness_peer_and_their_ratios(tmp_path) -> None:
    out = run_script(tmp_path, "pretrain_throughput.py", "--tiny", "--peer")
    raw = figure(rf"^raw timm forward\+backward \(2x32 pre-made tensors\): +{NUMBER} images/s$", out)
    full = figure(rf"^harness full step .*: +{NUMBER} images/s$", out)
    ratio = figure(rf"^ratio full / raw: {NUMBER} ", out)
    assert float(raw) > 0 and float(full) > 0 and ratio_of(ratio, full, raw), out
    peer = figure(rf"^peer \(transforms\.v2 per image in 1 DataLoader worker\(s\), then the same step\): +{NUMBER} images/s$", out)
    assert float(peer) > 0 and ratio_of(figure(rf"^ratio harness / peer: {NUMBER}$", out), full, peer), out
    if torch.cuda.is_available():  # the script runs on CUDA too (device auto): the bf16 + channels_last limit is measured
        bf16 = figure(rf"^raw timm bf16 autocast \+ channels_last \(2x32 pre-made tensors\): +{NUMBER} images/s$", out)
        assert float(bf16) > 0 and ratio_of(figure(rf"^ratio full / raw bf16\+channels_last: {NUMBER} ", out), full, bf16), out
    else:
        assert "raw timm bf16 autocast + channels_last: skipped (CUDA only; no CUDA)" in out, out
        assert "ratio full / raw bf16+channels_last: skipped (no CUDA)" in out, out
    assert "backbone test_resnet  cifar_stem False  image 16px  batch 32  threads 1" in out, out


def test_pretrain_throughput_profile_groups_one_step_into_its_parts(tmp_path) -> None:
    out = run_script(tmp_path, "pretrain_throughput.py", "--tiny", "--profile", "--top", "8")
    parts = {p: figure(rf"^  {p} +{NUMBER} +[\d.]+%$", out) for p in ("augmentation", "forward", "loss", "backward", "optimiser", "other")}
    total = figure(rf"^  total +{NUMBER} +100\.0%$", out)
    for part in ("augmentation", "forward", "loss", "backward", "optimiser"):  # each labelled: none may fall into "other"
        assert float(parts[part]) > 0, out
    assert abs(sum(float(v) for v in parts.values()) - float(total)) <= 6 * 0.005 + 0.005, out
    for part, ms in parts.items():
        assert ratio_of(figure(rf"^  {part} +[\d.]+ +{NUMBER}%$", out), ms, total, scale=100), out
    ops = re.findall(r"^  (\S.*?) +(augmentation|forward|loss|backward|optimiser|other) +\d+ +([\d.]+) +[\d.]+%$", out, re.M)
    assert len(ops) == 8 and {part for _, part, _ in ops} >= {"forward", "backward"}, out
    assert [float(ms) for *_, ms in ops] == sorted((float(ms) for *_, ms in ops), reverse=True), out
    assert float(figure(rf"^step wall time .*: {NUMBER} ms$", out)) > 0, out


@pytest.mark.slow  # two local Ray start-ups and MLflow's first database: over a minute on a busy 2-core machine (4 min once)
def test_sweep_overhead_prints_both_levels_and_their_overheads(tmp_path) -> None:
    out = run_script(tmp_path, "sweep_overhead.py", "--tiny", timeout=600)
    line = re.search(rf"^tune     2 trials: {NUMBER} s/trial in Tune, {NUMBER} ms/trial in a loop -> overhead {NUMBER} s/trial$", out, re.M)
    assert line, out
    tune, loop_ms, overhead = line.groups()
    assert float(tune) > 0 and float(loop_ms) >= 0, out  # the loop computes a float per trial: a microsecond may print as 0.000 ms
    assert abs(float(overhead) - (float(tune) - float(loop_ms) / 1e3)) <= half_unit(overhead) + half_unit(tune) + half_unit(loop_ms) / 1e3, out
    line = re.search(rf"^harness  2 trials: {NUMBER} s/trial as a sweep, {NUMBER} s/trial with `run` in a loop -> overhead {NUMBER} s/trial \(goal <= 3 s\)$", out, re.M)
    assert line, out
    sweep, loop, overhead = line.groups()
    assert float(sweep) > 0 and float(loop) > 0, out
    assert abs(float(overhead) - (float(sweep) - float(loop))) <= half_unit(overhead) + half_unit(sweep) + half_unit(loop), out


def test_eval_speed_prints_knn_times_their_speed_up_and_the_linear_probe(tmp_path) -> None:
    out = run_script(tmp_path, "eval_speed.py", "--tiny")
    assert "data: train (5000, 128), test (500, 128), 10 classes" in out, out
    ours = figure(rf"^knn   faiss knn_classify \(k=20, T=0.07\): +{NUMBER} s   top1 [\d.]+$", out)
    theirs = figure(rf"^knn   sklearn brute cosine \(k=20\): +{NUMBER} s   top1 [\d.]+$", out)
    speed_up = figure(rf"^knn   speed-up {NUMBER}x \(goal >= 3x\); predictions agree on [\d.]+%$", out)
    assert float(ours) > 0 and float(theirs) > 0 and ratio_of(speed_up, theirs, ours), out
    for top1 in re.findall(r"top1 ([\d.]+)", out):
        assert 0 < float(top1) <= 1, out  # 10 classes, a class-mean signal: far above 0
    assert 0.5 <= float(figure(rf"predictions agree on {NUMBER}%$", out)) <= 100, out
    assert float(figure(rf"^linear one fit, 2 epochs, batch 256, wd 1e-4: +{NUMBER} s ", out)) > 0, out
    assert float(figure(rf"^linear default grid .*: +{NUMBER} s   chosen wd ", out)) > 0, out


def test_learning_curve_prints_the_baselines_and_every_epoch(tmp_path) -> None:
    out = run_script(tmp_path, "learning_curve.py", str(REPO / "configs" / "simclr_shapes.yaml"), "--tiny")
    baselines = dict(re.findall(r"'baseline/([\w/]+)/knn_top1': ([\d.]+)", figure(r"^baselines: (\{.*\})$", out)))
    assert set(baselines) == {"raw_pixels", "random_init"} and all(0 < float(v) <= 1 for v in baselines.values()), out
    epochs = re.findall(rf"^epoch +(\d+)  loss {NUMBER}  knn_top1 {NUMBER} +{NUMBER} s$", out, re.M)
    assert [int(e) for e, *_ in epochs] == [1, 2], out
    for _, loss, top1, _ in epochs:
        assert 0 < float(loss) < math.log(2 * 32) + 1 and 0 < float(top1) <= 1, out  # NT-Xent of batch 32: below log(2B - 1) at chance
    assert 0 < float(epochs[0][3]) <= float(epochs[1][3]), out  # wall time since training started


def test_swav_probe_prints_the_dynamics_every_two_steps(tmp_path) -> None:
    out = run_script(tmp_path, "swav_probe.py", "--tiny")
    pattern = (
        rf"^step +(\d+)  loss {NUMBER}  projections cos {NUMBER}  prototypes cos {NUMBER}  score spread {NUMBER}"
        rf"  H\(codes\) {NUMBER}  H\(predictions\) {NUMBER}  \(log K {NUMBER}\)$"
    )
    steps = re.findall(pattern, out, re.M)
    assert [int(s[0]) for s in steps] == [0, 2, 4, 6], out  # 2 epochs of 128 // 32 = 4 steps, every 2
    for _, loss, z_cos, p_cos, spread, h_codes, h_pred, log_k in steps:
        assert float(log_k) == round(math.log(100), 2), out  # 100 prototypes
        assert float(loss) > 0 and -1 <= float(z_cos) <= 1 and -1 <= float(p_cos) <= 1 and float(spread) > 0, out
        assert 0 < float(h_codes) <= float(log_k) + 0.01 and 0 < float(h_pred) <= float(log_k) + 0.01, out
