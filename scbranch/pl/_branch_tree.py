"""Plots of the hierarchy stored by :func:`scbranch.tl.branch_hierarchy`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from anndata import AnnData
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patheffects import withStroke

from .._keys import Key
from ..module import BranchTree
from ._utils import _class_colors, _default_colors, _finish, _get_hierarchy, _new_axes

_ORIENTATIONS = ("top", "bottom", "left", "right")


def _leaf_layout(tree: BranchTree) -> tuple[list[int], dict[int, float]]:
    """Leaf order (class indices) and the leaf-axis position of every branch.

    A depth-first walk from the root, smaller subtrees first (ties: lower class index), so
    that no two lines of the dendrogram cross. Internal nodes sit midway between their
    outermost children.
    """
    order: list[int] = []
    pos: dict[int, float] = {}

    def key(b: int) -> tuple[int, int]:
        br = tree.branches[b]
        return len(br.classes), min(br.classes)

    # iterative post-order walk (no recursion limit for large trees)
    stack: list[tuple[int, bool]] = [(tree.root, False)]
    while stack:
        b, done = stack.pop()
        br = tree.branches[b]
        if not br.children:
            pos[b] = float(len(order))
            order.append(br.classes[0])
        elif done:
            kids = [pos[k] for k in br.children]
            pos[b] = 0.5 * (min(kids) + max(kids))
        else:
            stack.append((b, True))
            stack.extend((k, False) for k in sorted(br.children, key=key, reverse=True))
    return order, pos


def _check_line_style(kwargs: dict, where: str) -> None:
    """Refuse keywords that are no property of the tree's lines, before any figure is made."""
    unknown = [k for k in kwargs if not hasattr(LineCollection, f"set_{k}")]
    if unknown:
        raise TypeError(
            f"{where}() got unexpected keyword argument(s) {unknown}: extra keywords style the "
            "tree's lines (matplotlib LineCollection: colors, linewidths, linestyles, ...). "
            "Set a title or save the figure on what it returns (show=False), e.g. "
            "`ax.set_title(...)`, `ax.figure.savefig(...)`."
        )


