"""Where the diffusion runs, and how cells get in and out: one ``Space`` per representation.

:class:`~scbranch.BranchedDiffusion` holds one :class:`Space` and never asks which kind it is.
A space is fitted on the set-up data, encodes cells into the diffused coordinates, decodes
generated coordinates into ``.X``, layers and ``obs`` columns, says whether it can make counts,
and saves its state as plain data and arrays. Spaces are found by name in :data:`SPACES`
(as moscot finds its solvers); a new representation is one new class::

    @register_space
    class MySpace(Space):
        name = "mine"
        ...

    model = BranchedDiffusion(adata, space="mine")

Shipped spaces:

* :class:`PcaSpace` (``"pca"``): a latent in ``obsm[obsm_key]``; when it is a PCA of the
  expression (scanpy's ``varm['PCs']`` reproduces it) generated cells are decoded to genes,
  optionally with the per-gene residual noise and, with a ``counts_layer``, to counts.
* :class:`ScviSpace` (``"scvi"``): an scVI model's latent means, decoded by scVI to normalised
  expression and counts sampled from its likelihood.
* :class:`ExpressionSpace` (``"expression"``): log-normalised genes themselves.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._base import (
    SPACES,
    Decoded,
    Space,
    TopologySource,
    auto_noise,
    check_noise,
    register_space,
)
from ._expression import EXPRESSION_ADVICE_GENES, ExpressionSpace
from ._gene_counts import MAX_MEAN_COUNT, _GeneSpace, _SizeFactorCounts
from ._pca import NB_FIT_CELLS, PcaSpace
from ._scvi_latent import ScviSpace

__all__ = [
    "EXPRESSION_ADVICE_GENES",
    "MAX_MEAN_COUNT",
    "NB_FIT_CELLS",
    "SPACES",
    "Decoded",
    "ExpressionSpace",
    "PcaSpace",
    "ScviSpace",
    "Space",
    "TopologySource",
    "_GeneSpace",
    "_SizeFactorCounts",
    "auto_noise",
    "check_noise",
    "register_space",
    "space_name",
]


def space_name(space: str | None, setup: Mapping, scvi_model) -> str:
    """The registered space a model uses: ``space`` if given, else inferred from the set-up."""
    if space is None:
        if scvi_model is not None:
            return ScviSpace.name
        return PcaSpace.name if setup.get("obsm_key") else ExpressionSpace.name
    if space not in SPACES:
        raise ValueError(f"Unknown space {space!r}; registered spaces are {sorted(SPACES)}.")
    return space
