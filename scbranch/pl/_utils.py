"""Shared helpers of the plotting functions: inputs, colours and scanpy's show/return rules."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib import colormaps
from matplotlib import pyplot as plt
from matplotlib.axes import Axes
from matplotlib.colors import is_color_like, to_hex
from matplotlib.figure import Figure

from ..module import BranchTree

logger = logging.getLogger(__name__)


def _get_hierarchy(adata: AnnData | BranchTree, key: str) -> tuple[BranchTree, dict | None]:
    """Return the stored tree and its ``.uns`` record (`None` when given a tree)."""
    if isinstance(adata, BranchTree):
        return adata, None
    if not isinstance(adata, AnnData):
        raise TypeError(
            f"Expected an AnnData or a scbranch.module.BranchTree, got {type(adata).__name__}."
        )
    from ..tl import read_hierarchy

    return read_hierarchy(adata, key)


def _class_colors(adata: AnnData | BranchTree, record: dict | None, classes: Sequence[str]):
    """Look up class colours in ``adata.uns[f'{groupby}_colors']`` (scanpy convention).

    Returns a list with one hex colour (or `None` where unknown) per class, or `None` when the
    data carry no usable palette.
    """
    if record is None or not isinstance(adata, AnnData):
        return None
    groupby = str(record.get("params", {}).get("groupby", ""))
    colors = adata.uns.get(f"{groupby}_colors") if groupby else None
    if colors is None or groupby not in adata.obs.columns:
        return None
    column = adata.obs[groupby]
    if isinstance(column.dtype, pd.CategoricalDtype):
        categories = [str(c) for c in column.cat.categories]
    else:
        categories = sorted({str(c) for c in column.dropna()})
    colors = list(np.asarray(colors).ravel())
    if len(colors) < len(categories):
        return None
    lookup = {c: col for c, col in zip(categories, colors, strict=False) if is_color_like(col)}
    out = [to_hex(lookup[c]) if c in lookup else None for c in classes]
    return out if any(c is not None for c in out) else None


def _default_colors(n: int) -> list[str]:
    """Return a qualitative palette of ``n`` distinguishable colours."""
    if n <= 10:
        cmap = colormaps["tab10"]
        return [to_hex(cmap(i)) for i in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        return [to_hex(cmap(i)) for i in range(n)]
    cmap = colormaps["turbo"]
    return [to_hex(c) for c in cmap(np.linspace(0.05, 0.95, n))]


def _new_axes(figsize: tuple[float, float]) -> Axes:
    """Create a figure with one Axes (constrained layout: long labels are not cut off)."""
    fig = plt.figure(figsize=figsize, layout="constrained")
    return fig.add_subplot(1, 1, 1)


#: suffixes that set a saved figure's format (others get scanpy's default format appended)
_FIGURE_FORMATS = (".png", ".pdf", ".svg", ".eps", ".ps", ".jpg", ".jpeg", ".tif", ".tiff")


def save_figure(fig: Figure, save: bool | str | None, name: str) -> Path | None:
    """Write ``fig`` where scanpy's ``save=`` writes: ``settings.figdir / f"{name}{save}"``.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> save_figure(plt.figure(), None, "branch_tree") is None
    True
    """
    if save is None or (isinstance(save, bool | str) and not save):  # False or "", as scanpy
        return None
    from scanpy import settings

    if not isinstance(save, bool | str):
        raise TypeError(f"save must be True, False or a string to add to the name, got {save!r}.")
    suffix = "" if save is True else save
    filename = f"{name}{suffix}"
    if not filename.lower().endswith(_FIGURE_FORMATS):
        filename += f".{settings.file_format_figs}"
    path = Path(settings.figdir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")  # at rcParams["savefig.dpi"], as scanpy sets it
    logger.info("Saved the figure to %s.", path)
    return path


def _finish(
    ax: Axes, show: bool | None, return_fig: bool, save: bool | str | None = None, name: str = ""
) -> Axes | Figure | None:
    """Apply scanpy's rules for what a plotting function returns.

    ``save`` writes the figure first (:func:`save_figure`, named after the function ``name``).
    ``return_fig=True`` returns the :class:`~matplotlib.figure.Figure` without showing it.
    Otherwise ``show=None`` follows ``scanpy.settings.autoshow``; showing calls
    :func:`matplotlib.pyplot.show` and returns `None`, not showing returns the Axes.
    """
    save_figure(ax.figure, save, name)
    if return_fig:
        return ax.figure
    if show is None:
        from scanpy import settings

        show = settings.autoshow
    if show:
        plt.show()
        return None
    return ax
