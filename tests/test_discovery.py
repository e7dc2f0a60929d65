import itertools
import time

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scbranch.datasets._simulate import simulate_tree
from scbranch.module import VPSDE, discover_hierarchy, global_standardizer
from scbranch.module._discovery import (
    agglomerate,
    agglomerate_average,
    crossover_times,
    similarity_curves,
    smoothed,
)


def brute_curves(xt: np.ndarray, labels: np.ndarray, n_classes: int):
    """O(n^2) mean pairwise cosine similarity, distinct cells only within a class."""
    u = xt / np.linalg.norm(xt, axis=1, keepdims=True)
    cos = u @ u.T
    inter = np.zeros((n_classes, n_classes))
    for a, b in itertools.product(range(n_classes), repeat=2):
        ia, ib = np.flatnonzero(labels == a), np.flatnonzero(labels == b)
        vals = [cos[i, j] for i in ia for j in ib if i != j]
        inter[a, b] = np.mean(vals)
    return np.diag(inter).copy(), inter


def _tiny():
    rng = np.random.default_rng(0)
    means = np.array([[3.0, 0, 0, 1], [0, 3.0, 0, 1], [0, 0, -3.0, 1]])
    counts = [5, 7, 4]
    labels = np.repeat(np.arange(3), counts)
    x = means[labels] + rng.normal(size=(len(labels), 4))
    perm = rng.permutation(len(labels))  # classes need not be contiguous
    return x[perm], labels[perm]


def test_similarity_curves_equal_brute_force_at_t0():
    x, labels = _tiny()
    intra, inter = similarity_curves(x, labels, 3, VPSDE(), np.array([0.0]), seed=3)
    b_intra, b_inter = brute_curves(x, labels, 3)
    np.testing.assert_allclose(intra[:, 0], b_intra, atol=1e-5)
    np.testing.assert_allclose(inter[:, :, 0], b_inter, atol=1e-5)
    np.testing.assert_allclose(inter[:, :, 0], inter[:, :, 0].T, atol=1e-6)


def test_similarity_curves_equal_brute_force_with_same_noise():
    x, labels = _tiny()
    sde = VPSDE()
    times = np.array([0.0, 0.2, 0.45, 0.7, 1.0])
    seed = 11
    intra, inter = similarity_curves(x, labels, 3, sde, times, seed=seed)
    assert intra.shape == (3, 5) and inter.shape == (3, 3, 5)
    # replicate the forward noise: one generator seeded with `seed`, one draw of (T, n, d)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(times), *x.shape), generator=gen)
    t = torch.as_tensor(times, dtype=torch.float32)
    xt = sde.alpha(t).view(-1, 1, 1) * torch.as_tensor(x, dtype=torch.float32)
    xt = (xt + sde.sigma(t).view(-1, 1, 1) * noise).double().numpy()
    for k in range(len(times)):
        b_intra, b_inter = brute_curves(xt[k], labels, 3)
        np.testing.assert_allclose(intra[:, k], b_intra, atol=1e-5)
        np.testing.assert_allclose(inter[:, :, k], b_inter, atol=1e-5)
    # at t = 1 (pure noise) every similarity is near 0; at t = 0 the classes are well apart
    assert np.abs(inter[:, :, -1]).max() < 0.5
    assert intra[:, 0].min() > 0.5 and inter[0, 1, 0] < 0.3
    # a different seed gives different curves at t > 0 and identical ones at t = 0
    intra2, _ = similarity_curves(x, labels, 3, sde, times, seed=seed + 1)
    np.testing.assert_allclose(intra2[:, 0], intra[:, 0], atol=1e-6)
    assert np.abs(intra2[:, 1:] - intra[:, 1:]).max() > 1e-3


def test_similarity_curves_do_not_depend_on_chunking():
    sim = simulate_tree(depth=2, n_per_class=12, dim=8, seed=0)
    times = np.linspace(0, 1, 9)
    a = similarity_curves(sim.x, sim.labels, 4, VPSDE(), times, seed=2)
    b = similarity_curves(
        sim.x, sim.labels, 4, VPSDE(), times, seed=2, max_chunk_elements=sim.x.size * 2
    )  # 2 times per chunk
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)


