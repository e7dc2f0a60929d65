"""BranchedDiffusionModule: the pure-torch diffusion model behind ``BranchedDiffusion``.

It fits scvi-tools' module contract: ``inference`` is the forward noising q(x_t | x_0) (draws t
and the noise), ``generative`` is the noise prediction, ``loss`` the eps-prediction MSE.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data

from .._constants import NOISE_KEYS, REGISTRY_KEYS
from ._gaussian_skip import (
    GAUSSIAN_SKIPS,
    class_statistics,
    gaussian_eps,
    group_moments,
    uses_full_covariance,
    within_class_variance,
)
from ._networks import ScoreNetwork, count_parameters, flat_width_matching
from ._recipe import OBJECTIVES, T_SAMPLINGS, draw_times, training_error
from ._sampling import SampleResult, sample
from ._sde import VPSDE
from ._solvers import DEFAULT_SOLVER, default_spacing
from ._tree import BranchTree, lookup_tables

ARCHITECTURES = ("branched", "conditioned", "flat")
#: architectures that follow the tree (fan-out sampling, hybrids, transmutation, extension)
TREE_ARCHITECTURES = ("branched", "conditioned")


class BranchedDiffusionModule(BaseModuleClass):
    """Branched (or flat, label-guided) eps-prediction diffusion model on standardised data.

    Parameters
    ----------
    n_input
        Dimension of the diffused representation.
    hierarchy
        Tree as written by :meth:`~scbranch.module.BranchTree.to_dict`.
    architecture
        ``"conditioned"`` (the default: one network conditioned on a branch embedding, whose
        size does not grow with the number of types), ``"branched"`` (one head per branch) or
        ``"flat"`` (class embedding, one head, width chosen so that the parameter count matches
        the branched network).
    width, n_trunk_blocks, n_head_blocks, time_dim
        Network size (see :class:`~scbranch.module.ScoreNetwork`).
    beta0, beta1, t_min
        Forward process (see :class:`~scbranch.module.VPSDE`).
    data_key
        Registry key of the diffused data (``"rep"`` for an obsm representation, ``"X"`` otherwise).
    t_sampling
        Distribution of training times: ``"uniform"`` in t, ``"logsnr"`` (uniform in log-SNR,
        which weights low noise levels, where within-type detail is resolved, more) or
        ``"interpolant"`` (uniform in the linear interpolant's time, flow matching's draw);
        `None`: ``"interpolant"`` with ``objective="flow"``, ``"uniform"`` otherwise.
    objective
        ``"eps"`` (the default: the network predicts the noise, trained on its squared error)
        or ``"flow"`` (flow matching with the linear interpolant ``(1 - s) x_0 + s eps``: the
        network sees the interpolant and predicts its velocity ``eps - x_0``, trained on the
        velocity's squared error). Both run on the same VP process: the interpolant at time
        ``s = sigma / (alpha + sigma)`` is ``x_t / (alpha + sigma)``, so sampling, discovery,
        transport and extension work unchanged on either.
    gaussian_skip
        The Gaussian whose exact noise prediction the network corrects: ``"global"``, one
        centred Gaussian with the data's per-dimension variance, or ``"per_branch"``, the mean
        and covariance of the cells each branch function serves (set by
        :meth:`set_gaussian_skip`).

    Examples
    --------
    >>> tree = BranchTree.from_merges(["A", "B"], [((0,), (1,), 0.5)])
    >>> module = BranchedDiffusionModule(4, tree.to_dict(), width=16)
    >>> module.sample_cells({0: 3, 1: 2}, n_steps=5).x.shape
    torch.Size([5, 4])
    """

    def __init__(
        self,
        n_input: int,
        hierarchy: Mapping,
        *,
        architecture: str = "conditioned",
        width: int = 256,
        n_trunk_blocks: int = 1,
        n_head_blocks: int = 3,
        time_dim: int = 128,
        beta0: float = VPSDE.beta0,
        beta1: float = VPSDE.beta1,
        t_min: float = VPSDE.t_min,
        data_key: str = REGISTRY_KEYS.X_KEY,
        t_sampling: str | None = None,
        gaussian_skip: str = "global",
        objective: str = "eps",
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
        self.objective = objective
        if t_sampling is None:
            t_sampling = "interpolant" if objective == "flow" else "uniform"
        if gaussian_skip not in GAUSSIAN_SKIPS:
            raise ValueError(
                f"gaussian_skip must be one of {GAUSSIAN_SKIPS}, got {gaussian_skip!r}."
            )
        self.gaussian_skip = gaussian_skip
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling must be one of {T_SAMPLINGS}, got {t_sampling!r}.")
        self.t_sampling = t_sampling
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}.")
        self.n_input = n_input
        self.architecture = architecture
        self.data_key = data_key
        self.sde = VPSDE(beta0=beta0, beta1=beta1, t_min=t_min)
        self.tree = BranchTree.from_dict(hierarchy)
        n_classes = self.tree.n_classes
        branched = (
            ScoreNetwork(
                n_input, self.tree.n_heads, width, n_trunk_blocks, n_head_blocks, time_dim=time_dim
            )
            if architecture == "branched"
            else None
        )
        if architecture == "branched":
            self.net = branched
        elif architecture == "conditioned":
            self.net = ScoreNetwork(
                n_input, 1, width, n_trunk_blocks, n_head_blocks, time_dim=time_dim,
                n_branches=self.tree.n_heads,
            )  # fmt: skip
        else:
            target = count_parameters(
                ScoreNetwork(
                    n_input,
                    self.tree.n_heads,
                    width,
                    n_trunk_blocks,
                    n_head_blocks,
                    time_dim=time_dim,
                )
            )
            n_blocks = n_trunk_blocks + n_head_blocks
            flat_width = flat_width_matching(n_input, n_classes, target, n_blocks, time_dim)
            self.net = ScoreNetwork(
                n_input,
                1,
                flat_width,
                n_trunk_blocks,
                n_head_blocks,
                n_classes=n_classes,
                time_dim=time_dim,
            )
        # standardisation: per-dimension shift, one global scale (set by the model from data)
        self.register_buffer("shift", torch.zeros(n_input))
        self.register_buffer("scale", torch.ones(()))
        # per-dimension variance of the standardised data (for the analytic Gaussian skip term)
        self.register_buffer("data_var", torch.ones(n_input))
        if gaussian_skip == "per_branch":
            # one Gaussian per branch function (head or embedding row; a class for flat)
            n_functions = self.tree.n_heads if self.follows_tree else n_classes
            self.register_buffer("skip_mean", torch.zeros(n_functions, n_input))
            self.register_buffer("skip_var", torch.ones(n_functions, n_input))
            # what a small type's covariance is shrunk towards (pooled within-type variance)
            self.register_buffer("skip_prior", torch.ones(n_input))
            basis = None
            if uses_full_covariance(n_input):
                basis = torch.eye(n_input).expand(n_functions, n_input, n_input).clone()
            self.register_buffer("skip_basis", basis)
        self._refresh_lookup()

    @property
    def follows_tree(self) -> bool:
        """Whether the network is a function of the branch, not of the class (all but flat)."""
        return self.architecture in TREE_ARCHITECTURES

    # ------------------------------------------------------------------ tree helpers
    def _refresh_lookup(self) -> None:
        """Tensors for vectorised branch lookup (derived from the tree, not saved)."""
        # on the module's device: extension refreshes them on a model already on a GPU
        device = self.shift.device
        starts = torch.as_tensor(self.tree._starts, dtype=torch.float32, device=device)
        self.register_buffer("_starts", starts, persistent=False)
        ids = torch.as_tensor(self.tree._ids, device=device)
        self.register_buffer("_ids", ids, persistent=False)
        heads = torch.as_tensor(self.tree._heads, device=device)
        self.register_buffer("_heads", heads, persistent=False)

    def branch_of(self, labels: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Branch id of each (class, time) pair."""
        return lookup_tables(self._starts, self._ids, labels, t)

    def set_standardization(
        self, shift: np.ndarray, scale: float, variance: np.ndarray | None = None
    ) -> None:
        """Store the centring vector, the global scale and the per-dimension variance."""
        self.shift.copy_(torch.as_tensor(shift, dtype=torch.float32))
        self.scale.fill_(float(scale))
        if variance is not None:
            self.data_var.copy_(torch.as_tensor(variance, dtype=torch.float32))
            if self.gaussian_skip == "per_branch":  # the global Gaussian until fitted per branch
                self.skip_mean.zero_()
                self.skip_prior.copy_(self.data_var)
                self.skip_var.copy_(self.data_var.expand_as(self.skip_var))
                if self.skip_basis is not None:
                    self.skip_basis.copy_(torch.eye(self.n_input).expand_as(self.skip_basis))

    def function_classes(self) -> list[tuple[int, ...]]:
        """Classes served by each branch function (head / embedding row; class for flat)."""
        if not self.follows_tree:
            return [(c,) for c in range(self.tree.n_classes)]
        groups: list[set[int]] = [set() for _ in range(self.tree.n_heads)]
        for b in self.tree.branches:
            groups[b.head].update(b.classes)
        return [tuple(sorted(g)) for g in groups]

    def copy_gaussian_skip(self, source: int) -> None:
        """A new last branch function starts with function ``source``'s Gaussian."""
        if self.gaussian_skip != "per_branch":
            return
        for name in ("mean", "var", "basis"):
            old = getattr(self, f"skip_{name}")
            if old is not None:
                setattr(self, f"skip_{name}", torch.cat([old, old[source : source + 1]]))

    def fit_gaussian_skip(
        self, blocks, labels: np.ndarray, shift, scale: float, first: int = 0
    ) -> None:
        """Fit the Gaussians of branch functions ``first`` on in one pass over the cells.

        ``blocks`` yields ``(start, stop, rows)`` of cells not yet standardised, labelled by
        ``labels`` (see :meth:`set_gaussian_skip` for ``first``). Nothing to fit with
        ``gaussian_skip="global"``.
        """
        if self.gaussian_skip != "per_branch":
            return
        self.set_gaussian_skip(self.class_statistics(blocks, labels, shift, scale), first=first)

    def class_statistics(self, blocks, labels: np.ndarray, shift, scale: float) -> dict:
        """Per-class counts, sums and second moments of the standardised cells, in one pass.

        Full second moments where the per-branch Gaussians need them, per dimension otherwise
        (what :meth:`set_gaussian_skip` and the model's training variances read).
        """
        full = self.gaussian_skip == "per_branch" and uses_full_covariance(self.n_input)
        return class_statistics(blocks, labels, self.tree.n_classes, shift, scale, full)

    def set_gaussian_skip(
        self, stats: dict[str, np.ndarray], first: int = 0, prior_var: np.ndarray | None = None
    ) -> None:
        """Fit the per-branch Gaussians from per-class statistics of the standardised cells.

        ``stats`` as ``module._gaussian_skip.class_statistics`` returns them;
        functions ``first`` on are (re)set, the others kept (class extension: old branches
        keep their Gaussians bit for bit). Rows are added for functions that have none yet.
        Small groups' covariances are shrunk towards ``prior_var`` (default: the pooled
        within-class variance of ``stats`` when all functions are fitted, the stored one of
        the training cells when only new ones are).
        """
        if self.gaussian_skip != "per_branch":
            return
        if prior_var is None:
            prior_var = within_class_variance(stats) if first == 0 else self.skip_prior
        prior_var = torch.as_tensor(prior_var, dtype=self.skip_prior.dtype)
        if first == 0:  # kept for the types added later
            self.skip_prior.copy_(prior_var)
        groups = self.function_classes()[first:]
        moments = group_moments(stats, groups, prior_var.cpu().numpy())
        for name in ("mean", "var", "basis"):
            if name not in moments:
                continue
            old = getattr(self, f"skip_{name}")
            new = torch.as_tensor(moments[name], dtype=old.dtype, device=old.device)
            setattr(self, f"skip_{name}", torch.cat([old[:first], new]))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """Data space -> diffusion space."""
        return (x - self.shift) / self.scale

    def unstandardize(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion space -> data space."""
        return z * self.scale + self.shift

    # ------------------------------------------------------------------ scvi contract
    def _get_inference_input(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {
            "x0": tensors[self.data_key],
            "labels": tensors[REGISTRY_KEYS.LABELS_KEY].long().view(-1),
        }
        if NOISE_KEYS.KEY in tensors:  # the block loader's per-step noise (model/_streaming.py)
            inputs["noise"] = tuple(int(tensors[k]) for k in NOISE_KEYS)
        return inputs

    @auto_move_data
    def inference(
        self,
        x0: torch.Tensor,
        labels: torch.Tensor,
        noise: tuple[int, int, int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Forward noising: draw t (stratified over the batch) and x_t ~ q(x_t | x_0).

        ``noise = (key, offset, rows)`` draws the times and noise of a global batch of
        ``rows`` cells from ``key`` and keeps rows ``offset:offset + n``: the processes of a
        multi-device step together draw exactly what one process with the whole batch draws.
        Without it, torch's global generator is used (scvi-tools' loader).
        """
        x0 = self.standardize(x0.to(self.shift.dtype))
        n = x0.shape[0]
        if noise is None:
            t = draw_times(self.sde, n, t_sampling=self.t_sampling, device=x0.device)
            xt, eps = self.sde.marginal(x0, t)
            return {"xt": xt, "t": t, "noise": eps, "labels": labels}
        key, offset, rows = noise
        # on the CPU whatever the device, so a step's draws do not depend on where it runs
        gen = torch.Generator().manual_seed(key)
        t = draw_times(self.sde, rows, t_sampling=self.t_sampling, generator=gen)
        eps = torch.randn((rows, x0.shape[1]), generator=gen, dtype=x0.dtype, device="cpu")
        t = t[offset : offset + n].to(x0.device)
        eps = eps[offset : offset + n].to(x0.device)
        xt, eps = self.sde.marginal(x0, t, eps)
        return {"xt": xt, "t": t, "noise": eps, "labels": labels}

    def _get_generative_input(self, tensors, inference_outputs) -> dict[str, torch.Tensor]:
        return {k: inference_outputs[k] for k in ("xt", "t", "labels")}

    @auto_move_data
    def generative(
        self, xt: torch.Tensor, t: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Predict the noise of ``xt``."""
        branch = self.branch_of(labels, t)
        return {"eps": self.predict_eps(xt, t, branch, labels)}

    def predict_eps(
        self, x: torch.Tensor, t: torch.Tensor, branch: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Noise prediction of the branch (branched) or of the class (flat) of every row.

        The network predicts a correction to the exact noise prediction for Gaussian data:
        with ``gaussian_skip="per_branch"`` the Gaussian of the cells the row's branch function
        serves (``module/_gaussian_skip.py``: a rare type's leaf starts from its type's
        Gaussian, not from the centre of all cells), with ``"global"``
        ``sigma x / (alpha^2 v + sigma^2)`` for the data's per-dimension variance ``v``. Without
        a skip term an MLP regresses towards typical norms: starting points in the tail of the
        N(0, I) prior are not contracted, and a few generated cells land far outside every real
        cell.

        With ``objective="flow"`` the network sees the interpolant ``x / (alpha + sigma)`` and
        its output is a velocity correction, which enters the noise prediction times
        ``1 - s = alpha / (alpha + sigma)`` (from ``eps = x_s + (1 - s) v``).
        """
        alpha, sigma = self._scales(x, t)
        skip = self._skip_eps(x, alpha, sigma, branch, labels)
        scale = None
        if self.objective == "flow":
            x, scale = x / (alpha + sigma), alpha / (alpha + sigma)
        if self.follows_tree:
            out = self.net(x, t, self._heads[branch])
        else:
            out = self.net(x, t, torch.zeros_like(branch), labels)
        return skip + (out if scale is None else scale * out)

    def skip_eps(
        self, x: torch.Tensor, t: torch.Tensor, branch: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The analytic Gaussian part of the noise prediction (``predict_eps``).

        An untrained network's whole prediction: its output layers start at zero.
        """
        return self._skip_eps(x, *self._scales(x, t), branch, labels)

    def _scales(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha(t)`` and ``sigma(t)`` in ``x``'s dtype, shaped to broadcast over its rows."""
        tt = t.to(x.dtype)
        alpha, sigma = self.sde.alpha(tt), self.sde.sigma(tt)
        if alpha.dim():
            alpha, sigma = alpha.unsqueeze(-1), sigma.unsqueeze(-1)
        return alpha, sigma

    def _skip_eps(self, x, alpha, sigma, branch, labels) -> torch.Tensor:
        if self.gaussian_skip == "per_branch":
            # E[eps | x_t] for the Gaussian of the cells this branch function serves
            function = self._heads[branch] if self.follows_tree else labels
            return gaussian_eps(
                x, alpha, sigma, function, self.skip_mean, self.skip_var, self.skip_basis
            )
        # one centred Gaussian with the standardised data's per-dimension variance
        return sigma * x / (alpha**2 * self.data_var + sigma**2)

    def training_error(
        self, eps_hat: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-row error the training minimises (noise or velocity, by ``objective``)."""
        return training_error(self.objective, eps_hat, noise, self.sde, t)

    def loss(self, tensors, inference_outputs, generative_outputs) -> LossOutput:
        """Mean squared error of the noise (``"eps"``) or velocity (``"flow"``) prediction."""
        err = self.training_error(
            generative_outputs["eps"], inference_outputs["noise"], inference_outputs["t"]
        )
        return LossOutput(loss=err.mean(), reconstruction_loss=err)

    # ------------------------------------------------------------------ sampling
    def eps_fn(self) -> Callable:
        """Noise predictor in the form the samplers expect."""

        def fn(x, t, branch, label):
            tt = torch.full((), float(t), device=x.device)
            return self.predict_eps(x, tt, branch, label)

        return fn

    @torch.inference_mode()
    def sample_cells(
        self,
        n_per_class: Mapping[int, int],
        *,
        solver: str = DEFAULT_SOLVER,
        n_steps: int | None = None,
        share: bool = True,
        seed: int = 0,
        spacing: str | None = None,
        progress: Callable | None = None,
        **options,
    ) -> SampleResult:
        """Sample cells in the data space (un-standardised), ``n_per_class`` per class index.

        ``options`` go to :func:`~scbranch.module.sample` (``batch_size``, ``record_times``,
        ``corrector_snr``, ``denoise``); recorded states are un-standardised too.
        """
        if not self.follows_tree and share:
            share = False  # a label-guided network has no shared branches to reuse
        device = self.shift.device
        res = sample(
            self.eps_fn(),
            self.tree,
            self.sde,
            n_per_class,
            n_input=self.n_input,
            solver=solver,
            n_steps=n_steps,
            share=share,
            seed=seed,
            spacing=default_spacing(solver) if spacing is None else spacing,
            device=device,
            progress=progress,
            **options,
        )
        res.x = self.unstandardize(res.x)
        res.trajectory = {t: self.unstandardize(x) for t, x in res.trajectory.items()}
        return res

    @torch.inference_mode()
    def sample(self, n_per_class: Mapping[int, int], **kwargs) -> torch.Tensor:
        """Generated data (data space), ``n_per_class`` per class.

        See :meth:`~scbranch.module.BranchedDiffusionModule.sample_cells`.
        """
        return self.sample_cells(n_per_class, **kwargs).x
