import anndata as ad
import numpy as np
import pytest
import torch

from scbranch.module import BranchTree

# ((A, B) at 0.3, C) at 0.6
THREE = (["A", "B", "C"], [((0,), (1,), 0.3), ((0, 1), (2,), 0.6)])
# (((c0, c1) 0.2, (c2, c3) 0.35) 0.5, (c4, c5) 0.25) 0.75; merges given out of id order
SIX = (
    ["c0", "c1", "c2", "c3", "c4", "c5"],
    [
        ((0,), (1,), 0.2),
        ((4,), (5,), 0.25),
        ((2,), (3,), 0.35),
        ((0, 1), (2, 3), 0.5),
        ((4, 5), (0, 1, 2, 3), 0.75),
    ],
)


def brute_branch(tree, c, t):
    """The unique branch holding class c with t_start <= t < t_end (root includes t = 1)."""
    hits = [
        b.id
        for b in tree.branches
        if c in b.classes and (b.t_start <= t < b.t_end or (b.parent < 0 and t == 1.0))
    ]
    assert len(hits) == 1, (c, t, hits)
    return hits[0]


@pytest.mark.parametrize("spec", [THREE, SIX], ids=["three", "six"])
def test_structure(spec):
    classes, merges = spec
    tree = BranchTree.from_merges(*spec)
    n = len(classes)
    assert tree.n_classes == n
    assert tree.n_branches == 2 * n - 1
    assert tree.n_heads == 2 * n - 1
    for c in range(n):
        leaf = tree.branches[tree.leaf(c)]
        assert leaf.id == c and leaf.classes == (c,) and leaf.t_start == 0.0 and leaf.is_leaf
    root = tree.branches[tree.root]
    assert tree.root == 2 * n - 2
    assert root.classes == tuple(range(n)) and root.t_end == 1.0
    # internal branches in merge order, each starting at its merge time
    for k, (a, b, time) in enumerate(merges):
        br = tree.branches[n + k]
        assert br.classes == tuple(sorted(a + b))
        assert br.t_start == time
        for ch in br.children:
            assert tree.branches[ch].t_end == time
            assert tree.branches[ch].parent == br.id


def test_six_paths_and_lengths():
    tree = BranchTree.from_merges(*SIX)
    assert tree.path(0) == [0, 6, 9, 10]
    assert tree.path(4) == [4, 7, 10]
    assert tree.path(3) == [3, 8, 9, 10]
    assert [round(b.length, 12) for b in tree.branches] == [
        0.2,
        0.2,
        0.35,
        0.35,
        0.25,
        0.25,
        0.3,
        0.5,
        0.15,
        0.25,
        0.25,
    ]
    assert tree.total_length() == pytest.approx(3.05)
    assert tree.total_length([4]) == pytest.approx(0.25 + 0.5 + 0.25)
    assert tree.total_length([0, 1]) == pytest.approx(0.2 + 0.2 + 0.3 + 0.25 + 0.25)


@pytest.mark.parametrize("spec", [THREE, SIX], ids=["three", "six"])
def test_lookup_matches_brute_force(spec):
    tree = BranchTree.from_merges(*spec)
    rng = np.random.default_rng(0)
    n = tree.n_classes
    boundaries = np.array(sorted({0.0, 1.0} | {b.t_start for b in tree.branches}))
    labels = rng.integers(0, n, size=3000)
    t = rng.uniform(0, 1, size=3000)
    t[:1000] = rng.choice(boundaries, size=1000)  # exact boundaries: 0, branch times, 1
    pairs = zip(labels, t, strict=True)
    expected = np.array([brute_branch(tree, int(c), float(s)) for c, s in pairs])
    got = tree.lookup(labels, t)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, expected)
    got_t = tree.lookup(torch.as_tensor(labels), torch.as_tensor(t))
    assert isinstance(got_t, torch.Tensor)
    np.testing.assert_array_equal(got_t.numpy(), expected)
    # scalar time, both backends
    for s in boundaries:
        exp = [brute_branch(tree, c, float(s)) for c in range(n)]
        np.testing.assert_array_equal(tree.lookup(np.arange(n), float(s)), exp)
        np.testing.assert_array_equal(
            tree.lookup(torch.arange(n), torch.tensor(float(s))).numpy(), exp
        )


def test_lookup_docstring_values():
    tree = BranchTree.from_merges(*THREE)
    assert tree.lookup(np.array([0, 0, 2]), np.array([0.1, 0.5, 0.9])).tolist() == [0, 3, 4]
    # boundaries: a branch holds [t_start, t_end)
    labels = np.array([0, 0, 0, 0, 2, 2])
    t = np.array([0, 0.3, 0.6, 1, 0.59, 0.6])
    assert tree.lookup(labels, t).tolist() == [0, 3, 4, 4, 2, 4]


