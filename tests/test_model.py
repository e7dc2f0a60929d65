import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch

import scbranch as sb
from scbranch.datasets import simulate_tree


def _sim_adata(n_per_class=40, seed=0):
    sim = simulate_tree(depth=2, n_per_class=n_per_class, dim=8, seed=seed)
    return sim.to_anndata(labels_key="cell_type", obsm_key="X_latent")


def _pca_adata(n_per_class=40, n_genes=30, seed=0):
    """Log-normalised-looking expression whose PCA is stored the scanpy way."""
    rng = np.random.default_rng(seed)
    sim = simulate_tree(depth=2, n_per_class=n_per_class, dim=8, seed=seed)
    mixing = rng.normal(size=(8, n_genes)) / 3
    x = np.log1p(np.exp(sim.x @ mixing))  # positive, smooth
    adata = ad.AnnData(
        X=x.astype(np.float32),
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical([sim.classes[i] for i in sim.labels], sim.classes)},
            index=[f"c{i}" for i in range(len(x))],
        ),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )
    sc.pp.pca(adata, n_comps=6)
    return adata


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    adata = _sim_adata()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(adata, width=32, n_head_blocks=1)
    model.train(max_epochs=3, batch_size=64, accelerator="cpu", enable_progress_bar=False)
    return adata, model


def test_train_and_generate(trained):
    adata, model = trained
    assert model.is_trained
    assert "train_loss" in model.history
    gen = model.generate(n_cells=7, seed=0, progress_bar=False)
    assert gen.n_obs == 7 * 4
    assert list(gen.obs["cell_type"].cat.categories) == model.classes
    assert (gen.obs["cell_type"].value_counts() == 7).all()
    assert gen.obs[sb._keys.Key.obs.GENERATED].all()
    assert gen.obsm["X_latent"].shape == (28, 8)
    assert np.isfinite(gen.obsm["X_latent"]).all()
    assert gen.uns["scbranch"]["params"]["seed"] == 0
    assert gen is not adata and gen.n_obs != adata.n_obs


def test_generate_dict_and_subset(trained):
    _, model = trained
    gen = model.generate(n_cells={"c1": 5, "c3": 2}, seed=1, progress_bar=False)
    counts = gen.obs["cell_type"].value_counts()
    assert counts["c1"] == 5 and counts["c3"] == 2 and counts["c0"] == 0
    assert list(gen.obs["cell_type"].cat.categories) == model.classes  # all training categories
    gen2 = model.generate(n_cells=3, labels=["c2"], seed=1, progress_bar=False)
    assert set(gen2.obs["cell_type"]) == {"c2"}


def test_generate_deterministic_and_share_false_equals_per_class(trained):
    _, model = trained
    a = model.generate(n_cells=6, seed=3, progress_bar=False, share=False)
    b = model.generate(n_cells=6, seed=3, progress_bar=False, share=False)
    np.testing.assert_array_equal(a.obsm["X_latent"], b.obsm["X_latent"])
    alone = model.generate(n_cells={"c2": 6}, seed=3, progress_bar=False, share=False)
    np.testing.assert_array_equal(
        a.obsm["X_latent"][(a.obs["cell_type"] == "c2").to_numpy()], alone.obsm["X_latent"]
    )
    c = model.generate(n_cells=6, seed=4, progress_bar=False, share=False)
    assert not np.array_equal(a.obsm["X_latent"], c.obsm["X_latent"])


@pytest.mark.parametrize("save_anndata", [False, True])
def test_save_load_identical(trained, tmp_path, save_anndata):
    adata, model = trained
    model.save(tmp_path / "m", save_anndata=save_anndata)
    before = model.generate(n_cells=5, seed=11, progress_bar=False)
    loaded = sb.BranchedDiffusion.load(tmp_path / "m")
    after = loaded.generate(n_cells=5, seed=11, progress_bar=False)
    np.testing.assert_array_equal(before.obsm["X_latent"], after.obsm["X_latent"])
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, loaded.module.state_dict()[k]), k
    with_data = sb.BranchedDiffusion.load(tmp_path / "m", adata=adata.copy())
    again = with_data.generate(n_cells=5, seed=11, progress_bar=False)
    np.testing.assert_array_equal(before.obsm["X_latent"], again.obsm["X_latent"])
    assert loaded.tree.to_newick() == model.tree.to_newick()


