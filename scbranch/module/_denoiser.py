"""Clean-cell estimates E[x_0 | x_t] that stay near the data at high noise.

Tweedie's estimate from a noise prediction, ``(x_t - sigma eps_hat) / alpha``, divides the
network's error by ``alpha`` (about 0.006 at t = 1): an error in ``eps_hat`` too small to
matter for sampling puts the estimate far outside the data. Near t = 1 the true
``E[x_0 | x_t]`` is close to the mean of the cells, and for every t the posterior mean of a
Gaussian fitted to the branch's cells is a stable estimate whose error is known to be small
where ``x_t`` says little about ``x_0``.

:class:`CalibratedDenoiser` reports

    x0 = g + w(t) (x0_net - g),

with ``g`` the posterior mean under the Gaussian of the row's branch (the mean and shrunk
covariance of the cells of the classes that trained its head, ``Branch.trained``, weighted
by the classes' training sizes) and
``w(t)`` in [0, 1] the least-squares weight of the network's deviation from ``g`` on the
model's stored reference cells of the classes trained together (the root's), noised at a
grid of times (cross-fitted: each half of every type is judged against Gaussians fitted on
the other half, so the Gaussians are as out-of-sample there as for the cells being
estimated). A class added later (``add_classes``) therefore leaves every old class's
estimate as it was, bit for bit. ``w`` is near 0 at high noise,
where the network adds only error, and near 1 at low noise, where it knows more than a
Gaussian; in between it takes what the network adds there. On the calibration's own draws
the weighted estimate is, by construction, at least as close to the clean cells as either
part; ``benchmarks/clean_estimates.py`` measures it on cells the model never saw.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ._gaussian_skip import (
    class_statistics,
    group_moments,
    uses_full_covariance,
    within_class_variance,
)
from ._random import normal, seeded_generator
from ._sde import VPSDE
from ._transport import denoise
from ._tree import BranchTree

#: calibration times: uniform in t over [t_min, 1] (the weight changes over t = 0.2-0.8)
N_CALIBRATION_TIMES = 21
#: noise draws per reference cell and calibration time
N_CALIBRATION_DRAWS = 2
#: the weights are fitted on at most this many reference cells (a seeded subset; the branch
#: Gaussians use all of them): one scalar per time needs no more, and an atlas of hundreds of
#: types keeps its calibration to a few network passes
N_CALIBRATION_CELLS = 2048
#: noise stream of the calibration (apart from the samplers' and transport's)
_STREAM = 3

EpsFn = Callable[[torch.Tensor, float, torch.Tensor, torch.Tensor], torch.Tensor]


def gaussian_posterior_mean(
    x: torch.Tensor,
    alpha: float,
    sigma: float,
    mean: torch.Tensor,
    var: torch.Tensor,
    basis: torch.Tensor | None,
) -> torch.Tensor:
    """``E[x_0 | x_t]`` for ``x_0 ~ N(mean, U diag(var) U^T)`` (``U = basis``; identity if None).

    ``m + U diag(alpha var / (alpha^2 var + sigma^2)) U^T (x_t - alpha m)``: no division by
    ``alpha``, so it stays finite and exact at t = 1.

    Examples
    --------
    At t = 1 (alpha about 0) the estimate is the mean, whatever the state:

    >>> x = torch.randn(4, 3)
    >>> est = gaussian_posterior_mean(x, 0.0, 1.0, torch.ones(3), torch.ones(3), None)
    >>> torch.allclose(est, torch.ones(4, 3))
    True
    """
    gain = alpha * var / (alpha**2 * var + sigma**2)
    z = x - alpha * mean
    if basis is None:
        return mean + gain * z
    return mean + ((z @ basis) * gain) @ basis.T


@dataclass
class CalibratedDenoiser:
    """Clean-cell estimates: the network's, shrunk towards its branch's Gaussian at high noise.

    Build it with :meth:`fit`; see the module docstring for the estimate.

    Attributes
    ----------
    times, weights
        The calibration grid and the network's weight ``w(t)`` there (linear in between).
    mean, var, basis
        Per branch of ``tree``: the Gaussian of its cells (standardised units); ``basis`` holds
        the eigenvectors of the covariance (``var`` its eigenvalues), None for diagonal ones.

    Examples
    --------
    >>> tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.5)])
    >>> _ = torch.manual_seed(0)
    >>> labels = torch.arange(2).repeat_interleave(20)
    >>> ref = torch.randn(40, 2) + 3.0 * labels[:, None]  # two types, 20 cells each
    >>> eps_fn = lambda x, t, branch, label: 0 * x  # a network that predicts no noise
    >>> den = CalibratedDenoiser.fit(eps_fn, tree, VPSDE(), ref, labels)
    >>> est = den(eps_fn, torch.randn(3, 2), labels[:3], 1.0)  # at t = 1: the cells' mean
    >>> torch.allclose(est, ref.mean(0).expand(3, 2), atol=0.05)
    True
    """

    tree: BranchTree
    sde: VPSDE
    times: np.ndarray
    weights: np.ndarray
    mean: torch.Tensor
    var: torch.Tensor
    basis: torch.Tensor | None

    @classmethod
    @torch.inference_mode()
    def fit(
        cls,
        eps_fn: EpsFn,
        tree: BranchTree,
        sde: VPSDE,
        x0: torch.Tensor,
        labels: torch.Tensor,
        class_sizes: np.ndarray | None = None,
        seed: int = 0,
    ) -> CalibratedDenoiser:
        """Fit the branch Gaussians and the weights on standardised reference cells ``x0``.

        ``class_sizes`` (training cells per class) reweights the reference cells, which hold
        at most a fixed number per class, to the training data's class proportions; default:
        the reference's own.
        """
        lab = labels.cpu().numpy().astype(np.int64)
        n_classes = tree.n_classes
        counts = np.bincount(lab, minlength=n_classes).astype(np.float64)
        sizes = counts if class_sizes is None else np.asarray(class_sizes, np.float64)
        cell_w = sizes[lab] / np.maximum(counts[lab], 1.0)
        z = x0.detach().cpu().numpy().astype(np.float64)
        full = _class_stats(z, lab, n_classes)
        times = np.linspace(sde.t_min, 1.0, N_CALIBRATION_TIMES)
        # the weight is fitted on the classes the network was trained on together (the root
        # head's): a class added later (add_classes) leaves every old type's estimate as it
        # was, bit for bit, and takes the weight its branch's head was fitted under
        joint = np.flatnonzero(np.isin(lab, tree.trained_together))
        # cross-fitted: the weight is fitted on cells the Gaussians did not see (each half of
        # every class against the Gaussians of the other half), as the cells it will estimate
        # are; Gaussians fitted on the same cells would look better than they are
        rng = np.random.default_rng(seed)
        fold = np.full(len(lab), -1)
        fold[joint] = _two_folds(lab[joint], rng)
        half_stats = [
            _class_stats(z[fold == 1 - f], lab[fold == 1 - f], n_classes, full) for f in (0, 1)
        ]
        halves = [cls._from_stats(tree, sde, times, sizes, x0, st) for st in half_stats]
        keep = joint
        if len(keep) > N_CALIBRATION_CELLS:
            keep = keep[np.sort(rng.permutation(len(keep))[:N_CALIBRATION_CELLS])]
        device, dtype = x0.device, x0.dtype
        rows = torch.as_tensor(keep, device=device)
        x0s = x0[rows].repeat(N_CALIBRATION_DRAWS, 1)
        labs = labels[rows].repeat(N_CALIBRATION_DRAWS)
        first = torch.as_tensor(np.tile(fold[keep] == 0, N_CALIBRATION_DRAWS), device=device)
        w = torch.as_tensor(np.tile(cell_w[keep], N_CALIBRATION_DRAWS), dtype=dtype, device=device)
        weights = []
        for k, t in enumerate(times):
            noise = normal(x0s.shape, seeded_generator(seed, _STREAM, k), device, dtype)
            tt = torch.tensor(float(t))
            xt = sde.alpha(tt).item() * x0s + sde.sigma(tt).item() * noise
            net = denoise(eps_fn, tree, sde, xt, labs, float(t))
            # halves[f] was fitted without fold f: every cell meets Gaussians that never saw it
            gauss = torch.where(
                first[:, None],
                halves[0].gaussian(xt, labs, float(t)),
                halves[1].gaussian(xt, labs, float(t)),
            )
            weights.append(_least_squares_weight(x0s, net, gauss, w))
        result = cls._from_stats(tree, sde, times, sizes, x0, full)
        result.weights = np.asarray(weights)
        return result

    @classmethod
    def _from_stats(cls, tree, sde, times, sizes, like: torch.Tensor, stats) -> CalibratedDenoiser:
        """An estimator with the branch Gaussians of per-class ``stats`` (weights all 1)."""
        moments = _branch_moments(tree, stats, sizes)
        tensors = {
            k: torch.as_tensor(v, dtype=like.dtype, device=like.device) for k, v in moments.items()
        }
        ones = np.ones_like(times)
        return cls(tree, sde, times, ones, tensors["mean"], tensors["var"], tensors.get("basis"))

    def weight(self, t: float) -> float:
        """The network's weight ``w(t)`` (linear between calibration times)."""
        return float(np.interp(t, self.times, self.weights))

    def __call__(
        self, eps_fn: EpsFn, x: torch.Tensor, labels: torch.Tensor, t: float
    ) -> torch.Tensor:
        """The estimate of the clean states ``x`` (standardised units) at time ``t``."""
        net, gauss = self.parts(eps_fn, x, labels, t)
        return gauss + self.weight(t) * (net - gauss)

    def parts(
        self, eps_fn: EpsFn, x: torch.Tensor, labels: torch.Tensor, t: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two estimates it weighs: the network's (Tweedie) and the branch Gaussians'."""
        return denoise(eps_fn, self.tree, self.sde, x, labels, t), self.gaussian(x, labels, t)

    def gaussian(self, x: torch.Tensor, labels: torch.Tensor, t: float) -> torch.Tensor:
        """The posterior mean of each row under the Gaussian of its branch at ``t``."""
        tt = torch.tensor(float(t))
        alpha, sigma = self.sde.alpha(tt).item(), self.sde.sigma(tt).item()
        branch = self.tree.lookup(labels.cpu().numpy(), float(t))
        gauss = torch.empty_like(x)
        for b in np.unique(branch):
            rows = torch.as_tensor(np.flatnonzero(branch == b), device=x.device)
            basis = None if self.basis is None else self.basis[b]
            gauss[rows] = gaussian_posterior_mean(
                x[rows], alpha, sigma, self.mean[b], self.var[b], basis
            )
        return gauss


def _least_squares_weight(x0, net, gauss, w) -> float:
    """The least-squares weight of the network's deviation from the Gaussian, in [0, 1].

    The ``w`` that brings ``gauss + w (net - gauss)`` closest to ``x0`` in squared distance
    (cells weighted by ``w``); 1 where the two estimates agree.
    """
    deviation = net - gauss
    numerator = (w * ((x0 - gauss) * deviation).sum(1)).sum()
    denominator = (w * (deviation * deviation).sum(1)).sum()
    if denominator <= 0:
        return 1.0
    return float((numerator / denominator).clamp(0.0, 1.0))


def _two_folds(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fold 0 or 1 for every cell, each class split in halves at random."""
    fold = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members] = np.arange(len(members)) % 2
    return fold


