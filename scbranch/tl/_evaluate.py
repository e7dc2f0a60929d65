"""``scbranch.tl.evaluate``: generated cells against held-out real cells, with a real control.

The protocol of docs/evaluation.md. Every metric compares generated cells of a class with real
cells of that class, and the same metric is computed in the same call between two disjoint
halves A and B of the real cells (the real-vs-real control, the floor no model can beat):

* per class, real cells are split into halves A and B (seeded); ``m = min(|A|, |B|,
  n_generated, max_cells)`` cells are drawn from each of A, B and the generated cells, so the
  generated comparison (generated vs B) and the control (A vs B) use the same sizes and the same
  real reference;
* distributions are compared in a reference PCA of log-normalised expression fitted only on
  cells that are never compared (the training cells, or a stratified part of ``real`` held
  apart for fitting), so that halves A and B and the generated cells are all out-of-sample for
  it, and optionally in a latent space;
* label fidelity uses a classifier trained on those same fitting cells;
* with ``train``, how near the cells come to the training cells: a generator that copies them
  scores every distribution metric like new real cells, but sits closer to them than new
  cells do;
* differences between types: per-gene log fold changes of each type against the rest, and the
  overlap of top markers, generated vs B and A vs B.
"""

from __future__ import annotations

import logging
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from sklearn.neighbors import NearestNeighbors

from .._keys import Key
from .._utils import as_names
from .._validation import check_finite, check_obs_key, to_dense, warn_if_negative
from ..metrics._classifier import classifier_auroc
from ..metrics._de import N_TOP_MARKERS, lfc_spearman, log_fold_changes, marker_overlap, top_markers
from ..metrics._distances import mmd_rbf, wasserstein2
from ..metrics._genes import gene_moment_spearman, zero_fraction_error
from ..metrics._quality import _classifier
from ..metrics._reference import ReferencePCA, split_for_fitting

logger = logging.getLogger(__name__)

#: metric -> which value is better. "lower": the control is a floor no generator should go
#: below by more than noise. "closer to control": a perfect generator matches the control in
#: expectation and BOTH directions are failures; going past it means too-typical cells (a
#: class-mean generator has lower W2, higher label fidelity and higher gene-mean correlation
#: than real cells, with <= 200 cells in 30 dimensions).
METRICS: dict[str, str] = {
    "w2": "closer to control",
    "mmd": "lower",
    "mmd_median": "lower",
    "auroc": "lower",
    "dispersion": "closer to control",
    "train_distance": "closer to control",
    "label_fidelity": "closer to control",
    "gene_mean_spearman": "closer to control",
    "gene_var_spearman": "closer to control",
    "count_mean_spearman": "closer to control",
    "zero_fraction_error": "lower",
    "de_lfc_spearman": "closer to control",
    "de_marker_overlap": "closer to control",
}
_DISTRIBUTION = ("w2", "mmd", "mmd_median", "auroc", "dispersion")
_GENES = ("gene_mean_spearman", "gene_var_spearman")
_COUNTS = ("count_mean_spearman", "zero_fraction_error")
_DE = ("de_lfc_spearman", "de_marker_overlap")
REFERENCE_SPACE = "reference_pca"
#: share of each class of ``real`` held apart to fit the reference space when no ``train``
FIT_FRACTION = 0.3
COLUMNS = ["space", "group", "metric", "generated", "control", "ratio", "better", "n_cells"]


@dataclass
class _Halves:
    """Positions of one class's cells: real halves A and B, and the generated cells used."""

    a: np.ndarray
    b: np.ndarray
    generated: np.ndarray

    @property
    def m(self) -> int:
        return len(self.generated)


def _class_rng(seed: int, group: str) -> np.random.Generator:
    # seeded per class by name: adding or dropping a class does not reshuffle the others
    return np.random.default_rng([seed, zlib.crc32(group.encode())])


def _split_halves(
    real_pos: np.ndarray, gen_pos: np.ndarray, group: str, max_cells: int | None, seed: int
) -> _Halves:
    rng = _class_rng(seed, group)
    real_pos = rng.permutation(real_pos)
    half = len(real_pos) // 2
    a, b = real_pos[:half], real_pos[half : 2 * half]
    m = min(half, len(gen_pos)) if max_cells is None else min(half, len(gen_pos), max_cells)
    return _Halves(
        a=np.sort(a[:m]), b=np.sort(b[:m]), generated=np.sort(rng.permutation(gen_pos)[:m])
    )


