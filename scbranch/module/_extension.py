"""Class extension (METHOD.md §10): place a new class on the tree, add its head, train only it.

Old classes keep every parameter they use (trunk and heads are frozen; the branch that the new
class splits keeps its head on both halves), so their samples are bit-identical after
extension for the same seed and requested classes.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter1d

from ._discovery import crossover_times, similarity_curves

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
    *,
    n_times: int = 200,
    smooth_sigma: float = 3.0,
    epsilon: float = 0.005,
    min_branch_length: float = 0.02,
    min_reference_cells: int = 10,
    n_draws: int = 1,
    curves: str = "sampled",
    seed: int = 0,
    class_names: list[str] | None = None,
) -> Placement:
    """Crossover times of a new class against the reference cells of every existing class.

    The same similarity curves and crossover rule as hierarchy discovery
    (:func:`~scbranch.module.discover_hierarchy`), on standardised cells. The new class joins
    the class it crosses first (the most similar one) at that time.

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
    n_times, smooth_sigma, epsilon, min_branch_length, n_draws, curves, seed
        As in hierarchy discovery (``n_draws``: its ``n_noise_draws``).
    min_reference_cells
        Classes with fewer reference cells are not candidates to join (unless all are): their
        within-class similarity rests on a handful of pairs and crosses early by chance
        (pbmc68k: dendritic cells "joined" a type with 3 training cells, not the monocytes).
    class_names
        Names of the existing classes and the new one, for error messages.
    """
    x = np.concatenate([np.asarray(reference, np.float32), np.asarray(new, np.float32)])
    labels = np.concatenate([reference_labels, np.full(len(new), n_classes)])
    times = np.linspace(0.0, 1.0, n_times)
    intra, inter = similarity_curves(
        x, labels, n_classes + 1, sde, times, seed=seed, n_draws=n_draws, curves=curves
    )
    if smooth_sigma > 0:
        intra = gaussian_filter1d(intra, smooth_sigma, axis=-1, mode="nearest")
        inter = gaussian_filter1d(inter, smooth_sigma, axis=-1, mode="nearest")
    cross = crossover_times(intra, inter, times, epsilon=epsilon, classes=class_names)[
        n_classes, :n_classes
    ]
    sizes = np.bincount(reference_labels, minlength=n_classes)
    eligible = sizes >= min_reference_cells
    if not eligible.any():
        eligible[:] = True
    sibling = int(np.argmin(np.where(eligible, cross, np.inf)))
    return Placement(sibling, float(max(cross[sibling], min_branch_length)), cross)


def extend_module(module, name: str, placement: Placement) -> tuple[int, int]:
    """Split the tree of ``module`` for a new class and add its head, warm-started.

    Returns ``(leaf_branch_id, head_index)`` of the new class.
    """
    if module.architecture != "branched":
        raise ValueError("Only branched models can be extended (a flat model shares every weight).")
    old_tree = module.tree
    tree = old_tree.add_class(name, placement.sibling, placement.t)
    leaf = tree.leaf(tree.n_classes - 1)
    split = tree.branches[tree.branches[leaf].parent]
    head = copy.deepcopy(module.net.heads[split.head])  # the branch it leaves: a close start
    module.net.heads.append(head.to(module.shift.device))
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
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    seed: int = 0,
    progress: Callable | None = None,
) -> list[float]:
    """Train the heads ``heads`` alone on standardised cells ``x`` of classes ``labels``.

    Every other parameter is frozen for the run (``requires_grad`` restored after); times are
    stratified over ``t_range``; each row uses the branch of its class at its time (rows on
    frozen heads only condition the loss); Adam with a cosine decay; the heads end at their
    exponential moving average, as after full training.

    Returns
    -------
    The loss of every step.
    """
    params = [p for h in sorted(set(heads)) for p in module.net.heads[h].parameters()]
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    device = module.shift.device
    gen = torch.Generator(device=device).manual_seed(int(seed))
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, n_steps))
    ema = [p.detach().clone() for p in params] if ema_decay > 0 else None
    sde, n = module.sde, x.shape[0]
    t_lo, t_hi = t_range
    losses: list[float] = []
    steps = range(n_steps)
    if progress is not None:
        steps = progress(steps)
    was_training = module.training
    module.train()
    try:
        order = torch.randperm(n, generator=gen, device=device)
        pos = 0
        for k in steps:
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=gen, device=device), 0
            rows = order[pos : pos + batch_size]
            pos += batch_size
            x0, lab = x[rows], labels[rows]
            m = x0.shape[0]
            u = (
                torch.rand((), generator=gen, device=device) + torch.arange(m, device=device) / m
            ) % 1
            t = t_lo + (t_hi - t_lo) * u
            noise = torch.randn(x0.shape, generator=gen, device=device)
            xt = sde.alpha(t)[:, None] * x0 + sde.sigma(t)[:, None] * noise
            eps = module.predict_eps(xt, t, module.branch_of(lab, t), lab)
            loss = (eps - noise).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if ema is not None:
                decay = min(ema_decay, (2 + k) / (11 + k))
                with torch.no_grad():
                    torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if ema is not None:
            with torch.no_grad():
                for p, e in zip(params, ema, strict=True):
                    p.copy_(e)
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        module.train(was_training)
    return losses


def shared_heads(tree, label: int, t: float) -> list[int]:
    """Heads of the branches on class ``label``'s path from time ``t`` up (shared with others)."""
    return [tree.branches[b].head for b in tree.path(label) if tree.branches[b].t_start >= t]


def default_head_steps(n_cells: int, batch_size: int, max_epochs: int | None) -> int:
    """Optimiser steps of extension: ``max_epochs`` passes, or about 1,000 steps by default."""
    per_epoch = max(1, math.ceil(n_cells / batch_size))
    if max_epochs is None:
        return 1000
    return max(1, int(max_epochs) * per_epoch)
