"""The per-branch Gaussian skip: exact for Gaussian data, and what an untrained model samples."""

import numpy as np
import pytest
import torch
from _gaussian import GaussianMixtureEps

from scbranch.module import VPSDE, BranchedDiffusionModule, BranchTree
from scbranch.module._gaussian_skip import (
    SHRINK_CELLS,
    class_statistics,
    gaussian_eps,
    group_moments,
)


def _covariance(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.2 * np.eye(d)


@pytest.mark.parametrize("full", [True, False])
def test_gaussian_eps_is_the_exact_noise_prediction_of_a_gaussian(full):
    rng = np.random.default_rng(0)
    d = 5
    means = rng.normal(size=(2, d))
    covs = [_covariance(rng, d) for _ in range(2)]
    if not full:
        covs = [np.diag(np.diag(c)) for c in covs]
    tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.5)])
    exact = GaussianMixtureEps(means, covs, tree, VPSDE())
    lam, basis = zip(*(np.linalg.eigh(c) for c in covs), strict=True)
    var = np.stack(lam) if full else np.stack([np.diag(c) for c in covs])
    x = torch.as_tensor(rng.normal(size=(40, d)), dtype=torch.float32)
    function = torch.as_tensor(rng.integers(0, 2, size=40))
    sde = VPSDE()
    for t in (0.05, 0.3, 0.9):
        tt = torch.tensor(t)
        got = gaussian_eps(
            x,
            sde.alpha(tt),
            sde.sigma(tt),
            function,
            torch.as_tensor(means, dtype=torch.float32),
            torch.as_tensor(var, dtype=torch.float32),
            torch.as_tensor(np.stack(basis), dtype=torch.float32) if full else None,
        )
        want = torch.empty_like(x)
        for f in (0, 1):
            rows = function == f
            want[rows] = exact.eps(x[rows], t, [f])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_per_row_times_match_one_time_per_call():
    rng = np.random.default_rng(1)
    d = 4
    mean = torch.as_tensor(rng.normal(size=(3, d)), dtype=torch.float32)
    var = torch.as_tensor(rng.uniform(0.5, 2, size=(3, d)), dtype=torch.float32)
    basis = torch.linalg.qr(torch.as_tensor(rng.normal(size=(3, d, d)), dtype=torch.float32))[0]
    x = torch.as_tensor(rng.normal(size=(30, d)), dtype=torch.float32)
    function = torch.as_tensor(rng.integers(0, 3, size=30))
    t = torch.as_tensor(rng.uniform(0.01, 1, size=30), dtype=torch.float32)
    sde = VPSDE()
    batch = gaussian_eps(
        x, sde.alpha(t)[:, None], sde.sigma(t)[:, None], function, mean, var, basis
    )
    for i in range(0, 30, 7):
        one = gaussian_eps(
            x[i : i + 1], sde.alpha(t[i]), sde.sigma(t[i]), function[i : i + 1], mean, var, basis
        )
        torch.testing.assert_close(batch[i : i + 1], one, atol=1e-5, rtol=1e-5)


