"""Known answers for the distance, classifier and gene-level metrics."""

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.decomposition import PCA

import scbranch as sb
from scbranch.metrics import (
    classifier_auroc,
    gene_mean_ceiling,
    gene_moment_spearman,
    median_bandwidth,
    mmd_rbf,
    wasserstein2,
    zero_fraction,
    zero_fraction_error,
)


def test_w2_matches_hand_computed_values():
    # two points moved up by 1: the optimal plan is vertical, cost 1
    assert wasserstein2([[0.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]) == pytest.approx(1.0)
    # 1-d: the optimal plan matches sorted values: (0->2, 1->2, 3->5) costs 4, 1, 4
    x, y = np.array([[3.0], [0.0], [1.0]]), np.array([[2.0], [5.0], [2.0]])
    assert wasserstein2(x, y) == pytest.approx(np.sqrt(3.0))
    # unequal sizes with uniform weights: half the mass moves 1, half moves 1
    assert wasserstein2([[0.0], [2.0]], [[1.0]]) == pytest.approx(1.0)
    # a crossing plan would cost more: ((0,0)->(2,0), (2,0)->(0,0)) = 4 vs 0
    assert wasserstein2([[0.0, 0.0], [2.0, 0.0]], [[2.0, 0.0], [0.0, 0.0]]) == pytest.approx(0.0)


def test_w2_of_a_translated_cloud_is_the_shift():
    x = np.random.default_rng(0).normal(size=(150, 5))
    shift = np.array([3.0, -1.0, 0.0, 2.0, 0.5])
    assert wasserstein2(x, x) == pytest.approx(0.0, abs=1e-9)
    assert wasserstein2(x, x + shift) == pytest.approx(np.linalg.norm(shift), rel=1e-6)


def test_mmd_known_value_and_identity():
    # one point each, sigma = 1: k(x,x) = k(y,y) = 1, k(x,y) = exp(-1/2)
    assert mmd_rbf([[0.0]], [[1.0]], bandwidths=[1.0]) == pytest.approx(2 - 2 * np.exp(-0.5))
    # the default sums the five kernels of EVALUATION.md
    expected = sum(2 - 2 * np.exp(-1 / (2 * s * s)) for s in (0.01, 0.1, 1, 10, 100))
    assert mmd_rbf([[0.0]], [[1.0]]) == pytest.approx(expected)
    x = np.random.default_rng(1).normal(size=(80, 4))
    assert mmd_rbf(x, x) == 0.0
    assert mmd_rbf(x, x.copy(), bandwidths="median") == 0.0
    assert median_bandwidth([[0.0], [1.0]], [[3.0]]) == pytest.approx(2.0)
    # one bandwidth as a number (it raised "'float' object is not iterable"); NaN refused
    assert mmd_rbf([[0.0]], [[1.0]], bandwidths=1.0) == pytest.approx(2 - 2 * np.exp(-0.5))
    with pytest.raises(ValueError, match="bandwidths must be positive"):
        mmd_rbf([[0.0]], [[1.0]], bandwidths=[np.nan])


def test_mmd_separates_distributions_it_should():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(200, 5)), rng.normal(size=(200, 5))
    far = rng.normal(size=(200, 5)) + 2.0
    for bw in ("median", [1.0, 10.0]):
        same, diff = mmd_rbf(a, b, bandwidths=bw), mmd_rbf(a, far, bandwidths=bw)
        assert same < 0.05 < diff
        assert diff > 10 * same


def test_auroc_identical_and_same_distribution_is_one_half():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 10))
    # exact copies land in the same fold: no anti-learning artefact (it gave ~0.02)
    assert classifier_auroc(x, x.copy()) == pytest.approx(0.5, abs=1e-9)
    assert classifier_auroc(x, x.copy(), n_folds=None) == pytest.approx(0.5, abs=1e-9)
    y = rng.normal(size=(200, 10))
    assert abs(classifier_auroc(x, y, seed=0) - 0.5) < 0.1
    assert classifier_auroc(x, y + 3.0) > 0.99
    with pytest.raises(ValueError, match="at least 4 cells"):
        classifier_auroc(x[:3], y)
    with pytest.raises(ValueError, match="too few to score"):  # it gave 1.0 on one cell a side
        classifier_auroc(x[:50], y[:50], n_folds=None, test_size=0.01)


def test_auroc_catches_a_collapsed_set_even_when_it_copies_a_real_cell():
    # the copies of a collapsed generator spread over the folds and are learnt; only a copy with
    # a partner in the other set is kept with it (all copies in one fold scored 0.15)
    r = np.random.default_rng(0).normal(size=(50, 30))
    assert classifier_auroc(np.repeat(r[:1], 50, 0), r) > 0.95
    assert classifier_auroc(np.repeat(r[:1] + 1e-9, 50, 0), r) > 0.95
    assert classifier_auroc(np.repeat(r[:5], 10, 0), r) > 0.85
    # half of the real cells, copied once: each copy still pairs with its original
    assert abs(classifier_auroc(r[:25].copy(), r) - 0.5) < 0.1


