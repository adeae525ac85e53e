"""Checkpoints: written atomically, read without running code, and refused when they belong to another experiment."""

from __future__ import annotations

import errno
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from core.errors import BadInput
from harness.config.loading import flatten
from harness.config.schema import RunConfig
from methods.base import Method

#: Keys that may differ between a checkpoint's config and the config resuming from it.
RESUMABLE_DIFFERENCES = (
    "pretrain.resume",
    "pretrain.compile",
    "pretrain.checkpoint_dir",
    "pretrain.progress",
    "tracking.",
    "eval.",
    "device",
    "distributed.",
)


def save_checkpoint(
    path: Path,
    method: Method,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    losses: list[float],
    cfg: RunConfig,
    provenance: dict[str, Any],
    timing: dict[str, float] | None = None,
) -> None:
    """Write weights, optimiser state, epoch, resolved config, provenance and the totals so far (``timing``: seconds
    and images, which a resumed run continues) atomically (tmp + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "losses": list(losses),
        "config": cfg.as_dict(),
        "provenance": {k: str(v) for k, v in provenance.items()},
        "timing": {k: float(v) for k, v in (timing or {}).items()},
    }
    for stale in path.parent.glob(f".{path.name}.tmp.*"):  # left by a process killed while saving
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as err:  # a failed or interrupted save leaves the last complete checkpoint, no temporary file
        tmp.unlink(missing_ok=True)
        if isinstance(err, Exception) and _disk_full(err):
            free = shutil.disk_usage(path.parent).free / 2**20
            raise OSError(
                errno.ENOSPC,
                f"no space left on the disk of {path.parent} while writing the checkpoint of epoch {epoch} "
                f"({free:.0f} MB free; the checkpoint of the epoch before is kept): free some space, or set "
                "pretrain.checkpoint_dir to a disk with room",
            ) from None
        raise


def _disk_full(err: Exception) -> bool:
    """Whether a failed save ran out of disk: an OSError ENOSPC (or a quota), or PyTorch's zip writer failing with
    ``unexpected pos``, which is how a short write on a full disk reaches it."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(err, RuntimeError) and "unexpected pos" in str(err)


def read_checkpoint(path: Path, cfg: RunConfig | None = None, key: str = "pretrain.resume") -> dict[str, Any]:
    """A checkpoint's contents (``weights_only=True``: a file that would run code on loading is refused).

    BadInput naming ``key`` for a missing or unreadable file; when ``cfg`` is given, the checkpoint's
    config must match it except for the keys in :data:`RESUMABLE_DIFFERENCES`, otherwise resuming
    would silently continue a different experiment.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{key}: checkpoint {path} not found")
    try:
        with warnings.catch_warnings():  # a plain pickle warns of its protocol on stderr before being refused
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same bad input
        raise BadInput(f"{key}: {path} is not a readable checkpoint ({type(err).__name__})") from None
    if cfg is not None:
        _check_same_experiment(state["config"], cfg, path)
    return dict(state)


def load_checkpoint(
    path: Path, method: Method, optimizer: torch.optim.Optimizer | None, cfg: RunConfig | None
) -> tuple[int, list[float], dict[str, float]]:
    """Load a checkpoint (:func:`read_checkpoint`) into ``method`` (and ``optimizer``); return (epoch, losses, the
    timing totals so far: empty for a checkpoint written before they were kept)."""
    state = read_checkpoint(path, cfg)
    method.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    timing = {k: float(v) for k, v in state.get("timing", {}).items()}
    return int(state["epoch"]), [float(x) for x in state["losses"]], timing


def _check_same_experiment(saved: dict[str, Any], cfg: RunConfig, path: Path) -> None:
    """BadInput naming the first key whose value differs; a key the checkpoint's config lacks (written before the key
    existed) counts as the schema's default then, so an old checkpoint resumes when the new key is left at it."""
    old, new = flatten(saved), flatten(cfg.as_dict())
    defaults = flatten(RunConfig().as_dict())
    for k in new.keys() - old.keys():
        if k in defaults:
            old[k] = defaults[k]
    differ = sorted(
        k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_DIFFERENCES)
    )
    if differ:
        k = differ[0]
        raise BadInput(
            f"pretrain.resume: {path} was trained with {k}={old.get(k)!r}, "
            f"this config has {new.get(k)!r} ({len(differ)} key(s) differ)"
        )
