"""Counts from log-normalised expression: per-cell size factors observed in each class."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .._validation import to_dense

#: stored library sizes / size factors per class (a seeded subsample beyond this)
MAX_POOL = 10_000


def _expm1(m):
    if sp.issparse(m):
        m = sp.csr_matrix(m, dtype=np.float64, copy=True)
        m.data = np.expm1(m.data)
        return m
    return np.expm1(np.asarray(m, dtype=np.float64))


def _row_sums(m) -> np.ndarray:
    return np.asarray(m.sum(1), dtype=np.float64).ravel()


def size_factors(counts, expression, *, n_check: int = 200, rtol: float = 0.05) -> np.ndarray:
    """Per-cell factor ``s`` with ``counts = s * expm1(expression)`` (log1p-normalised data).

    For ``sc.pp.normalize_total(target_sum=T)`` + ``sc.pp.log1p``, ``s = library / T``. The
    relation is checked gene by gene on ``n_check`` cells, so a counts layer that does not
    belong to the expression (another gene subset, scaled data, ...) is refused.

    Examples
    --------
    >>> c = np.array([[1.0, 3.0], [2.0, 0.0]])
    >>> x = np.log1p(c / c.sum(1, keepdims=True) * 10)
    >>> size_factors(c, x).round(2).tolist()
    [0.4, 0.2]
    """
    expm1 = _expm1(expression)
    total_counts, total_expr = _row_sums(counts), _row_sums(expm1)
    s = np.divide(
        total_counts, total_expr, out=np.full_like(total_counts, np.nan), where=total_expr > 0
    )
    rows = np.random.default_rng(0).choice(len(s), min(n_check, len(s)), replace=False)
    c_rows, e_rows = to_dense(counts[rows]), to_dense(expm1[rows])
    # zeros must coincide, and nonzero entries must share one factor per cell
    same_zeros = np.mean((c_rows > 0) != (e_rows > 1e-6)) <= 1e-3
    nonzero = (c_rows > 0) & np.isfinite(s[rows])[:, None]
    deviation = np.inf if not same_zeros else 0.0
    if same_zeros and nonzero.any():
        expected = e_rows * s[rows, None]
        deviation = float(np.median(np.abs(c_rows[nonzero] / expected[nonzero] - 1.0)))
    if not deviation <= rtol:
        raise ValueError(
            "The counts layer and the log-normalised expression do not match: the expression "
            "must be log1p(counts / size factor) of exactly these counts, gene by gene "
            f"(median relative deviation {deviation:.3g}). Pass the raw counts the expression was "
            "computed from (same cells and genes), or leave `counts_layer=None`."
        )
    fallback = np.nanmedian(s) if np.isfinite(s).any() else 1.0
    return np.where(np.isfinite(s), s, fallback)


def class_pools(values: np.ndarray, codes: np.ndarray, n_classes: int, seed: int = 0) -> list:
    """``values`` grouped by class code (at most :data:`MAX_POOL` each, seeded subsample)."""
    rng = np.random.default_rng(seed)
    pools = []
    for c in range(n_classes):
        v = values[codes == c].astype(np.float32)
        if len(v) > MAX_POOL:
            v = rng.choice(v, MAX_POOL, replace=False)
        pools.append(v)
    return pools


def draw_from_pools(pools: list, codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One value per generated cell, drawn from the pool of its class."""
    out = np.empty(len(codes), dtype=np.float32)
    for c in np.unique(codes):
        where = codes == c
        out[where] = rng.choice(pools[int(c)], int(where.sum()), replace=True)
    return out


def counts_from_expression(
    x: np.ndarray, factors: np.ndarray, rng: np.random.Generator
) -> sp.csr_matrix:
    """Invert log1p normalisation: ``v = s * expm1(max(x, 0))``, stochastically rounded.

    Each ``v`` becomes ``floor(v)`` or ``floor(v) + 1`` with probability ``v - floor(v)``: the
    expected counts are exactly ``v`` (plain rounding sends every value below 0.5 to 0 and
    erases lowly expressed genes from smooth profiles such as PCA reconstructions), the added
    noise is at most that of a coin flip (Poisson sampling would add counting noise the
    generated expression already carries), and integer ``v`` (real cells) map back exactly.
    Returns CSR float32 with integer values.
    """
    v = factors[:, None] * np.expm1(np.clip(x, 0.0, None, dtype=np.float64))
    low = np.floor(v)
    counts = low + (rng.random(v.shape) < (v - low))
    return sp.csr_matrix(counts.astype(np.float32))


def log_normalize(counts: sp.csr_matrix, target_sum: float = 1e4) -> sp.csr_matrix:
    """``log1p(counts / total * target_sum)`` per cell, as ``sc.pp.normalize_total`` + ``log1p``."""
    counts = sp.csr_matrix(counts, dtype=np.float32)
    totals = np.asarray(counts.sum(1)).ravel()
    x = sp.diags((target_sum / np.maximum(totals, 1.0)).astype(np.float32)) @ counts
    x = sp.csr_matrix(x, dtype=np.float32)
    x.data = np.log1p(x.data)
    return x


def normalize_block(block, target_sum: float):
    """``log1p(counts / total * target_sum)`` per row of a dense or sparse block of counts.

    The normalisation ``sc.pp.normalize_total(target_sum=...)`` + ``sc.pp.log1p`` applies to
    the whole matrix, done one block of cells at a time (every cell is normalised by its own
    total, so blocks are independent). Sparse stays sparse; rows with no counts stay 0.

    Examples
    --------
    >>> normalize_block(np.array([[1.0, 3.0], [0.0, 0.0]]), 4.0).tolist()
    [[0.6931471805599453, 1.3862943611198906], [0.0, 0.0]]
    """
    totals = np.asarray(block.sum(1), dtype=np.float64).ravel()
    factors = target_sum / np.maximum(totals, 1.0)
    if sp.issparse(block):
        out = sp.csr_matrix(block, dtype=np.float64, copy=True)
        out.data *= np.repeat(factors, np.diff(out.indptr))
        out.data = np.log1p(out.data)
        return out
    return np.log1p(np.asarray(block, dtype=np.float64) * factors[:, None])