def _expression(adata: AnnData, layer: str | None, name: str):
    if layer is not None and layer not in adata.layers:
        raise KeyError(
            f"layer={layer!r} is not in {name}.layers (available: {list(adata.layers.keys())})."
        )
    m = adata.layers[layer] if layer is not None else adata.X
    if m is None:
        raise ValueError(f"{name} has no expression matrix (.X is None); pass `layer`.")
    check_finite(m, f"{name}.{'layers[' + repr(layer) + ']' if layer else 'X'}")
    return m


def _first_values(m, n_rows: int) -> np.ndarray:
    """The stored values of the first ``n_rows`` rows (a sparse matrix's explicit entries)."""
    rows = m[: min(n_rows, m.shape[0])]
    return rows.data if sp.issparse(rows) else np.asarray(rows).ravel()


def _scale(m, n_rows: int = 500) -> str:
    """``"raw counts"``, ``"not log-transformed"`` or ``"log-normalised"`` (first rows).

    Whole numbers throughout are counts, whatever their largest value. log1p of normalised
    expression stays below ~14 (log1p(1e6)); larger values that are not whole numbers were
    never log-transformed. Neither counts nor those are ever negative,
    so a matrix with negative values is on a log (or other signed) scale whatever its largest
    value: a poorly trained generator's cells reach past 20 in a few entries (a 20-step
    model's ODE cells did) and are judged as bad cells, not refused.
    """
    values = _first_values(m, n_rows)
    if not values.size or float(values.min()) < 0:
        return "log-normalised"
    # whole numbers are counts whatever their largest value (715 of pbmc68k_reduced's 765
    # genes never reach 20 counts: a matrix of them passed as log-normalised)
    if float(values.max()) > 0 and bool(np.all(values == np.round(values))):
        return "raw counts"
    return "log-normalised" if float(values.max()) <= 20 else "not log-transformed"


def _gene_positions(generated: AnnData, other: AnnData, name: str) -> np.ndarray:
    """Columns of ``other`` holding the generated genes, in the generated order."""
    index = pd.Index(other.var_names)
    pos = index.get_indexer(generated.var_names)
    missing = generated.var_names[pos < 0]
    if len(missing):
        raise ValueError(
            f"{len(missing)} of {generated.n_vars} generated genes are not in {name}.var_names "
            f"(e.g. {list(missing[:5])}). Evaluate on the genes the model generates: pass real "
            "cells with the same genes (e.g. the AnnData the model was trained on, or "
            "`real[:, generated.var_names]`)."
        )
    for data, label in ((other, name), (generated, "generated")):  # a gene counted twice
        if not data.var_names.is_unique:
            raise ValueError(
                f"{label}.var_names are not unique; run `{label}.var_names_make_unique()`."
            )
    return pos


def _spread(x: np.ndarray) -> float:
    """Mean Euclidean distance of cells to their centroid."""
    return float(np.linalg.norm(x - x.mean(0), axis=1).mean())


def _distribution_metrics(
    gen: np.ndarray, a: np.ndarray, b: np.ndarray, metrics: Sequence[str], seed: int
) -> dict[str, tuple[float, float]]:
    fns = {
        "w2": wasserstein2,
        "mmd": mmd_rbf,
        "mmd_median": lambda x, y: mmd_rbf(x, y, bandwidths="median"),
        "auroc": lambda x, y: classifier_auroc(x, y, seed=seed),
        "dispersion": lambda x, y: _spread(x) / _spread(y),
    }
    return {k: (fns[k](gen, b), fns[k](a, b)) for k in _DISTRIBUTION if k in metrics}


def _row(space, group, metric, generated, control, n):
    ratio = generated / control if np.isfinite(control) and control != 0 else np.nan
    return {
        "space": space,
        "group": group,
        "metric": metric,
        "generated": float(generated),
        "control": float(control),
        "ratio": float(ratio),
        "better": METRICS[metric],
        "n_cells": int(n),
    }


def _ordered(table: pd.DataFrame, groups: Sequence[str]) -> pd.DataFrame:
    """Rows by space (as computed), metric (as in METRICS), then class (as requested)."""
    keys = {
        "space": {s: i for i, s in enumerate(pd.unique(table["space"]))},
        "metric": {m: i for i, m in enumerate(METRICS)},
        "group": {g: i for i, g in enumerate(groups)},
    }
    return table.sort_values(
        ["space", "metric", "group"], key=lambda col: col.map(keys[col.name]), kind="stable"
    ).reset_index(drop=True)


