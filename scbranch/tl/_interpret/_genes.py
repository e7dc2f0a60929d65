"""What changed: genes ranked by their change along transmutation trajectories."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy import stats

from ..._keys import Key
from ..._validation import check_finite, to_dense
from ._inputs import DOWN_PHASES, _check_transmutation, _dense_rows, _paired_rows

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------ genes
def _group_means(x, rows_by_checkpoint: Mapping[int, np.ndarray]) -> np.ndarray:
    """Mean expression per checkpoint (checkpoints in the mapping's order) x genes."""
    out = []
    for rows in rows_by_checkpoint.values():
        m = x[rows]
        out.append(np.asarray(m.mean(0)).ravel() if sp.issparse(m) else to_dense(m).mean(0))
    return np.vstack(out)


def _onset(
    change: np.ndarray, down: np.ndarray, fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Index (into ``down``) of the first checkpoint whose signed change reaches ``fraction``.

    ``change``: checkpoints x genes (change from the source); ``down``: positions of the
    checkpoints on the way down, in order. Returns the index into ``down`` per gene and a mask
    of genes with a nonzero final change (the others have no onset).
    """
    path = change[down]
    final = path[-1]
    sign = np.sign(final)
    reached = sign * path >= fraction * np.abs(final) - 1e-12
    first = np.argmax(reached, axis=0)
    return first, final != 0


#: scores of :func:`rank_transmutation_genes`
RANK_METHODS = ("mean_change", "t-test_paired")


def _plot_groups(n_obs: int, paired: pd.DataFrame, groups: list[str]) -> tuple[pd.Categorical, str]:
    """The rows scanpy's ``rank_genes_groups_*`` plots compare, and the reference's name.

    scanpy draws one row per category of ``params['groupby']`` and compares each group with
    ``params['reference']``. Grouping every checkpoint by its target would average the
    source, the way up and down and the endpoint into one row; here endpoint rows are named
    by their target and source rows ``"source"`` (the reference the ranking compared with),
    as in ``sc.tl.rank_genes_groups(..., reference="source")``. Rows in between are NaN, which
    the dotplot, matrixplot and violins leave out.
    """
    reference = "source" if "source" not in groups else "source state"
    values = np.full(n_obs, None, dtype=object)
    values[paired["source"].to_numpy()] = reference
    for group in groups:
        values[paired.loc[paired["target_label"] == group, "endpoint"].to_numpy()] = group
    return pd.Categorical(values, categories=[*groups, reference]), reference


def rank_transmutation_genes(
    transmuted: AnnData,
    *,
    n_genes: int | None = None,
    method: str = "mean_change",
    key_added: str = Key.uns.TRANSMUTATION_GENES,
) -> None:
    """Rank genes by their change along each transmutation, as :func:`scanpy.tl.rank_genes_groups`.

    One group per target type (pooling source types): each trajectory's endpoint is compared
    with its own source state, on the decoded log-normalised genes in ``.X``. Scores are, by
    default, the mean change (endpoint minus source, log1p units), or with
    ``method="t-test_paired"`` the paired t statistic (:func:`scipy.stats.ttest_rel`); rows are
    sorted by score in decreasing order (up-regulated genes first). The mean change is the
    default because decoded expression carries no per-gene noise: a gene the latent barely
    moves changes by a tiny, nearly constant amount in every cell and gets a huge t statistic
    (the two are compared in docs/benchmarks/interpretability.md). P-values always come from
    the paired t-test (they
    describe how consistent a change is across cells; the cells are model outputs, not
    independent samples). Log fold changes are computed as scanpy does from log1p data,
    ``log2((expm1(mean_end) + 1e-9) / (expm1(mean_source) + 1e-9))`` (means below 0, possible
    for PCA-decoded expression, count as 0), and p-values are adjusted with Benjamini-Hochberg.
    :func:`scanpy.get.rank_genes_groups_df` and :func:`scanpy.pl.rank_genes_groups` read the
    result (``key=key_added``).

    scanpy's plots of a ranking draw one row per category of ``params['groupby']`` and compare
    each group with ``params['reference']``: ``obs['scbranch_transmutation_group']`` holds the
    target type on endpoint rows, ``"source"`` on source rows (pooling every target's sources)
    and NaN in between, so :func:`scanpy.pl.rank_genes_groups_dotplot`, ``_matrixplot``,
    ``_stacked_violin`` and ``_violin`` show each target's top genes at the endpoints next to
    the sources. The per-cell ``_heatmap`` and ``_tracksplot`` need the rows with a group,
    ``tm[tm.obs["scbranch_transmutation_group"].notna()]``; ``groupby="phase"`` draws every
    phase of the way (source, up, branch point, down, endpoint).

    Also records when each gene changes: the *onset*, the first checkpoint on the way down
    (from the branch point to the endpoint) at which the mean change from the source state
    reaches half of its final value. Genes with the largest onset ``t`` change first.

    Parameters
    ----------
    transmuted
        Trajectories of :meth:`~scbranch.BranchedDiffusion.transmute`, with genes in ``.X``.
    n_genes
        Genes stored per group; default all.
    method
        Score to rank by: ``"mean_change"`` or ``"t-test_paired"``.
    key_added
        Key of ``transmuted.uns`` to store the ranking under.

    Returns
    -------
    `None`. Sets ``transmuted.obs['scbranch_transmutation_group']`` (above) and
    ``transmuted.uns[key_added]`` with the fields of
    :func:`scanpy.tl.rank_genes_groups` (each a record array with one field per target type,
    rows sorted by score):

    `'params'` : :class:`dict`
        ``groupby='scbranch_transmutation_group'``, ``reference='source'``, ``method``, ...
    `'names'`, `'scores'`, `'logfoldchanges'`, `'pvals'`, `'pvals_adj'`
        As in scanpy.
    `'onset_t'` : record array of float
        Diffusion time of each gene's onset (aligned with ``'names'``; NaN for genes whose
        mean does not change, and where the trajectories pass the onset checkpoint at
        different times: sources of several types, ``per_cell_source=True``).
    `'onset_checkpoint'` : record array of int
        Checkpoint of the onset (-1 for genes whose mean does not change).

    Examples
    --------
    >>> import scanpy as sc
    >>> import scbranch as sb
    >>> tm = model.transmute(monocytes, target="Dendritic")  # doctest: +SKIP
    >>> sb.tl.rank_transmutation_genes(tm)  # doctest: +SKIP
    >>> sc.get.rank_genes_groups_df(
    ...     tm, group="Dendritic", key="scbranch_transmutation_genes"
    ... ).head()  # doctest: +SKIP
    >>> sc.pl.rank_genes_groups(tm, key="scbranch_transmutation_genes")  # doctest: +SKIP
    >>> sc.pl.rank_genes_groups_dotplot(
    ...     tm, key="scbranch_transmutation_genes", n_genes=5
    ... )  # doctest: +SKIP
    """
    _check_transmutation(transmuted)
    if transmuted.n_vars == 0 or transmuted.X is None:
        raise ValueError(
            "transmuted has no genes (n_vars == 0): the model has no map from its "
            "representation back to genes, so there is nothing to rank. Train on expression, "
            "on a PCA that scbranch can decode, or on an scVI latent."
        )
    if n_genes is not None and int(n_genes) < 1:
        raise ValueError(f"n_genes must be at least 1, got {n_genes}.")
    if method not in RANK_METHODS:
        raise ValueError(f"method must be one of {RANK_METHODS}, got {method!r}.")
    x = transmuted.X
    check_finite(x, "transmuted.X")
    paired = _paired_rows(transmuted)
    obs = transmuted.obs
    ids = obs[Key.obs.TRAJECTORY].astype(str).to_numpy()
    checkpoints = obs[Key.obs.CHECKPOINT].to_numpy(dtype=np.int64)
    phase = obs[Key.obs.PHASE].astype(str).to_numpy()
    t = obs[Key.obs.T].to_numpy(dtype=np.float64)
    n_vars = transmuted.n_vars
    n_keep = n_vars if n_genes is None else min(int(n_genes), n_vars)
    var_names = np.asarray(transmuted.var_names, dtype=object)

    groups = list(pd.unique(paired["target_label"]))
    if isinstance(obs[Key.obs.TARGET_LABEL].dtype, pd.CategoricalDtype):
        order = [str(c) for c in obs[Key.obs.TARGET_LABEL].cat.categories]
        groups = sorted(groups, key=order.index)
    fields: dict[str, dict[str, np.ndarray]] = {
        k: {}
        for k in (
            "names",
            "scores",
            "logfoldchanges",
            "pvals",
            "pvals_adj",
            "onset_t",
            "onset_checkpoint",
        )
    }
    for group in groups:
        sub = paired[paired["target_label"] == group]
        if len(sub) < 2:
            logger.warning(
                "Target %r has %d trajectory; a paired t-test needs at least 2 (scores 0).",
                group,
                len(sub),
            )
        end = _dense_rows(x, sub["endpoint"].to_numpy())
        src = _dense_rows(x, sub["source"].to_numpy())
        with np.errstate(invalid="ignore", divide="ignore"):
            res = stats.ttest_rel(end, src, axis=0)
        if method == "mean_change":
            scores = (end - src).mean(0).astype(np.float64)
        else:
            scores = np.nan_to_num(np.asarray(res.statistic, dtype=np.float64), nan=0.0)
        pvals = np.asarray(res.pvalue, dtype=np.float64)
        pvals[np.isnan(pvals)] = 1.0
        pvals_adj = stats.false_discovery_control(pvals, method="bh")
        mean_end = np.clip(end.mean(0), 0, None)
        mean_src = np.clip(src.mean(0), 0, None)
        lfc = np.log2((np.expm1(mean_end) + 1e-9) / (np.expm1(mean_src) + 1e-9))

        # onset: mean change from the source per checkpoint on the way down
        in_group = np.isin(ids, sub.index.to_numpy())
        down_ckpts = np.unique(checkpoints[in_group & np.isin(phase, DOWN_PHASES)])
        rows_by_ckpt = {}
        for c in down_ckpts:
            rows = np.flatnonzero(in_group & (checkpoints == c))
            if len(rows) != len(sub):
                raise ValueError(
                    f"Trajectories to {group!r} do not all have checkpoint {c} "
                    f"({len(rows)} of {len(sub)}); rank genes on whole trajectories from one "
                    "`transmute` call."
                )
            rows_by_ckpt[int(c)] = rows
        change = _group_means(x, rows_by_ckpt) - src.mean(0)
        ckpt_t = np.array([t[r].mean() for r in rows_by_ckpt.values()])
        # sources of several types (per_cell_source=True) reach a checkpoint at their own
        # branch times: a mean of those is a time no trajectory passed
        mixed = np.array([np.ptp(t[r]) > 1e-9 for r in rows_by_ckpt.values()], dtype=bool)
        if mixed.any():
            logger.warning(
                "Trajectories to %r reach their checkpoints at different times (sources of "
                "several types): onset_t is NaN there; read onset_checkpoint.",
                group,
            )
            ckpt_t[mixed] = np.nan
        first, changes = _onset(change, np.arange(len(down_ckpts)))
        onset_t = np.where(changes, ckpt_t[first], np.nan)
        onset_ckpt = np.where(changes, down_ckpts[first], -1).astype(np.int64)

        order = np.argsort(-scores, kind="stable")[:n_keep]
        fields["names"][group] = var_names[order]
        fields["scores"][group] = scores[order].astype(np.float32)
        fields["logfoldchanges"][group] = lfc[order].astype(np.float32)
        fields["pvals"][group] = pvals[order]
        fields["pvals_adj"][group] = pvals_adj[order]
        fields["onset_t"][group] = onset_t[order]
        fields["onset_checkpoint"][group] = onset_ckpt[order]

    dtypes = {
        "names": "O",
        "scores": "float32",
        "logfoldchanges": "float32",
        "pvals": "float64",
        "pvals_adj": "float64",
        "onset_t": "float64",
        "onset_checkpoint": "int64",
    }
    plot_groups, reference = _plot_groups(transmuted.n_obs, paired, groups)
    transmuted.obs[Key.obs.TRANSMUTATION_GROUP] = plot_groups
    record: dict = {
        "params": {
            "groupby": Key.obs.TRANSMUTATION_GROUP,
            "reference": reference,
            "method": method,
            "use_raw": False,
            "layer": None,
            "corr_method": "benjamini-hochberg",
            "n_genes": int(n_keep),
            "onset_fraction": 0.5,
        }
    }
    for name, per_group in fields.items():
        record[name] = pd.DataFrame(per_group, columns=groups).to_records(
            index=False, column_dtypes=dtypes[name]
        )
    transmuted.uns[key_added] = record
    logger.info(
        "Ranked %d genes for %d target type(s) in transmuted.uns[%r].",
        n_keep,
        len(groups),
        key_added,
    )
