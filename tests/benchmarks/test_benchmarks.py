"""The benchmark scripts run, at a tiny size, so that they cannot rot: a script the suite never runs breaks unnoticed."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers.runs import REPO, env_for


def test_online_monitor_cost_prints_both_times_and_their_ratio(tmp_path) -> None:
    env = env_for()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "online_monitor_cost.py"), "--tiny"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    epoch = float(re.search(r"^epoch \(training only, median\): +([\d.]+) s$", out, re.M).group(1))
    evaluation = float(re.search(r"^evaluation \(median\): +([\d.]+) s$", out, re.M).group(1))
    ratio = float(re.search(r"^ratio evaluation / epoch: +([\d.]+)%$", out, re.M).group(1))
    assert epoch > 0 and evaluation > 0
    assert abs(ratio - 100 * evaluation / epoch) < 0.05 * ratio + 0.5, out  # the ratio of the two printed times (rounded)
    assert "monitor: 64 train / 32 test items" in out and "1 thread(s)" in out


@pytest.mark.slow  # a local Ray and a Ray Train job
def test_data_parallel_prints_both_layouts_their_ratio_and_the_start_up_cost(tmp_path) -> None:
    env = env_for()
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "data_parallel.py"), "--tiny"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    one = float(re.search(r"^1 worker x 2 threads: +([\d.]+) img/s$", out, re.M).group(1))
    two = float(re.search(r"^2 workers x 1 thread: +([\d.]+) img/s$", out, re.M).group(1))
    ratio = float(re.search(r"^ratio 2 workers / 1 worker: ([\d.]+)$", out, re.M).group(1))
    assert one > 0 and two > 0 and abs(ratio - two / one) <= 0.01 + two * 0.05 / one**2, out  # the figures are printed to 0.1
    assert re.search(r"^Ray Train start-up, 2 workers \(empty job on a running local Ray\): [\d.]+ s  \(starting the local Ray: [\d.]+ s\)$", out, re.M), out


def test_streamed_throughput_prints_both_pipelines_their_ratio_and_decode_rates(tmp_path) -> None:
    env = env_for()
    folder = tmp_path / "jpegs"
    cmd = [sys.executable, str(REPO / "benchmarks" / "streamed_throughput.py"), "--tiny", "--folder", str(folder)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    harness = float(re.search(r"^harness  .* ([\d.]+)$", out, re.M).group(1))
    peer = float(re.search(r"^peer  .* ([\d.]+)$", out, re.M).group(1))
    ratio = float(re.search(r"^ratio harness / peer: ([\d.]+)$", out, re.M).group(1))
    assert harness > 0 and peer > 0 and abs(ratio - harness / peer) < 0.01 * ratio + 0.002, out  # the ratio of the two printed figures (rounded)
    for line in ("harness crop_views", "PIL full decode", "peer per-image work"):
        assert float(re.search(rf"^  {line} .*: +([\d.]+)$", out, re.M).group(1)) > 0, out
    assert len(list((folder / "train").rglob("*.jpg"))) == 64 and "64 JPEGs of 64x64 px" in out and "test_resnet" in out, out
