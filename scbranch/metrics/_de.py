"""Do generated cells keep the differences between types? Log fold changes and top markers.

Generators can match each type's distribution of expression and still get the differences
between types wrong (2025 benchmarks of single-cell generators found exactly that), and those
differences are what users take from the cells. Two measures, each computed on generated cells
and, identically, on real cells, so that :func:`scbranch.tl.evaluate` can set one against a
real-vs-real control:

* per-gene log fold change of a type against the rest (or against another type), from mean
  normalised expression with a pseudocount: ``log2(mean expm1(x_c) + 1) - log2(mean
  expm1(x_rest) + 1)``, the rest being the class-balanced mean of the other types (so the
  composition of a generated set does not move it); compared between two sets by Spearman
  correlation across genes;
* the top markers of each type by :func:`scanpy.tl.rank_genes_groups` (t-test, scanpy's
  default, one type against the rest), compared by the fraction of the top ``n_top`` genes two
  sets share.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import spearmanr

from .._validation import check_finite

#: pseudocount of the log fold change, in normalised-expression units (counts per 10,000)
PSEUDOCOUNT = 1.0
#: markers compared per type
N_TOP_MARKERS = 50


def _class_means(x, labels: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    """Mean normalised expression ``expm1(max(x, 0))`` per group (groups x genes)."""
    out = []
    for g in groups:
        rows = x[labels == g]
        if sp.issparse(rows):
            rows = sp.csr_matrix(rows, dtype=np.float64)
            rows.data = np.expm1(np.clip(rows.data, 0.0, None))
            out.append(np.asarray(rows.mean(0)).ravel())
        else:
            out.append(np.expm1(np.clip(np.asarray(rows, np.float64), 0.0, None)).mean(0))
    return np.vstack(out)


def log_fold_changes(
    x,
    labels: Sequence,
    groups: Sequence[str],
    *,
    pairs: Sequence[tuple[str, str]] = (),
    pseudocount: float = PSEUDOCOUNT,
) -> pd.DataFrame:
    """Per-gene log2 fold change of each group against the rest, and of chosen pairs.

    Parameters
    ----------
    x
        Log-normalised expression (cells x genes; log1p of counts per 10,000). Negative values
        (possible for decoded expression) count as 0.
    labels
        Group of every cell.
    groups
        Groups to compare; each needs at least one cell. "The rest" of a group is the
        class-balanced mean of the other groups listed here.
    pairs
        ``(a, b)`` pairs of groups: the fold change of ``a`` against ``b``.
    pseudocount
        Added to the mean normalised expression before the logarithm.

    Returns
    -------
    DataFrame of genes x comparisons, columns ``"<group>"`` and ``"<a> vs <b>"``.

    Examples
    --------
    >>> x = np.log1p(np.array([[3.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
    >>> log_fold_changes(x, ["a", "a", "b", "b"], ["a", "b"])["a"].round(1).tolist()
    [2.0, -1.0]
    """
    labels = np.asarray(labels).astype(str)
    groups = [str(g) for g in groups]
    if len(groups) < 2 and not pairs:
        raise ValueError("Fold changes need at least two groups.")
    missing = [g for g in {*groups, *(p for pair in pairs for p in pair)} if g not in set(labels)]
    if missing:
        raise ValueError(f"Group(s) {sorted(missing)} have no cells.")
    names = list(dict.fromkeys([*groups, *(p for pair in pairs for p in pair)]))
    means = np.log2(_class_means(x, labels, names) + pseudocount)
    index = {g: i for i, g in enumerate(names)}
    columns = {}
    in_groups = np.array([index[g] for g in groups])
    for g in groups:
        others = in_groups[in_groups != index[g]]
        columns[g] = means[index[g]] - means[others].mean(0)
    for a, b in pairs:
        columns[f"{a} vs {b}"] = means[index[a]] - means[index[b]]
    return pd.DataFrame(columns)


def top_markers(
    x, labels: Sequence, groups: Sequence[str], *, n_top: int = N_TOP_MARKERS, var_names=None
) -> dict[str, np.ndarray]:
    """The ``n_top`` highest-ranked genes of each group against the rest (scanpy, t-test).

    Parameters
    ----------
    x
        Log-normalised expression (cells x genes).
    labels
        Group of every cell; cells of other groups are left out.
    groups
        Groups to rank (at least two, each with at least two cells).
    n_top
        Genes kept per group.
    var_names
        Gene names (default ``"0"``, ``"1"``, ...).

    Returns
    -------
    Group -> array of gene names, best first.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.poisson(1.0, size=(40, 5)).astype(float)
    >>> x[:20, 3] += 5
    >>> top_markers(np.log1p(x), ["a"] * 20 + ["b"] * 20, ["a", "b"], n_top=1)["a"].tolist()
    ['3']
    """
    import scanpy as sc
    from anndata import AnnData

    labels = np.asarray(labels).astype(str)
    groups = [str(g) for g in groups]
    if len(set(groups)) < 2:
        raise ValueError(
            "top_markers ranks each group against the others: give at least two groups, "
            f"got {groups}."
        )
    if isinstance(n_top, bool) or int(n_top) != n_top or n_top < 1:
        raise ValueError(f"n_top must be a whole number >= 1, got {n_top!r}.")
    keep = np.isin(labels, groups)
    check_finite(x, "`x` (the cells top_markers ranks)")  # NaN ranked into markers, silently
    n_genes = x.shape[1]
    names = np.asarray(var_names if var_names is not None else np.arange(n_genes)).astype(str)
    sub = x[keep]
    obs = pd.DataFrame(
        {"group": pd.Categorical(labels[keep], categories=groups)},
        index=pd.Index([f"cell{i}" for i in range(int(keep.sum()))]),
    )
    data = AnnData(
        X=sp.csr_matrix(sub, dtype=np.float32) if sp.issparse(sub) else np.asarray(sub, np.float32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(names, dtype=str)),
    )
    n_top = int(min(n_top, n_genes))
    with np.errstate(divide="ignore", invalid="ignore"):
        sc.tl.rank_genes_groups(
            data, "group", method="t-test", n_genes=n_top, use_raw=False, key_added="de"
        )
    ranked = data.uns["de"]["names"]
    return {g: np.asarray(ranked[g]).astype(str) for g in groups}


def lfc_spearman(a: pd.DataFrame, b: pd.DataFrame) -> pd.Series:
    """Spearman correlation across genes of matching columns of two fold-change tables.

    Parameters
    ----------
    a, b
        Fold-change tables (genes x comparisons, as :func:`log_fold_changes` returns) over the
        same genes in the same order; every column of ``a`` must be in ``b``.

    Returns
    -------
    Series indexed by the columns of ``a``: the correlation of each, NaN where either column is
    constant across genes.

    Examples
    --------
    >>> a = pd.DataFrame({"B": [1.0, 2.0, 3.0]})
    >>> float(lfc_spearman(a, a * 2)["B"])
    1.0
    """
    out = {}
    for col in a.columns:
        u, v = a[col].to_numpy(), b[col].to_numpy()
        out[col] = (
            float("nan") if np.ptp(u) == 0 or np.ptp(v) == 0 else float(spearmanr(u, v).statistic)
        )
    return pd.Series(out)


def marker_overlap(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> pd.Series:
    """Fraction of each group's top markers that two rankings share.

    Parameters
    ----------
    a, b
        Group -> array of top marker genes (as :func:`top_markers` returns). Only groups in
        both are compared.

    Returns
    -------
    Series indexed by group: the number of genes ``a[group]`` and ``b[group]`` share over the
    number in ``a[group]``.

    Examples
    --------
    >>> marker_overlap({"B": np.array(["CD79A", "MS4A1"])}, {"B": np.array(["MS4A1", "CD3E"])})
    B    0.5
    dtype: float64
    """
    return pd.Series(
        {g: len(set(a[g]) & set(b[g])) / max(len(a[g]), 1) for g in a if g in b}, dtype=float
    )
