"""Small count data with a known tree, shared by the golden cases and the generation tests."""

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

import scbranch as sb


def count_data(
    n_per_class: int = 40, n_genes: int = 40, seed: int = 0, labels: str = "cell_type"
) -> ad.AnnData:
    """Negative-binomial counts of 4 types on a known tree, log-normalised, with a PCA."""
    rng = np.random.default_rng(seed)
    sim = sb.datasets.simulate_tree(depth=2, n_per_class=n_per_class, dim=6, seed=seed)
    mixing = rng.normal(size=(6, n_genes)) / 4
    mu = np.exp(1.0 + sim.x @ mixing)
    counts = rng.negative_binomial(5, 5 / (5 + mu)).astype(np.float32)
    obs = pd.DataFrame(
        {labels: pd.Categorical([sim.classes[i] for i in sim.labels], sim.classes)},
        index=[f"cell{i}" for i in range(len(counts))],
    )
    adata = ad.AnnData(
        X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    )
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=6, random_state=0)
    return adata
