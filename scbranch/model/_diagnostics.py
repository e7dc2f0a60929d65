"""How well the trained network denoises given cells: the training loss at fixed noise levels.

:meth:`~scbranch.BranchedDiffusion.get_denoising_error` runs here. Its use is the check that
picked the default budget (docs/benchmarks/clean_estimates.md): on cells the model did not see
the error at low noise stops falling, then rises, once the network starts learning its training
cells rather than their law, while on the training cells it keeps falling. Times and noise are
fixed by ``seed``, so two models (or two sets of cells) are compared on the same draws, not on
the random times of the loss Lightning logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from .._utils import progress, resolve_seed
from .._validation import check_obs_key
from ..module._recipe import noise_prediction_error

if TYPE_CHECKING:
    from ._model import BranchedDiffusion

#: noise levels reported by default: where within-type detail is resolved (low t) up to where
#: the types still differ (0.5)
DEFAULT_TIMES = (0.05, 0.1, 0.2, 0.3, 0.5)


@torch.inference_mode()
def get_denoising_error(
    model: BranchedDiffusion,  # the model, when called as ``model.get_denoising_error(...)``
    adata: AnnData | None = None,
    *,
    times: Sequence[float] = DEFAULT_TIMES,
    n_draws: int = 1,
    seed: int | None = 0,
    batch_size: int = 4096,
    progress_bar: bool = False,
) -> pd.DataFrame:
    """The noise-prediction error of the model on given cells, at fixed noise levels.

    Every cell is noised to each time ``t`` (``x_t = alpha x_0 + sigma eps``, in the model's
    standardised space) and the network predicts ``eps`` on its type's branch at ``t``; the
    error is the training loss, the mean squared error per dimension. Next to it, the error
    of the model's analytic Gaussian part alone (what the network corrects; an untrained
    network's whole prediction), so ``error / gaussian_error`` says what training added.

    Compare the training cells (``adata=None``) with held-out cells of the same types, and
    models trained for different budgets on the same held-out cells: where the held-out error
    stops following the training error down, more training learns the training cells, not new
    ones (docs/benchmarks/denoising_gap.md: on pbmc68k_reduced and pbmc3k the held-out error
    at ``t = 0.1`` is lowest at 0.5-1 x the default budget, and at 4 x above the Gaussian
    part's). Two different sets of new cells differ in level by the noise of finite sets
    (there 0.003-0.03): compare changes, not one set's level with another's. During training,
    ``model.train(train_size=0.9, check_val_every_n_epoch=k)`` logs the same error on the
    held-out cells, averaged over the default times, as ``model.history["validation_loss"]``.

    Parameters
    ----------
    adata
        Cells in the model's representation, labelled in ``obs[labels_key]`` with types the
        model knows (default: the model's training cells).
    times
        Diffusion times in ``(t_min, 1]``.
    n_draws
        Noise draws per cell and time (averaged).
    seed
        Seed of the noise: the same seed gives the same draws for the same cells.
    batch_size
        Cells per network call.
    progress_bar
        Show a progress bar over the times.

    Returns
    -------
    A tidy DataFrame with one row per type and time, and rows of group ``"all"`` (every
    cell): ``group``, ``t``, ``error``, ``gaussian_error``, ``n_cells``.

    Examples
    --------
    >>> train_err = model.get_denoising_error()  # doctest: +SKIP
    >>> held_err = model.get_denoising_error(adata_heldout)  # doctest: +SKIP
    >>> held_err.query("group == 'all'")[["t", "error"]]  # doctest: +SKIP
    """
    module = model.module
    adata = model.adata if adata is None else adata
    if adata is None:
        raise ValueError("The model holds no training cells (loaded without adata): pass adata.")
    if adata.n_obs == 0:
        raise ValueError("adata holds no cells.")
    times = _checked_times(times, module.sde.t_min)
    n_draws, batch_size = int(n_draws), int(batch_size)
    if n_draws < 1:
        raise ValueError(f"n_draws must be a positive integer, got {n_draws}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    check_obs_key(adata, model.labels_key)
    codes = model.tree.class_index(adata.obs[model.labels_key].astype(str).to_numpy())
    x = model.encode(adata, "the cells to denoise")
    device = module.shift.device
    gen = torch.Generator().manual_seed(resolve_seed(seed))  # CPU draws: the same on any device
    errors = np.zeros((len(times), len(x), 2))  # [time, cell, (network, Gaussian part)]
    bar = progress("Denoising", progress_bar)
    steps = list(enumerate(times)) if bar is None else bar(list(enumerate(times)))
    was_training = module.training
    module.eval()
    try:
        for i, t in steps:
            for start in range(0, len(x), batch_size):
                rows = slice(start, start + batch_size)
                z = module.standardize(torch.as_tensor(x[rows], dtype=torch.float32, device=device))
                labels = torch.as_tensor(codes[rows], device=device)
                for _ in range(n_draws):
                    noise = torch.randn(z.shape, generator=gen, device="cpu").to(device)
                    for k, err in enumerate(noise_errors(module, z, labels, t, noise)):
                        errors[i, rows, k] += err.cpu().numpy() / n_draws
    finally:
        module.train(was_training)
    return _tidy(errors, times, codes, model.classes)


def noise_errors(
    module, z: torch.Tensor, labels: torch.Tensor, t: float, noise: torch.Tensor, *, gaussian=True
) -> list[torch.Tensor]:
    """Per-row noise-prediction error at time ``t`` of the network (and of its Gaussian part).

    ``z`` holds standardised cells, ``noise`` the draws that noise them; the training loss is
    the mean of the first error over random times. Validation during training
    (:class:`~scbranch.model.DiffusionTrainingPlan`) and :func:`get_denoising_error` both
    score with it, so the two report the same quantity.
    """
    tt = torch.full((len(z),), float(t), device=z.device)
    branch = module.branch_of(labels, tt)
    xt, _ = module.sde.marginal(z, tt, noise)
    predictors = (module.predict_eps, module.skip_eps) if gaussian else (module.predict_eps,)
    return [noise_prediction_error(p(xt, tt, branch, labels), noise) for p in predictors]


def _checked_times(times: Sequence[float], t_min: float) -> list[float]:
    values = [float(t) for t in np.atleast_1d(np.asarray(times, dtype=float))]
    bad = [t for t in values if not (np.isfinite(t) and t_min < t <= 1.0)]
    if not values or bad:
        raise ValueError(f"times must lie in (t_min={t_min:g}, 1], got {list(times)!r}.")
    return values


def _tidy(errors: np.ndarray, times: list[float], codes: np.ndarray, classes) -> pd.DataFrame:
    """Mean errors per (type, time) and over every cell, as a tidy frame."""
    groups = [("all", np.ones(len(codes), dtype=bool))]
    groups += [(classes[c], codes == c) for c in np.unique(codes)]
    records = [
        {
            "group": name,
            "t": t,
            "error": float(errors[i, rows, 0].mean()),
            "gaussian_error": float(errors[i, rows, 1].mean()),
            "n_cells": int(rows.sum()),
        }
        for name, rows in groups
        for i, t in enumerate(times)
    ]
    return pd.DataFrame.from_records(records)