def _class_stats(z: np.ndarray, labels: np.ndarray, n_classes: int, fallback=None) -> dict:
    """Per-class moments of standardised cells ``z``.

    A class absent from ``z`` takes its moments from ``fallback`` (half of the reference cells
    may miss a type of one cell).
    """
    full = uses_full_covariance(z.shape[1])
    stats = class_statistics([(0, len(z), z)], labels, n_classes, 0.0, 1.0, full)
    if fallback is not None:
        missing = stats["counts"] == 0
        for key in stats:
            stats[key][missing] = fallback[key][missing]
    return stats


def _branch_moments(tree: BranchTree, stats: dict, sizes: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and shrunk covariance of every branch's cells, classes weighted by ``sizes``."""
    # each class's moments scaled to its training size: a branch's Gaussian mixes its classes
    # in the training data's proportions, and shrinkage counts its real cells
    scale = np.where(stats["counts"] > 0, sizes / np.maximum(stats["counts"], 1.0), 0.0)
    scaled = {
        "counts": stats["counts"] * scale,
        "sums": stats["sums"] * scale[:, None],
        "second": stats["second"] * scale.reshape(-1, *([1] * (stats["second"].ndim - 1))),
    }
    # the classes that trained each branch's head: a class added later passes through the
    # branches above its branch point, whose heads (and so whose Gaussians) never saw it; the
    # covariances are shrunk towards the spread within the classes trained together, which
    # a class added later leaves as it was too
    joint = list(tree.trained_together)
    prior = within_class_variance({key: value[joint] for key, value in scaled.items()})
    return group_moments(scaled, [b.trained for b in tree.branches], prior_var=prior)
