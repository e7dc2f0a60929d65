"""The variance-preserving SDE (VP-SDE) shared by discovery, training and sampling.

dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW with beta(t) = beta0 + (beta1 - beta0) t.
Its marginals are closed-form: x_t = alpha(t) x_0 + sigma(t) eps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray | float


def _lib(t):
    return torch if isinstance(t, torch.Tensor) else np


@dataclass(frozen=True)
class VPSDE:
    """Variance-preserving SDE with a linear noise schedule.

    Parameters
    ----------
    beta0
        Noise rate at ``t = 0``.
    beta1
        Noise rate at ``t = 1``.
    t_min
        Smallest time used in training and sampling (avoids the singular score at ``t = 0``).

    Examples
    --------
    >>> sde = VPSDE()
    >>> round(float(sde.alpha(1.0)), 4)
    0.0066
    """

    beta0: float = 0.1
    beta1: float = 20.0
    t_min: float = 1e-3

    def __post_init__(self):
        if not (self.beta0 > 0 and self.beta1 > self.beta0):
            raise ValueError(f"Need 0 < beta0 < beta1, got beta0={self.beta0}, beta1={self.beta1}.")
        if not (0 < self.t_min < 0.1):
            raise ValueError(f"t_min must lie in (0, 0.1), got {self.t_min}.")

    def to_dict(self) -> dict[str, float]:
        """Parameters as a plain dict (h5ad-safe)."""
        return {k: float(v) for k, v in asdict(self).items()}

    def beta(self, t: ArrayLike) -> ArrayLike:
        """Noise rate beta(t)."""
        return self.beta0 + (self.beta1 - self.beta0) * t

    def integral_beta(self, t: ArrayLike) -> ArrayLike:
        """B(t) = int_0^t beta(s) ds."""
        return self.beta0 * t + 0.5 * (self.beta1 - self.beta0) * t * t

    def alpha(self, t: ArrayLike) -> ArrayLike:
        """Signal scale alpha(t) = exp(-B(t) / 2)."""
        return _lib(t).exp(-0.5 * self.integral_beta(t))

    def sigma(self, t: ArrayLike) -> ArrayLike:
        """Noise scale sigma(t) = sqrt(1 - alpha(t)^2), computed stably for small t."""
        lib = _lib(t)
        return lib.sqrt(-lib.expm1(-self.integral_beta(t)))

    def log_snr(self, t: ArrayLike) -> ArrayLike:
        """lambda(t) = log(alpha^2 / sigma^2), strictly decreasing in t."""
        lib = _lib(t)
        b = self.integral_beta(t)
        return -b - lib.log(-lib.expm1(-b))

    def t_from_log_snr(self, lam: ArrayLike) -> ArrayLike:
        """Inverse of :meth:`~scbranch.module.VPSDE.log_snr`.

        Solves the quadratic B(t) = log(1 + exp(-lambda)) for t.
        """
        lib = _lib(lam)
        b = lib.log1p(lib.exp(-lam))
        a = 0.5 * (self.beta1 - self.beta0)
        return (-self.beta0 + lib.sqrt(self.beta0**2 + 4 * a * b)) / (2 * a)

    def interpolant_time(self, t: ArrayLike) -> ArrayLike:
        """Time s = sigma / (alpha + sigma) of the linear interpolant at VP time ``t``.

        The interpolant ``(1 - s) x_0 + s eps`` of flow matching has the log-SNR
        ``2 log((1 - s) / s)``; it is the VP state ``x_t`` divided by ``alpha + sigma``, so one
        process serves both (``objective="flow"`` of
        :class:`~scbranch.module.BranchedDiffusionModule`).

        Examples
        --------
        >>> sde = VPSDE()
        >>> round(float(sde.t_from_interpolant(sde.interpolant_time(0.3))), 6)
        0.3
        """
        a, s = self.alpha(t), self.sigma(t)
        return s / (a + s)

    def t_from_interpolant(self, s: ArrayLike) -> ArrayLike:
        """Inverse of :meth:`~scbranch.module.VPSDE.interpolant_time`."""
        lib = _lib(s)
        return self.t_from_log_snr(2.0 * (lib.log1p(-s) - lib.log(s)))

    def marginal(
        self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample x_t ~ q(x_t | x_0); ``t`` has shape ``(n,)``. Returns ``(x_t, noise)``."""
        if noise is None:
            noise = torch.randn_like(x0)
        a = self.alpha(t).unsqueeze(-1)
        s = self.sigma(t).unsqueeze(-1)
        return a * x0 + s * noise, noise

    def check_same(self, other: dict | VPSDE, what: str = "stored hierarchy") -> None:
        """Raise if ``other`` is a different process (discovery, training, sampling share one)."""
        o = other.to_dict() if isinstance(other, VPSDE) else other
        mine = self.to_dict()
        bad = [
            k for k in ("beta0", "beta1") if not math.isclose(float(o[k]), mine[k], rel_tol=1e-6)
        ]
        if bad:
            details = ", ".join(f"{k}={o[k]} (model: {mine[k]})" for k in bad)
            raise ValueError(
                f"The {what} was computed with a different forward process: {details}. "
                "Discovery and training must use the same SDE; recompute the hierarchy with "
                "matching beta0/beta1."
            )
