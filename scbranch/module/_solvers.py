"""Solvers of the reverse (and forward) process, as small objects behind one ``step``.

Sampling from noise (``_sampling.py``) and carrying given states between two times
(``_transport.py``) both advance rows with a solver from :data:`SOLVERS`, found by name. A
solver moves all rows from one grid time to the next with one or two network calls; it works
in the standardised space and calls ``call(x, t, branch, label)`` for the predicted noise.

========  ===========  =====  =================================================================
name      moves        calls  what
========  ===========  =====  =================================================================
heun      down and up  2      probability-flow ODE, Heun's method (invertible; the default)
dpm2m     down         1      probability-flow ODE, DPM-Solver++(2M) multistep in log-SNR
ddim      down and up  1      probability-flow ODE, first order (DDIM; flow matching's Euler step)
em        down         1      reverse SDE, Euler-Maruyama (stochastic; hundreds of steps)
ei        down         1      reverse SDE, exponential integrator in log-SNR (SDE-DPM-Solver-1)
pc        down         2      Euler-Maruyama predictor + Langevin corrector (the paper's)
noise     up           0      exact forward transitions q(x_t' | x_t) (no network call)
========  ===========  =====  =================================================================

``"ode"`` and ``"sde"`` are aliases of ``heun`` and ``em``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._random import normal
from ._sde import VPSDE

#: steps from t = 1 to t_min when none are given (sampling, hybrids, transport legs' unit)
DEFAULT_N_STEPS = 25
#: how far up the process ``generate_anchored`` noises its anchors: on pbmc3k and
#: pbmc68k_reduced the cells made from the training cells at 0.25 are as far from their nearest
#: training cell as new real cells are (0.99 x, 1.04 x; docs/benchmarks/anchored.md)
DEFAULT_ANCHOR_TIME = 0.25
#: the solver ``generate`` uses when none is given: the reverse SDE at 25 steps made cells
#: closer to real ones than the probability-flow ODE (pbmc3k AUROC 0.536 vs 0.581, 3 x 3
#: seeds, docs/benchmarks/sampler_quality.md) with half the network calls
DEFAULT_SOLVER = "em"
#: signal-to-noise ratio of the Langevin corrector (Song et al. 2021's default)
CORRECTOR_SNR = 0.16
#: user-facing names of the kind of process, mapped to the solver used for it
ALIASES = {"ode": "heun", "sde": "em"}


class Solver:
    """One way of moving rows between two diffusion times.

    Subclasses set the class attributes and implement :meth:`step`.

    Examples
    --------
    >>> SOLVERS["dpm2m"].calls_per_step, SOLVERS["em"]().default_spacing
    (1, 't')
    """

    #: name in :data:`SOLVERS`
    name: str = ""
    #: one line for ``--help`` and error messages
    description: str = ""
    #: network calls per step (the cost unit of the benchmarks)
    calls_per_step: int = 1
    #: whether it draws noise
    stochastic: bool = False
    #: directions it can move in, "down" (towards data) and/or "up" (towards noise)
    directions: tuple[str, ...] = ("down",)

    @property
    def default_spacing(self) -> str:
        """Step spacing when none is asked for (uniform in t for the reverse SDE, else log-SNR).

        The predictor-corrector sampler over-disperses cells when log-SNR spacing crowds its
        steps near the data (docs/benchmarks/sampling.md); uniform in t is the paper's.
        """
        return "t" if self.stochastic and "down" in self.directions else "logsnr"

    def step(
        self,
        call: Callable,
        sde: VPSDE,
        x: torch.Tensor,
        t_from: float,
        t_to: float,
        branch: torch.Tensor,
        label: torch.Tensor,
        groups: list,
        sizes: list[int],
        first_in_segment: bool,
    ) -> torch.Tensor:
        """Advance all rows ``x`` from ``t_from`` to ``t_to``.

        ``groups`` (with ``sizes`` rows each, in order) carry the noise generators and the
        multistep memory; ``first_in_segment`` says that the previous step ended at a branch
        point (multistep solvers restart there).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _noise(groups, sizes, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise, each group's rows from its own generator."""
    return torch.cat(
        [
            normal((s, like.shape[1]), g.gen, like.device, like.dtype)
            for g, s in zip(groups, sizes, strict=True)
        ]
    )


def _ends(sde: VPSDE, t_from: float, t_to: float) -> tuple[torch.Tensor, ...]:
    """``alpha`` and ``sigma`` at both ends of a step: ``(a_from, s_from, a_to, s_to)``."""
    th, tl = torch.tensor(t_from), torch.tensor(t_to)
    return sde.alpha(th), sde.sigma(th), sde.alpha(tl), sde.sigma(tl)


class EulerMaruyama(Solver):
    """Reverse-time SDE, Euler-Maruyama."""

    name = "em"
    description = "reverse SDE, Euler-Maruyama (stochastic, 1 network call per step; the default)"
    stochastic = True

    def _predict(self, call, sde, x, t_hi, t_lo, branch, label, groups, sizes):
        th = torch.tensor(t_hi)
        h = t_hi - t_lo
        eps = call(x, t_hi, branch, label)
        beta = sde.beta(th)
        score = -eps / sde.sigma(th)
        drift = 0.5 * beta * x + beta * score
        return x + drift * h + torch.sqrt(beta * h) * _noise(groups, sizes, x)

    def step(self, call, sde, x, t_from, t_to, branch, label, groups, sizes, first_in_segment):  # noqa: D102
        return self._predict(call, sde, x, t_from, t_to, branch, label, groups, sizes)


class PredictorCorrector(EulerMaruyama):
    """Euler-Maruyama predictor and one Langevin corrector step (Song et al. 2021, Alg. 5).

    Parameters
    ----------
    snr
        Signal-to-noise ratio that sets the corrector's step.
    """

    name = "pc"
    description = (
        "reverse SDE, Euler-Maruyama predictor + Langevin corrector (2 network calls per step; "
        "the original paper's sampler, with 1000 steps)"
    )
    calls_per_step = 2

    def __init__(self, snr: float = CORRECTOR_SNR):
        if snr <= 0:
            raise ValueError(f"corrector_snr must be positive, got {snr}.")
        self.snr = float(snr)

    def step(self, call, sde, x, t_from, t_to, branch, label, groups, sizes, first_in_segment):  # noqa: D102
        x = self._predict(call, sde, x, t_from, t_to, branch, label, groups, sizes)
        th, tl = torch.tensor(t_from), torch.tensor(t_to)
        # the injected noise is `snr` times the score step, with norms averaged over a group's
        # rows (per-row norms explode where the score vanishes; per group, a class's samples
        # do not depend on the other classes sampled with share=False)
        score = -call(x, t_to, branch, label) / sde.sigma(tl)
        z = _noise(groups, sizes, x)
        # Song's alpha_i = 1 - beta_i, in the exact form that stays positive on coarse grids
        keep = (sde.alpha(tl) / sde.alpha(th)) ** 2
        steps = []
        for s_part, z_part in zip(score.split(sizes), z.split(sizes), strict=True):
            noise_norm, score_norm = z_part.norm(dim=1).mean(), s_part.norm(dim=1).mean()
            ratio = self.snr * noise_norm / score_norm.clamp_min(1e-12)
            steps.append((2.0 * keep * ratio**2).expand(len(s_part)))
        step = torch.cat(steps).unsqueeze(1).to(x.dtype)
        return x + step * score + torch.sqrt(2.0 * step) * z


class ExponentialIntegrator(Solver):
    """Reverse SDE, first-order exponential integrator in log-SNR (SDE-DPM-Solver-1).

    The linear part of the reverse SDE is integrated exactly and the noise prediction is held
    over the step (Lu et al. 2022, "DPM-Solver++", the SDE solver of order 1):
    ``x_to = (alpha_to / alpha_from) x - 2 sigma_to (e^h - 1) eps_hat
    + sigma_to sqrt(e^(2h) - 1) z`` with ``h = lambda_to - lambda_from`` and ``lambda = log(alpha
    / sigma)``. Euler-Maruyama's last steps on a coarse grid add noise on the scale of
    ``sqrt(beta h)`` whatever the data's spread, which inflates narrow directions (with exact
    scores of a Gaussian of variance 0.02, by 84 % at 25 steps); this step's error is
    relative, about 3 % of the variance at 25 steps on every scale
    (``tests/test_sampling.py``).
    """

    name = "ei"
    description = (
        "reverse SDE, exponential integrator in log-SNR (SDE-DPM-Solver-1; stochastic, "
        "1 network call per step)"
    )
    stochastic = True

    @property
    def default_spacing(self) -> str:
        """Uniform in log-SNR, the unit in which the step is exact for the linear part."""
        return "logsnr"

    def step(self, call, sde, x, t_from, t_to, branch, label, groups, sizes, first_in_segment):  # noqa: D102
        eps = call(x, t_from, branch, label)
        a_hi, s_hi, a_lo, s_lo = _ends(sde, t_from, t_to)
        h = torch.log(a_lo / s_lo) - torch.log(a_hi / s_hi)
        noise = s_lo * torch.sqrt(torch.expm1(2.0 * h))
        x_lo = (a_lo / a_hi) * x - 2.0 * s_lo * torch.expm1(h) * eps
        return x_lo + noise * _noise(groups, sizes, x)


class Heun(Solver):
    """Probability-flow ODE, Heun's method; moves in either direction (``h`` changes sign)."""

    name = "heun"
    description = "probability-flow ODE, Heun's method (deterministic, 2 network calls per step)"
    calls_per_step = 2
    directions = ("down", "up")

    def step(self, call, sde, x, t_from, t_to, branch, label, groups, sizes, first_in_segment):  # noqa: D102
        th, tl = torch.tensor(t_from), torch.tensor(t_to)
        h = t_from - t_to

        def velocity(xx, t, tt):  # dx/dt of the probability-flow ODE
            eps = call(xx, t, branch, label)
            return -0.5 * sde.beta(tt) * (xx - eps / sde.sigma(tt))

        d1 = velocity(x, t_from, th)
        x_euler = x - h * d1
        d2 = velocity(x_euler, t_to, tl)
        return x - 0.5 * h * (d1 + d2)


class DPMSolver2M(Solver):
    """DPM-Solver++(2M): data prediction, multistep in lambda = log(alpha / sigma)."""

    name = "dpm2m"
    description = "probability-flow ODE, DPM-Solver++(2M) multistep (1 network call per step)"

    def step(self, call, sde, x, t_from, t_to, branch, label, groups, sizes, first_in_segment):  # noqa: D102
        eps = call(x, t_from, branch, label)
        a_hi, s_hi, a_lo, s_lo = _ends(sde, t_from, t_to)
        x0 = (x - s_hi * eps) / a_hi
        lam_hi, lam_lo = torch.log(a_hi / s_hi), torch.log(a_lo / s_lo)
        hh = lam_lo - lam_hi
        prev = [g.x0_prev for g in groups]
        if not first_in_segment and all(p is not None for p in prev):
            x0_prev = torch.cat(prev)
            r = groups[0].h_prev / hh
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        else:
            d = x0
        for g, part in zip(groups, torch.split(x0, sizes), strict=True):
            g.x0_prev = part
            g.h_prev = hh
        return (s_lo / s_hi) * x - a_lo * torch.expm1(-hh) * d


class DDIM(Solver):
    """Probability-flow ODE, first order: DDIM, which is flow matching's Euler step.

    The noise and data predictions at ``t_from`` are held over the step:
    ``x_to = alpha_to x0_hat + sigma_to eps_hat``. In the linear interpolant's coordinates
    (``x / (alpha + sigma)`` at time ``s = sigma / (alpha + sigma)``) this is exactly the Euler
    step ``x_s' = x_s + (s' - s) v_hat`` with which flow-matching generators sample, on a grid
    uniform in ``s`` by default. Exact, on any grid, when the data are one point. Moves in
    either direction (DDIM inversion upwards).
    """

    name = "ddim"
    description = (
        "probability-flow ODE, first order (DDIM = flow matching's Euler step; deterministic, "
        "1 network call per step)"
    )
    directions = ("down", "up")

    @property
    def default_spacing(self) -> str:
        """Uniform in the interpolant's time, as flow-matching generators step."""
        return "interpolant"

    def step(self, call, sde, x, t_from, t_to, branch, label, groups, sizes, first_in_segment):  # noqa: D102
        eps = call(x, t_from, branch, label)
        a_hi, s_hi, a_lo, s_lo = _ends(sde, t_from, t_to)
        x0 = (x - s_hi * eps) / a_hi
        return a_lo * x0 + s_lo * eps


class ForwardNoising(Solver):
    """Exact forward transitions x_{t'} ~ q(x_{t'} | x_t) for t' > t: no network call."""

    name = "noise"
    description = "exact forward noising (closed form, no network call; up only)"
    calls_per_step = 0
    stochastic = True
    directions = ("up",)

    def step(self, call, sde, x, t_from, t_to, branch, label, groups, sizes, first_in_segment):  # noqa: D102
        ta = torch.tensor(t_from, dtype=torch.float64)
        tb = torch.tensor(t_to, dtype=torch.float64)
        ratio = sde.alpha(tb) / sde.alpha(ta)
        var = (sde.sigma(tb) ** 2 - ratio**2 * sde.sigma(ta) ** 2).clamp_min(0.0)
        z = normal(x.shape, groups[0].gen, x.device, x.dtype)
        return ratio.to(x.dtype) * x + var.sqrt().to(x.dtype) * z


#: every solver, by name (one registry for sampling and transport)
SOLVERS: dict[str, type[Solver]] = {
    cls.name: cls
    for cls in (
        Heun,
        DPMSolver2M,
        DDIM,
        EulerMaruyama,
        ExponentialIntegrator,
        PredictorCorrector,
        ForwardNoising,
    )
}


def solver_names(direction: str = "down") -> list[str]:
    """Names of the solvers that move in ``direction``.

    Examples
    --------
    >>> solver_names("up")
    ['heun', 'ddim', 'noise']
    """
    return [name for name, cls in SOLVERS.items() if direction in cls.directions]


def resolve_solver(name: str, direction: str = "down") -> str:
    """The solver a user-facing name means (``"ode"`` -> ``"heun"``, ...), checked.

    Examples
    --------
    >>> resolve_solver("ode")
    'heun'
    """
    name = ALIASES.get(name, name)
    choices = solver_names(direction) + (list(ALIASES) if direction == "down" else [])
    if name not in SOLVERS:
        raise ValueError(f"Unknown solver {name!r}; choose one of {choices}.")
    if direction not in SOLVERS[name].directions:
        raise ValueError(
            f"Solver {name!r} cannot move states {direction}; choose one of {choices}."
        )
    return name


def get_solver(
    name: str, direction: str = "down", *, corrector_snr: float = CORRECTOR_SNR
) -> Solver:
    """A solver instance by name (``corrector_snr``: the Langevin step of ``"pc"``).

    Examples
    --------
    >>> get_solver("ode"), get_solver("pc", corrector_snr=0.1).snr
    (Heun('heun'), 0.1)
    """
    cls = SOLVERS[resolve_solver(name, direction)]
    return cls(corrector_snr) if cls is PredictorCorrector else cls()


def default_spacing(solver: str) -> str:
    """Step spacing of a solver name when none is given (see :attr:`Solver.default_spacing`)."""
    return SOLVERS[ALIASES.get(solver, solver)]().default_spacing