def test_generated_h5ad_round_trip(trained, tmp_path):
    _, model = trained
    gen = model.generate(n_cells=4, seed=0, progress_bar=False)
    gen.write_h5ad(tmp_path / "g.h5ad")
    back = ad.read_h5ad(tmp_path / "g.h5ad")
    assert list(back.obs["cell_type"].cat.categories) == model.classes
    assert "hierarchy" in back.uns["scbranch"]
    tree = sb.module.BranchTree.from_dict(back.uns["scbranch"]["hierarchy"])
    assert tree.to_newick() == model.tree.to_newick()
    # the versions a seed reproduces the cells with, as installed here
    versions = dict(back.uns["scbranch"]["versions"])
    assert versions["torch"] == torch.__version__ and versions["numpy"] == np.__version__
    assert set(versions) == {"scbranch", "torch", "numpy", "scipy", "scvi-tools", "anndata"}


def test_user_adata_only_documented_changes():
    adata = _sim_adata()
    before_obs = adata.obs.copy()
    before_x = adata.obsm["X_latent"].copy()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    model.generate(n_cells=2, seed=0, progress_bar=False)
    np.testing.assert_array_equal(adata.obsm["X_latent"], before_x)
    added = set(adata.obs.columns) - set(before_obs.columns)
    assert added <= {"_scvi_labels"}  # scvi-tools' registration column, documented
    pd.testing.assert_series_equal(adata.obs["cell_type"], before_obs["cell_type"])


def test_hierarchy_reused_from_uns_and_rediscovered_on_mismatch(caplog):
    adata = _sim_adata()
    sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_latent", epsilon=0.01)
    stored = adata.uns["scbranch_hierarchy"]["newick"]
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(adata, width=16)
    assert model.tree.to_newick() == stored
    # a hierarchy computed with another forward process is not reused
    other = _sim_adata()
    sb.tl.branch_hierarchy(other, groupby="cell_type", use_rep="X_latent", beta1=30.0)
    sb.BranchedDiffusion.setup_anndata(other, labels_key="cell_type", obsm_key="X_latent")
    with pytest.raises(ValueError, match="different forward process"):
        sb.BranchedDiffusion(other, width=16, hierarchy="scbranch_hierarchy")
    model2 = sb.BranchedDiffusion(other, width=16)  # auto: rediscovers with the model's SDE
    assert model2.tree.n_branches == 7


def test_hierarchy_matches_truth_inside_model():
    adata = _sim_adata(n_per_class=60)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(adata, width=16)
    splits = {
        frozenset(model.tree.classes[c] for c in b.classes)
        for b in model.tree.branches
        if b.children
    }
    assert splits == simulate_tree(depth=2, n_per_class=60, dim=8, seed=0).true_splits
    # discovery options reach discovery and its record
    for options in ({"n_noise_draws": 4}, {"curves": "expected"}):
        other = sb.BranchedDiffusion(adata, width=16, discovery_kwargs=options)
        assert {k: other.hierarchy_record_["params"][k] for k in options} == options
        assert {
            frozenset(other.tree.classes[c] for c in b.classes)
            for b in other.tree.branches
            if b.children
        } == splits


def test_reregistration_after_other_model_setup():
    """scvi models share obs['_scvi_labels']; training must replay our registration."""
    import scvi

    adata = _sim_adata()
    adata.layers["counts"] = (
        np.random.default_rng(0).poisson(2, size=adata.shape).astype(np.float32)
    )
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    truth = adata.obs["cell_type"].cat.codes.to_numpy()
    scvi.model.SCVI.setup_anndata(adata, layer="counts")  # overwrites _scvi_labels with 0
    assert (adata.obs["_scvi_labels"] == 0).all()
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    np.testing.assert_array_equal(adata.obs["_scvi_labels"].to_numpy(), truth)


