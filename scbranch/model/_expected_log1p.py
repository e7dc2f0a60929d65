"""Exact expectations of ``log1p(c * X)`` for count distributions (NB, ZINB, Poisson).

A latent decoded through scVI gives, per gene, a count distribution; the denoised profile in
the units of real log-normalised cells is ``E[log1p(X * 1e4 / total)]`` (the mean of logs,
which the log of the mean overshoots for genes a cell rarely expresses). Averaging a few
sampled draws leaves Monte-Carlo noise in every value (a quarter of a cell's own spread for 20
draws); summing the probability mass function gives the expectation itself, deterministically
and faster. The sum runs over k = 0, 1, 2, ... with the pmf's ratio recursion, starts where
the mass begins for concentrated distributions (whose P(0) underflows), and drops each value
from the work as soon as the mass left in its tail is below ``tol``; what is left after
``MAX_TERMS`` terms (wide distributions: means in the thousands, or small theta) is summed on
a geometric grid of blocks of integers. Against sums over millions of terms the result is
within 1e-5 (tests/test_expected_log1p.py).
"""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln

#: tail mass below which a value's sum stops (its share of the result is below tol * log1p(c k))
TAIL_TOLERANCE = 1e-8
#: terms summed one by one at most per value; what is left of wider distributions (means in
#: the thousands) is summed on a grid, where the pmf and the log change slowly between points
MAX_TERMS = 1_000
#: points of that grid (a midpoint rule over k; exact where the span has fewer integers)
GRID_POINTS = 2_000
#: the grid ends this many standard deviations past the mean, plus as many scales of a heavy
#: tail, mu / theta: the mass beyond both is below 1e-8
RIGHT_SDS = 20.0
#: standard deviations below the mean where the sum of a concentrated distribution starts
LEFT_SDS = 12.0
#: values summed together (memory: about a dozen float64 working arrays of this size)
BLOCK_VALUES = 1 << 21


