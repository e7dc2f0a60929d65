"""scVI resampling: latents drawn from a class's aggregated posterior, decoded to counts."""

from __future__ import annotations

import logging

import numpy as np
from anndata import AnnData

from ..model._counts import log_normalize
from ..model._scvi import decode_latents, expected_log_counts, fit_scvi
from ._base import Baseline

logger = logging.getLogger(__name__)


class ScviResampling(Baseline):
    """Generate a type by decoding latents of its real training cells, as scVI users do.

    An :class:`scvi.model.SCVI` is trained on the training counts. To generate ``n`` cells of
    type ``c``: draw ``n`` training cells of type ``c`` (with replacement), draw one latent from
    each cell's posterior ``q(z | x)`` (their mixture is the class's aggregated posterior),
    decode it with the cell's observed library size and sample counts from the
    negative-binomial likelihood. ``.X`` holds the counts log-normalised (CP10k + log1p), like
    real cells, and ``layers['counts']`` the counts. ``generate(residual_noise=False)`` gives
    a denoised profile instead: ``.X`` is each latent's expected log-normalised counts, the
    expectation over its likelihood's counts of each gene's CP10k + log1p (exact), and no
    ``layers['counts']``. That is the mean in the units of real log-normalised cells, as a
    PCA decoder's profile is. The log of the decoder's mean (``px.scale`` as CP10k + log1p, what
    ``get_normalized_expression`` gives) is not: for a gene a cell rarely expresses it lies
    above every value but the zeros real cells take (log of a mean against mean of logs), and
    as a classifier's training cells it helped less than the counts (docs/evaluation.md, useful
    cells).

    Parameters
    ----------
    adata
        Training cells with counts in ``layers[counts_layer]`` (or ``.X`` when `None`).
    labels_key
        Column of ``adata.obs`` with the cell types.
    counts_layer
        Layer with raw counts.
    n_latent, n_hidden, n_layers, gene_likelihood
        Options of :class:`scvi.model.SCVI`.
    max_epochs
        Training epochs (`None`: :func:`~scbranch.model.fit_scvi`'s default,
        :func:`~scbranch.model.default_scvi_epochs`).
    seed
        Seed of scvi-tools (initialisation and minibatches).
    min_cells_per_class
        Fewest training cells a type may have (default 3): a type of ``labels_key`` with fewer
        raises a `ValueError`, before scVI is trained.
    **train_kwargs
        Passed to :meth:`scvi.model.SCVI.train` (e.g. ``accelerator``).

    Examples
    --------
    >>> import scbranch as sb
    >>> adata = sb.datasets.pbmc68k()
    >>> base = sb.baselines.ScviResampling(adata, "cell_type", max_epochs=5)  # doctest: +SKIP
    >>> base.generate(n_cells=100, seed=0)  # doctest: +SKIP
    >>> base.generate(n_cells=100, seed=0, residual_noise=False)  # doctest: +SKIP
    """

    name = "scVI resampling"

    def __init__(
        self,
        adata: AnnData,
        labels_key: str,
        counts_layer: str | None = "counts",
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        gene_likelihood: str = "nb",
        max_epochs: int | None = None,
        seed: int = 0,
        min_cells_per_class: int = 3,
        **train_kwargs,
    ):
        super().__init__(adata, labels_key, min_cells_per_class)
        self.model_ = fit_scvi(
            adata,
            counts_layer=counts_layer,
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            gene_likelihood=gene_likelihood,
            max_epochs=max_epochs,
            seed=seed,
            **train_kwargs,
        )
        qz_mean, qz_var = self.model_.get_latent_representation(return_dist=True)
        self.qz_mean_ = np.asarray(qz_mean, dtype=np.float32)
        self.qz_std_ = np.sqrt(np.asarray(qz_var, dtype=np.float32))
        self.library_ = np.asarray(self.model_.adata.X.sum(1), dtype=np.float32).ravel()
        self.var_names_ = np.asarray(adata.var_names).astype(str)

    def _sample(self, counts, rng, seed, residual_noise: bool = True):
        if residual_noise not in (True, False):
            raise ValueError(
                f"residual_noise={residual_noise!r}: True draws counts from scVI's likelihood, "
                "False gives their expected log-normalised values."
            )
        source = np.concatenate(
            [
                rng.choice(np.flatnonzero(self.labels_ == c), size=n, replace=True)
                for c, n in counts.items()
            ]
        )
        z = self.qz_mean_[source] + self.qz_std_[source] * rng.standard_normal(
            (len(source), self.qz_mean_.shape[1]), dtype=np.float32
        )
        library, batch = self.library_[source], np.zeros(len(source), dtype=np.int64)
        if not residual_noise:
            return {
                "X": expected_log_counts(self.model_, z, library, batch),
                "var_names": self.var_names_,
                "obsm": {"X_scVI": z},
            }
        _, sampled = decode_latents(self.model_, z, library, batch, seed)
        return {
            "X": log_normalize(sampled),
            "var_names": self.var_names_,
            "obsm": {"X_scVI": z},
            "layers": {"counts": sampled},
        }
