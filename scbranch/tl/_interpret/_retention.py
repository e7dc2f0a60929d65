"""What transmuted cells kept: correlation with their own source state, against a control."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import stats

from ..._keys import Key
from ..._validation import check_finite, to_dense
from ._inputs import (
    RETENTION_COLUMNS,
    _check_transmutation,
    _model_obsm_key,
    _obsm,
    _paired_rows,
    _pairs,
    _record,
)

logger = logging.getLogger(__name__)


# -------------------------------------------------------------------- retention
def _state_matrix(transmuted: AnnData, use_rep: str | None) -> tuple[np.ndarray, str]:
    """All rows of ``transmuted`` in the model's representation (or ``use_rep``)."""
    if use_rep is None:
        obsm_key = _model_obsm_key(transmuted)
        if obsm_key is not None and obsm_key in transmuted.obsm:
            use_rep = obsm_key
        elif transmuted.n_vars > 0:
            use_rep = "X"
        else:
            raise ValueError(
                "transmuted carries neither the model's representation "
                f"(obsm[{obsm_key!r}]) nor genes; pass `use_rep=` naming an .obsm key "
                f"(available: {list(transmuted.obsm.keys())})."
            )
    if use_rep == "X":
        if transmuted.n_vars == 0 or transmuted.X is None:
            raise ValueError(
                "use_rep='X' needs genes but transmuted has none (n_vars == 0); pass an .obsm "
                f"key (available: {list(transmuted.obsm.keys())})."
            )
        x = to_dense(transmuted.X)
    else:
        if use_rep not in transmuted.obsm:
            raise KeyError(
                f"use_rep={use_rep!r} is not in transmuted.obsm (available: "
                f"{list(transmuted.obsm.keys())}); or pass 'X' for genes."
            )
        x = _obsm(transmuted, use_rep)
    check_finite(x, f"transmuted.{'X' if use_rep == 'X' else f'obsm[{use_rep!r}]'}")
    return x, use_rep


def _row_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of every row of ``a`` with the same row of ``b``."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, np.sum(a * b, axis=1) / norm, np.nan)


def identity_retention(
    transmuted: AnnData,
    *,
    use_rep: str | None = None,
    n_shuffles: int = 100,
    key_added: str | None = Key.uns.IDENTITY_RETENTION,
    seed: int = 0,
) -> pd.DataFrame:
    """How much of each cell's individuality survives the transmutation.

    For each (source, target) pair, every source cell's deviation from the mean of the source
    cells (its residual) is compared with its endpoint's deviation from the mean of the
    endpoints: the Pearson correlation of the two residual vectors, per trajectory. About 1:
    cells keep what set them apart from their type (e.g. a monocyte with high interferon
    genes becomes a dendritic cell with high interferon genes); about 0: the endpoint is a
    typical target cell unrelated to its source. The control re-pairs sources and endpoints at
    random (about 0); ``rank_retention`` asks whether atypical cells stay atypical (Spearman
    correlation, across cells, of the distance to the type mean at source and at endpoint).

    Parameters
    ----------
    transmuted
        Trajectories of :meth:`~scbranch.BranchedDiffusion.transmute`.
    use_rep
        Representation of the states: an ``.obsm`` key, or ``"X"`` for decoded genes. Default
        the model's (``obsm[obsm_key]``; ``.X`` for expression models).
    n_shuffles
        Random re-pairings averaged in the control.
    key_added
        Store an h5ad-safe copy of the table and the parameters in
        ``transmuted.uns[key_added]`` (read it back with :func:`read_interpretation`) and each
        trajectory's correlation in ``transmuted.obs[key_added]``; `None`: store nothing, only
        return the table.
    seed
        Seed of the re-pairings.

    Returns
    -------
    DataFrame with one row per (``source_label``, ``target_label``): ``n_cells``, ``median`` and
    ``mean`` of the per-trajectory correlations, ``control`` (median correlation of randomly
    re-paired residuals, averaged over the shuffles), ``control_sd`` (its standard deviation
    over shuffles) and ``rank_retention``. Sets the following fields:

    `transmuted.obs[key_added]` : :class:`float`
        Each trajectory's correlation, on all its rows (NaN for trajectories not scored),
        unless ``key_added`` is `None` (default ``'scbranch_identity_retention'``).
    `transmuted.uns[key_added]` : :class:`dict`
        ``'params'`` and ``'table'``, unless ``key_added`` is `None`.

    Examples
    --------
    >>> import scbranch as sb
    >>> tm = model.transmute(monocytes, target="Dendritic")  # doctest: +SKIP
    >>> sb.tl.identity_retention(tm)  # doctest: +SKIP
    >>> ends = tm.obs["phase"] == "endpoint"  # one value per trajectory  # doctest: +SKIP
    >>> tm.obs.loc[ends, "scbranch_identity_retention"].describe()  # doctest: +SKIP
    """
    _check_transmutation(transmuted)
    if int(n_shuffles) < 1:
        raise ValueError(f"n_shuffles must be at least 1, got {n_shuffles}.")
    x, use_rep = _state_matrix(transmuted, use_rep)
    if x.shape[1] < 2:
        raise ValueError(
            f"The representation {use_rep!r} has {x.shape[1]} dimension(s); a correlation of "
            "residual vectors needs at least 2."
        )
    paired = _paired_rows(transmuted)
    rng = np.random.default_rng(seed)
    per_trajectory = pd.Series(np.nan, index=paired.index, dtype=float)
    rows = []
    for source, target in _pairs(paired):
        sel = ((paired["source_label"] == source) & (paired["target_label"] == target)).to_numpy()
        sub = paired[sel]
        n = len(sub)
        row = {"source_label": source, "target_label": target, "n_cells": n}
        if n < 3:
            logger.warning(
                "%s -> %s has %d trajectories; identity retention needs at least 3.",
                source,
                target,
                n,
            )
            rows.append(row)
            continue
        xs, xe = x[sub["source"].to_numpy()], x[sub["endpoint"].to_numpy()]
        rs, re = xs - xs.mean(0), xe - xe.mean(0)
        r = _row_correlations(rs, re)
        per_trajectory.loc[sub.index] = r
        shuffled = np.array(
            [np.nanmedian(_row_correlations(rs, re[rng.permutation(n)])) for _ in range(n_shuffles)]
        )
        rank = stats.spearmanr(np.linalg.norm(rs, axis=1), np.linalg.norm(re, axis=1))[0]
        row |= {
            "median": float(np.nanmedian(r)),
            "mean": float(np.nanmean(r)),
            "control": float(np.mean(shuffled)),
            "control_sd": float(np.std(shuffled)),
            "rank_retention": float(rank),
        }
        rows.append(row)
        logger.info(
            "%s -> %s: median identity retention %.2f (re-paired control %.2f), %d cells.",
            source,
            target,
            row["median"],
            row["control"],
            n,
        )
    table = pd.DataFrame(rows, columns=RETENTION_COLUMNS)
    if key_added is not None:
        ids = transmuted.obs[Key.obs.TRAJECTORY].astype(str).to_numpy()
        # obs and uns under the same key, so runs with different key_added keep both
        transmuted.obs[key_added] = per_trajectory.reindex(ids).to_numpy(dtype=np.float64)
        transmuted.uns[key_added] = _record(
            table,
            params={
                "use_rep": use_rep,
                "n_shuffles": int(n_shuffles),
                "seed": int(seed),
                "obs_key": key_added,
            },
        )
    return table
