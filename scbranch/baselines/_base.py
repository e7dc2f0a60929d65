"""The interface shared by the baseline generators."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import Key
from .._validation import check_obs_key
from .._versions import package_versions
from ..model._output import cell_counts, counts_as_dict

if TYPE_CHECKING:
    from ..model import BranchedDiffusion


class Baseline:
    """A generator fitted on labelled training cells; subclasses implement ``_sample``.

    Parameters
    ----------
    adata
        Training cells.
    labels_key
        Column of ``adata.obs`` with the cell types.
    min_cells_per_class
        Types with fewer training cells raise an error.

    Examples
    --------
    A baseline is a subclass with ``_sample``; see :class:`PerClassGaussian`:

    >>> import scbranch as sb
    >>> issubclass(sb.baselines.PerClassGaussian, sb.baselines.Baseline)
    True
    """

    #: short name recorded in ``uns['scbranch']['model']['architecture']``
    name = "baseline"

    def __init__(self, adata: AnnData, labels_key: str, min_cells_per_class: int = 3):
        if not isinstance(adata, AnnData):
            raise TypeError(f"`adata` must be an AnnData, got {type(adata).__name__}.")
        check_obs_key(adata, labels_key)
        self.labels_key = labels_key
        labels = adata.obs[labels_key]
        if isinstance(labels.dtype, pd.CategoricalDtype):
            classes = [str(c) for c in labels.cat.categories if (labels == c).any()]
        else:
            classes = sorted({str(v) for v in labels})
        self.classes: list[str] = classes
        self.labels_: np.ndarray = labels.astype(str).to_numpy()
        sizes = {c: int((self.labels_ == c).sum()) for c in classes}
        small = {c: n for c, n in sizes.items() if n < min_cells_per_class}
        if small:
            raise ValueError(
                f"Class(es) {small} of adata.obs[{labels_key!r}] have fewer than "
                f"{min_cells_per_class} cells; remove them or lower `min_cells_per_class`."
            )

    def _counts(self, n_cells: int | Mapping[str, int], labels: Sequence[str] | None) -> dict:
        n_cells = counts_as_dict(n_cells)
        if isinstance(n_cells, Mapping) and labels is not None:
            raise ValueError("Pass per-class counts as a dict OR `labels`, not both.")
        counts = cell_counts(n_cells, self.classes if labels is None else labels)
        unknown = [c for c in counts if c not in self.classes]
        if unknown:
            raise ValueError(f"Unknown cell type(s) {unknown}; the baseline knows {self.classes}.")
        if sum(counts.values()) == 0:
            raise ValueError("Nothing to generate: ask for at least one cell.")
        return {c: n for c, n in counts.items() if n > 0}

    def _sample(
        self, counts: dict[str, int], rng: np.random.Generator, seed: int, **options
    ) -> dict:
        """Cells in class order: ``{"X", "var_names", "obsm", "layers"}``."""
        raise NotImplementedError

    def _sample_latents(self, counts: dict[str, int], rng: np.random.Generator, seed: int) -> dict:
        """``{obsm key: latents}`` of the cells ``_sample`` makes, for a model to decode.

        Subclasses that can draw the latents alone override it (no decode thrown away).
        """
        return self._sample(counts, rng, seed).get("obsm") or {}

    def _check_options(self, options: Mapping) -> None:
        """Refuse options ``_sample`` does not take, naming those it does."""
        taken = list(inspect.signature(self._sample).parameters)[3:]  # after counts, rng, seed
        unknown = sorted(set(options) - set(taken))
        if unknown:
            hint = (
                " Counts and the negative binomial decoder are a model's: pass `decode_with="
                "model` to decode the sampled latents as that model decodes its cells."
                if {"counts", "batch"} & set(unknown)
                else ""
            )
            raise TypeError(
                f"{type(self).__name__}.generate() takes the option(s) {taken}, not "
                f"{unknown}.{hint}"
            )

    def generate(
        self,
        n_cells: int | Mapping[str, int] = 100,
        *,
        labels: str | Sequence[str] | None = None,
        seed: int | None = None,
        decode_with: BranchedDiffusion | None = None,
        **options,
    ) -> AnnData:
        """Generate cells of the fitted types as a new AnnData.

        Parameters
        ----------
        n_cells
            Cells per type (a whole number), or a dict ``{cell type: count}``.
        labels
            Type or types to generate when ``n_cells`` is an int (default: all).
        seed
            Random seed; `None` draws one (recorded in ``uns['scbranch']['params']``).
        decode_with
            A :class:`~scbranch.BranchedDiffusion` trained on the same latent
            (``obsm_key``) and types: the sampled latents are decoded by its space exactly
            as its generated cells are (the PCA models' negative binomial with class ratios,
            counts), so the baseline is compared with the model through the same decoder,
            as in docs/evaluation.md. ``options`` are then those of that decode:
            ``residual_noise`` (default ``"auto"``) and ``counts``.
        **options
            Options of the baseline (e.g. ``residual_noise`` of :class:`PerClassGaussian`);
            unknown ones raise a `TypeError` naming those it takes.

        Returns
        -------
        AnnData with ``obs[labels_key]``, ``obs['scbranch_generated']``, expression in ``.X``
        (and whatever representation the baseline samples in ``.obsm`` / ``.layers``).

        Examples
        --------
        >>> gen = baseline.generate(n_cells=200, seed=0)  # doctest: +SKIP
        >>> gen = baseline.generate(200, seed=0, decode_with=model, counts=True)  # doctest: +SKIP
        """
        counts = self._counts(n_cells, labels)
        seed = int(np.random.default_rng().integers(2**31)) if seed is None else int(seed)
        if decode_with is None:
            self._check_options(options)
            out = self._sample(counts, np.random.default_rng(seed), seed, **options)
        else:  # the latents only; the model's space decodes them
            latents = self._sample_latents(counts, np.random.default_rng(seed), seed)
            out = _decode_with(decode_with, latents, counts, seed, **options)
        codes = np.repeat([self.classes.index(c) for c in counts], list(counts.values()))
        obs = pd.DataFrame(
            {
                self.labels_key: pd.Categorical.from_codes(codes, categories=self.classes),
                Key.obs.GENERATED: True,
                **out.get("obs", {}),
            },
            index=[f"gen{i}" for i in range(len(codes))],
        )
        var = pd.DataFrame(index=np.asarray(out["var_names"]).astype(str))
        adata = AnnData(X=out["X"], obs=obs, var=var, obsm=out.get("obsm") or None)
        for k, v in (out.get("layers") or {}).items():
            adata.layers[k] = v
        adata.uns[Key.uns.GENERATED] = {
            "params": {
                "labels": np.array(list(counts), dtype=object),
                "n_cells": np.array(list(counts.values()), dtype=np.int64),
                "seed": seed,
                **out.get("params", options),
            },
            "model": {"architecture": self.name, "labels_key": self.labels_key},
            # a seed reproduces these cells only with the same versions (docs/evaluation.md)
            "versions": package_versions(),
        }
        return adata


def _decode_with(
    model: BranchedDiffusion,
    latents: dict,
    requested: dict[str, int],
    seed: int,
    *,
    residual_noise: bool | str = "auto",
    counts: bool | None = None,
    **unknown,
) -> dict:
    """``latents`` (``{obsm key: array}``) decoded by ``model``'s space as its cells are."""
    from ..model._spaces import auto_noise

    if unknown:
        raise TypeError(
            f"With decode_with, generate() takes residual_noise and counts, not {sorted(unknown)}."
        )
    if len(latents) != 1:
        raise ValueError("This baseline samples no single latent a model could decode.")
    (key, z), n_dims = next(iter(latents.items())), int(model.module.n_input)
    if z.shape[1] != n_dims or key != model.space.obsm_key:
        raise ValueError(
            f"The baseline samples obsm[{key!r}] ({z.shape[1]} dimensions), the model diffuses "
            f"obsm[{model.space.obsm_key!r}] ({n_dims}): fit the baseline on the model's latent "
            f"(obsm_key={model.space.obsm_key!r})."
        )
    missing = [c for c in requested if c not in model.classes]
    if missing:
        raise ValueError(f"The model does not know the type(s) {missing}: {model.classes}.")
    codes = np.repeat([model.classes.index(c) for c in requested], list(requested.values()))
    noise = auto_noise(model.space, residual_noise, trajectories=False)
    options = model.space.resolve_options(counts=counts, batch=None, residual_noise=noise)
    decoded = model.space.decode(np.asarray(z, dtype=np.float32), codes, options, seed)
    return {
        "X": decoded.X,
        "var_names": decoded.var_names,
        "obsm": latents,
        "layers": dict(decoded.layers or {}),
        "obs": dict(decoded.obs or {}),
        "params": {
            "decoded_with": model.space.describe(),
            "residual_noise": str(options["residual_noise"]),
            "counts": bool(options["counts"]),
        },
    }
