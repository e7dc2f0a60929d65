"""Two hierarchies side by side (a tanglegram), for :func:`scbranch.tl.compare_hierarchies`."""

from __future__ import annotations

from typing import Any

from anndata import AnnData
from matplotlib import pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..module import BranchTree
from ..tl._compare import _tree, clades
from ._branch_tree import _check_line_style, _leaf_layout, branch_tree
from ._utils import _finish

#: colour of the links of cell types whose smallest clade the other tree lacks
_DISAGREE = "#d62728"


def _smallest_clade(tree: BranchTree, c: int) -> frozenset[str]:
    """The cell types of the lowest internal node above class ``c``."""
    parent = tree.branches[tree.leaf(c)].parent
    return frozenset(tree.classes[k] for k in tree.branches[parent].classes)


def compare_hierarchies(
    adata: AnnData | None,
    key_a: str | BranchTree,
    key_b: str | BranchTree,
    *,
    titles: tuple[str, str] | None = None,
    show_times: bool = False,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: bool | str | None = None,
    **kwargs: Any,
) -> Axes | Figure | None:
    """Two hierarchies as mirrored dendrograms, the same cell types linked between them.

    The left tree has its root on the left, the right tree on the right; a line joins each cell
    type's two leaves. A line is red when the type's smallest group in one tree (it and its
    nearest relatives) is not a group of the other: where the data and an annotation disagree.

    Parameters
    ----------
    adata
        AnnData with the hierarchies in ``.uns``, or `None` for two trees.
    key_a, key_b
        Keys in ``adata.uns`` (or :class:`~scbranch.module.BranchTree` objects).
    titles
        Titles of the two panels (default: the keys).
    show_times
        Write branch times at the branch points.
    ax
        An Axes of a grid (e.g. from :func:`matplotlib.pyplot.subplots`) whose place the three
        panels (left tree, links, right tree) share; it is replaced by them. `None`: a new
        figure.
    show
        Show the figure (`None`: follow ``scanpy.settings.autoshow``).
    return_fig
        Return the figure instead of showing it.
    save
        Also write the figure to ``scanpy.settings.figdir``, as scanpy's plots do, named
        ``compare_hierarchies``: `True` adds ``scanpy.settings.file_format_figs``, a string
        is added to the name (``"_pbmc.pdf"``; its suffix sets the format).
    **kwargs
        Passed to :func:`~scbranch.pl.branch_tree` for both trees.

    Returns
    -------
    The :class:`~matplotlib.figure.Figure` if ``return_fig=True``; else `None` if shown, else
    the middle :class:`~matplotlib.axes.Axes` (its figure holds both trees).

    Examples
    --------
    >>> sb.pl.compare_hierarchies(adata, "scbranch_hierarchy", "annotation")  # doctest: +SKIP
    """
    _check_line_style(kwargs, "compare_hierarchies")
    tree_a, tree_b = _tree(adata, key_a), _tree(adata, key_b)
    if set(tree_a.classes) != set(tree_b.classes):
        raise ValueError("The two hierarchies cover different cell types; compare the same ones.")
    if titles is None:
        titles = tuple(k if isinstance(k, str) else "tree" for k in (key_a, key_b))
    n = tree_a.n_classes
    longest = max(len(c) for c in tree_a.classes)
    grid = {"width_ratios": [3, 1.2 + 0.06 * longest, 3], "wspace": 0.05}
    if ax is None:
        _, (ax_a, ax_mid, ax_b) = plt.subplots(
            1, 3, figsize=(8.0 + 0.12 * longest, max(3.0, 0.35 * n + 1.2)), gridspec_kw=grid
        )
    else:
        # three panels in the place of one Axes, as a grid cell split in three
        spec = ax.get_subplotspec()
        if spec is None:
            raise ValueError(
                "`ax` must be an Axes of a grid (plt.subplots, fig.add_subplot, subfigures); "
                "its place is split into the three panels."
            )
        figure = ax.figure
        ax.remove()
        cells = spec.subgridspec(1, 3, **grid)
        ax_a, ax_mid, ax_b = (figure.add_subplot(cells[0, i]) for i in range(3))
    branch_tree(tree_a, orientation="left", show_times=show_times, ax=ax_a, show=False, **kwargs)
    branch_tree(tree_b, orientation="right", show_times=show_times, ax=ax_b, show=False, **kwargs)
    ax_a.set_title(titles[0])
    ax_b.set_title(titles[1])
    # the labels sit in the middle panel, once, with the links
    ax_a.set_yticklabels([])
    ax_b.set_yticklabels([])
    order_a, _ = _leaf_layout(tree_a)
    order_b, _ = _leaf_layout(tree_b)
    pos_a = {tree_a.classes[c]: i for i, c in enumerate(order_a)}
    pos_b = {tree_b.classes[c]: i for i, c in enumerate(order_b)}
    in_b, in_a = set(clades(tree_b)), set(clades(tree_a))
    for c, name in enumerate(tree_a.classes):
        differs = _smallest_clade(tree_a, c) not in in_b | {
            frozenset(tree_b.classes)
        } or _smallest_clade(tree_b, int(tree_b.class_index(name)[0])) not in in_a | {
            frozenset(tree_a.classes)
        }
        color = _DISAGREE if differs else "0.6"
        ya, yb = pos_a[name], pos_b[name]
        ax_mid.plot([0.0, 0.25], [ya, ya], color=color, lw=1.0)
        ax_mid.plot([0.25, 0.75], [ya, yb], color=color, lw=1.0)
        ax_mid.plot([0.75, 1.0], [yb, yb], color=color, lw=1.0)
        ax_mid.text(0.02, ya, name, ha="left", va="bottom", fontsize="x-small", color="0.2")
    ax_mid.set_xlim(0, 1)
    ax_mid.set_ylim(n - 0.5, -0.5)
    ax_mid.axis("off")
    return _finish(ax_mid, show, return_fig, save, "compare_hierarchies")
