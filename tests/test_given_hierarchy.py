"""Hierarchies users bring: one topology from every form, data times, generation at nodes."""

import logging
import warnings

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import stats

import scbranch as sb
from scbranch.module import BranchTree
from scbranch.module._topology import HierarchyError, parse_newick

FAST = {"width": 32, "n_head_blocks": 1}
CLASSES = [f"c{i}" for i in range(8)]
#: the true topology of simulate_tree(depth=3): siblings differ in the last bit
TRUE = {
    "left": {"ll": ["c0", "c1"], "lr": ["c2", "c3"]},
    "right": {"rl": ["c4", "c5"], "rr": ["c6", "c7"]},
}
TRUE_NEWICK = "(((c0,c1)ll,(c2,c3)lr)left,((c4,c5)rl,(c6,c7)rr)right);"
WRONG = [["c0", "c4"], ["c1", "c5"], ["c2", "c6"], ["c3", "c7"]]


def _sim(seed: int = 0):
    return sb.datasets.simulate_tree(
        depth=3, n_per_class=80, dim=16, separation=8.0, decay=0.5, seed=seed
    ).to_anndata()


def _splits(tree: BranchTree) -> set[frozenset[str]]:
    return {frozenset(tree.classes[c] for c in b.classes) for b in tree.branches if b.children}


def _record_tree(adata, key):
    return BranchTree.from_dict(adata.uns[key]["tree"])


@pytest.mark.parametrize("seed", [0, 1])
def test_a_correct_topology_is_kept_and_timed_as_discovery_times_it(seed):
    adata = _sim(seed)
    sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_latent", seed=seed)
    found = _record_tree(adata, "scbranch_hierarchy")
    sim = sb.datasets.simulate_tree(depth=3, n_per_class=80, dim=16, seed=seed)
    assert _splits(found) - {frozenset(CLASSES)} == sim.true_splits - {frozenset(CLASSES)}
    sb.tl.branch_hierarchy(
        adata, groupby="cell_type", use_rep="X_latent", seed=seed, hierarchy=TRUE, key_added="g"
    )
    given = _record_tree(adata, "g")
    assert _splits(given) == _splits(found)
    found_t = {frozenset(found.classes[c] for c in b.classes): b.t_start for b in found.branches}
    for b in given.branches:
        key = frozenset(given.classes[c] for c in b.classes)
        assert abs(b.t_start - found_t[key]) <= 0.02
    assert given.node_names["left"] == next(
        b.id for b in given.branches if set(b.classes) == {0, 1, 2, 3}
    )
    assert adata.uns["g"]["params"]["given"] == "nested"


