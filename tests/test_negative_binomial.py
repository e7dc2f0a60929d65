"""Negative binomial decoding of PCA models (``residual_noise="nb"``), against known answers.

Cells are simulated from a known model: log-means of rank 3 per class, library sizes that
vary, and negative binomial counts with a known inverse dispersion per gene. Decoding the real
cells' own PC coordinates must then give cells that vary per gene like the real cells (the
denoised profiles do not), and the fitted dispersion must follow the true one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData
from scipy.stats import spearmanr

import scbranch as sb
from scbranch.model._counts import fit_negative_binomial, sample_negative_binomial

N_GENES = 150


def _simulated(seed: int = 0, n_per_class: int = 700):
    rng = np.random.default_rng(seed)
    classes = ["a", "b"]
    n = n_per_class * len(classes)
    codes = np.repeat(np.arange(len(classes)), n_per_class)
    base = rng.normal(0.0, 1.0, N_GENES) - 1.0
    shift = rng.normal(0.0, 1.0, (len(classes), N_GENES))
    programs = rng.normal(0.0, 0.5, (3, N_GENES))
    log_mean = base + shift[codes] + rng.normal(0.0, 1.0, (n, 3)) @ programs
    library = rng.lognormal(np.log(2000), 0.3, n)
    mean = library[:, None] * np.exp(log_mean) / np.exp(log_mean).sum(1, keepdims=True)
    phi = rng.uniform(0.05, 1.0, N_GENES)
    counts = sample_negative_binomial(mean, phi, rng).astype(np.float32)
    adata = AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame({"cell_type": pd.Categorical(np.asarray(classes)[codes])}),
        var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]),
    )
    adata.obs_names = [f"c{i}" for i in range(n)]
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=10)
    return adata, phi


@pytest.fixture(scope="module")
def nb_model():
    adata, phi = _simulated()
    sb.BranchedDiffusion.setup_anndata(
        adata, labels_key="cell_type", obsm_key="X_pca", counts_layer="counts"
    )
    return adata, phi, sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)


def _decode_real(model, adata, noise, seed=0):
    codes = adata.obs["cell_type"].cat.codes.to_numpy()
    options = model.space.resolve_options(counts=True, batch=None, residual_noise=noise)
    return model.space.decode(np.asarray(adata.obsm["X_pca"]), codes, options, seed)


def test_fitted_dispersion_follows_the_true_one(nb_model):
    adata, phi, model = nb_model
    fitted = model.space.counts.nb["inverse_dispersion"]
    # Around a decoded (not the true) mean, and fitted so that the log-normalised draws match
    # each gene's mean expression, the dispersion is an effective one: it keeps the genes'
    # order (Spearman 0.73 here) and sits below the truth (median log ratio -0.6; the moments
    # alone give -0.35, checked exactly in test_method_of_moments_on_exact_negative_binomial),
    # because the decoded means already vary with the noise the 10 PCs absorbed.
    assert spearmanr(fitted, phi)[0] > 0.65
    assert -1.0 < np.median(np.log(fitted / phi)) < 0.0
    assert abs(model.space.counts.nb["target_sum"] - 1e4) < 1.0


def test_nb_cells_have_the_real_library_sizes(nb_model):
    # the fit matches log-normalised means without inflating the counts: the drawn cells'
    # totals are the real ones (a fit that raised the scales to match log means drew 1.16x)
    adata, _, model = nb_model
    counts = _decode_real(model, adata, "nb").layers["counts"].toarray()
    real = adata.layers["counts"].toarray().sum(1)
    assert abs(counts.sum(1).mean() / real.mean() - 1) < 0.03
    assert abs(np.median(counts.sum(1)) / np.median(real) - 1) < 0.05


def test_nb_cells_vary_like_real_cells(nb_model):
    adata, _, model = nb_model
    real = np.asarray(adata.X.toarray())
    plain = np.asarray(_decode_real(model, adata, False).X)
    nb = _decode_real(model, adata, "nb")
    x = np.asarray(nb.X)
    counts = nb.layers["counts"].toarray()
    np.testing.assert_array_equal(counts, np.round(counts))
    drawn = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    # the drawn counts vary per gene like the real counts: mean, variance and zeros, which the
    # denoised profiles lose
    ratio_plain = np.median(plain.var(0) / real.var(0))
    assert ratio_plain < 0.75
    assert 0.9 < np.median(drawn.var(0) / real.var(0)) < 1.1
    # per-gene log means at the sampling noise of 1,400 cells (about 0.03)
    error = np.abs(drawn.mean(0) - real.mean(0))
    assert np.median(error) < 0.05 and np.quantile(error, 0.9) < 0.1
    zeros_real = (real == 0).mean(0)
    assert np.abs((counts == 0).mean(0) - zeros_real).mean() < 0.02
    assert np.abs((plain == 0).mean(0) - zeros_real).mean() > 0.1
    # .X keeps the generated PC scores exactly and the drawn cells' part outside the PCs
    dec = model.space.decoder
    scores = (x - dec["mean"]) @ dec["loadings"].T
    np.testing.assert_allclose(scores, adata.obsm["X_pca"], atol=2e-3)
    outside = np.eye(x.shape[1]) - dec["loadings"].T @ dec["loadings"]
    np.testing.assert_allclose(x @ outside, drawn @ outside, atol=2e-3)
    # measured 0.90 here (the denoised profiles: below 0.75)
    assert 0.85 < np.median(x.var(0) / real.var(0)) < 1.1


def test_an_outlier_far_outside_the_data_still_decodes(nb_model):
    # a generated cell can land far from every real one; its decoded genes must stay drawable
    adata, _, model = nb_model
    z = np.asarray(adata.obsm["X_pca"][:2]) * 1e3
    options = model.space.resolve_options(counts=True, batch=None, residual_noise="nb")
    out = model.space.decode(z, np.array([0, 1]), options, 0)
    counts = out.layers["counts"].toarray()
    assert np.isfinite(counts).all() and np.isfinite(out.X).all()
    # ...also for a gene the set-up cells never expressed (scale 0): no counts, not NaN
    nb = model.space.counts.nb
    scale = nb["scale"].copy()
    try:
        nb["scale"][0] = 0.0
        again = model.space.decode(z, np.array([0, 1]), options, 0).layers["counts"].toarray()
    finally:
        nb["scale"] = scale
    assert np.isfinite(again).all() and (again[:, 0] == 0).all()


def test_nb_decoding_is_seeded(nb_model):
    adata, _, model = nb_model
    a, b = _decode_real(model, adata, "nb", seed=3), _decode_real(model, adata, "nb", seed=3)
    np.testing.assert_array_equal(a.X, b.X)
    assert not np.array_equal(a.X, _decode_real(model, adata, "nb", seed=4).X)


def test_nb_survives_save_and_load(nb_model, tmp_path):
    adata, _, model = nb_model
    model.save(tmp_path / "m")
    loaded = sb.BranchedDiffusion.load(tmp_path / "m", adata=adata)
    for key in ("scale", "inverse_dispersion"):
        np.testing.assert_array_equal(loaded.space.counts.nb[key], model.space.counts.nb[key])
    np.testing.assert_array_equal(
        _decode_real(loaded, adata, "nb").X, _decode_real(model, adata, "nb").X
    )


def test_generate_with_nb_records_it(nb_model):
    adata, _, model = nb_model
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    gen = model.generate(n_cells=20, seed=0, residual_noise="nb", progress_bar=False)
    assert gen.uns["scbranch"]["params"]["residual_noise"] == "nb"
    assert "counts" not in gen.layers  # counts only when asked for
    with_counts = model.generate(
        n_cells=20, seed=0, residual_noise="nb", counts=True, progress_bar=False
    )
    np.testing.assert_array_equal(with_counts.X, gen.X)


def test_nb_is_the_default_of_pca_models_with_counts(nb_model):
    adata, _, model = nb_model
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    default = model.generate(n_cells=10, seed=2, progress_bar=False)
    assert default.uns["scbranch"]["params"]["residual_noise"] == "nb"
    nb = model.generate(n_cells=10, seed=2, residual_noise="nb", progress_bar=False)
    np.testing.assert_array_equal(default.X, nb.X)
    # trajectories carry clean estimates: "auto" means no noise there (an explicit "nb" fails)
    traj = model.generate(n_cells=5, seed=2, trajectory_times=[0.5, 0], progress_bar=False)
    assert traj.uns["scbranch"]["params"]["residual_noise"] is False
    with pytest.raises(ValueError, match="Trajectories carry"):
        model.generate(n_cells=5, trajectory_times=[0.5], residual_noise="nb", progress_bar=False)


def test_models_without_counts_default_to_the_decoded_profile():
    adata, _ = _simulated(n_per_class=60)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_pca")
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    assert model.space.default_noise is False
    default = model.generate(n_cells=5, seed=1, progress_bar=False)
    assert default.uns["scbranch"]["params"]["residual_noise"] is False
    plain = model.generate(n_cells=5, seed=1, residual_noise=False, progress_bar=False)
    np.testing.assert_array_equal(default.X, plain.X)


def test_nb_needs_counts_at_setup():
    adata, _ = _simulated(n_per_class=60)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_pca")
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    with pytest.raises(ValueError, match="counts_layer='counts'"):
        model.space.resolve_options(counts=False, batch=None, residual_noise="nb")
    with pytest.raises(ValueError, match="residual_noise must be False, True"):
        model.space.resolve_options(counts=False, batch=None, residual_noise="poisson")


def test_method_of_moments_on_exact_negative_binomial():
    # cells of depths 0.5-20x; as in data normalised with normalize_total, the depth is the
    # size factor (library / 1e4) and the log-normalised profile is the same for every cell;
    # three test genes among 200 Poisson ones, as a gene is a small part of a real library
    rng = np.random.default_rng(2)
    depth = rng.uniform(0.5, 20.0, (30_000, 1))
    mu = depth * np.r_[1.0, 1.0, 1.0, np.full(200, 5.0)]
    phi = np.r_[0.0, 0.2, 1.0, np.zeros(200)]
    counts = sample_negative_binomial(mu, phi, rng)
    s = counts.sum(1) / 1e4
    fit = fit_negative_binomial(counts, s, np.log1p(mu / s[:, None]))
    np.testing.assert_allclose(fit["inverse_dispersion"][:3], phi[:3], atol=0.03)
    np.testing.assert_allclose(fit["scale"][:3], 1.0, atol=0.02)
