"""A latent PCA of the expression (``space="pca"``), decoded to genes and counts."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import scipy.sparse as sp

from ..._validation import (
    check_finite,
    check_genes,
    check_rep_key,
    get_matrix,
    to_dense,
)
from ...io._rows import is_on_disk, read_block, read_rows
from .._counts import (
    class_ratios,
    fit_negative_binomial,
)
from .._decoding import decode, fit_pca_decoder, out_of_fold_source, pca_fingerprint
from ._base import Decoded, register_space
from ._gene_counts import _GeneSpace

logger = logging.getLogger(__name__)

#: set-up cells (a seeded subsample beyond this) the negative binomial decoder is fitted on
NB_FIT_CELLS = 5000


@register_space
class PcaSpace(_GeneSpace):
    """A latent in ``obsm[obsm_key]``, decoded to genes when it is a PCA of the expression.

    scanpy's ``sc.pp.pca`` stores the loadings but not the centring mean; the decoder recovers
    it (``fit_pca_decoder``) and is kept only if it reproduces
    the stored coordinates. Without a decoder, generated cells carry the latent only. The
    space is built by :meth:`fit` from the set-up data: ``obsm_key``, ``layer`` and
    ``counts_layer`` are those given to
    :meth:`~scbranch.BranchedDiffusion.setup_anndata`.

    Parameters
    ----------
    n_dims
        Dimension of the latent (the number of columns of ``obsm[obsm_key]``).
    decoder
        The PCA map back to genes, ``{"kind", "loadings", "mean", "var_names",
        "residual_sd"}`` (loadings ``(n_dims, genes)``), or `None`: generated cells then carry
        the latent only.
    scores_of
        ``obsm`` key of the in-sample PCA when ``obsm[obsm_key]`` holds its out-of-fold scores
        (:func:`~scbranch.tl.pca_out_of_fold`), else `None`. Cells without
        ``obsm[obsm_key]`` are then encoded from ``obsm[scores_of]`` (e.g. new cells projected
        on the PCA), and the decoder is that PCA's.
    **kwargs
        Passed on to the base space: ``obsm_key`` (the ``obsm`` key of the latent), ``layer``
        (the expression the PCA was computed on; `None`: ``.X``) and ``counts`` (size factors
        per class for generating counts, or `None`).

    Examples
    --------
    The space of a model set up with ``obsm_key`` (built by the model, not by hand):

    >>> sb.BranchedDiffusion.setup_anndata(  # doctest: +SKIP
    ...     adata, labels_key="cell_type", obsm_key="X_pca"
    ... )
    >>> sb.BranchedDiffusion(adata).space  # doctest: +SKIP
    PcaSpace(obsm['X_pca'])
    """

    name = "pca"

    def __init__(
        self,
        *,
        n_dims: int,
        decoder: dict | None = None,
        scores_of: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.n_dims = int(n_dims)
        self.decoder = decoder
        #: the in-sample PCA key when ``obsm_key`` holds its out-of-fold scores
        #: (``tl.pca_out_of_fold``), else `None`
        self.scores_of = scores_of

    @classmethod
    def fit(cls, adata, setup, labels, n_classes, **kwargs):  # noqa: D102
        obsm_key = setup["obsm_key"]
        n_dims = np.asarray(adata.obsm[obsm_key]).shape[1]
        space = cls(
            obsm_key=obsm_key,
            layer=setup.get("layer"),
            n_dims=n_dims,
            scores_of=out_of_fold_source(adata, obsm_key),
        )
        space.decoder = fit_pca_decoder(adata, obsm_key, space.layer)
        if setup.get("counts_layer") and space.decoder is None:
            warnings.warn(
                f"counts_layer={setup['counts_layer']!r} is ignored: obsm[{obsm_key!r}] has no "
                "map back to genes (the loadings `sc.pp.pca` stores in varm['PCs']), so "
                "generated cells have no expression to turn into counts.",
                UserWarning,
                stacklevel=4,
            )
        elif setup.get("counts_layer"):
            factors = space._fit_counts(adata, setup, labels, n_classes)
            space.counts.nb = space._fit_negative_binomial(
                adata, setup["counts_layer"], factors, labels, n_classes
            )
        return space

    def _fit_negative_binomial(
        self,
        adata,
        counts_layer: str,
        factors: np.ndarray,
        labels: np.ndarray | None,
        n_classes: int,
    ) -> dict:
        """Per-gene negative binomial of counts around the decoded PCA (``residual_noise="nb"``).

        Fitted on at most :data:`NB_FIT_CELLS` set-up cells (seeded), with a ratio per class
        and gene for what the class holds outside the PCs (none with ``labels=None``).
        """
        n = adata.n_obs
        rows = np.sort(np.random.default_rng(0).choice(n, min(NB_FIT_CELLS, n), replace=False))
        columns = check_genes(adata, self.var_names, "the model")

        def rows_of(m):
            m = read_rows(m, rows) if is_on_disk(m) else m[rows]
            return to_dense(m[:, columns])

        z = np.asarray(get_matrix(adata, obsm_key=self.obsm_key)[rows], dtype=np.float32)
        return fit_negative_binomial(
            rows_of(adata.layers[counts_layer]),
            factors[rows],
            decode(self.decoder, z),
            rows_of(get_matrix(adata, layer=self.layer)),
            codes=None if labels is None else np.asarray(labels)[rows],
            n_classes=n_classes,
        )

    def class_data(self, adata, what):  # noqa: D102
        z, extras = super().class_data(adata, what)
        nb = None if self.counts is None else self.counts.nb
        if nb is not None and "class_ratio" in nb:
            # a new type's ratio per gene (fit_negative_binomial's class_ratio), from its
            # cells' observed counts and the counts their decoded means give
            columns = check_genes(adata, self.var_names, "the model")
            counts = get_matrix(adata, layer=self.counts.counts_layer)
            counts = read_block(counts, 0, counts.shape[0]) if is_on_disk(counts) else counts
            factors = extras["size_factors"].astype(np.float64)
            expected = np.expm1(np.clip(decode(self.decoder, z).astype(np.float64), 0.0, None))
            extras["observed_counts"] = sp.csr_matrix(counts[:, columns], dtype=np.float32)
            extras["decoded_counts"] = (factors[:, None] * expected * nb["scale"]).astype(
                np.float32
            )
        return z, extras

    def add_class(self, extras) -> None:  # noqa: D102
        super().add_class(extras)
        if "observed_counts" in extras:
            nb = self.counts.nb
            observed, decoded = extras["observed_counts"], extras["decoded_counts"]
            ratio = class_ratios(observed, decoded, np.zeros(observed.shape[0], int), 1)
            # a new dict: the known classes' rows stay as they are, bit for bit
            self.counts.nb = {
                **nb,
                "class_ratio": np.concatenate([nb["class_ratio"], ratio.astype(np.float32)]),
            }

    @property
    def n_input(self) -> int:  # noqa: D102
        return self.n_dims

    @property
    def var_names(self) -> np.ndarray | None:  # noqa: D102
        return None if self.decoder is None else self.decoder["var_names"]

    def encode(self, adata, what="the cells") -> np.ndarray:  # noqa: D102
        key = self.obsm_key
        if key not in adata.obsm and self.scores_of is not None and self.scores_of in adata.obsm:
            # New cells projected on the PCA (sc.tl.ingest, tl.embed_like(basis="pca")) have
            # out-of-sample scores already: what the learned out-of-fold scores stand for.
            logger.info("%s: obsm[%r] is missing; using obsm[%r].", what, key, self.scores_of)
            key = self.scores_of
        check_rep_key(adata, obsm_key=key)
        x = np.asarray(to_dense(get_matrix(adata, obsm_key=key)), dtype=np.float64)  # sparse too
        if x.shape[1] != self.n_dims:
            raise ValueError(
                f"adata.obsm[{self.obsm_key!r}] has {x.shape[1]} dimensions, the model "
                f"{self.n_dims}: {what} must be in the model's latent space (e.g. projected on "
                "the same PCA)."
            )
        check_finite(x, f"the representation of {what}")
        return x

    def resolve_options(self, *, counts, batch, residual_noise) -> dict:  # noqa: D102
        if (residual_noise or counts) and self.decoder is None:
            asked = "residual_noise" if residual_noise else "counts"
            raise ValueError(
                f"{asked} applies to models that decode a PCA to genes; this model (diffusing "
                f"obsm[{self.obsm_key!r}] without PCA loadings) has no PCA decoder: set-up "
                "found no loadings in varm['PCs'] (`sc.pp.pca` stores them), so a "
                "`counts_layer` given with it was ignored."
            )
        return super().resolve_options(counts=counts, batch=batch, residual_noise=residual_noise)

    def decode(self, z, codes, options, seed) -> Decoded:  # noqa: D102
        if self.decoder is None:
            return Decoded()
        noise = options.get("residual_noise", False)
        x = decode(
            self.decoder, z, residual_noise=noise is True, rng=np.random.default_rng([seed, 1])
        )
        if noise == "nb":
            out = Decoded(var_names=self.var_names)
            self.counts.decode_negative_binomial(x, codes, seed, out, bool(options.get("counts")))
            # The generated scores already hold the within-PC spread real cells have, noise
            # included: noise added there again made new real cells' own scores, decoded this
            # way, easy to tell from real cells (pbmc3k AUROC 0.71, dispersion 1.16). Keep the
            # drawn cells' part outside the PCs and put their scores back to the generated ones
            # (the same probe: AUROC 0.51, dispersion 0.97; control 0.50, 1.01).
            loadings, mean = self.decoder["loadings"], self.decoder["mean"]
            drift = (out.X - mean) @ loadings.T - z
            out.X = (out.X - drift @ loadings).astype(np.float32)
            return out
        return self._with_counts(x, codes, options, seed)

    def decode_estimates(self, z) -> np.ndarray | None:  # noqa: D102
        return None if self.decoder is None else decode(self.decoder, z)

    def record(self, decoded: bool) -> dict:  # noqa: D102
        out = super().record(decoded)
        if self.decoder is not None:
            # lets tl.embed_like check that a reference's PCA is the one these scores are in
            out["pca_fingerprint"] = pca_fingerprint(self.decoder)
        return out

    def state(self) -> dict:  # noqa: D102
        return {
            **super().state(),
            "n_dims": self.n_dims,
            "decoder": self.decoder,
            "scores_of": self.scores_of or "",
        }

    @classmethod
    def from_state(cls, state, directory=None, prefix=""):  # noqa: D102
        return cls(
            obsm_key=state["obsm_key"],
            layer=state.get("layer"),
            n_dims=state["n_dims"],
            decoder=state.get("decoder"),
            scores_of=state.get("scores_of") or None,  # models saved before it: None
            counts=cls._counts_from_state(state),
        )
