"""``scbranch.tl.branch_stability``: how stable the branch points of the stored tree are.

Rerun hierarchy discovery on resamples of the cells of every class (docs/method.md, 'Stability of
branch points') and report, for every split of the stored tree, how often it recurs and how much its
branch time varies.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import Key
from .._utils import progress
from .._validation import check_class_sizes, check_obs_key
from ..module import VPSDE, BranchTree, discover_hierarchy, global_standardizer
from ..module._discovery import CURVES, DiscoveryOptions, standardized_rows
from ..module._topology import Node, topology_of
from ._branch_hierarchy import hierarchy_matrix, read_hierarchy
from ._given_hierarchy import timed_topology

logger = logging.getLogger(__name__)

#: columns of the table returned by :func:`branch_stability` / :func:`read_stability`
COLUMNS = ["branch", "classes", "t", "support", "t_mean", "t_sd", "t_lo", "t_hi", "n_recur"]
#: per-branch arrays of ``adata.uns[key]['stability']``
_FIELDS = ("support", "t_mean", "t_sd", "t_lo", "t_hi", "n_recur")
_MIN_CELLS = 3


def _discovery_settings(params: dict, key: str) -> tuple[DiscoveryOptions, VPSDE]:
    """Discovery options and forward process recorded by :func:`branch_hierarchy`."""
    needed = ("groupby", "n_times", "smooth_sigma", "epsilon", "min_branch_length", "linkage")
    needed += ("beta0", "beta1", "t_min")
    missing = [k for k in needed if k not in params]
    if missing or not {"n_per_class", "n_cells_per_class"} & set(params):
        raise ValueError(
            f"adata.uns[{key!r}]['params'] lacks {missing or ['n_per_class']}; rerun "
            "`scbranch.tl.branch_hierarchy` to record the discovery options."
        )
    if str(params.get("standardization", "global")) != "global":
        raise ValueError(
            f"adata.uns[{key!r}] was computed with standardization="
            f"{params['standardization']!r}; rerun `scbranch.tl.branch_hierarchy`."
        )
    sde = VPSDE(
        beta0=float(params["beta0"]), beta1=float(params["beta1"]), t_min=float(params["t_min"])
    )
    # hierarchies recorded before n_noise_draws and curves existed used one sampled draw
    return DiscoveryOptions.from_params(params), sde


def _labels_of(adata: AnnData, groupby: str, classes: list[str]) -> np.ndarray:
    """Class index (into the stored tree's classes) of every cell."""
    check_obs_key(adata, groupby, "groupby")
    values = adata.obs[groupby].astype(str).to_numpy()
    labels = pd.Index(classes).get_indexer(values)
    if (labels < 0).any():
        unknown = sorted(set(values[labels < 0]))
        raise ValueError(
            f"adata.obs[{groupby!r}] holds label(s) {unknown[:5]} that the stored hierarchy does "
            "not know; the data changed since `scbranch.tl.branch_hierarchy` ran. Rerun it."
        )
    return labels.astype(np.int64)


def _clades(tree: BranchTree) -> dict[frozenset[int], float]:
    """Set of classes of every internal branch -> its branch time (``t_start``)."""
    return {frozenset(b.classes): b.t_start for b in tree.branches if b.children}


def _replicate_tree(x, labels, classes, sde, options, topology: Node | None) -> BranchTree:
    """One replicate's tree: discovered, or a given topology re-timed on the replicate's cells."""
    if topology is None:
        return discover_hierarchy(x, labels, classes, sde, options).tree
    return timed_topology(x, labels, classes, sde, options, topology)[0]


def branch_stability(
    adata: AnnData,
    *,
    n_bootstrap: int = 50,
    fraction: float = 0.8,
    key: str = Key.uns.HIERARCHY,
    seed: int = 0,
    curves: str = "sampled",
    progress_bar: bool = True,
) -> pd.DataFrame:
    """Bootstrap stability of the branch points of the stored hierarchy.

    Hierarchy discovery is rerun ``n_bootstrap`` times, each time on a random ``fraction`` of
    the cells of every class (drawn without replacement, at least 2 cells per class) and with
    its own forward noise. Data, representation and every discovery option but ``curves`` are
    those recorded by :func:`scbranch.tl.branch_hierarchy` in ``adata.uns[key]['params']``,
    and the data are standardised with the scale of all cells, exactly as there, so replicates
    differ from the stored tree only by the resample and the noise.

    The replicates draw sampled curves even for a tree discovered with ``curves="expected"``:
    without fresh noise an 80 % resample rarely moves a noiseless tree, and on simulated trees
    with crowded branch times its wrong clades then recurred in 55-77 % of replicates; with
    sampled replicates they recur in 4-14 % and the true clades in 21-95 %, so the support
    tells them apart again (docs/method.md, 'Noiseless curves against few cells and crowded
    trees').

    For every internal branch of the stored tree (the root included: it always recurs, but its
    branch time, the last merge, varies), the support is the fraction of replicates whose tree
    has a branch with exactly the same set of classes, and the branch time is summarised over
    the replicates where that clade recurs.

    A hierarchy the user gave (``branch_hierarchy(hierarchy=..., times="data")``) keeps its
    topology in every replicate, as it did on all cells: only its branch times are read again
    from each replicate's curves, so every support is 1 and the intervals say how well the
    data pin each given branch point down (a multifurcation that ``multifurcations="resolve"``
    resolved stays resolved as stored). With ``times="newick"`` nothing comes from the data,
    and there is nothing to resample: refused.

    Discovery uses at most ``n_per_class`` cells per class, so a class with more than
    ``n_per_class / fraction`` cells is simply subsampled to ``n_per_class`` cells
    in every replicate, as in the stored tree, but with other cells each time.

    Parameters
    ----------
    adata
        Annotated data matrix on which :func:`scbranch.tl.branch_hierarchy` was run.
    n_bootstrap
        Number of replicates (at least 2).
    fraction
        Fraction of each class's cells drawn, without replacement, for every replicate; in
        ``(0, 1]``. With 1, replicates differ only by the noise (and by the subsample of
        classes with more than ``n_per_class`` cells).
    key
        Key in ``adata.uns`` of the hierarchy (the ``key_added`` of
        :func:`~scbranch.tl.branch_hierarchy`).
    seed
        Random seed of the resamples and of each replicate's noise (each replicate gets its own
        seed derived from it; replicate ``k`` does not depend on ``n_bootstrap``).
    curves
        The replicates' similarity curves: ``"sampled"`` (each replicate noises its cells; the
        stored ``n_noise_draws`` draws are averaged) or ``"expected"`` (no noise: replicates
        differ by the resample only, which says how the cells alone move the branch times,
        but the support then scores the wrong clades of a noiseless tree high).
    progress_bar
        Show a progress bar over the replicates.

    Returns
    -------
    One row per internal branch of the stored tree, with columns

    ``branch``
        Id of the branch in the stored tree.
    ``classes``
        Its classes, joined by ``", "``.
    ``t``
        Its branch time (``t_start``) in the stored tree.
    ``support``
        Fraction of replicates whose tree contains the same clade.
    ``t_mean``, ``t_sd``, ``t_lo``, ``t_hi``
        Mean, standard deviation, 2.5 % and 97.5 % quantiles of the clade's branch time over
        the replicates in which it recurs (NaN where it never recurs; ``t_sd`` needs two).
    ``n_recur``
        Number of replicates in which the clade recurs.

    Also sets ``adata.uns[key]['stability']`` (h5ad-safe; :func:`read_stability` rebuilds the
    table from it): ``'params'`` (``n_bootstrap``, ``fraction``, ``seed``), ``'n_replicates'``
    (replicates that succeeded), ``'branch'`` (branch ids) and one array per column
    ``support``, ``t_mean``, ``t_sd``, ``t_lo``, ``t_hi``, ``n_recur`` aligned with it.
    Nothing else in ``adata`` changes.

    Examples
    --------
    >>> import scbranch as sb
    >>> adata = sb.datasets.pbmc68k()
    >>> sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_pca")
    >>> table = sb.tl.branch_stability(adata, n_bootstrap=50)
    >>> table[["classes", "t", "support", "t_lo", "t_hi"]]  # doctest: +SKIP
    >>> sb.pl.branch_tree(adata)  # draws the intervals and supports  # doctest: +SKIP
    """
    start = time.perf_counter()
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int | np.integer):
        raise ValueError(f"n_bootstrap must be an integer >= 2, got {n_bootstrap!r}.")
    if n_bootstrap < 2:
        raise ValueError(f"n_bootstrap must be at least 2 to estimate a spread, got {n_bootstrap}.")
    if not (np.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}.")
    if curves not in CURVES:
        raise ValueError(f"curves must be one of {CURVES}, got {curves!r}.")
    if key not in adata.uns:
        raise KeyError(
            f"No hierarchy in adata.uns[{key!r}]. Run `scbranch.tl.branch_hierarchy(adata, "
            "groupby=...)` first, then `scbranch.tl.branch_stability`."
        )
    tree, record = read_hierarchy(adata, key)
    params = record.get("params", {})
    options, sde = _discovery_settings(params, key)
    if curves != options.curves:
        # expected curves draw nothing to average; a noiseless tree's replicates draw once
        options = dataclasses.replace(options, curves=curves, n_noise_draws=1)
    groupby = str(params["groupby"])
    use_rep = str(params.get("use_rep", "")) or None
    layer = str(params.get("layer", "")) or None
    target_sum = float(params["target_sum"]) if params.get("target_sum") else None

    if params.get("given") and str(params.get("times_from", "data")) != "data":
        raise ValueError(
            f"The hierarchy in adata.uns[{key!r}] was given with its branch times "
            f"(times={params.get('times_from')!r}): neither its topology nor its times come "
            "from the cells, so resampling them cannot change it. Rerun "
            "`sb.tl.branch_hierarchy(..., hierarchy=..., times='data')` to read the times from "
            "the data, then bootstrap those."
        )
    topology = topology_of(tree) if params.get("given") else None
    classes = list(tree.classes)
    labels = _labels_of(adata, groupby, classes)
    check_class_sizes(
        labels,
        classes,
        _MIN_CELLS,
        groupby,
        why="too few to subsample (a replicate keeps at least 2 cells per class). Remove or "
        "merge them, then rerun `scbranch.tl.branch_hierarchy`.",
    )
    matrix = hierarchy_matrix(adata, use_rep, layer, target_sum)
    # the standardiser of ALL cells, exactly as `discover_record`: replicates must not differ
    # from the stored tree by their scale, only by the resample and the noise
    shift, scale = global_standardizer(matrix)

    # Subsampling WITHOUT replacement, not the classical with-replacement bootstrap: a cell
    # drawn twice is noised into two nearly identical points at small t, and those pairs inflate
    # the within-class similarity that the crossover criterion compares the between-class
    # similarity against, delaying every crossover (most for small classes). Distinct cells keep
    # each replicate an honest, smaller sample of the same population.
    per_class = [np.flatnonzero(labels == c) for c in range(len(classes))]
    n_draw = [max(2, int(np.floor(fraction * len(idx) + 1e-9))) for idx in per_class]
    # discovery keeps at most n_per_class cells of a class: drawing min(n_draw, n_per_class)
    # at once is the same distribution, and only those rows are ever densified
    n_draw = [min(m, options.n_per_class) for m in n_draw]
    internal = [b for b in tree.branches if b.children]
    times: dict[frozenset[int], list[float]] = {frozenset(b.classes): [] for b in internal}
    n_ok, failures, caught = 0, [], []
    replicates = np.random.SeedSequence(int(seed)).spawn(int(n_bootstrap))
    bar = progress("Bootstrap", enabled=progress_bar)
    for k, child in enumerate(bar(replicates) if bar is not None else replicates):
        rng = np.random.default_rng(child)
        rep_seed = int(child.generate_state(1)[0] & 0x7FFFFFFF)
        keep = np.concatenate(
            [
                np.sort(rng.choice(idx, m, replace=False))
                for idx, m in zip(per_class, n_draw, strict=True)
            ]
        )
        x = standardized_rows(matrix, keep, shift, scale)  # float32, a block at a time
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                replicate = _replicate_tree(
                    x,
                    labels[keep],
                    classes,
                    sde,
                    dataclasses.replace(options, seed=rep_seed),
                    topology,
                )
        except ValueError as err:
            failures.append(f"replicate {k}: {err}")
            continue
        caught.extend(str(w.message) for w in seen)
        n_ok += 1
        for clade, t in _clades(replicate).items():
            if clade in times:
                times[clade].append(t)
    if failures:
        logger.warning(
            "Discovery failed in %d of %d replicates (left out of the support): %s",
            len(failures),
            n_bootstrap,
            failures[0],
        )
    if n_ok < 2:
        raise ValueError(
            f"Hierarchy discovery failed in {len(failures)} of {n_bootstrap} replicates, e.g. "
            f"{failures[0] if failures else ''}. Use a larger `fraction`, or rerun "
            "`scbranch.tl.branch_hierarchy` with a larger `epsilon`."
        )
    if caught:
        warnings.warn(
            f"{len(caught)} warning(s) in the bootstrap replicates, e.g.: {caught[0]}",
            UserWarning,
            stacklevel=2,
        )

    stats = {f: [] for f in _FIELDS}
    for b in internal:
        ts = np.asarray(times[frozenset(b.classes)], dtype=np.float64)
        stats["n_recur"].append(len(ts))
        stats["support"].append(len(ts) / n_ok)
        stats["t_mean"].append(ts.mean() if len(ts) else np.nan)
        stats["t_sd"].append(ts.std(ddof=1) if len(ts) > 1 else np.nan)
        lo, hi = np.quantile(ts, [0.025, 0.975]) if len(ts) else (np.nan, np.nan)
        stats["t_lo"].append(lo)
        stats["t_hi"].append(hi)
    stability = {
        "params": {
            "n_bootstrap": int(n_bootstrap),
            "fraction": float(fraction),
            "seed": int(seed),
            "curves": curves,
        },
        "n_replicates": int(n_ok),
        "branch": np.array([b.id for b in internal], dtype=np.int64),
        **{
            f: np.asarray(v, dtype=np.int64 if f == "n_recur" else np.float64)
            for f, v in stats.items()
        },
    }
    # a new record, assigned at the top level: on a view this makes the view an AnnData of its
    # own (anndata's ImplicitModificationWarning, as scanpy's tools do) instead of writing into
    # the parent's nested dict, which a view shares
    adata.uns[key] = {**record, "stability": stability}
    table = read_stability(adata, key)
    logger.info(
        "Bootstrap of %d branch points over %d replicates in %.2f s; lowest support %.2f.",
        len(internal),
        n_ok,
        time.perf_counter() - start,
        float(table["support"].min()),
    )
    return table


