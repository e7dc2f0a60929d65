"""Interpreting transmutation trajectories: did cells arrive, what did they keep, what changed.

All functions read the trajectory AnnData of :meth:`~scbranch.BranchedDiffusion.transmute`:
one row per (cell, checkpoint) with ``obs['trajectory']``, ``obs['checkpoint']``, ``obs['t']``,
``obs['phase']`` (``"source"``, ``"up"``, ``"branch point"``, ``"down"``, ``"endpoint"``),
``obs['source_label']`` and ``obs['target_label']``; decoded genes in ``.X`` (when the model maps
back to genes), the denoised state in ``obsm[obsm_key]`` (latent models) and provenance in
``uns['scbranch']``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy import stats

from .._keys import Key
from .._validation import check_finite, check_obs_key, to_dense
from ..metrics._quality import _classifier
from ..metrics._reference import ReferencePCA

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


# ---------------------------------------------------------------------- success
def transmutation_success(
    transmuted: AnnData,
    train: AnnData,
    *,
    heldout: AnnData | None = None,
    labels_key: str | None = None,
    use_rep: str | None = None,
    classifier: str = "knn",
    key_added: str | None = Key.uns.TRANSMUTATION_SUCCESS,
    seed: int = 0,
) -> pd.DataFrame:
    """Fraction of transmuted cells that a classifier of real cells calls the target type.

    A classifier is fitted on the real ``train`` cells (all types) and applied to the endpoints
    of the trajectories (``obs['phase'] == 'endpoint'``). ``success`` is the fraction called the
    target type, ``stayed`` the fraction still called the source type. Because no classifier
    is perfect, the same is measured on real cells of the target type (``control``): on
    ``heldout`` when given, else out-of-fold predictions on ``train`` (5-fold, stratified, the
    same kind of classifier). ``ratio = success / control`` near 1 means transmuted cells are
    recognised as often as real ones.

    Parameters
    ----------
    transmuted
        Trajectories of :meth:`~scbranch.BranchedDiffusion.transmute`.
    train
        Real cells the classifier is fitted on (e.g. those the model was trained on), with
        the types in ``obs[labels_key]``.
    heldout
        Real cells neither the model nor the classifier saw, for the control.
    labels_key
        Column of ``train.obs`` (and ``heldout.obs``) with the cell types; default the model's
        (``transmuted.uns['scbranch']['model']['labels_key']``).
    use_rep
        Representation to classify in: an ``.obsm`` key present in all objects, or ``"X"`` for
        genes. Default: the model's ``obsm_key`` when all objects carry it, else genes (aligned
        on the common gene names, in a PCA fitted on ``train``).
    classifier
        ``"knn"`` (15 neighbours) or ``"logreg"``.
    key_added
        Store an h5ad-safe copy of the table and the parameters in
        ``transmuted.uns[key_added]`` (read it back with :func:`read_interpretation`);
        `None`: do not store.
    seed
        Seed of the gene PCA, the classifier and the folds.

    Returns
    -------
    DataFrame with one row per (``source_label``, ``target_label``): ``n_cells`` (trajectories),
    ``success``, ``control``, ``ratio``, ``stayed`` (fraction called the source type; NaN when
    the source type is not in ``train``) and ``n_control`` (real target cells in the control).
    Sets ``transmuted.uns[key_added]`` (``'params'``, ``'table'``) unless ``key_added`` is `None`.

    Examples
    --------
    >>> import scbranch as sb
    >>> tm = model.transmute(
    ...     adata[adata.obs.cell_type == "CD14+ Monocyte"], target="Dendritic"
    ... )  # doctest: +SKIP
    >>> sb.tl.transmutation_success(tm, train, heldout=heldout)  # doctest: +SKIP
    """
    _check_transmutation(transmuted)
    _classifier(classifier, seed)  # validates the name before any work
    labels_key = _labels_key(transmuted, labels_key)
    reals = {"train": train} | ({"heldout": heldout} if heldout is not None else {})
    for name, data in reals.items():
        if not isinstance(data, AnnData):
            raise TypeError(f"`{name}` must be an AnnData, got {type(data).__name__}.")
        if labels_key not in data.obs.columns:
            raise KeyError(
                f"labels_key={labels_key!r} is not a column of {name}.obs (available: "
                f"{list(data.obs.columns)}); pass `labels_key=` naming the cell types."
            )
        check_obs_key(data, labels_key)
    paired = _paired_rows(transmuted)
    train_y = train.obs[labels_key].astype(str).to_numpy()
    held_y = heldout.obs[labels_key].astype(str).to_numpy() if heldout is not None else None
    targets = list(pd.unique(paired["target_label"]))
    for name, labels in (("train", train_y), ("heldout", held_y)):
        if labels is None:
            continue
        absent = [t for t in targets if t not in set(labels)]
        if absent:
            raise ValueError(
                f"Target type(s) {absent} have no cells in {name}.obs[{labels_key!r}], so "
                "neither the classifier nor the control can recognise them. Pass real cells "
                "of every target type."
            )
    if classifier == "knn" and train.n_obs < 20:
        raise ValueError(
            f"train holds {train.n_obs} cells; the 15-neighbour classifier and its out-of-fold "
            "control need at least 20."
        )

    q, coords, rep = _shared_representation(transmuted, reals, use_rep, seed=seed)
    clf = _classifier(classifier, seed).fit(coords["train"], train_y)
    predicted = clf.predict(q[paired["endpoint"].to_numpy()])

    if heldout is not None:
        control_pred, control_y = clf.predict(coords["heldout"]), held_y
        n_folds = 0
    else:
        from sklearn.model_selection import StratifiedKFold

        smallest = int(pd.Series(train_y).value_counts().min())
        n_folds = int(max(2, min(N_FOLDS, smallest)))
        folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        control_pred = _out_of_fold_predictions(
            coords["train"], train_y, rep, folds, classifier, seed
        )
        control_y = train_y

    known = set(train_y)
    rows = []
    for source, target in _pairs(paired):
        sel = ((paired["source_label"] == source) & (paired["target_label"] == target)).to_numpy()
        pred = predicted[sel]
        is_target = control_y == target
        control = float(np.mean(control_pred[is_target] == target))
        success = float(np.mean(pred == target))
        if source not in known:
            logger.warning(
                "Source type %r is not in train.obs[%r]: `stayed` is NaN for it.",
                source,
                labels_key,
            )
        rows.append(
            {
                "source_label": source,
                "target_label": target,
                "n_cells": int(sel.sum()),
                "success": success,
                "control": control,
                "ratio": success / control if control > 0 else np.nan,
                "stayed": float(np.mean(pred == source)) if source in known else np.nan,
                "n_control": int(is_target.sum()),
            }
        )
    table = pd.DataFrame(rows, columns=SUCCESS_COLUMNS)
    for _, r in table.iterrows():
        logger.info(
            "%s -> %s: %.0f%% of %d cells called %s (control %.0f%%).",
            r.source_label,
            r.target_label,
            100 * r.success,
            r.n_cells,
            r.target_label,
            100 * r.control,
        )
    if key_added is not None:
        transmuted.uns[key_added] = _record(
            table,
            params={
                "labels_key": labels_key,
                "use_rep": rep["use_rep"],
                "space": rep["space"],
                "n_genes": int(rep["n_genes"]),
                "classifier": classifier,
                "control": "heldout" if heldout is not None else "out_of_fold",
                "n_folds": n_folds,
                "seed": int(seed),
            },
        )
    return table


def _out_of_fold_predictions(x, y, rep: dict, folds, classifier: str, seed: int) -> np.ndarray:
    """Each training cell predicted by a classifier (and gene PCA) that never saw it.

    On genes the PCA is fitted again without the held-out fold: a cell must be out-of-sample
    for the space it is judged in as well as for the classifier.
    """
    pred = np.empty(len(y), dtype=object)
    genes = rep.get("matrices", {}).get("train") if rep["use_rep"] == "X" else None
    for fit_idx, test_idx in folds.split(x, y):
        if genes is not None:
            pca = ReferencePCA(N_COMPS_GENES, seed=seed).fit(genes[fit_idx])
            fit_x, test_x = pca.transform(genes[fit_idx]), pca.transform(genes[test_idx])
        else:
            fit_x, test_x = x[fit_idx], x[test_idx]
        pred[test_idx] = _classifier(classifier, seed).fit(fit_x, y[fit_idx]).predict(test_x)
    return pred.astype(str)


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
        ``transmuted.uns[key_added]`` (read it back with :func:`read_interpretation`);
        `None`: do not store.
    seed
        Seed of the re-pairings.

    Returns
    -------
    DataFrame with one row per (``source_label``, ``target_label``): ``n_cells``, ``median`` and
    ``mean`` of the per-trajectory correlations, ``control`` (median correlation of randomly
    re-paired residuals, averaged over the shuffles), ``control_sd`` (its standard deviation
    over shuffles) and ``rank_retention``. Sets the following fields:

    `transmuted.obs['scbranch_identity_retention']` : :class:`float`
        Each trajectory's correlation, on all its rows (NaN for trajectories not scored).
    `transmuted.uns[key_added]` : :class:`dict`
        ``'params'`` and ``'table'``, unless ``key_added`` is `None`.

    Examples
    --------
    >>> import scbranch as sb
    >>> tm = model.transmute(monocytes, target="Dendritic")  # doctest: +SKIP
    >>> sb.tl.identity_retention(tm)  # doctest: +SKIP
    >>> tm.obs.groupby("phase")["scbranch_identity_retention"].median()  # doctest: +SKIP
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
    ids = transmuted.obs[Key.obs.TRAJECTORY].astype(str).to_numpy()
    transmuted.obs[RETENTION_OBS_KEY] = per_trajectory.reindex(ids).to_numpy(dtype=np.float64)
    if key_added is not None:
        transmuted.uns[key_added] = _record(
            table,
            params={
                "use_rep": use_rep,
                "n_shuffles": int(n_shuffles),
                "seed": int(seed),
                "obs_key": RETENTION_OBS_KEY,
            },
        )
    return table


# ------------------------------------------------------------------------ genes
def _group_means(x, rows_by_checkpoint: Mapping[int, np.ndarray]) -> np.ndarray:
    """Mean expression per checkpoint (checkpoints in the mapping's order) x genes."""
    out = []
    for rows in rows_by_checkpoint.values():
        m = x[rows]
        out.append(np.asarray(m.mean(0)).ravel() if sp.issparse(m) else to_dense(m).mean(0))
    return np.vstack(out)


def _onset(
    change: np.ndarray, down: np.ndarray, fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Index (into ``down``) of the first checkpoint whose signed change reaches ``fraction``.

    ``change``: checkpoints x genes (change from the source); ``down``: positions of the
    checkpoints on the way down, in order. Returns the index into ``down`` per gene and a mask
    of genes with a nonzero final change (the others have no onset).
    """
    path = change[down]
    final = path[-1]
    sign = np.sign(final)
    reached = sign * path >= fraction * np.abs(final) - 1e-12
    first = np.argmax(reached, axis=0)
    return first, final != 0


#: scores of :func:`rank_transmutation_genes`
RANK_METHODS = ("mean_change", "t-test_paired")


def rank_transmutation_genes(
    transmuted: AnnData,
    *,
    n_genes: int | None = None,
    method: str = "mean_change",
    key_added: str = Key.uns.TRANSMUTATION_GENES,
) -> None:
    """Rank genes by their change along each transmutation, as :func:`scanpy.tl.rank_genes_groups`.

    One group per target type (pooling source types): each trajectory's endpoint is compared
    with its own source state, on the decoded log-normalised genes in ``.X``. Scores are, by
    default, the mean change (endpoint minus source, log1p units), or with
    ``method="t-test_paired"`` the paired t statistic (:func:`scipy.stats.ttest_rel`); rows are
    sorted by score in decreasing order (up-regulated genes first). The mean change is the
    default because decoded expression carries no per-gene noise: a gene the latent barely
    moves changes by a tiny, nearly constant amount in every cell and gets a huge t statistic
    (the two are compared in docs/benchmarks/interpretability.md). P-values always come from
    the paired t-test (they
    describe how consistent a change is across cells; the cells are model outputs, not
    independent samples). Log fold changes are computed as scanpy does from log1p data,
    ``log2((expm1(mean_end) + 1e-9) / (expm1(mean_source) + 1e-9))`` (means below 0, possible
    for PCA-decoded expression, count as 0), and p-values are adjusted with Benjamini-Hochberg.
    :func:`scanpy.get.rank_genes_groups_df` and :func:`scanpy.pl.rank_genes_groups` read the
    result (``key=key_added``).

    Also records when each gene changes: the *onset*, the first checkpoint on the way down
    (from the branch point to the endpoint) at which the mean change from the source state
    reaches half of its final value. Genes with the largest onset ``t`` change first.

    Parameters
    ----------
    transmuted
        Trajectories of :meth:`~scbranch.BranchedDiffusion.transmute`, with genes in ``.X``.
    n_genes
        Genes stored per group; default all.
    method
        Score to rank by: ``"mean_change"`` or ``"t-test_paired"``.
    key_added
        Key of ``transmuted.uns`` to store the ranking under.

    Returns
    -------
    `None`. Sets ``transmuted.uns[key_added]`` with the fields of
    :func:`scanpy.tl.rank_genes_groups` (each a record array with one field per target type,
    rows sorted by score):

    `'params'` : :class:`dict`
        ``groupby='target_label'``, ``reference='source'``, ``method``, ...
    `'names'`, `'scores'`, `'logfoldchanges'`, `'pvals'`, `'pvals_adj'`
        As in scanpy.
    `'onset_t'` : record array of float
        Diffusion time of each gene's onset (aligned with ``'names'``; NaN for genes whose
        mean does not change).
    `'onset_checkpoint'` : record array of int
        Checkpoint of the onset (-1 for genes whose mean does not change).

    Examples
    --------
    >>> import scanpy as sc
    >>> import scbranch as sb
    >>> tm = model.transmute(monocytes, target="Dendritic")  # doctest: +SKIP
    >>> sb.tl.rank_transmutation_genes(tm)  # doctest: +SKIP
    >>> sc.get.rank_genes_groups_df(
    ...     tm, group="Dendritic", key="scbranch_transmutation_genes"
    ... ).head()  # doctest: +SKIP
    >>> sc.pl.rank_genes_groups(tm, key="scbranch_transmutation_genes")  # doctest: +SKIP
    """
    _check_transmutation(transmuted)
    if transmuted.n_vars == 0 or transmuted.X is None:
        raise ValueError(
            "transmuted has no genes (n_vars == 0): the model has no map from its "
            "representation back to genes, so there is nothing to rank. Train on expression, "
            "on a PCA that scbranch can decode, or on an scVI latent."
        )
    if n_genes is not None and int(n_genes) < 1:
        raise ValueError(f"n_genes must be at least 1, got {n_genes}.")
    if method not in RANK_METHODS:
        raise ValueError(f"method must be one of {RANK_METHODS}, got {method!r}.")
    x = transmuted.X
    check_finite(x, "transmuted.X")
    paired = _paired_rows(transmuted)
    obs = transmuted.obs
    ids = obs[Key.obs.TRAJECTORY].astype(str).to_numpy()
    checkpoints = obs[Key.obs.CHECKPOINT].to_numpy(dtype=np.int64)
    phase = obs[Key.obs.PHASE].astype(str).to_numpy()
    t = obs[Key.obs.T].to_numpy(dtype=np.float64)
    n_vars = transmuted.n_vars
    n_keep = n_vars if n_genes is None else min(int(n_genes), n_vars)
    var_names = np.asarray(transmuted.var_names, dtype=object)

    groups = list(pd.unique(paired["target_label"]))
    if isinstance(obs[Key.obs.TARGET_LABEL].dtype, pd.CategoricalDtype):
        order = [str(c) for c in obs[Key.obs.TARGET_LABEL].cat.categories]
        groups = sorted(groups, key=order.index)
    fields: dict[str, dict[str, np.ndarray]] = {
        k: {}
        for k in (
            "names",
            "scores",
            "logfoldchanges",
            "pvals",
            "pvals_adj",
            "onset_t",
            "onset_checkpoint",
        )
    }
    for group in groups:
        sub = paired[paired["target_label"] == group]
        if len(sub) < 2:
            logger.warning(
                "Target %r has %d trajectory; a paired t-test needs at least 2 (scores 0).",
                group,
                len(sub),
            )
        end = _dense_rows(x, sub["endpoint"].to_numpy())
        src = _dense_rows(x, sub["source"].to_numpy())
        with np.errstate(invalid="ignore", divide="ignore"):
            res = stats.ttest_rel(end, src, axis=0)
        if method == "mean_change":
            scores = (end - src).mean(0).astype(np.float64)
        else:
            scores = np.nan_to_num(np.asarray(res.statistic, dtype=np.float64), nan=0.0)
        pvals = np.asarray(res.pvalue, dtype=np.float64)
        pvals[np.isnan(pvals)] = 1.0
        pvals_adj = stats.false_discovery_control(pvals, method="bh")
        mean_end = np.clip(end.mean(0), 0, None)
        mean_src = np.clip(src.mean(0), 0, None)
        lfc = np.log2((np.expm1(mean_end) + 1e-9) / (np.expm1(mean_src) + 1e-9))

        # onset: mean change from the source per checkpoint on the way down
        in_group = np.isin(ids, sub.index.to_numpy())
        down_ckpts = np.unique(checkpoints[in_group & np.isin(phase, DOWN_PHASES)])
        rows_by_ckpt = {}
        for c in down_ckpts:
            rows = np.flatnonzero(in_group & (checkpoints == c))
            if len(rows) != len(sub):
                raise ValueError(
                    f"Trajectories to {group!r} do not all have checkpoint {c} "
                    f"({len(rows)} of {len(sub)}); rank genes on whole trajectories from one "
                    "`transmute` call."
                )
            rows_by_ckpt[int(c)] = rows
        change = _group_means(x, rows_by_ckpt) - src.mean(0)
        ckpt_t = np.array([t[r].mean() for r in rows_by_ckpt.values()])
        first, changes = _onset(change, np.arange(len(down_ckpts)))
        onset_t = np.where(changes, ckpt_t[first], np.nan)
        onset_ckpt = np.where(changes, down_ckpts[first], -1).astype(np.int64)

        order = np.argsort(-scores, kind="stable")[:n_keep]
        fields["names"][group] = var_names[order]
        fields["scores"][group] = scores[order].astype(np.float32)
        fields["logfoldchanges"][group] = lfc[order].astype(np.float32)
        fields["pvals"][group] = pvals[order]
        fields["pvals_adj"][group] = pvals_adj[order]
        fields["onset_t"][group] = onset_t[order]
        fields["onset_checkpoint"][group] = onset_ckpt[order]

    dtypes = {
        "names": "O",
        "scores": "float32",
        "logfoldchanges": "float32",
        "pvals": "float64",
        "pvals_adj": "float64",
        "onset_t": "float64",
        "onset_checkpoint": "int64",
    }
    record: dict = {
        "params": {
            "groupby": Key.obs.TARGET_LABEL,
            "reference": "source",
            "method": method,
            "use_raw": False,
            "layer": None,
            "corr_method": "benjamini-hochberg",
            "n_genes": int(n_keep),
            "onset_fraction": 0.5,
        }
    }
    for name, per_group in fields.items():
        record[name] = pd.DataFrame(per_group, columns=groups).to_records(
            index=False, column_dtypes=dtypes[name]
        )
    transmuted.uns[key_added] = record
    logger.info(
        "Ranked %d genes for %d target type(s) in transmuted.uns[%r].",
        n_keep,
        len(groups),
        key_added,
    )
