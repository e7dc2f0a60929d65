"""Interpretation with the tree: transmutation, hybrids and trajectories (docs/method.md).

The model's :meth:`~scbranch.BranchedDiffusion.transmute`,
:meth:`~scbranch.BranchedDiffusion.hybrids` and ``generate(trajectory_times=...)`` run here.
These functions use only the model's public attributes (``module``, ``tree``, ``space``,
``classes``, ``labels_key``) and methods (``encode``); every result is a new AnnData with one
row per (cell, checkpoint) and the keys of :class:`scbranch._keys.Key`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from anndata.utils import make_index_unique

from .._keys import Key
from .._utils import progress, resolve_seed
from .._validation import check_finite, check_obs_key
from ..module._denoiser import CalibratedDenoiser
from ..module._sampling import SampleResult
from ..module._solvers import DEFAULT_N_STEPS, resolve_solver
from ..module._transport import denoise, transport
from ._output import cell_count, generated_anndata, trajectory_anndata, warn_if_untrained

if TYPE_CHECKING:
    from ._model import BranchedDiffusion

logger = logging.getLogger(__name__)

#: solver steps per leg of a transmutation when none are given
TRANSMUTE_STEPS = {"ode": 50, "sde": 200}


def checkpoint_times(t_min: float, t_branch: float, n: int, sde) -> np.ndarray:
    """``n`` times from ``t_min`` up to ``t_branch``, evenly spaced in log-SNR, exact ends."""
    lam = np.linspace(sde.log_snr(t_min), sde.log_snr(t_branch), n)
    times = np.asarray(sde.t_from_log_snr(lam), dtype=np.float64)
    times[0], times[-1] = t_min, t_branch
    return times


def clean_estimator(model: BranchedDiffusion) -> CalibratedDenoiser | None:
    """The clean-cell estimate recorded at checkpoints, calibrated on the model's reference cells.

    Tweedie's estimate alone divides the network's error by alpha(t) (0.006 at t = 1) and lands
    far outside the data at high noise (docs/method.md); None for a model saved without
    reference cells (scbranch < 0.2), whose checkpoints then carry that estimate.
    """
    ref = model.reference_samples_
    if ref is None:
        logger.info("No reference cells stored: clean-cell estimates are Tweedie's, uncalibrated.")
        return None
    module = model.module
    device = module.shift.device
    return CalibratedDenoiser.fit(
        module.eps_fn(),
        model.tree,
        module.sde,
        torch.as_tensor(ref["x"], dtype=torch.float32, device=device),
        torch.as_tensor(ref["labels"], dtype=torch.int64, device=device),
        class_sizes=model.class_counts_,
    )


def estimate_clean(
    denoiser: CalibratedDenoiser | None, eps_fn, tree, sde, z, labels, t: float
) -> torch.Tensor:
    """The clean-cell estimate of standardised states ``z`` at time ``t`` (standardised)."""
    if denoiser is None:
        return denoise(eps_fn, tree, sde, z, labels, t)
    return denoiser(eps_fn, z, labels, t)


def _unstandardized(module, z: torch.Tensor) -> np.ndarray:
    """(n, k, d) standardised states -> (n * k, d) in the data space, numpy."""
    return module.unstandardize(z).reshape(-1, z.shape[-1]).float().cpu().numpy()


@torch.inference_mode()
def transmute(
    model: BranchedDiffusion,  # the model, when called as ``model.transmute(...)``
    adata: AnnData,
    target: str,
    *,
    source: str | None = None,
    per_cell_source: bool = False,
    mode: str = "ode",
    n_checkpoints: int = 5,
    n_steps: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    progress_bar: bool = True,
    batch: str | None = None,
) -> AnnData:
    """Carry real cells of one type to another type through their branch point.

    Each cell goes up the diffusion process along its own type's branches to the time ``t*``
    where its type and ``target`` join, then down along the target's branches (docs/method.md).
    What the cell has beyond its type survives as far as the process keeps it: ``mode="ode"``
    is deterministic and invertible (transmuting the result back returns the cell up to solver
    error), ``mode="sde"`` noises the cell in closed form and samples the way down (more
    diverse, keeps less of the cell).

    Parameters
    ----------
    adata
        Real cells in the model's representation (``obsm[obsm_key]`` in the same latent
        space, the model's genes for expression models, or counts of the scVI model's genes
        for scVI models: encoded by its encoder as the training cells were, so
        ``obsm['X_scVI']`` is not read and generated cells need ``counts=True``).
    target
        The type to transmute into.
    source
        Treat every cell as this type. Default: ``adata.obs[labels_key]``, which must hold
        one type unless ``per_cell_source=True``.
    per_cell_source
        Cells of several types: carry each up along its own type's branches (to its own
        branch point with the target).
    mode
        ``"ode"`` (probability-flow ODE both ways, Heun) or ``"sde"`` (exact forward
        noising up, reverse SDE Euler-Maruyama down).
    n_checkpoints
        States recorded on each leg, both ends included: every cell gets
        ``2 * n_checkpoints - 1`` rows, the middle one at the branch point.
    n_steps
        Solver steps per leg (default 50 for ``"ode"``, 200 for ``"sde"``); the grid holds
        every branch point on the way and every checkpoint.
    seed
        Seed of the noise (``"sde"``); `None` draws one (recorded in ``uns``).
    batch_size
        At most this many cells per forward pass.
    progress_bar
        Show progress bars over the steps.
    batch
        scVI models set up with a batch: the batch every row's ``.X`` is decoded into
        (recorded in ``obs[batch_key]``; default: the most common one in the training data).

    Returns
    -------
    AnnData with one row per (cell, checkpoint), rows grouped by cell: ``obs['trajectory']``
    and ``obs['source_cell']`` (the cell's name in ``adata``), ``obs['checkpoint']``,
    ``obs['t']``, ``obs['phase']`` (``"source"``, ``"up"``, ``"branch point"``, ``"down"``,
    ``"endpoint"``), ``obs['branch']``, ``obs['source_label']``, ``obs['target_label']``; the
    model's estimate of the clean cell at each state (E[x_0 | x_t]) in ``obsm[obsm_key]`` and
    decoded in ``.X`` where the space allows; the noisy state in ``obsm['scbranch_state']``;
    parameters in ``uns['scbranch']['params']``. The source rows hold the cells as given in the
    model's representation (``obsm[obsm_key]``; their ``.X`` is that representation decoded,
    e.g. a PCA model's reconstruction from its components, not the measured expression, so
    that source and endpoint rows compare like with like), the endpoint rows the transmuted
    cells: select them with ``tm[tm.obs['phase'] == 'endpoint']``.

    Examples
    --------
    >>> mono = adata[adata.obs["cell_type"] == "CD14+ Monocyte"]  # doctest: +SKIP
    >>> tm = model.transmute(mono, target="Dendritic", mode="ode")  # doctest: +SKIP
    >>> dc_like = tm[tm.obs["phase"] == "endpoint"]  # doctest: +SKIP
    """
    warn_if_untrained(model, "Transmuting")
    # the batch .X is decoded into (scVI with batches); refused with a reason elsewhere
    batch = model.space.resolve_options(counts=False, batch=batch, residual_noise=False)["batch"]
    if not isinstance(adata, AnnData):
        raise TypeError(f"`adata` must be an AnnData, got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise ValueError("`adata` holds no cells to transmute.")
    if mode not in ("ode", "sde"):
        raise ValueError(f"mode must be 'ode' or 'sde', got {mode!r}.")
    if isinstance(n_checkpoints, bool) or not float(n_checkpoints).is_integer():
        raise ValueError(f"n_checkpoints must be a whole number, got {n_checkpoints!r}.")
    if int(n_checkpoints) < 2:
        raise ValueError(f"n_checkpoints must be at least 2, got {n_checkpoints}.")
    adapt = n_steps is None  # the default adapts to the checkpoints and branch points
    n_steps = TRANSMUTE_STEPS[mode] if n_steps is None else int(n_steps)
    if n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps}.")
    target_code = int(model.tree.class_index(str(target))[0])
    sources = _transmutation_sources(model, adata, source, per_cell_source, target_code)
    x = _ode_endpoint_states(model, adata)  # an ODE transmutation's endpoints, carried back
    if x is None:
        x = model.encode(adata, "the cells to transmute")
    seed = resolve_seed(seed)
    solvers = ("heun", "heun") if mode == "ode" else ("noise", "em")

    module, tree, sde = model.module, model.tree, model.module.sde
    device = module.shift.device
    eps_fn = module.eps_fn()
    denoiser = clean_estimator(model)
    k = int(n_checkpoints)
    n_rows = 2 * k - 1
    z_all = module.standardize(torch.as_tensor(x, dtype=torch.float32, device=device))
    states = torch.empty((len(x), n_rows, x.shape[1]), device=device)
    estimates = torch.empty_like(states)
    times = np.empty((len(x), n_rows))
    branches = np.empty((len(x), n_rows), dtype=np.int64)
    n_calls = 0
    branch_times = {}
    steps_used = n_steps
    for s in np.unique(sources):
        pos = np.flatnonzero(sources == s)
        rows = torch.as_tensor(pos, device=device)
        t_star = tree.branch_time(int(s), target_code)
        branch_times[model.classes[s]] = t_star
        up_times = checkpoint_times(sde.t_min, t_star, k, sde)
        path_times = np.r_[up_times, up_times[-2::-1]]
        path_labels = np.r_[np.full(k, s), np.full(k - 1, target_code)]
        group_seed = int(np.random.SeedSequence([seed, int(s)]).generate_state(1)[0])
        leg_steps = n_steps
        if adapt:  # one step at least per segment between checkpoints and branch points
            knots = set(tree.breakpoints([int(s), target_code], sde.t_min)) | set(up_times)
            segments = len({float(t) for t in knots if sde.t_min < t < t_star}) + 1
            leg_steps = max(n_steps, segments)
        steps_used = max(steps_used, leg_steps)
        legs = []
        for leg, (t_from, t_to, code, solver) in enumerate(
            [
                (sde.t_min, t_star, s, solvers[0]),
                (t_star, sde.t_min, target_code, solvers[1]),
            ]
        ):
            name = f"{model.classes[s]} -> {target} ({'up' if leg == 0 else 'down'})"
            res = transport(
                eps_fn,
                tree,
                sde,
                z_all[rows] if leg == 0 else legs[0].x,
                torch.full((len(rows),), int(code), device=device),
                t_from,
                t_to,
                solver=solver,
                n_steps=leg_steps,
                seed=group_seed,
                record_times=up_times,
                batch_size=batch_size,
                progress=progress(name, progress_bar),
            )
            legs.append(res)
            n_calls += res.n_network_calls
        for j, (t, code) in enumerate(zip(path_times, path_labels, strict=True)):
            leg = legs[0] if j < k else legs[1]
            state = leg.trajectory[float(t)]
            labels = torch.full((len(rows),), int(code), device=device)
            if j == 0 or (j == n_rows - 1 and mode == "ode"):
                # the given cell, and the ODE's endpoint: a state at t_min IS the cell
                # (denoising it would break the exact inverse)
                estimate = state
            else:
                estimate = estimate_clean(denoiser, eps_fn, tree, sde, state, labels, float(t))
                n_calls += 1
            states[rows, j] = state
            estimates[rows, j] = estimate
            times[pos, j] = t
            branches[pos, j] = tree.lookup(np.array([code]), float(t))[0]

    names = make_index_unique(pd.Index(adata.obs_names.astype(str)))
    phase = np.array([Key.phase.UP] * n_rows, dtype=object)
    phase[0], phase[k - 1] = Key.phase.SOURCE, Key.phase.BRANCH_POINT
    phase[k:], phase[-1] = Key.phase.DOWN, Key.phase.ENDPOINT
    cells = np.repeat(np.asarray(names), n_rows)
    checkpoint = np.tile(np.arange(n_rows), len(x))
    obs = pd.DataFrame(
        {
            Key.obs.TRAJECTORY: pd.Categorical(cells, categories=list(names)),
            Key.obs.CHECKPOINT: checkpoint,
            Key.obs.T: times.ravel(),
            Key.obs.PHASE: pd.Categorical(np.tile(phase, len(x)), categories=Key.phase.ALL),
            Key.obs.BRANCH: branches.ravel(),
            Key.obs.SOURCE_LABEL: pd.Categorical.from_codes(
                np.repeat(sources, n_rows), categories=model.classes
            ),
            Key.obs.TARGET_LABEL: pd.Categorical.from_codes(
                np.full(len(cells), target_code), categories=model.classes
            ),
            Key.obs.SOURCE_CELL: np.repeat(np.asarray(adata.obs_names.astype(str)), n_rows),
        },
        index=[f"{c}-{j}" for c, j in zip(cells, checkpoint, strict=True)],
    )
    params = {
        "kind": "transmutation",
        "target": str(target),
        "sources": np.array(list(branch_times), dtype=object),
        "branch_times": np.array(list(branch_times.values()), dtype=np.float64),
        "mode": mode,
        "solver_up": solvers[0],
        "solver_down": solvers[1],
        "n_checkpoints": k,
        "n_steps": steps_used,
        "seed": seed,
        "n_cells": len(x),
        "n_network_calls": n_calls,
        **({"batch": batch} if batch else {}),
    }
    out = trajectory_anndata(
        model, _unstandardized(module, states), _unstandardized(module, estimates), obs, params
    )
    logger.info(
        "Transmuted %d cells into %r (%s) through t* = %s with %d network calls.",
        len(x),
        target,
        mode,
        ", ".join(f"{t:.3f}" for t in branch_times.values()),
        n_calls,
    )
    return out


def _ode_endpoint_states(model: BranchedDiffusion, adata: AnnData) -> np.ndarray | None:
    """The exact ODE states of a transmutation's endpoint rows, where ``adata`` is made of them.

    Their state at ``t_min`` (``obsm['scbranch_state']``) is the cell itself: encoding the
    rows instead loses what the inverse integration needs (an expression model's ``.X`` is
    clipped at 0) or fails (an scVI model's rows hold no counts to encode). `None` for other
    cells.
    """
    record = adata.uns.get(Key.uns.GENERATED, {})
    params = record.get("params", {}) if isinstance(record, Mapping) else {}
    if (
        Key.obsm.STATE in adata.obsm
        and Key.obs.PHASE in adata.obs.columns
        and params.get("kind") == "transmutation"
        and params.get("mode") == "ode"
        and (adata.obs[Key.obs.PHASE].astype(str) == Key.phase.ENDPOINT).all()
    ):
        state = np.asarray(adata.obsm[Key.obsm.STATE], dtype=np.float64)
        if state.shape == (adata.n_obs, model.module.n_input):
            check_finite(state, "obsm['scbranch_state'] of the cells to transmute")
            return state
    return None


def _transmutation_sources(
    model: BranchedDiffusion,
    adata: AnnData,
    source: str | None,
    per_cell_source: bool,
    target_code: int,
) -> np.ndarray:
    """Class index of every cell's source type (validated against the target)."""
    if source is not None:
        codes = np.full(adata.n_obs, int(model.tree.class_index(str(source))[0]))
    else:
        if model.labels_key not in adata.obs.columns:
            raise KeyError(
                f"adata.obs has no {model.labels_key!r} column to read the cells' type from"
                + (
                    " (these are a transmutation's rows: their type is in obs['target_label'])"
                    if Key.obs.TARGET_LABEL in adata.obs.columns
                    else ""
                )
                + ". Pass `source=` (the type every cell is), or label the cells in "
                f"adata.obs[{model.labels_key!r}]."
            )
        check_obs_key(adata, model.labels_key)  # unlabelled cells: drop them or pass source=
        names = adata.obs[model.labels_key].astype(str).to_numpy()
        present = [str(p) for p in pd.unique(names)]
        model.tree.class_index(present)  # unknown types: named as such, not as a second type
        if len(present) > 1 and not per_cell_source:
            counts = pd.Series(names).value_counts()
            listing = ", ".join(f"{str(c)!r} ({n})" for c, n in counts.items())
            raise ValueError(
                f"adata holds cells of {len(present)} types ({listing}). Transmute one type "
                "at a time (subset adata), pass `source=` to treat every cell as one type, "
                "or `per_cell_source=True` to carry each cell along its own type's branches."
            )
        codes = model.tree.class_index(names)
    if np.any(codes == target_code):
        raise ValueError(
            f"{int(np.sum(codes == target_code))} cell(s) already are of the target type "
            f"{model.classes[target_code]!r}: a type cannot be transmuted into itself. "
            "Choose another target, or leave these cells out."
        )
    return codes.astype(np.int64)


@torch.inference_mode()
def hybrids(
    model: BranchedDiffusion,  # the model, when called as ``model.hybrids(...)``
    label_a: str,
    label_b: str,
    n_cells: int = 100,
    *,
    solver: str = "heun",
    n_steps: int = DEFAULT_N_STEPS,
    seed: int | None = None,
    counts: bool | None = None,
    batch: str | None = None,
    batch_size: int | None = None,
    progress_bar: bool = True,
) -> AnnData:
    """Pairs of cells of two types that share their whole reverse path above the branch point.

    The reverse process runs once from t = 1 down to ``t*``, where ``label_a`` and ``label_b``
    split; the same states then finish once along ``label_a``'s branches and once along
    ``label_b``'s. The two cells of a pair differ only by what the process adds below ``t*``:
    what the types share, and where they part.

    Parameters
    ----------
    label_a, label_b
        The two types (different).
    n_cells
        Number of pairs.
    solver
        As in :meth:`~scbranch.BranchedDiffusion.generate`, but by default ``"heun"`` (the
        probability-flow ODE), so that below the branch point the two cells of a pair differ
        by their types' score functions only, not by fresh noise; ``"em"`` adds that noise.
    n_steps, seed, counts, batch, batch_size, progress_bar
        As in :meth:`~scbranch.BranchedDiffusion.generate` (sharing is always on).

    Returns
    -------
    AnnData of ``2 * n_cells`` generated cells, as ``generate`` returns them, with
    ``obs['pair']`` (pair index), ``obs['side']`` (which type), and the shared state at the
    branch point in ``obsm['scbranch_branch_state']``.

    Examples
    --------
    >>> hy = model.hybrids("CD4+/CD25 T Reg", "CD8+ Cytotoxic T", n_cells=200)  # doctest: +SKIP
    >>> hy.obs.groupby("side").size()  # doctest: +SKIP
    """
    warn_if_untrained(model, "Generating hybrids")
    if not model.module.follows_tree:
        raise ValueError(
            "Hybrids need a branched model: a label-guided (flat) model has no reverse "
            "path that two types share."
        )
    a, b = (int(c) for c in model.tree.class_index([str(label_a), str(label_b)]))
    if a == b:
        raise ValueError(f"Hybrids need two different types, got {label_a!r} twice.")
    n = cell_count(n_cells, "hybrids")  # 2.7 pairs ran as 2
    if n < 1:
        raise ValueError(f"n_cells must be a positive integer, got {n_cells}.")
    solver = resolve_solver(solver)
    options = model.space.resolve_options(counts=counts, batch=batch, residual_noise=False)
    seed = resolve_seed(seed)
    t_star = model.tree.branch_time(a, b)
    res = model.module.sample_cells(
        {a: n, b: n},
        solver=solver,
        n_steps=n_steps,
        share=True,
        seed=seed,
        batch_size=batch_size,
        progress=progress("Sampling", progress_bar),
        record_times=[t_star],
    )
    params = {
        "kind": "hybrids",
        "label_a": str(label_a),
        "label_b": str(label_b),
        "branch_time": t_star,
        "n_cells": n,
        "solver": solver,
        "n_steps": n_steps,
        "share": True,
        "seed": seed,
        "residual_noise": False,
        "counts": options["counts"],
        "batch": options["batch"] or "",
        "n_network_calls": res.n_network_calls,
        "n_row_evaluations": res.n_row_evaluations,
    }
    out = generated_anndata(model, res.x.float().cpu().numpy(), res.labels.cpu().numpy(), params)
    out.obs[Key.obs.PAIR] = np.tile(np.arange(n), 2)
    out.obs[Key.obs.SIDE] = pd.Categorical(
        [str(label_a)] * n + [str(label_b)] * n, categories=[str(label_a), str(label_b)]
    )
    out.obs_names = [f"hybrid{i}_{side}" for side in ("a", "b") for i in range(n)]
    out.obsm[Key.obsm.BRANCH_STATE] = res.trajectory[t_star].float().cpu().numpy()
    return out


def check_trajectory_times(
    model: BranchedDiffusion,
    times: Sequence[float],
    counts: bool | None,
    residual_noise: bool,
    *,
    calibrate_spread: bool = False,
    devices: Sequence | None = None,
) -> list[float]:
    """Validated recording times of :meth:`generate`, decreasing (0: the final cells).

    Options that trajectories cannot take (counts, residual noise, spread calibration, several
    devices) are refused with what to do instead.
    """
    if calibrate_spread:
        raise ValueError(
            "`calibrate_spread` gives a type's cells its spread; trajectories follow "
            "single cells. Generate the cells and the trajectories in two calls."
        )
    if devices is not None:
        raise ValueError(
            "`devices` spreads blocks of cells; trajectories are one block on the "
            "model's device (move it with `model.to_device`)."
        )
    t_min = model.module.sde.t_min
    values = sorted({float(t) for t in np.atleast_1d(np.asarray(times, dtype=float))})
    if not values:
        raise ValueError("trajectory_times is empty; give times in [t_min, 1] or 0.")
    bad = [t for t in values if not (t == 0.0 or t_min <= t <= 1.0)]
    if bad:
        raise ValueError(
            f"trajectory_times must be 0 (the final cells) or lie in [t_min={t_min}, 1]; got {bad}."
        )
    if counts or residual_noise:
        raise ValueError(
            "Trajectories carry the model's clean estimate at each time, not counts or "
            "residual noise; generate the final cells without `trajectory_times` for those."
        )
    return values[::-1]


def run_trajectories(
    model: BranchedDiffusion,
    requested: dict[int, int],
    times: list[float],
    options: Mapping,
    settings: Mapping,
    *,
    batch_size: int | None,
    block_rows: int,
    out: Path | None,
    overwrite: bool,
    progress_bar: bool,
    origins: Mapping[int, list[tuple[str, int]]] | None = None,
) -> AnnData | Path:
    """Run ``generate(trajectory_times=...)``: one sampler run that records states.

    Returned in memory or written to ``out``; trajectories are one block (their rows are
    (cell, time) pairs, not cells).
    """
    from ._blocks import requested_node_categories, write_anndata
    from ._output import check_memory, generation_params, requested_nodes

    n_total = sum(requested.values())
    if out is not None and n_total > block_rows:
        raise ValueError(
            f"Trajectories are written in one block, and {n_total:,} cells exceed the block of "
            f"{block_rows:,}: ask for fewer cells, or pass a larger `block_size` if they fit in "
            "memory."
        )
    check_memory(model.space, n_total, options)
    res = model.module.sample_cells(
        requested,
        **{k: settings[k] for k in ("solver", "n_steps", "share", "seed", "spacing")},
        batch_size=batch_size,
        progress=progress("Sampling", progress_bar),
        record_times=[t for t in times if t > 0],
    )
    params = generation_params(
        model.classes, requested, res, options, **settings, block_rows=block_rows, n_blocks=1
    )
    trajectories = generation_trajectories(model, res, times, params)
    categories = requested_node_categories(model.classes, origins or {})
    if categories is not None:  # groups of the tree were asked for: which, as generate says
        nodes = requested_nodes(res.labels.cpu().numpy(), origins)
        trajectories.obs[Key.obs.REQUESTED_NODE] = pd.Categorical(
            np.repeat(nodes, len(times)), categories=categories
        )
    return trajectories if out is None else write_anndata(trajectories, out, overwrite)


def generation_trajectories(
    model: BranchedDiffusion, res: SampleResult, times: list[float], params: dict
) -> AnnData:
    """One row per (generated cell, recorded time) from a sampler run."""
    module, tree = model.module, model.tree
    eps_fn = module.eps_fn()
    # only checkpoints above t = 0 are estimated (t = 0 rows are the final cells)
    denoiser = clean_estimator(model) if any(t > 0 for t in times) else None
    labels = res.labels
    n, n_rows = len(labels), len(times)
    states, estimates, branches = [], [], []
    with torch.inference_mode():
        for t in times:
            if t == 0.0:
                state = estimate = res.x
            else:
                state = res.trajectory[t]
                z = module.standardize(state)
                estimate = module.unstandardize(
                    estimate_clean(denoiser, eps_fn, tree, module.sde, z, labels, t)
                )
            states.append(state)
            estimates.append(estimate)
            branches.append(tree.lookup(labels.cpu().numpy(), t))
    # (n, n_rows, d): rows grouped by cell
    states_np = torch.stack(states, 1).reshape(n * n_rows, -1).float().cpu().numpy()
    estimates_np = torch.stack(estimates, 1).reshape(n * n_rows, -1).float().cpu().numpy()
    codes = np.repeat(labels.cpu().numpy(), n_rows)
    cells = np.repeat([f"gen{i}" for i in range(n)], n_rows)
    checkpoint = np.tile(np.arange(n_rows), n)
    classes = pd.Categorical.from_codes(codes, categories=model.classes)
    obs = pd.DataFrame(
        {
            Key.obs.TRAJECTORY: pd.Categorical(cells, categories=[f"gen{i}" for i in range(n)]),
            Key.obs.CHECKPOINT: checkpoint,
            Key.obs.T: np.tile(np.asarray(times, dtype=np.float64), n),
            Key.obs.BRANCH: np.stack(branches, 1).ravel().astype(np.int64),
            model.labels_key: classes,
            Key.obs.TARGET_LABEL: classes.copy(),
        },
        index=[f"{c}-{j}" for c, j in zip(cells, checkpoint, strict=True)],
    )
    params = {**params, "kind": "trajectories", "trajectory_times": np.asarray(times)}
    return trajectory_anndata(model, states_np, estimates_np, obs, params)
