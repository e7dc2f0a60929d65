"""What the interpretation tools read: trajectory rows, pairs, a shared representation."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd
from anndata import AnnData

from ..._keys import Key
from ..._validation import check_finite, to_dense
from ...metrics._reference import ReferencePCA

logger = logging.getLogger(__name__)

#: phases of a transmutation trajectory, in order
PHASES = Key.phase.ALL
#: phases on the way down (from the branch point to the endpoint)
DOWN_PHASES = Key.phase.DOWN_PHASES
#: per-row identity retention written by :func:`identity_retention` (documented output key)
RETENTION_OBS_KEY = Key.obs.IDENTITY_RETENTION
#: components of the PCA of genes used when no latent representation is shared
N_COMPS_GENES = 30
#: folds of the out-of-fold control when no held-out cells are given
N_FOLDS = 5

SUCCESS_COLUMNS = [
    "source_label",
    "target_label",
    "n_cells",
    "success",
    "control",
    "ratio",
    "stayed",
    "n_control",
]
RETENTION_COLUMNS = [
    "source_label",
    "target_label",
    "n_cells",
    "median",
    "mean",
    "control",
    "control_sd",
    "rank_retention",
]


# ------------------------------------------------------------------------------ inputs
def _model_info(adata: AnnData) -> Mapping:
    """``uns['scbranch']['model']`` (empty when absent)."""
    record = adata.uns.get(Key.uns.GENERATED, {})
    model = record.get("model", {}) if isinstance(record, Mapping) else {}
    return model if isinstance(model, Mapping) else {}


def _model_obsm_key(adata: AnnData) -> str | None:
    key = str(_model_info(adata).get("obsm_key", "") or "")
    return key or None


def _check_trajectories(adata: AnnData, name: str = "transmuted") -> None:
    """Raise unless ``adata`` is a trajectory AnnData (one row per cell and checkpoint)."""
    if not isinstance(adata, AnnData):
        raise TypeError(f"`{name}` must be an AnnData, got {type(adata).__name__}.")
    missing = [
        k for k in (Key.obs.TRAJECTORY, Key.obs.CHECKPOINT, Key.obs.T) if k not in adata.obs.columns
    ]
    if missing:
        raise ValueError(
            f"{name}.obs lacks {missing}: pass the trajectory AnnData returned by "
            "`model.transmute(...)` (or `model.generate(..., trajectory_times=...)`)."
        )


def _check_transmutation(adata: AnnData, name: str = "transmuted") -> None:
    """Raise unless ``adata`` holds transmutation trajectories with source and endpoint rows."""
    _check_trajectories(adata, name)
    needed = (Key.obs.PHASE, Key.obs.SOURCE_LABEL, Key.obs.TARGET_LABEL)
    missing = [k for k in needed if k not in adata.obs.columns]
    if missing:
        raise ValueError(
            f"{name}.obs lacks {missing}, so these are not transmutation trajectories (those of "
            "`model.generate(..., trajectory_times=...)` have no source cells). Pass the "
            "AnnData returned by `model.transmute(cells, target=...)`."
        )
    phase = adata.obs[Key.obs.PHASE].astype(str)
    for needed in (Key.phase.SOURCE, Key.phase.ENDPOINT):
        if not (phase == needed).any():
            raise ValueError(
                f"{name} has no rows with obs['phase'] == {needed!r} (phases present: "
                f"{sorted(set(phase))}); it is not (or no longer) a whole transmutation. Pass "
                "the AnnData returned by `model.transmute(...)` without dropping rows."
            )


def _phase_rows(adata: AnnData, phase: str) -> pd.Series:
    """Row positions of one phase, indexed by trajectory id (one row per trajectory)."""
    obs = adata.obs
    pos = np.flatnonzero(obs[Key.obs.PHASE].astype(str).to_numpy() == phase)
    ids = obs[Key.obs.TRAJECTORY].astype(str).to_numpy()[pos]
    rows = pd.Series(pos, index=pd.Index(ids, name="trajectory"))
    if rows.index.has_duplicates:
        dup = list(pd.unique(rows.index[rows.index.duplicated()])[:3])
        raise ValueError(
            f"Several {phase!r} rows share trajectory id(s) {dup}: trajectory ids must be unique "
            "(were transmutations concatenated? make obs['trajectory'] unique first)."
        )
    return rows


def _paired_rows(adata: AnnData) -> pd.DataFrame:
    """Per trajectory: row of its source state, row of its endpoint, source and target label."""
    src, end = _phase_rows(adata, Key.phase.SOURCE), _phase_rows(adata, Key.phase.ENDPOINT)
    common = end.index.intersection(src.index, sort=False)
    dropped = len(end) + len(src) - 2 * len(common)
    if dropped:
        logger.warning("%d trajectories lack a source or an endpoint row and are ignored.", dropped)
    if not len(common):
        raise ValueError("No trajectory has both a source and an endpoint row.")
    end_pos = end.loc[common].to_numpy()
    obs = adata.obs
    return pd.DataFrame(
        {
            "source": src.loc[common].to_numpy(),
            "endpoint": end_pos,
            "source_label": obs[Key.obs.SOURCE_LABEL].astype(str).to_numpy()[end_pos],
            "target_label": obs[Key.obs.TARGET_LABEL].astype(str).to_numpy()[end_pos],
        },
        index=common,
    )


def _pairs(paired: pd.DataFrame) -> list[tuple[str, str]]:
    """(source, target) pairs in order of appearance."""
    return list(dict.fromkeys(zip(paired["source_label"], paired["target_label"], strict=True)))


def _dense_rows(m, rows: np.ndarray | None = None) -> np.ndarray:
    if rows is not None:
        m = m[rows]
    return to_dense(m)


def _obsm(adata: AnnData, key: str) -> np.ndarray:
    m = adata.obsm[key]
    m = m.to_numpy() if isinstance(m, pd.DataFrame) else m
    return to_dense(m)


def _shared_representation(
    query: AnnData,
    others: Mapping[str, AnnData],
    use_rep: str | None,
    *,
    query_name: str = "transmuted",
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """Coordinates of ``query`` and of every AnnData in ``others`` in one shared space.

    ``use_rep``: an ``.obsm`` key present in all, ``"X"`` for genes, or `None` for the model's
    ``obsm_key`` when every object carries it, else genes. Genes are aligned on the genes common
    to all objects and projected on a PCA fitted on the first of ``others`` (the real cells).

    Returns the query coordinates, the others' coordinates and a description for ``params``.
    """
    objects = {query_name: query, **others}
    if use_rep is None:
        obsm_key = _model_obsm_key(query)
        if obsm_key is not None and all(obsm_key in a.obsm for a in objects.values()):
            use_rep = obsm_key
        elif query.n_vars > 0:
            if obsm_key is not None:
                logger.info(
                    "obsm[%r] is not in every object; comparing on shared genes instead.",
                    obsm_key,
                )
            use_rep = "X"
        else:
            lacking = [n for n, a in objects.items() if obsm_key is None or obsm_key not in a.obsm]
            raise ValueError(
                f"No representation shared by {list(objects)}: {query_name} carries no genes "
                f"(n_vars == 0) and the model's obsm[{obsm_key!r}] is missing in {lacking}. "
                "Pass `use_rep=` naming an .obsm key present in all of them (e.g. the PCA the "
                "model was trained on)."
            )
    if use_rep != "X":
        for name, a in objects.items():
            if use_rep not in a.obsm:
                raise KeyError(
                    f"use_rep={use_rep!r} is not in {name}.obsm (available: "
                    f"{list(a.obsm.keys())}); pass an .obsm key present in all objects, or "
                    "'X' for genes."
                )
        coords = {name: _obsm(a, use_rep) for name, a in objects.items()}
        widths = {name: c.shape[1] for name, c in coords.items()}
        if len(set(widths.values())) > 1:
            raise ValueError(f"obsm[{use_rep!r}] has different widths: {widths}.")
        for name, c in coords.items():
            check_finite(c, f"{name}.obsm[{use_rep!r}]")
        q = coords.pop(query_name)
        return q, coords, {"use_rep": use_rep, "space": f"obsm[{use_rep!r}]", "n_genes": 0}

    # genes: aligned on the common genes, in a PCA of the real cells
    if query.n_vars == 0:
        raise ValueError(
            f"use_rep='X' needs genes but {query_name} has none (n_vars == 0; the model has no "
            "map back to genes). Pass `use_rep=` naming a shared .obsm key."
        )
    common = pd.Index(query.var_names)
    for name, a in others.items():
        if not pd.Index(a.var_names).is_unique:
            raise ValueError(
                f"{name}.var_names are not unique; run `{name}.var_names_make_unique()`."
            )
        common = common[common.isin(a.var_names)]
    if len(common) == 0:
        raise ValueError(
            f"{query_name} and {list(others)} share no gene names, so they cannot be compared "
            "on genes. Pass `use_rep=` naming a shared .obsm key."
        )
    if len(common) < query.n_vars:
        logger.info(
            "Comparing on the %d of %d genes shared by all objects.", len(common), query.n_vars
        )
    matrices = {}
    for name, a in objects.items():
        if a.X is None:
            raise ValueError(f"{name} has no expression matrix (.X is None).")
        m = a.X[:, pd.Index(a.var_names).get_indexer(common)]
        check_finite(m, f"{name}.X")
        matrices[name] = m
    first = next(iter(others))
    # fitted on the reference cells only (the first of `others`, e.g. the training cells):
    # everything judged in it is out-of-sample (see scbranch.metrics.ReferencePCA)
    pca = ReferencePCA(N_COMPS_GENES, seed=seed).fit(matrices[first])
    coords = {name: pca.transform(m) for name, m in matrices.items()}
    q = coords.pop(query_name)
    description = {
        "use_rep": "X",
        "space": f"genes (PCA of {len(common)} shared genes, {pca.n_components_} components, "
        f"fitted on {first})",
        "n_genes": len(common),
        "matrices": matrices,
    }
    return q, coords, description


def _labels_key(transmuted: AnnData, labels_key: str | None) -> str:
    if labels_key is not None:
        return labels_key
    key = str(_model_info(transmuted).get("labels_key", "") or "")
    if not key:
        raise ValueError(
            "transmuted.uns['scbranch']['model'] names no labels_key; pass `labels_key=` (the "
            "obs column with the cell types in the real cells)."
        )
    return key


def _record(table: pd.DataFrame, params: dict) -> dict:
    """h5ad-safe copy of a table: one array per column, column order kept."""
    columns = {}
    for c in table.columns:
        values = table[c]
        columns[c] = (
            values.astype(str).to_numpy(dtype=object)
            if values.dtype == object or isinstance(values.dtype, pd.CategoricalDtype)
            else values.to_numpy()
        )
    return {
        "params": params,
        "columns": np.asarray(list(table.columns), dtype=object),
        "table": columns,
    }


def read_interpretation(adata: AnnData, key: str) -> pd.DataFrame:
    """A table stored by :func:`~scbranch.tl.transmutation_success` or ``identity_retention``.

    Parameters
    ----------
    adata
        The trajectory AnnData the table was stored in (e.g. after a round trip through h5ad).
    key
        The ``key_added`` it was stored under.

    Returns
    -------
    The table as the function returned it.

    Examples
    --------
    >>> sb.tl.transmutation_success(tm, adata)  # doctest: +SKIP
    >>> tm.write_h5ad("tm.h5ad")  # doctest: +SKIP
    >>> read_interpretation(
    ...     ad.read_h5ad("tm.h5ad"), "scbranch_transmutation_success"
    ... )  # doctest: +SKIP
    """
    record = adata.uns.get(key)
    if not isinstance(record, Mapping) or "table" not in record:
        raise KeyError(
            f"No table in adata.uns[{key!r}]; run `scbranch.tl.transmutation_success` or "
            f"`scbranch.tl.identity_retention` with key_added={key!r} first."
        )
    columns = [str(c) for c in np.asarray(record.get("columns", list(record["table"])))]
    return pd.DataFrame({c: np.asarray(record["table"][c]) for c in columns})
