"""Out-of-fold PC scores (tl.pca_out_of_fold): known answers on simulated cells."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import scbranch as sb
from scbranch.model._decoding import decode, fit_pca_decoder

N_GENES, RANK, N_COMPS = 300, 5, 20
#: signal components: the low-rank signal and the axis between the two types
N_SIGNAL = RANK + 1


def _cells(n: int, rng: np.random.Generator, basis: np.ndarray) -> np.ndarray:
    """Low-rank signal plus isotropic noise (more genes than the PCA can fit honestly); the
    second half of the cells is a second type, shifted on 10 genes."""
    signal = rng.normal(size=(n, RANK)) * np.array([6.0, 5.0, 4.0, 3.0, 2.0])
    x = signal @ basis + rng.normal(size=(n, N_GENES)) + 5.0
    x[n // 2 :, :10] += 8.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def simulated():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(N_GENES, RANK)))[0].T
    train = ad.AnnData(_cells(400, rng, basis))
    train.obs["group"] = pd.Categorical(np.repeat(["a", "b"], train.n_obs // 2))
    sc.pp.pca(train, n_comps=N_COMPS, random_state=0)
    new = _cells(4000, rng, basis)
    return train, new


def _spread_ratio(train, new, key):
    """Per component: sd of ``key``'s scores over the sd new cells get on the training PCA."""
    decoder = fit_pca_decoder(train, "X_pca", None)
    # new cells from the same distribution, scored by the PCA of the training cells: the answer
    new_scores = (new - decoder["mean"]) @ decoder["loadings"].T
    return train.obsm[key].std(0) / new_scores.std(0)


def test_rescaled_scores_spread_like_new_cells_on_every_component(simulated):
    train, new = simulated
    train = train.copy()
    sb.tl.pca_out_of_fold(train, groupby="group", n_folds=5)
    in_sample = _spread_ratio(train, new, "X_pca")
    rescaled = _spread_ratio(train, new, "X_pca_oof")
    # the noise components are inflated in-sample (the PCA fitted the noise of these cells) ...
    assert in_sample[N_SIGNAL:].min() > 1.4
    # ... and the rescaled scores spread like new cells' scores, component by component
    np.testing.assert_allclose(rescaled, 1.0, atol=0.1)
    record = train.uns["scbranch_out_of_fold"]["X_pca_oof"]
    assert record["params"]["obsm_key"] == "X_pca" and record["params"]["n_folds"] == 5
    assert record["params"]["method"] == "rescale"
    np.testing.assert_allclose(
        record["inflation"], train.obsm["X_pca"].std(0) / train.obsm["X_pca_oof"].std(0), rtol=1e-4
    )


def test_procrustes_scores_are_right_on_average_but_not_per_component(simulated):
    """The documented weakness of the rotation: within the noise bulk it re-aligns the scores
    with the directions the full PCA fitted to these very cells."""
    train, new = simulated
    train = train.copy()
    sb.tl.pca_out_of_fold(train, method="procrustes", n_folds=5)
    ratio = _spread_ratio(train, new, "X_pca_oof")
    assert abs(ratio[N_SIGNAL:].mean() - 1) < 0.05
    np.testing.assert_allclose(ratio[:N_SIGNAL], 1.0, atol=0.1)
    assert ratio[N_SIGNAL : N_SIGNAL + 3].mean() > 1.1 and ratio[-3:].mean() < 0.9


def test_signal_components_keep_their_sign_and_order(simulated):
    train, _ = simulated
    train = train.copy()
    sb.tl.pca_out_of_fold(train, n_folds=4, seed=1)
    for j in range(RANK):
        r = np.corrcoef(train.obsm["X_pca"][:, j], train.obsm["X_pca_oof"][:, j])[0, 1]
        assert r > 0.95, (j, r)


def test_out_of_fold_scores_decode_through_the_in_sample_pca(simulated):
    train, _ = simulated
    train = train.copy()
    sb.tl.pca_out_of_fold(train, key_added="oof")
    via_oof = fit_pca_decoder(train, "oof", None)
    direct = fit_pca_decoder(train, "X_pca", None)
    np.testing.assert_array_equal(via_oof["loadings"], direct["loadings"])
    np.testing.assert_array_equal(via_oof["mean"], direct["mean"])
    x = decode(via_oof, train.obsm["oof"][:3])
    assert x.shape == (3, N_GENES) and np.isfinite(x).all()


