"""Known answers for the instrument: real cells nobody saw must score like the control.

``tl.evaluate`` fits its reference space only on cells it does not compare. These tests judge
samples of ONE population (Gaussian expression and negative-binomial counts) in a space fitted
on a third sample: the AUROC must sit at 0.5 and every ratio at 1, within noise. With many
genes and few cells per class a PCA fitted on the compared cells inflates their spread, which
is what the old rule ("fit on all real cells") did; ``test_old_rule_is_biased`` shows that bias
on the same data, so the first tests could fail. A shifted population must be caught.
"""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import scbranch as sb
from scbranch.metrics import ReferencePCA, classifier_auroc, split_for_fitting

# The Gaussian populations' features are signed, which evaluate warns about for expression
# (z-scores of sc.pp.scale); here they are the point: the instrument on any continuous data.
pytestmark = pytest.mark.filterwarnings("ignore:.* holds negative values:UserWarning")

CLASSES = ["alpha", "beta", "gamma"]
N_GENES = 300
N_PER_CLASS = 60  # few cells, many genes: where in-sample PCA scores inflate
LOW_RANK = 12


def _population(seed: int = 0) -> dict:
    """Class means and a shared low-rank loading: the structure a PCA finds."""
    rng = np.random.default_rng(seed)
    return {
        "means": rng.normal(0.0, 1.0, size=(len(CLASSES), N_GENES)),
        "loadings": rng.normal(0.0, 1.0, size=(LOW_RANK, N_GENES)) / np.sqrt(LOW_RANK),
        "log_mu": rng.normal(0.0, 1.0, size=(len(CLASSES), N_GENES)),
    }


def _obs(n: int, tag: str) -> pd.DataFrame:
    labels = np.repeat(CLASSES, n)
    return pd.DataFrame(
        {"cell_type": pd.Categorical(labels, categories=CLASSES)},
        index=[f"{tag}{i}" for i in range(len(labels))],
    )


def _gaussian(pop: dict, seed: int, n: int = N_PER_CLASS, shift: float = 0.0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(len(CLASSES)), n)
    z = rng.normal(size=(len(codes), LOW_RANK)) * 2.0
    x = pop["means"][codes] + z @ pop["loadings"] + rng.normal(size=(len(codes), N_GENES))
    x[:, :20] += shift
    return ad.AnnData(
        X=x.astype(np.float32),
        obs=_obs(n, f"g{seed}_"),
        var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)]),
    )


def _nb_counts(pop: dict, seed: int, n: int = N_PER_CLASS, shift: float = 0.0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    codes = np.repeat(np.arange(len(CLASSES)), n)
    z = rng.normal(size=(len(codes), LOW_RANK)) * 0.5
    log_mu = pop["log_mu"][codes] + z @ pop["loadings"] + 1.0
    log_mu[:, :20] += shift
    mu = np.exp(log_mu) * rng.lognormal(0.0, 0.2, size=(len(codes), 1))
    counts = rng.negative_binomial(4, 4 / (4 + mu)).astype(np.float32)
    adata = ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=_obs(n, f"n{seed}_"),
        var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)]),
    )
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def _means(report: pd.DataFrame) -> pd.DataFrame:
    return report[report["group"] == "mean"].set_index(["space", "metric"])


#: independent replicates: each draws its own real and "generated" samples of the population
N_REPLICATES = 6
#: a difference from the control is "noise" below this many standard errors: the two-sided
#: 0.1 % quantile of Student's t with N_REPLICATES - 1 degrees of freedom (about 20 metrics are
#: tested per population, so a 3-sigma rule would fail by chance in about half the runs)
T_LIMIT = 6.87


