"""Out-of-fold PC scores: a latent that describes the training cells the way it describes new ones.

A PCA gives the cells it was fitted on more spread along its components than any new cell gets
(their noise is partly what the components were fitted to). A generator trained on those
in-sample scores learns the inflated spread and is told apart from new real cells by exactly
that (docs/evaluation.md: the "training cells" probe). Cross-fitting measures the spread new
cells get: each fold of cells is scored by a PCA fitted on the other folds. Two ways to use it:

* ``"rescale"`` (default): every component of the in-sample scores is shrunk to the spread the
  out-of-fold scores have on the same component. Each cell keeps its direction; on simulated
  low-rank cells every component then spreads like new cells' scores within sampling noise.
* ``"procrustes"``: the out-of-fold scores themselves, rotated (orthogonal Procrustes) into the
  basis of the PCA of all cells. Within the bulk of noise components the rotation re-aligns them
  with the directions the full PCA fitted to these very cells, so leading noise components come
  out ~20 % too wide and trailing ones too narrow (tests/test_out_of_fold.py shows both).

Either way the scores stay in the basis of the existing PCA, so its loadings and centring decode
them to genes.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from .._keys import Key
from .._validation import check_finite, check_obs_key, check_rep_key

logger = logging.getLogger(__name__)


def _folds(n: int, n_folds: int, labels: np.ndarray | None, seed: int) -> np.ndarray:
    """Fold of every cell, stratified by ``labels`` (every class spread over the folds)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(n, dtype=np.int64)
    groups = (
        [np.arange(n)]
        if labels is None
        else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    )
    offset = 0
    for idx in groups:
        idx = rng.permutation(idx)
        # continue the round robin across classes so small classes do not all land in fold 0
        fold[idx] = (np.arange(len(idx)) + offset) % n_folds
        offset += len(idx)
    return fold


def _procrustes(components: np.ndarray, loadings: np.ndarray) -> np.ndarray:
    """Rotation R (d, d) minimising ``||components.T @ R - loadings||`` (both g x d bases)."""
    u, _, vt = np.linalg.svd(components @ loadings)
    return u @ vt


