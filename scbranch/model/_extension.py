"""Class extension (docs/method.md): new cell types added to a trained model, old ones kept.

:meth:`~scbranch.BranchedDiffusion.add_classes` runs here, on the model's public state: its
module (placement and the new head, ``module/_extension.py``), its space (the new cells and
what the space keeps per type), and the persisted attributes (``registry_``,
``reference_samples_``, ``class_counts_``, ``extensions_``, ``hierarchy_record_``).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData
from scvi.data import AnnDataManager

from .._constants import REGISTRY_KEYS
from .._utils import progress
from .._validation import check_obs_key, check_whole_number, to_dense
from ..module._discovery import DiscoveryOptions, subsample_per_class
from ..module._extension import EXTENSION_LR, PlacementRequest, add_class_head
from ..module._recipe import TrainingRecipe
from ._calibration import forget_calibrations

if TYPE_CHECKING:
    from ._model import BranchedDiffusion

logger = logging.getLogger(__name__)

#: standardised cells kept per class for placing classes added later
REFERENCE_CELLS = 200


def reference_sample(x, labels: np.ndarray, shift, scale: float, n_classes: int) -> dict:
    """Up to :data:`REFERENCE_CELLS` seeded, standardised cells of every class."""
    keep = subsample_per_class(labels, n_classes, REFERENCE_CELLS, seed=0)
    rows = to_dense(x[keep])
    return {
        "x": ((rows - shift) / scale).astype(np.float32),
        "labels": labels[keep].astype(np.int64),
    }


def add_classes(
    model: BranchedDiffusion,  # the model, when called as ``model.add_classes(...)``
    adata: AnnData,
    labels: Sequence[str] | None = None,
    *,
    labels_key: str | None = None,
    joins: Mapping[str, str | tuple[str, float]] | None = None,
    max_epochs: int | None = None,
    batch_size: int = 64,
    lr: float | None = None,
    ema_decay: float = TrainingRecipe.ema_decay,
    min_cells: int = 10,
    fine_tune_shared: bool = False,
    own_head: bool | str | None = None,
    seed: int = 0,
    progress_bar: bool = True,
) -> BranchedDiffusion:
    """Add new cell types without retraining and without changing the old ones.

    For each new type, in order: its crossover times against the model's stored reference
    cells of every known type place it on the tree (it joins the type it becomes
    indistinguishable from first, at that time, by the crossover rule and the options the
    tree was discovered with); the branch it joins is split there, keeping its head on both
    halves; a new head (for the conditioned network: a new embedding and adapter row and,
    with ``own_head``, head blocks or an output layer of its own), warm-started from that
    branch's, is trained
    on the new cells only, with t below the branch point, by the training recipe of
    :meth:`train` (the same time distribution, loss, optimiser, schedule and EMA); every
    other parameter stays frozen. Old types therefore use exactly the same parameters at
    every time: with the same seed and the same requested types, :meth:`generate` returns
    bit-identical cells before and after (with the default ``share=True``).

    Parameters
    ----------
    adata
        Cells of the new types, in the model's representation: ``obsm[obsm_key]`` in the
        same latent space (e.g. projected on the same PCA), the same genes for expression
        models, or the scVI model's genes and counts for scVI models. Cells of other types
        are ignored.
    labels
        New types to add (default: every type in ``adata`` the model does not know).
    labels_key
        Column of ``adata.obs`` with the types (default: the model's).
    joins
        Where new types join the tree, where you know better than their crossover times
        (types not listed are placed by them). ``{new: known}``: the new type joins the cell
        type ``known``, or the named group ``known`` of the tree (``model.tree.node_names``:
        the groups of a given ``hierarchy``, clades you named), at its crossover time
        against it (for a group: against the group's type it crosses first, moved into the
        group's branch if it falls outside); ``{new: (known, t)}``: at branch time ``t``
        (for a group, within its branch). The record says how each type was placed
        (``model.extensions_[i]["placed_by"]``, with its crossover time).
    max_epochs
        Passes over a new type's cells (default: :meth:`train`'s rule for them, about 100
        epochs, with extension's own floor: within 500-16,000 optimiser steps).
    batch_size, ema_decay
        Optimiser settings of the new head (as in :meth:`train`).
    lr
        Learning rate of the new branch's weights; `None` takes the architecture's default
        (1e-3 for a new head, 3e-2 for a new embedding and adapter row of the conditioned
        network, which starts as a copy of its sibling's and must move further:
        ``docs/benchmarks/extension.md``); head blocks or an output layer of a conditioned
        branch's own train at 1e-3, as a new head does.
    own_head
        Conditioned network only: what each new type gets of its own besides its embedding
        and adapter rows. ``"blocks"`` (or `True`; `None`, the default, gives them): a copy
        of the head blocks and output layer. ``"readout"``: a copy of the output layer only,
        reading the shared blocks (width x dimensions parameters: 7,700 at 30 PCs against
        0.50 M for the blocks). `False`: nothing, the network's size stays independent of
        the number of types. A new type unlike every known one, outside the latent the model
        was fitted in, kept its type in 0.51 of its cells with blocks, 0.48 with a readout
        and 0.35 with nothing (decoder's ceiling 0.59; docs/benchmarks/extension_outside.md);
        inside it a readout ties the blocks on MMD and trails them a little in W2
        (docs/method.md): the choice for an atlas that will add many types. A branched
        model's new type always has its own head.
    min_cells
        Types with fewer cells raise an error (at least 2: a type is placed on the tree by
        comparing pairs of its cells).
    fine_tune_shared
        After the new head, also fine-tune, for as many steps again, the heads of the
        branches above the new branch point (shared with old types), on the new cells plus
        a replay of the stored reference cells of every type. Off by default: it gives up
        the zero-forgetting guarantee (the old types using those heads change) for a
        possibly better fit of the new type's upper path (``benchmarks/extension.py``).
    seed
        Seed of placement noise and training.
    progress_bar
        Show a progress bar over the steps.

    Returns
    -------
    The model itself (extended in place), for chaining. Each type is added whole or not at
    all: if its placement or training fails (or is interrupted), the model is as before it.

    Notes
    -----
    What stays exactly as it was for the old types: :meth:`generate`, :meth:`hybrids`,
    :meth:`transmute` and trajectories (the same parameters at every time), clean-cell
    estimates included: their denoiser takes each branch's Gaussian from the classes that
    trained its head, so a new type passing through the branches above its branch point
    leaves them as they were (``model.tree.branches[b].trained``; docs/method.md).
    A type that joins inside a named group of the tree (e.g. of a given ``hierarchy``)
    becomes part of it: ``generate({group: n})`` then draws some of its cells (logged).

    ``model.adata`` keeps the cells the model was trained on, without the new types, so
    :meth:`train` afterwards is refused: it would move the weights the new types use
    without showing them. To train every type together, save the model and load it with
    cells of every type, ``BranchedDiffusion.load(dir, adata=all_cells)``, then train.

    Examples
    --------
    >>> model.add_classes(adata_new, labels=["Megakaryocyte"], max_epochs=100)  # doctest: +SKIP
    >>> model.generate(n_cells={"Megakaryocyte": 200}, seed=0)  # doctest: +SKIP

    Where a type joins, when you know better than its crossover times:

    >>> model.add_classes(adata_new, joins={"Dendritic": "Myeloid"})  # doctest: +SKIP
    """
    if not model.module.follows_tree:
        raise ValueError(
            "A flat model has no branches to extend: every weight is shared by all types. "
            "Retrain it on all types, or use architecture='conditioned' (the default) or "
            "'branched'."
        )
    own_head = resolve_own_head(own_head, model.module.architecture == "conditioned")
    check_extension_budget(max_epochs, batch_size, ema_decay)
    lr = EXTENSION_LR[model.module.architecture] if lr is None else float(lr)
    if not np.isfinite(lr) or lr <= 0:
        raise ValueError(
            f"lr must be a positive number, got {lr!r}; leave lr=None for the architecture's "
            f"default ({EXTENSION_LR[model.module.architecture]:g})."
        )
    if model.reference_samples_ is None:
        raise ValueError(
            "This model has no reference cells to place new types against (saved by an "
            "older scbranch); build and train it again to extend it."
        )
    labels_key = labels_key or model.labels_key
    labels = new_labels(model, adata, labels, labels_key)
    joins = check_joins(model, labels, joins)
    data = new_class_data(model, adata, labels_key, labels, min_cells)
    record = model.hierarchy_record_ or {}
    options = DiscoveryOptions.from_params(record.get("params"), seed=seed)
    recipe = TrainingRecipe(lr=lr, ema_decay=ema_decay)
    for name in labels:
        t0 = time.perf_counter()
        x, extras = data[name]
        z = (x - model.module.shift.cpu().numpy()) / float(model.module.scale)
        # all or nothing per type: add_class_head extends the module before it trains, so a
        # failure (or Ctrl-C) half-way left a tree of more types than the model knew, which
        # a later save could not load
        module_before = copy.deepcopy(model.module)
        try:
            record = add_class_head(
                model.module,
                model.reference_samples_,
                z,
                name,
                options,
                class_names=[*model.classes, name],
                max_epochs=max_epochs,
                batch_size=batch_size,
                recipe=recipe,
                fine_tune_shared=fine_tune_shared,
                own_head=own_head,
                request=placement_request(model.tree, joins.get(name)),
                seed=seed,
                progress=progress(f"Training {name}", progress_bar),
            )
        except BaseException:
            model.module = module_before
            raise
        record["joins"] = model.classes[record["joins"]]
        register_class(model, name, z, extras)
        model.extensions_.append({**record, "seconds": time.perf_counter() - t0})
        logger.info(
            "Added %r: joins %r at t=%.3f (%d cells, %d steps, %.1f s).",
            name,
            record["joins"],
            record["t"],
            len(z),
            record["n_steps"],
            model.extensions_[-1]["seconds"],
        )
        gained = sorted(g for g, types in named_groups(model).items() if name in types)
        if gained:  # generate({group: n}) now draws some of its cells from the new type
            logger.info(
                "%r joined inside the named group(s) %s, which include it now.", name, gained
            )
    model.module.eval()
    return model


def check_extension_budget(max_epochs, batch_size, ema_decay) -> None:
    """Refuse extension settings that would train nothing or fail half-way."""
    if max_epochs is not None:  # None: the default budget
        check_whole_number("max_epochs", max_epochs)
    check_whole_number("batch_size", batch_size)
    if isinstance(ema_decay, bool) or not 0.0 <= float(ema_decay) < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1) (0 disables the EMA), got {ema_decay!r}.")


def named_groups(model) -> dict[str, set[str]]:
    """The tree's named groups, each with the names of the types below it."""
    classes = list(model.classes)
    return {
        name: {classes[c] for c in model.tree.branches[branch].classes}
        for name, branch in model.tree.node_names.items()
    }


def resolve_own_head(own_head: bool | str | None, conditioned: bool) -> bool | str:
    """What a new type gets of its own: ``"blocks"``, ``"readout"`` or `False` (none)."""
    if not (own_head is None or isinstance(own_head, bool) or own_head in ("blocks", "readout")):
        raise ValueError(
            f"own_head must be one of None, True, False, 'blocks' or 'readout', got {own_head!r}."
        )
    if own_head in (False, "readout") and not conditioned:
        raise ValueError(
            f"own_head={own_head!r} applies to the conditioned network only: a branched model's "
            "new type always gets a head of its own. Leave own_head=None."
        )
    if not conditioned or own_head is False:
        return False  # (a branched model's head is its own already)
    return "readout" if own_head == "readout" else "blocks"


def new_labels(model: BranchedDiffusion, adata: AnnData, labels, labels_key: str) -> list[str]:
    """The new types asked for, checked against ``adata`` and the model."""
    check_obs_key(adata, labels_key)
    present = [str(c) for c in pd.unique(adata.obs[labels_key].astype(str))]
    if labels is None:
        labels = [c for c in present if c not in model.classes]
        if not labels:
            raise ValueError(
                f"adata.obs[{labels_key!r}] holds no type the model does not know already; "
                "nothing to add."
            )
    labels = [str(c) for c in ([labels] if isinstance(labels, str) else labels)]
    if not labels:
        raise ValueError("labels is empty: nothing to add (None adds every type the model lacks).")
    known = [c for c in labels if c in model.classes]
    if known:
        raise ValueError(
            f"The model knows {known} already; add_classes adds new types only. Rename "
            "them, or retrain to change existing types."
        )
    groups = [c for c in labels if c in model.tree.node_names]
    if groups:
        # generate({name: n}) asks for a group by its node's name; a type of the same name
        # would silently take the name over
        raise ValueError(
            f"{groups} name(s) a group of types in the model's tree (generate({{name: n}}) "
            "draws from the whole group); rename the new type(s), e.g. with "
            "`adata.obs[labels_key].cat.rename_categories(...)`."
        )
    missing = [c for c in labels if c not in present]
    if missing:
        raise KeyError(f"No cells labelled {missing} in adata.obs[{labels_key!r}].")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels lists a type twice: {labels}.")
    return labels


def check_joins(model: BranchedDiffusion, labels: list[str], joins) -> dict:
    """``joins`` of :func:`add_classes` checked before anything changes: ``{new: (known, t)}``."""
    if joins is None:
        return {}
    if not isinstance(joins, Mapping):
        raise TypeError(
            f"joins must map new types to where they join, e.g. {{'{labels[0]}': "
            f"'{model.classes[0]}'}}; got {type(joins).__name__}."
        )
    unknown = [k for k in joins if k not in labels]
    if unknown:
        raise KeyError(f"joins names {unknown}, which are not among the types added: {labels}.")
    known = [*model.classes, *model.tree.node_names]
    checked = {}
    for new, where in joins.items():
        if isinstance(where, str):
            name, t = where, None
        elif isinstance(where, Sequence) and len(where) == 2 and isinstance(where[0], str):
            name, t = where
        else:
            raise TypeError(
                f"joins[{new!r}] must name a cell type or a group, or be (name, branch time); "
                f"got {where!r}."
            )
        # a type added earlier in the same call is known by the time this one is placed
        if name not in known and name not in labels[: labels.index(new)]:
            raise KeyError(
                f"joins[{new!r}] = {name!r} is neither a cell type of the model {model.classes} "
                f"nor a named group of its tree {sorted(model.tree.node_names)}."
            )
        if t is not None and (isinstance(t, bool) or not isinstance(t, Real) or not 0 < t < 1):
            raise ValueError(
                f"joins[{new!r}] gives the branch time {t!r}; it must be a number in (0, 1)."
            )
        checked[new] = (str(name), None if t is None else float(t))
        if name in model.tree.node_names:  # a time outside the group's branch, refused now
            placement_request(model.tree, checked[new])
    return checked


def placement_request(tree, where: tuple[str, float | None] | None) -> PlacementRequest | None:
    """Where ``add_classes(joins=...)`` puts a type, on the tree as it is when it is added."""
    if where is None:
        return None
    name, t = where
    if name in tree.classes:
        return PlacementRequest(name, (tree.classes.index(name),), t)
    branch = tree.branches[tree.node(name)]
    window = (branch.t_start, branch.t_end)
    if t is not None and not window[0] < t < window[1]:
        raise ValueError(
            f"The group {name!r} spans branch times {window[0]:.3f}-{window[1]:.3f}; a type "
            f"joining it at t={t} would join another branch. Give a time in between, or no "
            "time (its crossover time, moved into the group's branch)."
        )
    return PlacementRequest(name, tuple(branch.classes), t, window)


def new_class_data(
    model: BranchedDiffusion, adata: AnnData, labels_key: str, labels: list[str], min_cells: int
) -> dict:
    """Per new type: its cells in the model's data space, and what its space keeps."""
    # a type's similarity curve (its place on the tree) compares pairs of its cells
    why = "a new type is placed on the tree by comparing pairs of its cells."
    check_whole_number("min_cells", min_cells, 2, why)
    names = adata.obs[labels_key].astype(str).to_numpy()
    small = {c: int((names == c).sum()) for c in labels if (names == c).sum() < min_cells}
    if small:
        listing = ", ".join(f"{c!r} ({n} cells)" for c, n in small.items())
        raise ValueError(
            f"New type(s) {listing} have fewer than min_cells={min_cells} cells: too few to "
            "place on the tree and train a head. Collect more cells or lower `min_cells`."
        )
    keep = np.isin(names, labels)
    x, extras = model.space.class_data(adata[keep], "the new cells")
    sub_names = names[keep]
    return {
        c: (x[sub_names == c], {k: v[sub_names == c] for k, v in extras.items()}) for c in labels
    }


def register_class(model: BranchedDiffusion, name: str, z: np.ndarray, extras: dict) -> None:
    """Make a trained new class known everywhere generate/save/load look."""
    code = len(model.classes)
    # a private copy: the registry of the training AnnData (shared with its manager)
    # keeps describing those data
    model.registry_ = copy.deepcopy(model.registry_)
    labels_field = model.registry_["field_registries"][REGISTRY_KEYS.LABELS_KEY]
    state = labels_field["state_registry"]
    state["categorical_mapping"] = np.append(
        np.asarray(state["categorical_mapping"], dtype=object), name
    )
    labels_field.setdefault("summary_stats", {})["n_labels"] = code + 1
    model.summary_stats = AnnDataManager._get_summary_stats_from_registry(model.registry_)
    keep = np.random.default_rng(0).permutation(len(z))[:REFERENCE_CELLS]
    ref = model.reference_samples_
    model.reference_samples_ = {
        "x": np.concatenate([ref["x"], z[np.sort(keep)].astype(np.float32)]),
        "labels": np.concatenate([ref["labels"], np.full(len(keep), code, dtype=np.int64)]),
    }
    model.class_counts_ = np.append(model.class_counts_, len(z))
    if getattr(model, "class_variances_", None) is not None:  # the spread its cells get
        # z is standardised (as the reference cells are); the variances are in data units
        var = (
            np.asarray(to_dense(z), dtype=np.float64).var(0, ddof=1)
            * float(model.module.scale) ** 2
        )
        model.class_variances_ = np.vstack([model.class_variances_, var])
    forget_calibrations(model)  # the tree (and its step grid) changed
    model.space.add_class(extras)
    # what load() rebuilds the module from
    model.init_params_["non_kwargs"]["hierarchy"] = model.tree.to_dict()
    model.hierarchy_record_ = {**(model.hierarchy_record_ or {}), "tree": model.tree.to_dict()}
    model.refresh_summary()