def test_similarity_curves_average_noise_draws_exactly():
    """n_draws=k is the mean of k curves, each noised by the next draw of one generator."""
    x, labels = _tiny()
    sde = VPSDE()
    times = np.array([0.0, 0.3, 0.6])
    seed, k = 5, 3
    intra, inter = similarity_curves(x, labels, 3, sde, times, seed=seed, n_draws=k)
    gen = torch.Generator().manual_seed(seed)
    t = torch.as_tensor(times, dtype=torch.float32)
    mean = torch.as_tensor(x, dtype=torch.float32) * sde.alpha(t).view(-1, 1, 1)
    b_intra, b_inter = np.zeros((3, 3)), np.zeros((3, 3, 3))
    for _ in range(k):
        noise = torch.randn((len(times), *x.shape), generator=gen)
        xt = (mean + sde.sigma(t).view(-1, 1, 1) * noise).double().numpy()
        for j in range(len(times)):
            i_j, e_j = brute_curves(xt[j], labels, 3)
            b_intra[:, j] += i_j / k
            b_inter[:, :, j] += e_j / k
    np.testing.assert_allclose(intra, b_intra, atol=1e-5)
    np.testing.assert_allclose(inter, b_inter, atol=1e-5)
    # one draw is the first draw: the curves of the default call
    one = similarity_curves(x, labels, 3, sde, times, seed=seed)
    again = similarity_curves(x, labels, 3, sde, times, seed=seed, n_draws=1)
    np.testing.assert_array_equal(one[0], again[0])
    with pytest.raises(ValueError, match="n_draws must be at least 1"):
        similarity_curves(x, labels, 3, sde, times, n_draws=0)


