"""Did transmuted cells arrive? A classifier of real cells calls their endpoints."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from anndata import AnnData

from ..._keys import Key
from ..._validation import check_obs_key
from ...metrics._quality import _classifier
from ...metrics._reference import ReferencePCA
from ._inputs import (
    N_COMPS_GENES,
    N_FOLDS,
    SUCCESS_COLUMNS,
    _check_transmutation,
    _labels_key,
    _paired_rows,
    _pairs,
    _record,
    _shared_representation,
)

logger = logging.getLogger(__name__)


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
        check_obs_key(data, labels_key, name=name)
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