@pytest.mark.parametrize("spec", [THREE, SIX], ids=["three", "six"])
def test_every_class_on_exactly_one_branch(spec):
    tree = BranchTree.from_merges(*spec)
    grid = np.unique(np.concatenate([np.linspace(0, 1, 401), [b.t_start for b in tree.branches]]))
    for t in grid:
        holders = np.zeros(tree.n_classes, dtype=int)
        for b in tree.branches:
            if b.t_start <= t < b.t_end or (b.parent < 0 and t == 1.0):
                holders[list(b.classes)] += 1
        assert np.all(holders == 1), (t, holders)
        np.testing.assert_array_equal(
            tree.lookup(np.arange(tree.n_classes), t),
            [brute_branch(tree, c, t) for c in range(tree.n_classes)],
        )


def test_newick_exact():
    # children are listed in branch-id order (leaves first), the root has no length
    assert BranchTree.from_merges(*THREE).to_newick() == "(C:0.6,(A:0.3,B:0.3):0.3);"
    assert BranchTree.from_merges(*SIX).to_newick() == (
        "((c4:0.25,c5:0.25):0.5,((c0:0.2,c1:0.2):0.3,(c2:0.35,c3:0.35):0.15):0.25);"
    )
    names = ["CD4 T", "CD14+ Mono", "B/plasma", "NK", "O'Neil"]
    merges = [
        ((0,), (1,), 0.123456),
        ((2,), (3,), 0.2),
        ((0, 1), (2, 3), 0.5),
        ((4,), (0, 1, 2, 3), 0.9),
    ]
    tree = BranchTree.from_merges(names, merges)
    assert tree.to_newick() == (
        "('O''Neil':0.9,(('CD4 T':0.1235,'CD14+ Mono':0.1235):0.3765,"
        "('B/plasma':0.2,NK:0.2):0.3):0.4);"
    )
    assert tree.to_newick(digits=2) == (
        "('O''Neil':0.9,(('CD4 T':0.12,'CD14+ Mono':0.12):0.38,('B/plasma':0.2,NK:0.2):0.3):0.4);"
    )


def test_branch_tree_docstring_example():
    import doctest

    import scbranch.module._tree as mod

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(mod.BranchTree, "BranchTree", module=mod, globs=vars(mod).copy()):
        runner.run(test, out=lambda _: None)
    assert runner.failures == 0


def _same_tree(a: BranchTree, b: BranchTree):
    assert a.classes == b.classes
    assert len(a.branches) == len(b.branches)
    for x, y in zip(a.branches, b.branches, strict=True):
        assert (x.id, x.classes, x.t_start, x.t_end, x.parent, x.children, x.head) == (
            y.id,
            y.classes,
            y.t_start,
            y.t_end,
            y.parent,
            y.children,
            y.head,
        )
    assert a.to_newick() == b.to_newick()
    rng = np.random.default_rng(1)
    labels, t = rng.integers(0, a.n_classes, 500), rng.uniform(0, 1, 500)
    np.testing.assert_array_equal(a.lookup(labels, t), b.lookup(labels, t))


def test_dict_round_trip():
    tree = BranchTree.from_merges(["CD4 T", "B/plasma", "c+", "d", "e", "f"], SIX[1])
    d = tree.to_dict()
    assert set(d) == {
        "classes",
        "membership",
        "t_start",
        "t_end",
        "parent",
        "head",
        "newick",
        "node_names",
        "node_branches",
    }
    assert d["membership"].shape == (11, 6) and d["membership"].sum() == sum(
        len(b.classes) for b in tree.branches
    )
    _same_tree(tree, BranchTree.from_dict(d))
    # "head" and the node names are optional (hierarchies written before nodes had names)
    d2 = {k: v for k, v in d.items() if k not in ("head", "node_names", "node_branches")}
    _same_tree(tree, BranchTree.from_dict(d2))
    with pytest.raises(ValueError, match="parent"):
        BranchTree.from_dict({k: v for k, v in d.items() if k != "parent"})


