"""Distances between two sets of cells: exact W2 (POT) and RBF-MMD.

Both follow the protocol (docs/evaluation.md): W2 is the square root of the exact optimal-transport
cost with a squared-Euclidean ground cost and uniform weights (``ot.emd2``), not a sliced or
Gaussian approximation; MMD^2 is the biased (V-statistic) estimate with an RBF kernel ``k(x, y) =
exp(-||x - y||^2 / (2 sigma^2))``, summed over a fixed set of bandwidths or with the median-distance
heuristic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.spatial.distance import cdist

from .._validation import check_finite, to_dense

#: the protocol's fixed bandwidth set (in the units of the coordinates, e.g. 30 PCs)
MMD_BANDWIDTHS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
#: rows of one set whose distances to the other are held at once (MMD stays O(block x n))
_BLOCK_ROWS = 2048
#: pooled cells beyond which the median heuristic reads a seeded sample of this many
MEDIAN_SAMPLE = 4000


def _as_2d(x, name: str) -> np.ndarray:
    x = to_dense(x)  # sparse matrices too (np.asarray made an object array of them)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(
            f"`{name}` must be a non-empty 2-d array (cells x features), got {x.shape}."
        )
    check_finite(x, f"`{name}`")  # a NaN gave a NaN distance without a word
    return x


def _check_pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y have different numbers of features: {x.shape[1]} vs {y.shape[1]}."
        )
    return x, y


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # differences, not |a|^2 + |b|^2 - 2ab: that expansion loses ~1e-8 of W2 to rounding
    return cdist(a, b, "sqeuclidean")


def wasserstein2(x, y, *, num_itermax: int = 1_000_000) -> float:
    """Exact 2-Wasserstein distance between two point clouds with uniform weights.

    Parameters
    ----------
    x, y
        Arrays (n, d) and (m, d).
    num_itermax
        Iteration limit of the network-simplex solver (POT's default of 1e5 can stop early on
        a few thousand points, silently returning a non-optimal cost).

    Returns
    -------
    ``sqrt(min_P sum_ij P_ij ||x_i - y_j||^2)`` over couplings with uniform marginals. Exact
    transport holds the n x m cost matrix (8 n m bytes) and its time grows faster than n^2:
    ``tl.evaluate`` caps the cells per class with ``max_cells``.

    Examples
    --------
    >>> wasserstein2([[0.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]])
    1.0
    """
    import ot

    x, y = _check_pair(x, y)
    a = np.full(len(x), 1.0 / len(x))
    b = np.full(len(y), 1.0 / len(y))
    cost = ot.emd2(a, b, _sq_dists(x, y), numItermax=num_itermax)
    return float(np.sqrt(max(float(cost), 0.0)))


def median_bandwidth(x, y) -> float:
    """Median pairwise Euclidean distance among the pooled cells (the median heuristic).

    Parameters
    ----------
    x, y
        Arrays (n, d) and (m, d), pooled into one set of cells.

    Returns
    -------
    The median of the non-zero distances between pairs of pooled cells (1.0 when all cells
    coincide). Above ``MEDIAN_SAMPLE`` (4,000) pooled cells, of a seeded sample of that many
    (the pairwise distances of all of them grow as the square of their number).

    Examples
    --------
    >>> median_bandwidth([[0.0], [1.0]], [[3.0]])
    2.0
    """
    x, y = _check_pair(x, y)
    z = np.vstack([x, y])
    if len(z) > MEDIAN_SAMPLE:
        z = z[np.sort(np.random.default_rng(0).choice(len(z), MEDIAN_SAMPLE, replace=False))]
    d = np.sqrt(_sq_dists(z, z)[np.triu_indices(len(z), k=1)])
    d = d[d > 0]
    return float(np.median(d)) if len(d) else 1.0


def mmd_rbf(x, y, *, bandwidths: Sequence[float] | str = MMD_BANDWIDTHS) -> float:
    """Biased RBF-kernel MMD^2 between two sets of cells.

    Parameters
    ----------
    x, y
        Arrays (n, d) and (m, d).
    bandwidths
        Kernel bandwidths sigma, whose kernels are summed, or ``"median"`` for one kernel at
        the median pairwise distance of the pooled cells.

    Returns
    -------
    ``mean k(x, x') + mean k(y, y') - 2 mean k(x, y)`` (diagonals included), which is 0 for
    identical sets and never negative.

    Examples
    --------
    >>> x = np.random.default_rng(0).normal(size=(50, 3))
    >>> mmd_rbf(x, x)
    0.0
    >>> mmd_rbf(x, x + 5.0, bandwidths="median") > 0.5
    True
    """
    x, y = _check_pair(x, y)
    if isinstance(bandwidths, str) and bandwidths != "median":
        raise ValueError(
            f"bandwidths must be a sequence of floats or 'median', got {bandwidths!r}."
        )
    if isinstance(bandwidths, str):
        sigmas = [median_bandwidth(x, y)]
    else:  # one bandwidth as a number, or several
        sigmas = [float(s) for s in np.atleast_1d(np.asarray(bandwidths, dtype=np.float64))]
    if not sigmas or not all(np.isfinite(s) and s > 0 for s in sigmas):
        raise ValueError(f"bandwidths must be positive, got {sigmas}.")
    gammas = np.array([1.0 / (2.0 * s * s) for s in sigmas])
    means = _kernel_means(x, x, gammas) + _kernel_means(y, y, gammas)
    return float(max((means - 2.0 * _kernel_means(x, y, gammas)).sum(), 0.0))


def _kernel_means(a: np.ndarray, b: np.ndarray, gammas: np.ndarray) -> np.ndarray:
    """``mean exp(-g ||a_i - b_j||^2)`` over all pairs, for each g, a block of rows at a time.

    Exact (only the order of the sums changes); memory ``_BLOCK_ROWS x len(b)`` instead of
    ``len(a) x len(b)`` (three n x n matrices ran 10,000 cells a side into 4 GB).
    """
    sums = np.zeros(len(gammas))
    for lo in range(0, len(a), _BLOCK_ROWS):
        d = _sq_dists(a[lo : lo + _BLOCK_ROWS], b)
        sums += [np.exp(-g * d).sum() for g in gammas]
    return sums / (len(a) * len(b))
