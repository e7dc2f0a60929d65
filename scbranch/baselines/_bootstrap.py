"""Smoothed bootstrap: a kernel density estimate of each type, decoded like the Gaussian."""

from __future__ import annotations

import numpy as np
from anndata import AnnData

from ._gaussian import PerClassGaussian, gaussian_noise


class SmoothedBootstrap(PerClassGaussian):
    """A kernel density estimate of each type: training cells plus Gaussian noise.

    Works in ``obsm[obsm_key]`` and decodes to genes as :class:`PerClassGaussian` does. A cell
    is ``m + (x - m + h e) / sqrt(1 + h^2)``: ``x`` a training cell of the type drawn at
    random, ``e ~ N(0, C)``, ``m`` and ``C`` the type's mean and Ledoit-Wolf covariance, ``h``
    the bandwidth. The type's mean and covariance are kept at every ``h``; ``h = 0`` resamples
    the training cells, large ``h`` is the per-class Gaussian. The reference every generator of
    new cells should beat where types have few cells: at bandwidth 1 its cells sit about as far
    from the training cells as new real cells do (docs/benchmarks/anchored.md).

    Parameters
    ----------
    adata
        Training cells with ``obsm[obsm_key]`` (and, to decode, PCA loadings in
        ``varm['PCs']``).
    labels_key
        Column of ``adata.obs`` with the cell types.
    obsm_key
        Representation to resample in.
    layer
        Layer of log-normalised expression behind the PCA (default ``.X``).
    bandwidth
        ``h`` above, at least 0.
    min_cells_per_class
        Types with fewer training cells raise an error.

    Examples
    --------
    >>> import scbranch as sb
    >>> adata = sb.datasets.pbmc68k()
    >>> kde = sb.baselines.SmoothedBootstrap(adata, "cell_type", bandwidth=1.0)
    >>> kde.generate(n_cells=50, seed=0).shape
    (500, 765)
    """

    name = "smoothed bootstrap"

    def __init__(
        self,
        adata: AnnData,
        labels_key: str,
        obsm_key: str = "X_pca",
        layer: str | None = None,
        bandwidth: float = 1.0,
        min_cells_per_class: int = 3,
    ):
        bandwidth = float(bandwidth)
        if not (np.isfinite(bandwidth) and bandwidth >= 0):
            raise ValueError(f"bandwidth must be a finite number >= 0, got {bandwidth}.")
        super().__init__(adata, labels_key, obsm_key, layer, min_cells_per_class)
        self.bandwidth = bandwidth
        z = np.asarray(adata.obsm[obsm_key], dtype=np.float64)
        self.cells_: dict[str, np.ndarray] = {c: z[self.labels_ == c] for c in self.classes}

    def _latents(self, counts, rng) -> np.ndarray:
        h = self.bandwidth
        out = []
        for c, n in counts.items():
            mean, cells = self.means_[c], self.cells_[c]
            x = cells[rng.integers(len(cells), size=n)]
            noise = gaussian_noise(self.covariances_[c], n, rng)
            out.append(mean + (x - mean + h * noise) / np.sqrt(1.0 + h * h))
        return np.vstack(out)
