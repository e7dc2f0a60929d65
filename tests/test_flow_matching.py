"""objective="flow": flow matching's velocity of the linear interpolant, against known answers.

The interpolant x_s = (1 - s) x_0 + s eps is the VP state x_t / (alpha + sigma) at
s = sigma / (alpha + sigma); the answers below are derived in the interpolant's own coordinates,
so they check the map between the two processes as well as the loss.
"""

import numpy as np
import pytest
import torch

import scbranch as sb
from scbranch.module import VPSDE, BranchedDiffusionModule, BranchTree, draw_times

SDE = VPSDE()
TREE = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.5)])
W = torch.tensor([0.25, 1.0, 4.0, 9.0, 2.25, 0.64])  # per-dimension variances of the data
FAST = {"width": 32, "n_head_blocks": 1}


def _module(objective: str) -> BranchedDiffusionModule:
    module = BranchedDiffusionModule(6, TREE.to_dict(), objective=objective, **FAST)
    module.set_standardization(np.zeros(6), 1.0, W.numpy())
    return module


def _batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "X": torch.randn(n, 6, generator=gen) * W.sqrt(),
        "labels": (torch.arange(n) % 2).view(-1, 1).float(),
    }


def test_interpolant_times_are_uniform_in_s_and_stay_in_range():
    gen = torch.Generator().manual_seed(0)
    t = draw_times(SDE, 400, t_sampling="interpolant", generator=gen)
    s = np.sort(SDE.interpolant_time(t).numpy())
    lo, hi = float(SDE.interpolant_time(torch.tensor(SDE.t_min))), float(SDE.interpolant_time(1.0))
    # stratified: one draw in each of 400 equal slices of [s(t_min), s(1)]
    slices = np.floor((s - lo) / (hi - lo) * 400).clip(0, 399)
    assert len(np.unique(slices)) == 400
    assert t.min() >= SDE.t_min and t.max() <= 1.0
    part = draw_times(SDE, 50, t_sampling="interpolant", t_range=(0.1, 0.4), generator=gen)
    assert part.min() >= 0.1 and part.max() <= 0.4
    # half the times where s < 0.5 (log-SNR > 0, t < 0.26), where uniform in t puts a quarter
    assert 0.4 < float((s < 0.5).mean()) < 0.6


def test_an_untrained_flow_model_has_the_exact_velocity_and_its_posterior_error():
    """Known answer in the interpolant's coordinates: for centred Gaussian data of variance w,
    E[eps - x_0 | x_s] = (s - (1 - s) w) x_s / ((1 - s)^2 w + s^2) and the velocity loss of that
    prediction is Var(eps - x_0 | x_s) = w / ((1 - s)^2 w + s^2). An untrained network adds
    nothing to the exact Gaussian part, so both must hold."""
    torch.manual_seed(0)
    module = _module("flow")
    n = 40_000
    batch = _batch(n)
    with torch.no_grad():
        inf = module.inference(**module._get_inference_input(batch))
        gen = module.generative(**module._get_generative_input(batch, inf))
        loss = module.training_error(gen["eps"], inf["noise"], inf["t"])
        assert float(module.loss(batch, inf, gen).loss) == pytest.approx(float(loss.mean()))
    s = SDE.interpolant_time(inf["t"]).unsqueeze(1)
    a = 1 - s
    expected = (W / (a**2 * W + s**2)).mean(1)
    for q in range(4):  # per quarter of the interpolant's time, not only on average
        rows = (s.squeeze(1) >= q / 4) & (s.squeeze(1) < (q + 1) / 4)
        assert float(loss[rows].mean()) == pytest.approx(float(expected[rows].mean()), rel=0.04)
    x_s = inf["xt"] / (SDE.alpha(inf["t"]) + SDE.sigma(inf["t"])).unsqueeze(1)
    velocity = (gen["eps"] - x_s) / a  # eps = x_s + (1 - s) v
    exact = (s - a * W) * x_s / (a**2 * W + s**2)
    torch.testing.assert_close(velocity, exact, rtol=1e-3, atol=1e-3)