def test_what_trained_each_head_survives_a_round_trip_and_is_checked(tmp_path):
    tree = BranchTree.from_merges(["A", "B", "C"], [((0,), (1,), 0.3), ((0, 1), (2,), 0.6)])
    new = tree.add_class("D", sibling=2, t=0.4)
    # C's leaf split at 0.4: its upper part (and the root above) now hold D, never trained on it
    upper, lower = new.branches[2], new.branches[5]
    assert (upper.classes, upper.trained) == ((2, 3), (2,))
    assert (lower.classes, lower.trained, lower.head) == ((2,), (2,), upper.head)
    assert new.branches[new.root].trained == (0, 1, 2) and new.branches[6].trained == (3,)
    d = new.to_dict()
    assert d["trained"].sum() == d["membership"].sum() - 2  # D on the upper part and the root
    back = BranchTree.from_dict(d)
    assert [b.trained for b in back.branches] == [b.trained for b in new.branches]
    adata = ad.AnnData(np.zeros((3, 2), dtype=np.float32), uns={"tree": d})
    adata.write_h5ad(tmp_path / "t.h5ad")
    again = BranchTree.from_dict(ad.read_h5ad(tmp_path / "t.h5ad").uns["tree"])
    assert [b.trained for b in again.branches] == [b.trained for b in new.branches]
    new.mark_trained([2])
    assert new.branches[2].trained == (2, 3) and new.branches[new.root].trained == (0, 1, 2)
    for bad, match in [
        (np.zeros_like(d["trained"]), "trained on classes \\[\\]"),
        (np.ones_like(d["trained"]), "not a non-empty part of its classes"),
        (d["trained"][:3], "'trained' has shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            BranchTree.from_dict({**d, "trained": bad})


def test_h5ad_round_trip(tmp_path):
    tree = BranchTree.from_merges(["CD4 T", "B/plasma", "c+", "d", "e", "f"], SIX[1])
    adata = ad.AnnData(np.zeros((3, 2), dtype=np.float32))
    adata.uns["scbranch_hierarchy"] = tree.to_dict()
    path = tmp_path / "tree.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    rebuilt = BranchTree.from_dict(back.uns["scbranch_hierarchy"])
    _same_tree(tree, rebuilt)
    assert back.uns["scbranch_hierarchy"]["newick"] == tree.to_newick()


def test_branch_time_and_breakpoints():
    tree = BranchTree.from_merges(*SIX)
    expected = {
        (0, 1): 0.2,
        (2, 3): 0.35,
        (4, 5): 0.25,
        (0, 2): 0.5,
        (1, 3): 0.5,
        (0, 4): 0.75,
        (3, 5): 0.75,
        (2, 2): 0.0,
    }
    for (a, b), t in expected.items():
        assert tree.branch_time(a, b) == t
        assert tree.branch_time(b, a) == t
    assert tree.breakpoints() == [0.2, 0.25, 0.35, 0.5, 0.75]
    assert tree.breakpoints([0]) == [0.2, 0.5, 0.75]
    assert tree.breakpoints([4]) == [0.25, 0.75]
    assert tree.breakpoints([4, 3]) == [0.25, 0.35, 0.5, 0.75]
    assert tree.breakpoints(t_min=0.3) == [0.35, 0.5, 0.75]
    assert tree.breakpoints(t_min=0.75) == []


@pytest.mark.parametrize(
    "merges,match",
    [
        ([((0,), (1,), 0.3)], "needs 2 merges"),  # too few
        ([((0,), (1,), 0.3), ((0,), (1,), 0.6)], "does not join"),  # same subtree twice
        ([((0,), (1,), 0.3), ((0, 2), (1,), 0.6)], "does not join"),  # set spans two subtrees
        ([((0,), (1,), 0.3), ((), (2,), 0.6)], "does not join"),  # empty set
        ([((0,), (1,), 0.5), ((0, 1), (2,), 0.4)], "below its child"),  # time not increasing
        ([((0,), (1,), -0.1), ((0, 1), (2,), 0.4)], "below its child"),  # negative time
        ([((0,), (1,), 0.3), ((0, 1), (2,), 1.5)], "ends"),  # root would end before it starts
        ([((0,), (1,), 0.3), ((0, 1), (2,), 0.6), ((0, 1, 2), (0,), 0.9)], "needs 2 merges"),
    ],
)
def test_invalid_merges_raise(merges, match):
    with pytest.raises(ValueError, match=match):
        BranchTree.from_merges(["A", "B", "C"], merges)


def test_merge_with_unknown_class_index_raises_value_error():
    try:
        BranchTree.from_merges(["A", "B", "C"], [((0,), (5,), 0.3), ((0, 5), (2,), 0.6)])
    except ValueError:
        return
    except Exception as err:  # noqa: BLE001
        raise AssertionError(f"expected ValueError, got {type(err).__name__}: {err}") from None
    raise AssertionError("no error")


def test_class_index():
    tree = BranchTree.from_merges(["CD4 T", "B", "NK"], THREE[1])
    np.testing.assert_array_equal(tree.class_index(["NK", "CD4 T", "NK", "B"]), [2, 0, 2, 1])
    np.testing.assert_array_equal(tree.class_index("B"), [1])
    with pytest.raises(KeyError, match="Mono"):
        tree.class_index(["B", "Mono"])
    with pytest.raises(KeyError, match="CD4"):
        tree.class_index("CD4")  # a prefix is not a match