def test_pca_decoding_reconstructs_expression():
    adata = _pca_adata()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_pca")
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    dec = model.space.decoder
    assert dec is not None and dec["kind"] == "pca"
    # decoding the real PCs gives the PCA reconstruction of the real expression
    x = adata.X
    recon = sb.model._decoding.decode(dec, adata.obsm["X_pca"])
    mean = x.mean(0)
    pcs = adata.varm["PCs"]
    np.testing.assert_allclose(recon, (x - mean) @ pcs @ pcs.T + mean, atol=1e-4)
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    gen = model.generate(n_cells=3, seed=0, progress_bar=False)
    assert gen.shape == (12, adata.n_vars)
    assert list(gen.var_names) == list(adata.var_names)
    np.testing.assert_allclose(gen.X, sb.model._decoding.decode(dec, gen.obsm["X_pca"]), atol=1e-5)


def test_residual_noise_restores_what_the_pcs_leave_out():
    rng = np.random.default_rng(1)
    adata = _pca_adata(n_per_class=60)
    adata.X = adata.X + rng.normal(scale=0.3, size=adata.shape).astype(np.float32)
    sc.pp.pca(adata, n_comps=6)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_pca")
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    # the stored per-gene sd is that of the real cells' PCA residual
    x = adata.X
    recon = sb.model._decoding.decode(model.space.decoder, adata.obsm["X_pca"])
    np.testing.assert_allclose(model.space.decoder["residual_sd"], (x - recon).std(0), rtol=0.15)
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    plain = model.generate(n_cells=400, seed=0, progress_bar=False)
    noisy = model.generate(n_cells=400, seed=0, residual_noise=True, progress_bar=False)
    np.testing.assert_array_equal(plain.obsm["X_pca"], noisy.obsm["X_pca"])  # latent unchanged
    added = noisy.X - plain.X
    np.testing.assert_allclose(added.std(0), model.space.decoder["residual_sd"], rtol=0.1)
    assert abs(added.mean()) < 0.01
    assert noisy.uns["scbranch"]["params"]["residual_noise"] is True
    again = model.generate(n_cells=400, seed=0, residual_noise=True, progress_bar=False)
    np.testing.assert_array_equal(again.X, noisy.X)


def test_residual_noise_needs_a_pca_decoder(trained):
    _, model = trained
    with pytest.raises(ValueError, match="residual_noise applies to models that decode a PCA"):
        model.generate(n_cells=2, residual_noise=True, progress_bar=False)


def test_pca_of_other_data_is_not_decoded():
    adata = _pca_adata()
    adata.obsm["X_pca"] = adata.obsm["X_pca"] * 3.0  # not the PCA of .X any more
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_pca")
    with pytest.warns(UserWarning, match="is not the PCA"):
        model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    assert model.space.decoder is None
    gen = model.generate(n_cells=2, seed=0, progress_bar=False)
    assert gen.n_vars == 0 and gen.obsm["X_pca"].shape == (8, 6)


