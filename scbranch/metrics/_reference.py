"""The space cells are judged in, fitted only on cells that are never among those compared.

A PCA (or any fitted map) gives the cells it was fitted on more spread along its top components
than any new cell gets: with a few hundred to a few thousand cells and thousands of genes, the
in-sample scores are inflated. If the cells a metric compares are in-sample for its space, real
cells that nothing saw look like poor generated cells (docs/benchmarks/instrument.md measures
it). So every fitted space scbranch judges cells in is
fitted here, on cells that are then NOT compared: the training cells when there are any, or a
seeded, stratified part of the real cells held apart for fitting (:func:`split_for_fitting`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from .._validation import to_dense

logger = logging.getLogger(__name__)

#: components of the reference PCA (docs/evaluation.md)
N_COMPS = 30
#: at most this many cells to fit the PCA, and per projected chunk (bounded memory)
MAX_FIT_CELLS = 10_000


class ReferencePCA:
    """PCA of expression fitted on reference cells, projecting any other cells out-of-sample.

    Parameters
    ----------
    n_comps
        Components (fewer when the fitting cells or genes do not allow as many).
    max_cells
        Fit on a seeded subsample of at most this many cells; cells are projected in chunks of
        this size.
    seed
        Seed of the subsample and of the PCA solver.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> ref = ReferencePCA(n_comps=5).fit(rng.normal(size=(100, 20)))
    >>> ref.transform(rng.normal(size=(7, 20))).shape
    (7, 5)
    """

    def __init__(self, n_comps: int = N_COMPS, *, max_cells: int = MAX_FIT_CELLS, seed: int = 0):
        if int(n_comps) < 1:
            raise ValueError(f"n_comps must be at least 1, got {n_comps}.")
        self.n_comps = int(n_comps)
        self.max_cells = int(max_cells)
        self.seed = int(seed)
        self._pca = None
        self.n_fit_cells_ = 0

    def fit(self, matrix) -> ReferencePCA:
        """Fit on the rows of ``matrix`` (cells x genes; dense, sparse or backed)."""
        from sklearn.decomposition import PCA

        n = matrix.shape[0]
        rows = None
        if n > self.max_cells:
            rows = np.sort(np.random.default_rng(self.seed).choice(n, self.max_cells, False))
        x = to_dense(matrix if rows is None else matrix[rows])
        n_comps = int(min(self.n_comps, x.shape[0] - 1, x.shape[1]))
        if n_comps < 1:
            raise ValueError(
                f"Too few cells ({x.shape[0]}) or genes ({x.shape[1]}) to fit a reference PCA."
            )
        if n_comps < self.n_comps:  # was silent: a 1,000-component request fitted 350
            logger.info(
                "The reference PCA has %d components, not the %d asked for: %d fitting cells "
                "and %d genes allow no more.", n_comps, self.n_comps, x.shape[0], x.shape[1],
            )  # fmt: skip
        self._pca = PCA(n_components=n_comps, random_state=self.seed).fit(x)
        self.n_fit_cells_ = x.shape[0]
        return self

    @property
    def n_components_(self) -> int:
        """Components actually fitted."""
        self._check_fitted()
        return int(self._pca.n_components_)

    def _check_fitted(self) -> None:
        if self._pca is None:
            raise RuntimeError("Fit the ReferencePCA first (`.fit(reference_cells)`).")

    def transform(self, matrix) -> np.ndarray:
        """Coordinates of the rows of ``matrix`` (centred with the FITTING cells' mean)."""
        self._check_fitted()
        n = matrix.shape[0]
        chunks = [
            self._pca.transform(to_dense(matrix[i : min(i + self.max_cells, n)]))
            for i in range(0, n, self.max_cells)
        ]
        return np.vstack(chunks) if chunks else np.zeros((0, self.n_components_))


def split_for_fitting(
    labels: Sequence,
    fraction: float,
    seed: int,
    *,
    min_compared: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of a stratified part of cells held apart to fit a space, and of the rest.

    Each class gives ``round(fraction * n)`` cells to the fitting part, but always keeps at
    least ``min_compared`` cells for comparison (a class with fewer keeps all of them). Seeded
    per class, so the split of one class does not depend on the others.

    Parameters
    ----------
    labels
        Class of every cell.
    fraction
        Share of each class held apart for fitting, in ``(0, 1)``.
    seed
        Seed of the split.
    min_compared
        Cells every class keeps for comparison.

    Returns
    -------
    ``(fit_positions, compared_positions)``, both sorted.

    Examples
    --------
    >>> fit, rest = split_for_fitting(["a"] * 10 + ["b"] * 3, 0.3, seed=0)
    >>> len(fit), len(rest)
    (4, 9)
    """
    import zlib

    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"The fitting fraction must lie in (0, 1), got {fraction}.")
    labels = np.asarray(labels).astype(str)
    fit, rest = [], []
    for c in dict.fromkeys(labels.tolist()):
        pos = np.flatnonzero(labels == c)
        rng = np.random.default_rng([int(seed), zlib.crc32(c.encode())])
        pos = rng.permutation(pos)
        n_fit = int(min(round(fraction * len(pos)), max(len(pos) - min_compared, 0)))
        fit.append(pos[:n_fit])
        rest.append(pos[n_fit:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(rest))