def test_similarity_curves_noise_draws_shrink_the_spread():
    """Averaging 16 draws divides the seed-to-seed sd of the curves by about 4 (sqrt 16)."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(8, 5)) + 1.5, rng.normal(size=(8, 5)) - 1.5])
    labels = np.repeat([0, 1], 8)
    times = np.array([0.4, 0.6])

    def spread(n_draws):
        curves = [
            similarity_curves(x, labels, 2, VPSDE(), times, seed=s, n_draws=n_draws)[1]
            for s in range(12)
        ]
        return np.std(curves, axis=0).mean()

    ratio = spread(16) / spread(1)
    assert 0.12 < ratio < 0.5


def brute_expected(x, labels, n_classes, sde, t):
    """O(n^2) mean of the many-dimension cosine limit over the same pairs as brute_curves."""
    a, s = float(sde.alpha(t)), float(sde.sigma(t))
    d = x.shape[1]
    norms = np.sqrt(a**2 * (x**2).sum(1) + s**2 * d)
    cos = a**2 * (x @ x.T) / np.outer(norms, norms)
    inter = np.zeros((n_classes, n_classes))
    for i, j in itertools.product(range(n_classes), repeat=2):
        ia, ib = np.flatnonzero(labels == i), np.flatnonzero(labels == j)
        inter[i, j] = np.mean([cos[p, q] for p in ia for q in ib if p != q])
    return np.diag(inter).copy(), inter


def test_expected_curves_equal_brute_force_and_ignore_the_seed():
    x, labels = _tiny()
    sde = VPSDE()
    times = np.array([0.0, 0.2, 0.5, 0.9])
    intra, inter = similarity_curves(x, labels, 3, sde, times, curves="expected", seed=1)
    for k, t in enumerate(times):
        b_intra, b_inter = brute_expected(x, labels, 3, sde, t)
        np.testing.assert_allclose(intra[:, k], b_intra, atol=1e-5)
        np.testing.assert_allclose(inter[:, :, k], b_inter, atol=1e-5)
    # at t = 0 (no noise) it is the exact clean cosine, as the sampled curves are
    np.testing.assert_allclose(intra[:, 0], brute_curves(x, labels, 3)[0], atol=1e-5)
    again = similarity_curves(x, labels, 3, sde, times, curves="expected", seed=99)
    np.testing.assert_array_equal(again[1], inter)
    with pytest.raises(ValueError, match="curves must be one of"):
        similarity_curves(x, labels, 3, sde, times, curves="mean")


def test_expected_curves_are_the_mean_of_sampled_ones_in_many_dimensions():
    """Known answer: two point masses +-2 (cosine limit a^2 4 / (a^2 4 + s^2)), and the mean
    of many sampled draws of Gaussian classes in 300 dimensions."""
    sde = VPSDE()
    d = 300
    x = np.concatenate([np.full((5, d), 2.0), np.full((5, d), -2.0)])
    labels = np.repeat([0, 1], 5)
    intra, inter = similarity_curves(x, labels, 2, sde, np.array([0.5]), curves="expected")
    a, s = float(sde.alpha(0.5)), float(sde.sigma(0.5))
    assert intra[0, 0] == pytest.approx(a**2 * 4 / (a**2 * 4 + s**2), rel=1e-5)
    assert inter[0, 1, 0] == pytest.approx(-(a**2) * 4 / (a**2 * 4 + s**2), rel=1e-5)

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, d))
    labels = np.repeat([0, 1, 2], 30)
    x = centres[labels] * 0.8 + rng.normal(size=(90, d))
    times = np.linspace(0.05, 0.95, 10)
    expected = similarity_curves(x, labels, 3, sde, times, curves="expected")
    sampled = similarity_curves(x, labels, 3, sde, times, n_draws=16, seed=0)
    np.testing.assert_allclose(expected[1], sampled[1], atol=0.01)


def test_similarity_curves_statistics_at_intermediate_t():
    """Two point masses at +-m*1: cosine of noised cells is ~ +-a^2 m^2 / (a^2 m^2 + s^2)."""
    d, n = 20, 300
    x = np.concatenate([np.full((n, d), 2.0), np.full((n, d), -2.0)])
    labels = np.repeat([0, 1], n)
    sde = VPSDE()
    times = np.array([0.5])
    intra, inter = similarity_curves(x, labels, 2, sde, times, seed=0)
    # x_t = a*m*1 + s*eps, |a m 1|^2 = a^2 m^2 d; cos between two cells of one class:
    # ~ a^2 m^2 d / (a^2 m^2 d + s^2 d) for large d
    a, s = float(sde.alpha(0.5)), float(sde.sigma(0.5))
    expected = a**2 * 4 / (a**2 * 4 + s**2)
    assert intra[0, 0] == pytest.approx(expected, abs=0.03)
    assert intra[1, 0] == pytest.approx(expected, abs=0.03)
    assert inter[0, 1, 0] == pytest.approx(-expected, abs=0.03)


def test_similarity_curves_need_two_cells_per_class():
    x = np.random.default_rng(0).normal(size=(5, 3))
    with pytest.raises(ValueError, match="Class index 1 has 1 cell"):
        similarity_curves(x, np.array([0, 0, 1, 2, 2]), 3, VPSDE(), np.array([0.0, 0.5]))


def test_crossover_linear_curves_exact():
    times = np.linspace(0, 1, 11)
    intra = np.full((2, 11), 0.5)
    inter = np.zeros((2, 2, 11))
    inter[0, 1] = inter[1, 0] = 0.7 * times
    cross = crossover_times(intra, inter, times, epsilon=0.0)
    assert cross[0, 1] == pytest.approx(0.5 / 0.7, abs=1e-12)
    assert cross[1, 0] == cross[0, 1] and cross[0, 0] == 0 and cross[1, 1] == 0
    cross = crossover_times(intra, inter, times, epsilon=0.1)
    assert cross[0, 1] == pytest.approx(0.4 / 0.7, abs=1e-12)
    # intra curves averaged: (0.3 + 0.7) / 2 = 0.5 again
    intra2 = np.vstack([np.full(11, 0.3), np.full(11, 0.7)])
    assert crossover_times(intra2, inter, times, epsilon=0.0)[0, 1] == pytest.approx(0.5 / 0.7)


def test_crossover_interpolates_between_grid_points_and_takes_first():
    times = np.linspace(0, 1, 5)  # 0, .25, .5, .75, 1
    intra = np.full((3, 5), 1.0)
    inter = np.zeros((3, 3, 5))
    # pair (0, 1): gap = inter - 1 = -1, -0.6, +0.2, -0.1, +0.5 -> first crossing in (0.25, 0.5)
    inter[0, 1] = inter[1, 0] = [0.0, 0.4, 1.2, 0.9, 1.5]
    # pair (0, 2): already crossed at t = 0
    inter[0, 2] = inter[2, 0] = [1.0, 1.0, 1.0, 1.0, 1.0]
    # pair (1, 2): crosses exactly on the grid point 0.75
    inter[1, 2] = inter[2, 1] = [0.0, 0.1, 0.5, 1.0, 1.0]
    cross = crossover_times(intra, inter, times, epsilon=0.0)
    assert cross[0, 1] == pytest.approx(0.25 + 0.6 / 0.8 * 0.25, abs=1e-12)
    assert cross[0, 2] == 0.0
    assert cross[1, 2] == pytest.approx(0.75, abs=1e-12)


def test_crossover_never_crossing_names_the_pair():
    times = np.linspace(0, 1, 6)
    intra = np.full((3, 6), 0.8)
    inter = np.full((3, 3, 6), 0.8)
    inter[1, 2] = inter[2, 1] = 0.2
    with pytest.raises(ValueError, match="'NK'.*'B cells'.*epsilon") as err:
        crossover_times(intra, inter, times, classes=["T", "NK", "B cells"])
    assert "'T'" not in str(err.value)
    # without names the indices are used
    with pytest.raises(ValueError, match="'1' and '2'"):
        crossover_times(intra, inter, times)


def test_agglomerate_min_branch_length_and_monotone_times():
    cross = np.array(
        [
            [0.0, 0.10, 0.11, 0.60],
            [0.10, 0.0, 0.40, 0.61],
            [0.11, 0.40, 0.0, 0.105],
            [0.60, 0.61, 0.105, 0.0],
        ]
    )
    agg = agglomerate(cross, min_branch_length=0.02)
    assert [(set(a), set(b)) for a, b, _ in agg.merges] == [
        ({0}, {1}),
        ({2}, {3}),
        ({0, 1}, {2, 3}),
    ]
    times = [t for *_, t in agg.merges]
    assert times == pytest.approx([0.10, 0.105, 0.125])  # 0.11 pushed to 0.105 + 0.02
    assert agg.short_pairs == [(0, 2, 0.11)]
    # without a minimum the crossover time is kept
    agg0 = agglomerate(cross, min_branch_length=0.0)
    assert [t for *_, t in agg0.merges] == pytest.approx([0.10, 0.105, 0.11])
    assert agg0.short_pairs == []


def test_agglomerate_random_matrices_give_valid_trees():
    rng = np.random.default_rng(0)
    from scbranch.module import BranchTree

    for _ in range(20):
        c = 7
        m = rng.uniform(0, 0.7, size=(c, c))
        cross = np.triu(m, 1) + np.triu(m, 1).T
        cross[0, 1] = cross[1, 0] = 0.001  # nearly indistinguishable pair
        agg = agglomerate(cross, min_branch_length=0.03)
        tree = BranchTree.from_merges([f"c{i}" for i in range(c)], agg.merges)
        for b in tree.branches:
            if b.parent >= 0:
                assert b.length >= 0.03 - 1e-12
                assert tree.branches[b.parent].t_start > b.t_start
        # the leaf pair that crossed at 0.001 was lengthened
        assert tree.branches[0].t_end == pytest.approx(0.03)
        assert any(p[:2] == (0, 1) for p in agg.short_pairs)


def test_agglomerate_raises_without_room_for_root():
    cross = np.array([[0, 0.5, 0.99], [0.5, 0, 0.99], [0.99, 0.99, 0]])
    with pytest.raises(ValueError, match="min_branch_length"):
        agglomerate(cross, min_branch_length=0.02)


def test_global_standardizer_is_not_per_dimension():
    rng = np.random.default_rng(0)
    sd = np.array([1.0, 3.0, 10.0, 0.5])
    x = 5.0 + rng.normal(size=(2000, 4)) * sd
    shift, scale = global_standardizer(x)
    np.testing.assert_allclose(shift, x.mean(0))
    z = (x - shift) / scale
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-12)
    v = z.var(0)
    assert v.mean() == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(v / v[0], x.var(0) / x.var(0)[0], rtol=1e-10)  # ratios kept
    assert v.max() / v.min() > 100  # per-dimension standardisation would give all ones
    assert scale == pytest.approx(np.sqrt(x.var(0).mean()), rel=1e-12)
    # sparse input: same answer without densifying
    xs = np.where(rng.uniform(size=x.shape) < 0.7, 0.0, x)
    s_shift, s_scale = global_standardizer(sp.csr_matrix(xs))
    d_shift, d_scale = global_standardizer(xs)
    np.testing.assert_allclose(s_shift, d_shift, rtol=1e-10)
    assert s_scale == pytest.approx(d_scale, rel=1e-10)
    with pytest.raises(ValueError, match="zero variance"):
        global_standardizer(np.ones((5, 3)))


def _splits(tree):
    return {frozenset(tree.classes[c] for c in b.classes) for b in tree.branches if b.children}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_discover_hierarchy_recovers_simulated_tree(seed):
    sim = simulate_tree(depth=3, seed=seed)
    shift, scale = global_standardizer(sim.x)
    res = discover_hierarchy((sim.x - shift) / scale, sim.labels, sim.classes, VPSDE())
    tree = res.tree
    assert tree.n_branches == 15
    assert _splits(tree) == sim.true_splits
    # times increase towards the root and every branch has the minimum length
    for b in tree.branches:
        assert b.length >= 0.02 - 1e-12
    # the crossover matrix is symmetric and the first merges are siblings
    np.testing.assert_allclose(res.crossover, res.crossover.T)
    assert res.intra.shape == (8, 200) and res.inter.shape == (8, 8, 200)
    # siblings (deepest split) cross before cousins
    for c in range(0, 8, 2):
        others = [j for j in range(8) if j not in (c, c + 1)]
        assert res.crossover[c, c + 1] < res.crossover[c, others].min()


def test_discovery_warns_for_indistinguishable_labels():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(100, 6)), rng.normal(size=(100, 6)) + 6.0])
    labels = np.repeat([0, 1, 2], [50, 50, 100])  # 0 and 1 are one population
    shift, scale = global_standardizer(x)
    with pytest.warns(UserWarning, match="'a' and 'b' are indistinguishable"):
        res = discover_hierarchy((x - shift) / scale, labels, ["a", "b", "c"], VPSDE())
    assert res.tree.branches[0].t_end == pytest.approx(0.02)
    assert _splits(res.tree) == {frozenset("ab"), frozenset("abc")}


def test_discovery_timing_10_classes():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(10, 30)) * 2
    labels = np.repeat(np.arange(10), 200)
    x = means[labels] + rng.normal(size=(2000, 30))
    shift, scale = global_standardizer(x)
    start = time.perf_counter()
    res = discover_hierarchy((x - shift) / scale, labels, [f"k{i}" for i in range(10)], VPSDE())
    elapsed = time.perf_counter() - start
    print(f"\ndiscovery of 10 classes x 200 cells x 30 dims: {elapsed:.3f} s")
    assert res.tree.n_branches == 19


@pytest.mark.parametrize("seed", [0, 1])
def test_single_linkage_also_recovers_simulated_tree(seed):
    sim = simulate_tree(depth=3, seed=seed)
    shift, scale = global_standardizer(sim.x)
    res = discover_hierarchy(
        (sim.x - shift) / scale, sim.labels, sim.classes, VPSDE(), seed=seed, linkage="single"
    )
    assert _splits(res.tree) == sim.true_splits


def test_average_linkage_resists_a_chaining_pair():
    """One spurious early crossing between lineages chains single linkage, not average linkage."""
    times = np.linspace(0, 1, 101)

    def curve(t0):  # similarity gap closing linearly, crossing exactly at t0
        return np.clip(t0 - times, 0, None)

    # lineages {A, B, C} and {D, E}; C-D is a spurious early crossing (0.25)
    cross = {("A", "B"): 0.1, ("A", "C"): 0.2, ("B", "C"): 0.2, ("D", "E"): 0.15, ("C", "D"): 0.25}
    names = ["A", "B", "C", "D", "E"]
    n = len(names)
    intra = np.zeros((n, len(times)))
    inter = np.zeros((n, n, len(times)))
    for i in range(n):
        for j in range(n):
            if i != j:
                t0 = cross.get((names[min(i, j)], names[max(i, j)]), 0.8)
                inter[i, j] = -curve(t0)
    single = agglomerate(crossover_times(intra, inter, times, epsilon=0.0), min_branch_length=0.01)
    average = agglomerate_average(intra, inter, times, epsilon=0.0, min_branch_length=0.01)
    # both join the lineages last, but single linkage does it at the spurious 0.25
    assert sorted(map(sorted, single.merges[-1][:2])) == [[0, 1, 2], [3, 4]]
    assert single.merges[-1][2] == pytest.approx(0.25, abs=0.02)
    assert sorted(map(sorted, average.merges[-1][:2])) == [[0, 1, 2], [3, 4]]
    assert average.merges[-1][2] > 0.6


def test_noise_draws_recover_simulated_tree_and_steady_its_times():
    sim = simulate_tree(depth=3, n_per_class=40, seed=1)
    shift, scale = global_standardizer(sim.x)
    x = (sim.x - shift) / scale

    def merge_times(n_draws, seed):
        res = discover_hierarchy(
            x, sim.labels, sim.classes, VPSDE(), n_noise_draws=n_draws, seed=seed
        )
        assert _splits(res.tree) == sim.true_splits
        return sorted(b.t_start for b in res.tree.branches if b.children)

    sd_one = np.std([merge_times(1, s) for s in range(6)], axis=0).mean()
    sd_eight = np.std([merge_times(8, s) for s in range(6)], axis=0).mean()
    assert sd_eight < 0.6 * sd_one


@pytest.mark.parametrize("seed", [0, 1])
def test_expected_curves_recover_simulated_tree_without_noise(seed):
    sim = simulate_tree(depth=4, n_per_class=60, decay=0.8, seed=seed)
    shift, scale = global_standardizer(sim.x)
    x = (sim.x - shift) / scale
    trees = [
        discover_hierarchy(x, sim.labels, sim.classes, VPSDE(), curves="expected", seed=k).tree
        for k in (0, 5)
    ]
    assert _splits(trees[0]) == sim.true_splits
    assert trees[0].to_newick() == trees[1].to_newick()  # all cells used: the seed is moot


def test_expected_curves_take_no_noise_draws():
    sim = simulate_tree(depth=1, n_per_class=20, seed=0)
    with pytest.raises(ValueError, match="curves='expected' draws no noise"):
        discover_hierarchy(
            sim.x, sim.labels, sim.classes, VPSDE(), curves="expected", n_noise_draws=4
        )
    with pytest.raises(ValueError, match="curves must be one of"):
        discover_hierarchy(sim.x, sim.labels, sim.classes, VPSDE(), curves="analytic")


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [(0, ValueError, "at least 1"), (2.5, TypeError, "integer"), (True, TypeError, "integer")],
)
def test_bad_noise_draws_raise(value, error, match):
    sim = simulate_tree(depth=1, n_per_class=20, seed=0)
    with pytest.raises(error, match=f"n_noise_draws must be.*{match}"):
        discover_hierarchy(sim.x, sim.labels, sim.classes, VPSDE(), n_noise_draws=value)


def test_unknown_linkage_raises():
    sim = simulate_tree(depth=1, n_per_class=20, seed=0)
    with pytest.raises(ValueError, match="linkage"):
        discover_hierarchy(sim.x, sim.labels, sim.classes, VPSDE(), linkage="complete")


def test_branch_hierarchy_bad_input():
    import scbranch as sb

    adata = simulate_tree(depth=2, n_per_class=20, dim=4, seed=0).to_anndata()
    with pytest.raises(KeyError, match="groupby='celltype'.*Available columns"):
        sb.tl.branch_hierarchy(adata, groupby="celltype", use_rep="X_latent")
    with pytest.raises(KeyError, match="use_rep='X_pca'"):
        sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_pca")
    with pytest.raises(KeyError, match="layer='counts'"):
        sb.tl.branch_hierarchy(adata, groupby="cell_type", layer="counts")
    with pytest.raises(ValueError, match="n_noise_draws must be at least 1, got 0"):
        sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_latent", n_noise_draws=0)
    adata.obsm["X_latent"][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"adata.obsm\['X_latent'\] contains 1 NaN"):
        sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_latent")
    assert "scbranch_hierarchy" not in adata.uns  # nothing written on failure


def test_branch_hierarchy_copy_leaves_input_untouched():
    import scbranch as sb

    adata = simulate_tree(depth=2, n_per_class=20, dim=4, seed=0).to_anndata()
    out = sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_latent", copy=True)
    assert "scbranch_hierarchy" not in adata.uns
    record = out.uns["scbranch_hierarchy"]
    assert record["params"]["groupby"] == "cell_type" and record["params"]["linkage"] == "average"
    assert record["params"]["n_noise_draws"] == 1 and record["params"]["curves"] == "sampled"
    assert record["intra"].shape == (4, 200) and record["inter"].shape == (4, 4, 200)


# ----------------------------------------------------------------------------- many types
# Discovery with many types updates pooled curves at each merge and finds crossings with
# array operations (benchmarks/many_types.py times it); these references are the plain rules.


def _reference_crossover(intra, inter, times, epsilon):
    """Crossover times by a loop over pairs and grid points."""
    n = len(intra)
    out = np.zeros((n, n))
    for i, j in itertools.combinations(range(n), 2):
        gap = inter[i, j] - 0.5 * (intra[i] + intra[j]) + epsilon
        k = next(k for k in range(len(times)) if gap[k] >= 0)
        if k == 0:
            out[i, j] = out[j, i] = times[0]
        else:  # linear interpolation between grid points k - 1 and k
            frac = -gap[k - 1] / (gap[k] - gap[k - 1])
            out[i, j] = out[j, i] = times[k - 1] + frac * (times[k] - times[k - 1])
    return out


def _reference_average_linkage(intra, inter, times, epsilon, min_branch_length):
    """Average linkage as defined: every set's pooled curves and crossings anew at each merge."""
    n = len(intra)
    sim = inter.copy()
    sim[np.arange(n), np.arange(n)] = intra
    groups, node_time, merges, short = [(i,) for i in range(n)], [0.0] * n, [], []
    while len(groups) > 1:
        pooled = np.array([[sim[np.ix_(g, h)].mean(axis=(0, 1)) for h in groups] for g in groups])
        cross = _reference_crossover(np.einsum("ggt->gt", pooled), pooled, times, epsilon)
        np.fill_diagonal(cross, np.inf)
        a, b = sorted(np.unravel_index(np.argmin(cross), cross.shape))  # first pair in list order
        t = cross[a, b]
        time_ = max(t, node_time[a] + min_branch_length, node_time[b] + min_branch_length)
        if time_ > t + 1e-12:
            short.append((groups[a][0], groups[b][0]))
        merges.append((groups[a], groups[b], time_))
        groups = [g for k, g in enumerate(groups) if k not in (a, b)] + [
            tuple(sorted(groups[a] + groups[b]))
        ]
        node_time = [x for k, x in enumerate(node_time) if k not in (a, b)] + [time_]
    return merges, short


