"""What a run records about where it came from: git commit, library versions, peak memory."""

from __future__ import annotations

import functools
import gc
import platform
import resource
import subprocess
import sys
from importlib import metadata
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
_LIBRARIES = ("torch", "torchvision", "timm", "faiss-cpu", "faiss-gpu", "mlflow", "ray", "numpy")


@functools.cache
def git_commit() -> str:
    """The commit the harness runs from, with ``-dirty`` when the tree has changes; ``unknown`` outside git.
    ``results/`` is left out: it holds the tables runs generate, not code that makes numbers."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
            cwd=_REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


@functools.cache
def library_versions() -> dict[str, str]:
    """Versions of the libraries that change numbers, plus Python's."""
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def machine() -> dict[str, str]:
    """The processor a run computed on: the same code, data and seed give other numbers on another CPU model (its
    math kernels round differently, and training amplifies the difference), so results are reproduced per model."""
    info = {"cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch

        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # the kernels torch picks: AVX2, ...
    except (ImportError, AttributeError):
        pass
    return info


def reset_peak_rss() -> str:
    """Reset this process's high-water mark of resident memory to what it holds now, so that :func:`peak_rss_mb`
    measures from here (a sweep's trial in a reused worker process). Returns how the peak is measured: on Linux
    ``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``; elsewhere the process's peak since it started."""
    gc.collect()  # what the previous trial left for the collector is not this trial's
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM of the trial's process, reset at the trial's start (/proc/self/clear_refs)"
    except OSError:
        return "the process's peak since it started (ru_maxrss; no /proc/self/clear_refs here)"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    On Linux the high-water mark of this process's own memory (``VmHWM``): ``ru_maxrss`` keeps the peak of the
    process that started it across ``fork`` + ``exec``, so a run started by a large parent would report the
    parent's peak. Elsewhere ``ru_maxrss`` (macOS reports bytes).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