def branch_tree(
    adata: AnnData | BranchTree,
    *,
    key: str = Key.uns.HIERARCHY,
    orientation: Literal["top", "bottom", "left", "right"] = "top",
    show_times: bool = True,
    show_names: bool = True,
    stability: bool | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: bool | str | None = None,
    **kwargs: Any,
) -> Axes | Figure | None:
    """Dendrogram of the branch tree, with diffusion time as its height.

    Leaves (cell types) sit at t = 0, every branch point at the diffusion time at which its
    two sides become indistinguishable, and the root branch runs up to t = 1. Branch points
    are marked and labelled with their time. Leaf labels take the colours of
    ``adata.uns[f'{groupby}_colors']`` when present (scanpy convention).

    When :func:`scbranch.tl.branch_stability` has been run, each branch point also gets its
    bootstrap interval of the branch time (2.5 %-97.5 % quantiles over the replicates in which
    the split recurs) as a thin coloured bar along the time axis, and its support (the fraction
    of replicates in which the split recurs) written in the same colour on the other side of the
    point from its time.

    Parameters
    ----------
    adata
        Annotated data matrix with the result of :func:`scbranch.tl.branch_hierarchy`, or a
        :class:`~scbranch.module.BranchTree` (e.g. ``model.tree`` of a trained model).
    key
        Key in ``adata.uns`` under which :func:`~scbranch.tl.branch_hierarchy` stored the
        hierarchy (its ``key_added``). Ignored for a tree.
    orientation
        Side of the plot where the root is, as in :func:`scanpy.pl.dendrogram`: ``'top'``
        (leaves at the bottom, labels below), ``'bottom'``, ``'left'`` (labels on the right)
        or ``'right'`` (labels on the left; most readable for long names).
    show_times
        Write the diffusion time next to every branch point.
    show_names
        Write the names of named nodes (groups of a given hierarchy, named clades) beside
        their branch points.
    stability
        Draw the bootstrap intervals and supports stored by
        :func:`scbranch.tl.branch_stability`. `None`: draw them when they are stored; `True`:
        require them (error if absent); `False`: never draw them.
    ax
        A matplotlib axes object to draw on. If `None`, a new figure is created.
    show
        Show the plot, do not return axis. If `None`, follows ``scanpy.settings.autoshow``.
    return_fig
        Return the :class:`~matplotlib.figure.Figure` instead of the axes (and do not show).
    save
        Also write the figure to ``scanpy.settings.figdir``, as scanpy's plots do, named
        ``branch_tree``: `True` adds ``scanpy.settings.file_format_figs``, a string
        is added to the name (``"_pbmc.pdf"``; its suffix sets the format).
    **kwargs
        Passed to :class:`~matplotlib.collections.LineCollection` for the tree's lines,
        e.g. ``colors``, ``linewidths``.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` if ``return_fig=True``; else `None` if the plot was
    shown, else the :class:`~matplotlib.axes.Axes`.

    Examples
    --------
    >>> import scbranch as sb
    >>> adata = sb.datasets.pbmc68k()
    >>> sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_pca")
    >>> sb.pl.branch_tree(adata, orientation="right")

    A trained model's tree can be drawn directly:

    >>> sb.pl.branch_tree(model.tree)  # doctest: +SKIP
    """
    _check_line_style(kwargs, "branch_tree")
    if orientation not in _ORIENTATIONS:
        raise ValueError(f"orientation must be one of {_ORIENTATIONS}, got {orientation!r}.")
    tree, record = _get_hierarchy(adata, key)
    table = _get_stability(adata, record, key, stability)
    order, pos = _leaf_layout(tree)
    n = tree.n_classes
    names = [tree.classes[c] for c in order]
    vertical = orientation in ("top", "bottom")  # time runs along y

    if ax is None:
        longest = max(len(s) for s in names)
        if vertical:
            figsize = (max(3.0, 0.45 * n + 1.5), 3.0 + (0.075 * longest if longest > 3 else 0.3))
        else:
            figsize = (3.5 + 0.075 * longest, max(2.5, 0.35 * n + 1.0))
        ax = _new_axes(figsize)

    def xy(leaf: float, t: float) -> tuple[float, float]:
        return (leaf, t) if vertical else (t, leaf)

    segments = []
    for br in tree.branches:
        segments.append([xy(pos[br.id], br.t_start), xy(pos[br.id], br.t_end)])
        if br.children:
            kids = [pos[k] for k in br.children]
            segments.append([xy(min(kids), br.t_start), xy(max(kids), br.t_start)])
    style = {"colors": "0.15", "linewidths": 1.5, "capstyle": "projecting"}
    style.update(kwargs)
    ax.add_collection(LineCollection(segments, **style), autolim=False)

    internal = [br for br in tree.branches if br.children]
    nodes = np.array([xy(pos[br.id], br.t_start) for br in internal]).reshape(-1, 2)
    ax.scatter(
        nodes[:, 0],
        nodes[:, 1],
        s=22,
        color="0.15",
        zorder=3,
        label="branch points",
        clip_on=False,
    )
    if show_times:
        # text beside the line that rises from the node, above/beside the children's bar
        offset, align = {
            "top": ((-3, 2), ("right", "bottom")),
            "bottom": ((-3, -2), ("right", "top")),
            "left": ((-2, -3), ("right", "top")),
            "right": ((2, -3), ("left", "top")),
        }[orientation]
        for (x, y), br in zip(nodes, internal, strict=True):
            ax.annotate(
                f"{br.t_start:.2f}",
                (x, y),
                xytext=offset,
                textcoords="offset points",
                ha=align[0],
                va=align[1],
                fontsize="x-small",
                color="0.25",
                zorder=4,
                path_effects=[withStroke(linewidth=2.5, foreground="white")],
            )
    if show_names:
        named: dict[int, list[str]] = {}
        for name, b in tree.node_names.items():
            if tree.branches[b].children:
                named.setdefault(b, []).append(name)
        offset, align = {
            "top": ((3, 2), ("left", "bottom")),
            "bottom": ((3, -2), ("left", "top")),
            "left": ((-2, 3), ("right", "bottom")),
            "right": ((2, 3), ("left", "bottom")),
        }[orientation]
        for b, names_here in named.items():
            ax.annotate(
                " / ".join(names_here),
                xy(pos[b], tree.branches[b].t_start),
                xytext=offset,
                textcoords="offset points",
                ha=align[0],
                va=align[1],
                fontsize="x-small",
                fontstyle="italic",
                color="0.1",
                zorder=4,
                path_effects=[withStroke(linewidth=2.5, foreground="white")],
            )
    if table is not None:
        _draw_stability(ax, table, pos, xy, orientation)

    leaf_lim = (-0.5, n - 0.5)
    time_label = "diffusion time $t$"
    if vertical:
        ax.set_xlim(*leaf_lim)
        ax.set_ylim((0.0, 1.0) if orientation == "top" else (1.0, 0.0))
        ax.set_xticks(np.arange(n), names, rotation=90 if max(map(len, names)) > 3 else 0)
        ax.set_ylabel(time_label)
        if orientation == "bottom":
            ax.xaxis.tick_top()
        hide = ("top", "right", "bottom")
        ticks = ax.get_xticklabels()
    else:
        ax.set_ylim(n - 0.5, -0.5)  # first leaf at the top
        ax.set_xlim((1.0, 0.0) if orientation == "left" else (0.0, 1.0))
        ax.set_yticks(np.arange(n), names)
        ax.set_xlabel(time_label)
        if orientation == "left":
            ax.yaxis.tick_right()
        hide = ("top", "right", "left")
        ticks = ax.get_yticklabels()
    for side in hide:
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="x" if vertical else "y", length=0)
    colors = _class_colors(adata, record, names)
    if colors is not None:
        for label, color in zip(ticks, colors, strict=True):
            if color is not None:
                label.set_color(color)
    return _finish(ax, show, return_fig, save, "branch_tree")