def _twenty_types(curves: str):
    """Smoothed curves of 20 simulated types (a 32-leaf tree cut to its first 20 leaves)."""
    sim = simulate_tree(depth=5, n_per_class=40, dim=16, decay=0.8, seed=0)
    keep = sim.labels < 20
    shift, scale = global_standardizer(sim.x[keep])
    times = np.linspace(0, 1, 200)
    intra, inter = similarity_curves(
        (sim.x[keep] - shift) / scale, sim.labels[keep], 20, VPSDE(), times, curves=curves
    )
    return (times, *smoothed(intra, inter, 3.0))


@pytest.mark.parametrize("curves", ["sampled", "expected"])
@pytest.mark.parametrize("min_branch_length", [0.02, 0.05])
def test_average_linkage_equals_the_plain_rule_on_20_types(curves, min_branch_length):
    times, intra, inter = _twenty_types(curves)
    np.testing.assert_allclose(
        crossover_times(intra, inter, times), _reference_crossover(intra, inter, times, 0.005)
    )
    fast = agglomerate_average(intra, inter, times, min_branch_length=min_branch_length)
    merges, short = _reference_average_linkage(intra, inter, times, 0.005, min_branch_length)
    assert [m[:2] for m in fast.merges] == [m[:2] for m in merges]
    np.testing.assert_allclose([m[2] for m in fast.merges], [m[2] for m in merges], atol=1e-12)
    assert [p[:2] for p in fast.short_pairs] == short
    assert short  # the case does exercise lengthened branches


