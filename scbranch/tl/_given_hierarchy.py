"""Hierarchies users bring (Newick, nested labels, annotation levels, scanpy's dendrogram).

The forms are read into one topology (:mod:`scbranch.module._topology`); the branch times come
from the same similarity curves discovery uses (or from Newick lengths).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from ..module import VPSDE, BranchTree, global_standardizer
from ..module._discovery import (
    DiscoveryOptions,
    DiscoveryResult,
    crossover_times,
    discovery_curves,
    standardized_rows,
    subsample_per_class,
)
from ..module._topology import (
    HierarchyError,
    Node,
    from_linkage,
    from_nested,
    parse_newick,
    topology_of,
    tree_from_topology,
)


def is_given(hierarchy, adata: AnnData | None) -> bool:
    """Whether ``hierarchy`` is a topology a user gives (not a tree or a stored record)."""
    if isinstance(hierarchy, Node):
        return True
    if isinstance(hierarchy, Mapping):
        return "tree" not in hierarchy and "membership" not in hierarchy
    if isinstance(hierarchy, str):
        if adata is not None and hierarchy in adata.uns:
            entry = adata.uns[hierarchy]
            return isinstance(entry, Mapping) and "linkage" in entry
        return True  # a Newick string or obs column(s); a missing key is reported there
    return isinstance(hierarchy, Sequence | np.ndarray)


def _from_columns(adata: AnnData, columns: Sequence[str], groupby: str, classes) -> Node:
    """Annotation levels (coarse to fine) as a nested topology over the ``groupby`` types."""
    obs = adata.obs
    missing = [c for c in columns if c not in obs.columns]
    if missing:
        close = {
            c: difflib.get_close_matches(c, [str(k) for k in obs.columns], n=1) for c in missing
        }
        hints = [f"{c!r}: did you mean {m[0]!r}?" for c, m in close.items() if m]
        raise KeyError(
            f"Hierarchy column(s) {missing} are not in adata.obs"
            + (f" ({'; '.join(hints)})." if hints else ".")
        )
    if groupby in columns:  # pandas said "Grouper for 'cell_type' not 1-dimensional"
        raise HierarchyError(
            f"obs[{groupby!r}] holds the types themselves; the annotation levels are the "
            f"coarser columns above them (e.g. ['compartment', 'lineage']), without {groupby!r}."
        )
    for column in columns:  # read as the group "nan", a missing level put its types elsewhere
        types = obs.loc[obs[column].isna(), groupby]
        if len(types):
            raise HierarchyError(
                f"obs[{column!r}] has no value for {len(types)} cell(s) of the type(s) "
                f"{sorted(map(str, pd.unique(types)))}: every type must lie in a group of each "
                "level. Fill them in, or give the hierarchy as a nested dict."
            )
    levels = [*columns, groupby]
    values = obs[levels].astype(str)
    # every group of a level lies in exactly one group of the level above it
    for coarse, fine in zip(levels[:-1], levels[1:], strict=True):
        parents = values.groupby(fine, observed=True)[coarse].unique()
        split = {g: sorted(p) for g, p in parents.items() if len(p) > 1}
        if split:
            g, p = next(iter(split.items()))
            what = "label" if fine == groupby else "group"
            raise HierarchyError(
                f"The {what} {g!r} of obs[{fine!r}] lies in {len(p)} groups of obs[{coarse!r}] "
                f"({p}); annotation levels must nest (each {what} in one coarser group). Fix "
                "the annotation, or give the hierarchy as a nested dict."
            )

    def nest(frame: pd.DataFrame, depth: int):
        if depth == len(levels) - 1:
            return sorted(pd.unique(frame[groupby]), key=list(classes).index)
        out = {}
        for group in pd.unique(frame[levels[depth]]):
            out[str(group)] = nest(frame[frame[levels[depth]] == group], depth + 1)
        return out

    return from_nested(nest(values[values[groupby].isin(classes)], 0))


def _from_dendrogram(entry: Mapping, groupby: str, classes, key: str) -> Node:
    """The result of scanpy's ``sc.tl.dendrogram``: a linkage over its groupby's categories."""
    if str(entry.get("groupby", groupby)) not in (groupby, str([groupby])):
        raise HierarchyError(
            f"adata.uns[{key!r}] is a dendrogram of {entry.get('groupby')!r}, not of "
            f"{groupby!r}; run `sc.tl.dendrogram(adata, groupby={groupby!r})`."
        )
    # scanpy stores the leaves in plotting order with their index among the categories; the
    # linkage numbers the categories in their own order
    ordered = [str(c) for c in np.asarray(entry["categories_ordered"]).tolist()]
    idx = [int(i) for i in np.asarray(entry["categories_idx_ordered"]).tolist()]
    categories = [""] * len(ordered)
    for name, i in zip(ordered, idx, strict=True):
        categories[i] = name
    return from_linkage(np.asarray(entry["linkage"]), categories)


def _scbranch_tree(adata: AnnData, hierarchy) -> BranchTree | None:
    """``hierarchy`` as a scbranch tree when it is one, else `None`.

    A :class:`BranchTree` (``model.tree``, ``tl.read_hierarchy``), its ``to_dict()``, a stored
    record, or the ``uns`` key of one.
    """
    if isinstance(hierarchy, str) and hierarchy in adata.uns:
        hierarchy = adata.uns[hierarchy]
    if isinstance(hierarchy, BranchTree):
        return hierarchy
    if isinstance(hierarchy, Mapping) and ("tree" in hierarchy or "membership" in hierarchy):
        return BranchTree.from_dict(hierarchy.get("tree", hierarchy))
    return None


def timed_topology(
    x: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    sde: VPSDE,
    options: DiscoveryOptions,
    topology: Node,
    *,
    times: str = "data",
    multifurcations: str = "keep",
) -> tuple[BranchTree, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A topology's tree, timed on the similarity curves of standardised cells, and the curves.

    Shared by :func:`given_record` (all cells) and ``tl.branch_stability`` (each replicate).
    """
    curves = discovery_curves(x, labels, len(classes), sde, options)
    tree = tree_from_topology(
        topology,
        classes,
        times=times,
        multifurcations=multifurcations,
        curves=curves,
        epsilon=options.epsilon,
        min_branch_length=options.min_branch_length,
    )
    return tree, curves


