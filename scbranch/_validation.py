"""Input checks that turn bad input into one clear, actionable error."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData


def check_whole_number(name: str, value, least: int = 1, why: str = "") -> None:
    """Refuse ``value`` unless it is a whole number (not a bool) of at least ``least``."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not whole or value < least:
        ending = f": {why}" if why else "."
        raise ValueError(
            f"{name} must be a whole number of at least {least}, got {value!r}{ending}"
        )


def check_obs_key(adata: AnnData, key: str, what: str = "labels_key", name: str = "adata") -> None:
    """Raise if ``key`` is not a column of ``adata.obs`` or has missing values.

    ``name``: what the caller calls ``adata`` (``generated``, ``train``), for the message.
    """
    if not isinstance(key, str):  # a list raised "unhashable type: 'list'"
        raise TypeError(
            f"{what} names one column of adata.obs (a string), got {type(key).__name__} {key!r}."
        )
    if key not in adata.obs.columns:
        raise KeyError(
            f"{what}={key!r} is not a column of {name}.obs. Available columns: "
            f"{list(adata.obs.columns)}."
        )
    n_missing = int(pd.isna(adata.obs[key]).sum())
    if n_missing:
        raise ValueError(
            f"{name}.obs[{key!r}] has {n_missing} missing value(s). Drop or label those cells "
            f"first, e.g. `{name} = {name}[{name}.obs[{key!r}].notna()].copy()`."
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
    """Raise if ``m`` contains NaN or infinite values, saying how many and where.

    A matrix on disk (a backed ``.h5ad`` file, a ``.zarr`` store) is streamed over in blocks.
    """
    from .io._rows import count_nonfinite, is_on_disk

    if is_on_disk(m):
        n_bad = count_nonfinite(m)
    else:
        values = m.data if sp.issparse(m) else np.asarray(m)
        n_bad = int((~np.isfinite(values)).sum())
    if n_bad:
        raise ValueError(
            f"{where} contains {n_bad} NaN or infinite value(s). Remove or impute them "
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
        # a continuous column named as labels makes every value a class: name a few
        shown = small[:10]
        listing = ", ".join(f"{c!r} ({n} cell{'s' if n != 1 else ''})" for c, n in shown)
        if len(small) > len(shown):
            listing += f" and {len(small) - len(shown)} more"
        many = len(small) > len(classes) / 2 and len(classes) > 20
        hint = f" ({len(classes)} classes: is it the cell-type column?)" if many else ""
        # only a categorical column has types without cells (and .cat to drop them with)
        unused = (
            " Unused categories can be dropped with "
            f"`adata.obs[{labels_key!r}] = "
            f"adata.obs[{labels_key!r}].cat.remove_unused_categories()`."
            if any(n == 0 for _, n in small)
            else ""
        )
        raise ValueError(
            f"Class(es) {listing} of adata.obs[{labels_key!r}] have fewer than {min_cells} cells"
            f"{hint}, {why}{unused}"
        )


def check_discovery_sizes(
    labels: np.ndarray, classes: Sequence[str], min_cells: int, labels_key: str
) -> None:
    """:func:`check_class_sizes` for hierarchy discovery, which needs 2 cells of every type.

    A type's similarity curve compares its cells with each other; below 2 the discovery
    failed naming a class index. ``min_cells`` below 2 cannot lower that floor.
    """
    if int(min_cells) >= 2:
        check_class_sizes(labels, classes, int(min_cells), labels_key)
        return
    check_class_sizes(
        labels, classes, 2, labels_key,
        why="too few for hierarchy discovery, which compares a type's cells with each other "
        "(min_cells_per_class cannot go below 2 here). Remove them, merge them into a related "
        "label, or pass a hierarchy (`hierarchy=`).",
    )  # fmt: skip


#: what to do about non-count data where ``counts_layer=`` is the argument that names counts
COUNTS_LAYER_FIX = (
    "Pass the layer with the raw counts, e.g. `counts_layer='counts'` (keep a copy before "
    "normalising: `adata.layers['counts'] = adata.X.copy()`)."
)


def check_target_sum(target_sum) -> None:
    """``target_sum`` of ``normalize_total``: a positive finite number (``True`` is not one)."""
    if isinstance(target_sum, bool) or not (
        isinstance(target_sum, int | float | np.number)
        and np.isfinite(target_sum)
        and target_sum > 0
    ):
        raise ValueError(f"target_sum must be a positive number, got {target_sum!r}.")


#: ... where the diffused matrix itself must hold counts (``setup_anndata(target_sum=...)``)
TARGET_SUM_FIX = (
    "With target_sum the diffused matrix must hold raw counts: name them with `layer=` (e.g. "
    "`layer='counts'`), or drop `target_sum` for log-normalised expression."
)


def check_counts(m, where: str, *, n_check: int = 100_000, fix: str = COUNTS_LAYER_FIX) -> None:
    """Raise if ``m`` does not hold raw counts (non-negative integers).

    Checks the first ``n_check`` stored values (enough to catch log-normalised or scaled data
    without scanning a large matrix); ``fix`` says what to do, in the caller's terms.
    """
    from .io._rows import is_on_disk, read_block

    if is_on_disk(m):  # the first rows hold far more than n_check values of an atlas
        m = read_block(m, 0, min(m.shape[0], 10_000))
    values = m.data if sp.issparse(m) else np.asarray(m).ravel()
    values = np.asarray(values[:n_check], dtype=np.float64)
    if values.size and (values.min() < 0 or not np.all(values == np.round(values))):
        kind = "negative values" if values.min() < 0 else "non-integer values"
        raise ValueError(
            f"{where} must hold raw counts (non-negative integers) but holds {kind} "
            f"(log-normalised or scaled data?). {fix}"
        )


def check_cells(adata: AnnData, what: str = "adata") -> None:
    """Raise if ``adata`` holds no cells, or cells or genes with duplicate names."""
    if adata.n_obs == 0:
        raise ValueError(
            f"{what} holds 0 cells; pass the cells to learn from (was it filtered to nothing?)."
        )
    for axis, names, fix, why in (
        (
            "obs_names",
            adata.obs_names,
            "obs_names_make_unique",
            "cells are named in what scbranch returns (transmutation sources, anchors)",
        ),
        ("var_names", adata.var_names, "var_names_make_unique", "generated cells carry them on"),
    ):
        if not names.is_unique:
            dup = list(pd.unique(names[names.duplicated()])[:3])
            raise ValueError(
                f"{what}.{axis} are not unique (e.g. {dup}), and {why}. Run `{what}.{fix}()` "
                "first (for a file: read it, run it, write it again)."
            )


def warn_if_negative(
    values: np.ndarray, where: str, consequence: str, fix: str, *, stacklevel: int
) -> bool:
    """Warn that ``values`` (a matrix's stored values) are not log-normalised if any is negative.

    Log-normalised expression is never negative; z-scores of ``sc.pp.scale`` are. A warning,
    not an error: other signed features can be diffused and judged. ``consequence`` says what
    the caller does with them, ``fix`` what to pass instead. Returns whether it warned.
    """
    import warnings

    if not values.size or float(values.min()) >= 0:
        return False
    warnings.warn(
        f"{where} holds negative values (min {float(values.min()):.3g}), so it is not "
        f"log-normalised expression (scaled with sc.pp.scale?), and {consequence}. {fix}",
        UserWarning,
        stacklevel=stacklevel + 1,
    )
    return True


def check_lognormalized(m, where: str, *, n_check: int = 100_000) -> None:
    """Warn if ``m`` holds negative values, which log-normalised expression never has.

    A warning, not an error: other real-valued features can be diffused, but generated
    expression is clipped at 0, which is only right for log-normalised data.
    """
    import warnings

    values = m.data if sp.issparse(m) else np.asarray(m).ravel()
    values = np.asarray(values[:n_check], dtype=np.float64)
    negative = warn_if_negative(
        values,
        where,
        "generated expression is clipped at 0",
        "Pass the log-normalised layer with `layer=` (keep one before scaling: "
        "`adata.layers['lognorm'] = adata.X.copy()`), or diffuse a latent with `obsm_key=`.",
        stacklevel=4,
    )
    if not negative and values.size and values.max() > 20 and np.all(values == np.round(values)):
        # integers above any log-normalised value (log1p(1e4) ~ 9.2): raw counts
        warnings.warn(
            f"{where} looks like raw counts (integers up to {values.max():.0f}), not "
            "log-normalised expression. Expression models: pass `target_sum=1e4` to normalise "
            "them on the way (scanpy's normalize_total + log1p); otherwise name the "
            "log-normalised expression with `layer=`.",
            UserWarning,
            stacklevel=4,
        )


def check_setup_data(
    adata: AnnData,
    *,
    labels_key: str,
    obsm_key: str | None,
    layer: str | None,
    counts_layer: str | None,
    target_sum: float | None = None,
) -> None:
    """Every check of a model's set-up data, before anything is registered.

    A matrix on disk (an atlas opened with :func:`scbranch.io.read_backed`) is checked a
    block of rows at a time, so the check never loads it.
    """
    if not isinstance(adata, AnnData):
        raise TypeError(f"`adata` must be an AnnData, got {type(adata).__name__}.")
    check_cells(adata)
    check_obs_key(adata, labels_key)
    # a latent (obsm_key) may come with the layer its PCA was computed on, to decode into
    check_rep_key(adata, obsm_key=obsm_key)
    check_rep_key(adata, layer=layer)
    if counts_layer is not None and counts_layer not in adata.layers:
        raise KeyError(
            f"counts_layer={counts_layer!r} is not in adata.layers (available: "
            f"{list(adata.layers.keys())})."
        )
    if counts_layer is not None:  # at set-up, not only when the model is built on it
        from .io._rows import read_block

        counts = adata.layers[counts_layer]
        rows = min(counts.shape[0], max(100, 1_000_000 // max(counts.shape[1], 1)))
        check_counts(
            read_block(counts, 0, rows),  # a few rows: log-normalised data show at once
            f"counts_layer={counts_layer!r} (adata.layers[{counts_layer!r}])",
        )
    if target_sum is not None:
        if obsm_key is not None:
            raise ValueError(
                "target_sum normalises raw counts for expression models; a latent model "
                "(obsm_key=...) diffuses its latent as it is. Drop `target_sum`."
            )
        if counts_layer is not None:
            raise ValueError(
                "With target_sum the diffused matrix holds the raw counts, so counts come from "
                "it; drop `counts_layer`."
            )
        check_target_sum(target_sum)
    if obsm_key is not None:
        check_finite(adata.obsm[obsm_key], f"adata.obsm[{obsm_key!r}]")
        if layer is None:  # .X is decoded into only if the PCA reproduces it (checked there)
            return
        # a layer named with a latent is the expression it decodes into: checked as such
    from .io._rows import count_nonfinite, is_on_disk, read_block

    where = f"adata.layers[{layer!r}]" if layer else "adata.X"
    matrix = adata.layers[layer] if layer else adata.X
    if matrix is None:
        raise ValueError(f"{where} is empty; pass the layer with the expression (`layer=`).")
    if is_on_disk(matrix):
        bad = count_nonfinite(matrix)
        if bad:
            raise ValueError(
                f"{where} contains {bad} NaN or infinite value(s). Remove or impute them "
                "before using scbranch."
            )
        first = read_block(matrix, 0, min(matrix.shape[0], 10_000))
    else:
        check_finite(matrix, where)
        first = matrix
    if target_sum is not None:
        check_counts(first, where + " (target_sum: raw counts expected)", fix=TARGET_SUM_FIX)
    else:
        check_lognormalized(first, where)


def check_genes(adata: AnnData, var_names: np.ndarray, what: str = "the scVI model") -> np.ndarray:
    """Columns of ``adata`` holding ``var_names`` in order; raise if any gene is missing."""
    index = pd.Index(adata.var_names.astype(str))
    if index.equals(pd.Index(var_names)):
        return np.arange(len(var_names))
    missing = [str(g) for g in var_names if g not in index]
    if missing:
        raise ValueError(
            f"The genes of adata do not match {what}'s: {len(missing)} of its "
            f"{len(var_names)} genes are missing (e.g. {missing[:5]}). Pass cells measured on "
            "the genes it was trained on."
        )
    if not index.is_unique:
        raise ValueError("adata.var_names are not unique; run `adata.var_names_make_unique()`.")
    logging.getLogger(__name__).info(
        "Using the %d genes of %s out of adata's %d.", len(var_names), what, adata.n_vars
    )
    return index.get_indexer(var_names)


def check_genes_equal(adata: AnnData, genes: np.ndarray, what: str) -> None:
    """Raise unless ``adata`` has exactly ``genes``, in order (missing genes named)."""
    index = pd.Index(adata.var_names.astype(str))
    if index.equals(pd.Index(genes)):
        return
    missing = [str(g) for g in genes if g not in index]
    if missing:
        check_genes(adata, genes, what)  # raises, naming the missing genes
    how = "in another order" if len(index) == len(genes) else f"and {len(index) - len(genes)} more"
    raise ValueError(
        f"adata holds {what}'s {len(genes)} genes {how}; it must hold exactly them, in its "
        "order. Load without `adata` and subset: `adata[:, model.get_var_names()].copy()`."
    )
