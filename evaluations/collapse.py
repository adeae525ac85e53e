"""Collapse diagnostics on embeddings: rank, spread and the alignment / uniformity pair.

References:
  * RankMe: Garrido, Balestriero, Najman & LeCun, "RankMe: Assessing the Downstream Performance of Pretrained
    Self-Supervised Representations by Their Rank" (ICML 2023): ``exp`` of the entropy of the raw (uncentred)
    embeddings' normalised singular values, ``p_k = s_k / ||s||_1 + eps``, eps = 1e-7.
  * Effective rank: Roy & Vetterli, "The effective rank: a measure of effective dimensionality" (EUSIPCO 2007): the
    same entropy without eps.
  * Per-dimension std of L2-normalised embeddings (SimSiam, Chen & He 2021, Fig. 2): 0 when collapsed, about 1/sqrt(D)
    when the embeddings spread over the sphere.
  * Alignment / uniformity: Wang & Isola, "Understanding Contrastive Representation Learning through Alignment and
    Uniformity on the Hypersphere" (ICML 2020).

All functions take numpy arrays or torch tensors and compute in float64.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from evaluations.checks import as_numpy, check_features

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "alignment",
    "effective_rank",
    "rankme",
    "ranks",
    "singular_values",
    "spectrum_figure",
    "std_of_normalized",
    "uniformity",
]

UNIFORMITY_MAX_ROWS = 4096  # rows kept by uniformity(): 8.4 M pairs
UNIFORMITY_SEED = 0
_PAIR_BLOCK = 1024  # rows of the (rows, M) distance block in uniformity()


def _float64(z: Any, evaluation: str) -> np.ndarray:
    """Validated (N, D) float64 copy; float64 input keeps its full precision."""
    z = as_numpy(z)
    check_features(z, evaluation=evaluation)
    return z.astype(np.float64)


def _normalize(z: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (zero rows stay zero), float64."""
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return z / np.maximum(norms, 1e-12)


def singular_values(z: Any, device: Any = None) -> np.ndarray:
    """Singular values (descending, float64, min(N, D) of them) of the raw, uncentred (N, D) matrix.

    ``device``: None computes them with numpy (LAPACK); a torch device, with ``torch.linalg.svdvals`` in float64
    there (on a GPU, the cost of a 50k x 2048 spectrum moves off the CPU; the same values to float64 precision).
    """
    z = _float64(z, "singular values")
    if device is None:
        return np.linalg.svd(z, compute_uv=False)
    import torch  # only for the device path: numpy callers do not pay for it

    return torch.linalg.svdvals(torch.from_numpy(z).to(device)).cpu().numpy()


def ranks(z: Any, device: Any = None, eps: float = 1e-7) -> tuple[float, float, np.ndarray]:
    """``(rankme(z, eps), effective_rank(z), singular_values(z))`` from one decomposition, on ``device`` (see
    :func:`singular_values`)."""
    s = singular_values(z, device)
    return _spectral_entropy_rank(s, float(eps)), _spectral_entropy_rank(s, 0.0), s


def _spectral_entropy_rank(s: np.ndarray, eps: float) -> float:
    total = float(np.sum(s))
    if total == 0.0:
        raise ValueError("rank: every embedding is zero, so the singular-value distribution is undefined")
    p = s / total + eps
    p = p[p > 0]  # 0 log 0 = 0 (only reachable with eps = 0)
    return float(np.exp(-np.sum(p * np.log(p))))