def _mean_rows(table: pd.DataFrame, groups: Sequence[str]) -> pd.DataFrame:
    """Per (space, metric): the mean over classes with finite values (docs/evaluation.md).

    Rows of class pairs (``de_pairs``) are not classes and stay out of the mean.
    """
    rows = []
    table = table[table["group"].isin(list(groups))]
    for (space, metric), df in table.groupby(["space", "metric"], sort=False):
        ok = df[np.isfinite(df["generated"]) & np.isfinite(df["control"])]
        if len(ok):
            rows.append(
                _row(space, "mean", metric, ok["generated"].mean(), ok["control"].mean(), len(ok))
            )
            rows[-1]["n_cells"] = int(ok["n_cells"].sum())
    return pd.DataFrame(rows, columns=COLUMNS)


def evaluate(
    generated: AnnData,
    real: AnnData,
    labels_key: str,
    *,
    train: AnnData | None = None,
    groups: Sequence[str] | None = None,
    layer: str | None = None,
    counts_layer: str | None = "counts",
    use_rep: str | None = None,
    reference_pca: bool = True,
    n_comps: int = 30,
    metrics: Sequence[str] | None = None,
    fidelity_classifier: str = "knn",
    min_cells: int = 10,
    max_cells: int | None = 500,
    fit_fraction: float = FIT_FRACTION,
    de_pairs: Sequence[tuple[str, str]] = (),
    n_markers: int = N_TOP_MARKERS,
    seed: int = 0,
    key_added: str | None = None,
) -> pd.DataFrame:
    """Judge generated cells against held-out real cells, with a real-vs-real control.

    For every class (and their mean) each metric is computed twice in the same call: generated
    cells vs real half B, and real half A vs real half B (the control; disjoint halves of
    ``real``, equal sizes, seeded). Distributions are compared in a PCA of log-normalised
    expression, and optionally in a latent space (``use_rep``).

    The reference PCA and the label-fidelity classifier are fitted only on cells that are never
    compared: ``train`` when given, otherwise a seeded, stratified ``fit_fraction`` of ``real``
    held apart for fitting (the rest is split into the halves). Halves A and B and the generated
    cells are then all out-of-sample for the space they are compared in. (A PCA fitted on the
    compared real cells gives them more spread than any new cell gets, so that real cells
    nothing saw look like poor generated cells; see docs/evaluation.md.)

    Metrics (``better`` says which direction is better: ``"lower"``, or ``"closer to
    control"`` where a perfect generator matches the control and overshooting it means
    too-typical cells):

    * ``w2``: exact 2-Wasserstein distance (POT ``emd2``, squared-Euclidean cost). With a few
      hundred cells in 30 dimensions, under-dispersed sets score BELOW the real control (a
      class-mean generator does), hence "closer to control".
    * ``mmd``: biased RBF-MMD^2 summed over bandwidths 0.01, 0.1, 1, 10, 100.
    * ``mmd_median``: the same with one bandwidth at the median pairwise distance.
    * ``auroc``: held-out AUROC of a random forest telling the two sets apart (0.5 = cannot;
      out-of-fold, 5 folds, see :func:`~scbranch.metrics.classifier_auroc`).
    * ``dispersion``: mean distance to the class centroid relative to real half B's (the
      control is about 1; below it, too-typical cells).
    * ``train_distance`` (only with ``train``): median distance of the cells to their nearest
      ``train`` cell; control: the same for real half A, cells the model never saw. A ratio
      below 1 means cells nearer the training cells than new real cells come: copies of
      training cells score 0, a generator that memorised them lands in between, while every
      other metric cannot tell copies from new cells. Above 1: cells off the data.
    * ``label_fidelity``: fraction of generated cells a real-data classifier assigns to the
      requested class; control: the same on real cells the classifier did not see (above
      the control: cells more typical than real ones).
    * ``gene_mean_spearman``, ``gene_var_spearman``: rank correlation of per-gene means and
      variances (log-normalised expression).
    * ``count_mean_spearman``: rank correlation of per-gene mean counts, on ``counts_layer``
      when both objects have it.
    * ``zero_fraction_error``: mean over genes of the absolute difference of zero fractions, on
      ``counts_layer`` when both objects have it.
    * ``de_lfc_spearman``: Spearman correlation across genes of each class's log fold change
      against the other evaluated classes (and of ``de_pairs``), see
      :func:`~scbranch.metrics.log_fold_changes`.
    * ``de_marker_overlap``: fraction of each class's top ``n_markers`` genes (scanpy's
      ``rank_genes_groups``, t-test, against the rest) that the two sets share.

    Parameters
    ----------
    generated
        Generated cells (e.g. from :meth:`~scbranch.BranchedDiffusion.generate`), with
        log-normalised expression in ``.X`` (or ``layer``) and the class in ``obs[labels_key]``.
    real
        Real cells the model never saw (held out), with the generated genes, log-normalised
        like ``generated`` (not scaled: z-scores of ``sc.pp.scale`` draw a warning).
    labels_key
        Column of ``obs`` with the cell types, in ``generated``, ``real`` (and ``train``).
    train
        Real cells the model was trained on. When given, the reference PCA and the
        label-fidelity classifier are fitted on them (and on nothing else); otherwise on a
        part of ``real`` held apart (``fit_fraction``).
    groups
        Classes to evaluate; default: every class with generated cells.
    layer
        Layer of log-normalised expression (CP10k + log1p) in all objects; default ``.X``.
    counts_layer
        Layer with counts for ``zero_fraction_error``; skipped when an object lacks it.
    use_rep
        Also compare in this ``.obsm`` representation (e.g. the model's latent space).
    reference_pca
        Compare in the reference PCA of expression (needs generated genes).
    n_comps
        Components of the reference PCA.
    metrics
        Subset of the metrics above; default all.
    fidelity_classifier
        ``"knn"`` (15 neighbours) or ``"logreg"``.
    min_cells
        Classes whose halves would hold fewer cells get only ``label_fidelity`` (a warning
        names them): distances between a handful of cells are noise.
    max_cells
        At most this many cells per side and class (W2 and the forest grow superlinearly);
        `None`: every cell.
    fit_fraction
        Without ``train``: the share of each class of ``real`` held apart to fit the reference
        PCA and the classifier (a warning names classes this leaves too small for distances).
    de_pairs
        Pairs of classes ``(a, b)`` whose log fold change ``a`` against ``b`` is also compared
        (rows grouped ``"a vs b"``).
    n_markers
        Top markers per class for ``de_marker_overlap``.
    seed
        Seed of the halves, subsampling, PCA and classifiers.
    key_added
        If given, store an h5ad-safe copy of the table and the parameters in
        ``generated.uns[key_added]`` (read it back with :func:`read_evaluation`).

    Returns
    -------
    Tidy DataFrame with one row per (space, group, metric): ``generated``, ``control``,
    ``ratio`` (generated / control), ``better`` and ``n_cells`` (cells per side), with
    ``group == "mean"`` rows averaging the classes. ``df.attrs["reference"]`` says which cells
    the reference space was fitted on.

    Examples
    --------
    >>> import scbranch as sb
    >>> report = sb.tl.evaluate(gen, heldout, "cell_type", train=train)  # doctest: +SKIP
    >>> report.query("group == 'mean'")  # doctest: +SKIP
    >>> sb.pl.evaluation(report)  # doctest: +SKIP
    """
    explicit = metrics is not None
    if isinstance(metrics, str):  # one metric, as pl.evaluation takes it
        metrics = [metrics]
    metrics = list(METRICS) if metrics is None else list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; choose from {list(METRICS)}.")
    if not metrics:
        raise ValueError(f"metrics=[] asks for nothing; choose from {list(METRICS)}.")
    # the forest scores out-of-fold in 5 folds: fewer than 4 cells a side cannot be scored
    floor = 4 if "auroc" in metrics else 2
    if min_cells < floor:
        raise ValueError(
            f"min_cells must be at least {floor}"
            + (" with 'auroc' (the classifier needs 4 cells a side)" if floor == 4 else "")
            + f", got {min_cells}."
        )
    if max_cells is not None and max_cells < min_cells:
        raise ValueError(
            f"max_cells={max_cells} is below min_cells={min_cells}: no class could be compared "
            "by distances. Raise max_cells (or None for every cell)."
        )
    if "train_distance" in metrics and train is None:
        if explicit:
            raise ValueError(
                "metric 'train_distance' measures how near the cells come to the training "
                "cells: pass them as `train=`, or leave the metric out."
            )
        metrics.remove("train_distance")
    named = {"generated": generated, "real": real} | ({"train": train} if train is not None else {})
    for name, data in named.items():
        if not isinstance(data, AnnData):
            raise TypeError(f"`{name}` must be an AnnData, got {type(data).__name__}.")
        check_obs_key(data, labels_key, name=name)
    if generated.n_obs == 0:
        raise ValueError("`generated` holds no cells.")
    gen_labels = generated.obs[labels_key].astype(str).to_numpy()
    groups = _resolve_groups(
        groups, gen_labels, real.obs[labels_key].astype(str).to_numpy(), labels_key
    )
    fitting, real, reference = _fitting_cells(
        real, train, labels_key, groups, fit_fraction, min_cells, seed
    )
    real_labels = real.obs[labels_key].astype(str).to_numpy()

    expr = (
        _expressions(
            generated, real, fitting, layer, "train" if train is not None else "real (fitting part)"
        )
        if generated.n_vars
        else None
    )
    spaces = _spaces(generated, real, fitting, expr, use_rep, reference_pca, n_comps, seed)
    halves = {
        g: _split_halves(
            np.flatnonzero(real_labels == g), np.flatnonzero(gen_labels == g), g, max_cells, seed
        )
        for g in groups
    }
    small = [f"{g!r} ({h.m} per side)" for g, h in halves.items() if h.m < min_cells]
    if small:
        logger.warning(
            "Too few cells for distances in %s (min_cells=%d per side: half the real cells and "
            "the generated ones); only label fidelity is reported for them.",
            ", ".join(small),
            min_cells,
        )

    rows: list[dict] = []
    fit_labels = fitting.obs[labels_key].astype(str).to_numpy()
    for space, coords in spaces.items():
        gen_x, real_x, fit_x = coords
        # distances to the training cells: only the cells the model saw can be copied
        nearest = (
            NearestNeighbors(n_neighbors=1).fit(fit_x) if "train_distance" in metrics else None
        )
        for g in groups:
            h = halves[g]
            if h.m >= min_cells:
                values = _distribution_metrics(
                    gen_x[h.generated], real_x[h.a], real_x[h.b], metrics, seed
                )
                rows += [_row(space, g, k, v[0], v[1], h.m) for k, v in values.items()]
                if nearest is not None:
                    gen_d, ctrl_d = (
                        np.median(nearest.kneighbors(x)[0])
                        for x in (gen_x[h.generated], real_x[h.a])
                    )
                    rows.append(_row(space, g, "train_distance", gen_d, ctrl_d, h.m))
        if "label_fidelity" in metrics:
            rows += _fidelity_rows(
                space,
                coords,
                gen_labels,
                real_labels,
                fit_labels,
                groups,
                fidelity_classifier,
                seed,
            )
    if expr is not None and any(m in metrics for m in (*_GENES, *_COUNTS)):
        rows += _gene_rows(generated, real, expr, counts_layer, groups, halves, metrics, min_cells)
    if expr is not None and any(m in metrics for m in _DE):
        rows += _de_rows(
            expr, gen_labels, real_labels, generated.var_names, groups, halves, metrics,
            min_cells, de_pairs, n_markers,
        )  # fmt: skip

    table = _ordered(pd.DataFrame(rows, columns=COLUMNS), groups)
    table = pd.concat([table, _mean_rows(table, groups)], ignore_index=True)
    table.attrs["reference"] = reference
    if key_added is not None:
        generated.uns[key_added] = _uns_record(
            table,
            params={
                "labels_key": labels_key,
                "layer": layer or "",
                "counts_layer": counts_layer or "",
                "use_rep": use_rep or "",
                "reference_pca": bool(reference_pca),
                "n_comps": int(n_comps),
                "fidelity_classifier": fidelity_classifier,
                "min_cells": int(min_cells),
                "max_cells": -1 if max_cells is None else int(max_cells),
                "fit_fraction": float(fit_fraction),
                "n_markers": int(n_markers),
                "seed": int(seed),
                "with_train": train is not None,
                "reference": reference,
            },
        )
    return table


def _fitting_cells(real, train, labels_key, groups, fit_fraction, min_cells, seed):
    """Cells to fit the judging space and classifier on, the real cells to compare, and how.

    With ``train``, the fitting cells are ``train`` and every real cell is compared. Without,
    a stratified ``fit_fraction`` of ``real`` is held apart (never compared).
    """
    if train is not None:
        shared = real.obs_names.intersection(train.obs_names)
        if len(shared) and _same_cells(real, train, shared):
            # the reference space would be fitted on cells it then compares: the bias the
            # protocol exists to avoid (train_distance's control falls to 0)
            warnings.warn(
                f"{len(shared)} of the {real.n_obs} real cells are also in `train` (e.g. "
                f"{list(shared[:3])}): the judging space and classifier are fitted on cells "
                "they compare, which flatters every metric. Pass held-out cells the model and "
                "`train` never saw.",
                UserWarning,
                stacklevel=3,
            )
        untrained = [
            g for g in groups if g not in set(train.obs[labels_key].astype(str).to_numpy())
        ]
        if untrained:
            logger.warning(
                "Class(es) %s have no cells in `train`: the label-fidelity classifier never "
                "sees them, so their cells cannot be called their class (fidelity 0).",
                ", ".join(repr(g) for g in untrained),
            )
        return train, real, f"train ({train.n_obs} cells)"
    labels = real.obs[labels_key].astype(str).to_numpy()
    fit_pos, compare_pos = split_for_fitting(labels, fit_fraction, seed)
    compared = labels[compare_pos]
    shrunk = [
        g
        for g in groups
        if (labels == g).sum() // 2 >= min_cells and (compared == g).sum() // 2 < min_cells
    ]
    if shrunk:
        logger.warning(
            "Holding %d of %d real cells apart to fit the reference space leaves too few for "
            "distances in %s; pass `train=` (the training cells) to compare every real cell.",
            len(fit_pos),
            real.n_obs,
            ", ".join(repr(g) for g in shrunk),
        )
    missing = [g for g in groups if g not in set(labels[fit_pos])]
    if missing:
        logger.warning(
            "Class(es) %s have too few real cells to hold any apart: the label-fidelity "
            "classifier never sees them. Pass `train=` for a classifier that knows every class.",
            ", ".join(repr(g) for g in missing),
        )
    return (
        real[fit_pos],
        real[compare_pos],
        f"{len(fit_pos)} of the real cells, held apart ({fit_fraction:g} of each class)",
    )


