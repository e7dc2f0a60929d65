"""The demo pipeline, for real, with a tiny training budget (the full run is `make demo`)."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scbranch._demo import run_demo
from scbranch.datasets import stratified_split


def test_demo_fast_writes_everything(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(out, fast=True)
    gen = ad.read_h5ad(out / "generated.h5ad")
    assert set(gen.obs["cell_type"].cat.categories) == set(gen.obs["cell_type"].astype(str))
    assert gen.obs["cell_type"].nunique() == 10
    assert gen.n_vars == 765  # decoded to genes
    # trained on out-of-fold PC scores, decoded with negative binomial counts (the default)
    assert gen.uns["scbranch"]["model"]["obsm_key"] == "X_pca_oof"
    assert gen.uns["scbranch"]["params"]["residual_noise"] == "nb"
    # the tree the summary reports is the one the model used (discovered on the same scores)
    assert summary["tree"] == gen.uns["scbranch"]["hierarchy"]["newick"]
    counts = gen.layers["counts"]  # and to integer counts
    assert counts.data.min() >= 0 and (counts.data == counts.data.round()).all()
    # placed in the real cells' UMAP, so scanpy's plots work on the file
    assert gen.obsm["X_umap"].shape == (gen.n_obs, 2) and np.isfinite(gen.obsm["X_umap"]).all()
    for name in (
        "report.csv",
        "evaluation.csv",
        "evaluation.png",
        "summary.json",
        "tree.png",
        "similarity.png",
        "embedding.png",
        "transmutation.png",
        "transmutation_genes.png",
    ):
        assert (out / name).stat().st_size > 0
    tm = ad.read_h5ad(out / "transmutation.h5ad")
    assert set(tm.obs["source_label"]) == {"CD14+ Monocyte"}
    assert set(tm.obs["target_label"]) == {"Dendritic"}
    assert "scbranch_transmutation_genes" in tm.uns
    assert 0 <= summary["transmutation_success"] <= 1
    assert (out / "model" / "model.safetensors").exists()
    assert 0 <= summary["label_fidelity_control"] <= 1
    # the numbers say which versions drew them (another torch or numpy draws other cells)
    written = json.loads((out / "summary.json").read_text())
    assert written["versions"]["torch"] == gen.uns["scbranch"]["versions"]["torch"]
    evaluation = pd.read_csv(out / "evaluation.csv")
    assert {"auroc", "w2", "label_fidelity", "train_distance"} <= set(evaluation["metric"])
    assert summary["train_distance_ratio"] > 0  # generated cells are not copies
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_demo(out, fast=True)


def test_stratified_split_keeps_every_class_on_both_sides():
    import pandas as pd

    labels = pd.Series(["a"] * 10 + ["b"] * 3 + ["c"] * 2)
    train, held = stratified_split(labels, 0.7, seed=0)
    assert set(labels.iloc[train]) == set(labels.iloc[held]) == {"a", "b", "c"}
    assert len(set(train) & set(held)) == 0 and len(train) + len(held) == 15


def test_three_way_split_keeps_every_class_in_every_part_and_is_seeded():
    labels = np.array(["a"] * 100 + ["b"] * 5 + ["c"] * 3)
    parts = stratified_split(labels, (0.5, 0.3, 0.2), seed=0)
    assert sum(len(p) for p in parts) == len(labels)
    assert len(np.unique(np.concatenate(parts))) == len(labels)
    for p in parts:
        assert set(labels[p]) == {"a", "b", "c"}
    assert [int((labels[p] == "a").sum()) for p in parts] == [50, 30, 20]
    again = stratified_split(labels, (0.5, 0.3, 0.2), seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(labels, (0.5, 0.3), seed=0)