def expected_log1p(
    mu: np.ndarray,
    c: np.ndarray,
    theta: np.ndarray | None = None,
    zero_probability: np.ndarray | None = None,
    tol: float = TAIL_TOLERANCE,
    dtype: type = np.float64,
) -> np.ndarray:
    """``E[log1p(c * X)]`` for X negative binomial (mean ``mu``, inverse dispersion ``theta``).

    ``theta=None`` gives the Poisson distribution; ``zero_probability`` (the zero-inflation
    mixture weight) scales the result by ``1 - zero_probability``, since an extra zero adds
    ``log1p(0) = 0``. Arrays broadcast against each other; the sums run in float64, a block of
    rows at a time, so inputs may be float32 views of any size.

    Parameters
    ----------
    mu
        Means of X (non-negative).
    c
        Scale inside the log (e.g. ``1e4 / library``; positive).
    theta
        Inverse dispersion (``var = mu + mu**2 / theta``), or `None` for Poisson.
    zero_probability
        Zero-inflation probability, or `None`.
    tol
        Tail mass at which each value's sum stops.
    dtype
        Of the result.

    Returns
    -------
    Array of the broadcast shape.

    Examples
    --------
    >>> round(float(expected_log1p(np.array(2.0), np.array(1.0))), 6)  # Poisson(2)
    0.952452
    >>> k = np.arange(60)
    >>> pmf = np.exp(-2.0 + k * np.log(2.0) - gammaln(k + 1))
    >>> round(float((pmf * np.log1p(k)).sum()), 6)  # the same sum written out
    0.952452
    """
    poisson = theta is None
    for name, values in (("mu", mu), ("c", c), ("theta", theta)):
        if values is not None and not np.all(np.isfinite(values)):
            # a NaN mean would otherwise fail no comparison and read as zero counts
            raise ValueError(
                f"expected_log1p: {name} holds NaN or infinite values; a decoder that gives "
                "them is broken (check the scVI model's training) and has no expectation."
            )
    arrays = np.broadcast_arrays(
        np.asarray(mu),
        np.asarray(c),
        np.ones(()) if poisson else np.asarray(theta),
        np.zeros(()) if zero_probability is None else np.asarray(zero_probability),
    )
    out = np.empty(arrays[0].shape, dtype=dtype)
    width = out.shape[-1] if out.ndim else 1
    rows = [a.reshape(-1, width) for a in (out, *arrays)]  # views for 0-, 1- and 2-d inputs
    per_block = max(1, BLOCK_VALUES // width)
    for lo in range(0, rows[0].shape[0], per_block):
        # blocks of rows: the sum's float64 working arrays stay near BLOCK_VALUES values each
        m, cc, t, zero = (r[lo : lo + per_block].astype(np.float64).ravel() for r in rows[1:])
        values = _sum_pmf(m, cc, None if poisson else t, tol) * (1.0 - zero)
        rows[0][lo : lo + per_block] = values.reshape(-1, width)
    return out


def _sum_pmf(mu: np.ndarray, c: np.ndarray, theta: np.ndarray | None, tol: float) -> np.ndarray:
    """The pmf-weighted sum of ``log1p(c k)`` for flat arrays (Poisson when theta is None)."""
    out = np.zeros(mu.shape, dtype=np.float64)
    live = np.flatnonzero(mu > 0)  # a zero mean puts all mass on 0, whose log1p is 0
    if live.size == 0:
        return out
    mu, c = mu[live], c[live]
    if theta is None:
        var = mu
        ratio_scale = mu  # P(k) / P(k-1) = mu / k
    else:
        theta = theta[live]
        var = mu + mu * mu / theta
        ratio_scale = mu / (theta + mu)  # P(k) / P(k-1) = (k - 1 + theta) / k * this
    # start at 0, or LEFT_SDS below the mean where P(0) would underflow (mass there < 1e-30)
    k = np.floor(np.maximum(mu - LEFT_SDS * np.sqrt(var), 0.0))
    if theta is None:
        log_p = -mu
    else:
        log_p = -theta * np.log1p(mu / theta)  # log P(0)
    later = np.flatnonzero(k > 0)
    if later.size:
        log_p[later] = _log_pmf(
            k[later], mu[later], None if theta is None else theta[later], ratio_scale[later]
        )
    p = np.exp(log_p)
    total = p * np.log1p(c * k)
    mass = p.copy()
    index = np.arange(live.size)  # position of each active value in `live`
    result = np.zeros(live.size, dtype=np.float64)
    for step in range(1, MAX_TERMS + 1):
        k += 1.0
        if theta is None:
            p *= ratio_scale / k
        else:
            p *= (k - 1.0 + theta) / k * ratio_scale
        total += p * np.log1p(c * k)
        mass += p
        # drop finished values often while most are still active, then every 64 terms
        if (step < 64 and step & (step - 1) == 0) or step % 64 == 0:
            active = np.flatnonzero((1.0 - mass >= tol) | (k <= mu))
            if active.size < index.size:
                done = np.ones(index.size, dtype=bool)
                done[active] = False
                result[index[done]] = total[done]
                k, p, total, mass, index, mu, c, ratio_scale = (
                    a[active] for a in (k, p, total, mass, index, mu, c, ratio_scale)
                )
                if theta is not None:
                    theta = theta[active]
            if index.size == 0:
                break
    if index.size:
        result[index] = total + _grid_sum(k + 1.0, mu, c, theta, ratio_scale)
    out[live] = result
    return out


def _grid_sum(start, mu, c, theta, ratio_scale) -> np.ndarray:
    """Sum of pmf(k) * log1p(c k) over integers k >= ``start``, on a geometric grid.

    ``GRID_POINTS`` blocks of integers between ``start`` and the end of the mass, each as wide
    as a fixed fraction of its k (the pmf and the log change on the scale of k out here), each
    counted at its middle times its width; where blocks would hold less than one integer each
    integer is its own block, so narrow spans are summed exactly.
    """
    sd = np.sqrt(mu if theta is None else mu + mu * mu / theta)
    heavy = 0.0 if theta is None else RIGHT_SDS * mu / theta  # the NB tail's scale is mu/theta
    end = np.maximum(mu + RIGHT_SDS * sd + heavy, start + 1.0)
    out = np.zeros(mu.shape, dtype=np.float64)
    rows = max(1, 2_000_000 // GRID_POINTS)  # memory: rows x GRID_POINTS float64 per array
    fractions = np.arange(GRID_POINTS + 1) / GRID_POINTS
    for lo in range(0, mu.size, rows):
        part = slice(lo, lo + rows)
        a, b = start[part, None], end[part, None]
        edges = np.ceil(a * (b / a) ** fractions)  # integer block edges, non-decreasing
        width = np.diff(edges, axis=1)  # 0 for empty blocks
        k = edges[:, :-1] + (width - 1.0) / 2.0  # block middles (the integer itself at width 1)
        k = np.maximum(k, a)
        log_p = _log_pmf(
            k,
            mu[part, None],
            None if theta is None else theta[part, None],
            ratio_scale[part, None],
        )
        out[part] = (width * np.exp(log_p) * np.log1p(c[part, None] * k)).sum(1)
    return out


def _log_pmf(k, mu, theta, ratio_scale) -> np.ndarray:
    """Log P(X = k): Poisson (theta None), or NB with ``ratio_scale = mu / (theta + mu)``."""
    if theta is None:
        return -mu + k * np.log(mu) - gammaln(k + 1)
    return (
        gammaln(k + theta)
        - gammaln(theta)
        - gammaln(k + 1)
        - theta * np.log1p(mu / theta)
        + k * np.log(ratio_scale)
    )