def _same_cells(real: AnnData, train: AnnData, names, n_check: int = 200) -> bool:
    """Whether cells named alike in both hold the same expression (or it cannot be told).

    AnnData built from arrays name their cells "0", "1", ...: the names meet, the cells need
    not (a user's held-out and train cells were reported as one, falsely).
    """
    names = list(names[:n_check])
    genes = real.var_names.intersection(train.var_names)[:n_check]
    if not len(genes) or real.X is None or train.X is None:
        return True
    a = to_dense(real[names, genes].X).astype(np.float64)
    b = to_dense(train[names, genes].X).astype(np.float64)
    return bool(np.any(np.all(np.isclose(a, b), axis=1)))


def _resolve_groups(groups, gen_labels, real_labels, labels_key) -> list[str]:
    present_gen = list(pd.unique(gen_labels))
    present_real = set(real_labels)
    if groups is None:
        groups = present_gen
    else:
        groups = as_names(groups, "groups")  # one string is one group, not its letters
        empty = [g for g in groups if g not in set(present_gen)]
        if empty:
            raise ValueError(
                f"Class(es) {empty} have no generated cells in generated.obs[{labels_key!r}]. "
                f"Generate them first or drop them from `groups` (generated: {present_gen})."
            )
    no_real = [g for g in groups if g not in present_real]
    if no_real:
        raise ValueError(
            f"Class(es) {no_real} have generated cells but no real cells in "
            f"real.obs[{labels_key!r}] (which holds {sorted(present_real)[:10]}), so there is "
            "nothing to compare with. Pass held-out cells of every generated class, or restrict "
            "with `groups=[...]`."
        )
    too_few = [g for g in groups if (real_labels == g).sum() < 2]
    if too_few:
        raise ValueError(
            f"Class(es) {too_few} have fewer than 2 real cells: no real-vs-real control is "
            "possible. Hold out more cells of them or leave them out with `groups=[...]`."
        )
    return groups