def test_pca_of_a_layer_decodes_into_that_layer(tmp_path):
    # a common layout: .X holds counts and the PCA was computed on a log-normalised layer
    adata = _pca_adata()
    lognorm = adata.X.copy()
    adata.layers["lognorm"] = lognorm
    adata.X = np.round(np.expm1(lognorm) * 10).astype(np.float32)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_pca")
    with pytest.warns(UserWarning, match="is not the PCA"):
        assert sb.BranchedDiffusion(adata, width=16, n_head_blocks=1).space.decoder is None
    sb.BranchedDiffusion.setup_anndata(
        adata, labels_key="cell_type", obsm_key="X_pca", layer="lognorm"
    )
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    dec = model.space.decoder
    assert dec is not None
    pcs, mean = adata.varm["PCs"], lognorm.mean(0)
    recon = sb.model._decoding.decode(dec, adata.obsm["X_pca"])
    np.testing.assert_allclose(recon, (lognorm - mean) @ pcs @ pcs.T + mean, atol=1e-4)
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    gen = model.generate(n_cells=3, seed=0, progress_bar=False)
    assert gen.shape == (12, adata.n_vars)
    np.testing.assert_allclose(gen.X, sb.model._decoding.decode(dec, gen.obsm["X_pca"]), atol=1e-5)
    assert gen.uns["scbranch"]["model"]["layer"] == "lognorm"
    model.save(tmp_path / "m")
    loaded = sb.BranchedDiffusion.load(tmp_path / "m", adata)
    again = loaded.generate(n_cells=3, seed=0, progress_bar=False)
    np.testing.assert_array_equal(again.X, gen.X)


def test_pca_with_a_layer_checks_the_layer():
    adata = _pca_adata()
    adata.layers["lognorm"] = adata.X.copy()
    with pytest.raises(KeyError, match="layer='nope' is not in adata.layers"):
        sb.BranchedDiffusion.setup_anndata(
            adata, labels_key="cell_type", obsm_key="X_pca", layer="nope"
        )
    adata.layers["lognorm"][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"adata.layers\['lognorm'\] contains 1 NaN"):
        sb.BranchedDiffusion.setup_anndata(
            adata, labels_key="cell_type", obsm_key="X_pca", layer="lognorm"
        )
    assert "_scvi_uuid" not in adata.uns  # refused before anything is registered


def test_expression_space_model():
    adata = _pca_adata()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type")
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    gen = model.generate(n_cells=3, seed=0, progress_bar=False)
    assert gen.shape == (12, adata.n_vars)
    assert list(gen.var_names) == list(adata.var_names)


def test_expression_space_on_many_genes_points_to_the_pca_space(caplog):
    from scbranch.model._spaces import EXPRESSION_ADVICE_GENES

    small = _pca_adata()
    sb.BranchedDiffusion.setup_anndata(small, labels_key="cell_type")
    with caplog.at_level("WARNING", logger="scbranch"):
        sb.BranchedDiffusion(small, width=16, n_head_blocks=1)
    assert "Diffusing" not in caplog.text  # a small panel is what the space is for
    many = _pca_adata(n_per_class=10, n_genes=EXPRESSION_ADVICE_GENES + 1)
    sb.BranchedDiffusion.setup_anndata(many, labels_key="cell_type")
    with caplog.at_level("WARNING", logger="scbranch"):
        sb.BranchedDiffusion(many, width=16, n_head_blocks=1)
    assert f"Diffusing {EXPRESSION_ADVICE_GENES + 1} genes" in caplog.text
    assert "pca_out_of_fold" in caplog.text


def test_flat_architecture():
    adata = _sim_adata()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    branched = sb.BranchedDiffusion(adata, width=32, n_head_blocks=1, architecture="branched")
    flat = sb.BranchedDiffusion(adata, width=32, n_head_blocks=1, architecture="flat")
    n_b = sum(p.numel() for p in branched.module.parameters())
    n_f = sum(p.numel() for p in flat.module.parameters())
    assert abs(n_f - n_b) / n_b < 0.1
    flat.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    gen = flat.generate(n_cells=3, seed=0, progress_bar=False)
    assert gen.n_obs == 12 and gen.uns["scbranch"]["model"]["architecture"] == "flat"


def test_class_balance_oversamples_rare_types():
    from scbranch.model._data import balanced_indices

    labels = np.array([0] * 90 + [1] * 10)
    idx = balanced_indices(labels, 1.0, seed=0)
    assert np.bincount(labels[idx]).tolist() == [50, 50]
    assert set(np.flatnonzero(labels == 1)) <= set(idx)  # no rare cell dropped
    assert np.array_equal(balanced_indices(labels, 0.0, seed=0).size, 100)
    adata = _sim_adata()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False, class_balance=0.5)
    assert model.is_trained