def read_topology(adata: AnnData, hierarchy, groupby: str, classes) -> tuple[Node, str]:
    """The topology of a given hierarchy and what kind of input it was."""
    if isinstance(hierarchy, Node):
        return hierarchy, "topology"
    tree = _scbranch_tree(adata, hierarchy)
    if tree is not None:  # its topology and, for times="newick", its own branch times
        return topology_of(tree), "tree"
    if isinstance(hierarchy, Mapping) and "linkage" in hierarchy:  # the dict, not its key
        return _from_dendrogram(hierarchy, groupby, classes, "<hierarchy=>"), "dendrogram"
    if isinstance(hierarchy, Mapping):
        return from_nested(dict(hierarchy)), "nested"
    if isinstance(hierarchy, str):
        if hierarchy in adata.uns:
            return _from_dendrogram(adata.uns[hierarchy], groupby, classes, hierarchy), "dendrogram"
        if "(" in hierarchy or hierarchy.rstrip().endswith(";"):
            return parse_newick(hierarchy), "newick"
        if hierarchy in adata.obs.columns:
            return _from_columns(adata, [hierarchy], groupby, classes), "obs"
        raise KeyError(
            f"hierarchy={hierarchy!r} is not a Newick string, a key of adata.uns (e.g. "
            "sc.tl.dendrogram's) or a column of adata.obs."
        )
    items = list(hierarchy)
    names = [i for i in items if isinstance(i, str)]
    columns = [i for i in names if i in adata.obs.columns]
    if items and len(names) == len(items) and columns and not set(names) & set(classes):
        # annotation levels, one of them misspelled or missing: say so (not "unknown labels")
        return _from_columns(adata, items, groupby, classes), "obs"
    return from_nested(items), "nested"


def given_record(
    adata: AnnData,
    matrix,
    labels: np.ndarray,
    classes: list[str],
    sde: VPSDE,
    options: DiscoveryOptions,
    hierarchy,
    *,
    groupby: str,
    use_rep: str | None,
    layer: str | None,
    target_sum: float | None = None,
    times: str = "data",
    multifurcations: str = "keep",
) -> tuple[BranchTree, dict]:
    """The tree of a given topology, times from the same curves as discovery, and its record."""
    from ._branch_hierarchy import hierarchy_record, representation_params

    topology, kind = read_topology(adata, hierarchy, groupby, classes)
    shift, scale = global_standardizer(matrix)  # all cells, exactly as discovery and the model
    keep = subsample_per_class(labels, len(classes), options.n_per_class, options.seed)
    tree, (grid, intra, inter) = timed_topology(
        standardized_rows(matrix, keep, shift, scale), labels[keep], classes, sde, options,
        topology, times=times, multifurcations=multifurcations,
    )  # fmt: skip
    cross = crossover_times(intra, inter, grid, epsilon=options.epsilon, classes=classes)
    params = {
        "groupby": groupby,
        **representation_params(use_rep, layer, target_sum),
        **options.to_params(),
        "standardization": "global",
        **sde.to_dict(),
        "given": kind,
        "times_from": times,
        "multifurcations": multifurcations,
    }

    result = DiscoveryResult(tree=tree, times=grid, intra=intra, inter=inter, crossover=cross)
    return tree, hierarchy_record(result, params)