def rankme(z: Any, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023) of (N, D) embeddings: exp of the entropy of s / ||s||_1 + eps.

    Between about 1 (rank one) and min(N, D); the 128 x 128 identity gives 128.006
    (the eps term adds a little). Compare runs of the same method and data size.
    """
    if not (isinstance(eps, (int, float, np.floating)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"rankme: eps must be a finite number >= 0, got {eps!r}")
    return _spectral_entropy_rank(singular_values(z), float(eps))


def effective_rank(z: Any) -> float:
    """Effective rank (Roy & Vetterli 2007): exp of the entropy of s / ||s||_1; the identity gives D exactly."""
    return _spectral_entropy_rank(singular_values(z), 0.0)


def std_of_normalized(z: Any) -> float:
    """Mean over dimensions of the per-dimension standard deviation (ddof=0) of the L2-normalised rows.

    0 when every row points the same way; about 1/sqrt(D) for isotropic embeddings.
    """
    return float(np.mean(np.std(_normalize(_float64(z, "std of normalized")), axis=0)))


def alignment(x: Any, y: Any, alpha: float = 2) -> float:
    """Alignment (Wang & Isola 2020): mean_i ||x_i - y_i||_2^alpha over positive pairs of L2-normalised rows.

    x, y: (N, D), row i of x and row i of y are two views of one sample. 0 for
    identical views, 2^alpha for antipodal ones.
    """
    if not (isinstance(alpha, (int, float, np.integer, np.floating)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alignment: alpha must be a finite number > 0, got {alpha!r}")
    a = _normalize(_float64(x, "alignment"))
    b = _normalize(_float64(y, "alignment"))
    if a.shape != b.shape:
        raise ValueError(f"alignment: the two views must have the same shape, got {a.shape} and {b.shape}")
    return float(np.mean(np.linalg.norm(a - b, axis=1) ** float(alpha)))


def uniformity(x: Any, t: float = 2) -> float:
    """Uniformity (Wang & Isola 2020): log mean_{i<j} exp(-t ||x_i - x_j||^2) over L2-normalised rows.

    Lower is more uniform; orthonormal rows give -2t (every squared distance is 2),
    identical rows give 0. For memory and time, at most ``UNIFORMITY_MAX_ROWS`` (4096)
    rows are used: a uniform subsample without replacement drawn with
    ``np.random.default_rng(0)``, so the value is reproducible. The mean is taken
    with a log-sum-exp, so a large t does not underflow.
    """
    if not (isinstance(t, (int, float, np.integer, np.floating)) and math.isfinite(t) and t > 0):
        raise ValueError(f"uniformity: t must be a finite number > 0, got {t!r}")
    z = as_numpy(x)
    if z.ndim == 2 and z.shape[0] > UNIFORMITY_MAX_ROWS:
        rows = np.sort(np.random.default_rng(UNIFORMITY_SEED).choice(z.shape[0], UNIFORMITY_MAX_ROWS, replace=False))
        z = z[rows]
    z = _normalize(_float64(z, "uniformity"))
    m = z.shape[0]
    if m < 2:
        raise ValueError(f"uniformity: needs at least 2 rows to form a pair, got {m}")
    sq_norms = np.einsum("ij,ij->i", z, z)
    pairs = m * (m - 1) // 2
    running_max, running_sum = -np.inf, 0.0  # log-sum-exp accumulated block by block
    for start in range(0, m - 1, _PAIR_BLOCK):
        block = z[start : start + _PAIR_BLOCK]
        d2 = np.maximum(sq_norms[start : start + _PAIR_BLOCK, None] + sq_norms[None, :] - 2.0 * block @ z.T, 0.0)
        rows = np.arange(start, start + block.shape[0])
        values = -float(t) * d2[np.arange(m)[None, :] > rows[:, None]]  # pairs i < j only
        if values.size == 0:
            continue
        block_max = float(values.max())
        new_max = max(running_max, block_max)
        running_sum = running_sum * math.exp(running_max - new_max) + float(np.sum(np.exp(values - new_max)))
        running_max = new_max
    return running_max + math.log(running_sum) - math.log(pairs)


def spectrum_figure(singular_values_by_name: dict[str, Any]) -> Figure:
    """Singular-value spectra, one line per name: index on x, singular value on a log y axis.

    Each spectrum is drawn as given (sort it, or use :func:`singular_values`). Exact
    zeros cannot be drawn on a log axis and are left out. Uses the Agg canvas
    (no display needed); save with ``fig.savefig(path)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not singular_values_by_name:
        raise ValueError("spectrum_figure: needs at least one named spectrum, got none")
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, values in singular_values_by_name.items():
        s = np.asarray(as_numpy(values), dtype=np.float64).reshape(-1)
        index = np.arange(1, s.shape[0] + 1)
        keep = s > 0
        ax.plot(index[keep], s[keep], label=str(name))
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("singular value")
    ax.set_title("Embedding spectrum")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig
