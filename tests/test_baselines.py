"""Baseline generators: the shared interface, known moments, counts, and bad input."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scbranch as sb


@pytest.fixture(scope="module")
def pbmc():
    return sb.datasets.pbmc68k()


def test_gaussian_reproduces_class_moments():
    rng = np.random.default_rng(0)
    cov = np.array([[2.0, 0.8, 0.0], [0.8, 1.0, 0.3], [0.0, 0.3, 0.5]])
    z = np.r_[
        rng.multivariate_normal([0, 0, 0], cov, 3000),
        rng.multivariate_normal([5, -2, 1], cov, 3000),
    ]
    adata = ad.AnnData(
        obs=pd.DataFrame(
            {"cell_type": np.repeat(["a", "b"], 3000)}, index=[str(i) for i in range(6000)]
        ),
        obsm={"X_lat": z},
    )
    gauss = sb.baselines.PerClassGaussian(adata, "cell_type", obsm_key="X_lat")
    gen = gauss.generate(n_cells={"b": 20000}, seed=1)
    assert gen.n_vars == 0 and list(gen.obs["cell_type"].cat.categories) == ["a", "b"]
    sample = gen.obsm["X_lat"]
    np.testing.assert_allclose(sample.mean(0), [5, -2, 1], atol=0.05)
    np.testing.assert_allclose(np.cov(sample.T), cov, atol=0.08)
    assert gen.uns["scbranch"]["versions"]["numpy"] == np.__version__


def test_gaussian_decodes_like_the_model(pbmc):
    gauss = sb.baselines.PerClassGaussian(pbmc, "cell_type")
    gen = gauss.generate(n_cells=20, labels=["CD19+ B", "Dendritic"], seed=0)
    assert gen.shape == (40, pbmc.n_vars)
    assert list(gen.var_names) == list(pbmc.var_names)
    assert gen.obs["scbranch_generated"].all()
    again = gauss.generate(n_cells=20, labels=["CD19+ B", "Dendritic"], seed=0)
    np.testing.assert_array_equal(gen.X, again.X)
    # decoded genes project back onto the sampled PCs (same map as BranchedDiffusion)
    decoder = gauss.decoder_
    back = (gen.X - decoder["mean"]) @ decoder["loadings"].T
    np.testing.assert_allclose(back, gen.obsm["X_pca"], atol=1e-3)


def test_baseline_bad_input(pbmc):
    gauss = sb.baselines.PerClassGaussian(pbmc, "cell_type")
    with pytest.raises(ValueError, match="Unknown cell type"):
        gauss.generate(n_cells={"Megakaryocyte": 5})
    with pytest.raises(KeyError, match="obsm_key='X_umap3'"):
        sb.baselines.PerClassGaussian(pbmc, "cell_type", obsm_key="X_umap3")
    with pytest.raises(ValueError, match="fewer than 10 cells"):
        sb.baselines.PerClassGaussian(pbmc, "cell_type", min_cells_per_class=10)
    bad = pbmc.copy()
    bad.obsm["X_pca"][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"adata.obsm\['X_pca'\] contains 1 NaN"):
        sb.baselines.PerClassGaussian(bad, "cell_type")
    bad.layers["counts"] = bad.layers["counts"].astype(np.float32)
    bad.layers["counts"].data[0] = np.inf
    with pytest.raises(ValueError, match=r"adata.layers\['counts'\] contains 1 NaN or infinite"):
        sb.baselines.ScviResampling(bad, "cell_type", max_epochs=1)
    with pytest.raises(KeyError, match="labels_key='celltype'"):
        sb.baselines.PerClassGaussian(pbmc, "celltype")
    with pytest.raises(ValueError, match="raw counts"):
        sb.baselines.ScviResampling(pbmc, "cell_type", counts_layer=None, max_epochs=1)
    with pytest.raises(KeyError, match="counts_layer='umi'"):
        sb.baselines.ScviResampling(pbmc, "cell_type", counts_layer="umi", max_epochs=1)


def test_scvi_resampling_gives_counts_deterministically(pbmc):
    small = pbmc[pbmc.obs["cell_type"].isin(["CD19+ B", "CD14+ Monocyte"])].copy()
    before = small.copy()
    base = sb.baselines.ScviResampling(small, "cell_type", max_epochs=3, n_hidden=32)
    gen = base.generate(n_cells={"CD19+ B": 30, "CD14+ Monocyte": 20}, seed=5)
    counts = gen.layers["counts"]
    assert sp.issparse(counts) and counts.shape == (50, small.n_vars)
    assert counts.data.min() >= 0 and np.all(counts.data == np.round(counts.data))
    # .X is CP10k + log1p of the sampled counts, like the real cells
    np.testing.assert_allclose(np.expm1(gen.X.toarray()).sum(1), 1e4, rtol=1e-3)
    assert gen.obsm["X_scVI"].shape == (50, 10)
    again = base.generate(n_cells={"CD19+ B": 30, "CD14+ Monocyte": 20}, seed=5)
    assert (again.layers["counts"] != counts).nnz == 0
    # without the likelihood's noise: the same latents' expected log-normalised counts
    mean = base.generate(
        n_cells={"CD19+ B": 30, "CD14+ Monocyte": 20}, seed=5, residual_noise=False
    )
    np.testing.assert_array_equal(mean.obsm["X_scVI"], gen.obsm["X_scVI"])
    assert "counts" not in mean.layers and mean.uns["scbranch"]["params"]["residual_noise"] is False
    # the counts scatter around that mean: per cell, more spread across genes than it
    assert np.var(gen.X.toarray(), axis=1).mean() > np.var(mean.X, axis=1).mean()
    _expectation_of_log_counts(base, small)
    # the user's object is untouched (scvi-tools set up a private copy)
    assert set(small.uns) == set(before.uns) and list(small.obs.columns) == list(before.obs.columns)


def _expectation_of_log_counts(base, small):
    """Known answer: over cells, the denoised profile's gene means are those of the counts of
    the same latents (one draw each, log-normalised), as an expectation's must be; the log of
    the decoder's mean lies above them for genes the cells rarely express (log of a mean
    against mean of logs), which is why it is not the denoised profile."""
    from scbranch.model._counts import log_normalize
    from scbranch.model._scvi import decode_latents

    n_cells = {"CD19+ B": 300, "CD14+ Monocyte": 200}  # one draw's gene means to about 0.06
    one_draw = base.generate(n_cells=n_cells, seed=7)
    mean = base.generate(n_cells=n_cells, seed=7, residual_noise=False)
    z, library = one_draw.obsm["X_scVI"], np.asarray(one_draw.layers["counts"].sum(1)).ravel()
    scale, _ = decode_latents(base.model_, z, library, np.zeros(len(z), dtype=np.int64), 0)
    # genes detected in under 10 % of the real cells, chosen without the generated ones
    rare = np.asarray((small.layers["counts"] > 0).mean(0)).ravel() < 0.1
    reference = one_draw.X.toarray().mean(0)[rare]
    assert np.abs(mean.X.mean(0)[rare] - reference).mean() < 0.12
    assert (log_normalize(scale).toarray().mean(0)[rare] - reference).mean() > 0.5


def test_gaussian_residual_noise(pbmc):
    gauss = sb.baselines.PerClassGaussian(pbmc, "cell_type")
    plain = gauss.generate(n_cells={"CD19+ B": 300}, seed=2)
    noisy = gauss.generate(n_cells={"CD19+ B": 300}, seed=2, residual_noise=True)
    np.testing.assert_array_equal(plain.obsm["X_pca"], noisy.obsm["X_pca"])
    added = noisy.X - plain.X
    np.testing.assert_allclose(added.std(0), gauss.decoder_["residual_sd"], rtol=0.2, atol=1e-3)
    assert noisy.uns["scbranch"]["params"]["residual_noise"] is True


def _two_types(n: int = 400, seed: int = 0) -> tuple[ad.AnnData, np.ndarray]:
    rng = np.random.default_rng(seed)
    cov = np.array([[2.0, 0.8], [0.8, 1.0]])
    z = np.r_[rng.multivariate_normal([0, 0], cov, n), rng.multivariate_normal([6, 2], cov, n)]
    names = [f"c{i}" for i in range(2 * n)]
    obs = pd.DataFrame({"cell_type": np.repeat(["a", "b"], n)}, index=names)
    return ad.AnnData(obs=obs, obsm={"X_lat": z}), z


def test_smoothed_bootstrap_keeps_moments_and_interpolates_copies_and_gaussian():
    adata, z = _two_types()
    cells_a = z[:400]
    for h in (0.0, 0.5, 1.0, 3.0):
        kde = sb.baselines.SmoothedBootstrap(adata, "cell_type", obsm_key="X_lat", bandwidth=h)
        sample = kde.generate(n_cells={"a": 20000}, seed=1).obsm["X_lat"].astype(np.float64)
        # the type's mean and covariance are kept at every bandwidth
        np.testing.assert_allclose(sample.mean(0), cells_a.mean(0), atol=0.05)
        np.testing.assert_allclose(np.cov(sample.T), np.cov(cells_a.T), atol=0.12)
    # h = 0: every cell is a training cell of its type
    copies = sb.baselines.SmoothedBootstrap(adata, "cell_type", obsm_key="X_lat", bandwidth=0)
    drawn = copies.generate(n_cells={"b": 50}, seed=0).obsm["X_lat"]
    nearest = np.abs(drawn[:, None, :] - z[None, 400:, :].astype(np.float32)).sum(-1).min(1)
    assert nearest.max() < 1e-5

    # larger bandwidth: cells farther from the nearest training cell
    def spread(h):
        kde = sb.baselines.SmoothedBootstrap(adata, "cell_type", obsm_key="X_lat", bandwidth=h)
        x = kde.generate(n_cells={"a": 500}, seed=2).obsm["X_lat"]
        return np.median(np.linalg.norm(x[:, None, :] - cells_a[None], axis=-1).min(1))

    assert spread(0.0) < 1e-5 < spread(0.3) < spread(1.0)


def test_smoothed_bootstrap_bad_bandwidth_and_decoding(pbmc):
    with pytest.raises(ValueError, match="bandwidth"):
        sb.baselines.SmoothedBootstrap(pbmc, "cell_type", bandwidth=-1)
    with pytest.raises(ValueError, match="bandwidth"):
        sb.baselines.SmoothedBootstrap(pbmc, "cell_type", bandwidth=float("nan"))
    kde = sb.baselines.SmoothedBootstrap(pbmc, "cell_type")
    gen = kde.generate(n_cells=10, labels=["Dendritic"], seed=0)
    assert gen.shape == (10, pbmc.n_vars) and gen.uns["scbranch"]["model"]["architecture"] == (
        "smoothed bootstrap"
    )


def test_generate_options_are_checked_and_one_label_is_a_type(pbmc):
    gauss = sb.baselines.PerClassGaussian(pbmc, "cell_type")
    with pytest.raises(TypeError, match=r"takes the option\(s\) \['residual_noise'\].*decode_with"):
        gauss.generate(5, counts=True)
    with pytest.raises(ValueError, match="residual_noise='nb'.*decode_with=model"):
        gauss.generate(5, residual_noise="nb")
    with pytest.raises(ValueError, match="whole number"):
        gauss.generate(2.5)
    gen = gauss.generate(3, labels="Dendritic", seed=0)  # not its letters
    assert gen.obs["cell_type"].value_counts()["Dendritic"] == 3 and gen.n_obs == 3


def test_decode_with_a_model_decodes_the_latents_as_the_model_does(pbmc):
    # known answer: the model's own space decoding the same latents with the same seed
    train = pbmc.copy()
    sb.BranchedDiffusion.setup_anndata(
        train, labels_key="cell_type", obsm_key="X_pca", counts_layer="counts"
    )
    model = sb.BranchedDiffusion(train, width=16, n_head_blocks=1)  # the decoder needs no training
    gauss = sb.baselines.PerClassGaussian(pbmc, "cell_type")
    gen = gauss.generate({"CD19+ B": 6, "Dendritic": 4}, seed=3, decode_with=model, counts=True)
    z = gen.obsm["X_pca"]
    np.testing.assert_array_equal(
        z, gauss.generate({"CD19+ B": 6, "Dendritic": 4}, seed=3).obsm["X_pca"]
    )
    codes = np.repeat([model.classes.index("CD19+ B"), model.classes.index("Dendritic")], [6, 4])
    options = model.space.resolve_options(counts=True, batch=None, residual_noise="nb")
    expected = model.space.decode(z, codes, options, 3)
    np.testing.assert_array_equal(np.asarray(gen.X), np.asarray(expected.X))
    assert (gen.layers["counts"] != expected.layers["counts"]).nnz == 0
    assert gen.uns["scbranch"]["params"]["residual_noise"] == "nb"
    other = sb.baselines.PerClassGaussian(pbmc, "cell_type", obsm_key="X_umap")
    with pytest.raises(ValueError, match="fit the baseline on the model's latent"):
        other.generate(2, decode_with=model)
    with pytest.raises(TypeError, match="takes residual_noise and counts"):
        gauss.generate(2, decode_with=model, batch="b0")


@pytest.mark.parametrize(
    "baseline", [sb.baselines.PerClassGaussian, sb.baselines.SmoothedBootstrap]
)
def test_same_seed_draws_the_same_cells_from_a_covariance_equal_to_float_precision(baseline):
    # A type with fewer cells than dimensions: its Ledoit-Wolf covariance repeats one eigenvalue
    # over the null space, where an SVD may return any basis. Cells differing by 1e-12 (what
    # another BLAS thread count changes) must draw the same cells with the same seed.
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20, 30)) * np.linspace(3.0, 0.5, 30)
    obs = pd.DataFrame({"cell_type": ["few"] * 20}, index=[f"c{i}" for i in range(20)])
    nudged = z * (1 + 1e-12 * rng.standard_normal(z.shape))
    draws = [
        baseline(ad.AnnData(obs=obs, obsm={"X_lat": x}), "cell_type", obsm_key="X_lat")
        .generate(n_cells=200, seed=3)
        .obsm["X_lat"]
        for x in (z, nudged)
    ]
    assert np.abs(draws[0] - draws[1]).max() < 1e-4
    assert draws[0].std(0).min() > 0.1  # the null space is drawn from, not left empty


def test_a_zero_covariance_draws_the_class_mean():
    # quality.py's class-mean probe zeroes the fitted covariances: its cells must be the means
    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"cell_type": ["a"] * 30}, index=[f"c{i}" for i in range(30)])
    gauss = sb.baselines.PerClassGaussian(
        ad.AnnData(obs=obs, obsm={"X_lat": rng.normal(size=(30, 4))}), "cell_type", "X_lat"
    )
    gauss.covariances_["a"] = np.zeros((4, 4))
    drawn = gauss.generate(n_cells=50, seed=0).obsm["X_lat"]
    np.testing.assert_allclose(drawn, np.broadcast_to(gauss.means_["a"], (50, 4)), atol=1e-6)
