"""Training from an atlas on disk: the file is only read, and what is learned from it equals
what is learned from the same cells in memory (the known answer for a streaming path)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch

import scbranch as sb
from scbranch.io._rows import RowMatrix
from scbranch.model._data import balanced_indices
from scbranch.model._streaming import BlockDataModule, BlockShuffleBatches


def _counts_adata(n_per_type: int = 80, n_genes: int = 60, seed: int = 0) -> ad.AnnData:
    """Three types of negative-binomial counts (two close, one far), counts in ``.X``."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 1.0, size=n_genes)
    profiles = [base, base * rng.lognormal(0, 0.3, n_genes), base * rng.lognormal(0, 1.0, n_genes)]
    rows, labels = [], []
    for k, p in enumerate(profiles):
        lib = rng.lognormal(np.log(400), 0.3, size=n_per_type)
        mean = lib[:, None] * p / p.sum()
        rows.append(rng.poisson(rng.gamma(5.0, mean / 5.0)))
        labels += [f"type{k}"] * n_per_type
    x = sp.csr_matrix(np.vstack(rows).astype(np.float32))
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(labels)}, index=[f"c{i}" for i in range(x.shape[0])]
    )
    # shuffle the cells so that blocks of contiguous cells mix types, as in a real file
    order = rng.permutation(x.shape[0])
    adata = ad.AnnData(
        X=x[order], obs=obs.iloc[order], var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)])
    )
    adata.obs_names = [f"c{i}" for i in range(adata.n_obs)]
    return adata


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _train(model, **kwargs):
    model.train(
        max_epochs=2, batch_size=32, loader="blocks", enable_progress_bar=False,
        datasplitter_kwargs={"block_rows": 40, "blocks_per_buffer": 3}, **kwargs,
    )  # fmt: skip


def test_training_from_counts_on_disk_equals_training_on_the_normalised_cells_in_memory(tmp_path):
    adata = _counts_adata()
    path = tmp_path / "atlas.h5ad"
    adata.write_h5ad(path)
    before = _sha(path)

    memory = adata.copy()
    sc.pp.normalize_total(memory, target_sum=1e4)
    sc.pp.log1p(memory)
    sb.BranchedDiffusion.setup_anndata(memory, labels_key="cell_type")
    torch.manual_seed(0)
    in_memory = sb.BranchedDiffusion(memory, width=32, n_head_blocks=1)

    backed = sb.io.read_backed(path)
    sb.BranchedDiffusion.setup_anndata(backed, labels_key="cell_type", target_sum=1e4)
    torch.manual_seed(0)
    on_disk = sb.BranchedDiffusion(backed, width=32, n_head_blocks=1)
    assert on_disk.space.training_matrix(backed).on_disk

    # statistics streamed over blocks of the file = those of the matrix in memory (scanpy
    # normalises in float32, the blocks in float64: agreement to float32 rounding)
    for name in ("shift", "scale", "data_var"):
        np.testing.assert_allclose(
            getattr(on_disk.module, name), getattr(in_memory.module, name), rtol=2e-4, atol=1e-5
        )
    assert on_disk.tree.to_newick(3) == in_memory.tree.to_newick(3)

    _train(in_memory)
    _train(on_disk)
    for k, v in in_memory.module.state_dict().items():
        np.testing.assert_allclose(
            on_disk.module.state_dict()[k], v, rtol=1e-3, atol=1e-4, err_msg=k
        )
    assert _sha(path) == before  # the backed file was only read

    # counts come from the data's own totals; generated cells decode to log1p(CP10k)
    gen = on_disk.generate(20, seed=0, counts=True, progress_bar=False)
    counts = gen.layers["counts"].toarray()
    assert np.all(counts == np.round(counts)) and counts.sum() > 0
    # ...of size factors drawn from the type's own cells: totals / target_sum
    factors = gen.obs["scbranch_size_factor"].to_numpy()
    observed = adata.X.sum(1).A1 / 1e4
    assert observed.min() - 1e-6 <= factors.min() and factors.max() <= observed.max() + 1e-6
    # ...around the generated values capped at each gene's training maximum and rescaled to
    # the target sum: totals are the factors' libraries, up to rounding and the cap
    profiles = on_disk.space.count_profiles(np.asarray(gen.X))
    assert on_disk.space.total == pytest.approx(1e4, rel=1e-6)
    expected = factors * np.expm1(profiles.astype(np.float64)).sum(1)
    np.testing.assert_allclose(counts.sum(1), expected, rtol=0.05)
    assert (expected <= factors * 1e4 * (1 + 1e-5)).all()
    # save and load keep the normalisation
    on_disk.save(tmp_path / "model")
    loaded = sb.BranchedDiffusion.load(tmp_path / "model")
    assert loaded.space.target_sum == 1e4
    np.testing.assert_allclose(loaded.encode(adata[:5].copy()), memory.X[:5].toarray(), atol=1e-5)