@pytest.fixture(scope="module")
def pbmc_pcs():
    adata = sb.datasets.pbmc68k()
    pcs = PCA(30, random_state=0).fit_transform(adata.X.toarray())
    return pcs, adata.obs["cell_type"].astype(str).to_numpy()


def test_two_real_classes_are_told_apart(pbmc_pcs):
    """Monocytes vs B cells: AUROC near 1 and a W2 far above the within-class control."""
    pcs, labels = pbmc_pcs
    rng = np.random.default_rng(0)
    mono = rng.permutation(pcs[labels == "CD14+ Monocyte"])
    bcell = rng.permutation(pcs[labels == "CD19+ B"])
    n = min(len(mono), len(bcell)) // 2
    assert classifier_auroc(mono[:n], bcell[:n]) > 0.97
    within = wasserstein2(mono[:n], mono[n : 2 * n])
    between = wasserstein2(mono[:n], bcell[:n])
    assert between > 1.5 * within
    assert mmd_rbf(mono[:n], bcell[:n], bandwidths="median") > 5 * mmd_rbf(
        mono[:n], mono[n : 2 * n], bandwidths="median"
    )


def test_gene_level_metrics():
    rng = np.random.default_rng(4)
    scale = np.linspace(0.1, 3, 30)
    x, y = rng.gamma(scale, size=(400, 30)), rng.gamma(scale, size=(400, 30))
    rho_mean, rho_var = gene_moment_spearman(x, y)
    assert rho_mean > 0.95 and rho_var > 0.9
    rho_rev, _ = gene_moment_spearman(x, rng.gamma(scale[::-1], size=(400, 30)))
    assert rho_rev < -0.9
    import scipy.sparse as sp

    assert gene_moment_spearman(sp.csr_matrix(x), y) == pytest.approx((rho_mean, rho_var))
    counts = np.array([[0, 1, 2], [0, 0, 3]])
    np.testing.assert_allclose(zero_fraction(counts), [1.0, 0.5, 0.0])
    assert zero_fraction([[0, 1], [0, 0]]).tolist() == [1.0, 0.5]  # a list (AttributeError)
    bad = x.copy()
    bad[0, 0] = np.nan  # both correlations came back NaN, silently
    with pytest.raises(ValueError, match="x contains 1 NaN"):
        gene_moment_spearman(bad, y)
    with pytest.raises(ValueError, match="2-D"):
        gene_moment_spearman(x[0], y[0])
    with pytest.raises(ValueError, match="2-D"):
        zero_fraction(np.zeros(3))
    np.testing.assert_allclose(zero_fraction(sp.csr_matrix(counts)), [1.0, 0.5, 0.0])
    # explicitly stored zeros count as zeros, and the caller's matrix is left as it was
    stored = sp.csc_matrix((np.array([0.0, 1.0, 0.0, 2.0]), ([0, 0, 1, 1], [0, 1, 1, 2])), (2, 3))
    nnz, data = stored.nnz, stored.data.copy()
    np.testing.assert_allclose(zero_fraction(stored), [1.0, 0.5, 0.5])
    assert stored.nnz == nnz and np.array_equal(stored.data, data)
    assert zero_fraction_error(counts, np.array([[1, 1, 0], [0, 1, 3]])) == pytest.approx(
        (0.5 + 0.5 + 0.5) / 3
    )


def _nb_cells(rng, mu, n):
    """n cells of negative-binomial counts (dispersion 2) with per-gene means mu."""
    return rng.negative_binomial(2, 2 / (2 + mu), size=(n, mu.size))


@pytest.mark.parametrize("n_cells", [60, 150])
def test_gene_mean_ceiling_matches_the_true_means_correlation(n_cells):
    # the known answer: how well the TRUE per-gene means rank-correlate with a sample's means
    rng = np.random.default_rng(0)
    mu = np.exp(rng.normal(-2, 1.5, 1000))  # mostly near-zero genes, as in a cell type's HVGs
    samples = [_nb_cells(rng, mu, n_cells) for _ in range(8)]
    truth = np.mean([spearmanr(mu, s.mean(0)).statistic for s in samples])
    estimate = np.mean([gene_mean_ceiling(s, n_splits=20, seed=i) for i, s in enumerate(samples)])
    assert estimate == pytest.approx(truth, abs=0.01)