@pytest.mark.parametrize("seed", range(5))
def test_average_linkage_breaks_ties_like_the_plain_rule(seed):
    """Crossings on grid points tie exactly; the pair of sets formed first merges first."""
    rng = np.random.default_rng(seed)
    times = np.linspace(0, 1, 21)
    n = 12
    t0 = np.round(rng.uniform(0, 0.5, size=(n, n)), 1)  # on the grid: many exact ties
    t0 = np.triu(t0, 1) + np.triu(t0, 1).T
    inter = np.clip(times - t0[..., None], None, 0.0)
    intra = np.zeros((n, len(times)))
    fast = agglomerate_average(intra, inter, times, epsilon=0.0, min_branch_length=0.01)
    merges, short = _reference_average_linkage(intra, inter, times, 0.0, 0.01)
    assert [m[:2] for m in fast.merges] == [m[:2] for m in merges]
    np.testing.assert_allclose([m[2] for m in fast.merges], [m[2] for m in merges], atol=1e-12)
    assert [p[:2] for p in fast.short_pairs] == short
    # all alike: every set crosses every other at t = 0, so ties decide every merge
    flat = agglomerate_average(intra, np.zeros_like(inter), times, epsilon=0.0)
    merges, _ = _reference_average_linkage(intra, np.zeros_like(inter), times, 0.0, 0.02)
    assert [m[:2] for m in flat.merges] == [m[:2] for m in merges]