def test_a_wrong_topology_is_kept_as_given_and_the_comparison_says_so(caplog):
    adata = _sim()
    sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_latent")
    sb.tl.branch_hierarchy(
        adata, groupby="cell_type", use_rep="X_latent", hierarchy=WRONG, key_added="wrong"
    )
    wrong = _record_tree(adata, "wrong")
    assert _splits(wrong) == {frozenset(p) for p in WRONG} | {frozenset(CLASSES)}
    # four children under the root: a multifurcation kept as such
    assert len(wrong.branches[wrong.root].children) == 4
    result = sb.tl.compare_hierarchies(adata, "scbranch_hierarchy", "wrong")
    assert result["robinson_foulds"] == 6 + 4 and result["robinson_foulds_normalized"] == 1.0
    assert len(result["shared"]) == 0 and result["cophenetic_correlation"] < 0.5
    same = sb.tl.compare_hierarchies(adata, "scbranch_hierarchy", "scbranch_hierarchy")
    assert same["robinson_foulds"] == 0 and same["cophenetic_correlation"] == pytest.approx(1.0)
    assert adata.uns["scbranch_hierarchy_comparison"]["robinson_foulds"] == 0
    # a star tree joins every pair at one time: the correlation is undefined, and said so
    sb.tl.branch_hierarchy(
        adata, groupby="cell_type", use_rep="X_latent", hierarchy=[CLASSES], key_added="star"
    )
    with caplog.at_level(logging.WARNING, logger="scbranch"):
        star = sb.tl.compare_hierarchies(adata, "scbranch_hierarchy", "star")
    assert np.isnan(star["cophenetic_correlation"])
    assert "undefined (NaN): one tree joins every pair" in caplog.text
    fig = sb.pl.compare_hierarchies(adata, "scbranch_hierarchy", "wrong", return_fig=True)
    assert len(fig.axes) == 3
    # trees of one type have nothing to compare: said so (numpy's zero-size error before)
    one = adata.copy()
    one.obs["all"] = pd.Categorical(["cells"] * one.n_obs)
    sb.tl.branch_hierarchy(one, groupby="all", use_rep="X_latent", key_added="one")
    with pytest.raises(ValueError, match="one cell type \\('cells'\\): there is no branch"):
        sb.tl.compare_hierarchies(one, "one", "one")
    # given an Axes of a grid, the three panels take its place in the user's figure
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2)
    mid = sb.pl.compare_hierarchies(adata, "scbranch_hierarchy", "wrong", ax=right, show=False)
    assert mid.figure is fig and left in fig.axes and right not in fig.axes
    assert len(fig.axes) == 4
    assert mid.get_position().x0 > left.get_position().x1  # inside the right half
    with pytest.raises(ValueError, match="Axes of a grid"):
        sb.pl.compare_hierarchies(
            adata, "scbranch_hierarchy", "wrong", ax=fig.add_axes((0, 0, 0.1, 0.1))
        )
    plt.close("all")


def test_every_form_gives_the_same_tree():
    adata = _sim()
    adata.obs["lineage"] = adata.obs["cell_type"].map(
        {c: ["ll", "ll", "lr", "lr", "rl", "rl", "rr", "rr"][i] for i, c in enumerate(CLASSES)}
    )
    adata.obs["compartment"] = adata.obs["lineage"].map(
        {"ll": "left", "lr": "left", "rl": "right", "rr": "right"}
    )
    # scanpy's dendrogram with the same topology: a linkage of the simulated class means
    sc.tl.dendrogram(adata, groupby="cell_type", use_rep="X_latent")
    forms = {
        "newick": TRUE_NEWICK,
        "nested": TRUE,
        "lists": [[["c0", "c1"], ["c2", "c3"]], [["c4", "c5"], ["c6", "c7"]]],
        "obs": ["compartment", "lineage"],
        "dendrogram": "dendrogram_cell_type",
    }
    trees = {}
    for name, form in forms.items():
        sb.tl.branch_hierarchy(
            adata, groupby="cell_type", use_rep="X_latent", hierarchy=form, key_added=name
        )
        trees[name] = _record_tree(adata, name)
    reference = trees["newick"]
    for name, tree in trees.items():
        assert _splits(tree) == _splits(reference), name
        np.testing.assert_allclose(
            sorted(b.t_start for b in tree.branches), sorted(b.t_start for b in reference.branches)
        )
    assert set(trees["obs"].node_names) == {"left", "right", "ll", "lr", "rl", "rr"}
    assert adata.uns["obs"]["params"]["given"] == "obs"
    # the stored Newick names the groups, so given back it keeps them (it dropped them)
    stored = adata.uns["obs"]["newick"]
    assert ")ll:" in stored and ")left:" in stored
    sb.tl.branch_hierarchy(
        adata, groupby="cell_type", use_rep="X_latent", hierarchy=stored, key_added="again"
    )
    assert _record_tree(adata, "again").node_names.keys() == trees["obs"].node_names.keys()