def test_class_balance_resamples_every_epoch_so_every_cell_is_trained_on(monkeypatch):
    # one resample drawn once left the same cells of every large type out for good
    from scbranch.model import _data

    adata = _sim_adata()
    keep = np.ones(adata.n_obs, bool)
    keep[np.flatnonzero(adata.obs["cell_type"].to_numpy() == "c0")[10:]] = False  # rare type
    adata = adata[keep].copy()
    loaders = []
    build = _data.ResamplingDataSplitter.train_dataloader

    def spy(self):
        loader = build(self)
        loaders.append((self.trainer.current_epoch, self.train_idx[:], loader.indices))
        return loader

    monkeypatch.setattr(_data.ResamplingDataSplitter, "train_dataloader", spy)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    model.train(max_epochs=6, loader="scvi", enable_progress_bar=False, class_balance=0.5)
    assert [epoch for epoch, _, _ in loaders] == list(range(6))  # one resample per epoch
    labels = adata.obs["_scvi_labels"].to_numpy()
    for epoch, train_idx, indices in loaders:  # epoch k: the resample seeded [0, k]
        expected = train_idx[_data.balanced_indices(labels[train_idx], 0.5, [0, epoch])]
        assert np.array_equal(indices, expected)
    large = np.bincount(labels).argmax()
    members = set(np.flatnonzero(labels == large))
    assert not members <= set(loaders[0][2])  # one epoch shows a subset of the large type...
    assert members <= set(np.concatenate([i for _, _, i in loaders]))  # ...the epochs all of it


# ---------------------------------------------------------------------------- bad input
def test_unknown_keys_raise():
    adata = _sim_adata()
    with pytest.raises(KeyError, match="labels_key='celltype'.*Available columns"):
        sb.BranchedDiffusion.setup_anndata(adata, labels_key="celltype", obsm_key="X_latent")
    with pytest.raises(KeyError, match="obsm_key='X_umap'"):
        sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_umap")
    with pytest.raises(KeyError, match="layer='counts'"):
        sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", layer="counts")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_raise(bad):
    adata = _sim_adata()
    adata.obsm["X_latent"][3, 2] = bad
    with pytest.raises(ValueError, match=r"adata.obsm\['X_latent'\] contains 1 NaN or infinite"):
        sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")


def test_missing_labels_raise():
    adata = _sim_adata()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object)
    adata.obs.iloc[0, 0] = np.nan
    with pytest.raises(ValueError, match="1 missing value"):
        sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")


def test_single_cell_class_raises():
    adata = _sim_adata()
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    labels[0] = "lonely"
    adata.obs["cell_type"] = pd.Categorical(labels)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    with pytest.raises(ValueError, match=r"'lonely' \(1 cell\).*fewer than 3 cells"):
        sb.BranchedDiffusion(adata, width=16)
    with pytest.raises(ValueError, match=r"'lonely' \(1 cell\)"):
        sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_latent")
    # a continuous column named as the labels: a few classes named, not every value
    adata.obs["n_counts"] = np.arange(adata.n_obs, dtype=float) / 7
    many = r"and \d+ more of .*\(\d+ classes: is it the cell-type"
    with pytest.raises(ValueError, match=many) as err:
        sb.tl.branch_hierarchy(adata, groupby="n_counts", use_rep="X_latent")
    assert len(str(err.value)) < 1000


def test_unknown_label_in_generate(trained):
    _, model = trained
    with pytest.raises(KeyError, match="Unknown label.*'Megakaryocyte'"):
        model.generate(n_cells={"Megakaryocyte": 3}, progress_bar=False)
    with pytest.raises(KeyError, match="Unknown label"):
        model.generate(n_cells=3, labels=["c0", "nope"], progress_bar=False)
    with pytest.raises(ValueError, match="Unknown solver"):
        model.generate(n_cells=3, solver="rk4", progress_bar=False)


