"""Log-normalised genes themselves (``space="expression"``)."""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from ..._validation import (
    TARGET_SUM_FIX,
    check_counts,
    check_finite,
    check_genes,
    get_matrix,
    to_dense,
)
from ...io._rows import RowMatrix, is_on_disk, iter_blocks, read_block, row_sums
from .._counts import (
    normalize_block,
)
from ._base import Decoded, register_space
from ._gene_counts import _GeneSpace

logger = logging.getLogger(__name__)

#: above this many genes an expression model logs where its cells stand (measured on 765 and
#: 2,000 PBMC genes in docs/spaces.md, "How the spaces compare")
EXPRESSION_ADVICE_GENES = 300


@register_space
class ExpressionSpace(_GeneSpace):
    """Log-normalised genes (``layer`` or ``.X``), diffused as they are; no encoder.

    The space is built by :meth:`fit` from the set-up data: ``layer``, ``target_sum`` and
    ``counts_layer`` are those given to :meth:`~scbranch.BranchedDiffusion.setup_anndata`.

    Parameters
    ----------
    genes
        The model's genes, in order.
    target_sum
        When set, ``layer`` (or ``.X``) holds raw counts that the space log-normalises itself,
        ``log1p(counts / total * target_sum)``, block by block as cells are read, and counts
        are generated with size factors ``total / target_sum``. `None` (or 0): the layer is
        log-normalised expression already.
    **kwargs
        Passed on to the base space: ``layer`` (the layer of expression, `None`: ``.X``) and
        ``counts`` (size factors per class for generating counts, or `None`).

    Examples
    --------
    >>> sb.BranchedDiffusion.setup_anndata(  # doctest: +SKIP
    ...     adata, labels_key="cell_type", layer="lognorm"
    ... )
    >>> sb.BranchedDiffusion(adata).space  # doctest: +SKIP
    ExpressionSpace(expression (layers['lognorm']))
    """

    name = "expression"

    def __init__(
        self,
        *,
        genes: np.ndarray,
        target_sum: float | None = None,
        gene_max: np.ndarray | None = None,
        total: float | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.genes = np.asarray(genes).astype(str)
        self.target_sum = None if not target_sum else float(target_sum)
        #: each gene's largest value in the training cells (generated values are capped there)
        self.gene_max = None if gene_max is None else np.asarray(gene_max, dtype=np.float32)
        #: the sum of expm1 over genes every training cell shares (normalize_total's target),
        #: or `None` when the training cells do not share one
        self.total = None if not total else float(total)

    @classmethod
    def fit(cls, adata, setup, labels, n_classes, **kwargs):  # noqa: D102
        space = cls(
            layer=setup.get("layer"),
            genes=np.asarray(adata.var_names).astype(str),
            target_sum=setup.get("target_sum"),
        )
        space._fit_counts(adata, setup, labels, n_classes)
        space.gene_max, space.total = _profile_bounds(space.training_matrix(adata))
        if len(space.genes) > EXPRESSION_ADVICE_GENES:
            logger.warning(
                "Diffusing %d genes directly: on whole transcriptomes generated cells are told "
                "apart from real ones far more easily than in the default PCA space (measured "
                "in docs/spaces.md, 'How the spaces compare'). For many genes, set up "
                "out-of-fold PC scores (`sb.tl.pca_out_of_fold`, obsm_key='X_pca_oof') with "
                "counts_layer, or an scVI latent (`from_scvi_model`).",
                len(space.genes),
            )
        return space

    def normalize(self, block):
        """``log1p(counts / total * target_sum)`` of a block of raw counts (target_sum models)."""
        return normalize_block(block, self.target_sum)

    def training_matrix(self, adata: AnnData):
        """The set-up cells' expression: read in blocks when on disk or normalised on the way."""
        m = get_matrix(adata, layer=self.layer)
        if self.target_sum is not None or is_on_disk(m):
            return RowMatrix(m, transform=self.normalize if self.target_sum else None)
        return m

    def _normalized_factors(self, adata) -> np.ndarray:
        columns = check_genes(adata, self.genes, "the model")
        m = get_matrix(adata, layer=self.layer)
        if not np.array_equal(columns, np.arange(adata.n_vars)):
            m = read_block(m, 0, m.shape[0]) if is_on_disk(m) else m
            m = m[:, columns]
        return np.maximum(row_sums(m), 1.0) / self.target_sum

    @property
    def hierarchy_rep(self) -> tuple[str | None, str | None, float | None]:  # noqa: D102
        # a hierarchy learned on the raw counts is not one of the normalised expression
        return None, self.layer, self.target_sum

    @property
    def n_input(self) -> int:  # noqa: D102
        return len(self.genes)

    @property
    def var_names(self) -> np.ndarray:  # noqa: D102
        return self.genes

    @property
    def output_key(self) -> None:  # noqa: D102
        return None

    def encode(self, adata, what="the cells") -> np.ndarray:  # noqa: D102
        # the model's genes, in its order (extra genes are left out)
        columns = check_genes(adata, self.genes, "the model")
        m = get_matrix(adata, layer=self.layer)
        if is_on_disk(m):
            m = read_block(m, 0, m.shape[0])
        m = m[:, columns]
        check_finite(m, f"the representation of {what}")
        if self.target_sum is not None:
            check_counts(m, f"the counts of {what}", fix=TARGET_SUM_FIX)
            m = self.normalize(m)
        return to_dense(m)

    def resolve_options(self, *, counts, batch, residual_noise) -> dict:  # noqa: D102
        if residual_noise:
            raise ValueError(
                "residual_noise applies to models that decode a PCA to genes; this model "
                "(diffusing genes) has no PCA decoder."
            )
        return super().resolve_options(counts=counts, batch=batch, residual_noise=False)

    def decode(self, z, codes, options, seed) -> Decoded:  # noqa: D102
        # log-normalised expression is never negative
        x = np.clip(z, 0.0, None)
        out = Decoded(X=x, var_names=self.var_names)
        if options.get("counts"):
            self.counts.decode(self.count_profiles(x), codes, seed, out)
        return out

    def decode_estimates(self, z) -> np.ndarray:  # noqa: D102
        return np.clip(z, 0.0, None)

    def count_profiles(self, x: np.ndarray) -> np.ndarray:
        """The generated values counts are drawn around: profiles real cells could have.

        No gene above its largest training value (a diffused value beyond it is
        extrapolation: one gene at 14 in log1p units, expm1 1.2 million, gave a cell over 30
        times the counts of any real one) and, when every training cell's expression sums to one
        total (``sc.pp.normalize_total``), rescaled to it as normalisation leaves real cells
        (generated cells summed to about twice it, from small values of the many genes a type
        does not express, so their counts had twice real cells' library sizes). ``.X`` keeps
        the generated values: bounding them there too moved the classifier's AUROC from
        0.936 to 0.952 on pbmc68k_reduced (docs/benchmarks/expression_counts.md).
        """
        if self.gene_max is not None:
            x = np.minimum(x, self.gene_max)
        if self.total is not None:
            expm1 = np.expm1(x.astype(np.float64))
            sums = expm1.sum(1, keepdims=True)
            x = np.log1p(expm1 * (self.total / np.maximum(sums, 1e-12))).astype(np.float32)
            x = np.minimum(x, self.gene_max) if self.gene_max is not None else x
        return x.astype(np.float32, copy=False)

    def describe(self) -> str:  # noqa: D102
        where = f"layers[{self.layer!r}]" if self.layer else ".X"
        if self.target_sum is not None:
            return f"expression (log1p(CP{self.target_sum:g}) of the counts in {where})"
        return f"expression ({where})"

    def state(self) -> dict:  # noqa: D102
        return {
            **super().state(),
            "genes": self.genes,
            "target_sum": self.target_sum or 0.0,
            # models saved before these bounds decode as they did (no cap, no rescaling)
            "gene_max": self.gene_max,
            "total": self.total or 0.0,
        }

    @classmethod
    def from_state(cls, state, directory=None, prefix=""):  # noqa: D102
        return cls(
            layer=state.get("layer"),
            genes=state["genes"],
            target_sum=state.get("target_sum") or None,
            gene_max=state.get("gene_max"),
            total=state.get("total") or None,
            counts=cls._counts_from_state(state),
        )


#: relative spread of the training cells' totals below which they count as normalised to one
TOTAL_RTOL = 1e-3


def _profile_bounds(m) -> tuple[np.ndarray, float | None]:
    """Each gene's largest training value, and the total every training cell sums to (or None).

    ``m``: the training expression (log-normalised; in memory, on disk or a
    :class:`~scbranch.io._rows.RowMatrix` that normalises raw counts block by block).
    """
    blocks = m.blocks() if isinstance(m, RowMatrix) else iter_blocks(m)
    gene_max, totals = None, []
    for _, _, block in blocks:
        top = block.max(0).toarray().ravel() if sp.issparse(block) else np.asarray(block).max(0)
        gene_max = top if gene_max is None else np.maximum(gene_max, top)
        expm1 = block.expm1() if sp.issparse(block) else np.expm1(np.asarray(block))
        totals.append(np.asarray(expm1.sum(1), dtype=np.float64).ravel())
    totals = np.concatenate(totals)
    median = float(np.median(totals))
    shared = median > 0 and float(np.std(totals)) <= TOTAL_RTOL * median
    return np.asarray(gene_max, dtype=np.float32), (median if shared else None)
