"""Can a classifier tell generated cells from real ones? (held-out AUROC of a random forest)."""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from ._distances import _check_pair


def classifier_auroc(
    x,
    y,
    *,
    n_folds: int | None = 5,
    test_size: float = 0.3,
    n_estimators: int = 100,
    seed: int = 0,
) -> float:
    """Held-out AUROC of a random forest trained to separate ``x`` from ``y``.

    The cells are pooled with labels 0 (``x``) and 1 (``y``). With ``n_folds``, every cell is
    scored once by a forest that did not see it (stratified k-fold, out-of-fold
    probabilities); with ``n_folds=None``, one stratified split holds out ``test_size`` of the
    cells (the protocol's 70/30 split). Out-of-fold scoring keeps the held-out principle but
    scores all cells instead of 30 %, which matters with the tens of cells per class typical of
    rare types. 0.5 means the sets cannot be told apart, 1 that they are perfectly separable.
    Probabilities (not hard predictions) are scored, so ties do not pin the AUROC at 0.5.

    A cell present in both sets (an exact copy) always lands in the same fold as its copy:
    otherwise the forest learns the copy with the opposite label and scores the pair
    backwards (two identical sets would get an AUROC near 0 instead of 0.5).

    Parameters
    ----------
    x, y
        Arrays (n, d) and (m, d), e.g. generated and real cells in 30 principal components.
    n_folds
        Folds of the out-of-fold scoring, or `None` for a single split.
    test_size
        Fraction of cells held out when ``n_folds`` is `None`.
    n_estimators
        Number of trees.
    seed
        Seed of the split and the forest.

    Returns
    -------
    The AUROC on the held-out cells.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(100, 5)), rng.normal(size=(100, 5))
    >>> classifier_auroc(a, b + 10.0)
    1.0
    """
    x, y = _check_pair(x, y)
    if min(len(x), len(y)) < 4:
        raise ValueError(
            f"classifier_auroc needs at least 4 cells on each side, got {len(x)} and {len(y)}."
        )
    data = np.vstack([x, y])
    target = np.r_[np.zeros(len(x), dtype=int), np.ones(len(y), dtype=int)]
    copies = _copy_groups(data, len(x))
    if n_folds is None:
        split = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
        fit_idx, test_idx = next(split.split(data, target, copies))
        per_side = np.bincount(target[test_idx], minlength=2)
        if per_side.min() < 2:
            # an AUROC of one or two cells a side is 0, 0.5 or 1 by chance (it gave 1.0 for
            # identical distributions)
            raise ValueError(
                f"test_size={test_size!r} holds out {per_side[0]} and {per_side[1]} cells of "
                "the two sets: too few to score. Raise test_size, or use n_folds (every cell "
                "scored out-of-fold)."
            )
        forest = _forest(n_estimators, seed).fit(data[fit_idx], target[fit_idx])
        return float(roc_auc_score(target[test_idx], _score(forest, data[test_idx])))
    n_folds = int(min(n_folds, len(x), len(y)))
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}.")
    scores = np.empty(len(target))
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fit_idx, test_idx in folds.split(data, target, copies):
        forest = _forest(n_estimators, seed).fit(data[fit_idx], target[fit_idx])
        scores[test_idx] = _score(forest, data[test_idx])
    return float(roc_auc_score(target, scores))


def _copy_groups(data: np.ndarray, n_x: int) -> np.ndarray:
    """Group ids: copies of one cell in the two sets are paired; every other cell is alone.

    The k-th copy of a cell in the first set shares an id with its k-th copy in the second
    (a forest that saw one of a pair with the other label would score the other backwards:
    two identical sets got AUROC 0.02). Copies without a partner in the other set, e.g. the
    duplicates of a collapsed generator, stay separate, so they spread over the folds and the
    forest learns them: grouping all copies of a cell put a collapsed set in one fold, never
    seen in training, and scored it 0.15 against the real cell it copied.
    """
    n = len(data)
    content = np.unique(data, axis=0, return_inverse=True)[1].ravel()
    side = (np.arange(n) >= n_x).astype(np.int64)
    key = content * 2 + side  # one cell's copies in one set
    # rank of each row among its key's rows, in row order
    order = np.argsort(key, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.searchsorted(key[order], key[order])
    partners = np.bincount(key, minlength=2 * (content.max() + 1))[key ^ 1]  # the other set's
    paired = rank < partners
    # a pair's id from its content and rank; every other row an id of its own, above those
    return np.where(paired, content * n + rank, n * (content.max() + 1) + np.arange(n))


def _score(forest: RandomForestClassifier, data: np.ndarray) -> np.ndarray:
    """Probability of label 1 (0 when the training fold held only label 0)."""
    proba = forest.predict_proba(data)
    classes = list(forest.classes_)
    return proba[:, classes.index(1)] if 1 in classes else np.zeros(len(data))


def _forest(n_estimators: int, seed: int) -> RandomForestClassifier:
    return RandomForestClassifier(n_estimators=n_estimators, random_state=seed, n_jobs=1)