def test_group_moments_are_the_cells_mean_and_shrunk_covariance():
    rng = np.random.default_rng(2)
    d = 3
    x = np.concatenate([rng.normal(size=(500, d)) @ np.diag([1, 2, 3]), rng.normal(size=(4, d))])
    labels = np.r_[np.zeros(500, int), np.ones(4, int)]
    blocks = [(0, 200, x[:200]), (200, len(x), x[200:])]  # streamed in two blocks
    stats = class_statistics(blocks, labels, 2, np.zeros(d), 1.0, full=True)
    prior = np.full(d, 7.0)
    m = group_moments(stats, [(0,), (1,), (0, 1)], prior)
    for g, rows in enumerate([labels == 0, labels == 1, np.ones(len(x), bool)]):
        cells = x[rows]
        n = len(cells)
        w = (n - 1) / (n - 1 + SHRINK_CELLS)
        want = w * np.cov(cells.T) + (1 - w) * np.diag(prior)
        cov = m["basis"][g] @ np.diag(m["var"][g]) @ m["basis"][g].T
        np.testing.assert_allclose(m["mean"][g], cells.mean(0), atol=1e-10)
        np.testing.assert_allclose(cov, want, atol=1e-8)
    # 4 cells: mostly the prior, so a rare type's Gaussian is not a degenerate one
    assert m["var"][1].min() > 0.5 * 7.0
    diag = group_moments(
        class_statistics(blocks, labels, 2, np.zeros(d), 1.0, full=False), [(0,)], prior
    )
    w = 499 / (499 + SHRINK_CELLS)
    want = w * np.diag(np.cov(x[:500].T)) + (1 - w) * prior
    np.testing.assert_allclose(diag["var"][0], want, rtol=1e-8)
    assert "basis" not in diag


def _module_on_gaussians(gaussian_skip: str):
    """Two separated Gaussian types, joined high up (t = 0.97), heads untrained."""
    rng = np.random.default_rng(3)
    d = 4
    means = np.array([[3.0, 0, 0, 0], [-3.0, 1.0, 0, 0]])
    covs = [np.diag([0.3, 1.0, 0.5, 0.2]), _covariance(rng, d)]
    x = np.concatenate([rng.multivariate_normal(means[c], covs[c], size=4000) for c in (0, 1)])
    labels = np.repeat([0, 1], 4000)
    tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.97)])
    module = BranchedDiffusionModule(d, tree.to_dict(), width=16, gaussian_skip=gaussian_skip)
    module.set_standardization(np.zeros(d), 1.0, x.var(0))
    module.set_gaussian_skip(
        class_statistics([(0, len(x), x)], labels, 2, np.zeros(d), 1.0, full=True)
    )
    return module, means, covs


@pytest.mark.parametrize("gaussian_skip", ["per_branch", "global"])
def test_an_untrained_model_samples_each_types_gaussian_only_with_per_branch(gaussian_skip):
    """Known answer: with zero-initialised output layers the network adds nothing, so the
    per-branch model samples each type's Gaussian (below the branch point, which is almost
    everything here); the global one samples a centred Gaussian for both (the test can fail)."""
    module, means, covs = _module_on_gaussians(gaussian_skip)
    x = module.sample({0: 3000, 1: 3000}, n_steps=60, seed=0).numpy()
    ok = []
    for c, rows in enumerate([slice(0, 3000), slice(3000, 6000)]):
        mean_err = np.abs(x[rows].mean(0) - means[c]).max()
        cov_err = np.abs(np.cov(x[rows].T) - covs[c]).max()
        ok.append(mean_err < 0.15 and cov_err < 0.2)
    assert all(ok) == (gaussian_skip == "per_branch")


def test_set_gaussian_skip_from_keeps_the_earlier_functions():
    module, _, _ = _module_on_gaussians("per_branch")
    before = {k: getattr(module, f"skip_{k}").clone() for k in ("mean", "var", "basis")}
    rng = np.random.default_rng(4)
    z = rng.normal(loc=5.0, size=(50, 4))
    stats = class_statistics([(0, 50, z)], np.full(50, 1), 2, 0.0, 1.0, full=True)
    module.set_gaussian_skip(stats, first=1)
    for k, old in before.items():
        new = getattr(module, f"skip_{k}")
        assert new.shape == old.shape
        assert torch.equal(new[:1], old[:1])
    # function 1 is the leaf of class 1: now the moments of z
    np.testing.assert_allclose(module.skip_mean[1].numpy(), z.mean(0), atol=1e-5)


def test_unknown_gaussian_skip_is_refused():
    tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.5)])
    with pytest.raises(ValueError, match="gaussian_skip must be one of"):
        BranchedDiffusionModule(2, tree.to_dict(), gaussian_skip="local")


