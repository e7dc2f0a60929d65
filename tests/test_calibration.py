"""Spread calibration: each type's generated cells get its training cells' spread per dimension."""

import numpy as np
import pytest

import scbranch as sb
from scbranch.model._calibration import CALIBRATION_CELLS, calibrate_type, class_variances
from scbranch.module._gaussian_skip import class_statistics

FAST = {"width": 32, "n_head_blocks": 1}
REP = "X_latent"


@pytest.fixture(scope="module")
def trained():
    """A model trained a few epochs on a known tree: its cells are not yet the types' cells."""
    adata = sb.datasets.simulate_tree(depth=2, n_per_class=80, dim=6, seed=0).to_anndata()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key=REP)
    model = sb.BranchedDiffusion(adata, **FAST)
    model.train(max_epochs=15, enable_progress_bar=False)
    return model, adata


def _by_type(gen, key=REP):
    labels = gen.obs["cell_type"].to_numpy()
    return {c: np.asarray(gen.obsm[key][labels == c], dtype=np.float64) for c in np.unique(labels)}


def test_training_variances_are_the_types_own(trained):
    model, adata = trained
    labels = adata.obs["cell_type"].to_numpy()
    for k, c in enumerate(model.classes):
        expected = adata.obsm[REP][labels == c].astype(np.float64).var(0, ddof=1)
        np.testing.assert_allclose(model.class_variances_[k], expected, rtol=1e-6)


def test_class_variances_with_full_second_moments():
    rng = np.random.default_rng(0)
    x, lab = rng.normal(size=(50, 3)) * [1.0, 2.0, 3.0], np.repeat([0, 1], 25)
    stats = class_statistics([(0, 50, x)], lab, 2, 0.0, 1.0, full=True)
    expected = np.stack([x[lab == k].var(0, ddof=1) for k in (0, 1)])
    np.testing.assert_allclose(class_variances(stats, 1.0), expected, rtol=1e-10)


def test_calibrated_cells_have_the_training_spread(trained):
    """Known answer: every type's generated variance, per dimension, is its training cells'
    variance (up to the sampling error of two samples of a few thousand cells), while the
    uncalibrated cells of the same under-trained network are not."""
    model, adata = trained
    kw = {"n_cells": 3000, "seed": 3, "progress_bar": False}
    cal = _by_type(model.generate(calibrate_spread=True, **kw))
    raw = _by_type(model.generate(**kw))  # the default: the sampler's cells
    labels = adata.obs["cell_type"].to_numpy()
    log_cal, log_raw = [], []
    for c in model.classes:
        target = adata.obsm[REP][labels == c].astype(np.float64).var(0, ddof=1)
        log_cal.append(np.log(cal[c].var(0, ddof=1) / target))
        log_raw.append(np.log(raw[c].var(0, ddof=1) / target))
        # the centre is the model's (measured on the calibration cells, so up to their
        # sampling error): calibration moves the cells towards it, not the centre elsewhere
        error = raw[c].std(0, ddof=1) / np.sqrt(CALIBRATION_CELLS)
        assert np.all(np.abs(cal[c].mean(0) - raw[c].mean(0)) < 4 * error)
    log_cal, log_raw = np.abs(log_cal), np.abs(log_raw)
    # the log of a variance ratio between 500 and 3,000 cells has a standard error of 0.07:
    # on average within it, and no type and dimension beyond 3.5 of them
    assert log_cal.mean() < 0.07 and log_cal.max() < 0.25
    assert log_raw.mean() > 5 * log_cal.mean()  # the network alone was measurably off


def test_calibration_is_measured_once_per_sampler_and_forgotten_by_training(trained):
    model, _ = trained
    on = {"calibrate_spread": True, "progress_bar": False}
    model.generate(n_cells=5, seed=0, **on)
    model.generate(n_cells=5, seed=1, labels=["c0"], solver="ei", **on)
    cache = model._spread_calibrations
    assert len(cache) == 2  # the default sampler and the exponential integrator
    assert sorted(cache[("ei", 25, "logsnr")]) == [0]  # only the type asked for
    factors = cache[("em", 25, "t")][0].factor.copy()
    model.generate(n_cells=5, seed=2, **on)
    np.testing.assert_array_equal(cache[("em", 25, "t")][0].factor, factors)  # kept
    model.train(max_epochs=1, enable_progress_bar=False)
    assert not getattr(model, "_spread_calibrations", {})


def test_calibrated_cells_survive_save_and_load(trained, tmp_path):
    model, adata = trained
    on = {"calibrate_spread": True, "progress_bar": False}
    before = model.generate(n_cells=20, seed=5, **on)
    model.save(tmp_path / "m")
    loaded = sb.BranchedDiffusion.load(tmp_path / "m", adata=adata)
    np.testing.assert_array_equal(loaded.class_variances_, model.class_variances_)
    after = loaded.generate(n_cells=20, seed=5, **on)
    np.testing.assert_array_equal(after.obsm[REP], before.obsm[REP])
    assert after.uns["scbranch"]["params"]["calibrate_spread"]


