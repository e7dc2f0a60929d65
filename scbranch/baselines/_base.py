"""The interface shared by the baseline generators."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import Key
from .._validation import check_obs_key


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
        if isinstance(n_cells, Mapping):
            if labels is not None:
                raise ValueError("Pass per-class counts as a dict OR `labels`, not both.")
            counts = {str(k): int(v) for k, v in n_cells.items()}
        else:
            counts = {c: int(n_cells) for c in (self.classes if labels is None else labels)}
        unknown = [c for c in counts if c not in self.classes]
        if unknown:
            raise ValueError(f"Unknown cell type(s) {unknown}; the baseline knows {self.classes}.")
        if any(n < 0 for n in counts.values()) or sum(counts.values()) == 0:
            raise ValueError("Cell counts must be non-negative and ask for at least one cell.")
        return {c: n for c, n in counts.items() if n > 0}

    def _sample(
        self, counts: dict[str, int], rng: np.random.Generator, seed: int, **options
    ) -> dict:
        """Cells in class order: ``{"X", "var_names", "obsm", "layers"}``."""
        raise NotImplementedError

    def generate(
        self,
        n_cells: int | Mapping[str, int] = 100,
        *,
        labels: Sequence[str] | None = None,
        seed: int | None = None,
        **options,
    ) -> AnnData:
        """Generate cells of the fitted types as a new AnnData.

        Parameters
        ----------
        n_cells
            Cells per type, or a dict ``{cell type: count}``.
        labels
            Types to generate when ``n_cells`` is an int (default: all).
        seed
            Random seed; `None` draws one (recorded in ``uns['scbranch']['params']``).
        **options
            Options of the baseline (e.g. ``residual_noise`` of :class:`PerClassGaussian`).

        Returns
        -------
        AnnData with ``obs[labels_key]``, ``obs['scbranch_generated']``, expression in ``.X``
        (and whatever representation the baseline samples in ``.obsm`` / ``.layers``).

        Examples
        --------
        >>> gen = baseline.generate(n_cells=200, seed=0)  # doctest: +SKIP
        """
        counts = self._counts(n_cells, labels)
        seed = int(np.random.default_rng().integers(2**31)) if seed is None else int(seed)
        out = self._sample(counts, np.random.default_rng(seed), seed, **options)
        codes = np.repeat([self.classes.index(c) for c in counts], list(counts.values()))
        obs = pd.DataFrame(
            {
                self.labels_key: pd.Categorical.from_codes(codes, categories=self.classes),
                Key.obs.GENERATED: True,
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
                **options,
            },
            "model": {"architecture": self.name, "labels_key": self.labels_key},
        }
        return adata
