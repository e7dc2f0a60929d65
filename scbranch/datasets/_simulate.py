"""Data with a known answer: Gaussian clusters placed on a binary tree."""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd


@dataclass
class SimulatedTree:
    """Cells sampled around the leaves of a known binary tree.

    Attributes
    ----------
    x
        Cells, shape ``(n, dim)``.
    labels
        Class index of every cell.
    classes
        Class names, ``"c0" ... "c{2**depth - 1}"``; siblings differ in the last bit.
    means
        Class means, shape ``(C, dim)``.
    true_splits
        Set of frozensets of class names, one per internal node (the topology to recover).

    Examples
    --------
    >>> sim = simulate_tree(depth=1, n_per_class=5)
    >>> sim.to_anndata().obs["cell_type"].value_counts().tolist()
    [5, 5]
    """

    x: np.ndarray
    labels: np.ndarray
    classes: list[str]
    means: np.ndarray
    true_splits: set[frozenset[str]]

    def to_anndata(self, labels_key: str = "cell_type", obsm_key: str = "X_latent") -> ad.AnnData:
        """Cells as AnnData: the coordinates in ``.X`` and in ``.obsm[obsm_key]``."""
        obs = pd.DataFrame(
            {labels_key: pd.Categorical([self.classes[i] for i in self.labels], self.classes)},
            index=[f"cell{i}" for i in range(len(self.x))],
        )
        var = pd.DataFrame(index=[f"dim{j}" for j in range(self.x.shape[1])])
        adata = ad.AnnData(X=self.x.astype(np.float32), obs=obs, var=var)
        adata.obsm[obsm_key] = self.x.astype(np.float32)
        return adata


def simulate_tree(
    depth: int = 3,
    n_per_class: int = 150,
    dim: int = 16,
    separation: float = 8.0,
    decay: float = 0.5,
    noise: float = 1.0,
    seed: int = 0,
) -> SimulatedTree:
    """Sample Gaussian clusters on a complete binary tree of the given depth.

    Each level ``l`` of the tree adds ``+/- separation * decay**l`` along its own random unit
    direction, so classes that split deeper are closer together: the true hierarchy is the tree.

    Parameters
    ----------
    depth
        Depth of the tree; there are ``2**depth`` classes.
    n_per_class
        Cells per class.
    dim
        Dimension of the cells.
    separation
        Offset of the first split.
    decay
        Factor by which each deeper split shrinks.
    noise
        Standard deviation of the isotropic within-class noise.
    seed
        Random seed.

    Returns
    -------
    The simulated cells and the true topology.

    Examples
    --------
    >>> sim = simulate_tree(depth=2, n_per_class=10)
    >>> sim.x.shape, len(sim.classes)
    ((40, 16), 4)
    """
    rng = np.random.default_rng(seed)
    n_classes = 2**depth
    directions = rng.normal(size=(depth, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    bits = (np.arange(n_classes)[:, None] >> np.arange(depth - 1, -1, -1)) & 1  # (C, depth)
    signs = 2.0 * bits - 1.0
    scales = separation * decay ** np.arange(depth)
    means = (signs * scales) @ directions
    labels = np.repeat(np.arange(n_classes), n_per_class)
    x = means[labels] + noise * rng.normal(size=(len(labels), dim))
    classes = [f"c{i}" for i in range(n_classes)]
    splits = set()
    for level in range(depth):
        block = 2 ** (depth - level)
        for start in range(0, n_classes, block):
            splits.add(frozenset(classes[start : start + block]))
    return SimulatedTree(x=x, labels=labels, classes=classes, means=means, true_splits=splits)