def _expressions(generated, real, fitting, layer, fitting_name: str = "train") -> dict:
    """Expression of the generated genes in every object (real ones reordered to match)."""
    expr = {"generated": _expression(generated, layer, "generated")}
    for name, data in (("real", real), ("fitting", fitting)):
        expr[name] = _expression(data, layer, name)[:, _gene_positions(generated, data, name)]
    # every object on one scale: a train set of counts fitted the reference PCA and the
    # label-fidelity classifier on another scale than the cells it judged, silently
    names = {"generated": "generated", "real": "real", "fitting": fitting_name}
    scales = {names[name]: _scale(m) for name, m in expr.items()}
    if set(scales.values()) != {"log-normalised"}:  # counts in every object passed too
        listing = ", ".join(f"{name} ({kind})" for name, kind in scales.items())
        one = "not on one scale" if len(set(scales.values())) > 1 else "not log-normalised"
        raise ValueError(
            f"The expression of {listing} is {one}: evaluate compares log-normalised "
            "expression in every object (`train` included). Normalise the others with "
            "`sc.pp.normalize_total(adata, target_sum=1e4); sc.pp.log1p(adata)`, or pass the "
            "`layer` that holds it in every object."
        )
    # the fitting cells are a part of `real` when no `train` is given: one warning
    for name in ("real", "fitting") if fitting_name == "train" else ("real",):
        _warn_if_scaled(expr[name], names[name])
    return expr


