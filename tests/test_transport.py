"""Transport of given states between two times, against closed forms for Gaussian classes."""

import numpy as np
import pytest
import torch
from _gaussian import GaussianMixtureEps

from scbranch.module import VPSDE, BranchTree, denoise, transport

SDE = VPSDE()
T_MIN = SDE.t_min


def _flow_scale(t, v):
    """Std of N(alpha mu, (alpha^2 v + sigma^2) I): the PF-ODE of N(mu, v I) scales by it."""
    t = torch.tensor(float(t), dtype=torch.float64)
    return float(torch.sqrt(SDE.alpha(t) ** 2 * v + SDE.sigma(t) ** 2))


def _alpha(t):
    return float(SDE.alpha(torch.tensor(float(t), dtype=torch.float64)))


@pytest.fixture
def two_gaussians():
    """Classes A = N(mu_a, v I) and B = N(mu_b, v I) joining at t* = 0.5, with exact eps."""
    d, v = 3, 0.5
    means = np.array([[2.0, 0.0, -1.0], [-1.0, 1.5, 0.5]])
    covs = np.stack([v * np.eye(d)] * 2)
    tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.5)])
    return GaussianMixtureEps(means, covs, tree, SDE), tree, means, v


def test_transmutation_of_gaussians_matches_the_closed_form(two_gaussians):
    """Up A's probability-flow ODE to t*, down B's: an affine map known in closed form."""
    eps, tree, means, v = two_gaussians
    t_star = 0.5
    rng = np.random.default_rng(0)
    x0 = torch.as_tensor(means[0] + np.sqrt(v) * rng.normal(size=(200, 3)), dtype=torch.float32)
    up = transport(
        eps, tree, SDE, x0, torch.zeros(200, dtype=torch.long), T_MIN, t_star, n_steps=50
    )
    down = transport(
        eps, tree, SDE, up.x, torch.ones(200, dtype=torch.long), t_star, T_MIN, n_steps=50
    )
    # the PF-ODE of N(mu, v I) maps x_s -> alpha_t mu + (std_t / std_s) (x_s - alpha_s mu)
    ratio = _flow_scale(t_star, v) / _flow_scale(T_MIN, v)
    mu_a, mu_b = means
    x_star = _alpha(t_star) * mu_a + ratio * (x0.numpy() - _alpha(T_MIN) * mu_a)
    expected = _alpha(T_MIN) * mu_b + (x_star - _alpha(t_star) * mu_b) / ratio
    np.testing.assert_allclose(up.x.numpy(), x_star, rtol=0, atol=2e-3)
    np.testing.assert_allclose(down.x.numpy(), expected, rtol=0, atol=2e-3)
    # each cell keeps its offset; the population moves most, not all, of the way to B
    # (alpha(t*) of the signal is still A's at the branch point)
    assert up.n_network_calls == down.n_network_calls == 100  # Heun: 2 calls per step


def test_ode_round_trip_is_the_identity_up_to_solver_error(two_gaussians):
    eps, tree, means, v = two_gaussians
    x0 = torch.as_tensor(means[0] + np.random.default_rng(1).normal(size=(100, 3)) * np.sqrt(v))
    x0 = x0.float()
    a, b = torch.zeros(100, dtype=torch.long), torch.ones(100, dtype=torch.long)
    there = transport(eps, tree, SDE, transport(eps, tree, SDE, x0, a, T_MIN, 0.5).x, b, 0.5, T_MIN)
    back_up = transport(eps, tree, SDE, there.x, b, T_MIN, 0.5)
    back = transport(eps, tree, SDE, back_up.x, a, 0.5, T_MIN)
    rel = (back.x - x0).norm(dim=1) / x0.norm(dim=1)
    assert float(rel.median()) < 1e-4


def test_forward_noising_has_the_exact_marginal():
    tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.5)])
    x0 = torch.full((20000, 2), 3.0)
    res = transport(
        lambda *a: pytest.fail("noising must not call the network"),
        tree,
        SDE,
        x0,
        torch.zeros(20000, dtype=torch.long),
        T_MIN,
        0.7,
        solver="noise",
        n_steps=10,
        record_times=[0.3],
        seed=0,
    )
    for t, x in ((0.7, res.x), (0.3, res.trajectory[0.3])):
        ratio = _alpha(t) / _alpha(T_MIN)
        sd = np.sqrt(_flow_scale(t, 0.0) ** 2 - ratio**2 * _flow_scale(T_MIN, 0.0) ** 2)
        np.testing.assert_allclose(x.mean(0).numpy(), 3.0 * ratio, atol=0.01)
        np.testing.assert_allclose(x.std(0).numpy(), sd, rtol=0.02)
    assert res.n_network_calls == 0


def test_rows_follow_their_own_branches_and_the_grid_holds_every_branch_point():
    tree = BranchTree.from_merges(["A", "B", "C"], [((0,), (1,), 0.3), ((0, 1), (2,), 0.6)])
    seen = []

    def eps_fn(x, t, branch, label):
        seen.append((t, branch.clone(), label.clone()))
        return torch.zeros_like(x)

    labels = torch.tensor([0, 1, 2])
    res = transport(eps_fn, tree, SDE, torch.zeros(3, 2), labels, T_MIN, 0.9, n_steps=12)
    assert 0.3 in res.grid and 0.6 in res.grid and res.grid[0] == T_MIN and res.grid[-1] == 0.9
    for t, branch, label in seen:
        assert branch.tolist() == tree.lookup(label.numpy(), t).tolist() or t in (0.3, 0.6)
    # a step never straddles a branch point: each step's midpoint branch is used for both calls
    assert np.all(np.diff(res.grid) > 0)


def test_denoise_is_tweedie_for_a_gaussian(two_gaussians):
    eps, tree, means, v = two_gaussians
    x = torch.as_tensor(np.random.default_rng(2).normal(size=(5, 3)), dtype=torch.float32)
    t = 0.2
    a, s2 = _alpha(t), _flow_scale(t, v) ** 2 - _alpha(t) ** 2 * v
    # E[x0 | xt] for N(mu, v I): mu + a v / (a^2 v + s^2) (xt - a mu)
    expected = means[0] + a * v / (a**2 * v + s2) * (x.numpy() - a * means[0])
    got = denoise(eps, tree, SDE, x, torch.zeros(5, dtype=torch.long), t)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)


def test_transport_bad_input():
    tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.5)])
    x, labels = torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)

    def eps_fn(x, t, b, la):
        return torch.zeros_like(x)

    with pytest.raises(ValueError, match="cannot move states up"):
        transport(eps_fn, tree, SDE, x, labels, T_MIN, 0.5, solver="em")
    with pytest.raises(ValueError, match="cannot move states down"):
        transport(eps_fn, tree, SDE, x, labels, 0.5, T_MIN, solver="noise")
    with pytest.raises(ValueError, match="two different times"):
        transport(eps_fn, tree, SDE, x, labels, 0.5, 0.5)
    with pytest.raises(ValueError, match="outside"):
        transport(eps_fn, tree, SDE, x, labels, T_MIN, 0.5, record_times=[0.7])