@pytest.fixture(scope="module", params=["gaussian", "nb"])
def same_population(request):
    make = _gaussian if request.param == "gaussian" else _nb_counts
    pop = _population()
    train = make(pop, 1)  # the third sample: the only cells the judging space is fitted on
    reports = [
        sb.tl.evaluate(
            make(pop, 10 + k),
            make(pop, 30 + k, n=2 * N_PER_CLASS),
            "cell_type",
            train=train,
            seed=k,
        )  # fmt: skip
        for k in range(N_REPLICATES)
    ]
    shifted = sb.tl.evaluate(
        make(pop, 20, shift=3.0), make(pop, 30, n=2 * N_PER_CLASS), "cell_type", train=train
    )
    return request.param, reports, shifted


def test_unseen_sample_of_the_same_population_scores_like_the_control(same_population):
    kind, reports, _ = same_population
    per_rep = pd.concat([_means(r) for r in reports], keys=range(len(reports)))
    diff = (per_rep["generated"] - per_rep["control"]).groupby(level=[1, 2])
    mean, se = diff.mean(), diff.std() / np.sqrt(len(reports))
    # within noise: the mean difference from the control is under T_LIMIT standard errors
    for key in mean.index:
        assert abs(mean[key]) <= T_LIMIT * se[key] + 1e-9, (kind, key, mean[key], se[key])
    ratio = per_rep["ratio"].groupby(level=[1, 2]).mean()
    auroc = per_rep.loc[(slice(None), "reference_pca", "auroc"), "generated"].mean()
    assert abs(auroc - 0.5) < 0.05, (kind, auroc)
    assert 0.95 < ratio[("reference_pca", "dispersion")] < 1.05, kind
    stable = ["w2", "mmd", "label_fidelity"]
    for metric in stable:
        assert 0.9 < ratio[("reference_pca", metric)] < 1.1, (kind, metric)
    for metric in ("gene_mean_spearman", "gene_var_spearman", "de_lfc_spearman"):
        assert 0.9 < ratio[("genes", metric)] < 1.1, (kind, metric)


def test_shifted_population_is_caught(same_population):
    kind, _, shifted = same_population
    assert _means(shifted).loc[("reference_pca", "auroc"), "generated"] >= 0.9, kind