def test_average_linkage_names_merged_sets_that_never_cross():
    """Every pair of types crosses, but the pooled curves of {a, b} and c never do."""
    times = np.linspace(0, 1, 2)
    intra = np.zeros((3, 2))
    inter = np.zeros((3, 3, 2))
    inter[0, 2] = inter[2, 0] = [1.0, -2.0]
    inter[1, 2] = inter[2, 1] = [-2.0, 1.0]
    with pytest.raises(ValueError, match=r"'c' and 'a\+b' never become indistinguishable"):
        agglomerate_average(intra, inter, times, epsilon=0.0, classes=["a", "b", "c"])


def test_expected_curves_do_not_depend_on_cell_order_or_chunking():
    sim = simulate_tree(depth=3, n_per_class=15, dim=8, seed=0)
    times = np.linspace(0, 1, 9)
    perm = np.random.default_rng(0).permutation(len(sim.labels))
    kw = {"curves": "expected"}
    a = similarity_curves(sim.x, sim.labels, 8, VPSDE(), times, **kw)
    b = similarity_curves(sim.x[perm], sim.labels[perm], 8, VPSDE(), times, **kw)
    c = similarity_curves(sim.x, sim.labels, 8, VPSDE(), times, max_chunk_elements=300, **kw)
    for other in (b, c):
        np.testing.assert_allclose(a[0], other[0], atol=1e-6)
        np.testing.assert_allclose(a[1], other[1], atol=1e-6)


