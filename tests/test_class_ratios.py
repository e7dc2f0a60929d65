"""Class ratios of the negative binomial decoder: what a type holds outside the latent.

A latent of a few PCs decodes every cell to a profile inside the PCs' span; a type's mean
expression outside that span is lost, and with it part of the differences between types. The
decoder keeps, per class and gene, the ratio of the class's observed counts to the counts its
decoded means give (shrunk toward 1). Known answers: simulated counts whose class multipliers
the decoded mean does not contain.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from anndata import AnnData

import scbranch as sb
from scbranch.model._counts import class_ratios, fit_negative_binomial, sample_negative_binomial


def test_class_ratios_recover_known_multipliers():
    rng = np.random.default_rng(0)
    n, g = 20_000, 4
    codes = rng.integers(0, 2, n)
    mu = rng.uniform(2.0, 10.0, (n, g))
    truth = np.array([[2.0, 0.5, 1.0, 3.0], [0.5, 2.0, 1.0, 1.0]])
    counts = rng.poisson(mu * truth[codes])
    ratio = class_ratios(counts, mu, codes, 3)
    np.testing.assert_allclose(ratio[:2], truth, rtol=0.02)
    # a class without cells keeps the decoded mean
    np.testing.assert_array_equal(ratio[2], 1.0)


def test_class_ratios_shrink_small_classes_toward_one():
    # five cells of a gene seen at 0.2 counts each: the raw ratio 0 (never seen) would erase
    # the gene from the class; the prior keeps it near the decoded mean until evidence grows
    counts = np.zeros((5, 1))
    few = class_ratios(counts, np.full((5, 1), 0.2), np.zeros(5, int), prior=1.0)
    many = class_ratios(np.zeros((500, 1)), np.full((500, 1), 0.2), np.zeros(500, int), prior=1.0)
    assert 0.4 < few[0, 0] < 0.6  # (0 + 1) / (1 + 1)
    assert many[0, 0] < 0.01  # 1 / 101


def test_dispersion_of_a_mixture_is_the_true_one_with_class_ratios():
    # two types differ on a gene by a factor 4 that the decoded mean does not hold: around the
    # mixture's mean, the class difference reads as overdispersion; around each class's own
    # mean the fit recovers the true inverse dispersion
    # (depth in the size factors, library / 1e4, among 200 Poisson genes: as normalize_total
    # data are; see test_negative_binomial's method-of-moments test)
    rng = np.random.default_rng(1)
    n = 40_000
    codes = rng.integers(0, 2, n)
    mu = rng.uniform(2.0, 20.0, (n, 1)) * np.r_[1.0, np.full(200, 5.0)]
    multiplier = np.r_["1", np.array([2.0, 0.5])[codes, None], np.ones((n, 200))]
    counts = sample_negative_binomial(mu * multiplier, np.r_[0.3, np.zeros(200)], rng)
    s = counts.sum(1) / 1e4
    profile = np.log1p(mu / s[:, None])  # the decoded mean: the mixture's, not the class's
    plain = fit_negative_binomial(counts, s, profile)
    per_class = fit_negative_binomial(counts, s, profile, codes=codes, n_classes=2)
    assert plain["inverse_dispersion"][0] > 0.6
    np.testing.assert_allclose(per_class["inverse_dispersion"][0], 0.3, atol=0.03)
    np.testing.assert_allclose(
        per_class["class_ratio"][:, 0] * per_class["scale"][0], [2.0, 0.5], rtol=0.03
    )
    assert "class_ratio" not in plain


def _two_types_outside_two_pcs(seed: int = 0, n_per_class: int = 600) -> AnnData:
    """Two types with shared programs in two PCs and marker genes the PCs miss."""
    rng = np.random.default_rng(seed)
    n_genes = 120
    codes = np.repeat([0, 1], n_per_class)
    base = rng.normal(0.0, 1.0, n_genes) - 1.0
    programs = rng.normal(0.0, 0.8, (2, n_genes))
    log_mean = base + rng.normal(0.0, 1.0, (len(codes), 2)) @ programs
    # 30 markers per type, scattered (a weak type effect the 2 strong programs dominate)
    shift = np.zeros((2, n_genes))
    shift[0, rng.choice(n_genes, 30, replace=False)] = 0.7
    shift[1, rng.choice(n_genes, 30, replace=False)] = 0.7
    log_mean = log_mean + shift[codes]
    library = rng.lognormal(np.log(3000), 0.2, len(codes))
    mean = library[:, None] * np.exp(log_mean) / np.exp(log_mean).sum(1, keepdims=True)
    counts = sample_negative_binomial(mean, np.full(n_genes, 0.1), rng)
    adata = AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame({"cell_type": pd.Categorical(np.array(["a", "b"])[codes])}),
        var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)]),
    )
    adata.obs_names = [f"c{i}" for i in range(len(codes))]
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=2)
    return adata


def _lfc(x, labels):
    x = np.asarray(x.toarray() if sp.issparse(x) else x)
    return x[labels == "a"].mean(0) - x[labels == "b"].mean(0)


# the two PCs do not see the types apart (that is the point): the discovered tree says so
@pytest.mark.filterwarnings("ignore:Classes 'a' and 'b' are indistinguishable")
def test_decoded_cells_keep_the_differences_between_types():
    adata = _two_types_outside_two_pcs()
    sb.BranchedDiffusion.setup_anndata(
        adata, labels_key="cell_type", obsm_key="X_pca", counts_layer="counts"
    )
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    space = model.space
    codes = adata.obs["cell_type"].cat.codes.to_numpy()
    labels = adata.obs["cell_type"].to_numpy()
    options = space.resolve_options(counts=False, batch=None, residual_noise="nb")
    z = np.asarray(adata.obsm["X_pca"])
    with_ratio = space.decode(z, codes, options, 0).X
    global_nb = {k: v for k, v in space.counts.nb.items() if k != "class_ratio"}
    full_nb = space.counts.nb
    try:
        space.counts.nb = global_nb
        without = space.decode(z, codes, options, 0).X
    finally:
        space.counts.nb = full_nb
    real = _lfc(adata.X, labels)
    error_with = np.abs(_lfc(with_ratio, labels) - real).mean()
    error_without = np.abs(_lfc(without, labels) - real).mean()
    # measured: mean error 0.041 with the ratios, 0.28 without (the real lfcs' mean |value|
    # is 0.29); correlation with the real lfcs 0.99 with, 0.16 without
    assert error_with < 0.3 * error_without
    assert np.corrcoef(_lfc(with_ratio, labels), real)[0, 1] > 0.95
    assert np.corrcoef(_lfc(without, labels), real)[0, 1] < 0.5  # the markers lie outside


def test_class_ratios_survive_save_and_load(tmp_path):
    adata = _two_types_outside_two_pcs(n_per_class=80)
    sb.BranchedDiffusion.setup_anndata(
        adata, labels_key="cell_type", obsm_key="X_pca", counts_layer="counts"
    )
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    model.save(tmp_path / "m")
    loaded = sb.BranchedDiffusion.load(tmp_path / "m", adata=adata)
    np.testing.assert_array_equal(
        loaded.space.counts.nb["class_ratio"], model.space.counts.nb["class_ratio"]
    )
    assert model.space.counts.nb["class_ratio"].shape == (2, adata.n_vars)


def test_models_saved_before_the_class_ratios_still_decode():
    adata = _two_types_outside_two_pcs(n_per_class=80)
    sb.BranchedDiffusion.setup_anndata(
        adata, labels_key="cell_type", obsm_key="X_pca", counts_layer="counts"
    )
    model = sb.BranchedDiffusion(adata, width=16, n_head_blocks=1)
    state = model.space.state()
    state["negative_binomial"] = {
        k: v for k, v in state["negative_binomial"].items() if k != "class_ratio"
    }
    old = type(model.space).from_state(state)
    assert "class_ratio" not in old.counts.nb
    options = old.resolve_options(counts=True, batch=None, residual_noise="nb")
    out = old.decode(np.asarray(adata.obsm["X_pca"][:4]), np.array([0, 0, 1, 1]), options, 0)
    assert np.isfinite(out.X).all()
