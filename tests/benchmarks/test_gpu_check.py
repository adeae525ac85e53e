"""benchmarks/gpu_check.py at its tiny size: the report holds every step with a status, the CUDA-only steps are
skipped here without CUDA, every figure of a step that ran is a finite positive number and every ratio, recorded and
printed, is the ratio of its two figures; a step that fails or hangs is recorded as failed in one line while the others
still run."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import REPO, env_for

STEPS = ["throughput", "eval_vs_pretrain", "nccl_sync_bn", "compile", "faiss_gpu_knn"]
CUDA_ONLY = {"nccl_sync_bn", "faiss_gpu_knn"}
SLOTS = ("resnet18", "resnet50", "vit_small")


def run_check(tmp_path: Path, *args: str) -> tuple[str, dict, Path]:
    out = tmp_path / "report"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env_for(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "report.md").is_file(), proc.stdout
    return proc.stdout, json.loads((out / "report.json").read_text()), out


def printed(out: str, name: str) -> tuple[str, dict[str, str]]:
    """The status of step ``name`` in the printed table, and its ``key=value`` figures, ratios and checks as printed."""
    match = re.search(rf"^{name} +(ok|failed|skipped) +[\d.]+ s  (.*)$", out, re.M)
    assert match, f"no line for {name} in:\n{out}"
    return match.group(1), dict(re.findall(r"(\S+)=(\S+)", match.group(2)))


def half_unit(text: str) -> float:
    """Half a unit in the last printed digit of ``text``."""
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def ratio_of(ratio: str, numerator: str, denominator: str) -> bool:
    """Whether the printed ``ratio`` is ``numerator / denominator`` for some values that print as these three."""
    num, den, r = float(numerator), float(denominator), float(ratio)
    dn, dd, dr = half_unit(numerator), half_unit(denominator), half_unit(ratio)
    return (num - dn) / (den + dd) - dr - 1e-12 <= r <= (num + dn) / (den - dd) + dr + 1e-12


def test_ratio_of_accepts_rounding_only() -> None:
    assert ratio_of("0.5", "50", "100") and ratio_of("0.5005", "50.05", "100") and not ratio_of("0.503", "50.0", "100.0")
    assert ratio_of("1.234e+04", "1.234e+04", "1") and half_unit("1.234e+04") == 5


def check_ran(step: dict, line: dict[str, str]) -> None:
    """Every figure finite and positive; every ratio, recorded and printed, the ratio of its two figures."""
    figures = step["figures"]
    assert figures and step["ratios"], step
    for name, value in figures.items():
        assert math.isfinite(value) and value > 0, (name, value)
        assert float(line[name]) == pytest.approx(value, rel=1e-3), (name, line)
    for ratio in step["ratios"]:
        assert ratio["value"] == pytest.approx(figures[ratio["of"]] / figures[ratio["to"]], rel=1e-12), ratio
        assert ratio_of(line[ratio["name"]], line[ratio["of"]], line[ratio["to"]]), (ratio, line)


@pytest.mark.slow  # five steps, each in a process of its own that imports torch: a minute or more on 2 busy cores
def test_every_step_is_reported_and_every_ratio_is_that_of_its_figures(tmp_path) -> None:
    out, report, folder = run_check(tmp_path)
    assert [s["name"] for s in report["steps"]] == STEPS, report
    cuda = torch.cuda.is_available()
    assert report["device"]["cuda"] is cuda and report["tiny"] is True
    for step in report["steps"]:
        status, line = printed(out, step["name"])
        assert status == step["status"], (step, out)
        assert (folder / f"{step['name']}.log").is_file() or step["status"] == "skipped"
        if step["name"] in CUDA_ONLY and not cuda:
            assert step["status"] == "skipped" and step["reason"] == "no CUDA", step
            continue
        if step["name"] == "faiss_gpu_knn" and step["status"] == "skipped":  # CUDA, but a faiss without GPU support
            assert "faiss" in step["reason"], step
            continue
        if step["name"] == "compile" and step["status"] == "skipped":  # the harness's own check of what compile needs
            assert step["reason"].startswith("torch.compile needs"), step
            continue
        assert step["status"] == "ok", step
        check_ran(step, line)
    steps = {s["name"]: s for s in report["steps"]}
    kinds = {f"{slot}.{kind}_img_s" for slot in SLOTS for kind in ("harness", "limit")}
    assert set(steps["throughput"]["figures"]) == kinds, steps["throughput"]
    assert steps["compile"]["status"] == "skipped" or set(steps["compile"]["figures"]) == {"eager_img_s", "compiled_img_s", "eager_first_step_s", "compiled_first_step_s"}
    assert set(steps["eval_vs_pretrain"]["figures"]) == {"pretrain_s", "eval_s"}
    if not cuda:
        assert any("no bf16 on this device" in n for n in steps["throughput"]["notes"]), steps["throughput"]
    else:
        assert steps["nccl_sync_bn"]["checks"]["max_rel_loss_diff"] <= 1e-3, steps["nccl_sync_bn"]
    assert "| throughput: " in (folder / "report.md").read_text()


@pytest.mark.slow  # the hanging step waits out its 5 s limit; the others run as above
def test_a_failing_and_a_hanging_step_are_recorded_in_one_line_and_the_others_still_run(tmp_path) -> None:
    out, report, _ = run_check(tmp_path, "--fail-step", "throughput", "--hang-step", "compile", "--limit", "compile=5")
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == STEPS, report
    failed, hung = steps["throughput"], steps["compile"]
    assert failed["status"] == "failed" and failed["error"] == "CheckFailed: made to fail by --fail-step throughput"
    assert hung["status"] == "failed" and hung["error"].startswith("timed out after 5 s"), hung
    assert 5 <= hung["seconds"] < 45 and hung["notes"] == ["made to hang by --hang-step compile"], hung
    for step in (failed, hung):
        assert "\n" not in step["error"] and printed(out, step["name"])[0] == "failed"
        assert f"error: {step['error']}" in out
    ran = steps["eval_vs_pretrain"]
    assert ran["status"] == "ok", ran
    check_ran(ran, printed(out, "eval_vs_pretrain")[1])
    if not torch.cuda.is_available():
        assert all(steps[name]["reason"] == "no CUDA" for name in CUDA_ONLY), report
