"""Clean-cell estimates against the exact posterior mean of a Gaussian mixture (known answer)."""

import numpy as np
import pytest
import torch
from _gaussian import GaussianMixtureEps

from scbranch.module import VPSDE, BranchTree, denoise
from scbranch.module._denoiser import CalibratedDenoiser, gaussian_posterior_mean

SDE = VPSDE()
TREE = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.4)])
MEANS = [[-2.0, 0.0, 1.0], [2.0, 1.0, -1.0]]
COVS = [np.diag([0.5, 1.0, 0.3]), np.diag([1.0, 0.4, 0.6])]
TIMES = [1.0, 0.9, 0.8, 0.6, 0.4, 0.2, 0.05]


def _cells(n_per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.multivariate_normal(MEANS[c], COVS[c], n_per_class) for c in range(2)])
    labels = np.repeat([0, 1], n_per_class)
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(labels)


def _errors(eps_fn, denoiser, exact, seed: int = 1):
    """Per time: mean squared distance of Tweedie's and the calibrated estimate to the exact
    posterior mean, on fresh cells."""
    x0, labels = _cells(300, seed)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for t in TIMES:
        tt = torch.tensor(t)
        xt = SDE.alpha(tt) * x0 + SDE.sigma(tt) * torch.randn(x0.shape, generator=gen)
        truth = denoise(exact, TREE, SDE, xt, labels, t)
        tweedie = denoise(eps_fn, TREE, SDE, xt, labels, t)
        calibrated = denoiser(eps_fn, xt, labels, t)
        out[t] = (
            float(((tweedie - truth) ** 2).sum(1).mean()),
            float(((calibrated - truth) ** 2).sum(1).mean()),
            float(((x0 - truth) ** 2).sum(1).mean()),  # the posterior's own spread
        )
    return out


def test_with_the_exact_network_the_estimate_is_the_posterior_mean():
    exact = GaussianMixtureEps(MEANS, COVS, TREE, SDE)
    ref, labels = _cells(200, 0)
    den = CalibratedDenoiser.fit(exact, TREE, SDE, ref, labels)
    for t, (tweedie, calibrated, spread) in _errors(exact, den, exact).items():
        assert tweedie < 1e-6, t
        # the Gaussian's share is small where it differs from the truth: next to nothing
        # against the posterior's own spread at every time
        assert calibrated < 0.02 * spread, (t, calibrated, spread)


def test_a_small_network_error_is_not_blown_up_at_high_noise():
    exact = GaussianMixtureEps(MEANS, COVS, TREE, SDE)

    def noisy(x, t, branch, label):  # 0.03 per dimension: harmless for sampling
        return exact(x, t, branch, label) + 0.03 * torch.sin(3 * x)

    ref, labels = _cells(200, 0)
    den = CalibratedDenoiser.fit(noisy, TREE, SDE, ref, labels)
    errors = _errors(noisy, den, exact)
    for t, (tweedie, calibrated, spread) in errors.items():
        # never worse than Tweedie's by more than 2 % of the posterior's own spread (the
        # Gaussians are estimated from 200 cells per class)
        assert calibrated <= tweedie + 0.02 * spread, (t, tweedie, calibrated)
        if t >= 0.8:  # Tweedie's error (sigma / alpha = 25-152 times 0.03) is blown up there
            assert calibrated < 0.05 * tweedie, (t, tweedie, calibrated)
    assert errors[1.0][0] > errors[1.0][2]  # Tweedie's: further off than the posterior's spread
    assert den.weight(1.0) < 0.05


def test_branch_gaussians_mix_classes_in_their_training_proportions():
    ref, labels = _cells(50, 0)  # 50 reference cells per class ...
    eps_fn = GaussianMixtureEps(MEANS, COVS, TREE, SDE)
    sizes = np.array([900, 100])  # ... standing for 900 and 100 training cells
    den = CalibratedDenoiser.fit(eps_fn, TREE, SDE, ref, labels, class_sizes=sizes)
    root = TREE.root
    expected = 0.9 * ref[:50].mean(0) + 0.1 * ref[50:].mean(0)
    torch.testing.assert_close(den.mean[root], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(den.mean[TREE.leaf(0)], ref[:50].mean(0), atol=1e-4, rtol=0)


@pytest.mark.parametrize("basis", [False, True])
def test_gaussian_posterior_mean_matches_the_closed_form(basis):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3))
    cov = a @ a.T + np.eye(3)
    lam, u = np.linalg.eigh(cov)
    m = rng.normal(size=3)
    x = rng.normal(size=(5, 3))
    alpha, sigma = 0.6, 0.8
    if not basis:
        cov, u = np.diag(np.diag(cov)), None
        lam = np.diag(cov)
    # E[x0 | xt] = m + C alpha (alpha^2 C + sigma^2 I)^-1 (xt - alpha m)
    want = m + (x - alpha * m) @ np.linalg.inv(alpha**2 * cov + sigma**2 * np.eye(3)) @ cov * alpha
    f = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    got = gaussian_posterior_mean(f(x), alpha, sigma, f(m), f(lam), None if u is None else f(u))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
