"""Functional mirrors of the model's sampling methods (generate, transmute, hybrids, ...)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from anndata import AnnData

if TYPE_CHECKING:
    from ..model import BranchedDiffusion


def generate(
    model: BranchedDiffusion, n_cells: int | Mapping[str, int] = 100, **kwargs
) -> AnnData | Path:
    """Generate cells with a trained model, as a new AnnData (notebook-style mirror).

    Parameters
    ----------
    model
        A trained :class:`~scbranch.BranchedDiffusion`.
    n_cells
        Cells per type, or a dict ``{cell type: count}``.
    **kwargs
        Options of :meth:`~scbranch.BranchedDiffusion.generate` (``labels``, ``solver``,
        ``n_steps``, ``share``, ``seed``, ...).

    Returns
    -------
    The generated cells, or with ``out=`` the path of the file they were written to; the
    user's data are never modified.

    Examples
    --------
    >>> gen = sb.tl.generate(model, n_cells={"CD19+ B": 500}, seed=0)  # doctest: +SKIP
    """
    return model.generate(n_cells, **kwargs)


def generate_anchored(
    model: BranchedDiffusion, adata: AnnData, n_cells: int | Mapping[str, int] = 100, **kwargs
) -> AnnData | Path:
    """Generate new cells of each type from real cells of that type (notebook-style mirror).

    Parameters
    ----------
    model
        A trained :class:`~scbranch.BranchedDiffusion`.
    adata
        Real cells (the anchors) in the model's representation, labelled in
        ``obs[labels_key]``.
    n_cells
        New cells per type present in ``adata``, or a dict ``{cell type: count}``.
    **kwargs
        Options of :meth:`~scbranch.BranchedDiffusion.generate_anchored` (``anchor_time``,
        ``n_steps``, ``seed``, ``residual_noise``, ``counts``, ...).

    Returns
    -------
    The new cells, each with its anchor in ``obs['scbranch_anchor']`` (with ``out=``, the path
    of the file they were written to); the user's data are never modified.

    Examples
    --------
    >>> gen = sb.tl.generate_anchored(model, train, {"Dendritic": 200}, seed=0)  # doctest: +SKIP
    """
    return model.generate_anchored(adata, n_cells, **kwargs)


def transmute(model: BranchedDiffusion, adata: AnnData, target: str, **kwargs) -> AnnData:
    """Carry real cells to another type through their branch point (notebook-style mirror).

    Parameters
    ----------
    model
        A trained :class:`~scbranch.BranchedDiffusion`.
    adata
        Real cells in the model's representation.
    target
        The type to transmute into.
    **kwargs
        Options of :meth:`~scbranch.BranchedDiffusion.transmute` (``mode``,
        ``n_checkpoints``, ``source``, ``per_cell_source``, ``seed``, ...).

    Returns
    -------
    One row per (cell, checkpoint); see :meth:`~scbranch.BranchedDiffusion.transmute`.

    Examples
    --------
    >>> mono = adata[adata.obs["cell_type"] == "CD14+ Monocyte"]  # doctest: +SKIP
    >>> tm = sb.tl.transmute(model, mono, "Dendritic", mode="ode")  # doctest: +SKIP
    """
    return model.transmute(adata, target, **kwargs)


def hybrids(
    model: BranchedDiffusion, label_a: str, label_b: str, n_cells: int = 100, **kwargs
) -> AnnData:
    """Pairs of cells of two types sharing their path above the branch point (mirror).

    Parameters
    ----------
    model
        A trained :class:`~scbranch.BranchedDiffusion`.
    label_a, label_b
        The two types.
    n_cells
        Number of pairs.
    **kwargs
        Options of :meth:`~scbranch.BranchedDiffusion.hybrids`.

    Returns
    -------
    ``2 * n_cells`` cells with ``obs['pair']`` and ``obs['side']``.

    Examples
    --------
    >>> hy = sb.tl.hybrids(model, "CD4+/CD25 T Reg", "CD8+ Cytotoxic T", 200)  # doctest: +SKIP
    """
    return model.hybrids(label_a, label_b, n_cells, **kwargs)
