"""Exact E[log1p(c X)] for count distributions, against sums written out over millions of k."""

import numpy as np
import pytest
from scipy import stats

import scbranch.model._expected_log1p as expected
from scbranch.model._expected_log1p import expected_log1p


def _written_out(mu, c, theta=None, zero_probability=0.0):
    sd = np.sqrt(mu + (0 if theta is None else mu * mu / theta))
    k = np.arange(int(mu + 40 * sd + (0 if theta is None else 40 * mu / theta)) + 100)
    if theta is None:
        pmf = stats.poisson.pmf(k, mu)
    else:
        pmf = stats.nbinom.pmf(k, theta, theta / (theta + mu))
    assert pmf.sum() > 1 - 1e-9  # the reference holds the whole mass
    return (1 - zero_probability) * float((pmf * np.log1p(c * k)).sum())


# (mu, theta, c): rare and common genes, heavy tails (theta << 1), concentrated counts whose
# P(0) underflows (start LEFT_SDS below the mean), means in the thousands (the grid)
NB_CASES = [
    (1e-6, 1.0, 10.0),
    (0.01, 0.5, 10.0),
    (0.5, 0.5, 10.0),
    (3.0, 2.0, 5.0),
    (50.0, 5.0, 10.0),
    (100.0, 0.05, 10.0),
    (500.0, 0.3, 10.0),
    (3000.0, 1000.0, 1.0),
    (1e4, 50.0, 0.1),
    (1e4, 0.1, 1.0),
    (1e5, 5.0, 0.1),
]


@pytest.mark.parametrize(("mu", "theta", "c"), NB_CASES)
def test_negative_binomial_known_answers(mu, theta, c):
    got = float(expected_log1p(np.array(mu), np.array(c), np.array(theta)))
    assert got == pytest.approx(_written_out(mu, c, theta), abs=1e-5, rel=1e-6)


@pytest.mark.parametrize(("mu", "c"), [(0.3, 20.0), (2.0, 1.0), (2000.0, 5.0), (5e4, 0.5)])
def test_poisson_known_answers(mu, c):
    got = float(expected_log1p(np.array(mu), np.array(c)))
    assert got == pytest.approx(_written_out(mu, c), abs=1e-5, rel=1e-6)


def test_zero_inflation_scales_by_the_non_zero_weight_and_arrays_broadcast():
    mu = np.array([[0.0, 0.4, 7.0], [2.0, 30.0, 0.02]])
    theta = np.array([0.8, 3.0, 0.2])  # per gene
    c = np.array([[4.0], [12.0]])  # per cell
    pi = np.array([[0.1, 0.5, 0.0], [0.9, 0.2, 0.3]])
    got = expected_log1p(mu, c, theta, pi)
    assert got.shape == (2, 3) and got.dtype == np.float64
    for i in range(2):
        for j in range(3):
            want = _written_out(mu[i, j], c[i, 0], theta[j], pi[i, j]) if mu[i, j] else 0.0
            assert got[i, j] == pytest.approx(want, abs=1e-7)


def test_grid_is_exact_on_narrow_spans_and_close_on_wide_ones(monkeypatch):
    # after MAX_TERMS terms the rest goes to the grid: with a handful of terms, spans of fewer
    # integers than grid points are summed exactly, wider ones on blocks within 1e-5
    monkeypatch.setattr(expected, "MAX_TERMS", 5)
    narrow = float(expected_log1p(np.array(40.0), np.array(3.0), np.array(8.0)))
    assert narrow == pytest.approx(_written_out(40.0, 3.0, 8.0), abs=1e-9)
    wide = float(expected_log1p(np.array(400.0), np.array(3.0), np.array(0.4)))
    assert wide == pytest.approx(_written_out(400.0, 3.0, 0.4), abs=1e-5)


def test_more_mass_at_larger_counts_raises_the_expectation_and_the_log_of_the_mean_lies_above():
    mu = np.array([0.1, 0.5, 2.0, 10.0])
    got = expected_log1p(mu, np.array(5.0), np.array(1.0))
    assert np.all(np.diff(got) > 0)
    assert np.all(np.log1p(5.0 * mu) > got)  # Jensen: log of the mean above the mean of logs


def test_blocks_of_rows_give_the_same_values(monkeypatch):
    # large inputs are summed a block of rows at a time (memory); the values must not depend
    # on the blocks, including a last block shorter than the others
    rng = np.random.default_rng(0)
    mu = rng.lognormal(0.0, 1.5, size=(7, 5))
    theta = rng.lognormal(0.0, 1.0, size=5)
    c = rng.uniform(1.0, 20.0, size=(7, 1))
    whole = expected_log1p(mu, c, theta)
    monkeypatch.setattr(expected, "BLOCK_VALUES", 10)  # 2 rows a block, 4 blocks
    np.testing.assert_array_equal(expected_log1p(mu, c, theta), whole)
    one = expected_log1p(np.array(3.0), np.array(2.0), np.array(1.5))
    assert one.shape == () and one == pytest.approx(_written_out(3.0, 2.0, 1.5), abs=1e-7)


def test_non_finite_parameters_and_unknown_likelihoods_are_refused():
    with pytest.raises(ValueError, match="mu holds NaN or infinite"):
        expected_log1p(np.array([1.0, np.nan]), np.array(2.0), np.array(1.0))
    with pytest.raises(ValueError, match="theta holds NaN or infinite"):
        expected_log1p(np.array(1.0), np.array(2.0), np.array(np.inf))
    from scbranch.model._scvi import _expected_log1p_of

    with pytest.raises(TypeError, match="not a count distribution.*gene_likelihood"):
        _expected_log1p_of(object())
