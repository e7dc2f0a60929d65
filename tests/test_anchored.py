"""Anchored generation (``model.generate_anchored``): known answers and bad input."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from _gaussian import GaussianMixtureEps
from sklearn.neighbors import KNeighborsClassifier
from test_transmutation import FAST, _sim

import scbranch as sb
from scbranch._keys import Key
from scbranch.model._anchored import anchor_rows

#: two Gaussian types in 2-D (data units): far apart, with different shapes
MEANS = np.array([[6.0, 0.0], [-4.0, 3.0]])
COVS = np.array([[[2.0, 0.8], [0.8, 1.0]], [[0.5, 0.0], [0.0, 3.0]]])


@pytest.fixture(scope="module")
def exact():
    """A model whose network is replaced by the exact noise predictor of its data (two
    Gaussians): anchored generation from cells of the data must give the data again."""
    rng = np.random.default_rng(0)
    n = 3000
    z = np.vstack([rng.multivariate_normal(MEANS[c], COVS[c], n) for c in (0, 1)])
    labels = np.repeat(["A", "B"], n)
    adata = ad.AnnData(
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical(labels)}, index=[f"c{i}" for i in range(2 * n)]
        ),
        obsm={"X_z": z.astype(np.float32)},
    )
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_z")
    tree = sb.module.BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.6)])
    model = sb.BranchedDiffusion(adata, hierarchy=tree, **FAST)
    module = model.module
    shift, scale = module.shift.double().numpy(), float(module.scale)
    eps = GaussianMixtureEps(
        (MEANS - shift) / scale, COVS / scale**2, module.tree, module.sde
    )  # the data's law in the standardised space the module diffuses
    module.eps_fn = lambda: eps
    return adata, model


@pytest.mark.parametrize("anchor_time", [0.3, 1.0])
def test_anchors_from_the_data_give_the_data(exact, anchor_time):
    adata, model = exact
    gen = model.generate_anchored(
        adata, 3000, anchor_time=anchor_time, n_steps=200, seed=0, progress_bar=False
    )
    for c, name in enumerate(("A", "B")):
        z = gen[gen.obs["cell_type"] == name].obsm["X_z"]
        assert np.abs(z.mean(0) - MEANS[c]).max() < 0.15
        assert np.abs(np.cov(z.T) - COVS[c]).max() < 0.25 * np.abs(COVS[c]).max()


def test_anchor_time_sets_how_much_of_the_anchor_is_kept(exact):
    adata, model = exact
    kept = {}
    for t in (0.002, 0.05, 0.15, 0.3, 1.0):
        gen = model.generate_anchored(
            adata, {"A": 1500}, anchor_time=t, n_steps=100, seed=1, progress_bar=False
        )
        anchors = adata[gen.obs[Key.obs.ANCHOR].to_numpy()].obsm["X_z"]
        kept[t] = np.corrcoef(gen.obsm["X_z"][:, 0], anchors[:, 0])[0, 1]
    assert kept[0.002] > 0.99  # at t_min the cells are their anchors
    assert kept[0.002] > kept[0.05] > kept[0.15] > kept[0.3]
    assert abs(kept[1.0]) < 0.1  # at t = 1 the anchors are forgotten


def test_anchor_rows_use_every_anchor_in_turn():
    labels = np.array([0] * 3 + [1] * 5)
    rows = anchor_rows(labels, {0: 10, 1: 2}, seed=0)
    assert len(rows) == 12
    assert set(labels[rows[:10]]) == {0} and set(labels[rows[10:]]) == {1}
    used = np.bincount(rows[:10], minlength=3)
    assert used.max() - used.min() <= 1
    assert len(set(rows[10:])) == 2  # fewer cells than anchors: no anchor twice
    assert np.array_equal(rows, anchor_rows(labels, {0: 10, 1: 2}, seed=0))


@pytest.fixture(scope="module")
def trained():
    adata = _sim()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_pca")
    model = sb.BranchedDiffusion(adata, **FAST)
    model.train(max_epochs=60, enable_progress_bar=False)
    return adata, model


def test_anchored_cells_keep_their_type_and_layout(trained):
    adata, model = trained
    gen = model.generate_anchored(adata, {"c0": 40, "c3": 25}, seed=3, progress_bar=False)
    assert gen.n_obs == 65 and list(gen.obs["cell_type"].cat.categories) == model.classes
    assert gen.obs[Key.obs.GENERATED].all()
    anchors = gen.obs[Key.obs.ANCHOR].to_numpy()
    assert np.array_equal(
        adata.obs.loc[anchors, "cell_type"].to_numpy(), gen.obs["cell_type"].to_numpy()
    )
    knn = KNeighborsClassifier(15).fit(adata.obsm["X_pca"], adata.obs["cell_type"].astype(str))
    assert np.mean(knn.predict(gen.obsm["X_pca"]) == gen.obs["cell_type"].to_numpy()) >= 0.9
    params = gen.uns["scbranch"]["params"]
    assert params["kind"] == "anchored" and params["anchor_time"] == 0.25
    assert params["n_network_calls"] == params["n_steps"] + 1
    # new cells: not the anchors
    assert np.median(np.linalg.norm(gen.obsm["X_pca"] - adata[anchors].obsm["X_pca"], axis=1)) > 0
    again = model.generate_anchored(adata, {"c0": 40, "c3": 25}, seed=3, progress_bar=False)
    assert np.array_equal(gen.obsm["X_pca"], again.obsm["X_pca"])
    assert np.allclose(gen.X, again.X)


def test_int_request_covers_the_types_present(trained):
    adata, model = trained
    some = adata[adata.obs["cell_type"].isin(["c1", "c2"])].copy()
    gen = model.generate_anchored(some, 7, seed=0, progress_bar=False)
    assert gen.obs["cell_type"].value_counts()[["c1", "c2"]].tolist() == [7, 7]
    assert gen.obs["cell_type"].value_counts()[["c0", "c3"]].tolist() == [0, 0]


def test_user_anndata_is_not_modified(trained):
    adata, model = trained
    before = adata.copy()
    model.generate_anchored(adata, 5, seed=0, progress_bar=False)
    assert adata.obs.equals(before.obs) and list(adata.obsm) == list(before.obsm)
    assert np.array_equal(adata.obsm["X_pca"], before.obsm["X_pca"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"anchor_time": 0.0}, "anchor_time must lie in"),
        ({"anchor_time": 1.5}, "anchor_time must lie in"),
        ({"n_steps": 0}, "n_steps must be a positive integer"),
        ({"n_cells": {"nope": 3}}, "Unknown cell type"),
        ({"n_cells": {"c0": -1}}, "non-negative"),
        ({"n_cells": {"c0": 0}}, "Nothing to generate"),
    ],
)
def test_bad_arguments_are_named(trained, kwargs, message):
    adata, model = trained
    with pytest.raises(ValueError, match=message):
        model.generate_anchored(adata, **{"progress_bar": False, **kwargs})


def test_missing_anchor_types_and_labels_are_named(trained):
    adata, model = trained
    only_c0 = adata[adata.obs["cell_type"] == "c0"].copy()
    with pytest.raises(ValueError, match=r"No anchor cells of \['c2'\]"):
        model.generate_anchored(only_c0, {"c0": 3, "c2": 3}, progress_bar=False)
    unlabelled = adata.copy()
    del unlabelled.obs["cell_type"]
    with pytest.raises(KeyError, match="cell_type"):
        model.generate_anchored(unlabelled, 3, progress_bar=False)
    strange = adata[:5].copy()
    strange.obs["cell_type"] = pd.Categorical(["alien"] * 5)
    with pytest.raises(KeyError, match=r"Unknown label\(s\) \['alien'\];"):
        model.generate_anchored(strange, 3, progress_bar=False)
    with pytest.raises(ValueError, match="no anchor cells"):
        model.generate_anchored(adata[:0].copy(), 3, progress_bar=False)
    with pytest.raises(TypeError, match="AnnData"):
        model.generate_anchored(adata.obsm["X_pca"], 3, progress_bar=False)


def test_non_finite_anchors_are_refused(trained):
    adata, model = trained
    bad = adata[:10].copy()
    bad.obsm["X_pca"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN|non-finite|inf"):
        model.generate_anchored(bad, 3, progress_bar=False)


def test_anchors_with_one_name_are_refused(trained):
    # obs['scbranch_anchor'] read ['a', 'a', 'a']: which cell each came from was lost
    adata, model = trained
    same = adata[:4].copy()
    same.obs_names = ["a"] * 4
    with pytest.raises(ValueError, match="obs_names are not unique.*obs_names_make_unique"):
        model.generate_anchored(same, 3, progress_bar=False)


def test_the_seed_draws_the_noise(exact):
    adata, model = exact
    one = model.generate_anchored(adata, {"B": 50}, seed=5, progress_bar=False).obsm["X_z"]
    two = model.generate_anchored(adata, {"B": 50}, seed=6, progress_bar=False).obsm["X_z"]
    assert not np.allclose(one, two)
    assert torch.isfinite(torch.as_tensor(one)).all()


@pytest.mark.parametrize("architecture", ["flat", "conditioned"])
def test_every_architecture_generates_anchored(architecture):
    adata = _sim(n_per_class=30)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_pca")
    model = sb.BranchedDiffusion(adata, architecture=architecture, width=32)
    model.train(max_epochs=2, enable_progress_bar=False)
    gen = model.generate_anchored(adata, {"c1": 5, "c2": 5}, seed=0, progress_bar=False)
    assert gen.obs["cell_type"].value_counts()[["c1", "c2"]].tolist() == [5, 5]
    assert np.isfinite(gen.obsm["X_pca"]).all()


def test_a_group_of_the_hierarchy_is_named_as_one(trained):
    # it was called an unknown cell type, where transmute and hybrids say what it is
    adata, _ = trained
    named = sb.BranchedDiffusion(adata, hierarchy={"AB": ["c0", "c1"], "CD": ["c2", "c3"]}, **FAST)
    with pytest.raises(KeyError, match="'AB' is a group of the hierarchy \\(c0, c1\\)"):
        named.generate_anchored(adata, {"AB": 3}, progress_bar=False)
