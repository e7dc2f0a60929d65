"""Carry GIVEN states between two diffusion times along chosen classes' branches.

The samplers (``_sampling.py``) start from noise at t = 1. Transmutation (docs/method.md)
starts from real cells instead: up from ``t_min`` to the branch point of the source and target types
along the source's branches, then down along the target's. Every row follows the branches of
its own class (``labels``), so one call moves rows of several classes at once.

Up the process (solvers of :data:`~scbranch.module.SOLVERS` that move up):
- ``"heun"``: the probability-flow ODE integrated forward in time. Deterministic, and the
  inverse of the same integration downwards (up to solver error): cell-specific detail
  survives the round trip.
- ``"noise"``: exact forward transitions q(x_t' | x_t) between grid times (closed form, no
  network call). The states are a sample path of the forward SDE.

Down the process: any solver of :func:`~scbranch.module.sample`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ._random import seeded_generator
from ._sampling import CountingCaller, EpsFn, _Group, pass_rows, time_grid
from ._sde import VPSDE
from ._solvers import DEFAULT_N_STEPS, get_solver
from ._tree import BranchTree

#: noise streams of transport, apart from the samplers' (kind 0: branches, 1: classes)
_STREAM = 2


@dataclass
class TransportResult:
    """States at ``t_to``, the states recorded on the way, and the cost.

    See :func:`transport`.

    Examples
    --------
    >>> TransportResult(x=torch.zeros(2, 3), grid=np.array([0.5, 0.1]), n_network_calls=2).x.shape
    torch.Size([2, 3])
    """

    x: torch.Tensor
    grid: np.ndarray
    n_network_calls: int
    trajectory: dict[float, torch.Tensor] = field(default_factory=dict)


def transport(
    eps_fn: EpsFn,
    tree: BranchTree,
    sde: VPSDE,
    x: torch.Tensor,
    labels: torch.Tensor,
    t_from: float,
    t_to: float,
    *,
    solver: str = "heun",
    n_steps: int = DEFAULT_N_STEPS,
    seed: int = 0,
    spacing: str | None = None,
    record_times: Sequence[float] = (),
    batch_size: int | None = None,
    progress: Callable | None = None,
) -> TransportResult:
    """Move states ``x`` (standardised space) from time ``t_from`` to ``t_to``.

    Parameters
    ----------
    eps_fn
        Noise predictor ``eps_fn(x, t, branch, label)``.
    tree
        Branch tree; row ``i`` follows the branches of class ``labels[i]``.
    sde
        Forward process.
    x
        States at ``t_from``, shape ``(n, d)``.
    labels
        Class index of every row, shape ``(n,)``.
    t_from, t_to
        Start and end times in ``[t_min, 1]``; ``t_to > t_from`` moves up (towards noise).
    solver
        Up: ``"heun"`` (probability-flow ODE) or ``"noise"`` (exact forward transitions).
        Down: ``"heun"``, ``"dpm2m"``, ``"ddim"``, ``"em"``, ``"ei"`` or ``"pc"``.
    n_steps
        Steps between the two times; the grid holds every time where a row's class changes
        branch, and every record time, so no step straddles a branch point.
    seed
        Seed of the noise (stochastic solvers).
    spacing
        ``"logsnr"`` or ``"t"``; `None`: the solver's default (``"noise"``: log-SNR).
    record_times
        Times between ``t_from`` and ``t_to`` (inclusive) at which to keep the states.
    batch_size
        At most this many rows per forward pass (`None`: 8,192 on CPU).
    progress
        Optional wrapper around the step iterator.

    Returns
    -------
    The states at ``t_to``, the grid (in the direction of travel), the number of network
    calls, and ``trajectory`` (time -> states).

    Examples
    --------
    >>> tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.5)])
    >>> sde = VPSDE()
    >>> def eps_fn(x, t, branch, label):  # exact for N(0, 4 I) data
    ...     a, s = sde.alpha(torch.tensor(t)), sde.sigma(torch.tensor(t))
    ...     return s * x / (4 * a**2 + s**2)
    >>> x0 = torch.randn(4, 3)
    >>> up = transport(eps_fn, tree, sde, x0, torch.zeros(4, dtype=torch.long), 1e-3, 0.5)
    >>> back = transport(eps_fn, tree, sde, up.x, torch.ones(4, dtype=torch.long), 0.5, 1e-3)
    >>> bool(torch.allclose(back.x, x0, atol=1e-3))
    True
    """
    up = t_to > t_from
    step = get_solver(solver, "up" if up else "down")
    lo, hi = sorted((float(t_from), float(t_to)))
    if not (sde.t_min <= lo and hi <= 1.0) or lo == hi:
        raise ValueError(
            f"Transport needs two different times in [t_min={sde.t_min}, 1]; got "
            f"{t_from} -> {t_to}."
        )
    records = {float(t) for t in record_times}
    outside = sorted(t for t in records if not lo - 1e-12 <= t <= hi + 1e-12)
    if outside:
        raise ValueError(f"Record times {outside} lie outside [{lo}, {hi}].")
    classes = sorted({int(c) for c in labels.tolist()})
    knots = set(tree.breakpoints(classes, lo)) | records
    spacing = step.default_spacing if spacing is None else spacing
    grid = time_grid(sde, sorted(knots), n_steps, spacing=spacing, t_start=hi, t_end=lo)
    if up:
        grid = grid[::-1].copy()
    call = CountingCaller(eps_fn, pass_rows(batch_size, x.device))
    gen = seeded_generator(seed, _STREAM, int(up))
    group = _Group(branch=-1, label=-1, x=x, gen=gen)
    trajectory = {float(grid[0]): x.clone()} if float(grid[0]) in records else {}
    steps = range(len(grid) - 1)
    if progress is not None:
        steps = progress(steps)
    first_in_segment = True
    for k in steps:
        t_a, t_b = float(grid[k]), float(grid[k + 1])
        # each row follows the branch of its own class over (t_a, t_b); a solver without
        # network calls (forward noising) needs none
        branch = (
            tree.lookup(labels, torch.tensor(0.5 * (t_a + t_b))) if step.calls_per_step else None
        )
        x = step.step(call, sde, x, t_a, t_b, branch, labels, [group], [len(x)], first_in_segment)
        first_in_segment = t_b in knots
        if t_b in records:
            trajectory[t_b] = x.clone()
    return TransportResult(x=x, grid=grid, n_network_calls=call.n_calls, trajectory=trajectory)


def denoise(
    eps_fn: EpsFn,
    tree: BranchTree,
    sde: VPSDE,
    x: torch.Tensor,
    labels: torch.Tensor,
    t: float,
) -> torch.Tensor:
    """The model's estimate of the clean state, E[x_0 | x_t] (Tweedie), on each row's branch.

    At a branch point the branch above it (shared by the classes that meet there) is used.

    Examples
    --------
    A network that predicts no noise leaves ``x / alpha(t)``:

    >>> tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.5)])
    >>> x = torch.ones(2, 3)
    >>> x0 = denoise(lambda x, t, b, c: 0 * x, tree, VPSDE(), x, torch.tensor([0, 1]), 0.3)
    >>> torch.allclose(x0, x / VPSDE().alpha(torch.tensor(0.3)))
    True
    """
    tt = torch.tensor(float(t))
    branch = tree.lookup(labels, tt)
    eps = CountingCaller(eps_fn, pass_rows(None, x.device))(x, float(t), branch, labels)
    return (x - sde.sigma(tt) * eps) / sde.alpha(tt)
