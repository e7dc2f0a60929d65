"""get_denoising_error: the training loss at fixed noise levels, against known answers."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
import torch

import scbranch as sb

FAST = {"width": 32, "n_head_blocks": 1}


def _gaussian_cells(n: int = 3000, seed: int = 0) -> ad.AnnData:
    """Two labels drawn from ONE Gaussian with unequal per-dimension variances."""
    rng = np.random.default_rng(seed)
    sd = np.array([0.5, 1.0, 2.0, 3.0, 1.5, 0.8])
    x = (rng.normal(size=(n, 6)) * sd + 4.0).astype(np.float32)
    adata = ad.AnnData(np.zeros((n, 1), np.float32))
    adata.obsm["X_latent"] = x
    adata.obs["cell_type"] = pd.Categorical(np.where(np.arange(n) % 2, "A", "B"))
    return adata


def test_an_untrained_model_on_gaussian_cells_has_the_exact_posterior_error():
    """Known answer: an untrained network predicts the analytic Gaussian part alone, which for
    centred Gaussian data of per-dimension variance w is E[eps | x_t]; its error is then
    Var(eps | x_t) = alpha^2 w / (alpha^2 w + sigma^2), averaged over the dimensions."""
    adata = _gaussian_cells()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(adata, **FAST)
    times = [0.05, 0.2, 0.5, 0.9]
    report = model.get_denoising_error(times=times, n_draws=2)
    pooled = report[report["group"] == "all"].set_index("t")
    module = model.module
    w = module.data_var.cpu().numpy()
    for t in times:
        a, s = float(module.sde.alpha(torch.tensor(t))), float(module.sde.sigma(torch.tensor(t)))
        expected = float(np.mean(a**2 * w / (a**2 * w + s**2)))
        assert pooled.loc[t, "error"] == pytest.approx(expected, rel=0.03)
        assert pooled.loc[t, "error"] == pytest.approx(pooled.loc[t, "gaussian_error"], rel=1e-6)
    # tidy: one row per (group, t), the groups every type present and "all"
    assert set(report["group"]) == {"all", "A", "B"} and len(report) == 3 * len(times)
    assert (report[report["group"] == "A"]["n_cells"] == 1500).all()


def test_training_lowers_the_error_below_the_gaussian_part_and_draws_are_seeded():
    sim = sb.datasets.simulate_tree(depth=2, n_per_class=80, dim=8, seed=0).to_anndata()
    sb.BranchedDiffusion.setup_anndata(sim, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(sim, **FAST)
    model.train(max_epochs=60, enable_progress_bar=False)
    report = model.get_denoising_error(times=[0.1, 0.3], seed=1)
    pooled = report[report["group"] == "all"]
    # four separated types: one Gaussian of all cells predicts the noise far worse at low t
    assert (pooled["error"] < 0.8 * pooled["gaussian_error"]).all(), pooled
    again = model.get_denoising_error(times=[0.1, 0.3], seed=1)
    pd.testing.assert_frame_equal(report, again)
    other = model.get_denoising_error(times=[0.1, 0.3], seed=2)
    assert not np.allclose(other["error"], report["error"])
    # given cells: a subset of one type gives that type's rows only, and "all"
    part = sim[sim.obs["cell_type"] == "c1"].copy()
    sub = model.get_denoising_error(part, times=[0.1], seed=1)
    assert set(sub["group"]) == {"all", "c1"}


def test_bad_input_gets_a_clear_error(tmp_path):
    adata = _gaussian_cells(200)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(adata, **FAST)
    with pytest.raises(ValueError, match=r"times must lie in \(t_min"):
        model.get_denoising_error(times=[0.0, 0.5])
    with pytest.raises(ValueError, match="times must lie"):
        model.get_denoising_error(times=[1.5])
    with pytest.raises(ValueError, match="n_draws must be a positive integer"):
        model.get_denoising_error(n_draws=0)
    other = adata.copy()
    other.obs["cell_type"] = pd.Categorical(["C"] * other.n_obs)
    with pytest.raises(KeyError, match=r"Unknown label\(s\) \['C'\]"):
        model.get_denoising_error(other)
    del other.obs["cell_type"]
    with pytest.raises(KeyError, match="labels_key='cell_type' is not a column"):
        model.get_denoising_error(other)
    with pytest.raises(ValueError, match="no cells"):
        model.get_denoising_error(adata[:0])
    nan = adata.copy()
    nan.obsm["X_latent"][3, 2] = np.nan
    with pytest.raises(ValueError, match="cells to denoise contains 1 NaN or infinite"):
        model.get_denoising_error(nan)
    del nan.obsm["X_latent"]
    with pytest.raises(KeyError, match="obsm_key='X_latent' is not in adata.obsm"):
        model.get_denoising_error(nan)
    model.save(tmp_path / "m")
    loaded = sb.BranchedDiffusion.load(tmp_path / "m")  # without its training cells
    with pytest.raises(ValueError, match="loaded without adata.*pass adata"):
        loaded.get_denoising_error()
    report = loaded.get_denoising_error(adata, times=[0.5])
    pd.testing.assert_frame_equal(report, model.get_denoising_error(adata, times=[0.5]))


# ------------------------------------------------------------------ validation during training
def _validation_errors(model, cells: np.ndarray, codes: np.ndarray, batch_size: int) -> float:
    """The validation loss recomputed by hand: the plan's batches, times and seeded draws."""
    from scbranch.model._diagnostics import DEFAULT_TIMES, noise_errors
    from scbranch.model._training_plan import VALIDATION_SEED

    module = model.module.eval()
    gen = torch.Generator().manual_seed(VALIDATION_SEED)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(cells), batch_size):
            z = module.standardize(torch.as_tensor(cells[start : start + batch_size]))
            labels = torch.as_tensor(codes[start : start + batch_size])
            for t in DEFAULT_TIMES:
                noise = torch.randn(z.shape, generator=gen)
                err = noise_errors(module, z, labels, t, noise, gaussian=False)[0]
                total += float(err.sum())
    return total / (len(cells) * len(DEFAULT_TIMES))