_STABILITY_COLOR = "#1f77b4"


def _get_stability(adata, record: dict | None, key: str, stability: bool | None):
    """The stored bootstrap table, `None` when not wanted or (for ``stability=None``) absent."""
    if stability is False:
        return None
    if record is None or "stability" not in record:
        if stability:
            where = "a BranchTree holds none" if record is None else f"adata.uns[{key!r}] has none"
            raise KeyError(
                f"stability=True needs bootstrap intervals, but {where}. Run "
                f"`scbranch.tl.branch_stability(adata, key={key!r})` first."
            )
        return None
    from ..tl import read_stability

    return read_stability(adata, key)


def _draw_stability(ax: Axes, table, pos: dict[int, float], xy, orientation: str) -> None:
    """Bootstrap interval of every branch point along the time axis, and its support."""
    cap = 0.08  # half-width of the interval's end caps, in leaf-axis units
    segments = []
    for row in table.itertuples(index=False):
        if not (np.isfinite(row.t_lo) and np.isfinite(row.t_hi)):
            continue  # the split never recurred: no interval, its support (0.00) says so
        leaf = pos[int(row.branch)]
        segments.append([xy(leaf, row.t_lo), xy(leaf, row.t_hi)])
        for t in (row.t_lo, row.t_hi):
            segments.append([xy(leaf - cap, t), xy(leaf + cap, t)])
    ax.add_collection(
        LineCollection(
            segments,
            colors=_STABILITY_COLOR,
            linewidths=1.0,
            zorder=2.5,
            label="bootstrap intervals",
        ),
        autolim=False,
    )
    # support on the other side of the rising line from the time label (mirrored offsets)
    offset, align = {
        "top": ((5, 2), ("left", "bottom")),
        "bottom": ((5, -2), ("left", "top")),
        "left": ((-2, 5), ("right", "bottom")),
        "right": ((2, 5), ("left", "bottom")),
    }[orientation]
    for row in table.itertuples(index=False):
        ax.annotate(
            f"{row.support:.2f}",
            xy(pos[int(row.branch)], row.t),
            xytext=offset,
            textcoords="offset points",
            ha=align[0],
            va=align[1],
            fontsize="x-small",
            fontstyle="italic",
            color=_STABILITY_COLOR,
            zorder=4,
            gid="support",
            path_effects=[withStroke(linewidth=2.5, foreground="white")],
        )


