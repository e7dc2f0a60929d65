"""Maps from a latent representation back to genes (PCA loadings + centring mean)."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._keys import Key
from .._validation import to_dense
from ..io._rows import column_moments, is_on_disk, read_rows

logger = logging.getLogger(__name__)


def fit_pca_decoder(
    adata: AnnData,
    obsm_key: str,
    layer: str | None,
    *,
    loadings_key: str = "PCs",
    rtol: float = 1e-2,
    n_check: int = 500,
) -> dict | None:
    """Centring mean and loadings that map ``adata.obsm[obsm_key]`` back to expression.

    scanpy's ``sc.pp.pca`` stores the loadings (``varm['PCs']``) but not the centring mean; the
    mean of the expression the PCA was computed on recovers it. The map is kept only if it
    reproduces the stored coordinates (so a PCA of another layer, or of scaled data, is caught).

    Returns
    -------
    ``{"kind": "pca", "loadings": (d, g), "mean": (g,), "var_names": (g,)}`` or `None`.
    """
    source = out_of_fold_source(adata, obsm_key)
    if source is not None:
        # out-of-fold scores (tl.pca_out_of_fold) are in the basis of the in-sample PCA, so
        # they decode through its loadings and centring; they do not reproduce x @ loadings
        return fit_pca_decoder(
            adata, source, layer, loadings_key=loadings_key, rtol=rtol, n_check=n_check
        )
    rep = np.asarray(adata.obsm[obsm_key], dtype=np.float64)
    if loadings_key not in adata.varm or adata.varm[loadings_key].shape[1] != rep.shape[1]:
        logger.info(
            "No PCA loadings adata.varm[%r] matching %r: generated cells will carry the latent "
            "representation only.",
            loadings_key,
            obsm_key,
        )
        return None
    loadings = np.asarray(adata.varm[loadings_key], dtype=np.float64)
    genes = np.flatnonzero(np.abs(loadings).sum(1) > 0)  # PCA on HVGs leaves zero rows elsewhere
    expr = adata.layers[layer] if layer is not None else adata.X
    if expr is None:
        return None
    if is_on_disk(expr):  # an atlas on disk: one pass over blocks of cells, a few rows read
        data_mean = column_moments(expr)[0][genes]
    else:
        expr = expr[:, genes]
        if sp.issparse(expr):
            data_mean = np.asarray(expr.mean(0), dtype=np.float64).ravel()
        else:
            data_mean = to_dense(expr).mean(0)
    # The PCA may have been centred on more cells than these (e.g. a train split of the data it
    # was fitted on). Inside the PC span its centring is pinned down by the stored coordinates,
    # mean @ P = mean over cells of (x @ P - x_pca); outside the span keep the data mean.
    p = loadings[genes]
    n_rows = min(n_check, adata.n_obs)
    rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, n_rows, replace=False))
    x_rows = to_dense(read_rows(expr, rows)[:, genes]) if is_on_disk(expr) else to_dense(expr[rows])
    target = rep[rows]
    span_mean = (x_rows @ p - target).mean(0)
    mean = data_mean - (data_mean @ p - span_mean) @ np.linalg.pinv(p)
    projected = (x_rows - mean) @ p
    err = np.linalg.norm(projected - target) / max(np.linalg.norm(target), 1e-12)
    if not np.isfinite(err) or err > rtol:
        where = f"adata.layers[{layer!r}]" if layer else "adata.X"
        warnings.warn(
            f"adata.obsm[{obsm_key!r}] is not the PCA of {where} with adata.varm[{loadings_key!r}] "
            f"(relative mismatch {err:.3f}); generated cells will carry only the latent "
            "representation. Pass `layer=` naming the expression the PCA was computed on.",
            UserWarning,
            stacklevel=3,
        )
        return None
    # what the PCs leave out, per gene (probabilistic PCA's noise term), for residual_noise
    residual = x_rows - (projected @ p.T + mean)
    return {
        "kind": "pca",
        "loadings": loadings[genes].T.astype(np.float32),  # (d, g)
        "mean": mean.astype(np.float32),
        "var_names": np.asarray(adata.var_names[genes]).astype(str),
        "residual_sd": residual.std(0).astype(np.float32),
    }


def decode(
    decoder: dict,
    z: np.ndarray,
    *,
    residual_noise: bool = False,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Expression of latent coordinates ``z`` (n, d) -> (n, g).

    Without noise, the denoised profile ``mean + z @ loadings`` (exactly invertible on the PCs).
    With ``residual_noise``, each gene also gets Gaussian noise with the standard deviation real
    cells have outside the PCs (probabilistic PCA's noise term): cells then vary like real cells
    in every direction, not only within the PCs. Like the profiles themselves, values can be
    slightly negative; clipping them at 0 shifts low genes' means so much that a classifier
    tells the cells from real ones far more easily.
    """
    x = (z @ decoder["loadings"] + decoder["mean"]).astype(np.float32)
    if residual_noise:
        sd = decoder.get("residual_sd")
        if sd is None:
            raise ValueError(
                "This decoder has no residual variance (a model saved by scbranch < 0.1); "
                "generate without `residual_noise` or build the model again from its data."
            )
        rng = np.random.default_rng() if rng is None else rng
        x += rng.standard_normal(x.shape, dtype=np.float32) * sd
    return x