def test_validation_loss_is_the_denoising_error_of_the_ema_weights_at_fixed_draws():
    # known answer: with lr = 0 the network stays at its start, the Gaussian part alone,
    # whose error on Gaussian cells is exact (as in the first test), averaged over the times
    from scbranch.model._diagnostics import DEFAULT_TIMES

    adata = _gaussian_cells(2000)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(adata, **FAST)
    model.train(max_epochs=1, lr=0.0, train_size=0.5, check_val_every_n_epoch=1)
    w = model.module.data_var.cpu().numpy()
    expected = np.mean(
        [
            np.mean(a**2 * w / (a**2 * w + s**2))
            for a, s in (
                (
                    float(model.module.sde.alpha(torch.tensor(t))),
                    float(model.module.sde.sigma(torch.tensor(t))),
                )
                for t in DEFAULT_TIMES
            )
        ]
    )
    first = float(model.history["validation_loss"].iloc[0, 0])
    assert first == pytest.approx(expected, rel=0.03)
    # only the diffusion's own losses are logged (no VAE terms with zeros)
    assert set(model.history) == {"train_loss", "validation_loss"}

    # trained: the last epoch's value is the error of the weights the model keeps (the EMA,
    # copied in at the end), on the held-out cells, with the plan's seeded draws
    sim = sb.datasets.simulate_tree(depth=2, n_per_class=80, dim=8, seed=0).to_anndata()
    sb.BranchedDiffusion.setup_anndata(sim, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(sim, **FAST)
    model.train(max_epochs=20, train_size=0.8, check_val_every_n_epoch=1, batch_size=32)
    curve = model.history["validation_loss"].iloc[:, 0].astype(float).to_numpy()
    held = np.asarray(model.validation_indices)
    codes = model.tree.class_index(sim.obs["cell_type"].astype(str).to_numpy()[held])
    cells = sim.obsm["X_latent"][held].astype(np.float32)
    assert curve[-1] == pytest.approx(_validation_errors(model, cells, codes, 32), rel=1e-5)
    assert curve[-1] < 0.9 * curve[0]  # training lowered it


@pytest.mark.parametrize("loader", ["scvi", "blocks"])
def test_validating_does_not_change_the_training(loader):
    sim = sb.datasets.simulate_tree(depth=2, n_per_class=60, dim=8, seed=1).to_anndata()
    sb.BranchedDiffusion.setup_anndata(sim, labels_key="cell_type", obsm_key="X_latent")
    weights = []
    for check in (None, 1):
        scvi.settings.seed = 0  # the same start and split for both
        model = sb.BranchedDiffusion(sim, **FAST)
        extra = {} if check is None else {"check_val_every_n_epoch": check}
        model.train(max_epochs=4, train_size=0.8, loader=loader, **extra)
        weights.append(torch.cat([p.detach().flatten() for p in model.module.parameters()]))
    assert len(model.history["validation_loss"]) == 4
    # validation noise comes from the plan's own generator and the validation loader has its
    # own: nothing is drawn from the global stream the training noise comes from
    assert torch.equal(weights[0], weights[1])


def test_early_stopping_watches_the_validation_loss_and_needs_held_out_cells():
    sim = sb.datasets.simulate_tree(depth=2, n_per_class=60, dim=8, seed=1).to_anndata()
    sb.BranchedDiffusion.setup_anndata(sim, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(sim, **FAST)
    with pytest.raises(ValueError, match=r"train_size=1 holds none out: pass train_size < 1"):
        model.train(max_epochs=2, early_stopping=True)
    model.train(
        max_epochs=200, train_size=0.8, early_stopping=True, early_stopping_patience=3, lr=3e-3
    )
    curve = model.history["validation_loss"].iloc[:, 0].astype(float).to_numpy()
    assert len(curve) < 200  # stopped on the validation loss
    # and kept the weights of the lowest point, not those a patience later
    assert curve.argmin() < len(curve) - 1
    held = np.asarray(model.validation_indices)
    codes = model.tree.class_index(sim.obs["cell_type"].astype(str).to_numpy()[held])
    cells = sim.obsm["X_latent"][held].astype(np.float32)
    kept = _validation_errors(model, cells, codes, 64)
    assert kept == pytest.approx(curve.min(), rel=1e-5)
    assert kept < curve[-1]


def test_a_second_train_call_trains_in_training_mode():
    """scvi-tools leaves the module in eval mode after training; the plan switches it back."""
    import warnings

    sim = sb.datasets.simulate_tree(depth=2, n_per_class=30, dim=8, seed=2).to_anndata()
    sb.BranchedDiffusion.setup_anndata(sim, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(sim, **FAST)
    model.train(max_epochs=1)
    assert not model.module.training
    seen = []
    plan = sb.model.DiffusionTrainingPlan
    original = plan.on_train_start

    def spy(self):
        seen.append(self.module.training)
        original(self)

    with warnings.catch_warnings(record=True) as caught, pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("always")
        mp.setattr(plan, "on_train_start", spy)
        model.train(max_epochs=1)
    assert seen == [True]
    assert not [w for w in caught if "in eval mode" in str(w.message)]


def test_validation_size_alone_holds_that_fraction_out_and_a_second_train_keeps_its_history():
    sim = sb.datasets.simulate_tree(depth=2, n_per_class=30, dim=8, seed=3).to_anndata()
    sb.BranchedDiffusion.setup_anndata(sim, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(sim, **FAST)
    model.train(max_epochs=2, validation_size=0.25, check_val_every_n_epoch=1)
    assert len(model.validation_indices) == pytest.approx(0.25 * sim.n_obs, abs=1)
    assert len(model.train_indices) + len(model.validation_indices) == sim.n_obs
    assert len(model.history["validation_loss"]) == 2
    with pytest.raises(ValueError, match="validation_size must lie between 0 and 1"):
        model.train(max_epochs=1, validation_size=1.5)

    # scvi-tools merges a further train()'s history only into keys the first one logged:
    # validation of a second call after one without it was dropped
    model = sb.BranchedDiffusion(sim, **FAST)
    model.train(max_epochs=2)
    assert set(model.history) == {"train_loss"}
    model.train(max_epochs=3, train_size=0.8, check_val_every_n_epoch=1)
    assert len(model.history["train_loss"]) == 5
    validation = model.history["validation_loss"]
    assert len(validation) == 3 and list(validation.index) == [2, 3, 4]  # after the 2 before
