"""Hierarchy discovery: when classes become indistinguishable under noise (docs/method.md).

Everything here is pure numpy/torch and knows nothing about AnnData; ``scbranch.tl`` wraps it.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.ndimage import gaussian_filter1d

from ._sde import VPSDE
from ._tree import BranchTree

logger = logging.getLogger(__name__)


def global_standardizer(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-dimension centring and ONE global scale (docs/method.md).

    Per-dimension standardisation would inflate minor dimensions and erase the hierarchy of
    separations that the tree is built from, so only the total variance is normalised.

    Returns
    -------
    ``(shift, scale)`` such that ``(x - shift) / scale`` has mean 0 and mean per-dimension
    variance 1.

    Examples
    --------
    >>> shift, scale = global_standardizer(np.array([[0.0, 0.0], [2.0, 4.0]]))
    >>> shift.tolist(), round(scale, 3)
    ([1.0, 2.0], 1.581)
    """
    from ..io._rows import column_moments, is_streamed, moments

    if is_streamed(x):  # on disk, or transformed on the way in: one pass over blocks of rows
        shift, variance = moments(x)
        scale = float(np.sqrt(np.mean(variance)))
    elif sp.issparse(x) or np.size(x) > _DENSE_IN_ONE_GO:
        shift, variance = column_moments(x)
        scale = float(np.sqrt(np.mean(variance)))
    else:
        x = np.asarray(x, dtype=np.float64)
        shift = x.mean(0)
        scale = float(np.sqrt(np.mean((x - shift) ** 2)))
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError("The data have zero variance; nothing to learn a hierarchy from.")
    return shift, scale


def column_variance(x) -> np.ndarray:
    """Per-column variance of a dense or sparse matrix (no densification), floored at 1e-12."""
    from ..io._rows import column_moments, is_streamed, moments

    if is_streamed(x):
        return np.maximum(moments(x)[1], 1e-12)
    if sp.issparse(x) or np.size(x) > _DENSE_IN_ONE_GO:  # in blocks, no float64 copy of x
        return np.maximum(column_moments(x)[1], 1e-12)
    return np.maximum(np.asarray(x, dtype=np.float64).var(0), 1e-12)


#: dense matrices up to this many values get their moments in one float64 copy; larger ones
#: (and sparse ones) a block of rows at a time (an atlas's float32 expression would be copied
#: twice in float64, a sparse one squared and upcast whole)
_DENSE_IN_ONE_GO = 2**24


def standardization(x) -> tuple[np.ndarray, float, np.ndarray]:
    """Shift, global scale and per-dimension variance of the standardised data.

    :func:`global_standardizer` and :func:`column_variance` / scale**2, in one pass over the
    cells when they are streamed from disk.

    Examples
    --------
    >>> shift, scale, var = standardization(np.array([[0.0, 0.0], [2.0, 4.0]]))
    >>> round(float(var.mean()), 6)
    1.0
    """
    from ..io._rows import is_streamed, moments

    if not is_streamed(x):
        shift, scale = global_standardizer(x)
        return shift, scale, column_variance(x) / scale**2
    shift, variance = moments(x)
    scale = float(np.sqrt(np.mean(variance)))
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError("The data have zero variance; nothing to learn a hierarchy from.")
    return shift, scale, np.maximum(variance, 1e-12) / scale**2


def standardized_rows(matrix, rows: np.ndarray, shift, scale, block_rows: int = 4096) -> np.ndarray:
    """``(to_dense(matrix[rows]) - shift) / scale`` as float32, densified a block of rows at a time.

    The same values as standardising the whole subsample in float64 and casting (each element
    is computed alike), without holding float64 copies of (types x n_per_class) x genes.
    """
    from .._validation import to_dense

    sub = matrix[rows]
    out = np.empty((len(rows), int(sub.shape[1])), dtype=np.float32)
    for lo in range(0, len(rows), block_rows):
        hi = min(len(rows), lo + block_rows)
        # float64 arithmetic as on the whole subsample, rounded to float32 once, at the end
        out[lo:hi] = (to_dense(sub[lo:hi]) - shift) / scale
    return out