def read_stability(adata: AnnData, key: str = Key.uns.HIERARCHY) -> pd.DataFrame:
    """The table of :func:`~scbranch.tl.branch_stability`, from ``uns[key]['stability']``.

    Parameters
    ----------
    adata
        Annotated data matrix on which :func:`branch_stability` was run.
    key
        Key in ``adata.uns`` of the hierarchy.

    Returns
    -------
    One row per internal branch of the stored tree; columns as in :func:`branch_stability`.

    Examples
    --------
    >>> sb.tl.branch_stability(adata)  # doctest: +SKIP
    >>> adata.write_h5ad("pbmc.h5ad")  # doctest: +SKIP
    >>> sb.tl.read_stability(anndata.read_h5ad("pbmc.h5ad"))  # doctest: +SKIP
    """
    tree, record = read_hierarchy(adata, key)
    stability = record.get("stability")
    if not isinstance(stability, dict) or "branch" not in stability:
        raise KeyError(
            f"No branch stability in adata.uns[{key!r}]. Run "
            f"`scbranch.tl.branch_stability(adata, key={key!r})` first."
        )
    branch = np.asarray(stability["branch"]).astype(np.int64).ravel()
    missing = [f for f in _FIELDS if f not in stability]
    bad = [int(b) for b in branch if not 0 <= b < tree.n_branches or not tree.branches[b].children]
    if missing or bad:
        raise ValueError(
            f"adata.uns[{key!r}]['stability'] does not match the stored tree "
            f"(missing {missing}, not internal branches {bad}); rerun "
            "`scbranch.tl.branch_stability`."
        )
    columns = {f: np.asarray(stability[f]).ravel() for f in _FIELDS}
    table = branch_points(tree, branch).assign(
        **{f: columns[f].astype(np.int64 if f == "n_recur" else np.float64) for f in _FIELDS}
    )
    return table[COLUMNS]


def branch_points(tree: BranchTree, branch=None) -> pd.DataFrame:
    """Id, classes and branch time of the internal branches ``branch`` (default: all, root too).

    The first columns of :func:`branch_stability`'s table, and the whole table without support.
    """
    if branch is None:
        branch = [b.id for b in tree.branches if b.children]
    branch = np.asarray(branch, dtype=np.int64)
    return pd.DataFrame(
        {
            "branch": branch,
            "classes": [
                ", ".join(tree.classes[c] for c in tree.branches[b].classes) for b in branch
            ],
            "t": np.array([tree.branches[b].t_start for b in branch], dtype=np.float64),
        }
    )