def _warn_if_scaled(m, name: str, n_rows: int = 500) -> None:
    """Warn when real cells hold negative values: z-scores, not log-normalised expression.

    scanpy's tutorials leave ``sc.pp.scale``'s z-scores in ``.X``, below 10 and so on the
    log scale for :func:`_scale`. A warning, as at set-up: other signed features can be judged
    too (the instrument's Gaussian known answer is one).
    """
    warn_if_negative(
        _first_values(m, n_rows),
        name,
        "the generated cells are judged against other units",
        "Pass the log-normalised values (`adata.raw.to_adata()` where `.raw` holds them, or "
        "`layer=`).",
        stacklevel=4,
    )


def _spaces(generated, real, fitting, expr, use_rep, reference_pca, n_comps, seed) -> dict:
    """Coordinates ``(generated, real, fitting)`` per comparison space.

    The reference PCA is fitted on the fitting cells alone: every compared set (the real
    halves and the generated cells) is projected out-of-sample.
    """
    spaces: dict[str, tuple] = {}
    if reference_pca:
        if expr is None:
            raise ValueError(
                "`generated` carries no genes, so there is no expression to compare; pass "
                "`use_rep=` (a latent space present in both) and `reference_pca=False`."
            )
        pca = ReferencePCA(n_comps, seed=seed).fit(expr["fitting"])
        spaces[REFERENCE_SPACE] = tuple(
            pca.transform(expr[k]) for k in ("generated", "real", "fitting")
        )
    if use_rep is not None:
        named = {"generated": generated, "real": real, "train": fitting}
        for name, data in named.items():
            if use_rep not in data.obsm:
                raise KeyError(
                    f"use_rep={use_rep!r} is not in {name}.obsm (available: "
                    f"{list(data.obsm.keys())})."
                )
            check_finite(np.asarray(data.obsm[use_rep]), f"{name}.obsm[{use_rep!r}]")
        dims = {name: np.asarray(d.obsm[use_rep]).shape[1] for name, d in named.items()}
        if len(set(dims.values())) > 1:
            raise ValueError(f"obsm[{use_rep!r}] has different widths: {dims}.")
        spaces[use_rep] = tuple(
            np.asarray(d.obsm[use_rep], dtype=np.float64) for d in named.values()
        )
    if not spaces:
        raise ValueError("Nothing to compare: set `reference_pca=True` or pass `use_rep`.")
    return spaces


def _fidelity_rows(
    space, coords, gen_labels, real_labels, fit_labels, groups, kind, seed
) -> list[dict]:
    """Label fidelity: a classifier of the fitting cells, scored on generated and real cells."""
    gen_x, real_x, fit_x = coords
    clf = _classifier(kind, seed).fit(fit_x, fit_labels)
    rows = []
    for g in groups:
        gen_pos = np.flatnonzero(gen_labels == g)
        control_pos = np.flatnonzero(real_labels == g)
        generated = float(np.mean(clf.predict(gen_x[gen_pos]) == g))
        control = float(np.mean(clf.predict(real_x[control_pos]) == g))
        rows.append(_row(space, g, "label_fidelity", generated, control, len(gen_pos)))
    return rows


def _de_rows(
    expr, gen_labels, real_labels, var_names, groups, halves, metrics, min_cells, pairs, n_markers
) -> list[dict]:
    """Differences between types: generated vs B and A vs B, on the classes with distances.

    Each set holds the same cells per class (the halves' sizes), so the rest a class is
    ranked against has the same composition in all three.
    """
    used = [g for g in groups if halves[g].m >= min_cells]
    pairs = [(str(a), str(b)) for a, b in pairs]
    unknown = [p for p in pairs if not set(p) <= set(used)]
    if unknown:
        raise ValueError(
            f"de_pairs {unknown} name classes without enough cells for distances (evaluated: "
            f"{used})."
        )
    if len(used) < 2:
        logger.warning("Differences between types need two classes with distances; skipped.")
        return []
    sets = {}
    for side, matrix, labels in (
        ("generated", expr["generated"], gen_labels),
        ("a", expr["real"], real_labels),
        ("b", expr["real"], real_labels),
    ):
        pos = np.concatenate([getattr(halves[g], side) for g in used])
        sets[side] = (matrix[pos], labels[pos])
    rows = []
    if "de_lfc_spearman" in metrics:
        lfc = {k: log_fold_changes(x, y, used, pairs=pairs) for k, (x, y) in sets.items()}
        gen_rho = lfc_spearman(lfc["generated"], lfc["b"])
        ctrl_rho = lfc_spearman(lfc["a"], lfc["b"])
        for col in lfc["b"].columns:
            n = halves[col].m if col in halves else min(halves[p].m for p in col.split(" vs "))
            rows.append(_row("genes", col, "de_lfc_spearman", gen_rho[col], ctrl_rho[col], n))
    if "de_marker_overlap" in metrics:
        markers = {
            k: top_markers(x, y, used, n_top=n_markers, var_names=var_names)
            for k, (x, y) in sets.items()
        }
        gen_ov = marker_overlap(markers["generated"], markers["b"])
        ctrl_ov = marker_overlap(markers["a"], markers["b"])
        for g in used:
            rows.append(_row("genes", g, "de_marker_overlap", gen_ov[g], ctrl_ov[g], halves[g].m))
    return rows