def test_a_zarr_store_trains_like_the_h5ad_file(tmp_path):
    adata = _counts_adata(n_per_type=40)
    adata.write_h5ad(tmp_path / "a.h5ad")
    adata.write_zarr(tmp_path / "a.zarr")
    models = []
    for name in ("a.h5ad", "a.zarr"):
        data = sb.io.read_backed(tmp_path / name)
        sb.BranchedDiffusion.setup_anndata(data, labels_key="cell_type", target_sum=1e4)
        torch.manual_seed(0)
        model = sb.BranchedDiffusion(data, width=16, n_head_blocks=1)
        _train(model)
        models.append(model.module.state_dict())
        # the cells the model reads are never written over, overwrite=True or not
        for out in (tmp_path / name, tmp_path / "." / name):
            with pytest.raises(ValueError, match="holds the cells the model is reading"):
                model.generate(n_cells=2, out=out, overwrite=True, progress_bar=False)
            with pytest.raises(ValueError, match="holds the cells the model is reading"):
                model.generate_anchored(data, n_cells=2, out=out, overwrite=True)
        assert sb.io.read_backed(tmp_path / name).n_obs == adata.n_obs
        # ...nor by the model loaded without them: it records the file it was trained from
        model.save(tmp_path / f"model_{name}")
        alone = sb.BranchedDiffusion.load(tmp_path / f"model_{name}")
        assert alone.adata is None and Path(alone.data_source_) == (tmp_path / name).resolve()
        with pytest.raises(ValueError, match="was trained from"):
            alone.generate(n_cells=2, out=tmp_path / name, overwrite=True, progress_bar=False)
        assert sb.io.read_backed(tmp_path / name).n_obs == adata.n_obs
    for k, v in models[0].items():
        np.testing.assert_array_equal(models[1][k], v, err_msg=k)


def test_scvi_fits_on_counts_on_disk_and_encodes_as_in_memory(tmp_path):
    adata = _counts_adata(n_per_type=40)
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 2, "b1", "b2"))
    path = tmp_path / "atlas.h5ad"
    adata.write_h5ad(path)
    before = _sha(path)
    backed = sb.io.read_backed(path)
    vae = sb.model.fit_scvi(backed, counts_layer=None, batch_key="batch", max_epochs=2, n_latent=4)
    from scbranch.model._scvi import latent_of, library_sizes_of, scvi_info

    info = scvi_info(vae)
    # the encoder applied block by block on disk = scVI's own encoding of the cells in memory
    np.testing.assert_allclose(
        latent_of(vae, backed, info), vae.get_latent_representation(adata.copy()), atol=1e-5
    )
    np.testing.assert_allclose(library_sizes_of(backed, info), adata.X.sum(1).A1)
    model = sb.BranchedDiffusion.from_scvi_model(
        vae, labels_key="cell_type", adata=backed, width=16
    )
    # the default tree's topology comes from the counts, read from disk block by block: the
    # same tree as from the cells in memory
    in_memory = sb.BranchedDiffusion.from_scvi_model(
        vae, labels_key="cell_type", adata=adata.copy(), width=16
    )
    assert model.hierarchy_record_["params"]["topology_target_sum"] == 1e4
    assert model.tree.to_newick() == in_memory.tree.to_newick()
    _train(model)
    gen = model.generate(5, seed=0, progress_bar=False)
    assert gen.layers["counts"].shape == (15, adata.n_vars)
    assert _sha(path) == before