def pca_out_of_fold(
    adata: AnnData,
    *,
    obsm_key: str = "X_pca",
    layer: str | None = None,
    groupby: str | None = None,
    n_folds: int = 5,
    method: str = "rescale",
    key_added: str = "X_pca_oof",
    seed: int = 0,
    copy: bool = False,
) -> AnnData | None:
    """PC scores that spread like a new cell's, in the basis of the PCA of all cells.

    Cells are split into ``n_folds`` folds (stratified by ``groupby``); the cells of each fold
    are projected on a PCA of the other folds' cells (same genes, same number of components).
    Those out-of-fold scores spread as new cells' scores do; in-sample scores spread more
    (1.27x class by class on pbmc3k, 1.5x on pbmc68k_reduced), and a generator trained on them
    learns that. With ``method="rescale"`` each component of the in-sample scores is shrunk to
    the out-of-fold spread; with ``"procrustes"`` the out-of-fold scores are rotated into the
    basis of ``adata.varm['PCs']``; the rotation re-aligns the noise components with the
    directions the full PCA fitted to these very cells, so it gets their spread right only on
    average (leading noise components too wide, trailing ones too narrow).
    The loadings and centring of the existing PCA decode either to genes: train a model with
    ``setup_anndata(..., obsm_key=key_added)``.

    Parameters
    ----------
    adata
        Cells with a PCA of log-normalised expression (``sc.pp.pca``: ``obsm[obsm_key]`` and
        ``varm['PCs']``).
    obsm_key
        The in-sample PC scores; their loadings are ``varm['PCs']``.
    layer
        The expression the PCA was computed on (`None`: ``.X``).
    groupby
        Column of ``obs`` to stratify the folds by (e.g. the cell types), so every type is in
        every fold.
    n_folds
        Number of folds (at least 2). Each fold's PCA sees ``(n_folds - 1) / n_folds`` of the
        cells.
    method
        ``"rescale"`` or ``"procrustes"``.
    key_added
        ``obsm`` key of the out-of-fold scores.
    seed
        Seed of the folds and of the fold PCAs.
    copy
        Work on a copy of ``adata`` and return it, leaving ``adata`` as it is.

    Returns
    -------
    With ``copy=True`` the copy, else `None`; sets ``adata.obsm[key_added]`` (float32, same
    shape as ``obsm[obsm_key]``) and ``adata.uns['scbranch_out_of_fold'][key_added]``:
    ``"params"`` (the arguments; ``params["obsm_key"]`` is the PCA the scores decode through)
    and ``"inflation"`` (per component, the in-sample over the out-of-fold standard deviation).

    Examples
    --------
    >>> import scanpy as sc
    >>> import scbranch as sb
    >>> adata = sb.datasets.pbmc68k()
    >>> sb.tl.pca_out_of_fold(adata, groupby="cell_type", n_folds=5)
    >>> adata.obsm["X_pca_oof"].shape == adata.obsm["X_pca"].shape
    True
    >>> bool(adata.uns["scbranch_out_of_fold"]["X_pca_oof"]["inflation"][:5].mean() > 1)
    True
    >>> adata.uns["scbranch_out_of_fold"]["X_pca_oof"]["params"]["obsm_key"]
    'X_pca'
    >>> sb.tl.pca_out_of_fold(adata, key_added="X_pca_oof3", n_folds=3, copy=True).obsm.keys()
    KeysView(AxisArrays with keys: X_pca, X_umap, X_pca_oof, X_pca_oof3)
    >>> "X_pca_oof3" in adata.obsm
    False
    """
    import scanpy as sc

    from ..model._decoding import fit_pca_decoder

    check_rep_key(adata, obsm_key=obsm_key)
    if layer is not None:
        check_rep_key(adata, layer=layer)
    if groupby is not None:
        check_obs_key(adata, groupby, "groupby")
    if method not in ("rescale", "procrustes"):
        raise ValueError(f"method must be 'rescale' or 'procrustes', got {method!r}.")
    if isinstance(n_folds, bool) or not float(n_folds).is_integer() or int(n_folds) < 2:
        raise ValueError(f"n_folds must be a whole number of at least 2, got {n_folds!r}.")
    if int(n_folds) > adata.n_obs:
        raise ValueError(
            f"n_folds={n_folds} is more than the {adata.n_obs} cells: every fold needs cells to "
            "score (the default, 5, suits any data set)."
        )
    n_folds = int(n_folds)
    if key_added == obsm_key:
        raise ValueError(
            f"key_added={key_added!r} would overwrite the in-sample scores it decodes through; "
            "choose another key."
        )
    where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
    # before the decoder: a NaN would otherwise surface as "not a PCA of the expression"
    check_finite(adata.layers[layer] if layer is not None else adata.X, where)
    check_finite(np.asarray(adata.obsm[obsm_key]), f"adata.obsm[{obsm_key!r}]")
    decoder = fit_pca_decoder(adata, obsm_key, layer)
    if decoder is None:
        raise ValueError(
            f"adata.obsm[{obsm_key!r}] is not a PCA of {where} with loadings in "
            "adata.varm['PCs']; run `sc.pp.pca(adata)` on the log-normalised expression (or "
            "pass the `layer=` it was computed on)."
        )
    if copy:
        adata = adata.copy()
    n_folds = int(n_folds)
    labels = None if groupby is None else adata.obs[groupby].astype(str).to_numpy()
    fold = _folds(adata.n_obs, n_folds, labels, seed)
    small = np.bincount(fold, minlength=n_folds).min()
    n_comps = decoder["loadings"].shape[0]
    if adata.n_obs - small <= n_comps:
        raise ValueError(
            f"Too few cells ({adata.n_obs}) for {n_folds} folds of a {n_comps}-component PCA; "
            "use fewer folds or components."
        )
    genes = adata.var_names.get_indexer(decoder["var_names"])
    expr = adata.layers[layer] if layer is not None else adata.X
    expr = expr[:, genes]
    if sp.issparse(expr):
        expr = sp.csr_matrix(expr)
    loadings = decoder["loadings"].T.astype(np.float64)  # (g, d)
    rotated = np.empty((adata.n_obs, n_comps)) if method == "procrustes" else None
    # out-of-fold spread per component, pooled over folds (component j of every fold PCA)
    sum_sq = np.zeros(n_comps)
    for k in range(n_folds):
        fit_rows, score_rows = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        fitting = expr[fit_rows]
        _, components, _, _ = sc.pp.pca(
            fitting, n_comps=n_comps, return_info=True, random_state=seed, svd_solver="arpack"
        )
        components = np.asarray(components, dtype=np.float64)  # (d, g)
        fold_centre = np.asarray(fitting.mean(0), dtype=np.float64).ravel()
        projected = np.asarray(expr[score_rows] @ components.T) - fold_centre @ components.T
        sum_sq += (projected**2).sum(0)
        if rotated is not None:
            rotated[score_rows] = projected @ _procrustes(components, loadings)
    in_sample = np.asarray(adata.obsm[obsm_key], dtype=np.float64)
    inflation = in_sample.std(0) / np.maximum(np.sqrt(sum_sq / adata.n_obs), 1e-12)
    centre = in_sample.mean(0)
    scores = rotated if rotated is not None else centre + (in_sample - centre) / inflation
    adata.obsm[key_added] = scores.astype(np.float32)
    records = dict(adata.uns.get(Key.uns.OUT_OF_FOLD, {}))
    records[key_added] = {
        "params": {
            "obsm_key": obsm_key,
            "layer": "" if layer is None else layer,
            "groupby": "" if groupby is None else groupby,
            "n_folds": int(n_folds),
            "method": method,
            "seed": int(seed),
        },
        "inflation": inflation.astype(np.float32),
    }
    adata.uns[Key.uns.OUT_OF_FOLD] = records
    logger.info(
        "Out-of-fold scores in obsm[%r]: in-sample scores spread %.2fx as much (mean over %d "
        "components).",
        key_added,
        float(inflation.mean()),
        n_comps,
    )
    return adata if copy else None
