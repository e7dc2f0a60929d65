"""Input checks that turn bad input into one clear, actionable error."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData


def check_obs_key(adata: AnnData, key: str, what: str = "labels_key") -> None:
    """Raise if ``key`` is not a column of ``adata.obs`` or has missing values."""
    if key not in adata.obs.columns:
        raise KeyError(
            f"{what}={key!r} is not a column of adata.obs. Available columns: "
            f"{list(adata.obs.columns)}."
        )
    n_missing = int(pd.isna(adata.obs[key]).sum())
    if n_missing:
        raise ValueError(
            f"adata.obs[{key!r}] has {n_missing} missing value(s). Drop or label those cells "
            "first, "
            f"e.g. `adata = adata[adata.obs[{key!r}].notna()].copy()`."
        )


def check_rep_key(
    adata: AnnData,
    *,
    obsm_key: str | None = None,
    layer: str | None = None,
    obsm_arg: str = "obsm_key",
) -> None:
    """Raise if the requested representation does not exist (``obsm_arg``: the caller's name)."""
    if obsm_key is not None and layer is not None:
        raise ValueError(f"Pass either `{obsm_arg}` or `layer`, not both.")
    if obsm_key is not None and obsm_key not in adata.obsm:
        raise KeyError(
            f"{obsm_arg}={obsm_key!r} is not in adata.obsm (available: {list(adata.obsm.keys())}). "
            "Compute it first, e.g. `sc.pp.pca(adata)` for 'X_pca'."
        )
    if layer is not None and layer not in adata.layers:
        raise KeyError(
            f"layer={layer!r} is not in adata.layers (available: {list(adata.layers.keys())})."
        )


def get_matrix(
    adata: AnnData,
    *,
    obsm_key: str | None = None,
    layer: str | None = None,
    obsm_arg: str = "obsm_key",
):
    """The matrix behind a representation: ``obsm[obsm_key]``, ``layers[layer]`` or ``X``."""
    check_rep_key(adata, obsm_key=obsm_key, layer=layer, obsm_arg=obsm_arg)
    if obsm_key is not None:
        m = adata.obsm[obsm_key]
        return m.to_numpy() if isinstance(m, pd.DataFrame) else m
    return adata.layers[layer] if layer is not None else adata.X


def to_dense(m) -> np.ndarray:
    """Dense float array of a numpy/sparse/backed matrix."""
    if sp.issparse(m):
        m = m.toarray()
    return np.asarray(m, dtype=np.float64)


def check_finite(m, where: str) -> None:
    """Raise if ``m`` contains NaN or infinite values, saying how many and where."""
    values = m.data if sp.issparse(m) else np.asarray(m)
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(
            f"{where} contains {int(bad.sum())} NaN or infinite value(s). Remove or impute them "
            "before using scbranch (e.g. recompute the representation after filtering cells)."
        )


def check_class_sizes(
    labels: np.ndarray,
    classes: Sequence[str],
    min_cells: int,
    labels_key: str,
    *,
    why: str = "too few to learn from. Remove them, merge them into a related label, or lower "
    "`min_cells_per_class`.",
) -> None:
    """Raise if a class has fewer than ``min_cells`` cells, naming each (and saying ``why``)."""
    counts = np.bincount(labels, minlength=len(classes))
    small = [(classes[i], int(n)) for i, n in enumerate(counts) if n < min_cells]
    if small:
        listing = ", ".join(f"{c!r} ({n} cell{'s' if n != 1 else ''})" for c, n in small)
        raise ValueError(
            f"Class(es) {listing} of adata.obs[{labels_key!r}] have fewer than {min_cells} cells, "
            f"{why} Unused categories can be dropped with "
            f"`adata.obs[{labels_key!r}] = "
            f"adata.obs[{labels_key!r}].cat.remove_unused_categories()`."
        )


def check_counts(m, where: str, *, n_check: int = 100_000) -> None:
    """Raise if ``m`` does not hold raw counts (non-negative integers).

    Checks the first ``n_check`` stored values (enough to catch log-normalised or scaled data
    without scanning a large matrix).
    """
    values = m.data if sp.issparse(m) else np.asarray(m).ravel()
    values = np.asarray(values[:n_check], dtype=np.float64)
    if values.size and (values.min() < 0 or not np.all(values == np.round(values))):
        kind = "negative values" if values.min() < 0 else "non-integer values"
        raise ValueError(
            f"{where} must hold raw counts (non-negative integers) but holds {kind} "
            "(log-normalised or scaled data?). Pass the layer with the raw counts, e.g. "
            "`counts_layer='counts'` (keep a copy before normalising: "
            "`adata.layers['counts'] = adata.X.copy()`)."
        )