def test_each_epoch_visits_every_cell_once_and_processes_split_every_batch():
    n = 103
    x = np.arange(n, dtype=np.float32)[:, None]
    fields = {"labels": np.zeros((n, 1), np.int64)}
    kwargs = dict(data_key="X", indices=np.arange(n), block_rows=10, blocks_per_buffer=3, seed=4)
    one = BlockShuffleBatches(x, fields, batch_size=20, **kwargs)
    epochs = [[b["X"].numpy().ravel() for b in one] for _ in range(2)]
    for batches in epochs:
        seen = np.concatenate(batches)
        assert len(batches) == n // 20 and len(np.unique(seen)) == len(seen) == 100
    # shuffled across blocks (not block by block), and differently every epoch
    assert not np.array_equal(np.concatenate(epochs[0]), np.concatenate(epochs[1]))
    assert np.abs(np.diff(np.concatenate(epochs[0]))).mean() > 10
    # two processes: each its own half of the same global batches, with the same noise key
    ranks = [
        BlockShuffleBatches(x, fields, batch_size=10, rank=r, world_size=2, **kwargs)
        for r in (0, 1)
    ]
    for b1, b0, b_1 in zip(
        BlockShuffleBatches(x, fields, batch_size=20, **kwargs), *ranks, strict=True
    ):
        np.testing.assert_array_equal(np.concatenate([b0["X"], b_1["X"]]), b1["X"])
        assert int(b0["noise_key"]) == int(b_1["noise_key"]) == int(b1["noise_key"])
        assert (int(b0["noise_offset"]), int(b_1["noise_offset"]), int(b0["noise_rows"])) == (
            0,
            10,
            20,
        )


def test_class_balance_in_blocks_matches_the_in_memory_resampling():
    labels = np.array([0] * 180 + [1] * 20)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(200)]
    data = BlockShuffleBatches(
        np.arange(200.0)[:, None], {"labels": labels[:, None]}, data_key="X",
        indices=np.arange(200), batch_size=10, class_labels=labels, class_balance=1.0,
        block_rows=16, blocks_per_buffer=2,
    )  # fmt: skip
    seen = np.concatenate([b["labels"].numpy().ravel() for b in data])
    expected = np.bincount(labels[balanced_indices(labels, 1.0, seed=0)])
    np.testing.assert_array_equal(np.bincount(seen), expected)  # 100 and 100: rare type x5


def test_row_matrix_statistics_and_rows_on_disk(tmp_path):
    x = sp.random(300, 7, density=0.4, format="csr", random_state=0, dtype=np.float32)
    ad.AnnData(X=x).write_h5ad(tmp_path / "m.h5ad")
    disk = ad.read_h5ad(tmp_path / "m.h5ad", backed="r").X
    m = RowMatrix(disk, transform=lambda b: b * 2, block_rows=64)
    mean, var = m.moments()
    dense = x.toarray().astype(np.float64) * 2
    np.testing.assert_allclose(mean, dense.mean(0), rtol=1e-10)
    np.testing.assert_allclose(var, dense.var(0), rtol=1e-9)
    rows = np.array([299, 3, 3, 150])
    np.testing.assert_allclose(m[rows].toarray(), dense[rows])


def test_bad_loader_choices_are_named(tmp_path):
    adata = _counts_adata(n_per_type=20)
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = sb.io.read_backed(tmp_path / "a.h5ad")
    sb.BranchedDiffusion.setup_anndata(backed, labels_key="cell_type", target_sum=1e4)
    model = sb.BranchedDiffusion(backed, width=16, n_head_blocks=1)
    with pytest.raises(ValueError, match="only loader='blocks' reads"):
        model.train(max_epochs=1, loader="scvi")
    with pytest.raises(ValueError, match="loader must be"):
        model.train(max_epochs=1, loader="fast")
    with pytest.raises(ValueError, match="fewer than one step's batch"):
        model.train(max_epochs=1, batch_size=1000, enable_progress_bar=False)
    dm = BlockDataModule(np.zeros((50, 2)), {}, data_key="X", batch_size=8)
    assert dm.n_train == 50 and len(dm.val_idx) == 0


def test_the_command_line_fits_an_atlas_left_on_disk(tmp_path):
    from scbranch.cli import main

    path = tmp_path / "atlas.h5ad"
    _counts_adata(n_per_type=30).write_h5ad(path)
    before = _sha(path)
    rc = main(
        ["fit", str(path), "--labels", "cell_type", "--backed", "--target-sum", "1e4",
         "--out", str(tmp_path / "model"), "--max-epochs", "1", "--batch-size", "16",
         "--width", "16", "-q"]
    )  # fmt: skip
    assert rc == 0 and _sha(path) == before
    model = sb.BranchedDiffusion.load(tmp_path / "model")
    assert model.space.target_sum == 1e4
    assert main(["fit", str(path), "--labels", "cell_type", "--target-sum", "1e4", "--rep",
                 "X_pca", "--out", str(tmp_path / "m2"), "-q"]) == 2  # fmt: skip