def test_a_model_on_out_of_fold_scores_generates_genes(simulated):
    train, _ = simulated
    train = train.copy()
    sb.tl.pca_out_of_fold(train, groupby="group")
    sb.BranchedDiffusion.setup_anndata(train, labels_key="group", obsm_key="X_pca_oof")
    model = sb.BranchedDiffusion(train, hierarchy=None)
    model.train(max_epochs=1, batch_size=128, enable_progress_bar=False)
    gen = model.generate(n_cells=5, seed=0, progress_bar=False)
    assert gen.n_vars == N_GENES and "X_pca_oof" in gen.obsm


def test_new_cells_projected_on_the_pca_are_read_by_an_out_of_fold_model(simulated, tmp_path):
    train, new = simulated
    train = train.copy()
    sb.tl.pca_out_of_fold(train, groupby="group")
    sb.BranchedDiffusion.setup_anndata(train, labels_key="group", obsm_key="X_pca_oof")
    model = sb.BranchedDiffusion(train, width=16, n_head_blocks=1)
    assert model.space.scores_of == "X_pca"
    # new cells get out-of-sample scores by projection on the PCA (embed_like, ingest): those
    # are what the out-of-fold scores stand for, so the model reads them from obsm["X_pca"]
    held = ad.AnnData(new[:30])
    decoder = fit_pca_decoder(train, "X_pca", None)
    held.obsm["X_pca"] = ((new[:30] - decoder["mean"]) @ decoder["loadings"].T).astype(np.float32)
    np.testing.assert_array_equal(model.encode(held), held.obsm["X_pca"])
    model.save(tmp_path / "m")
    loaded = sb.BranchedDiffusion.load(tmp_path / "m", adata=train)
    assert loaded.space.scores_of == "X_pca"
    # attaching new cells, which have no out-of-fold scores, names the fix (not sc.pp.pca)
    with pytest.raises(KeyError, match=r"only training cells have them.*load without `adata`"):
        sb.BranchedDiffusion.load(tmp_path / "m", adata=held)
    # a model on in-sample scores has no such fallback: the missing key is named
    sb.BranchedDiffusion.setup_anndata(train, labels_key="group", obsm_key="X_pca")
    plain = sb.BranchedDiffusion(train, width=16, n_head_blocks=1)
    assert plain.space.scores_of is None
    del held.obsm["X_pca"]
    with pytest.raises(KeyError, match="X_pca"):
        model.encode(held)


def test_bad_input_is_named(simulated):
    train, _ = simulated
    train = train.copy()
    with pytest.raises(ValueError, match="method"):
        sb.tl.pca_out_of_fold(train, method="shrink")
    with pytest.raises(ValueError, match="n_folds"):
        sb.tl.pca_out_of_fold(train, n_folds=1)
    with pytest.raises(ValueError, match="n_folds must be a whole number"):
        sb.tl.pca_out_of_fold(train, n_folds=2.5)  # was read as 2
    with pytest.raises(ValueError, match="more than the .* cells"):
        sb.tl.pca_out_of_fold(train, n_folds=train.n_obs + 1)  # ran with an empty fold
    with pytest.raises(ValueError, match="overwrite"):
        sb.tl.pca_out_of_fold(train, key_added="X_pca")
    with pytest.raises(KeyError, match="X_umap"):
        sb.tl.pca_out_of_fold(train, obsm_key="X_umap")
    with pytest.raises(KeyError, match="groupby"):
        sb.tl.pca_out_of_fold(train, groupby="nope")
    train.obsm["X_other"] = np.random.default_rng(0).normal(size=(train.n_obs, N_COMPS))
    with pytest.raises(ValueError, match="sc.pp.pca"), pytest.warns(UserWarning, match="mismatch"):
        sb.tl.pca_out_of_fold(train, obsm_key="X_other")
    with_nan = train.copy()
    with_nan.X[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sb.tl.pca_out_of_fold(with_nan)
    sb.tl.pca_out_of_fold(train)
    del train.obsm["X_pca"]
    with pytest.raises(KeyError, match="rerun"):
        fit_pca_decoder(train, "X_pca_oof", None)