def test_gene_mean_ceiling_is_an_upper_bound_for_few_cells():
    rng = np.random.default_rng(1)
    mu = np.exp(rng.normal(-2, 1.5, 1000))
    for n_cells in (6, 12):
        s = _nb_cells(rng, mu, n_cells)
        assert gene_mean_ceiling(s) >= spearmanr(mu, s.mean(0)).statistic
    # the ceiling falls with fewer cells, and noiseless cells allow a perfect ranking
    assert gene_mean_ceiling(_nb_cells(rng, mu, 10)) < gene_mean_ceiling(_nb_cells(rng, mu, 200))
    assert gene_mean_ceiling(np.tile(mu, (6, 1))) == pytest.approx(1.0)
    import scipy.sparse as sp

    s = _nb_cells(rng, mu, 40)
    assert gene_mean_ceiling(sp.csr_matrix(s)) == pytest.approx(gene_mean_ceiling(s))
    with pytest.raises(ValueError, match="at least 4 cells"):
        gene_mean_ceiling(s[:3])
    with pytest.raises(ValueError, match="n_splits"):
        gene_mean_ceiling(s, n_splits=0)
    s = s.astype(float)
    s[0, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        gene_mean_ceiling(s)


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="different numbers of features"):
        wasserstein2(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="non-empty 2-d"):
        mmd_rbf(np.zeros((0, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="'median'"):
        mmd_rbf(np.zeros((3, 2)), np.zeros((3, 2)), bandwidths="mean")
    # NaN is named (it gave a NaN distance), sparse cells are the dense ones
    with pytest.raises(ValueError, match="`x` contains 1 NaN"):
        mmd_rbf(np.array([[np.nan, 0.0], [1.0, 2.0]]), np.zeros((3, 2)))
    import scipy.sparse as sp

    x, y = np.random.default_rng(0).normal(size=(2, 20, 3))
    assert mmd_rbf(sp.csr_matrix(x), y) == mmd_rbf(x, y)
    assert wasserstein2(sp.csr_matrix(x), y) == wasserstein2(x, y)


def test_auroc_catches_a_collapsed_set():
    """Many copies of one cell inside a set are not 'shared copies': collapse scores ~1."""
    rng = np.random.default_rng(5)
    real = rng.normal(size=(100, 10))
    collapsed = np.repeat(real.mean(0, keepdims=True), 100, axis=0)
    assert classifier_auroc(collapsed, real) > 0.9
    assert classifier_auroc(collapsed, real, n_folds=None) > 0.9


def test_mmd_in_blocks_equals_the_full_kernel_matrices(monkeypatch):
    # three n x n matrices ran 10,000 cells a side into 4 GB; blocks of rows give the same MMD
    from scipy.spatial.distance import cdist

    from scbranch.metrics import _distances

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(230, 5)), rng.normal(0.3, 1.2, size=(170, 5))

    def full(sigma):
        k = lambda a, b: np.exp(-cdist(a, b, "sqeuclidean") / (2 * sigma**2)).mean()  # noqa: E731
        return k(x, x) + k(y, y) - 2 * k(x, y)

    expected = sum(full(s) for s in (0.5, 2.0))
    monkeypatch.setattr(_distances, "_BLOCK_ROWS", 64)  # several blocks, one partial
    assert sb.metrics.mmd_rbf(x, y, bandwidths=[0.5, 2.0]) == pytest.approx(expected, rel=1e-12)


def test_median_bandwidth_of_many_cells_reads_a_sample_near_the_exact_median(monkeypatch):
    from scipy.spatial.distance import pdist

    from scbranch.metrics import _distances

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(700, 4)), rng.normal(1.0, 1.0, size=(500, 4))
    exact = np.median(pdist(np.vstack([x, y])))
    assert sb.metrics.median_bandwidth(x, y) == pytest.approx(exact, rel=1e-12)  # below cap
    monkeypatch.setattr(_distances, "MEDIAN_SAMPLE", 600)
    sampled = sb.metrics.median_bandwidth(x, y)
    assert sampled != exact and sampled == pytest.approx(exact, rel=0.03)
    assert sb.metrics.median_bandwidth(x, y) == sampled  # seeded


def test_metrics_name_bad_input_instead_of_failing_inside():
    # lists failed on .shape, 1-D on an index, NaN and no cells passed into the numbers,
    # a kNN with too few training cells raised scikit-learn's n_neighbors error
    from scbranch.metrics import (
        centroid_spread,
        gene_mean_ceiling,
        label_fidelity,
        top_markers,
        zero_fraction_error,
    )

    assert zero_fraction_error([[0, 1], [0, 0]], [[0, 1], [1, 1]]) == 0.5
    for bad, match in (
        ([0, 1], "2-D"),
        (np.zeros((0, 2)), "at least one cell"),
        (np.array([[np.nan, 1.0]]), "NaN"),
    ):
        with pytest.raises(ValueError, match=match):
            zero_fraction_error(bad, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="2-D"):
        gene_mean_ceiling(np.arange(10.0))
    nan = np.full((10, 3), np.nan)
    with pytest.raises(ValueError, match="NaN"):
        top_markers(nan, ["a"] * 5 + ["b"] * 5, ["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        centroid_spread(nan, ["a"] * 10, np.ones((10, 3)), ["a"] * 10)
    x = np.random.default_rng(0).normal(size=(4, 2))
    with pytest.raises(ValueError, match="at least 15 training cells"):
        label_fidelity(x, ["a"] * 4, x[:1], ["a"], x, ["a"] * 4)