def test_missing_and_corrupt_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model directory"):
        sb.BranchedDiffusion.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not .*a saved scbranch model"):
        sb.BranchedDiffusion.load(tmp_path / "empty")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "model.json").write_bytes(b"not a model")
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        sb.BranchedDiffusion.load(tmp_path / "corrupt")


def test_damaged_or_newer_model_files_get_errors_naming_the_fix(trained, tmp_path):
    import json
    import shutil

    _, model = trained
    model.save(tmp_path / "good")
    # bytes of the array file overwritten (a bad CRC) and the file truncated: "corrupt"
    for name, damage in (
        ("crc", lambda b: b[:400] + b"\0" * 200 + b[600:]),
        ("cut", lambda b: b[:300]),
    ):
        shutil.copytree(tmp_path / "good", tmp_path / name)
        npz = tmp_path / name / "model.npz"
        npz.write_bytes(damage(npz.read_bytes()))
        with pytest.raises(ValueError, match="not a plain array file.*corrupt, partial"):
            sb.BranchedDiffusion.load(tmp_path / name)
    # an intact model of a newer format: the fix is to upgrade, not to retrain
    for name, edit in (
        ("newer_model", lambda doc: doc["content"].update(format_version=99)),
        ("newer_file", lambda doc: doc.update(version=99)),
    ):
        shutil.copytree(tmp_path / "good", tmp_path / name)
        path = tmp_path / name / "model.json"
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match="upgrade scbranch") as info:
            sb.BranchedDiffusion.load(tmp_path / name)
        assert "retrain" not in str(info.value) and ".." not in str(info.value)


def test_cell_counts_must_be_whole_numbers(trained):
    _, model = trained
    for bad in (2.5, True, {"c1": 2.9}, {"c1": -1}):
        with pytest.raises(ValueError, match="must be (a whole number|non-negative)"):
            model.generate(n_cells=bad, progress_bar=False)
    gen = model.generate(n_cells={"c1": np.int64(2), "c2": 3.0}, seed=0, progress_bar=False)
    assert gen.obs["cell_type"].value_counts()[["c1", "c2"]].tolist() == [2, 3]


def test_an_untrained_model_warns_before_generating():
    adata = _sim_adata(n_per_class=15)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    cells = adata[adata.obs["cell_type"] == "c0"]
    with pytest.warns(UserWarning, match="Generating with an untrained model.*model.train"):
        model.generate(n_cells=2, progress_bar=False)
    with pytest.warns(UserWarning, match="Transmuting with an untrained model"):
        model.transmute(cells, target="c1", progress_bar=False)
    with pytest.warns(UserWarning, match="from anchors with an untrained model"):
        model.generate_anchored(cells, n_cells=2, progress_bar=False)


def test_save_refuses_to_overwrite(trained, tmp_path):
    _, model = trained
    model.save(tmp_path / "m")
    with pytest.raises(FileExistsError, match="already exists"):
        model.save(tmp_path / "m")


def test_tl_generate_mirrors_model(trained):
    _, model = trained
    a = sb.tl.generate(model, n_cells=3, seed=2, progress_bar=False)
    b = model.generate(n_cells=3, seed=2, progress_bar=False)
    np.testing.assert_array_equal(a.obsm["X_latent"], b.obsm["X_latent"])


def test_pca_decoding_on_a_subset_of_the_pca_cells():
    """A train split of the cells the PCA was fitted on still decodes (the demo's case)."""
    full = _pca_adata()
    sub = full[::2].copy()
    sb.BranchedDiffusion.setup_anndata(sub, labels_key="cell_type", obsm_key="X_pca")
    model = sb.BranchedDiffusion(sub, width=16, n_head_blocks=1)
    dec = model.space.decoder
    assert dec is not None
    pcs = full.varm["PCs"]
    full_mean = full.X.mean(0)
    recon = sb.model._decoding.decode(dec, sub.obsm["X_pca"])
    # decoded cells sit exactly where they came from in the original PCA ...
    np.testing.assert_allclose((recon - full_mean) @ pcs, sub.obsm["X_pca"], atol=1e-4)
    # ... and off the PC span they take the mean expression of these cells
    off_span = np.eye(full.n_vars) - pcs @ pcs.T
    np.testing.assert_allclose(
        recon @ off_span, np.tile(sub.X.mean(0) @ off_span, (sub.n_obs, 1)), atol=1e-4
    )


