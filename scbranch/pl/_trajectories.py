"""Plots of trajectories: paths in a real embedding, and gene changes along transmutations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.colors import TwoSlopeNorm, is_color_like, to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .._keys import Key
from .._validation import check_finite, to_dense
from ..tl._embed import _basis_key, _knn_placement
from ..tl._interpret import (
    _check_trajectories,
    _model_info,
    _model_obsm_key,
    _obsm,
    _shared_representation,
)
from ._utils import _default_colors, _finish, _new_axes

#: at most this many categories get a legend entry (scanpy draws long legends, we keep it short)
_MAX_LEGEND = 30


# ------------------------------------------------------------------ placement
def _place_states(
    transmuted: AnnData,
    reference: AnnData,
    basis_key: str,
    use_rep: str | None,
    n_neighbors: int,
    seed: int,
) -> tuple[np.ndarray, str]:
    """Coordinates of every trajectory state in ``reference.obsm[basis_key]`` (first 2 dims).

    Directly when the basis is the model's representation (e.g. both ``X_pca``); otherwise as
    :func:`scbranch.tl.embed_like` places cells: the embedding positions of each state's
    ``n_neighbors`` nearest reference cells in a representation both share, weighted by UMAP's
    membership strengths (a plain mean draws paths tighter than the clusters they cross).
    Returns the coordinates and how they were obtained.
    """
    embedding = _obsm(reference, basis_key)[:, :2]
    rep = use_rep if use_rep is not None else _model_obsm_key(transmuted)
    if rep == basis_key and basis_key in transmuted.obsm:
        return _obsm(transmuted, basis_key)[:, :2], "direct"
    query, others, _ = _shared_representation(
        transmuted, {"reference": reference}, use_rep, seed=seed
    )
    return _knn_placement(query, others["reference"], embedding, n_neighbors), "neighbours"


def _palette(reference: AnnData, color: str, categories: list[str]) -> dict[str, str]:
    """Colours of scanpy's ``uns[f'{color}_colors']`` if usable (never written), else defaults."""
    colors = reference.uns.get(f"{color}_colors")
    column = reference.obs[color]
    if colors is not None and isinstance(column.dtype, pd.CategoricalDtype):
        colors = list(np.asarray(colors).ravel())
        cats = [str(c) for c in column.cat.categories]
        if len(colors) >= len(cats) and all(is_color_like(c) for c in colors[: len(cats)]):
            lookup = {c: to_hex(col) for c, col in zip(cats, colors, strict=False)}
            if all(c in lookup for c in categories):
                return {c: lookup[c] for c in categories}
    return dict(zip(categories, _default_colors(len(categories)), strict=True))


def _categories(column: pd.Series) -> list[str]:
    if isinstance(column.dtype, pd.CategoricalDtype):
        present = set(column.astype(str))
        return [str(c) for c in column.cat.categories if str(c) in present]
    return sorted({str(v) for v in column.dropna()})


