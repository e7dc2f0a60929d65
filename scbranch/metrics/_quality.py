"""Quick, interpretable quality checks of generated cells against held-out real cells.

The full evaluation protocol (W2, MMD, classifier AUROC with real-vs-real controls) builds on
these; here: does a classifier trained on real cells recognise the requested type, and are the
generated cells as spread around their type's centroid as real cells are?
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from .._validation import check_finite
from ._reference import ReferencePCA

#: neighbours of the label-fidelity kNN
KNN_NEIGHBOURS = 15


def _classifier(kind: str, seed: int):
    if kind == "knn":
        return KNeighborsClassifier(n_neighbors=KNN_NEIGHBOURS)
    if kind == "logreg":
        return LogisticRegression(max_iter=5000, random_state=seed)
    raise ValueError(f"classifier must be 'knn' or 'logreg', got {kind!r}.")


def label_fidelity(
    generated: np.ndarray,
    generated_labels: Sequence,
    train: np.ndarray,
    train_labels: Sequence,
    heldout: np.ndarray,
    heldout_labels: Sequence,
    *,
    classifier: str = "knn",
    seed: int = 0,
) -> pd.DataFrame:
    """Per-class accuracy of a real-data classifier on generated cells, with its real control.

    A classifier is trained on real training cells (all labels). For each class, ``generated``
    is the fraction of generated cells predicted as their requested class and ``control`` the
    fraction of held-out real cells predicted as their true class. ``ratio = generated /
    control``; far above 1 hints at too-typical (collapsed) cells, below 1 at off-type cells.

    Parameters
    ----------
    generated, generated_labels
        Generated cells (n, d) and requested classes.
    train, train_labels
        Real cells the classifier (and the model) was trained on.
    heldout, heldout_labels
        Real cells neither saw.
    classifier
        ``"knn"`` (15 neighbours) or ``"logreg"``.
    seed
        Random seed of the classifier.

    Returns
    -------
    DataFrame indexed by class with columns ``generated``, ``control``, ``ratio``, ``n_heldout``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = np.r_[rng.normal(0, 1, (50, 2)), rng.normal(5, 1, (50, 2))]
    >>> y = np.repeat(["a", "b"], 50)
    >>> label_fidelity(x, y, x, y, x, y)["ratio"].round(2).tolist()
    [1.0, 1.0]
    """
    for name, m in (("generated", generated), ("train", train), ("heldout", heldout)):
        check_finite(np.asarray(m), f"`{name}`")
    if classifier == "knn" and len(train) < KNN_NEIGHBOURS:  # scikit-learn's n_neighbors error
        raise ValueError(
            f"label_fidelity's kNN classifier needs at least {KNN_NEIGHBOURS} training cells, "
            f"got {len(train)}; pass more, or classifier='logreg'."
        )
    clf = _classifier(classifier, seed).fit(np.asarray(train), np.asarray(train_labels))
    gen_pred = clf.predict(np.asarray(generated))
    ctrl_pred = clf.predict(np.asarray(heldout))
    gl, hl = np.asarray(generated_labels), np.asarray(heldout_labels)
    rows = {}
    for c in pd.unique(hl):
        g = gl == c
        h = hl == c
        if not g.any():
            continue
        gen_acc = float(np.mean(gen_pred[g] == c))
        ctrl_acc = float(np.mean(ctrl_pred[h] == c))
        rows[c] = {
            "generated": gen_acc,
            "control": ctrl_acc,
            "ratio": gen_acc / ctrl_acc if ctrl_acc > 0 else np.nan,
            "n_heldout": int(h.sum()),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def centroid_spread(
    generated: np.ndarray,
    generated_labels: Sequence,
    reference: np.ndarray,
    reference_labels: Sequence,
) -> pd.DataFrame:
    """Per-class mean distance to the class centroid, generated vs reference cells.

    Parameters
    ----------
    generated, generated_labels
        Generated cells (n, d) and their (requested) classes.
    reference, reference_labels
        Real cells (m, d) in the same coordinates, and their classes. The classes compared are
        those of ``reference_labels``; one without generated cells or with fewer than two
        reference cells is left out.

    Returns
    -------
    DataFrame indexed by class with ``generated``, ``reference`` (mean Euclidean distance of
    each cell to its own set's centroid), ``ratio`` and ``n_reference``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(200, 3)); y = np.repeat(["a", "b"], 100)
    >>> centroid_spread(2 * x, y, x, y)["ratio"].round(1).tolist()
    [2.0, 2.0]
    """
    gl, rl = np.asarray(generated_labels), np.asarray(reference_labels)
    g_all, r_all = np.asarray(generated), np.asarray(reference)
    check_finite(g_all, "`generated`")  # a NaN gave a NaN row without a word
    check_finite(r_all, "`reference`")
    rows = {}
    for c in pd.unique(rl):
        g, r = g_all[gl == c], r_all[rl == c]
        if len(g) == 0 or len(r) < 2:
            continue
        sg = float(np.linalg.norm(g - g.mean(0), axis=1).mean())
        sr = float(np.linalg.norm(r - r.mean(0), axis=1).mean())
        rows[c] = {"generated": sg, "reference": sr, "ratio": sg / sr, "n_reference": len(r)}
    return pd.DataFrame.from_dict(rows, orient="index")


def quality_report(
    generated: AnnData,
    train: AnnData,
    heldout: AnnData,
    *,
    labels_key: str,
    use_rep: str | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Per-class label fidelity (kNN and logistic regression) and spread, with real controls.

    Parameters
    ----------
    generated
        Generated cells (e.g. from :meth:`~scbranch.BranchedDiffusion.generate`).
    train
        Real cells the model was trained on.
    heldout
        Real cells the model never saw.
    labels_key
        Column of ``obs`` with the cell types (the same in all three objects).
    use_rep
        Key of ``obsm`` in which to compare (e.g. the model's ``"X_pca"``). It must not have
        been fitted on ``heldout`` (a PCA of all cells gives the held-out cells in-sample
        spread that generated cells cannot have). `None`: a PCA of the generated genes fitted
        on ``train`` only (:class:`~scbranch.metrics.ReferencePCA`), into which generated and
        held-out cells are projected.
    seed
        Random seed of the classifiers (and of the PCA).

    Returns
    -------
    DataFrame indexed by class: ``knn_generated``/``knn_control`` and
    ``logreg_generated``/``logreg_control`` (label fidelity and its held-out real control),
    ``spread_vs_heldout`` and ``spread_vs_train`` (ratios of mean distance to the class centroid),
    ``n_heldout``.

    Examples
    --------
    >>> quality_report(gen, train, held, labels_key="cell_type")  # doctest: +SKIP
    """
    for name, data in (("generated", generated), ("train", train), ("heldout", heldout)):
        if labels_key not in data.obs:
            raise KeyError(f"{name}.obs has no column {labels_key!r}.")
        if use_rep is not None and use_rep not in data.obsm:
            raise KeyError(f"{name}.obsm has no {use_rep!r}.")
    if use_rep is None:
        g, t, h = _reference_coordinates(generated, train, heldout, seed)
    else:
        g, t, h = (np.asarray(d.obsm[use_rep]) for d in (generated, train, heldout))
    gl, tl, hl = (d.obs[labels_key].astype(str).to_numpy() for d in (generated, train, heldout))
    knn = label_fidelity(g, gl, t, tl, h, hl, classifier="knn", seed=seed)
    logreg = label_fidelity(g, gl, t, tl, h, hl, classifier="logreg", seed=seed)
    report = pd.DataFrame(
        {
            "knn_generated": knn["generated"],
            "knn_control": knn["control"],
            "logreg_generated": logreg["generated"],
            "logreg_control": logreg["control"],
            "spread_vs_heldout": centroid_spread(g, gl, h, hl)["ratio"],
            "spread_vs_train": centroid_spread(g, gl, t, tl)["ratio"],
            "n_heldout": knn["n_heldout"],
        }
    )
    report.index.name = labels_key
    return report


def _reference_coordinates(generated: AnnData, train: AnnData, heldout: AnnData, seed: int):
    """Generated, train and held-out cells in a PCA of the generated genes fitted on train."""
    if generated.n_vars == 0 or generated.X is None:
        raise ValueError(
            "generated carries no genes to build a reference PCA from; pass `use_rep=` naming "
            "a representation all three objects share (e.g. the model's latent)."
        )
    genes = generated.var_names
    for name, data in (("train", train), ("heldout", heldout)):
        missing = genes.difference(data.var_names)
        if len(missing):
            raise ValueError(
                f"{name} lacks {len(missing)} of the generated genes (e.g. {list(missing[:5])}); "
                "pass cells with the model's genes or `use_rep=`."
            )
    pca = ReferencePCA(seed=seed).fit(train[:, genes].X)
    return (
        pca.transform(d[:, genes].X if d is not generated else d.X)
        for d in (generated, train, heldout)
    )
