"""Baseline generators behind scbranch's generation interface, for honest comparisons.

Each is fitted on training cells and has ``generate(n_cells, labels=..., seed=...)`` returning
a new AnnData shaped like :meth:`scbranch.BranchedDiffusion.generate`'s output, so that
:func:`scbranch.tl.evaluate` treats every method the same way. The flat, label-guided diffusion
baseline is ``BranchedDiffusion(adata, architecture="flat")``.
"""

from ._base import Baseline
from ._bootstrap import SmoothedBootstrap
from ._gaussian import PerClassGaussian
from ._scvi_resampling import ScviResampling

__all__ = ["Baseline", "PerClassGaussian", "ScviResampling", "SmoothedBootstrap"]
