"""Differences between types: planted fold changes and markers are recovered, with a control."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from scipy.stats import spearmanr

import scbranch as sb
from scbranch.metrics import lfc_spearman, log_fold_changes, marker_overlap, top_markers

CLASSES = ["a", "b", "c", "d"]
N_GENES = 200
#: genes each class raises (class k: genes 20k .. 20k + 19) and by how much (log2)
UP = {c: np.arange(20 * k, 20 * k + 20) for k, c in enumerate(CLASSES)}
PLANTED_LOG2FC = 2.0


def _counts(n_per_class: int, seed: int, *, flatten: bool = False) -> ad.AnnData:
    """NB counts with planted fold changes; ``flatten``: every class from the pooled means."""
    rng = np.random.default_rng(seed)
    base = np.exp(np.random.default_rng(99).normal(1.5, 0.7, N_GENES))  # fixed population
    means = np.tile(base, (len(CLASSES), 1))
    for k, c in enumerate(CLASSES):
        means[k, UP[c]] *= 2.0**PLANTED_LOG2FC
    if flatten:
        means[:] = means.mean(0)
    codes = np.repeat(np.arange(len(CLASSES)), n_per_class)
    mu = means[codes]
    counts = rng.negative_binomial(10, 10 / (10 + mu)).astype(np.float32)
    adata = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical(np.asarray(CLASSES)[codes], categories=CLASSES)},
            index=[f"s{seed}c{i}" for i in range(len(codes))],
        ),
        var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)]),
    )
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def _planted() -> pd.DataFrame:
    """True log2 fold change of each class against the class-balanced rest."""
    base = np.zeros((len(CLASSES), N_GENES))
    for k, c in enumerate(CLASSES):
        base[k, UP[c]] = PLANTED_LOG2FC
    # in log space of the MEANS: rest = mean over other classes of 2**base (up genes of others)
    out = {}
    for k, c in enumerate(CLASSES):
        others = np.delete(np.arange(len(CLASSES)), k)
        rest = np.log2((2.0 ** base[others]).mean(0))
        out[c] = base[k] - rest
    return pd.DataFrame(out)


def test_planted_fold_changes_are_recovered():
    adata = _counts(400, seed=0)
    labels = adata.obs["cell_type"].to_numpy()
    lfc = log_fold_changes(adata.X, labels, CLASSES)
    truth = _planted()
    assert list(lfc.columns) == CLASSES
    for c in CLASSES:
        # up genes: about the planted change (normalisation dilutes it a little)
        assert abs(lfc[c].to_numpy()[UP[c]].mean() - truth[c].to_numpy()[UP[c]].mean()) < 0.3
        assert spearmanr(lfc[c], truth[c]).statistic > 0.6
    pair = log_fold_changes(adata.X, labels, CLASSES, pairs=[("a", "b")])["a vs b"].to_numpy()
    assert pair[UP["a"]].mean() > 1.6 and pair[UP["b"]].mean() < -1.6
    assert abs(np.delete(pair, np.r_[UP["a"], UP["b"]]).mean()) < 0.15


def test_planted_markers_are_the_top_markers():
    adata = _counts(200, seed=1)
    markers = top_markers(
        adata.X, adata.obs["cell_type"].to_numpy(), CLASSES, n_top=20, var_names=adata.var_names
    )
    for c in CLASSES:
        planted = {f"g{j}" for j in UP[c]}
        assert len(planted & set(markers[c])) >= 18, c
    same = marker_overlap(markers, markers)
    assert (same == 1.0).all()


def test_evaluate_de_metrics_against_their_control():
    train, real = _counts(100, seed=2), _counts(120, seed=3)
    good = _counts(120, seed=4)  # the same population
    flat = _counts(120, seed=5, flatten=True)  # every type right on average, no differences
    swapped = good.copy()
    swapped.obs["cell_type"] = pd.Categorical(
        swapped.obs["cell_type"].astype(str).map(dict(zip(CLASSES, CLASSES[::-1], strict=True)))
    )
    out = {}
    for name, gen in (("good", good), ("flat", flat), ("swapped", swapped)):
        rep = sb.tl.evaluate(gen, real, "cell_type", train=train, de_pairs=[("a", "b")], seed=0)
        out[name] = rep[rep["space"] == "genes"].set_index(["group", "metric"])
    good_rows, flat_rows, swap_rows = out["good"], out["flat"], out["swapped"]
    for metric in ("de_lfc_spearman", "de_marker_overlap"):
        assert 0.9 < good_rows.loc[("mean", metric), "ratio"] < 1.1, metric
        assert good_rows.loc[("mean", metric), "control"] > 0.5, metric
        assert flat_rows.loc[("mean", metric), "generated"] < 0.3, metric
        assert swap_rows.loc[("mean", metric), "generated"] < 0.3, metric
    # the pair row is reported but stays out of the class mean
    assert ("a vs b", "de_lfc_spearman") in good_rows.index
    assert good_rows.loc[("a vs b", "de_lfc_spearman"), "generated"] > 0.5
    n_means = good_rows.loc[("mean", "de_lfc_spearman"), "n_cells"]
    assert n_means == sum(good_rows.loc[(c, "de_lfc_spearman"), "n_cells"] for c in CLASSES)


def test_de_bad_input():
    adata = _counts(20, seed=6)
    labels = adata.obs["cell_type"].to_numpy()
    with pytest.raises(ValueError, match="no cells"):
        log_fold_changes(adata.X, labels, ["a", "zeta"])
    with pytest.raises(ValueError, match="two groups"):
        log_fold_changes(adata.X, labels, ["a"])
    with pytest.raises(ValueError, match="de_pairs"):
        sb.tl.evaluate(adata, _counts(20, seed=7), "cell_type", de_pairs=[("a", "q")])
    constant = lfc_spearman(pd.DataFrame({"x": np.ones(5)}), pd.DataFrame({"x": np.arange(5.0)}))
    assert np.isnan(constant["x"])  # a constant fold change has no ranking


def test_top_markers_needs_two_groups_and_at_least_one_gene():
    x = np.random.default_rng(0).random((20, 5))
    labels = ["a"] * 10 + ["b"] * 10
    with pytest.raises(ValueError, match="at least two groups"):
        top_markers(x, labels, ["a"])
    with pytest.raises(ValueError, match="n_top must be a whole number >= 1"):
        top_markers(x, labels, ["a", "b"], n_top=0)