def _gene_rows(
    generated, real, expr, counts_layer, groups, halves, metrics, min_cells
) -> list[dict]:
    """Gene-level agreement per class (generated vs B, control A vs B)."""
    gen_expr, real_expr = expr["generated"], expr["real"]
    wants_counts = any(m in metrics for m in _COUNTS)
    use_counts = (
        wants_counts
        and counts_layer is not None
        and counts_layer in generated.layers
        and counts_layer in real.layers
    )
    if wants_counts and not use_counts:
        # asked for nothing else, an empty report needs saying where a user will see it
        only_counts = all(m in _COUNTS for m in metrics)
        (logger.warning if only_counts else logger.debug)(
            "No counts layer %r in both objects: count metrics are not evaluated (generate "
            "with counts=True, and pass real cells with their counts).",
            counts_layer,
        )
    if use_counts:
        gen_counts = generated.layers[counts_layer]
        real_counts = real.layers[counts_layer][:, _gene_positions(generated, real, "real")]
        check_finite(gen_counts, f"generated.layers[{counts_layer!r}]")
        check_finite(real_counts, f"real.layers[{counts_layer!r}]")
    rows = []
    for g in groups:
        h = halves[g]
        if h.m < min_cells:
            continue
        gen_rho = gene_moment_spearman(gen_expr[h.generated], real_expr[h.b])
        ctrl_rho = gene_moment_spearman(real_expr[h.a], real_expr[h.b])
        for i, name in enumerate(_GENES):
            if name in metrics:
                rows.append(_row("genes", g, name, gen_rho[i], ctrl_rho[i], h.m))
        if use_counts and "count_mean_spearman" in metrics:
            gen_rho = gene_moment_spearman(gen_counts[h.generated], real_counts[h.b])[0]
            ctrl_rho = gene_moment_spearman(real_counts[h.a], real_counts[h.b])[0]
            rows.append(_row("counts", g, "count_mean_spearman", gen_rho, ctrl_rho, h.m))
        if use_counts and "zero_fraction_error" in metrics:
            rows.append(
                _row(
                    "counts",
                    g,
                    "zero_fraction_error",
                    zero_fraction_error(gen_counts[h.generated], real_counts[h.b]),
                    zero_fraction_error(real_counts[h.a], real_counts[h.b]),
                    h.m,
                )
            )
    return rows


def _uns_record(table: pd.DataFrame, params: dict) -> dict:
    """h5ad-safe copy: one array per column (strings as str, numbers as float/int)."""
    columns = {
        c: (table[c].astype(str).to_numpy() if table[c].dtype == object else table[c].to_numpy())
        for c in COLUMNS
    }
    return {"params": params, "table": columns}


def read_evaluation(adata: AnnData, key: str = Key.uns.EVALUATION) -> pd.DataFrame:
    """The table :func:`~scbranch.tl.evaluate` stored with ``key_added=key``, as a DataFrame.

    Parameters
    ----------
    adata
        The generated cells :func:`~scbranch.tl.evaluate` was called with.
    key
        Its ``key_added``.

    Returns
    -------
    The tidy table :func:`~scbranch.tl.evaluate` returned (one row per space, group and metric).

    Examples
    --------
    >>> sb.tl.evaluate(gen, heldout, "cell_type", key_added="scbranch_evaluation")  # doctest: +SKIP
    >>> sb.tl.read_evaluation(gen).head()  # doctest: +SKIP
    """
    record = adata.uns.get(key)
    if not isinstance(record, dict) or "table" not in record:
        raise KeyError(
            f"No evaluation in adata.uns[{key!r}]; run `scbranch.tl.evaluate(..., "
            f"key_added={key!r})` first."
        )
    table = pd.DataFrame({c: np.asarray(record["table"][c]) for c in COLUMNS})
    reference = record.get("params", {}).get("reference")
    if reference is not None:  # as evaluate returned it
        table.attrs["reference"] = str(reference)
    return table
