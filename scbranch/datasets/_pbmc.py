"""PBMCs shipped with scanpy (no network): counts, log-normalised expression, labels, PCA."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

_LINEAGE = {
    "CD4+/CD25 T Reg": "T cell",
    "CD4+/CD45RO+ Memory": "T cell",
    "CD4+/CD45RA+/CD25- Naive T": "T cell",
    "CD8+ Cytotoxic T": "T cell",
    "CD8+/CD45RA+ Naive Cytotoxic": "T cell",
    "CD56+ NK": "NK cell",
    "CD19+ B": "B cell",
    "CD14+ Monocyte": "Myeloid",
    "Dendritic": "Myeloid",
    "CD34+": "Progenitor",
}
_COMPARTMENT = {
    "T cell": "Lymphoid",
    "NK cell": "Lymphoid",
    "B cell": "Lymphoid",
    "Myeloid": "Myeloid",
    "Progenitor": "Progenitor",
}


def pbmc68k(n_comps: int = 30) -> AnnData:
    """700 labelled PBMCs from scanpy's shipped ``pbmc68k_reduced``, ready for scbranch.

    scanpy ships these cells scaled; scbranch needs counts and log-normalised expression. The
    integer UMI counts are recovered exactly from ``.raw`` (log1p of counts per 10,000) and the
    per-cell totals, then normalised again so that ``.X`` is log1p(CP10k) of the 765 genes and
    a PCA of ``.X`` (centring mean recoverable, so generated cells decode to genes) is stored.

    Parameters
    ----------
    n_comps
        Number of principal components in ``obsm['X_pca']``.

    Returns
    -------
    AnnData with ``layers['counts']`` (integers), ``.X`` (log1p CP10k), ``obs['cell_type']``
    (10 types), ``obs['lineage']`` (``'T cell'``, ``'NK cell'``, ``'B cell'``, ``'Myeloid'``,
    ``'Progenitor'``), ``obs['compartment']`` (``'Lymphoid'``, ``'Myeloid'``, ``'Progenitor'``),
    ``obsm['X_pca']``, ``varm['PCs']``.

    Examples
    --------
    >>> adata = pbmc68k()
    >>> adata.obs["cell_type"].nunique(), bool(adata.layers["counts"].max() > 1)
    (10, True)
    """
    import scanpy as sc

    raw = sc.datasets.pbmc68k_reduced()
    lognorm = raw.raw.X
    lognorm = lognorm.toarray() if sp.issparse(lognorm) else np.asarray(lognorm)
    totals = raw.obs["n_counts"].to_numpy(dtype=np.float64)[:, None]
    counts = np.rint(np.expm1(lognorm.astype(np.float64)) * totals / 1e4)
    counts = sp.csr_matrix(counts.astype(np.float32))
    obs = pd.DataFrame(index=raw.obs_names.copy())
    cell_type = raw.obs["bulk_labels"].astype(str)
    order = list(pd.Categorical(raw.obs["bulk_labels"]).categories)
    obs["cell_type"] = pd.Categorical(cell_type, categories=order)
    obs["lineage"] = pd.Categorical(cell_type.map(_LINEAGE))
    obs["compartment"] = pd.Categorical(obs["lineage"].astype(str).map(_COMPARTMENT))
    obs["n_counts"] = np.asarray(counts.sum(1)).ravel()
    adata = AnnData(X=counts.copy(), obs=obs, var=pd.DataFrame(index=raw.raw.var_names.copy()))
    adata.layers["counts"] = counts
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    sc.pp.pca(adata, n_comps=n_comps, random_state=0)
    adata.obsm["X_umap"] = raw.obsm["X_umap"].copy()
    return adata
