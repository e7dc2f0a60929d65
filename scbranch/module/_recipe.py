"""The training recipe, defined once: time draw, loss, optimiser, schedule, clipping and EMA.

Full training (Lightning, ``model/_training_plan.py``) and the training of new branch heads
(:meth:`~scbranch.BranchedDiffusion.add_classes`) both use these pieces, so a new type's head is
trained exactly as every other head was: the same distribution of diffusion times (the module's
``t_sampling``, restricted to the times below the new branch point), the same eps-prediction
loss, Adam with a per-step cosine decay, gradient clipping and an exponential moving average of
the weights with the same warm-up.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

#: distributions of training times (see :func:`draw_times`)
T_SAMPLINGS = ("uniform", "logsnr", "interpolant")
#: what the network is trained to predict (see :func:`training_error`)
OBJECTIVES = ("eps", "flow")

#: A default ``train()`` makes about this many passes over the cells, within
#: [MIN_DEFAULT_STEPS, MAX_DEFAULT_STEPS] optimiser steps. Read from one grid of data size x
#: budget on a known truth (benchmarks/budget_curve.py, docs/benchmarks/budget_curve.md): with
#: few cells, passes pull the cells together (34-120 train cells per type: dispersion 1.00 /
#: 0.91 / 0.85 at 84 / 167 / 334 epochs, AUROC 0.61 / 0.61 / 0.66, control 0.49); with many,
#: the optimiser steps are what count (4,000 / 8,000 / 16,000 steps: AUROC 0.56 / 0.54 / 0.53
#: at 5,600 train cells, 0.57 / 0.55 / 0.54 at 22,400; controls 0.50), so a fixed 4,000 steps
#: underfit large data.
DEFAULT_EPOCHS = 100
#: at least this many steps for small data: 100 epochs of a few hundred cells are too few
#: optimiser steps. On the known truth's 34-120 cells per type the conditioned network scores
#: AUROC 0.594 at 1,000 steps against 0.637 at 500 and 0.615 at 2,000
#: (docs/benchmarks/budget_curve_conditioned.md); on pbmc68k_reduced's 351 train cells over 10
#: splits at 3 x 3 seeds, 1,002 steps against 100 epochs (600) bring the cells' dispersion from
#: 1.05 to 1.01 of the control and their distance to the training cells from 1.08 to 1.04 of
#: new real cells', RBF-MMD -0.004 +- 0.001, AUROC -0.014 +- 0.005 (docs/evaluation.md, "The
#: training budget over the same splits"). Data of more than 576 train cells (10 steps an epoch
#: at batch 64) are not affected.
MIN_DEFAULT_STEPS = 1_000
#: extension's floor for a new type's few cells. Doubled to train()'s 1,000 it gained nothing
#: inside the latent (3 seeds, both datasets: new types' label fidelity +0.004 and 0.000,
#: MMD-median +0.003 and +0.001 to held-out cells) at 1.4-2x the time
#: (docs/benchmarks/extension_head1000.md against extension_seeds.md)
MIN_HEAD_STEPS = 500
#: at most this many steps (about 7 min on an H200, 15 min on 2 CPU cores at batch 64)
MAX_DEFAULT_STEPS = 16_000


def default_max_epochs(n_cells: int, batch_size: int, min_steps: int = MIN_DEFAULT_STEPS) -> int:
    """Passes over ``n_cells`` cells of a default ``train()`` at ``batch_size``.

    About :data:`DEFAULT_EPOCHS` epochs, kept within ``min_steps`` (:data:`MIN_DEFAULT_STEPS`
    for ``train()``) and :data:`MAX_DEFAULT_STEPS` optimiser steps.

    Examples
    --------
    >>> default_max_epochs(351, 64)  # pbmc68k_reduced's train cells: 6 steps an epoch
    167
    >>> default_max_epochs(1318, 64)  # pbmc3k's: 21 steps an epoch, 100 epochs
    100
    >>> default_max_epochs(40, 64)  # 1 step an epoch: the 1,000-step floor
    1000
    >>> default_max_epochs(100_000, 64)  # 1,563 steps an epoch: the 16,000-step cap
    11
    """
    steps_per_epoch = max(1, math.ceil(n_cells / batch_size))
    steps = min(max(DEFAULT_EPOCHS * steps_per_epoch, min_steps), MAX_DEFAULT_STEPS)
    return max(1, math.ceil(steps / steps_per_epoch))


@dataclass(frozen=True)
class TrainingRecipe:
    """Optimiser settings shared by full training and class extension.

    Parameters
    ----------
    lr
        Peak learning rate of Adam (decays to 0 with a per-step cosine schedule).
    weight_decay
        Adam's L2 penalty.
    eps
        Adam's epsilon (scvi-tools' default of 0.01 suits VAEs, not eps-prediction).
    ema_decay
        Decay of the weight EMA that the model samples with (0 disables it).
    grad_clip
        Gradient-norm clipping.
    cosine
        Decay the learning rate to zero with a per-step cosine schedule.

    Examples
    --------
    >>> recipe = TrainingRecipe(lr=1e-3)
    >>> opt = recipe.optimizer([torch.nn.Parameter(torch.zeros(2))])
    >>> type(opt).__name__
    'Adam'
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    eps: float = 1e-8
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    cosine: bool = True

    def optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        """Adam with the fused kernel (much faster than for-each on millions of head parameters)."""
        return torch.optim.Adam(
            params, lr=self.lr, eps=self.eps, weight_decay=self.weight_decay, fused=True
        )

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int):
        """Per-step cosine decay to zero over ``total_steps`` (`None` without ``cosine``)."""
        if not self.cosine:
            return None
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))

    def ema(self, params: list[torch.Tensor]) -> WeightEMA | None:
        """An EMA of ``params`` (`None` when ``ema_decay`` is 0)."""
        return WeightEMA(params, self.ema_decay) if self.ema_decay > 0 else None