def trajectories(
    transmuted: AnnData,
    reference: AnnData,
    *,
    basis: str = "umap",
    color: str | None = None,
    use_rep: str | None = None,
    n_neighbors: int = 10,
    max_trajectories: int | None = 200,
    seed: int = 0,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: bool | str | None = None,
) -> Axes | Figure | None:
    """Trajectories drawn over the real cells in their embedding (e.g. the UMAP).

    Real cells are drawn as points coloured by ``color``. Each trajectory is a line through its
    states in checkpoint order, with a marker at its start (the source cell of a transmutation)
    and at its end. States are placed directly when the basis is the model's representation
    (``basis="pca"`` for a model on ``X_pca``: the first two components); otherwise each state
    goes to the mean position of its ``n_neighbors`` nearest real cells in a representation
    both objects share (the model's ``obsm_key``, or genes), weighted by UMAP's membership
    strengths as in :func:`scbranch.tl.embed_like`.

    Parameters
    ----------
    transmuted
        Trajectories of :meth:`~scbranch.BranchedDiffusion.transmute`, or of
        :meth:`~scbranch.BranchedDiffusion.generate` with ``trajectory_times``.
    reference
        Real cells with the embedding in ``obsm[f'X_{basis}']`` (not modified).
    basis
        Embedding to draw in: ``reference.obsm[f'X_{basis}']``.
    color
        Column of ``reference.obs`` colouring the real cells; default the model's
        ``labels_key`` when ``reference`` has it, else grey. Categorical colours follow
        ``reference.uns[f'{color}_colors']`` (scanpy) when present.
    use_rep
        Representation to find neighbours in: an ``.obsm`` key of both objects or ``"X"`` for
        genes; default the model's ``obsm_key`` when both carry it, else genes.
    n_neighbors
        Real cells whose weighted mean position places one state.
    max_trajectories
        Draw at most this many trajectories (a seeded random subset); `None`: all.
    seed
        Seed of the subset (and of the gene PCA when genes are used).
    ax
        Axes to draw into; default a new figure.
    show
        Show the figure; `None` follows ``scanpy.settings.autoshow``.
    return_fig
        Return the figure instead of showing it.
    save
        Also write the figure to ``scanpy.settings.figdir``, as scanpy's plots do, named
        ``trajectories``: `True` adds ``scanpy.settings.file_format_figs``, a string
        is added to the name (``"_pbmc.pdf"``; its suffix sets the format).

    Returns
    -------
    The figure if ``return_fig``; `None` if shown; otherwise the Axes.

    Examples
    --------
    >>> import scbranch as sb
    >>> tm = model.transmute(monocytes, target="Dendritic")  # doctest: +SKIP
    >>> sb.pl.trajectories(tm, adata, basis="umap")  # doctest: +SKIP
    """
    _check_trajectories(transmuted)
    if not isinstance(reference, AnnData):
        raise TypeError(f"`reference` must be an AnnData, got {type(reference).__name__}.")
    basis_key = _basis_key(reference, basis)
    if np.asarray(reference.obsm[basis_key]).shape[1] < 2:
        raise ValueError(f"reference.obsm[{basis_key!r}] has fewer than 2 dimensions.")
    if max_trajectories is not None and max_trajectories < 1:
        raise ValueError(f"max_trajectories must be at least 1, got {max_trajectories}.")
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be at least 1, got {n_neighbors}.")
    labels_key = str(_model_info(transmuted).get("labels_key", "") or "")
    if color is None and labels_key and labels_key in reference.obs.columns:
        color = labels_key
    if color is not None and color not in reference.obs.columns:
        raise KeyError(
            f"color={color!r} is not a column of reference.obs (available: "
            f"{list(reference.obs.columns)})."
        )

    # trajectories to draw (seeded subset), rows in checkpoint order
    obs = transmuted.obs
    ids = obs[Key.obs.TRAJECTORY].astype(str).to_numpy()
    unique = pd.unique(ids)
    if max_trajectories is not None and len(unique) > max_trajectories:
        chosen = np.random.default_rng(seed).choice(len(unique), max_trajectories, replace=False)
        unique = unique[np.sort(chosen)]
    keep = np.flatnonzero(np.isin(ids, unique))
    order = pd.DataFrame(
        {
            "rank": pd.Categorical(ids[keep], categories=unique).codes,
            "checkpoint": obs[Key.obs.CHECKPOINT].to_numpy()[keep],
            "row": keep,
        }
    ).sort_values(["rank", "checkpoint"], kind="stable")
    rows = order["row"].to_numpy()
    sub = transmuted[rows]
    xy, _ = _place_states(sub, reference, basis_key, use_rep, n_neighbors, seed)
    check_finite(xy, "the placed trajectory states")
    starts = np.flatnonzero(np.r_[True, np.diff(order["rank"].to_numpy()) != 0])
    ends = np.r_[starts[1:], len(rows)] - 1
    segments = [xy[s : e + 1] for s, e in zip(starts, ends, strict=True)]

    if ax is None:
        ax = _new_axes((6.5, 5.0))
    embedding = _obsm(reference, basis_key)[:, :2]
    handles: list = []
    if color is None:
        ax.scatter(*embedding.T, s=6, c="0.8", linewidths=0, rasterized=True, zorder=1)
    elif pd.api.types.is_numeric_dtype(reference.obs[color]) and not isinstance(
        reference.obs[color].dtype, pd.CategoricalDtype
    ):
        points = ax.scatter(
            *embedding.T,
            s=6,
            c=reference.obs[color].to_numpy(dtype=float),
            cmap="viridis",
            linewidths=0,
            rasterized=True,
            zorder=1,
        )
        ax.figure.colorbar(points, ax=ax, label=color, shrink=0.6)
    else:
        values = reference.obs[color].astype(str).to_numpy()
        categories = _categories(reference.obs[color])
        palette = _palette(reference, color, categories)
        ax.scatter(
            *embedding.T,
            s=6,
            c=[palette.get(v, "#cccccc") for v in values],
            alpha=0.6,
            linewidths=0,
            rasterized=True,
            zorder=1,
        )
        if len(categories) <= _MAX_LEGEND:
            handles += [
                Line2D([], [], marker="o", ls="", ms=5, color=palette[c], label=c)
                for c in categories
            ]

    ax.add_collection(
        LineCollection(segments, colors="0.15", linewidths=0.8, alpha=0.7, zorder=2),
        autolim=True,
    )
    is_transmutation = Key.obs.PHASE in obs.columns
    start_label, end_label = ("source cell", "endpoint") if is_transmutation else ("start", "end")
    ax.scatter(
        *xy[starts].T,
        s=18,
        marker="o",
        facecolors="white",
        edgecolors="0.15",
        linewidths=0.8,
        zorder=3,
        label=start_label,
    )
    ax.scatter(*xy[ends].T, s=40, marker="^", c="black", linewidths=0, zorder=4, label=end_label)
    handles += [
        Line2D([], [], color="0.15", lw=0.8, label=f"trajectories ({len(segments)})"),
        Line2D([], [], marker="o", ls="", mfc="white", mec="0.15", label=start_label),
        Line2D([], [], marker="^", ls="", color="black", label=end_label),
    ]
    ax.autoscale_view()
    name = basis_key[2:].upper() if basis_key[2:].islower() else basis_key[2:]
    ax.set_xlabel(f"{name}1")
    ax.set_ylabel(f"{name}2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(
        handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False, fontsize=8
    )
    return _finish(ax, show, return_fig, save, "trajectories")