def test_per_branch_gaussians_streamed_from_disk_equal_those_in_memory(tmp_path):
    """``gaussian_skip="per_branch"`` takes one more pass over the cells: over a file's blocks
    it must give the Gaussians the same cells give in memory (eigenvalues; means)."""
    adata = _counts_adata()
    path = tmp_path / "atlas.h5ad"
    adata.write_h5ad(path)
    memory = adata.copy()
    sc.pp.normalize_total(memory, target_sum=1e4)
    sc.pp.log1p(memory)
    sb.BranchedDiffusion.setup_anndata(memory, labels_key="cell_type")
    in_memory = sb.BranchedDiffusion(memory, width=16, n_head_blocks=1, gaussian_skip="per_branch")
    backed = sb.io.read_backed(path)
    sb.BranchedDiffusion.setup_anndata(backed, labels_key="cell_type", target_sum=1e4)
    on_disk = sb.BranchedDiffusion(backed, width=16, n_head_blocks=1, gaussian_skip="per_branch")
    for name in ("skip_mean", "skip_var", "skip_prior"):
        np.testing.assert_allclose(
            getattr(on_disk.module, name), getattr(in_memory.module, name), rtol=1e-3, atol=1e-4
        )
    # the types differ, so their Gaussians do (the fit is not the global one)
    assert not torch.allclose(on_disk.module.skip_mean[0], on_disk.module.skip_mean[1])


def test_a_zarr_store_keeps_the_pca_loadings_and_graphs_a_model_decodes_with(tmp_path):
    # read_backed of a .zarr store dropped varm: a PCA model trained on it made cells without
    # genes, saying the data had no loadings
    adata = sb.datasets.pbmc68k()
    adata.obsp["connectivities"] = sp.eye(adata.n_obs, format="csr")  # as sc.pp.neighbors
    adata.write_h5ad(tmp_path / "p.h5ad")
    adata.write_zarr(tmp_path / "p.zarr")
    h5, zr = sb.io.read_backed(tmp_path / "p.h5ad"), sb.io.read_backed(tmp_path / "p.zarr")
    assert set(zr.varm) == set(h5.varm) == {"PCs"}
    assert set(zr.obsp) == set(h5.obsp) == {"connectivities"}
    np.testing.assert_array_equal(zr.varm["PCs"], adata.varm["PCs"])
    sb.BranchedDiffusion.setup_anndata(zr, labels_key="cell_type", obsm_key="X_pca")
    model = sb.BranchedDiffusion(zr, width=16, n_head_blocks=1)
    with pytest.warns(UserWarning, match="untrained model"):
        gen = model.generate(n_cells=2, progress_bar=False)
    assert gen.n_vars == adata.n_vars


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
@pytest.mark.parametrize("rep", ["X_pca", None])
def test_counts_layer_of_an_atlas_on_disk_gives_the_size_factors_of_memory(tmp_path, suffix, rep):
    # log-normalised .X left on disk with a counts layer: the size factors crashed inside numpy
    # ("setting an array element with a sequence"; zarr: "ufunc 'isfinite' not supported")
    adata = sb.datasets.pbmc68k()
    path = tmp_path / f"p{suffix}"
    adata.write_h5ad(path) if suffix == ".h5ad" else adata.write_zarr(path)
    factors = []
    for data in (adata, sb.io.read_backed(path)):
        sb.BranchedDiffusion.setup_anndata(
            data, labels_key="cell_type", obsm_key=rep, counts_layer="counts"
        )
        model = sb.BranchedDiffusion(data, width=16, n_head_blocks=1)
        factors.append(np.concatenate(model.space.counts.pools))
    np.testing.assert_allclose(factors[1], factors[0], rtol=1e-6)
    with pytest.warns(UserWarning, match="untrained model"):
        gen = model.generate(n_cells=2, counts=True, progress_bar=False)
    assert gen.layers["counts"].shape == (20, adata.n_vars)


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_branch_hierarchy_of_expression_on_disk_equals_memory(tmp_path, suffix):
    # .X on disk: the NaN check crashed ("ufunc 'isfinite' not supported")
    adata = sb.datasets.pbmc68k()
    path = tmp_path / f"p{suffix}"
    adata.write_h5ad(path) if suffix == ".h5ad" else adata.write_zarr(path)
    backed = sb.io.read_backed(path)
    sb.tl.branch_hierarchy(adata, groupby="cell_type")
    sb.tl.branch_hierarchy(backed, groupby="cell_type")
    key = "scbranch_hierarchy"
    assert backed.uns[key]["newick"] == adata.uns[key]["newick"]
    bad = adata.copy()
    bad.X[0, 0] = np.nan
    bad.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        sb.tl.branch_hierarchy(sb.io.read_backed(tmp_path / "bad.h5ad"), groupby="cell_type")