def _model(gaussian_skip="per_branch", architecture="branched"):
    import scbranch as sb
    from scbranch.datasets import simulate_tree

    sim = simulate_tree(depth=2, n_per_class=30, dim=6, seed=0)
    adata = sim.to_anndata(labels_key="cell_type", obsm_key="X_latent")
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(
        adata, width=16, n_head_blocks=1, gaussian_skip=gaussian_skip, architecture=architecture
    )
    return adata, model


@pytest.mark.parametrize("architecture", ["branched", "conditioned", "flat"])
def test_the_model_fits_each_functions_gaussian_on_its_cells(architecture):
    adata, model = _model(architecture=architecture)
    module = model.module
    z = (adata.obsm["X_latent"] - module.shift.numpy()) / float(module.scale)
    labels = adata.obs["cell_type"].cat.codes.to_numpy()
    groups = module.function_classes()
    assert len(groups) == module.skip_mean.shape[0]
    for f, classes in enumerate(groups):
        np.testing.assert_allclose(
            module.skip_mean[f].numpy(), z[np.isin(labels, classes)].mean(0), atol=1e-5
        )
    if architecture != "flat":  # the root function serves every class
        assert len(groups[model.tree.branches[model.tree.root].head]) == len(model.classes)


def test_models_saved_before_the_option_load_with_the_global_gaussian(tmp_path):
    from _legacy import save_without_option

    import scbranch as sb

    adata, model = _model(gaussian_skip="global")
    save_without_option(model, tmp_path / "old", "gaussian_skip")
    loaded = sb.BranchedDiffusion.load(tmp_path / "old")
    assert loaded.module.gaussian_skip == "global"
    before = model.generate(n_cells=3, seed=0, progress_bar=False)
    after = loaded.generate(n_cells=3, seed=0, progress_bar=False)
    np.testing.assert_array_equal(before.obsm["X_latent"], after.obsm["X_latent"])
    _, new = _model()
    new.save(tmp_path / "new")
    assert sb.BranchedDiffusion.load(tmp_path / "new").module.gaussian_skip == "per_branch"


@pytest.mark.parametrize("architecture", ["branched", "conditioned"])
def test_add_classes_keeps_old_gaussians_and_samples_and_fits_the_new_leaf(architecture):
    import scbranch as sb
    from scbranch.datasets import simulate_tree

    sim = simulate_tree(depth=2, n_per_class=60, dim=6, seed=0).to_anndata(
        labels_key="cell_type", obsm_key="X_latent"
    )
    old = sim[sim.obs["cell_type"] != "c3"].copy()
    old.obs["cell_type"] = old.obs["cell_type"].cat.remove_unused_categories()
    sb.BranchedDiffusion.setup_anndata(old, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(
        old, width=16, n_head_blocks=1, gaussian_skip="per_branch", architecture=architecture
    )
    model.train(max_epochs=2, enable_progress_bar=False)
    classes = list(model.classes)
    before = model.generate(n_cells=10, labels=classes, seed=1, progress_bar=False)
    rows = {k: getattr(model.module, f"skip_{k}").clone() for k in ("mean", "var", "basis")}
    model.add_classes(sim, labels=["c3"], max_epochs=2, progress_bar=False)
    after = model.generate(n_cells=10, labels=classes, seed=1, progress_bar=False)
    np.testing.assert_array_equal(before.obsm["X_latent"], after.obsm["X_latent"])
    module = model.module
    for k, old_rows in rows.items():
        assert torch.equal(getattr(module, f"skip_{k}")[: len(old_rows)], old_rows)
    leaf = model.tree.branches[model.tree.leaf(model.classes.index("c3"))].head
    new = sim.obsm["X_latent"][(sim.obs["cell_type"] == "c3").to_numpy()]
    want = (new - module.shift.numpy()) / float(module.scale)
    np.testing.assert_allclose(module.skip_mean[leaf].numpy(), want.mean(0), atol=1e-4)