# ------------------------------------------------------------------------ genes
def _stored_genes(transmuted: AnnData, key: str, group: str | None, n_genes: int):
    """Top ``n_genes`` up and down of the stored ranking for ``group``."""
    record = transmuted.uns.get(key)
    if not isinstance(record, Mapping) or "names" not in record:
        raise KeyError(
            f"No gene ranking in transmuted.uns[{key!r}]; run "
            f"`sb.tl.rank_transmutation_genes(transmuted, key_added={key!r})` first, or pass "
            "`genes=`."
        )
    groups = list(record["names"].dtype.names)
    group = _resolve_group(group, groups)
    names = [str(g) for g in np.asarray(record["names"][group])]
    up = names[:n_genes]
    down = [g for g in names[::-1][:n_genes] if g not in up][::-1]
    return up + down, group


def _resolve_group(group: str | None, groups: Sequence[str]) -> str:
    if group is None:
        if len(groups) != 1:
            raise ValueError(
                f"The trajectories have several target types {list(groups)}; pass `group=`."
            )
        return groups[0]
    if group not in groups:
        raise ValueError(f"group={group!r} is not a target type here (target types: {groups}).")
    return group


def transmutation_genes(
    transmuted: AnnData,
    *,
    genes: Sequence[str] | None = None,
    n_genes: int = 10,
    key: str = Key.uns.TRANSMUTATION_GENES,
    group: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: bool | str | None = None,
) -> Axes | Figure | None:
    """Heatmap of genes changing along a transmutation: mean change from the source, per step.

    Rows are genes, columns the checkpoints from the source (left) through the branch point
    (dashed line) to the endpoint (right), labelled with their diffusion time ``t`` (a range
    where sources with different branch points pass a checkpoint at different times); colour is
    the mean, over the trajectories to ``group``, of each state's expression minus its source
    cell's (decoded log-normalised genes).

    Parameters
    ----------
    transmuted
        Trajectories of :meth:`~scbranch.BranchedDiffusion.transmute`, with genes in ``.X``.
    genes
        Genes to show; default the top ``n_genes`` up- and down-regulated genes of the ranking
        stored by :func:`scbranch.tl.rank_transmutation_genes` under ``key``.
    n_genes
        Genes per direction taken from the ranking.
    key
        ``.uns`` key of the ranking.
    group
        Target type; needed when the trajectories go to several.
    ax
        Axes to draw into; default a new figure.
    show
        Show the figure; `None` follows ``scanpy.settings.autoshow``.
    return_fig
        Return the figure instead of showing it.
    save
        Also write the figure to ``scanpy.settings.figdir``, as scanpy's plots do, named
        ``transmutation_genes``: `True` adds ``scanpy.settings.file_format_figs``, a string
        is added to the name (``"_pbmc.pdf"``; its suffix sets the format).

    Returns
    -------
    The figure if ``return_fig``; `None` if shown; otherwise the Axes.

    Examples
    --------
    >>> import scbranch as sb
    >>> sb.tl.rank_transmutation_genes(tm)  # doctest: +SKIP
    >>> sb.pl.transmutation_genes(tm, n_genes=8)  # doctest: +SKIP
    """
    _check_trajectories(transmuted)
    if Key.obs.PHASE not in transmuted.obs.columns or (
        Key.obs.TARGET_LABEL not in transmuted.obs.columns
    ):
        raise ValueError(
            "transmuted.obs lacks 'phase' or 'target_label': pass the AnnData returned by "
            "`model.transmute(...)`."
        )
    if transmuted.n_vars == 0 or transmuted.X is None:
        raise ValueError("transmuted has no genes (n_vars == 0): nothing to draw.")
    obs = transmuted.obs
    targets = obs[Key.obs.TARGET_LABEL].astype(str).to_numpy()
    if genes is None:
        if n_genes < 1:
            raise ValueError(f"n_genes must be at least 1, got {n_genes}.")
        genes, group = _stored_genes(transmuted, key, group, n_genes)
    else:
        genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
        if not genes:
            raise ValueError("`genes` is empty.")
        missing = [g for g in genes if g not in transmuted.var_names]
        if missing:
            raise KeyError(f"Gene(s) {missing} are not in transmuted.var_names.")
        group = _resolve_group(group, list(pd.unique(targets)))

    in_group = targets == group
    ids = obs[Key.obs.TRAJECTORY].astype(str).to_numpy()
    phase = obs[Key.obs.PHASE].astype(str).to_numpy()
    checkpoints = obs[Key.obs.CHECKPOINT].to_numpy(dtype=np.int64)
    t = obs[Key.obs.T].to_numpy(dtype=np.float64)
    cols = pd.Index(transmuted.var_names).get_indexer(genes)
    x = transmuted.X
    source_rows = pd.Series(
        np.flatnonzero(in_group & (phase == "source")),
    )
    source_rows.index = ids[source_rows.to_numpy()]
    if not len(source_rows):
        raise ValueError(f"No source rows for target {group!r}.")

    def dense(rows):
        m = x[rows][:, cols]
        return m.toarray() if sp.issparse(m) else to_dense(m)

    ckpts = np.unique(checkpoints[in_group])
    change = np.empty((len(genes), len(ckpts)))
    ticks = []
    for j, c in enumerate(ckpts):
        rows = np.flatnonzero(in_group & (checkpoints == c))
        rows = rows[np.isin(ids[rows], source_rows.index)]
        src = source_rows.loc[ids[rows]].to_numpy()
        change[:, j] = (dense(rows) - dense(src)).mean(0)
        # sources with different branch points pass a checkpoint at different times: their
        # mean would be a time no trajectory passed, so the tick gives the range
        low, high = t[rows].min(), t[rows].max()
        ticks.append(f"{low:.2g}" if np.isclose(low, high) else f"{low:.2g}-{high:.2g}")
    branch = np.unique(checkpoints[in_group & (phase == "branch point")])

    if ax is None:
        ax = _new_axes((max(4.0, 0.45 * len(ckpts) + 2.5), max(3.0, 0.28 * len(genes) + 1.5)))
    limit = float(np.nanmax(np.abs(change))) or 1.0
    image = ax.imshow(
        change,
        aspect="auto",
        cmap=colormaps["RdBu_r"],
        norm=TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit),
        interpolation="nearest",
    )
    ax.set_yticks(range(len(genes)), genes)
    ax.set_xticks(range(len(ckpts)), ticks, rotation=90)
    ax.set_xlabel("diffusion time t of the checkpoint (source → branch point → endpoint)")
    for b in branch:
        pos = int(np.flatnonzero(ckpts == b)[0])
        ax.axvline(pos, color="black", ls="--", lw=1.0, label="branch point")
    ax.set_title(f"to {group}", fontsize=10)
    ax.figure.colorbar(image, ax=ax, label="mean change from source", shrink=0.8)
    return _finish(ax, show, return_fig, save, "transmutation_genes")