class WeightEMA:
    """Exponential moving average of parameters, warmed up as ``min(decay, (1+k)/(10+k))``.

    The warm-up keeps short runs from averaging in their random initialisation.

    Parameters
    ----------
    params
        The parameters to follow (their current values start the average).
    decay
        The decay after the warm-up.

    Examples
    --------
    >>> w = [torch.zeros(2)]
    >>> ema = WeightEMA(w, decay=0.9)
    >>> ema.update([torch.ones(2)])
    >>> [round(v, 3) for v in ema.shadow[0].tolist()]
    [0.818, 0.818]
    """

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.decay = float(decay)
        self.shadow = [p.detach().clone() for p in params]
        self.steps = 0

    def update(self, params: list[torch.Tensor]) -> None:
        """One step of the average towards the current ``params``."""
        self.steps += 1
        k = self.steps
        decay = min(self.decay, (1 + k) / (10 + k))
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1 - decay)

    def swap(self, params: list[torch.Tensor]) -> None:
        """Exchange the average and ``params`` in place (twice restores both)."""
        with torch.no_grad():
            for p, e in zip(params, self.shadow, strict=True):
                live = p.detach().clone()
                p.copy_(e)
                e.copy_(live)

    def copy_to(self, params: list[torch.Tensor]) -> None:
        """Write the average into ``params`` (what the model then samples and saves with)."""
        with torch.no_grad():
            for p, e in zip(params, self.shadow, strict=True):
                p.copy_(e)


def draw_times(
    sde,
    n: int,
    *,
    t_sampling: str = "uniform",
    t_range: tuple[float, float] | None = None,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training times for a batch of ``n`` rows, stratified over the batch.

    Stratified times (one uniform offset plus ``i / n``, shuffled) give lower-variance gradient
    estimates than i.i.d. draws. ``"uniform"`` spreads them uniformly in t over ``t_range``
    (default ``(t_min, 1)``); ``"logsnr"`` uniformly in log-SNR over the same range, which
    weights low noise levels, where within-type detail is resolved, more; ``"interpolant"``
    uniformly in the linear interpolant's time ``sigma / (alpha + sigma)`` (flow matching's
    draw), which puts two thirds of the times in the middle third of the log-SNR range.

    Parameters
    ----------
    sde
        The forward process.
    n
        Rows in the batch.
    t_sampling
        ``"uniform"``, ``"logsnr"`` or ``"interpolant"``.
    t_range
        ``(t_lo, t_hi)``; default ``(sde.t_min, 1)``.
    device
        Device of the times.
    generator
        Random generator (default: torch's global one, as in Lightning training).

    Returns
    -------
    Times of shape ``(n,)``.

    Examples
    --------
    >>> from scbranch.module import VPSDE
    >>> t = draw_times(VPSDE(), 4, generator=torch.Generator().manual_seed(0))
    >>> bool(((t >= 1e-3) & (t <= 1)).all())
    True
    """
    if t_sampling not in T_SAMPLINGS:
        raise ValueError(f"t_sampling must be one of {T_SAMPLINGS}, got {t_sampling!r}.")
    u = (
        torch.rand((), device=device, generator=generator) + torch.arange(n, device=device) / n
    ) % 1.0
    u = u[torch.randperm(n, device=device, generator=generator)]
    t_lo, t_hi = (sde.t_min, 1.0) if t_range is None else (float(t_range[0]), float(t_range[1]))
    if t_sampling == "logsnr":
        lam_hi = sde.log_snr(torch.tensor(t_lo, device=device))
        lam_lo = sde.log_snr(torch.tensor(t_hi, device=device))
        return sde.t_from_log_snr(lam_lo + (lam_hi - lam_lo) * u)
    if t_sampling == "interpolant":
        s_lo = sde.interpolant_time(torch.tensor(t_lo, device=device))
        s_hi = sde.interpolant_time(torch.tensor(t_hi, device=device))
        t = sde.t_from_interpolant(s_lo + (s_hi - s_lo) * u)
        return t.clamp(t_lo, t_hi)  # the round trip may leave the range by rounding
    return t_lo + (t_hi - t_lo) * u


def noise_prediction_error(eps_hat: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-row mean squared error of the noise prediction (the loss is its mean)."""
    return (eps_hat - noise).pow(2).mean(-1)


def training_error(
    objective: str, eps_hat: torch.Tensor, noise: torch.Tensor, sde, t: torch.Tensor
) -> torch.Tensor:
    """Per-row training error of a prediction at times ``t`` (the loss is its mean).

    ``"eps"``: the noise prediction's squared error. ``"flow"``: flow matching's, the squared
    error of the velocity ``eps - x_0`` of the linear interpolant ``(1 - s) x_0 + s eps``; at
    the same state a velocity error is the noise error divided by ``1 - s``
    (``v = (eps - x_s) / (1 - s)``), so the two losses differ only in their weight over time.

    Examples
    --------
    >>> from scbranch.module import VPSDE
    >>> sde, t = VPSDE(), torch.tensor([0.5])
    >>> eps_err = training_error("eps", torch.ones(1, 2), torch.zeros(1, 2), sde, t)
    >>> flow_err = training_error("flow", torch.ones(1, 2), torch.zeros(1, 2), sde, t)
    >>> bool(torch.isclose(flow_err, eps_err / (1 - sde.interpolant_time(t)) ** 2))
    True
    """
    err = noise_prediction_error(eps_hat, noise)
    if objective == "eps":
        return err
    if objective == "flow":
        keep = 1.0 - sde.interpolant_time(t.to(err.dtype))
        return err / keep**2
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
