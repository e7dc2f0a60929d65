"""Count-level output: scVI latent space, expression space and PCA space (issue: counts)."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scbranch as sb
from scbranch.model._counts import (
    counts_from_expression,
    log_normalize,
    size_factors,
)
from scbranch.model._scvi import decode_latents, expected_log_counts

LABELS = "cell_type"
FAST_MODEL = {"width": 32, "n_head_blocks": 1}


def _pbmc(n_genes: int = 200) -> ad.AnnData:
    """pbmc68k on its most expressed genes (small and quick for scVI)."""
    adata = sb.datasets.pbmc68k()
    top = np.argsort(-np.asarray(adata.layers["counts"].sum(0)).ravel())[:n_genes]
    return adata[:, np.sort(top)].copy()


def _is_counts(m) -> bool:
    values = m.data if sp.issparse(m) else np.asarray(m)
    return bool(values.min() >= 0 and np.all(values == np.round(values)))


@pytest.fixture(scope="module")
def scvi_model_and_data():
    import scvi

    scvi.settings.seed = 0
    adata = _pbmc()
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 3 == 0, "b1", "b0"))
    vae = sb.model.fit_scvi(adata, counts_layer="counts", batch_key="batch", max_epochs=3)
    model = sb.BranchedDiffusion.from_scvi_model(vae, labels_key=LABELS, adata=adata, **FAST_MODEL)
    model.train(max_epochs=2, enable_progress_bar=False)
    return vae, model, adata


def test_fit_scvi_leaves_the_users_anndata_alone():
    adata = _pbmc()
    before = (list(adata.obs.columns), list(adata.uns), list(adata.obsm), list(adata.layers))
    vae = sb.model.fit_scvi(adata, counts_layer="counts", max_epochs=1)
    assert (
        list(adata.obs.columns),
        list(adata.uns),
        list(adata.obsm),
        list(adata.layers),
    ) == before
    model = sb.BranchedDiffusion.from_scvi_model(vae, labels_key=LABELS, adata=adata, **FAST_MODEL)
    # documented keys only: the latent, and the scvi-tools registration of our own model
    assert "X_scVI" in adata.obsm and model.scvi_model is vae
    np.testing.assert_allclose(adata.obsm["X_scVI"], vae.get_latent_representation(), atol=1e-5)


def test_scvi_generation_gives_counts_scale_and_lognormalised_x(scvi_model_and_data):
    _, model, adata = scvi_model_and_data
    gen = model.generate(n_cells=30, seed=0, progress_bar=False)
    counts = gen.layers["counts"]
    assert sp.issparse(counts) and _is_counts(counts) and counts.sum() > 0
    np.testing.assert_allclose(gen.layers["scale"].sum(1), 1.0, rtol=1e-4)
    np.testing.assert_allclose(gen.X.toarray(), log_normalize(counts).toarray(), rtol=1e-6)
    assert list(gen.var_names) == list(adata.var_names)
    assert gen.obsm["X_scVI"].shape == (300, 10)
    # library sizes come from the requested class's real cells
    real_libs = np.asarray(adata.layers["counts"].sum(1)).ravel()
    for label in ["CD19+ B", "Dendritic"]:
        libs = gen.obs.loc[gen.obs[LABELS] == label, "scbranch_library_size"]
        assert set(libs) <= set(real_libs[(adata.obs[LABELS] == label).to_numpy()])
    # most common batch by default, any batch on request
    assert (gen.obs["batch"] == "b0").all()
    other = model.generate(n_cells=5, seed=0, batch="b1", progress_bar=False)
    assert (other.obs["batch"] == "b1").all()
    np.testing.assert_array_equal(
        other.obsm["X_scVI"], model.generate(n_cells=5, seed=0, progress_bar=False).obsm["X_scVI"]
    )
    assert gen.uns["scbranch"]["params"]["batch"] == "b0"


def test_scvi_generation_without_counts_gives_the_expected_log_normalised_counts(
    scvi_model_and_data, tmp_path
):
    _, model, _ = scvi_model_and_data
    one_draw = model.generate(n_cells=200, seed=3, progress_bar=False)
    mean = model.generate(n_cells=200, seed=3, counts=False, progress_bar=False)
    # the same latents and library sizes, no counts kept; scVI's normalised expression stays
    np.testing.assert_array_equal(mean.obsm["X_scVI"], one_draw.obsm["X_scVI"])
    np.testing.assert_array_equal(
        mean.obs["scbranch_library_size"], one_draw.obs["scbranch_library_size"]
    )
    assert set(mean.layers) == {"scale"} and mean.uns["scbranch"]["params"]["counts"] is False
    np.testing.assert_array_equal(mean.layers["scale"], one_draw.layers["scale"])
    # known answer: over cells, an expectation's gene means are those of single draws of the
    # same latents (2,000 cells; a gene's log-normalised values spread by about 2, so its
    # mean to about 0.05), and each cell spreads less
    x_one = one_draw.X.toarray()
    gap = np.abs(mean.X.mean(0) - x_one.mean(0)).mean()
    assert gap < 0.08
    assert np.var(mean.X, axis=1).mean() < np.var(x_one, axis=1).mean()
    # the log of the decoder's mean is not that expectation: it lies above the draws (measured
    # 1.36 here, against a gap of 0.04 for the expectation)
    log_of_mean = np.log1p(1e4 * mean.layers["scale"]).mean(0)
    assert (log_of_mean - x_one.mean(0)).mean() > 0.5
    # written to disk, the declared layers are the ones made
    path = model.generate(
        n_cells=5, seed=3, counts=False, out=tmp_path / "mean.h5ad", progress_bar=False
    )
    assert set(ad.read_h5ad(path).layers) == {"scale"}
    # asking for the counts layer without counts names both
    with pytest.raises(ValueError, match=r"makes no layer \['counts'\].*it makes \['scale'\]"):
        model.generate(n_cells=2, counts=False, layers=["counts"], progress_bar=False)


def test_scvi_round_trip_without_data_gives_identical_counts(scvi_model_and_data, tmp_path):
    _, model, adata = scvi_model_and_data
    before = model.generate(n_cells=20, seed=3, progress_bar=False)
    model.save(tmp_path / "m")
    assert (tmp_path / "m" / "scvi" / "model.safetensors").is_file()
    loaded = sb.BranchedDiffusion.load(tmp_path / "m")
    assert loaded.adata is None and loaded.scvi_model is not None
    after = loaded.generate(n_cells=20, seed=3, progress_bar=False)
    assert (after.layers["counts"] != before.layers["counts"]).nnz == 0
    np.testing.assert_array_equal(after.layers["scale"], before.layers["scale"])
    after.write_h5ad(tmp_path / "gen.h5ad")
    back = ad.read_h5ad(tmp_path / "gen.h5ad")
    assert (back.layers["counts"] != before.layers["counts"]).nnz == 0
    # trajectories' library is the training cells' median, saved, and a new type leaves it
    totals = np.asarray(adata.layers["counts"].sum(1), dtype=np.float32).ravel()
    assert loaded.space.estimate_library == model.space.estimate_library == np.median(totals)
    new = adata[:40].copy()
    new.obs[LABELS] = pd.Categorical(["new type"] * 40)
    loaded.add_classes(new, labels=["new type"], max_epochs=1, progress_bar=False)
    assert loaded.space.estimate_library == model.space.estimate_library


def test_linear_scvi_saves_and_loads(tmp_path):
    adata = _pbmc(100)
    vae = sb.model.fit_scvi(adata, counts_layer="counts", linear=True, max_epochs=1)
    model = sb.BranchedDiffusion.from_scvi_model(vae, labels_key=LABELS, adata=adata, **FAST_MODEL)
    before = model.generate(n_cells=5, seed=0, progress_bar=False)
    model.save(tmp_path / "lin")
    after = sb.BranchedDiffusion.load(tmp_path / "lin").generate(
        n_cells=5, seed=0, progress_bar=False
    )
    assert type(vae).__name__ == "LinearSCVI"
    assert (after.layers["counts"] != before.layers["counts"]).nnz == 0


def test_scvi_model_refuses_data_with_other_genes(scvi_model_and_data, tmp_path):
    vae, model, adata = scvi_model_and_data
    other = adata[:, 5:].copy()
    del other.obsm["X_scVI"]
    with pytest.raises(ValueError, match="5 of its 200 genes are missing"):
        sb.BranchedDiffusion.from_scvi_model(vae, labels_key=LABELS, adata=other)
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="genes of adata do not match"):
        sb.BranchedDiffusion.load(tmp_path / "m", adata=other)
    # the same genes in another order are found and reordered
    shuffled = adata[:, adata.var_names[::-1]].copy()
    del shuffled.obsm["X_scVI"]
    sb.BranchedDiffusion.from_scvi_model(vae, labels_key=LABELS, adata=shuffled, **FAST_MODEL)


def test_from_scvi_model_without_adata_names_the_fix_when_labels_are_missing(
    scvi_model_and_data,
):
    vae, _, _ = scvi_model_and_data  # fit_scvi's model holds a counts-only copy
    with pytest.raises(KeyError, match=r"the scVI model holds.*adata=adata"):
        sb.BranchedDiffusion.from_scvi_model(vae, labels_key=LABELS)


def test_loading_an_scvi_model_onto_new_cells_writes_their_latent(scvi_model_and_data, tmp_path):
    # api.md: load(dir, adata) of an scVI-space model writes the latent it diffuses; new cells
    # have no obsm["X_scVI"] (it failed asking for `sc.pp.pca`)
    vae, model, adata = scvi_model_and_data
    model.save(tmp_path / "m")
    new = adata[::2].copy()
    del new.obsm["X_scVI"]
    loaded = sb.BranchedDiffusion.load(tmp_path / "m", adata=new)
    np.testing.assert_allclose(
        new.obsm["X_scVI"], vae.get_latent_representation(new), rtol=1e-4, atol=1e-5
    )
    assert loaded.adata is new
    # an existing entry is checked, never overwritten
    wrong = adata[::2].copy()
    wrong.obsm["X_scVI"] = wrong.obsm["X_scVI"] + 1.0
    with pytest.raises(ValueError, match="not this scVI model's latent"):
        sb.BranchedDiffusion.load(tmp_path / "m", adata=wrong)


def test_non_count_data_is_refused_where_counts_are_needed(scvi_model_and_data):
    vae, _, adata = scvi_model_and_data
    lognorm = adata.copy()
    del lognorm.obsm["X_scVI"]
    lognorm.layers["counts"] = lognorm.X.copy()
    with pytest.raises(ValueError, match="must hold raw counts.*non-integer"):
        sb.model.fit_scvi(lognorm, counts_layer="counts")
    with pytest.raises(ValueError, match="must hold raw counts") as info:
        sb.BranchedDiffusion.from_scvi_model(vae, labels_key=LABELS, adata=lognorm)
    # from_scvi_model has no counts_layer: the message says where scVI reads its counts
    assert "The scVI model reads raw counts from adata.layers['counts']" in str(info.value)
    assert "counts_layer" not in str(info.value)
    with pytest.raises(ValueError, match="must hold raw counts"):
        sb.model.fit_scvi(adata, counts_layer=None)  # .X is log-normalised
    with pytest.raises(KeyError, match="counts_layer='raw'"):
        sb.model.fit_scvi(adata, counts_layer="raw")
    negative = adata.copy()
    negative.layers["counts"] = negative.layers["counts"] * -1.0
    with pytest.raises(ValueError, match="negative values"):
        sb.model.fit_scvi(negative, counts_layer="counts")


def test_scvi_bad_input(scvi_model_and_data):
    import scvi

    vae, model, adata = scvi_model_and_data
    fresh = adata.copy()
    fresh.obsm["X_scVI"] = np.zeros((fresh.n_obs, 10), dtype=np.float32)
    with pytest.raises(ValueError, match="exists and is not this scVI model's latent"):
        sb.BranchedDiffusion.from_scvi_model(vae, labels_key=LABELS, adata=fresh)
    sb.BranchedDiffusion.setup_anndata(fresh, labels_key=LABELS, obsm_key="X_scVI")
    with pytest.raises(ValueError, match="is not the scVI model's latent mean"):
        sb.BranchedDiffusion(fresh, scvi_model=vae)
    with pytest.raises(ValueError, match="Unknown batch 'b7'"):
        model.generate(n_cells=2, batch="b7", progress_bar=False)
    with pytest.raises(TypeError, match="must be a trained scvi.model.SCVI"):
        sb.BranchedDiffusion.from_scvi_model(object(), labels_key=LABELS, adata=adata)
    untrained_data = adata.copy()
    scvi.model.SCVI.setup_anndata(untrained_data, layer="counts")
    with pytest.raises(ValueError, match="not trained yet"):
        sb.BranchedDiffusion.from_scvi_model(scvi.model.SCVI(untrained_data), labels_key=LABELS)
    covariates = adata.copy()
    scvi.model.SCVI.setup_anndata(covariates, layer="counts", categorical_covariate_keys=["batch"])
    with_covs = scvi.model.SCVI(covariates, n_latent=4)
    with_covs.train(max_epochs=1, enable_progress_bar=False)
    with pytest.raises(ValueError, match="categorical_covariate_keys"):
        sb.BranchedDiffusion.from_scvi_model(with_covs, labels_key=LABELS)


def test_missing_scvi_directory_is_reported(scvi_model_and_data, tmp_path):
    import shutil

    _, model, _ = scvi_model_and_data
    model.save(tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "scvi")
    with pytest.raises(ValueError, match="holds no .*: the model directory is partial"):
        sb.BranchedDiffusion.load(tmp_path / "m")


# ----------------------------------------------------------------------------- size factors
def test_size_factors_known_answer_and_exact_inverse():
    adata = sb.datasets.pbmc68k()
    factors = size_factors(adata.layers["counts"], adata.X)
    np.testing.assert_allclose(factors, adata.obs["n_counts"] / 1e4, rtol=1e-4)
    back = counts_from_expression(adata.X.toarray(), factors, np.random.default_rng(0))
    assert abs(back - adata.layers["counts"]).max() == 0  # real cells map back to their counts
    with pytest.raises(ValueError, match="do not match"):
        size_factors(adata.layers["counts"][::-1], adata.X)  # counts of other cells


def test_expression_space_counts_and_valid_range():
    adata = _pbmc(100)
    assert sp.issparse(adata.X)  # sparse input is used as is
    sb.BranchedDiffusion.setup_anndata(adata, labels_key=LABELS, counts_layer="counts")
    model = sb.BranchedDiffusion(adata, **FAST_MODEL)
    model.train(max_epochs=1, enable_progress_bar=False)
    plain = model.generate(n_cells=10, seed=0, progress_bar=False)
    assert plain.X.min() >= 0 and "counts" not in plain.layers
    gen = model.generate(n_cells=10, seed=0, counts=True, progress_bar=False)
    np.testing.assert_array_equal(gen.X, plain.X)
    assert _is_counts(gen.layers["counts"])
    factors = gen.obs["scbranch_size_factor"].to_numpy()
    # stochastically rounded around the profiles counts are drawn from (capped, rescaled)
    profiles = model.space.count_profiles(
        np.asarray(gen.X.toarray() if sp.issparse(gen.X) else gen.X)
    )
    expected = factors[:, None] * np.expm1(profiles.astype(np.float64))
    got = gen.layers["counts"].toarray()
    assert np.all((got == np.floor(expected)) | (got == np.floor(expected) + 1))
    again = model.generate(n_cells=10, seed=0, counts=True, progress_bar=False)
    assert (again.layers["counts"] != gen.layers["counts"]).nnz == 0


def test_stochastic_rounding_keeps_expected_counts():
    rng = np.random.default_rng(0)
    x = np.log1p(np.full((20000, 3), [0.05, 0.7, 2.5]))  # expm1(x) = 0.05, 0.7, 2.5
    counts = counts_from_expression(x, np.ones(20000), rng).toarray()
    np.testing.assert_allclose(counts.mean(0), [0.05, 0.7, 2.5], atol=0.02)
    assert set(np.unique(counts[:, 2])) == {2.0, 3.0}  # never further than the next integer


def test_pca_space_counts():
    adata = sb.datasets.pbmc68k()
    sb.BranchedDiffusion.setup_anndata(
        adata, labels_key=LABELS, obsm_key="X_pca", counts_layer="counts"
    )
    model = sb.BranchedDiffusion(adata, **FAST_MODEL)
    gen = model.generate(n_cells=5, seed=0, counts=True, progress_bar=False)
    assert _is_counts(gen.layers["counts"]) and gen.layers["counts"].shape == gen.shape


def test_counts_bad_input():
    adata = _pbmc(100)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key=LABELS)
    model = sb.BranchedDiffusion(adata, **FAST_MODEL)
    with pytest.raises(ValueError, match="cannot generate counts.*counts_layer"):
        model.generate(n_cells=2, counts=True, progress_bar=False)
    with pytest.raises(ValueError, match="`batch` applies to models decoded by scVI"):
        model.generate(n_cells=2, batch="b0", progress_bar=False)
    with pytest.raises(KeyError, match="counts_layer='raw'"):
        sb.BranchedDiffusion.setup_anndata(adata, labels_key=LABELS, counts_layer="raw")
    with pytest.raises(ValueError, match="needs AnnData set up with `obsm_key`"):
        sb.BranchedDiffusion(adata, scvi_model=object())
    lognorm = adata.copy()
    lognorm.layers["counts"] = lognorm.X.copy()
    # at set-up already (a user audit found it only at the model), naming the layer
    with pytest.raises(ValueError, match=r"counts_layer='counts'.*must hold raw counts"):
        sb.BranchedDiffusion.setup_anndata(lognorm, labels_key=LABELS, counts_layer="counts")
    shifted = adata.copy()
    shifted.layers["counts"] = shifted.layers["counts"] * 1.5  # odd counts become halves
    with pytest.raises(ValueError, match="non-integer values"):
        sb.BranchedDiffusion.setup_anndata(shifted, labels_key=LABELS, counts_layer="counts")


def test_scvi_entry_points_wrong_keys_and_nan(scvi_model_and_data):
    vae, _, adata = scvi_model_and_data
    with pytest.raises(KeyError, match="labels_key='celltype' is not a column"):
        sb.BranchedDiffusion.from_scvi_model(vae, labels_key="celltype", adata=adata)
    with pytest.raises(KeyError, match="batch_key='donor' is not a column"):
        sb.model.fit_scvi(adata, counts_layer="counts", batch_key="donor")
    nan = adata.copy()
    del nan.obsm["X_scVI"]
    nan.layers["counts"] = nan.layers["counts"].toarray()
    nan.layers["counts"][0, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        sb.model.fit_scvi(nan, counts_layer="counts")
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        sb.BranchedDiffusion.from_scvi_model(vae, labels_key=LABELS, adata=nan)
    unknown_batch = adata.copy()
    del unknown_batch.obsm["X_scVI"]
    unknown_batch.obs["batch"] = "b9"
    with pytest.raises(ValueError, match=r"not trained on: \[.b9.\]\. Drop those cells"):
        sb.BranchedDiffusion.from_scvi_model(vae, labels_key=LABELS, adata=unknown_batch)


def test_scvi_model_transmutes_counts_and_records_scale(scvi_model_and_data, tmp_path):
    vae, model, adata = scvi_model_and_data
    mono = adata[adata.obs[LABELS] == "CD14+ Monocyte"][:6].copy()
    tm = model.transmute(mono, "Dendritic", n_checkpoints=3, n_steps=5, progress_bar=False)
    assert tm.n_obs == 6 * 5 and list(tm.var_names) == list(adata.var_names)
    assert tm.obsm["X_scVI"].shape == (30, model.module.n_input)
    # .X: each estimate's expected log-normalised counts at one library size (deterministic)
    library = model.space.estimate_library  # the training cells' median library size
    assert (tm.obs["scbranch_library_size"] == np.float32(library)).all()
    batch = np.full(tm.n_obs, list(model.space.info["batches"]).index("b0"))  # the default
    expected = expected_log_counts(
        vae, tm.obsm["X_scVI"], np.full(tm.n_obs, library, np.float32), batch
    )
    np.testing.assert_array_equal(tm.X, expected)
    assert (tm.obs["batch"] == "b0").all()
    tr = model.generate(n_cells=3, trajectory_times=[0.5, 0.0], seed=0, progress_bar=False)
    np.testing.assert_array_equal(tr.X, model.space.decode_estimates(tr.obsm["X_scVI"]))
    # another batch: decoded into it and recorded (an audit found trajectories ignored it and
    # transmute without the option)
    in_b1 = model.transmute(
        mono, "Dendritic", n_checkpoints=3, n_steps=5, progress_bar=False, batch="b1"
    )
    b1 = np.full(tm.n_obs, list(model.space.info["batches"]).index("b1"))
    np.testing.assert_array_equal(in_b1.obsm["X_scVI"], tm.obsm["X_scVI"])
    np.testing.assert_array_equal(
        in_b1.X,
        expected_log_counts(vae, tm.obsm["X_scVI"], np.full(tm.n_obs, library, np.float32), b1),
    )
    assert np.abs(in_b1.X - tm.X).max() > 0.01 and (in_b1.obs["batch"] == "b1").all()
    tr1 = model.generate(
        n_cells=3, trajectory_times=[0.5, 0.0], seed=0, progress_bar=False, batch="b1"
    )
    np.testing.assert_array_equal(tr1.obsm["X_scVI"], tr.obsm["X_scVI"])
    np.testing.assert_array_equal(
        tr1.X, model.space.decode_estimates(tr.obsm["X_scVI"], batch="b1")
    )
    assert np.abs(tr1.X - tr.X).max() > 0.01 and (tr1.obs["batch"] == "b1").all()
    with pytest.raises(ValueError, match="Unknown batch 'b9'"):
        model.transmute(mono, "Dendritic", progress_bar=False, batch="b9")
    # two cells: scvi-tools' "category with fewer than 3 cells" set-up warning is not the user's
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.transmute(mono[:2].copy(), "Dendritic", n_steps=5, progress_bar=False)
    assert not [w for w in caught if "fewer than 3 cells" in str(w.message)]
    with pytest.raises(ValueError, match="not counts"):
        model.generate(n_cells=3, trajectory_times=[0.5], counts=True, progress_bar=False)
    tm.write_h5ad(tmp_path / "tm.h5ad")


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_expected_log_counts_are_the_mean_of_many_draws(likelihood):
    # known answer: the exact expectation sits where the mean of 1,000 draws of counts, each
    # log-normalised by its own total as real cells are, sits, within those draws' standard
    # error (|z| averages 0.80 for pure Monte-Carlo error; dividing by the library instead of
    # each draw's total would show as a larger one)
    import scvi

    from scbranch.model._scvi import _draws, _likelihoods

    scvi.settings.seed = 0
    adata = _pbmc()
    vae = sb.model.fit_scvi(adata, counts_layer="counts", gene_likelihood=likelihood, max_epochs=2)
    z = vae.get_latent_representation()[:30]
    library = np.asarray(adata.layers["counts"].sum(1)).ravel()[:30].astype(np.float32)
    batch = np.zeros(30, dtype=int)
    exact = expected_log_counts(vae, z, library, batch)
    likelihoods = _likelihoods(vae, z, library, batch)
    draws = np.stack(
        [
            log_normalize(sp.csr_matrix(np.concatenate(_draws(vae, likelihoods, s)))).toarray()
            for s in range(1000)
        ]
    )
    mean, se = draws.mean(0), draws.std(0) / np.sqrt(len(draws))
    seen = se > 0
    z_scores = (exact - mean)[seen] / se[seen]
    assert np.abs(z_scores).mean() < 1.0
    assert abs((exact - mean).mean()) < 0.005
    # where none of the 1,000 draws had a count, P(X > 0) is below about 0.003
    assert np.all(exact[~seen] < 0.05)


def test_scvi_trajectory_expression_sits_at_real_cells_levels():
    # known answer: real B cells' own latents, decoded as trajectory rows are, give the B cells'
    # log-normalised gene means; the log of scVI's decoder mean (what trajectories gave before)
    # lies above them for genes detected in under 10 % of the cells. Measured with this scVI
    # (100 epochs, 4 s): 0.14 and 0.80 on 18 such genes (0.29 and 0.87 over all 200).
    import scvi

    scvi.settings.seed = 0
    adata = _pbmc()
    vae = sb.model.fit_scvi(adata, counts_layer="counts", max_epochs=100)
    model = sb.BranchedDiffusion.from_scvi_model(vae, labels_key=LABELS, adata=adata, **FAST_MODEL)
    b_cells = adata[(adata.obs[LABELS] == "CD19+ B").to_numpy()]
    real = log_normalize(b_cells.layers["counts"]).toarray().mean(0)
    rare = np.asarray((b_cells.layers["counts"] > 0).mean(0)).ravel() < 0.1
    assert rare.sum() >= 10
    estimate = model.space.decode_estimates(b_cells.obsm["X_scVI"]).mean(0)
    library = np.full(b_cells.n_obs, 1e4)
    decoder_mean, _ = decode_latents(
        vae, b_cells.obsm["X_scVI"], library, np.zeros(b_cells.n_obs, int), seed=0
    )
    log_of_mean = np.log1p(1e4 * decoder_mean).mean(0)
    assert np.abs(estimate - real)[rare].mean() < 0.35
    assert (log_of_mean - real)[rare].mean() > 0.6


def test_scvi_model_generates_anchored_counts(scvi_model_and_data):
    # anchors are read as scVI reads cells (their counts), the new cells decoded by scVI
    _, model, adata = scvi_model_and_data
    anchors = adata[adata.obs[LABELS].isin(["CD14+ Monocyte", "Dendritic"])].copy()
    gen = model.generate_anchored(anchors, 4, seed=0, n_steps=5, progress_bar=False)
    assert gen.n_obs == 8 and _is_counts(gen.layers["counts"])
    assert list(gen.var_names) == list(adata.var_names)
    assert gen.obsm["X_scVI"].shape == (8, model.module.n_input)
    assert set(gen.obs["scbranch_anchor"]) <= set(anchors.obs_names)
    assert "scbranch_library_size" in gen.obs


def test_expression_model_generates_anchored_cells():
    adata = _pbmc(100)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key=LABELS, counts_layer="counts")
    model = sb.BranchedDiffusion(adata, **FAST_MODEL)
    model.train(max_epochs=1, enable_progress_bar=False)
    b_cells = adata[adata.obs[LABELS] == "CD19+ B"].copy()
    gen = model.generate_anchored(b_cells, 6, counts=True, seed=0, progress_bar=False)
    assert gen.shape == (6, 100) and gen.X.min() >= 0 and _is_counts(gen.layers["counts"])
    other = adata[:, adata.var_names[:50]].copy()
    with pytest.raises(ValueError, match="gene"):
        model.generate_anchored(other, 3, progress_bar=False)


def test_expression_model_counts_keep_real_library_sizes(tmp_path):
    # counts drawn around raw generated values had twice real cells' library sizes (small
    # values of unexpressed genes summed up) and outliers of 50x the largest real library
    # (one gene at 14 in log1p units): they are drawn around the values capped at each gene's
    # training maximum and rescaled to the total every training cell shares
    adata = _pbmc(100)
    counts = adata.layers["counts"]
    adata.X = log_normalize(counts)  # CP10k over these genes: every cell sums to 1e4
    sb.BranchedDiffusion.setup_anndata(adata, labels_key=LABELS, counts_layer="counts")
    model = sb.BranchedDiffusion(adata, **FAST_MODEL)
    space = model.space
    x = adata.X.toarray()
    assert space.total == pytest.approx(1e4, rel=1e-5)
    np.testing.assert_allclose(space.gene_max, x.max(0), rtol=1e-6)
    # real cells are such profiles already: unchanged (the known answer)
    np.testing.assert_allclose(space.count_profiles(x), x, atol=1e-4)
    wild = x[:3].copy()
    wild[:, 0] = 14.0  # far above any training value
    wild[:, 1:] += 0.3  # the small values of every other gene
    bounded = space.count_profiles(wild).astype(np.float64)
    assert (bounded <= space.gene_max + 1e-6).all()
    np.testing.assert_allclose(np.expm1(bounded).sum(1), 1e4, rtol=1e-3)
    # generated counts: library sizes those of the class's real cells (before rounding)
    real_lib = np.asarray(counts.sum(1)).ravel()
    with pytest.warns(UserWarning, match="untrained model"):
        gen = model.generate(n_cells=30, seed=0, counts=True, progress_bar=False)
    lib = np.asarray(gen.layers["counts"].sum(1)).ravel()
    expected = gen.obs["scbranch_size_factor"].to_numpy() * 1e4
    assert np.abs(lib - expected).max() <= 4 * np.sqrt(adata.n_vars)  # rounding noise only
    assert lib.max() <= real_lib.max() + 4 * np.sqrt(adata.n_vars)
    # .X keeps the generated values themselves
    assert gen.X.max() > 0
    # saved and loaded with its bounds; expression not normalised to one total: no rescaling
    model.save(tmp_path / "m")
    loaded = sb.BranchedDiffusion.load(tmp_path / "m").space
    assert loaded.total == space.total
    np.testing.assert_array_equal(loaded.gene_max, space.gene_max)
    scaled = adata.copy()
    scaled.X = x * np.linspace(0.5, 1.5, adata.n_obs)[:, None]
    sb.BranchedDiffusion.setup_anndata(scaled, labels_key=LABELS)
    assert sb.BranchedDiffusion(scaled, **FAST_MODEL).space.total is None


def test_scvi_ode_transmutation_carried_back_returns_to_the_cells(scvi_model_and_data):
    # endpoint rows hold no counts to encode: they failed with "reads counts from
    # layers['counts'], which adata lacks"; they start from their exact states instead
    _, model, adata = scvi_model_and_data
    mono = adata[adata.obs[LABELS] == "CD14+ Monocyte"][:4].copy()
    there = model.transmute(mono, "Dendritic", n_checkpoints=2, n_steps=20, progress_bar=False)
    ends = there[there.obs["phase"] == "endpoint"].copy()
    back = model.transmute(
        ends, "CD14+ Monocyte", source="Dendritic", n_checkpoints=2, n_steps=20, progress_bar=False
    )
    start = mono.obsm["X_scVI"]
    returned = back[back.obs["phase"] == "endpoint"].obsm["X_scVI"]
    moved = np.linalg.norm(ends.obsm["X_scVI"] - start)
    assert np.linalg.norm(returned - start) < 1e-2 * moved


def test_an_scvi_model_changed_after_the_diffusion_is_refused(scvi_model_and_data, tmp_path):
    # retraining the scVI model (or replacing a saved model's scvi/) decoded the learned
    # latents with another decoder, silently
    import copy
    import shutil

    import torch

    vae, model, adata = scvi_model_and_data
    model.save(tmp_path / "m")
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.scvi_model.module.parameters()).add_(0.01)  # as one more step of training
    for action in (
        lambda: other.generate(n_cells=2, progress_bar=False),
        lambda: other.transmute(adata[adata.obs[LABELS] == "CD19+ B"][:2].copy(), "Dendritic"),
        lambda: other.save(tmp_path / "other"),
    ):
        with pytest.raises(ValueError, match=r"not the one the diffusion was trained on"):
            action()
    assert not (tmp_path / "other").exists()
    # a saved model's scvi/ replaced by another scVI model's
    shutil.copytree(tmp_path / "m", tmp_path / "swapped")
    other.scvi_model.module.load_state_dict(vae.module.state_dict())  # unchanged again
    other.save(tmp_path / "again")  # ... so it saves
    changed = copy.deepcopy(vae)
    with torch.no_grad():
        next(changed.module.parameters()).mul_(1.1)
    sb.model._scvi.save_scvi_weights(changed, tmp_path / "swapped" / "scvi")
    with pytest.raises(ValueError, match=r"in '.*scvi' is not the one the diffusion"):
        sb.BranchedDiffusion.load(tmp_path / "swapped")
    loaded = sb.BranchedDiffusion.load(tmp_path / "m")  # the weights it was saved with load
    assert loaded.space.info["weights_sha256"] == model.space.info["weights_sha256"]


def test_an_scvi_models_default_tree_has_the_expressions_topology_and_its_latents_times(
    scvi_model_and_data,
):
    # a tree found in an scVI latent can lose coarse clades that the expression keeps
    # (docs/benchmarks/latent_tree.md): the default topology is the expression's (the counts
    # scVI models, log1p(CP10k)), the branch times the latent's
    from scbranch.tl._compare import clades

    vae, model, adata = scvi_model_and_data
    cells = adata.copy()
    sb.tl.branch_hierarchy(cells, groupby=LABELS, use_rep="X_scVI", key_added="latent_tree")
    sb.tl.branch_hierarchy(
        cells, groupby=LABELS, layer="counts", target_sum=1e4, key_added="expression_tree"
    )
    latent = sb.tl.read_hierarchy(cells, "latent_tree")[0]
    expression = sb.tl.read_hierarchy(cells, "expression_tree")[0]
    # this 3-epoch scVI's latent loses clades the expression has (Dendritic with CD14+ Mono)
    assert set(clades(latent)) != set(clades(expression))
    assert set(clades(model.tree)) == set(clades(expression))  # the topology: expression's
    params = model.hierarchy_record_["params"]
    assert params["use_rep"] == "X_scVI" and params["given"] == "discovered"
    assert (params["topology_layer"], params["topology_target_sum"]) == ("counts", 1e4)
    # the same tree as the expression's Newick given by hand, timed on the latent
    given = sb.BranchedDiffusion.from_scvi_model(
        vae, labels_key=LABELS, adata=cells, hierarchy=cells.uns["expression_tree"]["newick"],
        **FAST_MODEL,
    )  # fmt: skip
    assert given.hierarchy_record_["params"]["given"] == "newick"
    assert set(clades(given.tree)) == set(clades(model.tree))
    np.testing.assert_allclose(
        sorted(clades(model.tree).values()), sorted(clades(given.tree).values())
    )
    assert sorted(clades(model.tree).values()) != sorted(clades(expression).values())
    # more genes in adata than in scVI: the topology comes from scVI's genes only
    wider = _pbmc(260)
    wider.obs["batch"] = adata.obs["batch"].to_numpy()
    assert wider.n_vars > adata.n_vars
    on_wider = sb.BranchedDiffusion.from_scvi_model(
        vae, labels_key=LABELS, adata=wider, **FAST_MODEL
    )
    assert on_wider.tree.to_newick() == model.tree.to_newick()


def test_an_scvi_model_reuses_a_stored_trees_topology_only_when_it_is_the_expressions(
    scvi_model_and_data, caplog
):
    vae, model, adata = scvi_model_and_data
    key = "scbranch_hierarchy"
    # a tree of the expression (scVI's counts, CP10k): its topology, timed on the latent
    cells = adata.copy()
    sb.tl.branch_hierarchy(cells, groupby=LABELS, layer="counts", target_sum=1e4)
    with caplog.at_level("INFO", logger="scbranch"):
        reused = sb.BranchedDiffusion.from_scvi_model(
            vae, labels_key=LABELS, adata=cells, **FAST_MODEL
        )
    assert "Using the topology of the hierarchy stored in adata.uns['scbranch_hierarchy']" in (
        caplog.text
    )
    assert reused.tree.to_newick() == model.tree.to_newick()
    assert reused.hierarchy_record_["params"]["given"] == "tree"
    # a tree of the latent is what the model would not learn: kept only when named
    cells = adata.copy()
    sb.tl.branch_hierarchy(cells, groupby=LABELS, use_rep="X_scVI")
    stored = sb.tl.read_hierarchy(cells)[0].to_newick()
    caplog.clear()
    with caplog.at_level("INFO", logger="scbranch"):
        default = sb.BranchedDiffusion.from_scvi_model(
            vae, labels_key=LABELS, adata=cells, **FAST_MODEL
        )
    assert f"pass hierarchy={key!r} to use that tree as is" in caplog.text
    assert default.tree.to_newick() == model.tree.to_newick() != stored
    named = sb.BranchedDiffusion.from_scvi_model(
        vae, labels_key=LABELS, adata=cells, hierarchy=key, **FAST_MODEL
    )
    assert named.tree.to_newick() == stored
    # a tree of the expression of other genes than scVI's: not reused, and named it fails
    wider = _pbmc(260)
    wider.obs["batch"] = adata.obs["batch"].to_numpy()
    sb.tl.branch_hierarchy(wider, groupby=LABELS, layer="counts", target_sum=1e4)
    caplog.clear()
    with caplog.at_level("INFO", logger="scbranch"):
        default = sb.BranchedDiffusion.from_scvi_model(
            vae, labels_key=LABELS, adata=wider, **FAST_MODEL
        )
    assert "of other genes (adata holds 260 genes, the scVI model 200)" in caplog.text
    assert default.tree.to_newick() == model.tree.to_newick()
    with pytest.raises(ValueError, match="of other genes"):
        sb.BranchedDiffusion.from_scvi_model(
            vae, labels_key=LABELS, adata=wider, hierarchy=key, **FAST_MODEL
        )
    # a tree of another representation names the call that fits
    cells = adata.copy()
    sb.tl.branch_hierarchy(cells, groupby=LABELS, layer="counts")
    with pytest.raises(
        ValueError, match=r"branch_hierarchy\(\.\.\., layer='counts', target_sum=10000\)"
    ):
        sb.BranchedDiffusion.from_scvi_model(
            vae, labels_key=LABELS, adata=cells, hierarchy=key, **FAST_MODEL
        )


def test_fit_scvi_trains_small_data_800_epochs_unless_told(monkeypatch):
    # the scVI space's cells improve with scVI's epochs on small data (docs/evaluation.md):
    # fit_scvi's default is 800 epochs on a few hundred cells, else scvi-tools' heuristic
    import scvi
    from scvi.model._utils import get_max_epochs_heuristic

    asked = []
    monkeypatch.setattr(
        scvi.model.SCVI, "train", lambda self, max_epochs=None, **kw: asked.append(max_epochs)
    )
    adata = _pbmc()  # 700 cells
    sb.model.fit_scvi(adata[:351].copy(), counts_layer="counts")  # pbmc68k_reduced's train size
    sb.model.fit_scvi(adata, counts_layer="counts")
    sb.model.fit_scvi(adata, counts_layer="counts", max_epochs=7)
    assert asked == [800, 800, 7]
    # between 750 and 1,500 cells: 600,000 cell passes, more than scvi-tools' 400 epochs
    assert [sb.model.default_scvi_epochs(n) for n in (751, 1_000, 1_318)] == [799, 600, 455]
    for n in (1_500, 1_846, 20_000, 45_000, 1_000_000):  # from 1,500 cells: scvi-tools' default
        assert sb.model.default_scvi_epochs(n) == get_max_epochs_heuristic(n)


@pytest.mark.parametrize("bad", [0, -5, 2.5, float("nan"), "700", True])
def test_default_scvi_epochs_refuses_what_is_not_a_number_of_cells(bad):
    with pytest.raises(ValueError, match="n_cells must be a positive integer"):
        sb.model.default_scvi_epochs(bad)


def test_a_pca_without_loadings_says_why_it_makes_no_counts():
    # the error told the user to set up counts_layer=, which they had
    adata = sb.datasets.pbmc68k()
    del adata.varm["PCs"]
    sb.BranchedDiffusion.setup_anndata(
        adata, labels_key=LABELS, obsm_key="X_pca", counts_layer="counts"
    )
    with pytest.warns(UserWarning, match="counts_layer='counts' is ignored.*varm\\['PCs'\\]"):
        model = sb.BranchedDiffusion(adata, **FAST_MODEL)
    for asked in ({"counts": True}, {"residual_noise": "nb"}):
        with pytest.raises(ValueError, match="found no loadings in varm\\['PCs'\\]"):
            model.generate(n_cells=2, progress_bar=False, **asked)


def test_generated_counts_sum_to_the_library_size_of_their_size_factor():
    # the decoded profile set the depth too: expm1 of it does not sum to the normalised total,
    # so generated totals spread 1.32x as wide as real ones per type (pbmc68k_reduced)
    adata = sb.datasets.pbmc68k()
    sb.BranchedDiffusion.setup_anndata(
        adata, labels_key=LABELS, obsm_key="X_pca", counts_layer="counts"
    )
    model = sb.BranchedDiffusion(adata, **FAST_MODEL)
    space = model.space
    options = space.resolve_options(counts=True, batch=None, residual_noise="nb")
    z = model.encode(adata)
    codes = adata.obs[LABELS].cat.codes.to_numpy()
    target = space.counts.nb["target_sum"]
    totals = {}
    for shift in (0.0, 3.0):  # a profile moved along PC 1: another expm1 sum, the same depth
        moved = z.copy()
        moved[:, 0] += shift
        out = space.decode(moved, codes, options, seed=0)
        library = out.obs["scbranch_size_factor"] * target
        totals[shift] = np.asarray(out.layers["counts"].sum(1)).ravel() / library
    for ratio in totals.values():  # counting noise around the library size, no more
        assert 0.97 < np.median(ratio) < 1.03 and np.std(np.log(ratio)) < 0.15
    assert abs(np.log(totals[0.0]).mean() - np.log(totals[3.0]).mean()) < 0.02