def test_branch_hierarchy_of_counts_with_target_sum_is_the_tree_the_model_reuses(tmp_path, caplog):
    adata = _counts_adata(n_per_type=40)
    adata.layers["counts"] = adata.X.copy()
    adata.write_h5ad(tmp_path / "atlas.h5ad")
    memory = adata.copy()
    sc.pp.normalize_total(memory, target_sum=1e4)
    sc.pp.log1p(memory)
    sb.tl.branch_hierarchy(memory, groupby="cell_type", curves="expected")
    expected = memory.uns["scbranch_hierarchy"]

    for data in (adata, sb.io.read_backed(tmp_path / "atlas.h5ad")):  # in memory and on disk
        sb.tl.branch_hierarchy(
            data, groupby="cell_type", layer="counts", target_sum=1e4, curves="expected"
        )
        record = data.uns["scbranch_hierarchy"]
        # the known answer: the tree of the normalised cells (scanpy normalises in float32)
        assert record["newick"] == expected["newick"]
        np.testing.assert_allclose(record["inter"], expected["inter"], rtol=1e-4, atol=1e-5)
        assert record["params"]["layer"] == "counts" and record["params"]["target_sum"] == 1e4

        # ...which the expression model of the same counts reuses instead of discovering
        sb.BranchedDiffusion.setup_anndata(
            data, labels_key="cell_type", layer="counts", target_sum=1e4
        )
        with caplog.at_level("INFO", logger="scbranch"):
            model = sb.BranchedDiffusion(data, width=16, n_head_blocks=1)
        assert "Using the hierarchy stored" in caplog.text
        assert model.tree.to_newick(4) == sb.tl.read_hierarchy(data)[0].to_newick(4)
        caplog.clear()

    # a tree of the raw counts is not reused, and the message names the argument that fits
    sb.tl.branch_hierarchy(adata, groupby="cell_type", layer="counts", key_added="raw")
    with pytest.raises(ValueError, match=r"rerun `sb.tl.branch_hierarchy\(\.\.\., target_sum=1"):
        sb.BranchedDiffusion(adata, hierarchy="raw", width=16, n_head_blocks=1)
    # the stored record is enough for branch_stability to rebuild the same matrix: with every
    # cell and no noise drawn, each replicate's times are the stored ones (raw counts' are not)
    table = sb.tl.branch_stability(
        adata, n_bootstrap=2, fraction=1.0, curves="expected", progress_bar=False
    )
    np.testing.assert_allclose(table["t_mean"], table["t"], atol=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"use_rep": "X_pca", "target_sum": 1e4}, "Drop `target_sum` or `use_rep`"),
        ({"target_sum": -1.0}, "target_sum must be a positive number"),
        ({"target_sum": True}, "target_sum must be a positive number"),
        ({"layer": "lognorm", "target_sum": 1e4}, "must hold raw counts"),
    ],
)
def test_branch_hierarchy_target_sum_bad_input(kwargs, match):
    adata = _counts_adata(n_per_type=10)
    adata.obsm["X_pca"] = np.zeros((adata.n_obs, 2))
    adata.layers["lognorm"] = np.log1p(adata.X.toarray())
    with pytest.raises(ValueError, match=match):
        sb.tl.branch_hierarchy(adata, groupby="cell_type", **kwargs)


@pytest.mark.parametrize("target_sum", [True, 0, -1.0, float("nan"), "1e4"])
def test_setup_anndata_target_sum_must_be_a_positive_number(target_sum):
    # True passed setup's check (a finite number above 0), where branch_hierarchy refused it
    adata = _counts_adata(n_per_type=10)
    with pytest.raises(ValueError, match="target_sum must be a positive number"):
        sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", target_sum=target_sum)


def test_a_zarr_store_removed_under_a_model_is_named_not_read_as_zeros(tmp_path):
    # zarr reads chunks that are gone as the fill value: the model trained on zeros silently
    import shutil

    _counts_adata(n_per_type=40).write_zarr(tmp_path / "a.zarr")
    data = sb.io.read_backed(tmp_path / "a.zarr")
    sb.BranchedDiffusion.setup_anndata(data, labels_key="cell_type", target_sum=1e4)
    model = sb.BranchedDiffusion(data, width=16, n_head_blocks=1)
    shutil.rmtree(tmp_path / "a.zarr")
    with pytest.raises(FileNotFoundError, match="a.zarr' these cells are read from is gone"):
        _train(model)
    with pytest.raises(FileNotFoundError, match="is gone"):  # and any other read of its rows
        sb.io._rows.read_rows(data.X, np.arange(3))
