"""What a simulated atlas is made from: parameters fitted to real cells.

Per-type mean profiles, per-gene dispersions and per-type library sizes
(:class:`AtlasParameters`, fitted by :func:`fit_atlas_parameters`), from which
:func:`~scbranch.datasets.simulate_atlas` draws its cells.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._validation import check_class_sizes, check_counts, check_obs_key

logger = logging.getLogger(__name__)

#: range the fitted per-gene NB dispersion ``theta`` is clipped to (variance mu + mu^2 / theta);
#: below 0.1 the method-of-moments estimate is ruled by a few outlying cells, above 1000 a gene
#: is Poisson for every practical purpose
THETA_RANGE = (0.1, 1000.0)
#: log-normal jitter of made-up genes: one factor per gene (its level), one per type and gene
_EXTRA_GENE_SD = (0.5, 0.25)


@dataclass
class AtlasParameters:
    """Negative-binomial parameters of cell types, fitted to real cells.

    Plain arrays only, so that they can be saved with
    :meth:`~scbranch.datasets.AtlasParameters.save` (``numpy.savez``) and passed to
    :func:`~scbranch.datasets.simulate_atlas` as ``parameters=``. Made by
    :func:`fit_atlas_parameters`.

    Attributes
    ----------
    genes
        Gene names, shape ``(G,)``.
    source_genes
        The real gene each gene's profile was taken from (the gene itself, except for genes made
        up to reach ``n_genes``), shape ``(G,)``.
    types
        Cell-type names, shape ``(K,)``.
    profiles
        Expected share of a cell's counts taken by each gene, per type; rows sum to 1,
        shape ``(K, G)``.
    theta
        Negative-binomial dispersion of each gene (variance ``mu + mu**2 / theta``), ``(G,)``.
    log_library_mean, log_library_sd
        Mean and standard deviation of the log total counts of a cell (over the ``G`` genes),
        per type, shape ``(K,)``.
    type_fractions
        Share of the reference's cells in each type, shape ``(K,)``.

    Examples
    --------
    >>> import scbranch as sb
    >>> params = sb.datasets.fit_atlas_parameters(sb.datasets.pbmc68k(), n_genes=100)
    >>> params.save("pbmc_parameters.npz")
    >>> sb.datasets.AtlasParameters.load("pbmc_parameters.npz").profiles.shape
    (10, 100)
    """

    genes: np.ndarray
    source_genes: np.ndarray
    types: np.ndarray
    profiles: np.ndarray
    theta: np.ndarray
    log_library_mean: np.ndarray
    log_library_sd: np.ndarray
    type_fractions: np.ndarray

    def __post_init__(self) -> None:
        self.genes = np.asarray(self.genes, dtype=str)
        self.source_genes = np.asarray(self.source_genes, dtype=str)
        self.types = np.asarray(self.types, dtype=str)
        for name in ("profiles", "theta", "log_library_mean", "log_library_sd", "type_fractions"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        n_types, n_genes = len(self.types), len(self.genes)
        shapes = {
            "source_genes": (n_genes,),
            "profiles": (n_types, n_genes),
            "theta": (n_genes,),
            "log_library_mean": (n_types,),
            "log_library_sd": (n_types,),
            "type_fractions": (n_types,),
        }
        for name, shape in shapes.items():
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"AtlasParameters.{name} has shape {getattr(self, name).shape}; with "
                    f"{n_types} types and {n_genes} genes it must be {shape}."
                )
        if not pd.Index(self.genes).is_unique or not pd.Index(self.types).is_unique:
            raise ValueError("AtlasParameters needs unique gene names and unique type names.")
        numeric = [getattr(self, name) for name in shapes if name != "source_genes"]
        if not all(np.isfinite(a).all() for a in numeric):
            raise ValueError("AtlasParameters holds NaN or infinite values; fit them again.")
        if (self.profiles < 0).any() or not np.allclose(self.profiles.sum(1), 1.0, atol=1e-6):
            raise ValueError("AtlasParameters.profiles must be >= 0 with rows summing to 1.")
        if (self.theta <= 0).any() or (self.log_library_sd < 0).any():
            raise ValueError("AtlasParameters.theta must be positive and log_library_sd >= 0.")
        if (self.type_fractions < 0).any() or self.type_fractions.sum() <= 0:
            raise ValueError("AtlasParameters.type_fractions must be non-negative, not all 0.")

    @property
    def n_types(self) -> int:
        """Number of cell types."""
        return len(self.types)

    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return len(self.genes)

    def save(self, path: str | os.PathLike) -> None:
        """Write the arrays to an ``.npz`` file.

        Read back with :meth:`~scbranch.datasets.AtlasParameters.load`.
        """
        np.savez(path, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> AtlasParameters:
        """Read parameters written by :meth:`~scbranch.datasets.AtlasParameters.save`.

        No pickled objects are loaded.
        """
        with np.load(path, allow_pickle=False) as data:
            return cls(**{f.name: data[f.name] for f in fields(cls)})


def _counts_matrix(adata: AnnData, counts_layer: str | None) -> sp.csr_matrix:
    if counts_layer is None:
        m, where = adata.X, "adata.X"
    elif counts_layer in adata.layers:
        m, where = adata.layers[counts_layer], f"adata.layers[{counts_layer!r}]"
    else:
        raise KeyError(
            f"counts_layer={counts_layer!r} is not in adata.layers (available: "
            f"{list(adata.layers.keys())}). Pass the layer holding raw counts, or "
            "counts_layer=None when adata.X holds them."
        )
    if m is None:
        raise ValueError("adata.X is empty; pass counts_layer= naming the layer with the counts.")
    check_counts(m, where)
    return sp.csr_matrix(m, dtype=np.float64)


def fit_atlas_parameters(
    adata: AnnData,
    labels_key: str = "cell_type",
    counts_layer: str | None = "counts",
    *,
    n_genes: int = 2000,
    min_cells_per_type: int = 3,
    seed: int = 0,
) -> AtlasParameters:
    """Fit per-type negative-binomial parameters of raw counts, for ``simulate_atlas``.

    * Genes: those with counts; when there are more than ``n_genes``, the ``n_genes`` whose
      per-type mean expression (log1p of counts per 10,000) varies most across types. When
      there are fewer, genes are made up to reach ``n_genes``: each copies the per-type profile
      and dispersion of a real gene (every real gene copied in turn, in random order), times a
      log-normal factor per gene (sd 0.5) and per type and gene (sd 0.25), and is named after
      its source (``"CD74-sim1"``). ``source_genes`` records the source of every gene.
    * Profiles: per type, the share of the type's counts taken by each gene (pooled over its
      cells), shrunk towards the profile of all cells by one average cell's worth of counts so
      that a gene unseen in a small type keeps a small expected count.
    * Dispersion: one ``theta`` per gene, by the method of moments within types (each cell's
      expected count is its total times its type's profile), pooled across types and clipped to
      ``THETA_RANGE``.
    * Library size: per type, a log-normal whose mean and variance are those of the cells' log
      total counts (over the genes kept, made-up genes counting as their sources do) less the
      negative-binomial noise of the counts (delta method), so that simulated totals vary as
      the reference's do.

    Parameters
    ----------
    adata
        Reference cells with raw counts and cell-type labels.
    labels_key
        Column of ``adata.obs`` with the cell types.
    counts_layer
        Layer with the raw counts; `None` for ``adata.X``.
    n_genes
        Number of genes of the parameters.
    min_cells_per_type
        Types with fewer cells raise an error (remove or merge them first).
    seed
        Seed of the made-up genes.

    Returns
    -------
    The fitted parameters (types in the order of the labels' categories).

    Examples
    --------
    >>> import scbranch as sb
    >>> params = sb.datasets.fit_atlas_parameters(sb.datasets.pbmc68k(), n_genes=1000)
    >>> params.n_types, params.n_genes, int((params.genes != params.source_genes).sum())
    (10, 1000, 235)
    """
    if int(n_genes) < 1:
        raise ValueError(f"n_genes must be a positive integer, got {n_genes}.")
    n_genes = int(n_genes)
    check_obs_key(adata, labels_key)
    X = _counts_matrix(adata, counts_layer)
    cats = pd.Categorical(adata.obs[labels_key]).remove_unused_categories()
    types = [str(c) for c in cats.categories]
    codes = np.asarray(cats.codes, dtype=np.int64)
    check_class_sizes(
        codes, types, max(int(min_cells_per_type), 2), labels_key,
        why="too few to fit a library-size distribution. Remove them, merge them into a "
        "related type, or lower `min_cells_per_type`.",
    )  # fmt: skip
    n_cells, n_types = X.shape[0], len(types)
    member = sp.csr_matrix(
        (np.ones(n_cells), (codes, np.arange(n_cells))), shape=(n_types, n_cells)
    )

    totals = np.asarray(X.sum(1)).ravel()
    per_type = np.asarray((member @ X).todense())
    cp10k = per_type / np.maximum(member @ totals, 1.0)[:, None] * 1e4
    score = np.log1p(cp10k).var(axis=0)
    expressed = np.flatnonzero(per_type.sum(0) > 0)
    if expressed.size == 0:
        raise ValueError("The reference has no counts at all; pass cells with raw counts.")
    keep = expressed
    if expressed.size > n_genes:
        order = np.argsort(-score[expressed], kind="stable")[:n_genes]
        keep = np.sort(expressed[order])
    X = X[:, keep]

    library = np.asarray(X.sum(1)).ravel()
    s1 = np.asarray((member @ X).todense())
    s2 = np.asarray((member @ X.multiply(X)).todense())
    sxl = np.asarray((member.multiply(library[None, :]).tocsr() @ X).todense())
    sl, sl2 = member @ library, member @ library**2
    if (sl <= 0).any():
        empty = [types[k] for k in np.flatnonzero(sl <= 0)]
        raise ValueError(f"Type(s) {empty} have no counts in the genes kept; remove them.")
    p = s1 / sl[:, None]
    # sum over a type's cells of (x - L p)^2 - L p, with L each cell's total: method of moments
    excess = (s2 - 2 * p * sxl + p**2 * sl2[:, None] - s1).sum(0)
    spread = (p**2 * sl2[:, None]).sum(0)
    phi = excess / np.maximum(spread, 1e-300)
    theta = 1.0 / np.clip(phi, 1.0 / THETA_RANGE[1], 1.0 / THETA_RANGE[0])
    overall = s1.sum(0) / sl.sum()
    prior = library.mean()
    profiles = (s1 + prior * overall) / (sl + prior)[:, None]

    log_mean, log_var = np.zeros(n_types), np.zeros(n_types)
    positive = library > 0
    pooled_var = float(np.var(np.log(library[positive]), ddof=1)) if positive.sum() > 1 else 0.0
    for k in range(n_types):
        cells = library[(codes == k) & positive]
        # a cell's total is its library plus the NB noise of its genes; the noise adds about
        # sum_g p_g^2 / theta_g + 1 / L to the variance of the log total (delta method):
        # removed, so that simulated totals vary as the reference's do
        noise = float((profiles[k] ** 2 / theta).sum() + np.mean(1.0 / cells))
        log_var[k] = (np.var(np.log(cells), ddof=1) if cells.size > 2 else pooled_var) - noise
        log_mean[k] = np.log(cells).mean() + noise / 2
    log_sd = np.sqrt(np.maximum(log_var, 0.0))

    genes = np.asarray(adata.var_names[keep], dtype=str)
    sources = genes.copy()
    n_extra = n_genes - genes.size
    if n_extra > 0:
        rng = np.random.default_rng(seed)
        n_rounds = -(-n_extra // genes.size)
        src = np.concatenate([rng.permutation(genes.size) for _ in range(n_rounds)])[:n_extra]
        level = rng.normal(0.0, _EXTRA_GENE_SD[0], n_extra)
        per_type_jitter = rng.normal(0.0, _EXTRA_GENE_SD[1], (n_types, n_extra))
        extra = profiles[:, src] * np.exp(level + per_type_jitter)
        copy = np.zeros(genes.size, dtype=np.int64)
        names = []
        for s in src:
            copy[s] += 1
            names.append(f"{genes[s]}-sim{copy[s]}")
        # made-up genes are as expressed as their sources: they add to the library
        profiles = np.hstack([profiles, extra])
        log_mean = log_mean + np.log(profiles.sum(1))
        profiles /= profiles.sum(1, keepdims=True)
        theta = np.concatenate([theta, theta[src]])
        sources = np.concatenate([sources, genes[src]])
        genes = np.concatenate([genes, np.asarray(names, dtype=str)])
    if not pd.Index(genes).is_unique:
        genes = _unique(genes)
    fractions = np.bincount(codes, minlength=n_types) / n_cells
    return AtlasParameters(
        genes=genes,
        source_genes=sources,
        types=np.asarray(types, dtype=str),
        profiles=profiles,
        theta=theta,
        log_library_mean=log_mean,
        log_library_sd=log_sd,
        type_fractions=fractions,
    )


def _unique(names: np.ndarray) -> np.ndarray:
    """Names made unique by suffixes (a real gene may already be called like a made-up one)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        n = seen.get(name, 0)
        seen[name] = n + 1
        out.append(name if n == 0 else f"{name}-{n}")
    return np.asarray(out, dtype=str)


@functools.lru_cache(maxsize=4)
def _default_parameters(n_genes: int, seed: int) -> AtlasParameters:
    from ._pbmc import pbmc68k

    return fit_atlas_parameters(pbmc68k(n_comps=2), n_genes=n_genes, seed=seed)