def subsample_per_class(
    labels: np.ndarray, n_classes: int, n_per_class: int, seed: int
) -> np.ndarray:
    """Indices of up to ``n_per_class`` cells of each class (seeded, sorted)."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) > n_per_class:
            idx = rng.choice(idx, n_per_class, replace=False)
        keep.append(np.sort(idx))
    return np.concatenate(keep)


#: how the similarity curves are obtained (see :func:`similarity_curves`)
CURVES = ("sampled", "expected")
#: how sets of classes are merged (see :func:`agglomerate_average`, :func:`agglomerate`)
LINKAGES = ("average", "single")


#: fewest points of the diffusion-time grid: a coarser grid cannot place branch times
MIN_TIMES = 10


@dataclass(frozen=True)
class DiscoveryOptions:
    """The options of hierarchy discovery, named once for every place that discovers or places.

    :func:`scbranch.tl.branch_hierarchy`, the model (``discovery_kwargs``), placing a new type
    (:meth:`~scbranch.BranchedDiffusion.add_classes`) and bootstrap stability all use these,
    so a tree is rebuilt, extended or checked with exactly the options it was discovered with.

    Parameters
    ----------
    n_per_class
        Cells per type used for the similarity curves (seeded subsample).
    n_times
        Points of the diffusion-time grid on [0, 1].
    smooth_sigma
        Width, in grid steps, of the Gaussian smoothing of each curve (0: none).
    epsilon
        Tolerance of the crossover criterion; larger values merge types earlier.
    min_branch_length
        Shortest allowed branch, in units of diffusion time.
    linkage
        ``"average"`` (merge the sets of types whose pooled curves cross first) or
        ``"single"`` (the paper's rule: at the first crossing of any pair of their types).
    n_noise_draws
        Forward-noise draws the sampled curves are averaged over.
    curves
        ``"sampled"`` (noised cells, the paper) or ``"expected"`` (no noise drawn; the
        many-dimension limit of the expected cosines; deterministic).
    seed
        Seed of the subsample and of the noise.

    Examples
    --------
    >>> DiscoveryOptions(curves="expected").to_params()["curves"]
    'expected'
    """

    n_per_class: int = 200
    n_times: int = 200
    smooth_sigma: float = 3.0
    epsilon: float = 0.005
    min_branch_length: float = 0.02
    linkage: str = "average"
    n_noise_draws: int = 1
    curves: str = "sampled"
    seed: int = 0

    def __post_init__(self):
        n = self.n_noise_draws
        if isinstance(n, bool) or not isinstance(n, int | np.integer):
            raise TypeError(f"n_noise_draws must be an integer, got {n!r}.")
        if n < 1:
            raise ValueError(f"n_noise_draws must be at least 1, got {n}.")
        if self.curves not in CURVES:
            raise ValueError(f"curves must be one of {CURVES}, got {self.curves!r}.")
        if self.curves == "expected" and n != 1:
            raise ValueError(
                "n_noise_draws averages sampled curves; curves='expected' draws no noise. Use "
                "one or the other."
            )
        if self.linkage not in LINKAGES:
            raise ValueError(f"linkage must be one of {LINKAGES}, got {self.linkage!r}.")
        # out of range, these failed later as "never become indistinguishable"
        for name, least in (("n_per_class", 2), ("n_times", MIN_TIMES)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(f"{name} must be an integer, got {value!r}.")
            if value < least:
                raise ValueError(f"{name} must be at least {least}, got {value}.")
        for name in ("epsilon", "smooth_sigma", "min_branch_length"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or not 0 <= float(value) < np.inf:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
        if self.min_branch_length >= 1:
            raise ValueError(
                f"min_branch_length is in units of diffusion time (0-1), got "
                f"{self.min_branch_length}."
            )

    @classmethod
    def from_params(cls, params: Mapping | None, **overrides) -> DiscoveryOptions:
        """The options recorded in a hierarchy's ``params`` (unknown keys ignored).

        Records written before the options were unified name the cells per class
        ``n_cells_per_class``; they are read too. Missing options keep their defaults.
        """
        params = dict(params or {})
        if "n_cells_per_class" in params and "n_per_class" not in params:
            params["n_per_class"] = params["n_cells_per_class"]
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        casts = {"int": int, "float": float, "str": str}
        values = {k: casts[fields[k]](params[k]) for k in fields if k in params}
        return cls(**{**values, **overrides})

    @classmethod
    def from_kwargs(cls, kwargs: Mapping | None) -> DiscoveryOptions:
        """Options from user keyword arguments, refusing names that are not options."""
        kwargs = dict(kwargs or {})
        if "n_cells_per_class" in kwargs:  # the name before the options were unified
            kwargs["n_per_class"] = kwargs.pop("n_cells_per_class")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"Unknown discovery option(s) {unknown}; the options are {names}.")
        return cls(**kwargs)

    def to_params(self) -> dict:
        """h5ad-safe dict of the options."""
        return dataclasses.asdict(self)


def _class_sums(values: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-class sums over the cell axis (1) of ``values`` (Tc, n, ...): shape (Tc, C, ...).

    A scatter-add costs O(Tc n d); the product with a (n, C) one-hot matrix it replaces cost
    O(Tc n C d), which with 100 classes was most of the time of the curves.
    """
    out = values.new_zeros((values.shape[0], n_classes, *values.shape[2:]))
    return out.index_add_(1, labels, values)


def _pair_sums(sums: torch.Tensor, counts: torch.Tensor, self_terms):
    """Mean cosines from per-class sums of per-cell vectors ``u``: ``sums`` (Tc, C, d).

    Returns ``(intra (Tc, C), inter (Tc, C, C))``. The mean-unit-vector identity: the mean of
    ``u_i . u_j`` over i in A, j in B is ``mean(u_A) . mean(u_B)``; within A over distinct
    pairs it is ``(|sum u_A|^2 - sum_i |u_i|^2) / (n_A (n_A - 1))`` (``self_terms``: that
    per-class sum).
    """
    means = sums / counts.view(1, -1, 1)
    inter = means @ means.transpose(1, 2)  # (Tc, C, C)
    intra = (sums.pow(2).sum(-1) - self_terms) / (counts * (counts - 1))
    return intra, inter


def similarity_curves(
    x: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    sde: VPSDE,
    times: np.ndarray,
    *,
    seed: int = 0,
    n_draws: int = 1,
    curves: str = "sampled",
    max_chunk_elements: int = 2**24,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean pairwise cosine similarity within and between classes along the forward process.

    Uses the mean-unit-vector identity: with ``u_i = x_i / |x_i|`` the mean cosine between sets
    A and B is ``mean(u_A) . mean(u_B)``, and within A (distinct pairs only) it is
    ``(|sum u_A|^2 - n_A) / (n_A (n_A - 1))``. Cost O(T n d + T C^2 d) instead of
    O(T C^2 n^2 d).

    Parameters
    ----------
    x
        Standardised data, shape ``(n, d)``.
    labels
        Class indices in ``[0, n_classes)``, shape ``(n,)``; every class needs >= 2 cells.
    n_classes
        Number of classes.
    sde
        Forward process used to noise the cells.
    times
        Time grid, shape ``(T,)``.
    seed
        Seed of the forward noise.
    n_draws
        Independent forward-noise draws the curves are averaged over (``curves="sampled"``).
        Each draw is a Monte Carlo estimate of the expected curves that the crossover rule is
        defined on; averaging ``k`` draws divides their variance by ``k``; ``n_draws=1``
        reproduces the single-draw curves exactly.
    curves
        ``"sampled"``: cells noised by draws of the forward process (the paper).
        ``"expected"``: no noise is drawn; the cosine of two independently noised cells
        ``x_t = a x + s eps`` is replaced by its limit for many dimensions,
        ``a^2 x.y / sqrt((a^2 |x|^2 + s^2 d) (a^2 |y|^2 + s^2 d))`` (the noise terms are
        O(sqrt d) against O(d)). Deterministic, and as cheap as one draw: the identity above
        holds with ``u_i = a x_i / sqrt(a^2 |x_i|^2 + s^2 d)``.
    max_chunk_elements
        Memory cap: how many floats one chunk of noised cells may hold.

    Returns
    -------
    ``intra`` of shape ``(C, T)`` and ``inter`` of shape ``(C, C, T)`` (diagonal = intra).
    """
    if curves not in CURVES:
        raise ValueError(f"curves must be one of {CURVES}, got {curves!r}.")
    if int(n_draws) < 1:
        raise ValueError(f"n_draws must be at least 1, got {n_draws}.")
    # on the CPU (with its generator) whatever torch's default device
    x_t0 = torch.as_tensor(np.asarray(x), dtype=torch.float32, device="cpu")
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.long, device="cpu")
    n, d = x_t0.shape
    counts = torch.bincount(lab, minlength=n_classes).to(torch.float32)
    if (counts < 2).any():
        bad = int(torch.argmin(counts))
        raise ValueError(f"Class index {bad} has {int(counts[bad])} cell(s); need at least 2.")
    gen = torch.Generator().manual_seed(int(seed))
    squared_norms = x_t0.pow(2).sum(-1)  # (n,)
    t_all = torch.as_tensor(np.asarray(times), dtype=torch.float32, device="cpu")
    # the expected curves hold (Tc, n) weights, the sampled ones (Tc, n, d) noised cells
    per_time = n if curves == "expected" else n * d
    chunk = max(1, int(max_chunk_elements // max(per_time, 1)))
    if curves == "expected":  # cells sorted by class: each class's sum is one matrix product
        order = torch.argsort(lab, stable=True)
        x_sorted = x_t0[order]
        bounds = [0, *torch.cumsum(counts.long(), 0).tolist()]
    else:  # buffers reused by every chunk: fresh (Tc, n, d) tensors cost page faults each time
        buffer, signal = torch.empty(2, min(chunk, len(t_all)) * n * d, device="cpu")
    intra_out, inter_out = [], []
    for start in range(0, len(t_all), chunk):
        t = t_all[start : start + chunk]
        a = sde.alpha(t).view(-1, 1, 1)
        s = sde.sigma(t).view(-1, 1, 1)
        if curves == "expected":
            # u_i = w_i x_i with one weight per cell and time: never build the (Tc, n, d) u
            norms = (a[..., 0] ** 2 * squared_norms + s[..., 0] ** 2 * d).sqrt()  # (Tc, n)
            w = a[..., 0] / norms.clamp_min(1e-12)
            self_terms = _class_sums(w.pow(2) * squared_norms, lab, n_classes)  # (Tc, C)
            w_sorted = w[:, order]
            sums = torch.stack(
                [
                    w_sorted[:, lo:hi] @ x_sorted[lo:hi]
                    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
                ],
                dim=1,
            )  # (Tc, C, d)
            intra, inter = _pair_sums(sums, counts, self_terms)
        else:
            intra = inter = 0.0
            for _ in range(int(n_draws)):
                # x_t = a x + s eps, then u = x_t / |x_t|, in place (same values, bit for bit)
                u = buffer[: len(t) * n * d].view(len(t), n, d)
                torch.randn((len(t), n, d), generator=gen, out=u, device="cpu")
                u.mul_(s).add_(torch.mul(a, x_t0, out=signal[: u.numel()].view_as(u)))
                u.div_(torch.linalg.vector_norm(u, dim=-1, keepdim=True).clamp_min_(1e-12))
                sums = _class_sums(u, lab, n_classes)  # (Tc, C, d)
                one_intra, one_inter = _pair_sums(sums, counts, counts)  # |u_i| = 1
                intra, inter = intra + one_intra, inter + one_inter
            intra, inter = intra / n_draws, inter / n_draws
        intra_out.append(intra)
        inter_out.append(inter)
    intra = torch.cat(intra_out).T.numpy().astype(np.float64)
    inter = torch.cat(inter_out).permute(1, 2, 0).numpy().astype(np.float64)
    idx = np.arange(n_classes)
    inter[idx, idx] = intra
    return intra, inter


def smoothed(intra: np.ndarray, inter: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Similarity curves smoothed along t with a Gaussian of ``sigma`` grid steps (0: as is)."""
    if sigma <= 0:
        return intra, inter
    return (
        gaussian_filter1d(intra, sigma, axis=-1, mode="nearest"),
        gaussian_filter1d(inter, sigma, axis=-1, mode="nearest"),
    )


def _first_crossings(gap: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First zero crossing of each row of ``gap`` (P, T), linearly interpolated on ``times``.

    Returns the crossing times (NaN where a row never reaches 0) and whether each row crosses.
    Vectorised over the rows: with many classes the pairs are many (200 classes: 19,900), and
    a loop over them cost more than the curves.
    """
    crossed = gap >= 0
    hit = crossed.any(-1)
    k = np.argmax(crossed, axis=-1)  # first grid point at or past the crossing
    rows = np.arange(len(gap))
    before = np.maximum(k - 1, 0)
    g_before, g_at = gap[rows, before], gap[rows, k]
    with np.errstate(divide="ignore", invalid="ignore"):  # k == 0 rows: replaced below
        # linear interpolation of the zero crossing between grid points k-1 and k
        frac = -g_before / (g_at - g_before)
        t = times[before] + frac * (times[k] - times[before])
    t = np.where(k == 0, times[0], t)
    return np.where(hit, t, np.nan), hit


def _never_crossing_error(name_a: str, name_b: str, gap: np.ndarray) -> ValueError:
    """The error for two classes (or sets) whose curves never cross; ``gap``: their (T,) gap."""
    return ValueError(
        f"Classes {name_a!r} and {name_b!r} never become indistinguishable under "
        f"the forward process (closest gap {-gap.max():.4f} > 0). Increase `epsilon` "
        "(e.g. 0.01) or `beta1`, or check that the representation is standardised."
    )


def crossover_times(
    intra: np.ndarray,
    inter: np.ndarray,
    times: np.ndarray,
    *,
    epsilon: float = 0.005,
    classes: Sequence[str] | None = None,
) -> np.ndarray:
    """First time at which two classes are as similar to each other as to themselves.

    ``t*_ij = min{t : inter_ij(t) >= (intra_i(t) + intra_j(t)) / 2 - epsilon}``, linearly
    interpolated between grid points. Raises a clear error for a pair that never crosses (the
    first such pair ``i < j`` in row order).

    Parameters
    ----------
    intra
        Within-class curves, shape ``(C, T)``.
    inter
        Between-class curves, shape ``(C, C, T)``; only the pairs ``i < j`` are read.
    times
        Time grid, shape ``(T,)``.
    epsilon
        Tolerance of the criterion.
    classes
        Names for the error message (default: the indices).

    Returns
    -------
    Symmetric matrix of shape ``(C, C)`` with zeros on the diagonal.

    Examples
    --------
    >>> times = np.linspace(0, 1, 11)
    >>> inter = np.zeros((2, 2, 11))
    >>> inter[0, 1] = inter[1, 0] = times  # the classes grow alike linearly
    >>> crossover_times(np.full((2, 11), 0.5), inter, times, epsilon=0.0).round(3).tolist()
    [[0.0, 0.5], [0.5, 0.0]]
    """
    n_classes = intra.shape[0]
    names = classes if classes is not None else [str(i) for i in range(n_classes)]
    i, j = np.triu_indices(n_classes, 1)
    gap = inter[i, j] - 0.5 * (intra[i] + intra[j]) + epsilon  # >= 0 once crossed
    t, hit = _first_crossings(gap, np.asarray(times, dtype=np.float64))
    if not hit.all():
        p = int(np.argmin(hit))  # the first pair in row order, as a loop over pairs meets it
        raise _never_crossing_error(names[i[p]], names[j[p]], gap[p])
    out = np.zeros((n_classes, n_classes))
    out[i, j] = t
    out[j, i] = t
    return out


@dataclass
class Agglomeration:
    """Result of :func:`agglomerate`: merges in order and classes forced apart by the minimum."""

    merges: list[tuple[tuple[int, ...], tuple[int, ...], float]]
    short_pairs: list[tuple[int, int, float]]


def agglomerate(cross: np.ndarray, *, min_branch_length: float = 0.02) -> Agglomeration:
    """Union-find agglomeration of classes by increasing crossover time (the paper's rule).

    The merged node's time is ``max(crossover, child_time + min_branch_length)`` for each child,
    so times increase towards the root and no branch is shorter than ``min_branch_length``.
    """
    n = cross.shape[0]
    parent = list(range(n))
    members = {i: (i,) for i in range(n)}
    node_time = {i: 0.0 for i in range(n)}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    pairs = sorted((cross[i, j], i, j) for i in range(n) for j in range(i + 1, n))
    merges, short = [], []
    for t, i, j in pairs:
        ri, rj = find(i), find(j)
        if ri == rj:
            continue
        time = max(float(t), node_time[ri] + min_branch_length, node_time[rj] + min_branch_length)
        if time > float(t) + 1e-12:
            short.append((i, j, float(t)))
        if time > 1.0 - min_branch_length:
            raise ValueError(
                f"Merge at t={time:.3f} leaves no room for the root branch; decrease "
                "`min_branch_length` or increase `beta1` so classes merge earlier."
            )
        merges.append((members[ri], members[rj], time))
        parent[rj] = ri
        members[ri] = tuple(sorted(members[ri] + members[rj]))
        node_time[ri] = time
        del members[rj]
    return Agglomeration(merges=merges, short_pairs=short)


def agglomerate_average(
    intra: np.ndarray,
    inter: np.ndarray,
    times: np.ndarray,
    *,
    epsilon: float = 0.005,
    min_branch_length: float = 0.02,
    classes: Sequence[str] | None = None,
) -> Agglomeration:
    """Agglomerate SETS of classes by when their pooled similarity curves cross (average linkage).

    :func:`agglomerate` (the paper's rule) merges two sets as soon as ANY pair of their classes
    crosses: single linkage, which chains when a tiny, noisy class crosses early with a member of
    another lineage. Here a merged set is treated as one class whose similarity to another set is
    the class-averaged between-set similarity, and whose within-set similarity averages all its
    class pairs (its members' own curves included); the next merge is the pair of sets that
    crosses first under the same criterion. Classes are weighted equally, not by cell counts.
    Of pairs crossing at exactly the same time, the one whose sets were formed first merges
    first (classes in index order, then merged sets in the order they were formed).

    The pooled curves are kept as sums over class pairs and updated at each merge (the sums of
    a merged set are the sums of its two parts), and only the merged set's crossings with the
    other sets are new: O(C^2 T) in all instead of recomputing every pooled curve and crossing
    at each of the C - 1 merges (100 classes: 0.1 s instead of minutes).

    Parameters
    ----------
    intra
        Within-class curves, shape ``(C, T)``.
    inter
        Between-class curves, shape ``(C, C, T)`` (the diagonal is ignored).
    times
        Time grid, shape ``(T,)``.
    epsilon
        Tolerance of the crossover criterion.
    min_branch_length
        Shortest allowed branch: a merge is at least this far above each of its two sets.
    classes
        Names for error messages.

    Returns
    -------
    The merges in order and the pairs forced apart by ``min_branch_length``.

    Examples
    --------
    Classes 0 and 1 cross at t = 0.2; their set crosses class 2 at t = 0.733, not at 0.6 where
    each of them does, because its within-set similarity averages the pair's curve too:

    >>> times = np.linspace(0, 1, 11)
    >>> inter = np.zeros((3, 3, 11))
    >>> inter[0, 1] = inter[1, 0] = times - 0.2
    >>> inter[:2, 2] = inter[2, :2] = times - 0.6
    >>> agg = agglomerate_average(np.zeros((3, 11)), inter, times, epsilon=0.0)
    >>> [(a, b, round(t, 3)) for a, b, t in agg.merges]
    [((0,), (1,), 0.2), ((2,), (0, 1), 0.733)]
    """
    n = intra.shape[0]
    names = list(classes) if classes is not None else [str(i) for i in range(n)]
    times = np.asarray(times, dtype=np.float64)
    # every crossing of two classes first (and the error naming the first that never crosses)
    sim = np.array(inter, dtype=np.float64)
    idx = np.arange(n)
    sim[idx, idx] = intra
    cross = crossover_times(intra, sim, times, epsilon=epsilon, classes=names)
    # Slot s holds one current set: ``sim[s, r]`` is the SUM of the curves of all class pairs
    # between the sets in slots s and r, its within-set sum on the diagonal. A merged set takes
    # the slot of its older part; ``rank`` orders the sets as if merged sets were appended to
    # a list of the classes, which decides ties.
    np.fill_diagonal(cross, np.inf)
    size = np.ones(n)
    members = [(i,) for i in range(n)]
    rank = np.arange(n)
    node_time = [0.0] * n
    active = np.ones(n, dtype=bool)
    merges, short = [], []
    for step in range(n - 1):
        best = cross.min()
        ties = np.argwhere(cross == best)
        first = np.lexsort((rank[ties].max(1), rank[ties].min(1)))[0]
        a, b = sorted(ties[first], key=lambda s: rank[s])  # a: the older set
        t = float(best)
        time = max(t, node_time[a] + min_branch_length, node_time[b] + min_branch_length)
        if time > t + 1e-12:
            short.append((members[a][0], members[b][0], t))
        if time > 1.0 - min_branch_length:
            raise ValueError(
                f"Merge at t={time:.3f} leaves no room for the root branch; decrease "
                "`min_branch_length` or increase `beta1` so classes merge earlier."
            )
        merges.append((members[a], members[b], time))
        # the merged set goes into slot a; slot b is retired
        active[b] = False
        cross[b, :] = cross[:, b] = np.inf
        within = sim[a, a] + sim[a, b] + sim[b, a] + sim[b, b]
        others = np.flatnonzero(active & (idx != a))
        others = others[np.argsort(rank[others])]
        sim[a, others] += sim[b, others]
        sim[others, a] += sim[others, b]
        sim[a, a] = within
        size[a] += size[b]
        members[a] = tuple(sorted(members[a] + members[b]))
        rank[a] = n + step
        node_time[a] = time
        if not len(others):
            break
        # crossings of the merged set with every other set (the others' are unchanged)
        mean_intra = sim[others, others] / size[others, None] ** 2
        gap = (
            sim[others, a] / (size[others] * size[a])[:, None]
            - 0.5 * (mean_intra + sim[a, a] / size[a] ** 2)
            + epsilon
        )
        t_new, hit = _first_crossings(gap, times)
        if not hit.all():
            p = int(np.argmin(hit))  # the other set met first, as a loop in list order would
            raise _never_crossing_error(
                "+".join(names[c] for c in members[others[p]]),
                "+".join(names[c] for c in members[a]),
                gap[p],
            )
        cross[a, others] = cross[others, a] = t_new
    return Agglomeration(merges=merges, short_pairs=short)


@dataclass
class DiscoveryResult:
    """Everything discovery computed: the tree and the curves it came from.

    Examples
    --------
    >>> from scbranch.datasets import simulate_tree
    >>> sim = simulate_tree(depth=1, seed=0)
    >>> res = discover_hierarchy(sim.x, sim.labels, sim.classes, VPSDE())
    >>> res.intra.shape
    (2, 200)
    """

    tree: BranchTree
    times: np.ndarray
    intra: np.ndarray
    inter: np.ndarray
    crossover: np.ndarray


def discovery_curves(
    x: np.ndarray, labels: np.ndarray, n_classes: int, sde: VPSDE, options: DiscoveryOptions
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The time grid and the smoothed similarity curves discovery reads its tree from.

    Shared by discovery and by hierarchies users give (whose branch times come from the same
    curves).
    """
    o = options
    keep = subsample_per_class(labels, n_classes, o.n_per_class, o.seed)
    times = np.linspace(0.0, 1.0, o.n_times)
    if not np.array_equal(keep, np.arange(len(labels))):  # already subsampled: no copy
        x = x[keep]
    intra, inter = similarity_curves(
        x,
        labels[keep],
        n_classes,
        sde,
        times,
        seed=o.seed,
        n_draws=o.n_noise_draws,
        curves=o.curves,
    )
    intra, inter = smoothed(intra, inter, o.smooth_sigma)
    return times, intra, inter


def discover_hierarchy(
    x: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    sde: VPSDE,
    options: DiscoveryOptions | None = None,
    **overrides,
) -> DiscoveryResult:
    """Discover the branch tree of standardised data (docs/method.md, 'Hierarchy discovery').

    Parameters
    ----------
    x
        Standardised data (see :func:`global_standardizer`), shape ``(n, d)``.
    labels
        Class indices, shape ``(n,)``.
    classes
        Class names (length C).
    sde
        The forward process (must be the one the model trains with).
    options
        Discovery options (:class:`DiscoveryOptions`; default: its defaults). One noise draw
        leaves Monte Carlo noise in the curves that moves close branch points and can reorder
        them; ``n_noise_draws`` averages it away and ``curves="expected"`` removes it.
    **overrides
        Options by name, replacing those of ``options`` (e.g. ``curves="expected"``).

    Returns
    -------
    The tree and the similarity curves.

    Examples
    --------
    >>> from scbranch.datasets import simulate_tree
    >>> sim = simulate_tree(depth=2, seed=0)
    >>> res = discover_hierarchy(sim.x, sim.labels, sim.classes, VPSDE())
    >>> res.tree.n_branches
    7
    """
    o = DiscoveryOptions() if options is None else options
    if overrides:
        o = DiscoveryOptions.from_kwargs({**o.to_params(), **overrides})
    times, intra, inter = discovery_curves(x, labels, len(classes), sde, o)
    cross = crossover_times(intra, inter, times, epsilon=o.epsilon, classes=classes)
    if o.linkage == "average":
        agg = agglomerate_average(
            intra,
            inter,
            times,
            epsilon=o.epsilon,
            min_branch_length=o.min_branch_length,
            classes=classes,
        )
    else:
        agg = agglomerate(cross, min_branch_length=o.min_branch_length)
    for i, j, t in agg.short_pairs:
        if t < o.min_branch_length:
            warnings.warn(
                f"Classes {classes[i]!r} and {classes[j]!r} are indistinguishable already at "
                f"t={t:.3f}; their branches were lengthened to min_branch_length="
                f"{o.min_branch_length}. Consider merging these labels.",
                UserWarning,
                stacklevel=2,
            )
    tree = BranchTree.from_merges(classes, agg.merges)
    logger.debug("Discovered hierarchy %s", tree.to_newick())
    return DiscoveryResult(tree=tree, times=times, intra=intra, inter=inter, crossover=cross)
