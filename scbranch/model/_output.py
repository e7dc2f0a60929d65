"""The AnnData objects a model returns: generated cells and trajectories (scverse conventions).

Both are NEW objects, never the user's: ``obs[labels_key]`` categorical over every type the
model knows (training order), ``obs['scbranch_generated']``, the diffused coordinates in
``obsm[space.output_key]``, what the space decodes (``.X``, layers, obs columns), and
provenance in ``uns['scbranch']`` (parameters, model summary, forward process, tree).
Everything here reads only the model's public attributes and its space.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import Key
from .._utils import as_names
from .._versions import package_versions

if TYPE_CHECKING:
    from ._model import BranchedDiffusion

#: keys of an extension record kept in ``uns['scbranch']['model']['extensions']``, with what
#: models saved before a key was recorded write for it (NaN: unknown; no own head parts then)
_EXTENSION_FIELDS = {
    "label": np.nan,
    "joins": np.nan,
    "t": np.nan,
    "crossover": np.nan,  # its crossover time against the type it joins
    "placed_by": "crossover",  # or the type or group add_classes(joins=...) named
    "n_cells": np.nan,
    "n_steps": np.nan,
    "lr": np.nan,
    "own_head": False,
    "own_readout": False,
}


def cell_count(value, name: str) -> int:
    """``value`` as a number of cells: a whole, non-negative number (``2.5`` or `True` refused).

    ``int()`` alone would read ``2.9`` as 2 and `True` as 1 without a word.
    """
    whole = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and float(value).is_integer()
    )
    if isinstance(value, bool | np.bool_) or not whole:
        raise ValueError(
            f"Number of cells for {name} must be a whole number, got {value!r}; round it "
            "first (e.g. `round(fraction * n)`)."
        )
    if value < 0:
        raise ValueError(f"Number of cells for {name} must be non-negative, got {value!r}.")
    return int(value)


def cell_counts(n_cells, names: Sequence[str]) -> dict[str, int]:
    """``{name: cells}`` from ``generate``'s ``n_cells``: a dict, or one count for every name.

    Callers pass a Series of counts through :func:`counts_as_dict` first (their own checks
    need the dict).
    """
    if isinstance(n_cells, Mapping):
        return {str(k): cell_count(v, repr(str(k))) for k, v in n_cells.items()}
    if isinstance(n_cells, str) or np.ndim(n_cells) > 0:
        raise ValueError(
            f"n_cells is a number of cells for every type, or a dict {{type: cells}}; got "
            f"{n_cells!r}. To generate some types only, name them in `labels=` "
            "(`generate(100, labels=['B', 'NK'])`) or give each its number in a dict."
        )
    return {str(c): cell_count(n_cells, "every type") for c in as_names(names, "labels")}


def counts_as_dict(n_cells):
    """A pandas Series of counts (``obs[key].value_counts()``) as a dict; anything else as is."""
    return n_cells.to_dict() if isinstance(n_cells, pd.Series) else n_cells


def warn_if_untrained(model: BranchedDiffusion, action: str) -> None:
    """Warn (as scvi-tools does) when ``action`` runs on a network that was never trained."""
    if not model.is_trained:
        warnings.warn(
            f"{action} with an untrained model: the cells come from random weights. Call "
            "`model.train()` first (or load a trained model with `BranchedDiffusion.load`).",
            UserWarning,
            stacklevel=4,  # the user's line: above the method and torch.inference_mode's wrapper
        )


def requested_cells(
    tree,
    n_cells: int | Mapping[str, int],
    labels: Sequence[str] | None,
    *,
    class_counts: np.ndarray | None = None,
    node_weights: str = "size",
    rng: np.random.Generator | None = None,
) -> tuple[dict[int, int], dict[int, list[tuple[str, int]]]]:
    """Cells to generate per class index, and for each class which request they answer.

    ``n_cells`` is an int (for every type in ``labels``) or a dict whose keys are cell types
    or named nodes of the tree; a node's cells are spread over the types below it, drawn from
    a multinomial with weights proportional to the types' training sizes (``node_weights=
    "size"``) or equal (``"uniform"``).
    """
    if node_weights not in ("size", "uniform"):
        raise ValueError(f"node_weights must be 'size' or 'uniform', got {node_weights!r}.")
    n_cells = counts_as_dict(n_cells)
    if isinstance(n_cells, Mapping) and labels is not None:
        raise ValueError("Pass per-class counts as a dict OR `labels`, not both.")
    asked = cell_counts(n_cells, tree.classes if labels is None else labels)
    if sum(asked.values()) == 0:
        raise ValueError("Nothing to generate: ask for at least one cell.")
    requested: dict[int, int] = {}
    origins: dict[int, list[tuple[str, int]]] = {}
    for name, n in asked.items():
        if name in tree.classes:
            members = [tree.classes.index(name)]
            split = [n]
        elif name in tree.node_names:
            members = tree.expand(name)
            sizes = (
                np.ones(len(members))
                if class_counts is None
                else np.asarray(class_counts, dtype=np.float64)[members]
            )
            weights = sizes if node_weights == "size" else np.ones(len(members))
            rng = np.random.default_rng() if rng is None else rng
            split = rng.multinomial(n, weights / weights.sum()).tolist()
        elif tree.node_names:  # generate takes groups too: name them with the types
            raise KeyError(
                f"Unknown label {name!r}; the model knows the cell types {tree.classes} and "
                f"the groups {sorted(tree.node_names)}. Check the spelling, or add new classes "
                "with `model.add_classes`."
            )
        else:
            tree.class_index([name])  # the error that names what the tree knows
        for c, k in zip(members, split, strict=True):
            requested[c] = requested.get(c, 0) + int(k)
            origins.setdefault(c, []).append((name, int(k)))
    return requested, origins


def requested_nodes(codes: np.ndarray, origins: dict[int, list[tuple[str, int]]]) -> np.ndarray:
    """For each generated cell (classes in ``codes`` order), the name it was asked for."""
    out = np.empty(len(codes), dtype=object)
    for c, parts in origins.items():
        rows = np.flatnonzero(codes == c)
        names = np.repeat([p[0] for p in parts], [p[1] for p in parts])
        out[rows] = names[: len(rows)]
    return out


def generation_params(
    classes: list[str], requested: dict[int, int], res, options: Mapping, **settings
) -> dict:
    """``uns['scbranch']['params']`` of a generate call: what was asked for and what it cost."""
    return {
        # arrays, not a dict keyed by label: labels like "CD4+/CD25" are not valid h5 keys
        "labels": np.array([classes[c] for c in requested], dtype=object),
        "n_cells": np.array(list(requested.values()), dtype=np.int64),
        **settings,
        "residual_noise": options["residual_noise"],
        "counts": options["counts"],
        "batch": options["batch"] or "",
        "n_network_calls": res.n_network_calls,
        "n_row_evaluations": res.n_row_evaluations,
    }


#: bytes of the sampler's working memory per diffused value (states, updates, noise, outputs)
_SAMPLER_BYTES = 4 * 8
#: bytes of a cell's annotation (obs: name, type, a few values), kept in memory until the file
#: written to is complete (measured: ~90 bytes, ~125 while the blocks' obs are concatenated;
#: rounded up for the columns some spaces add)
_OBS_BYTES = 256


def generation_bytes(space, n_cells: int, options: Mapping) -> int:
    """Estimated peak memory of generating ``n_cells`` cells, in bytes."""
    return int(n_cells) * (space.n_input * _SAMPLER_BYTES + space.bytes_per_cell(options))


def check_memory(
    space,
    n_cells: int,
    options: Mapping,
    *,
    available: int | None = None,
    block_rows: int | None = None,
) -> None:
    """Refuse a request that cannot fit in memory, with the figure and what to do instead.

    ``block_rows``: the cells are written to disk in blocks of at most this many, so only one
    block (and every cell's annotation) must fit.
    """
    import psutil

    n_cells = int(n_cells)
    available = psutil.virtual_memory().available if available is None else int(available)
    if block_rows is None:
        need = generation_bytes(space, n_cells, options)
    else:
        need = generation_bytes(space, min(n_cells, int(block_rows)), options)
        need += n_cells * _OBS_BYTES
    if need <= 0.9 * available:
        return
    if block_rows is None:
        per_cell = need / max(n_cells, 1)
        fits = int(0.9 * available / max(per_cell, 1))
        raise ValueError(
            f"Generating {n_cells:,} cells needs about {need / 2**30:.1f} GiB of memory and "
            f"{available / 2**30:.1f} GiB are available. Ask for fewer cells (about "
            f"{fits:,} fit), write them to disk with `out=` (memory then holds one block of "
            "cells), or generate without counts; `batch_size` limits only the network's "
            "passes, not the output."
        )
    block = generation_bytes(space, min(n_cells, int(block_rows)), options)
    fits = int(max(0.9 * available - block, 0) / _OBS_BYTES)
    raise ValueError(
        f"Writing {n_cells:,} cells to disk needs about {need / 2**30:.1f} GiB of memory (one "
        f"block of {min(n_cells, int(block_rows)):,} cells and every cell's annotation, which "
        f"is written last) and {available / 2**30:.1f} GiB are available. Ask for fewer cells "
        f"(about {fits:,} fit) and generate in several calls with different seeds, or use a "
        "smaller `block_size`."
    )


def uns_record(model: BranchedDiffusion, params: dict, decoded: bool) -> dict:
    """``uns['scbranch']`` of an AnnData the model made: params, model summary, tree."""
    extensions = model.extensions_
    return {
        "params": params,
        "model": {
            "architecture": model.module.architecture,
            "labels_key": model.labels_key,
            **model.space.record(decoded),
            # classes added by add_classes, in order (arrays: h5ad-safe)
            **(
                {
                    "extensions": {
                        k: np.asarray([e.get(k, missing) for e in extensions])
                        for k, missing in _EXTENSION_FIELDS.items()
                    }
                }
                if extensions
                else {}
            ),
            "summary": model.summary_string,
            **model.module.sde.to_dict(),
        },
        "hierarchy": model.tree.to_dict(),
        # a seed reproduces these cells only with the same versions (docs/evaluation.md)
        "versions": package_versions(),
    }


def keep_layers(space, options: Mapping, layers: Sequence[str] | None) -> Mapping:
    """``options`` with the layers a generate call keeps (``layers=``), checked by name."""
    if layers is None:
        return options
    made = space.layers_made(options)
    unknown = sorted(set(layers) - set(made))
    if unknown:
        raise ValueError(
            f"layers={list(layers)!r}: this model makes no layer {unknown} with these options; "
            f"it makes {made}."
        )
    return {**options, "layers": list(layers)}


def generated_block(
    model: BranchedDiffusion,
    z: np.ndarray,
    codes: np.ndarray,
    options: Mapping,
    seed: int,
    *,
    start: int = 0,
) -> AnnData:
    """Cells ``gen{start}``, ... of coordinates ``z`` and classes ``codes``, decoded (no ``uns``).

    ``options`` are the decoding options (``counts``, ``batch``, ``residual_noise``) and
    ``seed`` the seed of the decoder's random parts.
    """
    bad = int((~np.isfinite(z)).any(axis=1).sum()) if len(z) else 0
    if bad:  # NaN cells decode to NaN genes and counts without a word otherwise
        raise RuntimeError(
            f"The model made {bad} of {len(z)} cells with non-finite values (NaN or inf): its "
            "weights are damaged or its training diverged (see `model.history['train_loss']`). "
            "Retrain it (a lower `lr=`), or load an intact copy."
        )
    decoded = model.space.decode(z, codes, options, int(seed))
    if options.get("layers") is not None:  # generate(layers=...): only the layers asked for
        decoded.layers = {k: v for k, v in decoded.layers.items() if k in options["layers"]}
    obs = pd.DataFrame(
        {
            model.labels_key: pd.Categorical.from_codes(codes, categories=model.classes),
            Key.obs.GENERATED: True,
            **decoded.obs,
        },
        index=[f"gen{i}" for i in range(start, start + len(z))],
    )
    x = decoded.X
    var = None if x is None else pd.DataFrame(index=decoded.var_names)
    key = model.space.output_key
    obsm = {key: z} if key is not None else None
    return AnnData(X=x, obs=obs, var=var, obsm=obsm, layers=decoded.layers or None)


def generated_anndata(
    model: BranchedDiffusion, z: np.ndarray, codes: np.ndarray, params: dict
) -> AnnData:
    """Generated cells: coordinates ``z`` of classes ``codes``, decoded by the model's space."""
    adata = generated_block(model, z, codes, params, int(params.get("seed", 0)))
    adata.uns[Key.uns.GENERATED] = uns_record(model, params, adata.X is not None)
    return adata


def trajectory_anndata(
    model: BranchedDiffusion,
    states: np.ndarray,
    estimates: np.ndarray,
    obs: pd.DataFrame,
    params: dict,
) -> AnnData:
    """Trajectories: one row per (cell, checkpoint) (docs/api.md, 'Trajectory AnnData').

    ``obsm['scbranch_state']`` holds the noisy states; the model's clean estimates go to the
    space's ``obsm`` key and, decoded deterministically, to ``.X``.
    """
    # the batch generate(batch=) or transmute(batch=) resolved (scVI spaces with batches)
    batch = {"batch": params["batch"]} if params.get("batch") else {}
    x = model.space.decode_estimates(estimates, **batch)
    if x is not None:  # e.g. scVI: the one library size (and batch) every row is decoded at
        obs = obs.copy()
        for column, value in model.space.estimate_obs(**batch).items():
            obs[column] = value.repeat(len(obs)) if isinstance(value, pd.Categorical) else value
    obsm = {Key.obsm.STATE: states}
    key = model.space.output_key
    if key is not None:
        obsm[key] = estimates
    var_names = model.space.var_names
    var = None if x is None else pd.DataFrame(index=pd.Index(var_names).astype(str))
    adata = AnnData(X=x, obs=obs, var=var, obsm=obsm)
    adata.uns[Key.uns.GENERATED] = uns_record(model, params, x is not None)
    return adata