def test_without_train_a_held_apart_part_of_real_fits_the_space():
    pop = _population()
    real, unseen = _gaussian(pop, 2, n=3 * N_PER_CLASS), _gaussian(pop, 3, n=2 * N_PER_CLASS)
    report = sb.tl.evaluate(unseen, real, "cell_type", seed=0)
    assert "held apart" in report.attrs["reference"]
    m = _means(report)
    assert abs(m.loc[("reference_pca", "auroc"), "generated"] - 0.5) < 0.08
    assert 0.9 < m.loc[("reference_pca", "dispersion"), "ratio"] < 1.1
    # 30 % of each class fits the space; halves come from the other 70 %
    per_class = report[(report["metric"] == "w2") & (report["group"] != "mean")]
    assert (per_class["n_cells"] == (3 * N_PER_CLASS - round(0.3 * 3 * N_PER_CLASS)) // 2).all()


def test_old_rule_is_biased():
    """A PCA fitted on the compared real cells makes unseen real cells look different."""
    pop = _population()
    train, real = _gaussian(pop, 1), _gaussian(pop, 2, n=2 * N_PER_CLASS)
    unseen = _gaussian(pop, 3, n=N_PER_CLASS)
    labels = real.obs["cell_type"].to_numpy()
    aurocs = {}
    for rule, fit in (("old", np.vstack([real.X, train.X])), ("new", train.X)):
        pca = ReferencePCA(30).fit(fit)
        values = []
        for c in CLASSES:
            b = pca.transform(real.X[labels == c][:N_PER_CLASS])
            u = pca.transform(unseen.X[unseen.obs["cell_type"].to_numpy() == c])
            values.append(classifier_auroc(u, b, seed=0))
        aurocs[rule] = float(np.mean(values))
    assert aurocs["old"] > 0.6 and abs(aurocs["new"] - 0.5) < 0.08, aurocs


def test_split_for_fitting_is_stratified_seeded_and_keeps_cells_to_compare():
    labels = np.array(["a"] * 50 + ["b"] * 10 + ["c"] * 2)
    fit, rest = split_for_fitting(labels, 0.3, seed=0)
    assert len(np.intersect1d(fit, rest)) == 0 and len(fit) + len(rest) == len(labels)
    counts = pd.Series(labels[fit]).value_counts()
    assert counts["a"] == 15 and counts["b"] == 3 and "c" not in counts
    again, _ = split_for_fitting(labels, 0.3, seed=0)
    other, _ = split_for_fitting(labels, 0.3, seed=1)
    np.testing.assert_array_equal(fit, again)
    assert not np.array_equal(fit, other)
    # adding a class does not move another class's split
    more, _ = split_for_fitting(np.r_[labels, ["d"] * 8], 0.3, seed=0)
    np.testing.assert_array_equal(fit, more[: len(fit)])
    with pytest.raises(ValueError, match="fraction"):
        split_for_fitting(labels, 1.0, seed=0)


def test_reference_pca_projects_out_of_sample_and_refuses_use_before_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    with pytest.raises(RuntimeError, match="Fit"):
        ReferencePCA(3).transform(x)
    ref = ReferencePCA(3).fit(x)
    assert ref.n_components_ == 3 and ref.n_fit_cells_ == 50
    # centred with the fitting cells' mean: a shifted copy keeps its shift
    np.testing.assert_allclose(ref.transform(x + 0.0), ref.transform(x))
    assert np.abs(ref.transform(x).mean(0)).max() < 1e-10
    with pytest.raises(ValueError, match="Too few"):
        ReferencePCA(3).fit(x[:1])


def test_quality_report_judges_in_a_pca_of_the_training_cells():
    pop = _population()
    train, held, unseen = _gaussian(pop, 1), _gaussian(pop, 2), _gaussian(pop, 3)
    report = sb.metrics.quality_report(unseen, train, held, labels_key="cell_type")
    np.testing.assert_allclose(report["spread_vs_heldout"], 1.0, atol=0.1)
    assert abs(report["spread_vs_heldout"].mean() - 1.0) < 0.04
    # the training cells ARE in-sample for that PCA: more spread than any new cell
    assert report["spread_vs_train"].mean() < report["spread_vs_heldout"].mean()
    np.testing.assert_allclose(report["knn_generated"], report["knn_control"], atol=0.05)


@pytest.fixture(scope="module")
def pbmc68k_halves():
    """scanpy's shipped pbmc68k_reduced cut into two random halves (real cells only)."""
    adata = sb.datasets.pbmc68k()
    order = np.random.default_rng(0).permutation(adata.n_obs)
    half = adata.n_obs // 2
    return adata[np.sort(order[:half])].copy(), adata[np.sort(order[half:])].copy()


def test_two_halves_of_real_pbmcs_without_train_are_indistinguishable(pbmc68k_halves):
    first, second = pbmc68k_halves
    report = sb.tl.evaluate(first, second, "cell_type", seed=0)
    auroc = _means(report).loc[("reference_pca", "auroc")]
    assert auroc["generated"] <= 0.6, auroc  # the old rule (PCA on `real`) gave 0.77
    assert abs(auroc["generated"] - auroc["control"]) < 0.1, auroc


def test_monocytes_labelled_as_b_cells_are_caught(pbmc68k_halves):
    first, second = pbmc68k_halves
    fake = first[first.obs["cell_type"] == "CD14+ Monocyte"].copy()
    fake.obs["cell_type"] = pd.Categorical(
        ["CD19+ B"] * fake.n_obs, categories=first.obs["cell_type"].cat.categories
    )
    report = sb.tl.evaluate(fake, second, "cell_type", seed=0, metrics=["auroc"])
    assert _means(report).loc[("reference_pca", "auroc"), "generated"] >= 0.9
