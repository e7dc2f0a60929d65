"""``scbranch.tl.compare_hierarchies``: how far two trees over the same cell types agree."""

from __future__ import annotations

import logging
from itertools import combinations

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import Key
from ..module import BranchTree
from ._branch_hierarchy import read_hierarchy

logger = logging.getLogger(__name__)


def _tree(adata: AnnData | None, tree_or_key) -> BranchTree:
    if isinstance(tree_or_key, BranchTree):
        return tree_or_key
    if adata is None:
        raise TypeError("Give trees, or an AnnData with the keys of its stored hierarchies.")
    return read_hierarchy(adata, tree_or_key)[0]


def clades(tree: BranchTree) -> dict[frozenset[str], float]:
    """The cell types below every internal node but the root, with the node's branch time."""
    root = tree.root
    return {
        frozenset(tree.classes[c] for c in b.classes): b.t_start
        for b in tree.branches
        if b.children and b.id != root
    }


def cophenetic(tree: BranchTree, classes: list[str]) -> np.ndarray:
    """Branch time of every pair of ``classes`` (in ``combinations`` order)."""
    idx = tree.class_index(classes)
    return np.array([tree.branch_time(int(a), int(b)) for a, b in combinations(idx, 2)])


def compare_hierarchies(
    adata: AnnData | None,
    key_a: str | BranchTree,
    key_b: str | BranchTree,
    *,
    key_added: str | None = Key.uns.HIERARCHY_COMPARISON,
) -> dict:
    """Agreement of two hierarchies over the same cell types (e.g. discovered and annotated).

    * Robinson-Foulds distance: the number of clades (sets of cell types below an internal
      node, the root excluded) that one tree has and the other does not; normalised by the
      clades of both, so 0 means the same topology and 1 no clade in common.
    * Cophenetic correlation: Pearson correlation, over all pairs of cell types, of the times
      at which the two trees join them (1: the same order and spacing of branch points).

    Parameters
    ----------
    adata
        AnnData holding the two hierarchies in ``.uns`` (from
        :func:`~scbranch.tl.branch_hierarchy` with two ``key_added``), or `None` when both are
        given as trees.
    key_a, key_b
        Keys of the hierarchies in ``adata.uns``, or :class:`~scbranch.module.BranchTree` objects
        (e.g. ``model.tree``).
    key_added
        Store the result (h5ad-safe) in ``adata.uns[key_added]`` (a record for the file;
        :func:`scbranch.pl.compare_hierarchies` draws from the two trees themselves);
        `None`: do not store.

    Returns
    -------
    ``{"robinson_foulds", "robinson_foulds_normalized", "cophenetic_correlation",
    "only_in_a", "only_in_b", "shared", "params"}``; the clade lists hold cell-type sets
    joined by ``" + "``.

    Examples
    --------
    >>> import scbranch as sb
    >>> adata = sb.datasets.pbmc68k()
    >>> sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_pca")
    >>> sb.tl.branch_hierarchy(
    ...     adata, groupby="cell_type", use_rep="X_pca",
    ...     hierarchy=["compartment", "lineage"], key_added="annotation",
    ... )  # fmt: skip
    >>> result = sb.tl.compare_hierarchies(adata, "scbranch_hierarchy", "annotation")
    >>> result["robinson_foulds"]  # doctest: +SKIP
    """
    tree_a, tree_b = _tree(adata, key_a), _tree(adata, key_b)
    if set(tree_a.classes) != set(tree_b.classes):
        only = sorted(set(tree_a.classes) ^ set(tree_b.classes))
        raise ValueError(
            f"The two hierarchies cover different cell types (not in both: {only}); compare "
            "trees over the same types."
        )
    if tree_a.n_classes < 2:
        raise ValueError(
            f"The hierarchies hold one cell type ({tree_a.classes[0]!r}): there is no branch "
            "point to compare. Compare hierarchies of two or more types."
        )
    ca, cb = clades(tree_a), clades(tree_b)
    shared = set(ca) & set(cb)
    only_a, only_b = set(ca) - shared, set(cb) - shared
    total = len(ca) + len(cb)
    classes = list(tree_a.classes)
    pa, pb = cophenetic(tree_a, classes), cophenetic(tree_b, classes)
    if len(pa) > 1 and np.ptp(pa) > 0 and np.ptp(pb) > 0:
        corr = float(np.corrcoef(pa, pb)[0, 1])
    else:
        corr = float("nan")
        # a star tree (or two types) puts every pair at one height: no correlation to compute
        logger.warning(
            "The cophenetic correlation is undefined (NaN): %s every pair of types at the same "
            "branch time (a star tree, or two types), so there is nothing to correlate.",
            "both trees join" if np.ptp(pa) == 0 and np.ptp(pb) == 0 else "one tree joins",
        )

    def names(sets) -> np.ndarray:
        ordered = sorted(sets, key=lambda s: (len(s), sorted(s)))
        return np.array([" + ".join(sorted(s)) for s in ordered], dtype=object)

    result = {
        "robinson_foulds": int(len(only_a) + len(only_b)),
        "robinson_foulds_normalized": float((len(only_a) + len(only_b)) / total) if total else 0.0,
        "cophenetic_correlation": corr,
        "only_in_a": names(only_a),
        "only_in_b": names(only_b),
        "shared": names(shared),
        "params": {
            "key_a": key_a if isinstance(key_a, str) else "tree",
            "key_b": key_b if isinstance(key_b, str) else "tree",
        },
    }
    if key_added is not None and adata is not None:
        adata.uns[key_added] = result
    return result


def clade_table(result: dict) -> pd.DataFrame:
    """The clades of a comparison as a table: set of cell types and which tree has it."""
    rows = [
        {"clade": c, "in": where}
        for where, key in (("both", "shared"), ("a only", "only_in_a"), ("b only", "only_in_b"))
        for c in np.asarray(result[key]).tolist()
    ]
    return pd.DataFrame(rows, columns=["clade", "in"])