def _branch_points(tree: BranchTree, selected: set[int]) -> list[tuple[Any, list[list[int]]]]:
    """List the internal branches where selected classes of different children join.

    Returns pairs ``(branch, sides)``, ``sides`` holding the selected classes of each child.
    """
    out = []
    for br in tree.branches:
        if not br.children:
            continue
        sides = [sorted(set(tree.branches[k].classes) & selected) for k in br.children]
        sides = [s for s in sides if s]
        if len(sides) >= 2:
            out.append((br, sides))
    return out


def _spaced_labels(ax: Axes, times: np.ndarray) -> list[str]:
    """Label sorted tick ``times`` on [0, 1], leaving out those too close to the last label."""
    width_in = ax.get_position().width * ax.figure.get_figwidth()
    gap = 7.5 / 72.0 / max(width_in, 1e-3)  # rotated x-small labels are ~7 pt high
    labels, last = [], -np.inf
    for t in times:
        keep = t - last >= gap
        labels.append(f"{t:.2f}" if keep else "")
        last = t if keep else last
    return labels


def branch_similarity(
    adata: AnnData,
    *,
    key: str = Key.uns.HIERARCHY,
    classes: Sequence[str] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: bool | str | None = None,
    legend: bool = True,
) -> Axes | Figure | None:
    """Similarity curves along the forward diffusion from which the branch tree was built.

    Solid lines: mean cosine similarity of the noised cells within each type. Dashed grey
    lines: for every branch point, mean similarity between the types on either side of it
    (each pair of types across the branch point, averaged). The two sides branch where the
    dashed line meets the solid lines of its types. Branch points are marked by dots on the
    dashed lines and by dotted vertical lines whose times are written along the top axis (the
    same times as in :func:`branch_tree`).
    Nothing is recomputed; the curves are those stored by :func:`scbranch.tl.branch_hierarchy`.

    Parameters
    ----------
    adata
        Annotated data matrix with the result of :func:`scbranch.tl.branch_hierarchy`.
    key
        Key in ``adata.uns`` under which the hierarchy is stored.
    classes
        Types to show (default: all). Only branch points at which two or more of them join
        are drawn, and between-type curves average over these types only.
    ax
        A matplotlib axes object to draw on. If `None`, a new figure is created.
    show
        Show the plot, do not return axis. If `None`, follows ``scanpy.settings.autoshow``.
    return_fig
        Return the :class:`~matplotlib.figure.Figure` instead of the axes (and do not show).
    save
        Also write the figure to ``scanpy.settings.figdir``, as scanpy's plots do, named
        ``branch_similarity``: `True` adds ``scanpy.settings.file_format_figs``, a string
        is added to the name (``"_pbmc.pdf"``; its suffix sets the format).
    legend
        Draw a legend (types and line styles) to the right of the axes.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` if ``return_fig=True``; else `None` if the plot was
    shown, else the :class:`~matplotlib.axes.Axes`.

    Examples
    --------
    >>> import scbranch as sb
    >>> adata = sb.datasets.pbmc68k()
    >>> sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_pca")
    >>> sb.pl.branch_similarity(adata)
    >>> sb.pl.branch_similarity(adata, classes=["CD14+ Monocyte", "Dendritic"])
    """
    if isinstance(adata, BranchTree):
        raise TypeError(
            "branch_similarity needs the similarity curves, which a BranchTree does not hold; "
            "pass the AnnData on which `scbranch.tl.branch_hierarchy` was run."
        )
    tree, record = _get_hierarchy(adata, key)
    missing = [f for f in ("times", "intra", "inter") if f not in record]
    if missing:
        raise KeyError(f"adata.uns[{key!r}] lacks {missing}; rerun `scbranch.tl.branch_hierarchy`.")
    times = np.asarray(record["times"], dtype=float)
    intra = np.asarray(record["intra"], dtype=float)
    inter = np.asarray(record["inter"], dtype=float)
    n = tree.n_classes
    if intra.shape != (n, len(times)) or inter.shape != (n, n, len(times)):
        raise ValueError(f"adata.uns[{key!r}] has curves that do not match its tree.")

    if classes is None:
        chosen = list(range(n))
    else:
        classes = [classes] if isinstance(classes, str) else list(classes)
        if not classes:
            raise ValueError("`classes` is empty; name at least one type, or pass None for all.")
        unknown = [c for c in classes if str(c) not in tree.classes]
        if unknown:
            raise KeyError(f"Unknown class(es) {unknown}; the hierarchy has {tree.classes}.")
        chosen = sorted({tree.classes.index(str(c)) for c in classes})
    # plot in dendrogram leaf order, so that related types sit together in the legend
    leaf_order, _ = _leaf_layout(tree)
    chosen = [c for c in leaf_order if c in set(chosen)]
    names = [tree.classes[c] for c in chosen]

    # scanpy's rule for categorical legends: a column up to 14 entries, then 2, then 3 (40
    # types in one column ran off the figure)
    n_columns = 1 if len(names) <= 14 else 2 if len(names) <= 30 else 3
    if ax is None:
        legend_width = n_columns * (0.07 * max(len(s) for s in names) + 0.6)
        ax = _new_axes((6.0 + (legend_width if legend else 0.0), 4.0))

    palette = _class_colors(adata, record, tree.classes) or [None] * n
    fallback = _default_colors(n)
    colors = {c: palette[c] or fallback[c] for c in range(n)}
    lines = [
        ax.plot(times, intra[c], color=colors[c], lw=1.6, label=tree.classes[c], zorder=2)[0]
        for c in chosen
    ]

    points = _branch_points(tree, set(chosen))
    marks = []
    for br, sides in points:
        pairs = [
            (i, j)
            for a in range(len(sides))
            for b in range(a + 1, len(sides))
            for i in sides[a]
            for j in sides[b]
        ]
        curve = np.mean([inter[i, j] for i, j in pairs], axis=0)
        ax.plot(times, curve, color="0.35", lw=1.1, ls="--", zorder=1)
        ax.axvline(br.t_start, color="0.75", lw=0.8, ls=":", zorder=0)
        marks.append((br.t_start, float(np.interp(br.t_start, times, curve))))
    if marks:
        m = np.array(marks)
        ax.scatter(m[:, 0], m[:, 1], s=22, color="0.15", zorder=3, label="branch points")
        # branch times as rotated ticks along the top; labels of near-coincident ones dropped
        top = ax.secondary_xaxis("top")
        ticks = np.unique(np.round(m[:, 0], 6))
        top.set_xticks(ticks, _spaced_labels(ax, ticks), rotation=90, fontsize="x-small")
        top.tick_params(length=2, colors="0.3")
        top.spines["top"].set_visible(False)

    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("diffusion time $t$")
    ax.set_ylabel("mean cosine similarity")
    ax.axhline(0.0, color="0.85", lw=0.8, zorder=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if legend:
        # one legend (constrained layout makes room for it): types, a gap, then line styles
        handles, labels = list(lines), list(names)
        if points:
            handles += [
                Line2D([], [], alpha=0),
                Line2D([], [], color="0.35", lw=1.1, ls="--"),
                Line2D([], [], color="0.15", marker="o", ls=":", markersize=4.5, lw=0.8),
            ]
            labels += ["", "between the sides\nof a branch point", "branch point"]
        ax.legend(
            handles,
            labels,
            loc="center left",
            bbox_to_anchor=(1.01, 0.5),
            frameon=False,
            fontsize="small",
            title="within type",
            title_fontsize="small",
            alignment="left",
            ncols=n_columns,
        )
    return _finish(ax, show, return_fig, save, "branch_similarity")