@pytest.mark.parametrize("kind", ["dense32", "sparse32", "dense64"])
def test_standardized_rows_equal_the_whole_subsample_standardised_at_once(kind):
    # discovery standardises its subsample a block of rows at a time (float64 copies of
    # types x cells x genes ran an atlas of 20,000 genes out of memory): the same float32 values
    from scbranch._validation import to_dense
    from scbranch.module._discovery import standardized_rows

    rng = np.random.default_rng(0)
    m = {
        "dense32": rng.normal(size=(500, 40)).astype(np.float32),
        "sparse32": sp.random(500, 40, density=0.2, format="csr", random_state=0, dtype=np.float32),
        "dense64": rng.normal(size=(500, 40)),
    }[kind]
    rows = rng.permutation(500)[:300]
    shift, scale = rng.normal(size=40), 1.7
    whole = ((to_dense(m[rows]) - shift) / scale).astype(np.float32)
    np.testing.assert_array_equal(standardized_rows(m, rows, shift, scale, block_rows=64), whole)


@pytest.mark.parametrize("kind", ["csr", "csc", "dense_in_blocks"])
def test_standardiser_of_sparse_and_large_dense_matrices_equals_numpys(kind, monkeypatch):
    # computed from the stored entries or a block of rows at a time (no float64 copies of an
    # atlas): the same shift, scale and variances as numpy on the dense float64 matrix
    from scbranch.module import _discovery

    dense = sp.random(3000, 30, density=0.3, random_state=0, dtype=np.float32).toarray()
    dense[:, 0] += 5.0  # a large mean against a small variance: E[x^2] - E[x]^2 must hold up
    x = {"csr": sp.csr_matrix(dense), "csc": sp.csc_matrix(dense), "dense_in_blocks": dense}[kind]
    monkeypatch.setattr(_discovery, "_DENSE_IN_ONE_GO", 0)
    exact = dense.astype(np.float64)
    shift, scale = global_standardizer(x)
    np.testing.assert_allclose(shift, exact.mean(0), rtol=1e-12)
    assert scale == pytest.approx(np.sqrt(np.mean((exact - exact.mean(0)) ** 2)), rel=1e-10)
    np.testing.assert_allclose(_discovery.column_variance(x), exact.var(0), rtol=1e-9)


