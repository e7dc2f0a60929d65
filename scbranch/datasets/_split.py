"""Stratified, seeded splits of cells into train / held-out (/ unseen) parts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def stratified_split(
    labels: Sequence, fractions: float | Sequence[float], seed: int = 0
) -> tuple[np.ndarray, ...]:
    """Positions of a stratified split of cells into parts of the given fractions.

    Every class is split on its own (seeded), so each part holds about the same share of each
    class. Each part except the last takes ``round(fraction * n)`` of a class's ``n`` cells,
    leaving at least one cell for every later part when the class has enough; the last part
    takes the rest.

    Parameters
    ----------
    labels
        Class of every cell (e.g. ``adata.obs["cell_type"]``).
    fractions
        A float ``f`` for a two-way split ``(f, 1 - f)`` (train, held-out), or the fractions of
        every part (e.g. ``(0.5, 0.3, 0.2)``: train, held-out, unseen), summing to 1.
    seed
        Seed of the split.

    Returns
    -------
    One sorted array of positions per part.

    Examples
    --------
    >>> labels = ["a"] * 10 + ["b"] * 4
    >>> train, held = stratified_split(labels, 0.7, seed=0)
    >>> len(train), len(held)
    (10, 4)
    >>> [len(p) for p in stratified_split(labels, (0.5, 0.3, 0.2), seed=0)]
    [7, 4, 3]
    """
    if np.isscalar(fractions):
        fractions = (float(fractions), 1.0 - float(fractions))
    fractions = [float(f) for f in fractions]
    if len(fractions) < 2 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"fractions must be positive and sum to 1 (or one float in (0, 1)), got {fractions}."
        )
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    codes = pd.Categorical(np.asarray(labels)).codes
    for c in np.unique(codes):
        idx = rng.permutation(np.flatnonzero(codes == c))
        start = 0
        for k, f in enumerate(fractions[:-1]):
            later = len(fractions) - 1 - k  # parts after this one, each keeps a cell if it can
            n_k = min(int(round(f * len(idx))), max(len(idx) - start - later, 0))
            parts[k].append(idx[start : start + n_k])
            start += n_k
        parts[-1].append(idx[start:])
    return tuple(np.sort(np.concatenate(p)) for p in parts)
