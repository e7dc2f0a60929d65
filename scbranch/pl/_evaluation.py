"""Plot of :func:`scbranch.tl.evaluate`: every metric per class, against its real control."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from matplotlib import pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .._keys import Key
from ..tl._evaluate import METRICS, REFERENCE_SPACE, read_evaluation
from ._utils import _default_colors, save_figure


def _select(report: pd.DataFrame, metrics, space, groups) -> tuple[pd.DataFrame, list[str]]:
    """Rows of the requested metrics in one comparison space (gene metrics have their own)."""
    missing = {"space", "group", "metric", "generated", "control"} - set(report.columns)
    if missing:
        raise ValueError(
            f"`report` lacks column(s) {sorted(missing)}; pass the DataFrame returned by "
            "`scbranch.tl.evaluate` (or several of them concatenated)."
        )
    distribution_spaces = [s for s in pd.unique(report["space"]) if s not in ("genes", "counts")]
    if space is None:
        space = (
            REFERENCE_SPACE
            if REFERENCE_SPACE in distribution_spaces
            else (distribution_spaces[0] if distribution_spaces else None)
        )
    elif space not in distribution_spaces:
        raise ValueError(f"space={space!r} is not in the report (spaces: {distribution_spaces}).")
    rows = report[report["space"].isin([space, "genes", "counts"])]
    available = [m for m in METRICS if m in set(rows["metric"])]
    if metrics is None:
        metrics = available
    else:
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        unknown = [m for m in metrics if m not in available]
        if unknown:
            raise ValueError(f"Metric(s) {unknown} are not in the report (available: {available}).")
    rows = rows[rows["metric"].isin(metrics)]
    if groups is not None:
        groups = [groups] if isinstance(groups, str) else list(groups)
        unknown = [g for g in groups if g not in set(rows["group"])]
        if unknown:
            elsewhere = [g for g in unknown if g in set(report["group"])]
            raise ValueError(
                f"Group(s) {unknown} have no rows for the metric(s) {metrics}"
                + (
                    f" ({elsewhere} have other metrics: too few cells for distances?)."
                    if elsewhere
                    else f"; the report's groups are {sorted(set(report['group']))}."
                )
            )
        rows = rows[rows["group"].isin(groups)]
    return rows, metrics


def evaluation(
    report: pd.DataFrame | AnnData,
    *,
    metrics: str | Sequence[str] | None = None,
    space: str | None = None,
    groups: str | Sequence[str] | None = None,
    hue: str | None = None,
    key: str = Key.uns.EVALUATION,
    ncols: int = 4,
    panel_size: tuple[float, float] = (3.2, 3.0),
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    save: bool | str | None = None,
) -> Axes | list[Axes] | Figure | None:
    """Each metric per class as dots, next to its real-vs-real control.

    One panel per metric; rows are classes (and their ``mean``). Generated values are coloured
    dots (one colour per value of ``hue``, e.g. the method), control values black open
    diamonds. When the report holds replicates (e.g. several seeds concatenated), dots show
    their mean and whiskers their range.

    Parameters
    ----------
    report
        DataFrame of :func:`scbranch.tl.evaluate` (several may be concatenated, with a column
        such as ``"method"`` or ``"seed"`` telling them apart), or an AnnData holding one under
        ``.uns[key]``.
    metrics
        Metrics to draw; default every metric in the report.
    space
        Comparison space of the distribution metrics; default the reference PCA.
    groups
        Classes (rows) to draw; default all, with their mean.
    hue
        Column of ``report`` whose values get separate colours; default ``"method"`` when
        the report has it.
    key
        ``.uns`` key when ``report`` is an AnnData.
    ncols
        Panels per row.
    panel_size
        Width and height of one panel (inches).
    ax
        Axes to draw into; only with a single metric.
    show
        Show the figure; `None` follows ``scanpy.settings.autoshow``.
    return_fig
        Return the figure instead of showing it.
    save
        Also write the figure to ``scanpy.settings.figdir``, as scanpy's plots do, named
        ``evaluation``: `True` adds ``scanpy.settings.file_format_figs``, a string
        is added to the name (``"_pbmc.pdf"``; its suffix sets the format).

    Returns
    -------
    The figure if ``return_fig``; `None` if shown; otherwise the Axes (a list for several
    panels).

    Examples
    --------
    >>> report = sb.tl.evaluate(gen, heldout, "cell_type", train=train)  # doctest: +SKIP
    >>> sb.pl.evaluation(report, metrics=["w2", "auroc"])  # doctest: +SKIP
    """
    if isinstance(report, AnnData):
        report = read_evaluation(report, key)
    if not isinstance(report, pd.DataFrame):
        raise TypeError(f"`report` must be a DataFrame or an AnnData, got {type(report).__name__}.")
    rows, metrics = _select(report, metrics, space, groups)
    if rows.empty:
        raise ValueError("Nothing to plot: the report has no rows for these metrics and groups.")
    if hue is None and "method" in rows.columns:
        hue = "method"
    if hue is not None and hue not in rows.columns:
        raise KeyError(f"hue={hue!r} is not a column of the report ({list(rows.columns)}).")
    hues = list(pd.unique(rows[hue])) if hue is not None else [None]
    colors = dict(zip(hues, _default_colors(len(hues)), strict=True))
    group_order = [g for g in pd.unique(rows["group"]) if g != "mean"]
    group_order += ["mean"] if "mean" in set(rows["group"]) else []

    if ax is not None:
        if len(metrics) != 1:
            raise ValueError(f"`ax` takes one metric; got {len(metrics)}. Pass `metrics=`.")
        axes = [ax]
        fig = ax.figure
    else:
        ncols = max(1, min(ncols, len(metrics)))
        nrows = int(np.ceil(len(metrics) / ncols))
        height = max(panel_size[1], 0.28 * len(group_order) + 1.0)
        fig, grid = plt.subplots(
            nrows,
            ncols,
            figsize=(panel_size[0] * ncols + 2.0, height * nrows),
            squeeze=False,
            sharey=True,
            layout="constrained",
        )
        axes = list(grid.ravel())
        for extra in axes[len(metrics) :]:
            extra.set_visible(False)
        axes = axes[: len(metrics)]

    y_of = {g: i for i, g in enumerate(group_order)}
    offsets = np.linspace(-0.25, 0.25, len(hues)) if len(hues) > 1 else np.zeros(1)
    for panel, metric in zip(axes, metrics, strict=True):
        df = rows[rows["metric"] == metric]
        control = df.groupby("group")["control"].mean()
        for h, off in zip(hues, offsets, strict=True):
            sub = df if h is None else df[df[hue] == h]
            stats = sub.groupby("group")["generated"].agg(["mean", "min", "max"])
            y = np.array([y_of[g] for g in stats.index]) + off
            mean, low, high = (stats[c].to_numpy() for c in ("mean", "min", "max"))
            # runs that agree to the last bit give a mean one rounding step outside [min, max]
            spread = np.clip(np.vstack([mean - low, high - mean]), 0.0, None)
            panel.errorbar(
                mean,
                y,
                xerr=spread,
                fmt="o",
                ms=5,
                color=colors[h],
                elinewidth=1,
                capsize=0,
                label=h,
            )
        panel.scatter(
            control.to_numpy(),
            [y_of[g] for g in control.index],
            marker="D",
            s=28,
            facecolors="none",
            edgecolors="black",
            linewidths=1.0,
            zorder=3,
        )
        ideal = {"auroc": 0.5}.get(metric)
        if ideal is not None:
            panel.axvline(ideal, color="0.7", lw=0.8, ls="--", zorder=0)
        panel.set_title(f"{metric} ({METRICS[metric]} is better)", fontsize=9)
        panel.grid(axis="x", color="0.92")
    axes[0].set_yticks(range(len(group_order)), group_order)
    axes[0].set_ylim(len(group_order) - 0.5, -0.5)
    handles = [Line2D([], [], marker="D", ls="", mfc="none", mec="black", label="real vs real")]
    handles += [
        Line2D(
            [], [], marker="o", ls="", color=colors[h], label="generated" if h is None else str(h)
        )
        for h in hues
    ]
    axes[-1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)

    save_figure(fig, save, "evaluation")
    if return_fig:
        return fig
    if show is None:
        from scanpy import settings

        show = settings.autoshow
    if show:
        plt.show()
        return None
    return axes[0] if len(axes) == 1 else axes
