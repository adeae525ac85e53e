"""Exact maximum-inner-product search: the only module that imports faiss.

Everything else in the harness calls :func:`inner_product_topk`; swapping the
backend (or its GPU path) happens here and nowhere else.

Reference: Johnson, Douze & Jégou, "Billion-scale similarity search with GPUs"
(2017), the faiss library. Exact (brute-force) search only: ``IndexFlatIP``
semantics, no approximation.

Where the search runs: faiss on the CPU by default; inside ``with on_device(device)``
(the battery of a trial on a GPU), a faiss GPU index when faiss has GPU support, else
chunked ``matmul`` + ``topk`` in torch on that device (the same neighbours as faiss on
the CPU, up to the order of exactly tied similarities; logged once).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterator

import faiss
import numpy as np
import torch

__all__ = ["GPU_MAX_K", "gpu_available", "inner_product_topk", "on_device"]

log = logging.getLogger(__name__)

_device: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar("search_device", default=None)
_announced: list[str] = []  # the torch fallback is logged once per process
_TORCH_BUDGET = 1 << 28
"""Similarities per torch matmul block (1 GiB of float32): bounds the (queries, database) block."""


@contextlib.contextmanager
def on_device(device: str | torch.device | None) -> Iterator[None]:
    """Searches inside the block run on ``device`` (a CUDA device: faiss's GPU index, or torch's matmul + topk
    when faiss has no GPU support; the CPU or None: faiss on the CPU)."""
    token = _device.set(torch.device(device) if device is not None else None)
    try:
        yield
    finally:
        _device.reset(token)


def _torch_topk(
    database: np.ndarray, queries: np.ndarray, k: int, device: torch.device, out: tuple[np.ndarray, np.ndarray]
) -> None:
    """Exact top-k inner products by blocks of ``queries @ database.T`` and ``torch.topk`` on ``device``, into
    ``out``."""
    db = torch.from_numpy(np.ascontiguousarray(database, dtype=np.float32)).to(device)
    rows = max(1, _TORCH_BUDGET // db.shape[0])
    for start in range(0, queries.shape[0], rows):
        q = torch.from_numpy(np.ascontiguousarray(queries[start : start + rows], dtype=np.float32)).to(device)
        sims, idx = torch.topk(q @ db.T, k, dim=1, largest=True, sorted=True)
        out[0][start : start + rows] = sims.cpu().numpy()
        out[1][start : start + rows] = idx.cpu().numpy()


#: Largest k the faiss GPU brute-force kernels support; larger k runs on CPU.
GPU_MAX_K = 2048

_gpu_lock = threading.Lock()
_gpu_resources: faiss.StandardGpuResources | None = None  # created lazily once per process

_Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
"""``search(queries_f32, k) -> (similarities, indices)``."""


def gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    if not (hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "GpuIndexFlatIP")):
        return False
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    if get_num_gpus is None:
        return False
    try:
        return int(get_num_gpus()) > 0
    except Exception:  # noqa: BLE001 - a broken CUDA install reports as "no GPU", never crashes an eval
        return False


def check_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """Validate a 2-D finite float matrix (any float dtype); returns it as an ndarray, uncopied."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, dim), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be a numeric array, got dtype {x.dtype}")
    # All-finite test without an (n, dim) temporary: a float64 sum of float32/fp16
    # values cannot overflow, so it is non-finite iff some entry is NaN or +-inf.
    if x.size and not np.isfinite(np.sum(x, dtype=np.float64)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _get_gpu_resources() -> faiss.StandardGpuResources:
    global _gpu_resources
    with _gpu_lock:
        if _gpu_resources is None:
            _gpu_resources = faiss.StandardGpuResources()
        return _gpu_resources


def _make_searcher(database: np.ndarray, on_gpu: bool) -> _Search:
    """Return ``search(queries_f32, k) -> (D, I)`` over ``database`` (contiguous float32)."""
    dim = database.shape[1]
    if on_gpu:
        config = faiss.GpuIndexFlatConfig()
        config.device = 0
        gpu_index = faiss.GpuIndexFlatIP(_get_gpu_resources(), dim, config)
        gpu_index.add(database)  # copied to the GPU once; queries stream in chunks
        return gpu_index.search
    if hasattr(faiss, "knn") and hasattr(faiss, "METRIC_INNER_PRODUCT"):
        # Same kernel as IndexFlatIP.search (knn_inner_product) without copying
        # the database into an index.
        return lambda q, k: faiss.knn(q, database, k, metric=faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexFlatIP(dim)
    index.add(database)
    return index.search


def inner_product_topk(
    database: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    chunk_size: int = 4096,
    use_gpu: bool | None = None,
    backend: str = "faiss",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum-inner-product search (faiss ``IndexFlatIP`` semantics).

    Args:
        database: (N, D) float array (fp16/fp32/fp64 accepted; searched as float32).
        queries: (Q, D) float array.
        k: neighbours per query, >= 1; clipped to N.
        chunk_size: queries per faiss call (bounds the (chunk, k) outputs and,
            on CPU, the float32 copy of fp16/fp64 queries).
        use_gpu: None = GPU when :func:`gpu_available`; True = require a GPU
            (RuntimeError otherwise); False = CPU. With k > ``GPU_MAX_K`` (2048)
            the search always runs on CPU. Inside :func:`on_device` with a CUDA device, None means
            that device: faiss's GPU index, or torch's matmul when faiss has no GPU support.
        backend: ``faiss``, or ``torch`` (matmul + topk on the :func:`on_device` device, the CPU by
            default): the path a GPU without faiss GPU support takes, selectable to test it.

    Returns:
        (similarities float32 (Q, min(k, N)), indices int64 (Q, min(k, N))),
        best first. The order among exactly tied similarities is faiss's, unspecified.
    """
    database = check_matrix(database, "database")
    queries = check_matrix(queries, "queries")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if use_gpu not in (None, True, False):
        raise ValueError(f"use_gpu must be None, True or False, got {use_gpu!r}")
    n_db, dim = database.shape
    if n_db == 0:
        raise ValueError("database must have at least one row")
    if dim == 0:
        raise ValueError("database must have at least one column")
    if queries.shape[1] != dim:
        raise ValueError(f"queries has dimension {queries.shape[1]} but database has dimension {dim}")

    k = int(min(int(k), n_db))
    n_q = queries.shape[0]
    similarities = np.empty((n_q, k), dtype=np.float32)
    indices = np.empty((n_q, k), dtype=np.int64)
    if n_q == 0:
        return similarities, indices

    device = _device.get()
    cuda = device is not None and device.type == "cuda"
    if backend not in ("faiss", "torch"):
        raise ValueError(f"backend must be 'faiss' or 'torch', got {backend!r}")
    if backend == "faiss" and cuda and use_gpu is not False and not (gpu_available() and k <= GPU_MAX_K):
        if not _announced:
            log.info("kNN search: faiss has no GPU support here; exact matmul + topk in torch on %s", device)
            _announced.append(str(device))
        backend = "torch"
    if backend == "torch":
        _torch_topk(
            database, queries, k, device if device is not None else torch.device("cpu"), (similarities, indices)
        )
        return similarities, indices
    if use_gpu is True and not gpu_available():
        raise RuntimeError(
            "use_gpu=True but faiss has no usable GPU (install faiss-gpu and check "
            "that a CUDA device is visible), or pass use_gpu=None to fall back to CPU"
        )
    on_gpu = (use_gpu is not False) and gpu_available() and k <= GPU_MAX_K

    search = _make_searcher(np.ascontiguousarray(database, dtype=np.float32), on_gpu)
    for start in range(0, n_q, int(chunk_size)):
        stop = min(start + int(chunk_size), n_q)
        chunk = np.ascontiguousarray(queries[start:stop], dtype=np.float32)
        dist, idx = search(chunk, k)
        similarities[start:stop] = dist
        indices[start:stop] = idx
    return similarities, indices