def test_the_network_sees_the_interpolant_and_its_output_is_a_velocity():
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0.05, 0.95, 8)
    labels = torch.arange(8) % 2
    seen = {}
    for objective in ("eps", "flow"):
        module = _module(objective)

        def constant_output(m, args, out, o=objective):  # the network's answer: 1 everywhere
            seen[o] = (args[0].clone(), torch.ones_like(out))
            return seen[o][1]

        hook = module.net.register_forward_hook(constant_output)
        branch = module.branch_of(labels, t)
        correction = module.predict_eps(x, t, branch, labels) - module.skip_eps(
            x, t, branch, labels
        )
        hook.remove()
        net_in, net_out = seen[objective]
        alpha, sigma = SDE.alpha(t).unsqueeze(1), SDE.sigma(t).unsqueeze(1)
        if objective == "eps":
            torch.testing.assert_close(net_in, x)
            torch.testing.assert_close(correction, net_out)
        else:
            torch.testing.assert_close(net_in, x / (alpha + sigma))
            torch.testing.assert_close(correction, net_out * alpha / (alpha + sigma))
    assert not torch.allclose(seen["eps"][0], seen["flow"][0])


@pytest.fixture(scope="module")
def trained():
    sim = sb.datasets.simulate_tree(depth=2, n_per_class=80, dim=8, seed=0).to_anndata()
    sb.BranchedDiffusion.setup_anndata(sim, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(sim, objective="flow", **FAST)
    model.train(max_epochs=60, enable_progress_bar=False)
    return sim, model


def test_training_with_the_velocity_loss_learns_the_types(trained):
    sim, model = trained
    assert model.module.t_sampling == "interpolant"
    assert "flow objective" in model.summary_string
    report = model.get_denoising_error(times=[0.1, 0.3], seed=1)
    pooled = report[report["group"] == "all"]
    # four separated types: one Gaussian of all cells predicts the noise far worse at low t
    assert (pooled["error"] < 0.8 * pooled["gaussian_error"]).all(), pooled
    real = sim.obsm["X_latent"]
    means = np.stack([real[sim.obs["cell_type"] == c].mean(0) for c in model.classes])
    for solver in ("em", "ddim"):
        gen = model.generate(n_cells=200, seed=0, solver=solver, progress_bar=False)
        for i, c in enumerate(model.classes):
            m = gen.obsm["X_latent"][gen.obs["cell_type"] == c].mean(0)
            distances = np.linalg.norm(means - m, axis=1)
            # each type's cells are centred on it (types lie 8-20 apart; 300 steps of a tiny
            # network leave the eps model's means 0.4-1.2 off, the flow model's 0.5-1.4)
            assert distances[i] < 0.2 * np.sort(distances)[1], (solver, c, distances)


def test_a_flow_model_saves_loads_and_extends_like_any_other(trained, tmp_path):
    sim, model = trained
    model.save(tmp_path / "m")
    loaded = sb.BranchedDiffusion.load(tmp_path / "m")
    assert loaded.module.objective == "flow" and loaded.module.t_sampling == "interpolant"
    a = model.generate(n_cells=20, seed=3, progress_bar=False)
    b = loaded.generate(n_cells=20, seed=3, progress_bar=False)
    np.testing.assert_array_equal(a.obsm["X_latent"], b.obsm["X_latent"])
    # a new type is trained with the velocity loss; the old types stay bit-identical
    old = sim[sim.obs["cell_type"] != "c3"].copy()
    sb.BranchedDiffusion.setup_anndata(old, labels_key="cell_type", obsm_key="X_latent")
    small = sb.BranchedDiffusion(old, objective="flow", **FAST)
    small.train(max_epochs=5, enable_progress_bar=False)
    classes = list(small.classes)
    before = small.generate(n_cells=20, labels=classes, seed=1, progress_bar=False)
    calls = []
    original = small.module.training_error
    small.module.training_error = lambda *a: calls.append(1) or original(*a)
    small.add_classes(sim, labels=["c3"], max_epochs=2, progress_bar=False)
    after = small.generate(n_cells=20, labels=classes, seed=1, progress_bar=False)
    np.testing.assert_array_equal(after.obsm["X_latent"], before.obsm["X_latent"])
    assert calls  # the extension's loss is the module's (velocity) training error


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError, match=r"objective must be one of \('eps', 'flow'\)"):
        BranchedDiffusionModule(6, TREE.to_dict(), objective="velocity")
