"""Counts from log-normalised expression: per-cell size factors observed in each class."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .._validation import to_dense
from ..io._rows import is_on_disk, read_rows, row_sums

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


def _totals(m, transform=None) -> np.ndarray:
    """Per-row sums of ``transform(m)``: streamed over blocks when ``m`` is on disk."""
    if is_on_disk(m):
        return row_sums(m, transform=transform)
    return _row_sums(m if transform is None else transform(m))


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
    # an atlas's expression (and counts) may stay on disk: sums stream over blocks of rows
    total_counts = _totals(counts)
    total_expr = _totals(expression, _expm1)
    s = np.divide(
        total_counts, total_expr, out=np.full_like(total_counts, np.nan), where=total_expr > 0
    )
    rows = np.random.default_rng(0).choice(len(s), min(n_check, len(s)), replace=False)
    c_rows = to_dense(read_rows(counts, rows))
    e_rows = to_dense(_expm1(read_rows(expression, rows)))
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


#: largest inverse dispersion kept (a gene whose counts vary 100x more than Poisson around the
#: decoded mean would otherwise get a gamma shape so small that most draws are 0)
MAX_INVERSE_DISPERSION = 100.0


#: smallest inverse dispersion the log-mean fit searches (counts then are all but Poisson)
MIN_INVERSE_DISPERSION = 1e-4


def cell_means(mu: np.ndarray, factors: np.ndarray, target_sum: float) -> np.ndarray:
    """Each cell's gene means ``mu`` (n, g) rescaled to sum to its library size, ``s * T``.

    A decoded profile is a point in log-normalised space, where every real cell's values
    undo to the same total (``normalize_total``): the cell's depth is its size factor, not
    the profile. ``expm1`` of a decoded profile does not sum to that total, and the sum moves
    with the profile; taken as depth, it spread generated cells' totals 1.32 times as wide as
    real ones per type on pbmc68k_reduced (docs/evaluation.md, "Library sizes"). Rescaled, the
    means sum to the cell's library size and keep the genes' proportions as decoded.

    Examples
    --------
    >>> cell_means(np.array([[1.0, 3.0], [2.0, 2.0]]), np.array([1.0, 2.0]), 8.0).tolist()
    [[2.0, 6.0], [8.0, 8.0]]
    """
    mu = np.asarray(mu, dtype=np.float64)
    sums = mu.sum(1, keepdims=True)
    wanted = np.asarray(factors, dtype=np.float64)[:, None] * float(target_sum)
    return np.divide(mu * wanted, sums, out=np.zeros_like(mu), where=sums > 0)


def fit_negative_binomial(
    counts,
    factors: np.ndarray,
    expected: np.ndarray,
    expression: np.ndarray | None = None,
    *,
    codes: np.ndarray | None = None,
    n_classes: int | None = None,
    n_rounds: int = 2,
    n_bisections: int = 8,
    seed: int = 0,
) -> dict:
    """Per-gene negative binomial of real counts around a decoded mean.

    ``expected`` (n, g) is each cell's decoded log-normalised profile (e.g. its PCA
    reconstruction), ``factors`` its size factor, ``counts`` (n, g) its raw counts. The decoded
    mean of a cell is ``mu0 = s * expm1(max(expected, 0))``; since ``expm1`` of a mean of logs
    underestimates the mean count (Jensen), each gene gets a scale ``a = sum(c) / sum(mu0)``
    so that ``mu = a * mu0`` matches the genes' total counts. The inverse dispersion
    ``phi`` of ``Var(c) = mu + phi * mu^2`` (0: Poisson) is, by the method of moments,
    ``max(0, sum((c - mu)^2 - mu)) / sum(mu^2)``: the variance real cells have around the
    decoded mean beyond counting noise, i.e. what the latent leaves out.

    With ``expression`` (the cells' log-normalised values), the fit targets what the diffusion
    and every judge of the cells see, log-normalised values, while keeping the cells' library
    sizes. In each of ``n_rounds`` seeded rounds, each gene's ``phi`` is bisected
    (``n_bisections`` draws, in log space) so that the log-normalised draws match the gene's
    mean expression (more dispersion, lower log mean at the same mean count); genes that stay
    too low even near Poisson get their scale raised (two draws); then every scale is
    multiplied by one factor so that the genes' summed mean is the real cells' total. The
    moments' ``phi`` fits the raw counts' heaviest cells and gives draws too dispersed in log
    space; matching log means by raising the scales instead (the previous fit) made library
    sizes 1.5-1.7 times the real ones on pbmc3k (docs/benchmarks/noise_models.md).

    With the cells' class ``codes``, each class also gets a ratio per gene
    (:func:`class_ratios`): what its cells hold outside the latent that the decoded mean
    misses, so that counts drawn for a class keep the differences between types a 30-PC
    profile leaves out. The dispersions are then fitted around the class-corrected means.

    Returns
    -------
    ``{"scale": (g,), "inverse_dispersion": (g,), "target_sum": float}`` and, with ``codes``,
    ``"class_ratio": (n_classes, g)``; ``target_sum`` is the median of ``total / s``, the
    library size the expression was normalised to.

    Examples
    --------
    Two genes of inverse dispersion 0.5 among 100 Poisson ones, size factors as
    ``normalize_total`` sets them (library / 10,000):

    >>> rng = np.random.default_rng(0)
    >>> mu = np.full((20_000, 102), 10.0)
    >>> mu[:, :2] = [2.0, 10.0]
    >>> c = sample_negative_binomial(mu, np.r_[0.5, 0.5, np.zeros(100)], rng)
    >>> s = c.sum(1) / 1e4
    >>> fit = fit_negative_binomial(c, s, np.log1p(mu / s[:, None]))
    >>> fit["inverse_dispersion"][:2].round(1).tolist(), fit["scale"][:2].round(2).tolist()
    ([0.5, 0.5], [1.0, 1.0])
    """
    c = to_dense(counts).astype(np.float64)
    s = np.asarray(factors, dtype=np.float64)
    mu0 = s[:, None] * np.expm1(np.clip(np.asarray(expected, dtype=np.float64), 0.0, None))
    ratio = None
    if codes is not None:
        ratio = class_ratios(c, mu0, codes, n_classes)
        mu0 = mu0 * ratio[codes]
    totals, decoded = c.sum(0), mu0.sum(0)
    scale = np.divide(totals, decoded, out=np.ones_like(totals), where=decoded > 0)
    row_totals = c.sum(1)
    target = np.median(row_totals[s > 0] / s[s > 0]) if (s > 0).any() else 1e4
    mu = cell_means(mu0 * scale, s, target)  # the means generated counts are drawn around
    excess = ((c - mu) ** 2 - mu).sum(0)
    square = (mu**2).sum(0)
    phi = np.divide(excess, square, out=np.zeros_like(excess), where=square > 0)
    phi = np.clip(phi, 0.0, MAX_INVERSE_DISPERSION)
    if expression is not None:
        real_mean = to_dense(expression).astype(np.float64).mean(0)

        def log_mean(phi, draw):
            # the same seed for every draw of a round: the log means then move smoothly with
            # phi and the bisection follows the gene, not the sampling noise
            rng = np.random.default_rng([seed, draw])
            draws = sample_negative_binomial(cell_means(mu0 * scale, s, target), phi, rng)
            totals = np.maximum(draws.sum(1, keepdims=True), 1.0)
            return np.log1p(draws * (target / totals)).mean(0)

        for round_ in range(n_rounds):
            low = np.full_like(scale, np.log(MIN_INVERSE_DISPERSION))
            high = np.full_like(scale, np.log(MAX_INVERSE_DISPERSION))
            for _ in range(n_bisections):
                middle = (low + high) / 2
                too_dispersed = log_mean(np.exp(middle), round_) < real_mean
                high = np.where(too_dispersed, middle, high)
                low = np.where(too_dispersed, low, middle)
            phi = np.exp((low + high) / 2)
            for step in range(2):
                # a gene's log mean moves less than its log scale, so full steps never overshoot
                drawn = log_mean(phi, n_rounds * (1 + step) + round_)
                scale = scale * np.exp(np.clip(real_mean - drawn, -1.0, 1.0))
            decoded_total = (mu0 * scale).sum()
            if decoded_total > 0:
                scale = scale * (c.sum() / decoded_total)
    fit = {
        "scale": scale.astype(np.float32),
        "inverse_dispersion": phi.astype(np.float32),
        "target_sum": float(target),
    }
    if ratio is not None:
        fit["class_ratio"] = ratio.astype(np.float32)
    return fit


#: pseudo-counts of the prior that shrinks a class's gene ratio toward 1 (no correction):
#: a class needs this many observed or expected counts of a gene before its ratio moves far.
#: Chosen on new real cells decoded from their own PC scores (benchmarks/class_ratios.py):
#: prior 1 gave the best DE log-fold-change correlation on both PBMC sets (pbmc3k 0.403,
#: against 0.394 / 0.403 / 0.393 for 0.25 / 5 / 20; pbmc68k_reduced 0.567 against 0.550 /
#: 0.553 / 0.548), with AUROC at the unseen-real probe's for every prior.
CLASS_RATIO_PRIOR = 1.0


def class_ratios(
    counts: np.ndarray,
    expected: np.ndarray,
    codes: np.ndarray,
    n_classes: int | None = None,
    *,
    prior: float | None = None,
) -> np.ndarray:
    """Per class and gene, observed over decoded counts, shrunk toward 1: ``(n_classes, g)``.

    A latent decoded to genes keeps what the latent spans (30 PCs); a type's mean expression
    outside it is lost, and with it part of the differences between types (pbmc3k: unseen
    real cells decoded from their own PC scores with one mean per gene reach 0.85-0.88 of the
    control's DE log-fold-change correlation). The ratio ``(O + prior) / (E + prior)`` of a
    class's observed counts ``O`` and the counts its cells' decoded means give ``E`` (summed
    over the class's cells) is the gamma-Poisson posterior mean of that class's multiplier
    with a prior of ``prior`` pseudo-counts (default :data:`CLASS_RATIO_PRIOR`): large for
    well-measured genes, near 1 for genes a small class barely expresses. Classes with no
    cells get 1 everywhere. Both ``counts`` (dense or sparse) and ``expected`` are absolute
    counts (the mean already scaled by the cell's size factor).

    Examples
    --------
    >>> c = np.array([[4.0, 0.0], [6.0, 0.0], [0.0, 1.0]])
    >>> mu = np.full((3, 2), 2.0)
    >>> class_ratios(c, mu, np.array([0, 0, 1]), prior=0.0).tolist()
    [[2.5, 0.0], [0.0, 0.5]]
    """
    prior = CLASS_RATIO_PRIOR if prior is None else float(prior)
    codes = np.asarray(codes, dtype=np.int64)
    n_classes = int(codes.max()) + 1 if n_classes is None else int(n_classes)
    onehot = sp.csr_matrix(
        (np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n_classes, len(codes))
    )
    observed = onehot @ (counts if sp.issparse(counts) else np.asarray(counts, np.float64))
    observed = to_dense(observed).astype(np.float64)
    decoded = np.asarray(onehot @ np.asarray(expected, dtype=np.float64))
    ratio = np.ones_like(observed)
    np.divide(observed + prior, decoded + prior, out=ratio, where=(decoded + prior) > 0)
    return ratio


def sample_negative_binomial(
    mu: np.ndarray, inverse_dispersion: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Counts with mean ``mu`` (n, g) and ``Var = mu + phi * mu^2`` per gene (gamma-Poisson).

    Genes with ``phi = 0`` are Poisson.

    Examples
    --------
    >>> c = sample_negative_binomial(np.full((50_000, 1), 4.0), np.array([0.25]),
    ...                              np.random.default_rng(0))
    >>> round(float(c.mean()), 1), round(float(c.var()), 0)  # 4 + 0.25 * 16 = 8
    (4.0, 8.0)
    """
    phi = np.asarray(inverse_dispersion, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    rate = mu.copy()
    over = phi > 0
    if over.any():
        shape = np.broadcast_to(1.0 / phi[over], mu[:, over].shape)
        rate[:, over] = rng.gamma(shape, mu[:, over] * phi[over])
    return rng.poisson(rate).astype(np.float32)
