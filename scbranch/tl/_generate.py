"""``scbranch.tl.generate``: the functional mirror of ``BranchedDiffusion.generate``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from anndata import AnnData

if TYPE_CHECKING:
    from ..model import BranchedDiffusion


def generate(model: BranchedDiffusion, n_cells: int | Mapping[str, int] = 100, **kwargs) -> AnnData:
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
    The generated cells; the user's data are never modified.

    Examples
    --------
    >>> gen = sb.tl.generate(model, n_cells={"CD19+ B": 500}, seed=0)  # doctest: +SKIP
    """
    return model.generate(n_cells, **kwargs)
