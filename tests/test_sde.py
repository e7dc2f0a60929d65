import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from scbranch.module import VPSDE


@pytest.mark.parametrize("beta0,beta1", [(0.1, 20.0), (0.05, 5.0), (1.0, 3.0)])
def test_alpha_sigma_match_integrated_beta(beta0, beta1):
    sde = VPSDE(beta0=beta0, beta1=beta1)
    for t in [0.0, 1e-3, 0.1, 0.37, 0.5, 0.81, 1.0]:
        big_b, _ = quad(lambda s: beta0 + (beta1 - beta0) * s, 0.0, t)
        assert sde.integral_beta(t) == pytest.approx(big_b, rel=1e-12, abs=1e-15)
        assert sde.beta(t) == pytest.approx(beta0 + (beta1 - beta0) * t)
        alpha = math.exp(-0.5 * big_b)
        assert float(sde.alpha(t)) == pytest.approx(alpha, rel=1e-12)
        assert float(sde.sigma(t)) == pytest.approx(math.sqrt(1 - alpha**2), rel=1e-9, abs=1e-15)


def test_default_alpha_at_one():
    # B(1) = 0.1 + 0.5 * 19.9 = 10.05
    assert float(VPSDE().alpha(1.0)) == pytest.approx(math.exp(-10.05 / 2), rel=1e-12)


def test_variance_preserving_numpy_and_torch():
    sde = VPSDE()
    t = np.linspace(0, 1, 101)
    a, s = sde.alpha(t), sde.sigma(t)
    np.testing.assert_allclose(a**2 + s**2, 1.0, atol=1e-12)
    tt = torch.linspace(0, 1, 101, dtype=torch.float64)
    at, st = sde.alpha(tt), sde.sigma(tt)
    assert isinstance(at, torch.Tensor) and isinstance(st, torch.Tensor)
    torch.testing.assert_close(at**2 + st**2, torch.ones_like(tt), atol=1e-12, rtol=0)
    np.testing.assert_allclose(at.numpy(), a, rtol=1e-12)


def test_sigma_is_accurate_for_tiny_t():
    # naive sqrt(1 - alpha^2) loses all digits here; the closed form sqrt(1 - exp(-B)) ~ sqrt(B)
    sde = VPSDE()
    t = 1e-9
    b = sde.integral_beta(t)
    assert float(sde.sigma(t)) == pytest.approx(math.sqrt(-math.expm1(-b)), rel=1e-12)
    assert float(sde.sigma(t)) == pytest.approx(math.sqrt(b), rel=1e-6)


def test_log_snr_monotone_and_inverted_numpy():
    sde = VPSDE()
    t = np.linspace(sde.t_min, 1.0, 500)
    lam = sde.log_snr(t)
    assert np.all(np.diff(lam) < 0)
    np.testing.assert_allclose(lam, np.log(sde.alpha(t) ** 2 / sde.sigma(t) ** 2), rtol=1e-10)
    np.testing.assert_allclose(sde.t_from_log_snr(lam), t, rtol=1e-9, atol=1e-12)
    # and the other way round, over a wide range of log-SNR
    lam2 = np.linspace(-10.0, 9.0, 50)
    np.testing.assert_allclose(sde.log_snr(sde.t_from_log_snr(lam2)), lam2, rtol=1e-8, atol=1e-8)


def test_log_snr_inverted_torch():
    sde = VPSDE(beta0=0.2, beta1=8.0)
    t = torch.linspace(0.01, 1.0, 200, dtype=torch.float64)
    lam = sde.log_snr(t)
    assert isinstance(lam, torch.Tensor)
    assert torch.all(lam[1:] < lam[:-1])
    back = sde.t_from_log_snr(lam)
    assert isinstance(back, torch.Tensor)
    torch.testing.assert_close(back, t, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lam.numpy(), sde.log_snr(t.numpy()), rtol=1e-12)


def test_marginal_moments():
    torch.manual_seed(0)
    sde = VPSDE()
    n = 50_000
    x0 = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float32).expand(n, 3)
    for tv in (0.1, 0.4, 0.8):
        t = torch.full((n,), tv, dtype=torch.float32)
        xt, noise = sde.marginal(x0, t)
        a, s = float(sde.alpha(tv)), float(sde.sigma(tv))
        torch.testing.assert_close(xt, a * x0 + s * noise)  # returned noise is the one used
        mc = 5 * s / math.sqrt(n)
        np.testing.assert_allclose(xt.mean(0).numpy(), a * x0[0].numpy(), atol=mc)
        np.testing.assert_allclose(xt.var(0).numpy(), s**2, rtol=0.04)
    # given noise is used as is
    noise = torch.ones(4, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 0.2, 0.5, 1.0], dtype=torch.float64)
    xt, same = sde.marginal(x0[:4], t, noise)
    assert same is noise
    expected = sde.alpha(t)[:, None] * x0[:4] + sde.sigma(t)[:, None]
    torch.testing.assert_close(xt, expected)


def test_euler_forward_sde_matches_closed_form():
    """Simulate dx = -1/2 beta x dt + sqrt(beta) dW from a point mass up to t = 0.5."""
    gen = torch.Generator().manual_seed(1)
    sde = VPSDE()
    n, n_steps, t_end, x0 = 20_000, 250, 0.5, 3.0
    h = t_end / n_steps
    x = torch.full((n,), x0, dtype=torch.float64)
    for k in range(n_steps):
        b = sde.beta(k * h)
        dw = torch.randn(n, generator=gen).to(x.dtype)  # float32 draws: much faster on CPU
        x = x - 0.5 * b * x * h + math.sqrt(b * h) * dw
    a, s = float(sde.alpha(t_end)), float(sde.sigma(t_end))
    se_mean = s / math.sqrt(n)
    assert float(x.mean()) == pytest.approx(a * x0, abs=5 * se_mean + 5e-3)
    assert float(x.var()) == pytest.approx(s**2, rel=0.05)
    # the test can tell a wrong schedule apart: beta1 = 5 gives a very different mean
    assert abs(a * x0 - float(VPSDE(beta1=5.0).alpha(t_end)) * x0) > 20 * se_mean


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beta0": 0.0},
        {"beta0": -0.1},
        {"beta1": 0.05},  # beta1 < beta0
        {"beta0": 1.0, "beta1": 1.0},
        {"t_min": 0.0},
        {"t_min": 0.1},
        {"t_min": -1e-3},
    ],
)
def test_invalid_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        VPSDE(**kwargs)


def test_to_dict_and_check_same():
    sde = VPSDE(beta0=0.1, beta1=20.0, t_min=1e-3)
    d = sde.to_dict()
    assert d == {"beta0": 0.1, "beta1": 20.0, "t_min": 1e-3}
    sde.check_same(d)
    sde.check_same(VPSDE())
    sde.check_same({"beta0": np.float64(0.1), "beta1": np.float64(20.0)})
    with pytest.raises(ValueError, match="beta1=5.0"):
        sde.check_same(VPSDE(beta1=5.0))
    with pytest.raises(ValueError, match="beta0"):
        sde.check_same({"beta0": 0.2, "beta1": 20.0})