def test_a_model_without_training_variances_generates_uncalibrated(trained, caplog):
    model, _ = trained
    kept = model.class_variances_
    try:
        model.class_variances_ = None  # as saved before the variances were measured
        with caplog.at_level("INFO", logger="scbranch.model._calibration"):
            gen = model.generate(n_cells=10, seed=4, progress_bar=False, calibrate_spread=True)
        raw = model.generate(n_cells=10, seed=4, progress_bar=False)
    finally:
        model.class_variances_ = kept
    assert "not spread-calibrated" in caplog.text
    assert not gen.uns["scbranch"]["params"]["calibrate_spread"]
    np.testing.assert_array_equal(gen.obsm[REP], raw.obsm[REP])


def test_a_flat_dimension_is_left_alone():
    gen = np.column_stack([np.arange(10.0), np.full(10, 2.0)])
    cal = calibrate_type(gen, variance=np.array([gen[:, 0].var(ddof=1), 1.0]))
    np.testing.assert_allclose(cal.factor, [1.0, 1.0])
    np.testing.assert_allclose(cal.apply(gen), gen)


def test_a_new_type_leaves_the_old_types_calibrated_cells_bit_for_bit():
    """Each type is calibrated on its own run, on the grid of its own branch points: adding a
    type changes the tree, not the old types' factors (nor their cells)."""
    sim = sb.datasets.simulate_tree(depth=2, n_per_class=60, dim=6, seed=1).to_anndata()
    old = sim[sim.obs["cell_type"] != "c3"].copy()
    old.obs["cell_type"] = old.obs["cell_type"].cat.remove_unused_categories()
    sb.BranchedDiffusion.setup_anndata(old, labels_key="cell_type", obsm_key=REP)
    model = sb.BranchedDiffusion(old, **FAST)
    model.train(max_epochs=10, enable_progress_bar=False)
    on = {"calibrate_spread": True, "progress_bar": False, "seed": 2}
    before = model.generate(n_cells=20, **on)
    model.add_classes(sim, labels=["c3"], max_epochs=5, progress_bar=False)
    assert model.class_variances_.shape == (4, 6)
    after = model.generate(n_cells=20, labels=["c0", "c1", "c2"], **on)
    np.testing.assert_array_equal(after.obsm[REP], before.obsm[REP])
    new = model.generate(n_cells=500, labels=["c3"], **on).obsm[REP].astype(np.float64)
    target = sim.obsm[REP][sim.obs["cell_type"].to_numpy() == "c3"].var(0, ddof=1)
    assert np.abs(np.log(new.var(0, ddof=1) / target)).max() < 0.35  # the new type's own spread


def test_trajectories_refuse_calibration_and_devices_and_say_why(trained):
    model, _ = trained
    with pytest.raises(ValueError, match="trajectories follow single cells"):
        model.generate(n_cells=2, trajectory_times=[0.5, 0.0], calibrate_spread=True)
    with pytest.raises(ValueError, match="trajectories are one block"):
        model.generate(n_cells=2, trajectory_times=[0.5, 0.0], devices=["cpu"])


@pytest.mark.parametrize("space", ["expression", "scvi"])
def test_every_space_calibrates_what_it_diffuses(space):
    """Expression models diffuse the log-normalised genes, scVI models scVI's latent: the
    variances are measured on that representation, and calibrated latents have them."""
    from _counts import count_data

    from scbranch.model._calibration import type_calibrations

    adata = count_data(n_per_class=40, n_genes=24, seed=3)
    if space == "scvi":
        vae = sb.model.fit_scvi(adata, counts_layer="counts", max_epochs=2, n_latent=4)
        model = sb.BranchedDiffusion.from_scvi_model(vae, labels_key="cell_type", adata=adata)
    else:
        sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", counts_layer="counts")
        model = sb.BranchedDiffusion(adata, **FAST)
    model.train(max_epochs=2, enable_progress_bar=False)
    x = model.space.training_matrix(model.adata)
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)
    labels = model.adata.obs["cell_type"].to_numpy()
    expected = np.stack([x[labels == c].var(0, ddof=1) for c in model.classes])
    np.testing.assert_allclose(model.class_variances_, expected, rtol=1e-5, atol=1e-8)
    gen = model.generate(n_cells=3, seed=0, calibrate_spread=True, progress_bar=False)
    assert gen.uns["scbranch"]["params"]["calibrate_spread"] and gen.n_obs == 12
    # the calibration run's own cells, calibrated, have the training variances
    kept = type_calibrations(model, [0], {"solver": "em", "n_steps": 25, "spacing": "t"})
    res = model.module.sample_cells({0: 500}, seed=11)  # other cells than the calibration's
    z = kept[0].apply(res.x.double().cpu().numpy())
    ratio = z.var(0, ddof=1) / np.maximum(expected[0], 1e-12)
    assert np.abs(np.log(ratio[expected[0] > 1e-6])).mean() < 0.15
