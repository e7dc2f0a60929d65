"""Gene-level agreement: rank correlation of per-gene moments, and zero fractions of counts."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.stats import spearmanr


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
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y have different numbers of genes: {x.shape[1]} vs {y.shape[1]}.")
    (mx, vx), (my, vy) = _moments(x), _moments(y)
    return _spearman(mx, my), _spearman(vx, vy)


def zero_fraction(m) -> np.ndarray:
    """Fraction of cells in which each gene is zero.

    Examples
    --------
    >>> zero_fraction(np.array([[0, 1], [0, 0]])).tolist()
    [1.0, 0.5]
    """
    n = m.shape[0]
    if sp.issparse(m):
        m = sp.csc_matrix(m)
        m.eliminate_zeros()
        return 1.0 - np.diff(m.indptr) / n
    return (np.asarray(m) == 0).mean(0).astype(np.float64)


def zero_fraction_error(x, y) -> float:
    """Mean over genes of the absolute difference in zero fraction between two count sets.

    Examples
    --------
    >>> zero_fraction_error(np.array([[0, 1], [0, 0]]), np.array([[0, 1], [1, 1]]))
    0.5
    """
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y have different numbers of genes: {x.shape[1]} vs {y.shape[1]}.")
    return float(np.abs(zero_fraction(x) - zero_fraction(y)).mean())
