"""Class extension (docs/method.md): place a new class on the tree, add its head, train it.

Old classes keep every parameter they use (trunk and heads are frozen; the branch that the new
class splits keeps its head on both halves), so their samples are bit-identical after
extension for the same seed and requested classes. A branch-conditioned network gains an
embedding row instead of a head; only that row is trained and every other row is restored
bit for bit after training.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ._discovery import DiscoveryOptions, crossover_times, similarity_curves, smoothed
from ._recipe import MIN_HEAD_STEPS, TrainingRecipe, default_max_epochs, draw_times

logger = logging.getLogger(__name__)


@dataclass
class Placement:
    """Where a new class joins the tree."""

    sibling: int  #: class index it joins
    t: float  #: branch time (after the minimum branch length)
    crossover: np.ndarray  #: crossover time against every existing class (C,)


def place_class(
    reference: np.ndarray,
    reference_labels: np.ndarray,
    n_classes: int,
    new: np.ndarray,
    sde,
    options: DiscoveryOptions | None = None,
    *,
    min_reference_cells: int = 10,
    class_names: list[str] | None = None,
) -> Placement:
    """Crossover times of a new class against the reference cells of every existing class.

    The same similarity curves and crossover rule as hierarchy discovery
    (:func:`~scbranch.module.discover_hierarchy`), on standardised cells, with the options the
    tree was discovered with. The new class joins the class it crosses first (the most similar
    one) at that time.

    Parameters
    ----------
    reference, reference_labels
        Standardised reference cells of the existing classes and their class indices.
    n_classes
        Number of existing classes.
    new
        Standardised cells of the new class.
    sde
        The model's forward process.
    options
        Discovery options (``n_times``, ``smooth_sigma``, ``epsilon``, ``min_branch_length``,
        ``n_noise_draws``, ``curves`` and the ``seed`` of the noise are used).
    min_reference_cells
        Classes with fewer reference cells are not candidates to join (unless all are): their
        within-class similarity rests on a handful of pairs and crosses early by chance (a new
        type would join a type of 3 cells rather than its real relative).
    class_names
        Names of the existing classes and the new one, for error messages.
    """
    o = DiscoveryOptions() if options is None else options
    x = np.concatenate([np.asarray(reference, np.float32), np.asarray(new, np.float32)])
    labels = np.concatenate([reference_labels, np.full(len(new), n_classes)])
    times = np.linspace(0.0, 1.0, o.n_times)
    intra, inter = similarity_curves(
        x, labels, n_classes + 1, sde, times, seed=o.seed, n_draws=o.n_noise_draws, curves=o.curves
    )
    intra, inter = smoothed(intra, inter, o.smooth_sigma)
    cross = crossover_times(intra, inter, times, epsilon=o.epsilon, classes=class_names)[
        n_classes, :n_classes
    ]
    sizes = np.bincount(reference_labels, minlength=n_classes)
    eligible = sizes >= min_reference_cells
    if not eligible.any():
        eligible[:] = True
    sibling = int(np.argmin(np.where(eligible, cross, np.inf)))
    return Placement(sibling, float(max(cross[sibling], o.min_branch_length)), cross)


@dataclass
class PlacementRequest:
    """Where a user says a new class joins: one class, or a named group of the tree.

    ``classes``: the class, or the group's classes (the new class joins the one it crosses
    first). ``t``: the branch time (None: that crossover time). ``window``: a group's branch
    ``(t_start, t_end)``, which the branch time must lie in for the class to join the group
    itself rather than a part of it or what lies above it.
    """

    name: str
    classes: tuple[int, ...]
    t: float | None = None
    window: tuple[float, float] | None = None

    def apply(self, placement: Placement, min_branch_length: float) -> Placement:
        """``placement`` (from the crossover times) moved to where the request says.

        Examples
        --------
        >>> found = Placement(sibling=0, t=0.3, crossover=np.array([0.3, 0.5, 0.7]))
        >>> PlacementRequest("B or C", (1, 2)).apply(found, 0.02).sibling
        1
        >>> PlacementRequest("B and C", (1, 2), window=(0.6, 1.0)).apply(found, 0.02).t
        0.62
        """
        cross = placement.crossover
        sibling = self.classes[int(np.argmin(cross[list(self.classes)]))]
        if self.t is not None:
            return Placement(sibling, float(self.t), cross)
        t = max(float(cross[sibling]), min_branch_length)
        if self.window is not None:
            lo, hi = self.window
            margin = min(min_branch_length, (hi - lo) / 4)  # a branch of its own on both sides
            inside = float(np.clip(t, lo + margin, hi - margin))
            if inside != t:
                logger.info(
                    "The new type crosses %r at t=%.3f, outside the group's branch (%.3f-%.3f): "
                    "it joins the group at t=%.3f.",
                    self.name,
                    t,
                    lo,
                    hi,
                    inside,
                )
            t = inside
        return Placement(sibling, t, cross)


def extend_module(
    module, name: str, placement: Placement, own_head: bool | str = False
) -> tuple[int, int]:
    """Split the tree of ``module`` for a new class and add its head, warm-started.

    ``own_head``: a conditioned network's new branch also gets head blocks (``True``,
    ``"blocks"``) or an output layer (``"readout"``) of its own (see
    :meth:`~scbranch.module.ScoreNetwork.add_branch`).

    Returns ``(leaf_branch_id, head_index)`` of the new class.
    """
    if not module.follows_tree:
        raise ValueError("Only branched models can be extended (a flat model shares every weight).")
    old_tree = module.tree
    tree = old_tree.add_class(name, placement.sibling, placement.t)
    leaf = tree.leaf(tree.n_classes - 1)
    split = tree.branches[tree.branches[leaf].parent]
    # the branch it leaves: a close start
    index = module.net.add_branch(split.head, own_head=own_head)
    module.copy_gaussian_skip(split.head)
    if index != tree.branches[leaf].head:
        raise RuntimeError(f"branch function {index} != the tree's {tree.branches[leaf].head}")
    module.net.to(module.shift.device)
    module.tree = tree
    module._refresh_lookup()
    return leaf, tree.branches[leaf].head


def train_heads(
    module,
    heads: list[int],
    x: torch.Tensor,
    labels: torch.Tensor,
    t_range: tuple[float, float],
    *,
    n_steps: int,
    batch_size: int = 64,
    recipe: TrainingRecipe | None = None,
    seed: int = 0,
    progress: Callable | None = None,
) -> list[float]:
    """Train the heads ``heads`` alone on standardised cells ``x`` of classes ``labels``.

    The training recipe of full training (:class:`~scbranch.module.TrainingRecipe`): times
    drawn as the module draws them (its ``t_sampling``), restricted to ``t_range``, the same
    loss, Adam with a cosine decay, clipping, and the heads ending at their weight EMA. Every
    other parameter is frozen for the run (``requires_grad`` restored after); each row uses the
    branch of its class at its time (rows on frozen heads only condition the loss).

    Returns
    -------
    The loss of every step.
    """
    recipe = TrainingRecipe() if recipe is None else recipe
    matrices, trained, own = module.net.branch_parameters(heads)
    if trained is not None:  # conditioned: per-branch matrices of which only `trained` rows
        frozen = [p.detach().clone() for p in matrices]  # may change
        keep = trained.unsqueeze(1)
        hooks = [p.register_hook(lambda g: g * keep.to(g.dtype)) for p in matrices]
    params = matrices + own
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    device = module.shift.device
    # drawn on the CPU and moved: a new head trains on the same draws on every device
    gen = torch.Generator().manual_seed(int(seed))
    # head blocks (a head, or a conditioned branch's own) at the full recipe's rate, whatever
    # rate the embedding and adapter rows train at (EXTENSION_LR)
    groups = [{"params": matrices}] if matrices else []
    groups += [{"params": own, "lr": TrainingRecipe.lr if matrices else recipe.lr}] if own else []
    optimizer = recipe.optimizer(groups)
    scheduler = recipe.scheduler(optimizer, n_steps)
    ema = recipe.ema(params)
    n = x.shape[0]
    losses: list[float] = []
    steps = range(n_steps)
    if progress is not None:
        steps = progress(steps)
    was_training = module.training
    module.train()
    try:
        order = torch.randperm(n, generator=gen).to(device)
        pos = 0
        for _ in steps:
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=gen).to(device), 0
            rows = order[pos : pos + batch_size]
            pos += batch_size
            x0, lab = x[rows], labels[rows]
            t = draw_times(
                module.sde,
                x0.shape[0],
                t_sampling=module.t_sampling,
                t_range=t_range,
                generator=gen,
            ).to(device)
            noise = torch.randn(x0.shape, generator=gen, device="cpu").to(device)
            xt, _ = module.sde.marginal(x0, t, noise)
            eps = module.predict_eps(xt, t, module.branch_of(lab, t), lab)
            loss = module.training_error(eps, noise, t).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(float(loss.detach()))
            if ema is not None:
                ema.update(params)
        if ema is not None:
            ema.copy_to(params)
    finally:
        if trained is not None:
            with torch.no_grad():  # bit-identical old branches, whatever the optimiser did
                for p, f, hook in zip(matrices, frozen, hooks, strict=True):
                    hook.remove()
                    p[~trained] = f[~trained]
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        module.train(was_training)
    return losses


#: Default learning rate of a new branch's weights, by architecture. A new head (branched) is
#: a network warm-started from its sibling's head and trains at the full recipe's rate; a new
#: branch of the conditioned network is two rows (an embedding and a FiLM adapter) that start
#: as copies of the sibling's and must move far to tell the new type apart: at the recipe's
#: 1e-3 its cells kept their type about half as often as real cells (label fidelity pbmc3k
#: 0.53, control 0.94; pbmc68k 0.48, control 0.84), at 3e-2 0.89 and 0.82, a little below a
#: new head (0.94; 0.90): docs/benchmarks/extension.md. 1e-2 and 1e-1 were within 0.03 of 3e-2.
EXTENSION_LR = {"branched": TrainingRecipe.lr, "conditioned": 3e-2}


def add_class_head(
    module,
    reference: dict,
    z: np.ndarray,
    name: str,
    options: DiscoveryOptions,
    *,
    class_names: list[str],
    max_epochs: int | None,
    batch_size: int,
    recipe: TrainingRecipe,
    fine_tune_shared: bool = False,
    own_head: bool | str = False,
    request: PlacementRequest | None = None,
    seed: int = 0,
    progress: Callable | None = None,
) -> dict:
    """Place one new class on the module's tree, add its head and train it.

    Parameters
    ----------
    module
        The branched module (extended in place).
    reference
        Standardised reference cells of the known classes: ``{"x", "labels"}``.
    z
        Standardised cells of the new class.
    name
        Its name.
    options
        Discovery options of the tree (the placement uses its crossover rule).
    class_names
        Known classes and the new one, for messages.
    max_epochs, batch_size, recipe, seed, progress
        Training of the new head (see :func:`train_heads`).
    fine_tune_shared
        Then also train the heads above the new branch point, with replay of the reference
        cells of every type (old types on those branches change).
    own_head
        A conditioned network's new branch gets head blocks or an output layer of its own
        (see :func:`extend_module`).
    request
        Where the user says the class joins (default: where its crossover times say).

    Returns
    -------
    ``{"label", "joins" (class index), "t", "crossover" (its crossover time against the
    class it joins), "placed_by" (``"crossover"``, or the class or group requested),
    "n_cells", "n_steps", "final_loss", "lr", "fine_tune_shared", "own_head",
    "own_readout"}`` (``own_head``: head blocks of its own; ``own_readout``: an output layer
    of its own on the shared blocks).
    """
    code = module.tree.n_classes
    placement = place_class(
        reference["x"], reference["labels"], code, z, module.sde, options, class_names=class_names
    )
    if request is not None:
        placement = request.apply(placement, options.min_branch_length)
    _, head = extend_module(module, name, placement, own_head=own_head)
    # the new leaf's Gaussian from the new cells; every old branch keeps its own bit for bit
    module.fit_gaussian_skip([(0, len(z), z)], np.full(len(z), code), 0.0, 1.0, first=head)
    device = module.shift.device
    n_steps = default_head_steps(len(z), batch_size, max_epochs)
    train = {"n_steps": n_steps, "batch_size": batch_size, "recipe": recipe, "seed": seed}
    z_t = torch.as_tensor(z, dtype=torch.float32, device=device)
    own = torch.full((len(z),), code, device=device)
    t_min = module.sde.t_min
    losses = train_heads(module, [head], z_t, own, (t_min, placement.t), progress=progress, **train)
    if fine_tune_shared:
        # the new class's whole path, with replay of every reference cell those heads serve:
        # old types on these branches change (no longer bit-identical)
        replay = np.isin(reference["labels"], module.tree.branches[module.tree.root].classes)
        x_all = torch.cat([z_t, torch.as_tensor(reference["x"][replay], device=device)])
        y_all = torch.cat([own, torch.as_tensor(reference["labels"][replay], device=device)])
        heads = [head, *shared_heads(module.tree, code, placement.t)]
        losses += train_heads(module, heads, x_all, y_all, (t_min, 1.0), progress=progress, **train)
        module.tree.mark_trained(shared_branches(module.tree, code, placement.t))
    return {
        "label": name,
        "joins": placement.sibling,
        "t": placement.t,
        "crossover": float(placement.crossover[placement.sibling]),
        "placed_by": "crossover" if request is None else request.name,
        "n_cells": len(z),
        "n_steps": len(losses),
        "final_loss": float(np.mean(losses[-50:])),
        "lr": float(recipe.lr),
        "fine_tune_shared": bool(fine_tune_shared),
        "own_head": module.net.branch_heads is not None and str(head) in module.net.branch_heads,
        "own_readout": module.net.branch_readouts is not None
        and str(head) in module.net.branch_readouts,
    }


def shared_branches(tree, label: int, t: float) -> list[int]:
    """The branches on class ``label``'s path from time ``t`` up (shared with others)."""
    return [b for b in tree.path(label) if tree.branches[b].t_start >= t]