def test_newick_lengths_give_the_times_when_asked():
    adata = _sim()
    newick = "(((c0:0.2,c1:0.2):0.1,(c2:0.25,c3:0.25):0.05):0.3,((c4,c5),(c6,c7)));"
    with pytest.raises(HierarchyError, match="branch length"):
        sb.tl.branch_hierarchy(
            adata, groupby="cell_type", use_rep="X_latent", hierarchy=newick, times="newick"
        )
    full = (
        "(((c0:0.2,c1:0.2):0.1,(c2:0.25,c3:0.25):0.05):0.3,"
        "((c4:0.3,c5:0.3):0.1,(c6:0.3,c7:0.3):0.1):0.2);"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # ultrametric: no warning
        sb.tl.branch_hierarchy(
            adata, groupby="cell_type", use_rep="X_latent", hierarchy=full, times="newick"
        )
    tree = _record_tree(adata, "scbranch_hierarchy")
    assert tree.branch_time(0, 1) == pytest.approx(0.2)
    assert tree.branch_time(0, 2) == pytest.approx(0.3)
    assert tree.branch_time(0, 4) == pytest.approx(0.6)
    # negative lengths are refused; paths of unequal length are taken at the longest, with a
    # warning naming the node (an ultrametric string, as above, gives none)
    negative = full.replace("(c2:0.25,c3:0.25):0.05", "(c2:0.25,c3:0.25)T:-0.05")
    with pytest.raises(HierarchyError, match="'T' a negative branch length"):
        sb.tl.branch_hierarchy(
            adata, groupby="cell_type", use_rep="X_latent", hierarchy=negative, times="newick"
        )
    uneven = full.replace("c3:0.25", "c3:0.15")
    with pytest.warns(UserWarning, match=r"not ultrametric.*differ \(0.15 to 0.25\)"):
        sb.tl.branch_hierarchy(
            adata, groupby="cell_type", use_rep="X_latent", hierarchy=uneven, times="newick"
        )
    assert _record_tree(adata, "scbranch_hierarchy").branch_time(2, 3) == pytest.approx(0.25)
    with pytest.warns(UserWarning, match=r"from the node above 'c2', 'c3' down"):
        sb.tl.branch_hierarchy(
            adata, groupby="cell_type", use_rep="X_latent", hierarchy=uneven, times="newick"
        )
    # the package's own Newick (4 decimals) read back: its rounding is no reason to warn
    sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_latent", key_added="found")
    own = str(adata.uns["found"]["newick"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sb.tl.branch_hierarchy(
            adata, groupby="cell_type", use_rep="X_latent", hierarchy=own, times="newick",
            key_added="back",
        )  # fmt: skip
    found, back = _record_tree(adata, "found"), _record_tree(adata, "back")
    for a, b in [(0, 1), (0, 4), (2, 3)]:
        assert back.branch_time(a, b) == pytest.approx(found.branch_time(a, b), abs=5e-4)


def test_a_multifurcation_can_be_resolved_by_the_data():
    adata = _sim()
    flat = [["c0", "c1", "c2", "c3"], ["c4", "c5", "c6", "c7"]]
    sb.tl.branch_hierarchy(
        adata, groupby="cell_type", use_rep="X_latent", hierarchy=flat,
        multifurcations="resolve", key_added="r",
    )  # fmt: skip
    resolved = _record_tree(adata, "r")
    # binary again, and the data resolve each group of four into its true pairs
    assert all(len(b.children) in (0, 2) for b in resolved.branches)
    assert {frozenset(p) for p in (["c0", "c1"], ["c4", "c5"])} <= _splits(resolved)
    assert adata.uns["r"]["params"]["multifurcations"] == "resolve"


@pytest.mark.parametrize(
    ("hierarchy", "match"),
    [
        ([["c0", "c1"], ["c2", "c3"], ["c4", "c5"], ["c6"]], r"\['c7'\] are missing"),
        ([["c0", "c1", "c1"], ["c2", "c3", "c4", "c5", "c6", "c7"]], "more than once"),
        ([["c0", "zz"], CLASSES[1:]], "not cell types"),
        ("((c0,c1),(c2", "does not parse"),
        ({"c0": ["c1", "c2"], "x": ["c0", "c3", "c4", "c5", "c6", "c7"]}, "also a cell type"),
        ({"a": ["c0", "c1"], "b": {"a": ["c2", "c3"], "z": CLASSES[4:]}}, "used twice"),
        ("no_such_key", "not a Newick string"),
    ],
)
def test_bad_hierarchies_are_refused_clearly(hierarchy, match):
    adata = _sim()
    with pytest.raises((ValueError, KeyError), match=match):
        sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_latent", hierarchy=hierarchy)


def test_annotation_levels_that_do_not_nest_are_refused():
    adata = _sim()
    adata.obs["lineage"] = adata.obs["cell_type"].map(
        {c: ["a", "a", "b", "b", "c", "c", "d", "d"][i] for i, c in enumerate(CLASSES)}
    )
    adata.obs["compartment"] = "x"
    adata.obs.loc[adata.obs_names[:5], "compartment"] = "y"  # cells of c0 in two compartments
    with pytest.raises(ValueError, match=r"lies in 2 groups of obs\['compartment'\]"):
        sb.tl.branch_hierarchy(
            adata, groupby="cell_type", use_rep="X_latent", hierarchy=["compartment", "lineage"]
        )
    adata.obs["compartment"] = adata.obs["cell_type"].map(lambda c: "y" if c == "c0" else "x")
    with pytest.raises(ValueError, match=r"group 'a' of obs\['lineage'\] lies in 2 groups"):
        sb.tl.branch_hierarchy(
            adata, groupby="cell_type", use_rep="X_latent", hierarchy=["compartment", "lineage"]
        )
    # a misspelled level is named as a column, with the closest one (not as unknown labels)
    with pytest.raises(KeyError, match=r"\['lineag'\] are not in adata.obs.*'lineage'\?"):
        sb.tl.branch_hierarchy(
            adata, groupby="cell_type", use_rep="X_latent", hierarchy=["compartment", "lineag"]
        )


def test_parse_newick_quoted_names_comments_and_internal_labels():
    root = parse_newick("[comment](('CD4+ T':0.1,'it''s':0.1)'T cells':0.2,B:0.3)root;")
    assert root.leaves() == ["CD4+ T", "it's", "B"] and root.name == "root"
    assert root.children[0].name == "T cells" and root.children[0].length == 0.2


def test_parse_newick_unquoted_names_with_spaces():
    # branch_hierarchy's docstring example: cell types have spaces, and strict Newick refused
    root = parse_newick("((CD4 T:0.1, CD8  T:0.1)T cells:0.2,'B  x':0.3);")
    assert root.leaves() == ["CD4 T", "CD8 T", "B  x"]  # quoted spacing is kept as written
    assert root.children[0].name == "T cells" and root.children[0].length == 0.2
    with pytest.raises(HierarchyError, match="a number"):
        parse_newick("(A:0.1 B,C:0.1);")


@pytest.fixture(scope="module")
def node_model():
    adata = _sim()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    # unequal training sizes, so that proportional and uniform weights differ
    keep = ~((adata.obs["cell_type"] == "c1").to_numpy() & (np.arange(adata.n_obs) % 4 != 0))
    adata = adata[keep].copy()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(adata, hierarchy=TRUE, **FAST)
    model.train(max_epochs=1, enable_progress_bar=False)
    return model, adata


def test_generation_at_a_node_follows_the_requested_proportions(node_model):
    model, adata = node_model
    sizes = adata.obs["cell_type"].value_counts()
    n = 4000
    gen = model.generate(n_cells={"ll": n}, seed=0, n_steps=4, progress_bar=False)
    counts = gen.obs["cell_type"].value_counts()[["c0", "c1"]].to_numpy()
    expected = n * sizes[["c0", "c1"]].to_numpy() / sizes[["c0", "c1"]].sum()
    assert stats.chisquare(counts, expected).pvalue > 0.001
    assert set(gen.obs["scbranch_requested_node"]) == {"ll"}
    uniform = model.generate(
        n_cells={"ll": n}, seed=0, n_steps=4, node_weights="uniform", progress_bar=False
    )
    counts = uniform.obs["cell_type"].value_counts()[["c0", "c1"]].to_numpy()
    assert stats.chisquare(counts, [n / 2, n / 2]).pvalue > 0.001
    # a proportional split of a node with a rare type is told from a uniform one
    assert stats.chisquare(counts, expected).pvalue < 1e-6


def test_cells_of_a_type_asked_through_a_node_are_those_asked_directly(node_model):
    model, _ = node_model
    via_node = model.generate(
        n_cells={"left": 40, "c6": 5}, seed=3, n_steps=12, share=False, progress_bar=False
    )
    counts = via_node.obs["cell_type"].value_counts()
    direct = model.generate(
        n_cells={c: int(counts[c]) for c in ["c0", "c1", "c2", "c3", "c6"] if counts[c]},
        seed=3,
        n_steps=12,
        share=False,
        progress_bar=False,
    )
    for c in ["c0", "c2", "c6"]:
        a = via_node.obsm["X_latent"][(via_node.obs["cell_type"] == c).to_numpy()]
        b = direct.obsm["X_latent"][(direct.obs["cell_type"] == c).to_numpy()]
        np.testing.assert_array_equal(a, b)
    nodes = via_node.obs["scbranch_requested_node"].astype(str)
    assert set(nodes[via_node.obs["cell_type"] == "c6"]) == {"c6"}
    assert set(nodes[via_node.obs["cell_type"] != "c6"]) == {"left"}
    # trajectories of the same request say the same, on every row of a cell (it was missing)
    tr = model.generate(
        n_cells={"left": 40, "c6": 5}, seed=3, n_steps=12, share=False, progress_bar=False,
        trajectory_times=[0.5, 0.0],
    )  # fmt: skip
    ends = tr[tr.obs["t"] == 0.0]
    ends_nodes = ends.obs["scbranch_requested_node"].astype(str)
    assert set(ends_nodes[ends.obs["cell_type"] == "c6"]) == {"c6"}
    assert set(ends_nodes[ends.obs["cell_type"] != "c6"]) == {"left"}
    per_cell = tr.obs.groupby("trajectory", observed=True)["scbranch_requested_node"].nunique()
    assert (per_cell == 1).all()


def test_nodes_are_refused_where_a_type_is_needed_and_unknown_nodes_named(node_model):
    model, adata = node_model
    cells = adata[adata.obs["cell_type"] == "c0"][:3].copy()
    with pytest.raises(KeyError, match="'right' is a group of the hierarchy"):
        model.transmute(cells, "right", n_steps=4)
    with pytest.raises(KeyError, match="is a group of the hierarchy"):
        model.hybrids("ll", "c4", n_cells=2)
    # the error names the groups generate accepts, not only the types
    with pytest.raises(KeyError, match=r"Unknown label 'nowhere'.*the groups \['left', 'll'"):
        model.generate(n_cells={"nowhere": 3}, progress_bar=False)


def test_a_model_on_a_given_hierarchy_saves_loads_and_extends(node_model, tmp_path):
    model, adata = node_model
    model.tree.name_node("c01 and c23", ["c0", "c1", "c2", "c3"])
    model.save(tmp_path / "m")
    loaded = sb.BranchedDiffusion.load(tmp_path / "m")
    assert loaded.tree.node_names == model.tree.node_names
    assert "c01 and c23" in loaded.tree.node_names
    a = model.generate(n_cells={"right": 20}, seed=1, n_steps=8, progress_bar=False)
    b = loaded.generate(n_cells={"right": 20}, seed=1, n_steps=8, progress_bar=False)
    np.testing.assert_array_equal(a.obsm["X_latent"], b.obsm["X_latent"])
    new = _sim(seed=5)
    new = new[new.obs["cell_type"] == "c5"].copy()
    new.obs["cell_type"] = pd.Categorical(["c8"] * new.n_obs)
    loaded.add_classes(new, labels=["c8"], max_epochs=1, progress_bar=False)
    assert loaded.extensions_[-1]["joins"] in CLASSES
    gen = loaded.generate(n_cells={"right": 30, "c8": 3}, seed=0, n_steps=12, progress_bar=False)
    assert (gen.obs["cell_type"] == "c8").sum() >= 3
    with pytest.raises(ValueError, match="not a clade"):
        model.tree.name_node("odd", ["c0", "c4"])


def test_a_scbranch_tree_or_its_record_is_a_hierarchy_to_give():
    # read_hierarchy's BranchTree and the key of another scbranch hierarchy in .uns (a
    # BranchTree raised "not iterable", the key was read as sc.tl.dendrogram's)
    adata = _sim()
    sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_latent", key_added="found")
    found = _record_tree(adata, "found")
    clades = {frozenset(b.classes) for b in found.branches}
    sb.tl.branch_hierarchy(
        adata, groupby="cell_type", use_rep="X_latent", hierarchy=found, times="newick",
        key_added="tree",
    )  # fmt: skip
    again = _record_tree(adata, "tree")
    assert {frozenset(b.classes) for b in again.branches} == clades
    for b in found.branches:  # its own times, exactly (not through 4-decimal Newick)
        match = next(a for a in again.branches if set(a.classes) == set(b.classes))
        assert match.t_start == pytest.approx(b.t_start, abs=1e-9)
    sb.tl.branch_hierarchy(
        adata, groupby="cell_type", use_rep="X_latent", hierarchy="found", key_added="key"
    )
    assert {frozenset(b.classes) for b in _record_tree(adata, "key").branches} == clades
    assert adata.uns["key"]["params"]["given"] == "tree"
    other = BranchTree.from_merges(["x", "y"], [((0,), (1,), 0.4)])  # another data's tree
    with pytest.raises(HierarchyError, match=r"\['x', 'y'\] that are not cell types"):
        sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_latent", hierarchy=other)


def test_a_stored_hierarchy_of_another_representation_is_named_with_the_fix():
    adata = _sim()
    adata.obsm["X_other"] = adata.obsm["X_latent"][:, :4].copy()
    sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_other", key_added="other")
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    with pytest.raises(
        ValueError, match=r"computed on obsm\['X_other'\], the model learns obsm\['X_latent'\]"
    ):
        sb.BranchedDiffusion(adata, hierarchy="other", **FAST)
    model = sb.BranchedDiffusion(adata, hierarchy=adata.uns["other"]["tree"], **FAST)
    assert model.tree.classes == _record_tree(adata, "other").classes


def test_annotation_levels_with_gaps_or_the_types_themselves_are_refused_and_a_dendrogram_read():
    adata = _sim()
    lineage = dict(zip(CLASSES, ["ll", "ll", "lr", "lr", "rl", "rl", "rr", "rr"], strict=True))
    adata.obs["lineage"] = adata.obs["cell_type"].map(lineage).astype(object)
    with pytest.raises(HierarchyError, match="holds the types themselves"):  # pandas' Grouper
        sb.tl.branch_hierarchy(
            adata, groupby="cell_type", use_rep="X_latent", hierarchy=["lineage", "cell_type"]
        )
    gaps = adata.copy()
    gaps.obs.loc[gaps.obs["cell_type"] == CLASSES[0], "lineage"] = np.nan
    with pytest.raises(HierarchyError, match=f"no value for 80 cell\\(s\\).*'{CLASSES[0]}'"):
        # the missing level was read as a group "nan": the type moved without a word
        sb.tl.branch_hierarchy(gaps, groupby="cell_type", use_rep="X_latent", hierarchy="lineage")
    sc.tl.dendrogram(adata, groupby="cell_type", use_rep="X_latent")
    for form in ("dendrogram_cell_type", adata.uns["dendrogram_cell_type"]):  # the dict too
        sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_latent", hierarchy=form)
        assert adata.uns["scbranch_hierarchy"]["params"]["given"] == "dendrogram"
