"""Per-class Gaussian in a PCA space, decoded to genes like the PCA-space diffusion models."""

from __future__ import annotations

import numpy as np
from anndata import AnnData
from sklearn.covariance import LedoitWolf

from .._validation import check_finite, check_rep_key
from ..model._decoding import decode, fit_pca_decoder
from ._base import Baseline


def covariance_factor(covariance: np.ndarray) -> np.ndarray:
    """The lower Cholesky factor ``L`` of a covariance (``L @ L.T``), to draw Gaussian noise with.

    Unlike numpy's ``multivariate_normal``, which factors with an SVD, the Cholesky factor is
    unique and moves continuously with the covariance. That matters for Ledoit-Wolf covariances
    of types with fewer cells than dimensions: their shrunk null space is one repeated
    eigenvalue, inside which an SVD may return any basis, and which one it returns changed with
    the number of BLAS threads, so the same seed drew other cells on another machine
    (docs/evaluation.md, "What a rerun reproduces"). A covariance that is only positive
    semi-definite gets a jitter of 1e-10 of its mean variance first.

    Examples
    --------
    >>> L = covariance_factor(np.array([[4.0, 2.0], [2.0, 2.0]]))
    >>> L.round(6).tolist()
    [[2.0, 0.0], [1.0, 1.0]]
    """
    cov = (np.asarray(covariance, dtype=np.float64) + np.asarray(covariance).T) / 2.0
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        jitter = 1e-10 * max(float(np.trace(cov)) / len(cov), np.finfo(np.float64).tiny)
        return np.linalg.cholesky(cov + jitter * np.eye(len(cov)))


def gaussian_noise(covariance: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` draws of ``N(0, covariance)`` through its :func:`covariance_factor`.

    Factored at every call (a 30 x 30 Cholesky takes microseconds), so a covariance changed
    after fitting, as the class-mean probe's zeros, is the one drawn from.
    """
    factor = covariance_factor(covariance)
    return rng.standard_normal((n, len(factor))) @ factor.T


class PerClassGaussian(Baseline):
    """One multivariate Gaussian per cell type in ``obsm[obsm_key]`` (e.g. 30 PCs).

    Means are the class means; covariances are Ledoit-Wolf shrunk (a class with fewer cells
    than dimensions still gets a proper, full-rank covariance). Samples are decoded to genes
    with the same PCA map the diffusion model uses, so both are compared in the same space.
    Not a strawman: in a 30-PC space most of a cell type's structure is close to Gaussian.

    Parameters
    ----------
    adata
        Training cells with ``obsm[obsm_key]`` and (for decoding) PCA loadings in
        ``varm['PCs']`` and the expression the PCA was computed on.
    labels_key
        Column of ``adata.obs`` with the cell types.
    obsm_key
        Representation to fit in.
    layer
        Layer of log-normalised expression behind the PCA (default ``.X``).
    min_cells_per_class
        Fewest training cells a type may have (default 3): a type of ``labels_key`` with fewer
        raises a `ValueError`.

    Examples
    --------
    >>> import scbranch as sb
    >>> adata = sb.datasets.pbmc68k()
    >>> gauss = sb.baselines.PerClassGaussian(adata, "cell_type")
    >>> gauss.generate(n_cells=50, seed=0).shape
    (500, 765)
    """

    name = "per-class Gaussian"

    def __init__(
        self,
        adata: AnnData,
        labels_key: str,
        obsm_key: str = "X_pca",
        layer: str | None = None,
        min_cells_per_class: int = 3,
    ):
        super().__init__(adata, labels_key, min_cells_per_class)
        check_rep_key(adata, obsm_key=obsm_key, layer=layer)
        z = np.asarray(adata.obsm[obsm_key])
        check_finite(z, f"adata.obsm[{obsm_key!r}]")
        self.obsm_key = obsm_key
        self.means_: dict[str, np.ndarray] = {}
        self.covariances_: dict[str, np.ndarray] = {}
        for c in self.classes:
            zc = z[self.labels_ == c].astype(np.float64)
            self.means_[c] = zc.mean(0)
            self.covariances_[c] = LedoitWolf().fit(zc).covariance_
        self.decoder_ = fit_pca_decoder(adata, obsm_key, layer)

    def _latents(self, counts, rng) -> np.ndarray:
        """``counts[c]`` latents of every class ``c``, in class order."""
        return np.vstack(
            [
                self.means_[c] + gaussian_noise(self.covariances_[c], n, rng)
                for c, n in counts.items()
            ]
        )

    def _sample_latents(self, counts, rng, seed) -> dict:
        # the same draws as _sample's (its decode uses a stream of its own), without decoding
        return {self.obsm_key: self._latents(counts, rng).astype(np.float32)}

    def _sample(self, counts, rng, seed, residual_noise: bool = False):
        """Latents per class; decoded (optionally with the PCA residual) when loadings exist."""
        if residual_noise not in (True, False, "gaussian"):
            raise ValueError(
                f"residual_noise={residual_noise!r}: this baseline decodes with Gaussian residual "
                "noise (True or 'gaussian') or none (False). For a model's negative binomial "
                "decoder pass `decode_with=model` (docs/evaluation.md compares them so)."
            )
        z = self._latents(counts, rng).astype(np.float32)
        if self.decoder_ is None:
            if residual_noise:
                raise ValueError("residual_noise needs PCA loadings to decode to genes.")
            return {"X": None, "var_names": [], "obsm": {self.obsm_key: z}}
        x = decode(
            self.decoder_, z, residual_noise=residual_noise, rng=np.random.default_rng([seed, 1])
        )
        return {"X": x, "var_names": self.decoder_["var_names"], "obsm": {self.obsm_key: z}}
