"""Reverse-time samplers on a branch-aware grid, with branch-shared ("fan-out") execution.

All samplers work in the standardised space and call ``eps_fn(x, t, branch, label)``, which
returns the predicted noise for rows ``x`` at the scalar time ``t`` (rows in branch ``branch[i]``;
``label[i]`` is the class of a row, or -1 while the row is still shared by several classes).

Execution (docs/method.md, 'Sampling'): the time grid contains every branch time of the requested
classes, so no step straddles a branch point. At each grid step every live group of rows is advanced
with ONE network call (the network groups rows by head internally). With ``share=True`` a group is a
branch: it starts as a copy of the first rows of its parent's states and holds as many rows as the
largest class below it needs. With ``share=False`` every class is its own group from t = 1 and
follows its own branches. Noise is drawn per group from generators seeded by (seed, branch or
class), so results do not depend on which other classes are sampled alongside (with
``share=False``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ._random import normal, seeded_generator
from ._sde import VPSDE
from ._solvers import CORRECTOR_SNR, DEFAULT_N_STEPS, DEFAULT_SOLVER, get_solver
from ._tree import BranchTree

logger = logging.getLogger(__name__)

EpsFn = Callable[[torch.Tensor, float, torch.Tensor, torch.Tensor], torch.Tensor]


#: rows per forward pass on CPU when no batch_size is given: larger passes spill the cache
#: (32 classes x 1,000 cells, 2 cores: 8.2 s unchunked, 6.7 s in passes of 8,192 rows)
CPU_PASS_ROWS = 8192
#: units in which grid steps are spaced (see :func:`time_grid`)
SPACINGS = ("logsnr", "t", "interpolant")


def time_grid(
    sde: VPSDE,
    breakpoints: Sequence[float],
    n_steps: int,
    *,
    spacing: str = "logsnr",
    t_start: float = 1.0,
    t_end: float | None = None,
) -> np.ndarray:
    """Decreasing time grid from ``t_start`` (1) to ``t_end`` (``t_min``) holding every breakpoint.

    Steps are distributed over the segments between breakpoints in proportion to each segment's
    length (in log-SNR for ``spacing="logsnr"``, in t for ``spacing="t"``, in the linear
    interpolant's time ``sigma / (alpha + sigma)`` for ``"interpolant"``; every segment gets at
    least one step) and spaced uniformly in the same unit inside a segment. Breakpoints outside
    ``(t_end, t_start)`` are ignored.

    Examples
    --------
    >>> grid = time_grid(VPSDE(), [0.5], 10)
    >>> len(grid), 0.5 in grid
    (11, True)
    >>> time_grid(VPSDE(), [0.2, 0.7], 4, spacing="t", t_start=0.5, t_end=0.1).round(2).tolist()
    [0.5, 0.4, 0.3, 0.2, 0.1]
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}.")
    t_end = sde.t_min if t_end is None else float(t_end)
    if not sde.t_min <= t_end < t_start <= 1.0:
        raise ValueError(
            f"Need t_min={sde.t_min} <= t_end < t_start <= 1, got t_end={t_end}, t_start={t_start}."
        )
    inner = {float(b) for b in breakpoints if t_end < b < t_start}
    knots = [float(t_start), *sorted(inner, reverse=True), t_end]
    if n_steps < len(knots) - 1:
        raise ValueError(
            f"n_steps={n_steps} is smaller than the {len(knots) - 1} segments between branch "
            f"points (and trajectory times); ask for at least {len(knots) - 1} steps (the "
            "default, n_steps=None, adapts to the tree)."
        )

    def unit(t):
        t = np.asarray(t, dtype=np.float64)
        if spacing == "logsnr":
            return sde.log_snr(t)
        return sde.interpolant_time(t) if spacing == "interpolant" else t

    def inverse(u):
        if spacing == "logsnr":
            return sde.t_from_log_snr(u)
        return sde.t_from_interpolant(u) if spacing == "interpolant" else u

    lengths = np.abs(np.diff(unit(np.array(knots))))
    share = lengths / lengths.sum() * n_steps
    steps = np.maximum(1, np.floor(share).astype(int))
    while steps.sum() < n_steps:  # largest remainder first
        steps[np.argmax(share - steps)] += 1
    while steps.sum() > n_steps:
        candidates = np.where(steps > 1, steps - share, -np.inf)
        steps[np.argmax(candidates)] -= 1
    grid = [float(t_start)]
    for (hi, lo), k in zip(zip(knots[:-1], knots[1:], strict=True), steps, strict=True):
        inner = inverse(np.linspace(unit(hi), unit(lo), k + 1)[1:-1])
        grid.extend(np.atleast_1d(inner).tolist())
        grid.append(lo)  # exact knot, not a round trip through log-SNR
    return np.array(grid)