#: genes and components a PCA fingerprint keeps
FINGERPRINT_GENES, FINGERPRINT_COMPONENTS = 8, 3


def pca_fingerprint(decoder: dict) -> dict:
    """A few loadings that tell this PCA from another one fitted on other cells.

    The genes with the largest loadings on the first components, and those loadings: plain
    arrays for ``uns`` (h5ad-safe), compared by :func:`same_pca` with the loadings
    (``varm['PCs']``) of an AnnData whose PCA the cells are read in.
    """
    loadings = np.asarray(decoder["loadings"], dtype=np.float64)
    k = min(FINGERPRINT_COMPONENTS, loadings.shape[0])
    top = np.argsort(-np.abs(loadings[:k]).max(0), kind="stable")[:FINGERPRINT_GENES]
    return {
        "genes": np.asarray(decoder["var_names"])[top].astype(str),
        "loadings": loadings[:k, top].T.copy(),
    }


def same_pca(fingerprint, var_names, loadings: np.ndarray, atol: float = 1e-3) -> bool | None:
    """Whether ``loadings`` (genes x components, e.g. ``varm['PCs']``) is the fingerprint's PCA.

    Each component is compared up to its sign (solvers may flip it); `None` when the genes or
    components to compare are missing. Loadings are unit vectors over hundreds of genes (the
    top ones 0.05-0.3): PCAs of other cells differ by more than 0.01, a refit of the same
    cells by solver noise, far below ``atol``.
    """
    genes = np.asarray(fingerprint["genes"]).astype(str)
    kept = np.asarray(fingerprint["loadings"], dtype=np.float64)
    index = pd.Index(np.asarray(var_names).astype(str)).get_indexer(genes)
    if kept.ndim != 2 or (index < 0).any() or loadings.shape[1] < kept.shape[1]:
        return None
    theirs = np.asarray(loadings, dtype=np.float64)[index][:, : kept.shape[1]]
    diff = np.minimum(np.abs(theirs - kept).max(0), np.abs(theirs + kept).max(0))
    return bool((diff <= atol).all())


def out_of_fold_source(adata: AnnData, obsm_key: str) -> str | None:
    """The in-sample PCA key ``obsm_key``'s out-of-fold scores decode through, or `None`."""
    record = adata.uns.get(Key.uns.OUT_OF_FOLD, {}).get(obsm_key)
    if record is None:
        return None
    # earlier versions stored the parameters flat, today's under "params"
    source = str(record.get("params", record)["obsm_key"])
    if source not in adata.obsm or adata.obsm[source].shape != adata.obsm[obsm_key].shape:
        raise KeyError(
            f"adata.obsm[{obsm_key!r}] holds out-of-fold scores of obsm[{source!r}], which is "
            "missing or has another shape; rerun `sb.tl.pca_out_of_fold`."
        )
    return source