def test_quality_report_known_answers():
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b"], 1000)

    def cells(scale):
        x = np.r_[rng.normal(0, scale, (1000, 2)), rng.normal(10, scale, (1000, 2))]
        data = ad.AnnData(obs=pd.DataFrame({"t": labels}, index=[f"c{i}" for i in range(2000)]))
        data.obsm["rep"] = x
        return data

    train, held, gen = cells(1.0), cells(1.0), cells(2.0)
    report = sb.metrics.quality_report(gen, train, held, labels_key="t", use_rep="rep")
    assert report["knn_control"].tolist() == [1.0, 1.0]  # well separated types
    np.testing.assert_allclose(report["spread_vs_heldout"], 2.0, rtol=0.08)
    with pytest.raises(KeyError, match="no 'X_pca'"):
        sb.metrics.quality_report(gen, train, held, labels_key="t", use_rep="X_pca")


def test_generated_h5ad_has_no_slash_keys(tmp_path):
    """Labels like 'CD4+/CD25' must not become h5 keys (anndata will disallow slashes)."""
    adata = _sim_adata()
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.rename_categories(lambda c: f"{c}+/sub")
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    gen = model.generate(n_cells={"c0+/sub": 2, "c3+/sub": 1}, seed=0, progress_bar=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        gen.write_h5ad(tmp_path / "g.h5ad")
    back = ad.read_h5ad(tmp_path / "g.h5ad")
    params = back.uns["scbranch"]["params"]
    assert list(params["labels"]) == ["c0+/sub", "c3+/sub"]
    assert list(params["n_cells"]) == [2, 1]


def test_generate_solver_aliases_batches_and_pc(trained):
    _, model = trained
    kw = dict(n_cells=9, seed=4, n_steps=8, progress_bar=False)
    heun = model.generate(solver="heun", **kw)
    np.testing.assert_array_equal(
        model.generate(solver="ode", **kw).obsm["X_latent"], heun.obsm["X_latent"]
    )
    # the same cells up to float rounding (BLAS sums in a different order on smaller batches)
    np.testing.assert_allclose(
        model.generate(solver="heun", batch_size=5, **kw).obsm["X_latent"],
        heun.obsm["X_latent"],
        atol=1e-5,
    )
    assert model.generate(solver="sde", **kw).uns["scbranch"]["params"]["solver"] == "em"
    pc = model.generate(solver="pc", **kw)
    assert np.isfinite(pc.obsm["X_latent"]).all()
    assert pc.uns["scbranch"]["params"]["n_network_calls"] == 2 * 8 + 1
    with pytest.raises(ValueError, match="Unknown solver 'rk4'"):
        model.generate(solver="rk4", **kw)


@pytest.mark.parametrize(("n_per_class", "epochs"), [(10, 1000), (800, 100)])
def test_default_budget_is_100_epochs_within_step_bounds(n_per_class, epochs):
    # 4 classes: 40 cells are 1 step an epoch at batch 64, so the 1,000-step floor gives 1,000
    # epochs; 3,200 cells are 50 steps an epoch, so 100 epochs are 5,000 steps, inside the
    # bounds (docs/benchmarks/budget_curve.md)
    adata = _sim_adata(n_per_class=n_per_class)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    model.train(batch_size=64, accelerator="cpu", enable_progress_bar=False, max_steps=2)
    assert model.trainer.max_epochs == epochs


def test_default_budget_caps_steps_for_large_data():
    from scbranch.module._recipe import MAX_DEFAULT_STEPS, MIN_DEFAULT_STEPS, default_max_epochs

    # 100,000 cells are 1,563 steps an epoch: 100 epochs would be 156,300 steps
    epochs = default_max_epochs(100_000, 64)
    assert epochs == 11 and (epochs - 1) * 1563 < MAX_DEFAULT_STEPS <= epochs * 1563
    # the budget grows with the cells until the cap: steps never fall as cells are added
    steps = [default_max_epochs(n, 64) * -(-n // 64) for n in (40, 351, 1318, 5600, 22400)]
    assert steps == sorted(steps) and steps[0] >= MIN_DEFAULT_STEPS
    # pbmc68k_reduced's 351 train cells: the floor (167 epochs of 6 steps); pbmc3k's 1,318:
    # 100 epochs, above it
    assert steps[1:] == [1002, 2100, 8800, 16100]


def test_load_with_genes_in_another_order_names_the_subset(tmp_path):
    adata = _pca_adata()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_pca")
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match=r"in another order.*model.get_var_names\(\)"):
        sb.BranchedDiffusion.load(tmp_path / "m", adata=adata[:, ::-1].copy())
    wider = ad.AnnData(
        np.c_[adata.X, adata.X[:, :1]],
        obs=adata.obs,
        var=pd.DataFrame(index=[*adata.var_names, "extra"]),
        obsm={"X_pca": adata.obsm["X_pca"]},
    )
    with pytest.raises(ValueError, match="and 1 more"):
        sb.BranchedDiffusion.load(tmp_path / "m", adata=wider)
    with pytest.raises(ValueError, match=r"1 of its 30 genes are missing \(e.g. \['g0'\]\)"):
        sb.BranchedDiffusion.load(tmp_path / "m", adata=adata[:, 1:].copy())
    loaded = sb.BranchedDiffusion.load(tmp_path / "m")
    assert list(loaded.get_var_names()) == list(adata.var_names)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_a_seed_that_is_not_a_whole_number_is_named(trained, seed):
    # numpy said only "expected non-negative integer" for -1, and 1.5 ran as 1
    _, model = trained
    with pytest.raises(ValueError, match="seed must be a whole number >= 0"):
        model.generate(n_cells=2, seed=seed, progress_bar=False)


@pytest.mark.parametrize("as_categorical", [True, False])
def test_integer_cluster_ids_as_labels_train_and_generate(as_categorical):
    # leiden codes or cat.codes: the registry keeps them as integers, the model names them
    # as text; training refused them as "added with add_classes" before
    adata = _sim_adata()
    codes = adata.obs["cell_type"].cat.codes.to_numpy()
    adata.obs["cell_type"] = pd.Categorical(codes) if as_categorical else codes
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    assert model.classes == [str(c) for c in sorted(set(codes))]
    gen = model.generate(n_cells={"1": 3}, seed=0, progress_bar=False)
    assert list(gen.obs["cell_type"].astype(str)) == ["1"] * 3


def test_the_setup_views_inherited_from_scvi_tools_print(capsys):
    adata = _sim_adata()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    model.view_anndata_setup(hide_state_registries=True)
    model.view_setup_method_args()
    assert "labels_key" in capsys.readouterr().out


def test_requests_read_as_users_write_them(trained):
    adata, model = trained
    one = model.classes[1]
    # one type as a string is that type, not its letters (they were read as labels 'c', ...)
    gen = model.generate(2, labels=one, seed=0, progress_bar=False)
    assert list(gen.obs["cell_type"].astype(str)) == [one, one]
    # value_counts() counts as a dict
    asked = adata.obs["cell_type"].value_counts().iloc[:2] // 20
    gen = model.generate(asked, seed=0, progress_bar=False)
    assert gen.obs["cell_type"].value_counts()[asked.index].tolist() == asked.tolist()
    with pytest.raises(ValueError, match="labels="):
        model.generate([one, model.classes[0]], progress_bar=False)
    with pytest.raises(ValueError, match="more than once"):
        model.generate(2, labels=[one, one], progress_bar=False)
