"""Input validation shared by the evaluations: one place, one wording for bad embeddings.

Every evaluation takes cached embeddings as numpy arrays or torch tensors. The
checks here turn them into float32 numpy arrays and fail with a one-line
``ValueError`` that names the evaluation, the bad value and what is accepted:

    >>> import numpy as np
    >>> from evaluations.checks import check_features, remap_labels
    >>> x, y = check_features(np.ones((4, 2)), np.array([3, 7, 7, 3]), evaluation="linear probe")
    >>> x.dtype, y.tolist()
    (dtype('float32'), [3, 7, 7, 3])
    >>> (train_y, test_y), num_classes = remap_labels(np.array([3, 7, 7]), np.array([9]))
    >>> train_y.tolist(), test_y.tolist(), num_classes
    ([0, 1, 1], [2], 3)
"""

from __future__ import annotations

from typing import Any, overload

import numpy as np

__all__ = ["as_numpy", "check_features", "remap_labels"]


def as_numpy(x: Any) -> np.ndarray:
    """A numpy view/copy of ``x``: torch tensors are detached and moved to the CPU (bf16 -> float32)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    return np.asarray(x)


@overload
def check_features(x: Any, y: None = None, *, evaluation: str) -> np.ndarray: ...
@overload
def check_features(x: Any, y: Any, *, evaluation: str) -> tuple[np.ndarray, np.ndarray]: ...


def check_features(x: Any, y: Any = None, *, evaluation: str) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Validate embeddings (and labels) for ``evaluation``; return them as numpy arrays.

    Args:
        x: (N, D) embeddings, numpy array or torch tensor, any real dtype.
        y: optional (N,) labels (any dtype ``np.unique`` can sort).
        evaluation: name used in error messages, e.g. ``"linear probe"``.

    Returns:
        x as float32 (N, D), or ``(x, y)`` with y as a 1-D numpy array when y is given.

    Raises:
        ValueError: x not 2-D, not real-valued, without rows or columns; rows with NaN
            or inf ("<evaluation>: 3 of 1000 embedding rows contain NaN or inf"); y not
            1-D or of a different length than x.
    """
    x = as_numpy(x)
    if x.ndim != 2:
        raise ValueError(f"{evaluation}: embeddings must be a 2-D array (N, D), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{evaluation}: embeddings must be real numbers, got dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{evaluation}: embeddings must have at least one row and one column, got shape {x.shape}")
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: reported below
        x = np.ascontiguousarray(x, dtype=np.float32)
    # float64 sum: finite iff every entry is (no (N, D) temporary on the happy path)
    if not np.isfinite(np.sum(x, dtype=np.float64)):
        bad = int(np.count_nonzero(~np.isfinite(x).all(axis=1)))
        raise ValueError(f"{evaluation}: {bad} of {x.shape[0]} embedding rows contain NaN or inf")
    if y is None:
        return x
    y = as_numpy(y)
    if y.ndim != 1:
        raise ValueError(f"{evaluation}: labels must be a 1-D array, got shape {y.shape}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{evaluation}: {x.shape[0]} embedding rows but {y.shape[0]} labels; they must match")
    return x, y


def remap_labels(*label_arrays: Any) -> tuple[tuple[np.ndarray, ...], int]:
    """Map labels onto contiguous int64 classes 0..C-1 over the union of all arrays.

    Classes are numbered in sorted order of the original values, so labels that
    are already 0..C-1 are unchanged, and ``[3, 7, 7] -> [0, 1, 1]``.

    Returns:
        (one int64 array per input, same shapes), C = the number of distinct labels.
    """
    if not label_arrays:
        raise ValueError("remap_labels: needs at least one label array, got none")
    arrays = [as_numpy(a) for a in label_arrays]
    for i, a in enumerate(arrays):
        if a.ndim != 1:
            raise ValueError(f"remap_labels: label array {i} must be 1-D, got shape {a.shape}")
    classes, inverse = np.unique(np.concatenate(arrays), return_inverse=True)
    inverse = inverse.astype(np.int64).reshape(-1)
    out, start = [], 0
    for a in arrays:
        out.append(inverse[start : start + a.shape[0]])
        start += a.shape[0]
    return tuple(out), int(classes.shape[0])