def shared_heads(tree, label: int, t: float) -> list[int]:
    """Heads of the branches on class ``label``'s path from time ``t`` up (shared with others)."""
    return [tree.branches[b].head for b in shared_branches(tree, label, t)]


def default_head_steps(n_cells: int, batch_size: int, max_epochs: int | None) -> int:
    """Optimiser steps of extension: ``max_epochs`` passes over the new cells.

    By default ``train()``'s rule for them (about 100 epochs within 500-16,000 steps: the
    floor is extension's own, :data:`~scbranch.module._recipe.MIN_HEAD_STEPS`).

    A fixed 1,000 steps cost more than retraining a small model from scratch (the conditioned
    network on pbmc68k_reduced: 11.5 s against 7.1 s, docs/benchmarks/extension.md) and gave
    a new type of 5,000 cells 13 passes.

    Examples
    --------
    >>> default_head_steps(30, 64, None)  # a rare new type: the 500-step floor
    500
    >>> default_head_steps(5_000, 64, None)  # 79 steps an epoch, 100 epochs
    7900
    """
    per_epoch = max(1, math.ceil(n_cells / batch_size))
    if max_epochs is None:
        max_epochs = default_max_epochs(n_cells, batch_size, min_steps=MIN_HEAD_STEPS)
    return max(1, int(max_epochs) * per_epoch)