@pytest.mark.parametrize(
    "option, match",
    [
        ({"n_times": 1}, "n_times must be at least 10"),
        ({"n_per_class": 1}, "n_per_class must be at least 2"),
        ({"n_per_class": 2.5}, "n_per_class must be an integer"),
        ({"epsilon": -1.0}, "epsilon must be a number >= 0"),
        ({"smooth_sigma": float("nan")}, "smooth_sigma must be a number >= 0"),
        ({"min_branch_length": 1.5}, "units of diffusion time"),
    ],
)
def test_discovery_options_out_of_range_are_named(option, match):
    # they failed later as "never become indistinguishable ... increase epsilon"
    from scbranch.module import DiscoveryOptions

    with pytest.raises((ValueError, TypeError), match=match):
        DiscoveryOptions(**option)


def test_a_one_cell_type_is_named_whatever_min_cells_per_class():
    import anndata as ad
    import pandas as pd

    import scbranch as sb

    sim = simulate_tree(depth=2, n_per_class=20, dim=4, seed=0)
    keep = np.r_[np.flatnonzero(sim.labels != 0), np.flatnonzero(sim.labels == 0)[:1]]
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical([sim.classes[i] for i in sim.labels[keep]])},
        index=[f"c{i}" for i in range(len(keep))],
    )
    adata = ad.AnnData(obs=obs, obsm={"X_lat": sim.x[keep]})
    named = f"'{sim.classes[0]}' \\(1 cell\\).*hierarchy discovery"
    with pytest.raises(ValueError, match=named):  # said "Class index 0 has 1 cell(s)"
        sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_lat", min_cells_per_class=1)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_lat")
    with pytest.raises(ValueError, match=named):
        sb.BranchedDiffusion(adata, min_cells_per_class=1)
    # a column without unused categories is not told to drop them with .cat
    with pytest.raises(ValueError) as err:
        sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_lat")
    assert "remove_unused_categories" not in str(err.value)


def test_the_few_cells_warning_names_the_users_line():
    # it named scbranch/tl/_branch_hierarchy.py (a fixed stacklevel) whoever called it
    import scbranch as sb

    adata = simulate_tree(depth=1, n_per_class=30, dim=4, seed=0).to_anndata()
    with pytest.warns(UserWarning, match="cells or fewer") as record:
        sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_latent")
    assert {w.filename for w in record if "cells or fewer" in str(w.message)} == {__file__}
    adata = simulate_tree(depth=1, n_per_class=30, dim=4, seed=0).to_anndata()  # no tree yet
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    with pytest.warns(UserWarning, match="cells or fewer") as record:
        sb.BranchedDiffusion(adata, width=16)
    assert {w.filename for w in record if "cells or fewer" in str(w.message)} == {__file__}


def test_a_list_as_groupby_and_a_single_type_are_named():
    import scbranch as sb

    adata = simulate_tree(depth=1, n_per_class=50, dim=4, seed=0).to_anndata()
    with pytest.raises(TypeError, match="one column of adata.obs"):  # "unhashable type: 'list'"
        sb.tl.branch_hierarchy(adata, groupby=["cell_type"], use_rep="X_latent")
    adata.obs["one"] = "only"
    with pytest.warns(UserWarning, match="one type \\('only'\\).*no branch"):
        sb.tl.branch_hierarchy(adata, groupby="one", use_rep="X_latent")


def test_options_of_a_given_hierarchy_are_checked_without_one():
    # times="x" passed unseen when no hierarchy was given
    import scbranch as sb

    adata = simulate_tree(depth=1, n_per_class=50, dim=4, seed=0).to_anndata()
    for bad in ({"times": "x"}, {"multifurcations": "x"}):
        with pytest.raises(ValueError, match="times must be one of"):
            sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_latent", **bad)
