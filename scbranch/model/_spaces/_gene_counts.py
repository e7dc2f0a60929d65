"""Counts for spaces whose cells are genes: class size factors and the negative binomial decoder."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from ..._keys import Key
from ..._validation import (
    check_counts,
    check_finite,
    check_genes,
)
from .._counts import (
    cell_means,
    class_pools,
    counts_from_expression,
    draw_from_pools,
    sample_negative_binomial,
    size_factors,
)
from ._base import Decoded, Space, check_noise

#: Largest mean count a negative binomial draw gets (a numerical bound for generated
#: outliers, far above any real gene: a whole 10x cell holds 1e3-1e5 counts)
MAX_MEAN_COUNT = 1e9


class _SizeFactorCounts:
    """Counts from log-normalised expression through size factors observed in each class.

    ``counts_layer`` names the layer of raw counts behind the expression, or is `None` when
    the model normalises raw counts itself (``target_sum``): the factors are then the cells'
    totals over ``target_sum``.
    """

    def __init__(self, counts_layer: str | None, pools: list, nb: dict | None = None):
        self.counts_layer = counts_layer
        self.pools = list(pools)
        #: per-gene negative binomial around the decoded mean (``fit_negative_binomial``)
        self.nb = nb

    @staticmethod
    def factors_of(adata: AnnData, counts_layer: str, layer: str | None, genes) -> np.ndarray:
        """Per-cell factor of ``layers[counts_layer]`` against the expression (checked)."""
        if counts_layer not in adata.layers:
            raise KeyError(
                f"The model generates counts from adata.layers[{counts_layer!r}], which adata "
                f"lacks (layers: {list(adata.layers.keys())}): store the cells' raw counts "
                "there (a copy kept before normalising: `adata.layers['counts'] = "
                "adata.X.copy()`); each type's size factors come from them."
            )
        counts = adata.layers[counts_layer]
        expression = adata.layers[layer] if layer else adata.X
        columns = check_genes(adata, genes, "the model")
        if not np.array_equal(columns, np.arange(adata.n_vars)):
            counts, expression = counts[:, columns], expression[:, columns]
        where = f"adata.layers[{counts_layer!r}]"
        check_finite(counts, where)
        check_counts(counts, where)
        return size_factors(counts, expression)

    def decode(self, x: np.ndarray, codes: np.ndarray, seed: int, out: Decoded) -> None:
        factors = draw_from_pools(self.pools, codes, np.random.default_rng([seed, 2]))
        out.layers[Key.layers.COUNTS] = counts_from_expression(
            x, factors, np.random.default_rng([seed, 3])
        )
        out.obs[Key.obs.SIZE_FACTOR] = factors

    def decode_negative_binomial(
        self, x: np.ndarray, codes: np.ndarray, seed: int, out: Decoded, keep_counts: bool
    ) -> None:
        """Counts drawn around the decoded profiles ``x``; ``out.X`` their log-normalisation.

        The cell's size factor comes from its class (as for ``counts=True``), the mean is the
        gene's scaled decoded mean times its class's ratio for the gene (what the class holds
        outside the latent, ``class_ratios``), rescaled so that the cell's means sum to its
        library size (``cell_means``), and the noise the gene's fitted negative binomial, so
        the cells carry the counting noise and the variation the latent leaves out, as scVI's
        cells do. ``.X`` is ``log1p(counts / total * target_sum)``, like the
        set-up data (:class:`PcaSpace` then sets its PC scores back to the generated ones).
        """
        nb = self.nb
        factors = draw_from_pools(self.pools, codes, np.random.default_rng([seed, 2]))
        # A generated outlier far outside the data made Poisson rates numpy cannot draw ("lam
        # value too large", a model trained for 8,000 steps on pbmc68k_reduced); no real gene
        # comes near this many counts, so real-looking cells are untouched. expm1 stays finite
        # below 700 (a gene with scale 0 must give 0, not inf * 0); the products may overflow to
        # inf, which the bound takes back.
        with np.errstate(over="ignore"):
            mu = factors[:, None] * np.expm1(np.clip(x, 0.0, 700.0, dtype=np.float64))
            mu = mu * nb["scale"]
            if "class_ratio" in nb:  # models saved before the class ratios: the global mean
                mu = mu * nb["class_ratio"][codes]
            # the cell's depth is its size factor: the means sum to its library size, as real
            # counts sum to theirs (cell_means; an overflowed gene takes the cell's whole total)
            mu = np.nan_to_num(mu, posinf=MAX_MEAN_COUNT)
            mu = np.minimum(cell_means(mu, factors, nb["target_sum"]), MAX_MEAN_COUNT)
        counts = sample_negative_binomial(
            mu, nb["inverse_dispersion"], np.random.default_rng([seed, 4])
        )
        totals = np.maximum(counts.sum(1, keepdims=True), 1.0)
        out.X = np.log1p(counts * (nb["target_sum"] / totals)).astype(np.float32)
        if keep_counts:
            out.layers[Key.layers.COUNTS] = sp.csr_matrix(counts)
        out.obs[Key.obs.SIZE_FACTOR] = factors

    def state(self) -> dict:
        """Plain values and arrays (the counts part of a gene space's state)."""
        state = {"counts_layer": self.counts_layer or "", "size_factors": self.pools}
        if self.nb is not None:
            state["negative_binomial"] = self.nb
        return state


class _GeneSpace(Space):
    """Shared by the spaces that decode to log-normalised genes (PCA and expression)."""

    def __init__(self, *, counts: _SizeFactorCounts | None = None, **kwargs):
        super().__init__(**kwargs)
        self.counts = counts

    def _fit_counts(self, adata, setup, labels, n_classes) -> np.ndarray | None:
        """Size factors per class for counts; returns every set-up cell's factor."""
        factors = None
        if setup.get("target_sum"):
            factors = self._normalized_factors(adata)
            self.counts = _SizeFactorCounts(None, class_pools(factors, labels, n_classes))
        elif setup.get("counts_layer"):
            factors = _SizeFactorCounts.factors_of(
                adata, setup["counts_layer"], self.layer, self.var_names
            )
            self.counts = _SizeFactorCounts(
                setup["counts_layer"], class_pools(factors, labels, n_classes)
            )
        return factors

    def resolve_options(self, *, counts, batch, residual_noise) -> dict:  # noqa: D102
        if batch is not None:
            raise ValueError("`batch` applies to models decoded by scVI (from_scvi_model) only.")
        noise = check_noise(residual_noise)
        if counts and self.counts is None:
            return super().resolve_options(counts=True, batch=None, residual_noise=False)
        if noise == "nb" and (self.counts is None or self.counts.nb is None):
            raise ValueError(
                "residual_noise='nb' draws counts around the decoded mean and needs the raw "
                "counts at set-up: call `setup_anndata(..., counts_layer='counts')` (the layer "
                "with the counts behind the expression the PCA was computed on) and build the "
                "model again."
            )
        return {"counts": bool(counts), "batch": None, "residual_noise": noise}

    def layers_made(self, options) -> list[str]:  # noqa: D102
        return [Key.layers.COUNTS] if options.get("counts") else []

    def bytes_per_cell(self, options) -> int:  # noqa: D102
        genes = 0 if self.var_names is None else len(self.var_names)
        # float32 expression and its copies; counts: float64 values, floor, draws, sum
        return genes * (12 + (36 if options.get("counts") else 0))

    def _with_counts(self, x, codes, options, seed) -> Decoded:
        out = Decoded(X=x, var_names=self.var_names)
        if options.get("counts"):
            self.counts.decode(x, codes, seed, out)
        return out

    def _normalized_factors(self, adata) -> np.ndarray:
        """Size factors of raw counts the model normalises itself (target_sum models)."""
        raise NotImplementedError

    def class_data(self, adata, what):  # noqa: D102
        extras = {}
        if self.counts is not None and self.counts.counts_layer is None:
            extras["size_factors"] = self._normalized_factors(adata)
        elif self.counts is not None:
            extras["size_factors"] = _SizeFactorCounts.factors_of(
                adata, self.counts.counts_layer, self.layer, self.var_names
            )
        return self.encode(adata, what), extras

    def add_class(self, extras) -> None:  # noqa: D102
        if self.counts is not None:
            new = class_pools(extras["size_factors"], np.zeros(len(extras["size_factors"]), int), 1)
            self.counts.pools = [*self.counts.pools, *new]

    @property
    def default_noise(self) -> bool | str:
        """``"nb"`` when a negative binomial was fitted at set-up, else no noise.

        The negative binomial is fitted for a PCA decoded to genes set up with
        ``counts_layer``. New real cells decoded from their PC scores that way score like real
        cells (pbmc3k AUROC 0.50 vs 0.61 without, control 0.50); trained models on out-of-fold
        scores move toward them (0.58 vs 0.67; docs/benchmarks/noise_models.md).
        """
        has_nb = self.counts is not None and self.counts.nb is not None
        return "nb" if has_nb else False

    def state(self) -> dict:  # noqa: D102
        counts = self.counts.state() if self.counts is not None else {}
        return {**super().state(), **counts}

    @staticmethod
    def _counts_from_state(state: Mapping) -> _SizeFactorCounts | None:
        if "size_factors" not in state:
            return None
        nb = state.get("negative_binomial")
        if nb is not None:
            nb = {
                "scale": np.asarray(nb["scale"], dtype=np.float32),
                "inverse_dispersion": np.asarray(nb["inverse_dispersion"], dtype=np.float32),
                "target_sum": float(nb["target_sum"]),
            }
            if "class_ratio" in state["negative_binomial"]:
                nb["class_ratio"] = np.asarray(
                    state["negative_binomial"]["class_ratio"], dtype=np.float32
                )
        return _SizeFactorCounts(state.get("counts_layer") or None, list(state["size_factors"]), nb)
