"""Gene-level agreement: rank correlation of per-gene moments, and zero fractions of counts."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.stats import spearmanr

from .._validation import check_finite


def _moments(m) -> tuple[np.ndarray, np.ndarray]:
    if sp.issparse(m):
        m = sp.csr_matrix(m, dtype=np.float64)
        mean = np.asarray(m.mean(0)).ravel()
        var = np.asarray(m.multiply(m).mean(0)).ravel() - mean**2
    else:
        m = np.asarray(m, dtype=np.float64)
        mean, var = m.mean(0), m.var(0)
    return mean, np.maximum(var, 0.0)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")  # a constant vector has no ranking
    return float(spearmanr(a, b).statistic)


def gene_moment_spearman(x, y) -> tuple[float, float]:
    """Spearman correlation of per-gene means and of per-gene variances between two sets.

    Parameters
    ----------
    x, y
        Expression matrices (cells x genes, dense or sparse) over the same genes.

    Returns
    -------
    ``(rho_of_means, rho_of_variances)``; NaN where one side is constant across genes.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> scale = np.linspace(0.1, 3, 20)
    >>> x, y = rng.gamma(scale, size=(500, 20)), rng.gamma(scale, size=(500, 20))
    >>> [round(r, 1) for r in gene_moment_spearman(x, y)]
    [1.0, 1.0]
    """
    x = x if sp.issparse(x) else np.asarray(x, dtype=np.float64)
    y = y if sp.issparse(y) else np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"x and y must be cells x genes (2-D), got shapes {x.shape}, {y.shape}.")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y have different numbers of genes: {x.shape[1]} vs {y.shape[1]}.")
    for name, m in (("x", x), ("y", y)):  # a NaN made both correlations NaN, silently
        check_finite(m, name)
    (mx, vx), (my, vy) = _moments(x), _moments(y)
    return _spearman(mx, my), _spearman(vx, vy)


def zero_fraction(m) -> np.ndarray:
    """Fraction of cells in which each gene is zero.

    Parameters
    ----------
    m
        Counts (cells x genes, dense or sparse; explicitly stored zeros count as zeros).

    Returns
    -------
    Array (genes,) of fractions in [0, 1].

    Examples
    --------
    >>> zero_fraction(np.array([[0, 1], [0, 0]])).tolist()
    [1.0, 0.5]
    """
    m = _cells_by_genes(m, "zero_fraction")
    n = m.shape[0]
    if sp.issparse(m):
        m = sp.csc_matrix(m, copy=True)  # never the caller's matrix: the next lines edit it
        m.sum_duplicates()
        m.eliminate_zeros()
        return 1.0 - np.diff(m.indptr) / n
    return (np.asarray(m) == 0).mean(0).astype(np.float64)


def zero_fraction_error(x, y) -> float:
    """Mean over genes of the absolute difference in zero fraction between two count sets.

    Parameters
    ----------
    x, y
        Count matrices (cells x genes, dense or sparse) over the same genes; the numbers of
        cells may differ.

    Returns
    -------
    The mean absolute difference of :func:`zero_fraction` of ``x`` and ``y``, in [0, 1].

    Examples
    --------
    >>> zero_fraction_error(np.array([[0, 1], [0, 0]]), np.array([[0, 1], [1, 1]]))
    0.5
    """
    x, y = _cells_by_genes(x, "x"), _cells_by_genes(y, "y")  # lists, 1-D, NaN, no cells
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y have different numbers of genes: {x.shape[1]} vs {y.shape[1]}.")
    return float(np.abs(zero_fraction(x) - zero_fraction(y)).mean())


def _cells_by_genes(m, name: str):
    """``m`` as a cells x genes matrix with cells and finite values, or a clear error.

    Lists failed on ``.shape``, 1-D input on an index, NaN passed as a count and no cells
    gave NaN with numpy's warnings.
    """
    if not sp.issparse(m):
        m = np.asarray(m)  # lists and other array-likes too
    if m.ndim != 2 or m.shape[0] == 0:
        raise ValueError(f"{name} needs cells x genes (2-D, at least one cell), got {m.shape}.")
    check_finite(m, name)
    return m


def gene_mean_ceiling(x, n_splits: int = 50, seed: int = 0) -> float:
    """The Spearman correlation of per-gene means that the cells in ``x`` allow at best.

    ``x``'s per-gene means carry sampling noise, so even the true per-gene means of its
    population correlate with them below 1. This estimates that correlation from ``x`` alone:
    the Spearman correlation ``r`` between the means of two random halves of the cells (averaged
    over ``n_splits`` splits), corrected to the full sample with the Spearman-Brown formula
    ``R = 2r / (1 + r)`` (the reliability of the full mean), and returned as ``sqrt(R)``, the
    correlation of a noisy measurement with what it measures. Compare
    :func:`gene_moment_spearman` of generated cells against ``x`` with it: a generator that
    reproduced the population exactly would score about this value.

    With few cells (below about 50) and many near-zero genes the estimate is too high (ties
    and skew make the halves' agreement a poor guide), so it remains an upper bound there: a
    score below 0.9 means no generator can be expected to reach 0.9 against ``x``.

    Parameters
    ----------
    x
        Cells x genes (dense or sparse), e.g. held-out real counts of one class; at least 4 cells.
    n_splits
        Random half splits averaged.
    seed
        Seed of the splits.

    Returns
    -------
    The ceiling in [0, 1]; NaN when no half has a ranking (constant means).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> mu = np.exp(rng.normal(-1, 1.5, 300))
    >>> x = rng.poisson(mu, size=(200, 300))
    >>> round(gene_mean_ceiling(x), 2)
    0.99
    """
    x = _cells_by_genes(x, "x (the cells given to gene_mean_ceiling)")  # 1-D gave NaN
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"gene_mean_ceiling needs at least 4 cells to split into halves; got {n}.")
    if n_splits < 1:
        raise ValueError(f"n_splits must be at least 1; got {n_splits}.")
    x = sp.csr_matrix(x, dtype=np.float64) if sp.issparse(x) else np.asarray(x, np.float64)
    check_finite(x, "x (the cells given to gene_mean_ceiling)")
    rng = np.random.default_rng(seed)
    half = n // 2
    r = []
    for _ in range(n_splits):
        order = rng.permutation(n)
        a, b = order[:half], order[half : 2 * half]
        # sums rank like means (equal halves) and are exact for counts, so ties stay ties
        r.append(_spearman(np.asarray(x[a].sum(0)).ravel(), np.asarray(x[b].sum(0)).ravel()))
    r = np.asarray(r)
    if np.isnan(r).all():
        return float("nan")
    r_half = max(float(np.nanmean(r)), 0.0)  # halves that disagree: no reliability at all
    return float(np.sqrt(2 * r_half / (1 + r_half)))