@dataclass
class _Group:
    branch: int
    label: int  # class index, or -1 while shared by several classes
    x: torch.Tensor
    gen: torch.Generator
    x0_prev: torch.Tensor | None = None  # data prediction of the previous step (multistep)
    h_prev: torch.Tensor | None = None  # log-SNR step of the previous step (multistep)


@dataclass
class SampleResult:
    """Samples in the standardised space and the cost of producing them.

    Examples
    --------
    >>> tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.5)])
    >>> res = sample(lambda x, t, b, c: 0 * x, tree, VPSDE(), {0: 3}, n_input=2, n_steps=4)
    >>> res.x.shape, res.n_network_calls  # 4 Euler-Maruyama steps and the final denoising
    (torch.Size([3, 2]), 5)
    """

    x: torch.Tensor
    labels: torch.Tensor
    n_network_calls: int
    n_row_evaluations: int
    grid: np.ndarray
    trajectory: dict[float, torch.Tensor] = field(default_factory=dict)


def steps_for(
    tree: BranchTree,
    sde: VPSDE,
    classes,
    *,
    share: bool = True,
    n_steps: int | None = None,
    record_times: Sequence[float] | None = None,
) -> int:
    """The number of steps a run takes: ``n_steps``, or by default enough for the tree.

    Every segment between branch points (and recording times) needs at least one step, so the
    default is :data:`~scbranch.module.DEFAULT_N_STEPS` (25) for trees with few branch points
    and one step per segment plus half of 25 for the long ones with more (a tree of C types has
    up to C - 1 branch times: 100 types would not fit in 25 steps).

    Examples
    --------
    >>> tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.5)])
    >>> steps_for(tree, VPSDE(), [0, 1]), steps_for(tree, VPSDE(), [0, 1], n_steps=7)
    (25, 7)
    """
    if n_steps is not None:
        return int(n_steps)
    knots = set(tree.breakpoints(list(classes) if share else None, sde.t_min))
    knots |= {float(t) for t in (record_times or ()) if sde.t_min < float(t) < 1.0}
    return max(DEFAULT_N_STEPS, len(knots) + 1 + DEFAULT_N_STEPS // 2)


def pass_rows(batch_size: int | None, device: torch.device) -> int | None:
    """Rows per forward pass: checked, or ``CPU_PASS_ROWS`` (8192) on CPU when not given."""
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    if batch_size is None and torch.device(device).type == "cpu":
        return CPU_PASS_ROWS
    return batch_size


class CountingCaller:
    """``eps_fn`` split into passes of at most ``batch_size`` rows, counting the calls.

    One call is one logical network evaluation of all rows (the cost unit of the benchmarks),
    however many passes memory needs.
    """

    def __init__(self, eps_fn: EpsFn, batch_size: int | None):
        self.eps_fn = eps_fn
        self.batch_size = batch_size
        self.n_calls = 0
        self.n_rows = 0

    def __call__(self, x: torch.Tensor, t: float, branch: torch.Tensor, label: torch.Tensor):
        self.n_calls += 1
        self.n_rows += x.shape[0]
        size = self.batch_size
        if size is None or x.shape[0] <= size:
            return self.eps_fn(x, t, branch, label)
        parts = zip(x.split(size), branch.split(size), label.split(size), strict=True)
        return torch.cat([self.eps_fn(xs, t, bs, ls) for xs, bs, ls in parts])


def sample(
    eps_fn: EpsFn,
    tree: BranchTree,
    sde: VPSDE,
    n_per_class: Mapping[int, int],
    *,
    n_input: int,
    solver: str = DEFAULT_SOLVER,
    n_steps: int | None = None,
    share: bool = True,
    seed: int = 0,
    spacing: str | None = None,
    denoise: bool = True,
    device: torch.device | str = "cpu",
    progress: Callable | None = None,
    batch_size: int | None = None,
    record_times: Sequence[float] | None = None,
    corrector_snr: float = CORRECTOR_SNR,
) -> SampleResult:
    """Draw samples of the requested classes by integrating the reverse process.

    Parameters
    ----------
    eps_fn
        Noise predictor ``eps_fn(x, t, branch, label)``.
    tree
        Branch tree of the model.
    sde
        Forward process.
    n_per_class
        Number of cells per class index.
    n_input
        Dimension of the data.
    solver
        A solver of :data:`~scbranch.module.SOLVERS` that moves down: ``"em"`` (the
        default, :data:`~scbranch.module.DEFAULT_SOLVER`), ``"ei"``, ``"heun"``, ``"dpm2m"``,
        ``"ddim"`` or ``"pc"`` (or the aliases ``"sde"``, ``"ode"``).
    n_steps
        Number of grid steps from t = 1 to ``t_min`` (`None`: :func:`~scbranch.module.steps_for`).
    share
        Share the reverse path above branch points between classes (fan-out).
    seed
        Seed; the result is deterministic for a given seed and device.
    spacing
        Step allocation and spacing unit, ``"logsnr"`` or ``"t"``; `None`: the solver's
        default (uniform in t for the reverse SDE, log-SNR for the ODE).
    denoise
        Return the network's denoised prediction at ``t_min`` (one extra call).
    device
        Device of the states.
    progress
        Optional wrapper around the step iterator (e.g. a progress bar).
    batch_size
        At most this many rows per forward pass (memory); one logical call is split into
        several passes. `None`: ``CPU_PASS_ROWS`` (8192) on CPU (faster), no limit elsewhere.
        Results depend on it only through float rounding (matrix products sum in another
        order on smaller batches).
    record_times
        Times in (t_min, 1] at which to record every requested cell's state; they are added
        to the grid so that states are exact there. With ``share=True`` a class's rows above
        its branch point are its shared ancestors' states.
    corrector_snr
        Signal-to-noise ratio setting the Langevin step of ``solver="pc"``.

    Returns
    -------
    Samples ordered by class in the order of ``n_per_class``, cost counters, and the recorded
    states (``trajectory``: time -> states in the same row order).

    Examples
    --------
    Two classes that share the trunk above their branch point at t = 0.5:

    >>> tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.5)])
    >>> res = sample(lambda x, t, b, c: 0 * x, tree, VPSDE(), {0: 4, 1: 4}, n_input=2, n_steps=6)
    >>> res.x.shape, res.labels.tolist()
    (torch.Size([8, 2]), [0, 0, 0, 0, 1, 1, 1, 1])
    """
    if corrector_snr <= 0:
        raise ValueError(f"corrector_snr must be positive, got {corrector_snr}.")
    step = get_solver(solver, corrector_snr=corrector_snr)
    counts = {int(c): int(n) for c, n in n_per_class.items() if int(n) > 0}
    if not counts:
        raise ValueError("Nothing to sample: every requested count is 0.")
    device = torch.device(device)
    # The grid holds every branch point of the tree, whichever classes are requested, so a
    # class's samples (share=False) do not depend on which other classes are sampled with it.
    # share=True: only where a requested class changes head (branch points of other classes,
    # e.g. of a class added later, do not move the grid); share=False: every class's, so that
    # a class's cells do not depend on which other classes are sampled alongside
    knots = set(tree.breakpoints(list(counts) if share else None, sde.t_min))
    records = _check_record_times(record_times, sde)
    n_steps = steps_for(tree, sde, counts, share=share, n_steps=n_steps, record_times=records)
    spacing = step.default_spacing if spacing is None else spacing
    grid = time_grid(sde, sorted(knots | records), n_steps, spacing=spacing)
    batch_size = pass_rows(batch_size, device)

    def need(branch: int) -> int:
        return max(counts.get(c, 0) for c in tree.branches[branch].classes)

    if share:
        root = tree.root
        gen = seeded_generator(seed, 0, root)
        groups = [
            _Group(
                root,
                -1 if len(tree.branches[root].classes) > 1 else tree.branches[root].classes[0],
                normal((need(root), n_input), gen, device),
                gen,
            )
        ]
    else:
        groups = []
        for c, n in counts.items():
            gen = seeded_generator(seed, 1, c)
            x = normal((n, n_input), gen, device)
            groups.append(_Group(tree.lookup(np.array([c]), 1.0)[0], c, x, gen))

    call = CountingCaller(eps_fn, batch_size)
    trajectory: dict[float, torch.Tensor] = {}
    if 1.0 in records:
        trajectory[1.0] = _class_states(groups, counts, tree, 1.0)

    steps = range(len(grid) - 1)
    if progress is not None:
        steps = progress(steps)
    first_in_segment = True
    for k in steps:
        t_hi, t_lo = float(grid[k]), float(grid[k + 1])
        if not share:  # each class follows its own branch over (t_lo, t_hi)
            mid = 0.5 * (t_hi + t_lo)
            for g in groups:
                g.branch = int(tree.lookup(np.array([g.label]), mid)[0])
        sizes = [g.x.shape[0] for g in groups]
        x = torch.cat([g.x for g in groups])
        branch = _per_row([g.branch for g in groups], sizes, device)
        label = _per_row([g.label for g in groups], sizes, device)
        x_new = step.step(call, sde, x, t_hi, t_lo, branch, label, groups, sizes, first_in_segment)
        for g, xs in zip(groups, torch.split(x_new, sizes), strict=True):
            g.x = xs
        if t_lo in records:
            trajectory[t_lo] = _class_states(groups, counts, tree, t_lo)
        first_in_segment = t_lo in knots
        if share and t_lo > sde.t_min:  # branch points at t_min: fanned out below, as lower ones
            _pass_through(groups, tree, t_lo, need, knots)
        if share and first_in_segment:
            groups = _fan_out(groups, tree, t_lo, need, device, seed)

    if share:  # branch points below t_min: the children start from copies of the states
        while any(tree.branches[g.branch].children for g in groups):
            groups = _fan_out(groups, tree, None, need, device, seed)
    # order the output by requested class
    by_label = {g.label: g for g in groups}
    x = torch.cat([by_label[c].x[:n] for c, n in counts.items()])
    labels = _per_row(list(counts), list(counts.values()), device)
    if denoise:
        t = sde.t_min
        branch = tree.lookup(labels, torch.tensor(t))
        eps = call(x, t, branch, labels)
        x = (x - sde.sigma(torch.tensor(t)) * eps) / sde.alpha(torch.tensor(t))
    return SampleResult(
        x=x,
        labels=labels,
        n_network_calls=call.n_calls,
        n_row_evaluations=call.n_rows,
        grid=grid,
        trajectory=dict(sorted(trajectory.items(), reverse=True)),
    )


def _check_record_times(record_times, sde: VPSDE) -> set[float]:
    if record_times is None:
        return set()
    times = {float(t) for t in record_times}
    bad = [t for t in times if not (sde.t_min <= t <= 1.0)]
    if bad:
        raise ValueError(f"Trajectory times must lie in [t_min={sde.t_min}, 1]; got {sorted(bad)}.")
    return times


def _class_states(groups, counts, tree, t) -> torch.Tensor:
    """States of every requested cell at time ``t``, rows in the output order.

    A class's rows are the first rows of the group whose branch holds the class (shared
    ancestors are repeated for every class below them).
    """
    rows = []
    for c, n in counts.items():
        own = [g for g in groups if g.label == c]  # share=False, or a leaf branch
        g = own[0] if own else next(g for g in groups if c in tree.branches[g.branch].classes)
        rows.append(g.x[:n])
    return torch.cat(rows).clone()


def _per_row(values: list[int], sizes: list[int], device) -> torch.Tensor:
    """One long tensor repeating ``values[i]`` ``sizes[i]`` times."""
    return torch.repeat_interleave(
        torch.tensor(values, dtype=torch.long, device=device),
        torch.tensor(sizes, dtype=torch.long, device=device),
    )


def _pass_through(groups, tree, t, need, knots) -> None:
    """Move groups down through branch starts that are no branch point for them.

    A branch split by ``BranchTree.add_class`` keeps its head on both halves; when the added
    class is not sampled, its split time is not on the grid and the group simply continues
    on the lower half: same rows, same head, same noise generator (so old classes' samples do
    not change when classes are added).
    """
    for g in groups:
        b = tree.branches[g.branch]
        while b.children and b.t_start >= t - 1e-12 and b.t_start not in knots:
            needed = [ch for ch in b.children if need(ch) > 0]
            if len(needed) != 1 or tree.branches[needed[0]].head != b.head:
                raise RuntimeError(
                    f"Branch {b.id} ends at t={b.t_start}, which is not on the time grid, but "
                    "its children use other heads; the grid is missing a branch point."
                )
            b = tree.branches[needed[0]]
            g.branch = b.id
            g.label = b.classes[0] if len(b.classes) == 1 else -1


def _fan_out(groups, tree, t, need, device, seed):
    """Replace every group whose branch starts at ``t`` (any, if None) by its children's copies."""
    out = []
    for g in groups:
        b = tree.branches[g.branch]
        if b.children and (t is None or abs(b.t_start - t) < 1e-12):
            for ch in b.children:
                n = need(ch)
                if n == 0:
                    continue
                child = tree.branches[ch]
                label = child.classes[0] if len(child.classes) == 1 else -1
                gen = seeded_generator(seed, 0, ch)
                out.append(_Group(ch, label, g.x[:n].clone(), gen))
        else:
            out.append(g)
    return out
