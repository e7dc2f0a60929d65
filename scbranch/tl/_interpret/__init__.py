"""Interpreting transmutation trajectories: did cells arrive, what did they keep, what changed.

All functions read the trajectory AnnData of :meth:`~scbranch.BranchedDiffusion.transmute`:
one row per (cell, checkpoint) with ``obs['trajectory']``, ``obs['checkpoint']``, ``obs['t']``,
``obs['phase']`` (``"source"``, ``"up"``, ``"branch point"``, ``"down"``, ``"endpoint"``),
``obs['source_label']`` and ``obs['target_label']``; decoded genes in ``.X`` (when the model maps
back to genes), the denoised state in ``obsm[obsm_key]`` (latent models) and provenance in
``uns['scbranch']``.
"""

from ._genes import RANK_METHODS, rank_transmutation_genes
from ._inputs import (
    DOWN_PHASES,
    N_COMPS_GENES,
    N_FOLDS,
    PHASES,
    RETENTION_COLUMNS,
    RETENTION_OBS_KEY,
    SUCCESS_COLUMNS,
    _check_trajectories,
    _check_transmutation,
    _model_info,
    _model_obsm_key,
    _obsm,
    _shared_representation,
    read_interpretation,
)
from ._retention import identity_retention
from ._success import transmutation_success

__all__ = [
    "DOWN_PHASES",
    "N_COMPS_GENES",
    "N_FOLDS",
    "PHASES",
    "RANK_METHODS",
    "RETENTION_COLUMNS",
    "RETENTION_OBS_KEY",
    "SUCCESS_COLUMNS",
    "_check_trajectories",
    "_check_transmutation",
    "_model_info",
    "_model_obsm_key",
    "_obsm",
    "_shared_representation",
    "identity_retention",
    "rank_transmutation_genes",
    "read_interpretation",
    "transmutation_success",
]
