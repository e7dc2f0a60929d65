"""The analytic Gaussian part of the noise prediction, one Gaussian per branch function.

Every network predicts a correction to ``E[eps | x_t]`` under a Gaussian model of the data
(``BranchedDiffusionModule.predict_eps``). With one Gaussian for all cells (``"global"``: centred,
with the data's per-dimension variance) a head that sees few cells, the leaf of a rare type, has
to learn its type's location and shape from those cells alone, and an undertrained head drifts
towards the centre of all cells. With ``"per_branch"`` each branch function (a head, a branch
embedding, or a class of the flat model) starts from the Gaussian of the cells it serves: an
untrained function generates the per-type Gaussian, and the network learns what is not Gaussian.

For ``x_0 ~ N(m, C)`` and ``x_t = alpha x_0 + sigma eps``,
``E[eps | x_t] = sigma (alpha^2 C + sigma^2 I)^-1 (x_t - alpha m)``; with ``C = U diag(lam) U^T``
that is a rotation, a per-component scaling and the rotation back.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: what the analytic part of the noise prediction is fitted to
GAUSSIAN_SKIPS = ("global", "per_branch")
#: full covariances up to this dimension; above it, per-dimension variances only (a 2,000-gene
#: expression space would store 16 MB per branch function)
FULL_COVARIANCE_MAX_DIM = 256
#: a function's covariance is shrunk towards the pooled within-type variance (per dimension)
#: with this many pseudo-cells: a type of 5 cells has no usable 30 x 30 covariance of its own
SHRINK_CELLS = 10.0
#: smallest eigenvalue kept (standardised units): the scaling stays finite near t = 0
MIN_EIGENVALUE = 1e-4


def uses_full_covariance(n_input: int) -> bool:
    """Whether a space of ``n_input`` dimensions gets full covariances (else diagonal ones)."""
    return n_input <= FULL_COVARIANCE_MAX_DIM


def class_statistics(
    blocks, labels: np.ndarray, n_classes: int, shift, scale: float, full: bool
) -> dict[str, np.ndarray]:
    """Per-class cell counts, sums and second moments of the standardised cells.

    ``blocks`` yields ``(start, stop, rows)`` over all cells (in memory or streamed from disk),
    so the statistics take one pass and never hold the whole matrix.
    """
    from .._validation import to_dense

    shift = np.asarray(shift, np.float64)
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    sums = second = None
    for start, stop, rows in blocks:
        z = (to_dense(rows).astype(np.float64) - shift) / scale
        if sums is None:
            d = z.shape[1]
            sums = np.zeros((n_classes, d))
            second = np.zeros((n_classes, d, d) if full else (n_classes, d))
        lab = labels[start:stop]
        for c in np.unique(lab):
            zc = z[lab == c]
            sums[c] += zc.sum(0)
            second[c] += zc.T @ zc if full else (zc**2).sum(0)
    return {"counts": counts, "sums": sums, "second": second}


def within_class_variance(stats: dict[str, np.ndarray]) -> np.ndarray:
    """Per-dimension variance of the cells around their own class's mean, pooled over classes.

    The prior a small type's covariance is shrunk towards: the data's overall variance would
    add the spread BETWEEN types to it and make a rare type's cells too diverse.
    """
    counts, sums, second = stats["counts"], stats["sums"], stats["second"]
    present = counts > 0
    squares = np.einsum("cii->ci", second) if second.ndim == 3 else second
    scatter = squares[present] - sums[present] ** 2 / counts[present, None]
    dof = max(counts.sum() - present.sum(), 1.0)
    return np.maximum(scatter.sum(0) / dof, MIN_EIGENVALUE)


def group_moments(
    stats: dict[str, np.ndarray],
    groups: Sequence[Sequence[int]],
    prior_var: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Mean and (shrunk) covariance of each group of classes, as ``mean``, ``var``, ``basis``.

    ``var`` holds the eigenvalues and ``basis`` the eigenvectors (columns) of the covariance
    when the statistics are full, else ``var`` holds the per-dimension variances and ``basis``
    is absent. The covariance of ``n`` cells is shrunk towards ``diag(prior_var)`` (default:
    :func:`within_class_variance` of ``stats``) with :data:`SHRINK_CELLS` pseudo-cells.
    """
    if prior_var is None:
        prior_var = within_class_variance(stats)
    prior_var = np.asarray(prior_var, np.float64)
    full = stats["second"].ndim == 3
    means, variances, bases = [], [], []
    for group in groups:
        idx = list(group)
        n = stats["counts"][idx].sum()
        if n <= 0:
            raise ValueError(f"No training cells for the classes {idx} of a branch function.")
        mean = stats["sums"][idx].sum(0) / n
        raw = stats["second"][idx].sum(0) / n
        cov = raw - (np.outer(mean, mean) if full else mean**2)
        cov = cov * (n / max(n - 1.0, 1.0))  # unbiased
        w = (n - 1.0) / (n - 1.0 + SHRINK_CELLS)
        means.append(mean)
        if full:
            cov = w * cov + (1 - w) * np.diag(prior_var)
            lam, u = np.linalg.eigh((cov + cov.T) / 2)
            variances.append(np.maximum(lam, MIN_EIGENVALUE))
            bases.append(u)
        else:
            variances.append(np.maximum(w * cov + (1 - w) * prior_var, MIN_EIGENVALUE))
    out = {"mean": np.stack(means), "var": np.stack(variances)}
    if full:
        out["basis"] = np.stack(bases)
    return out


def gaussian_eps(
    x: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    function: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    basis: torch.Tensor | None,
) -> torch.Tensor:
    """``E[eps | x_t]`` under each row's Gaussian (``function[i]`` indexes the moments).

    ``alpha`` and ``sigma`` are scalars or one per row (``(n, 1)``). Rows are grouped by
    function, so a batch from one branch (sampling) costs one matmul pair.
    """
    z = x - alpha * mean[function]
    if basis is None:
        return sigma * z / (alpha**2 * var[function] + sigma**2)
    per_row = alpha.dim() > 0 and alpha.numel() > 1
    present = torch.unique(function).tolist()
    if len(present) == 1:  # one branch (sampling): no gather
        u = basis[present[0]]
        return ((z @ u) * (sigma / (alpha**2 * var[present[0]] + sigma**2))) @ u.T
    out = torch.empty_like(x)
    for f in present:
        rows = (function == f).nonzero().squeeze(1)
        a, s = (alpha[rows], sigma[rows]) if per_row else (alpha, sigma)
        u = basis[f]
        y = (z[rows] @ u) * (s / (a**2 * var[f] + s**2))
        out[rows] = y @ u.T
    return out
