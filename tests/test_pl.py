import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.collections import LineCollection, PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import scbranch as sb  # noqa: E402
from scbranch.module import BranchTree  # noqa: E402

KEY = "scbranch_hierarchy"


@pytest.fixture(scope="module")
def adata():
    adata = sb.datasets.simulate_tree(depth=2, n_per_class=40, dim=8, seed=0).to_anndata()
    sb.tl.branch_hierarchy(adata, groupby="cell_type", use_rep="X_latent")
    return adata


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _tree(adata) -> BranchTree:
    return BranchTree.from_dict(adata.uns[KEY]["tree"])


def _markers(ax: Axes) -> np.ndarray:
    (points,) = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert points.get_label() == "branch points"
    return np.asarray(points.get_offsets())


def _labels(ticks) -> list[str]:
    return [t.get_text() for t in ticks]


# ---------------------------------------------------------------------- branch_tree
def test_branch_tree_return_fig(adata):
    fig = sb.pl.branch_tree(adata, return_fig=True)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 1


def test_branch_tree_show_false_returns_axes(adata):
    ax = sb.pl.branch_tree(adata, show=False)
    assert isinstance(ax, Axes)


@pytest.mark.filterwarnings("ignore:.*non-interactive:UserWarning")
def test_branch_tree_show_true_returns_none(adata):
    assert sb.pl.branch_tree(adata, show=True) is None
    assert sb.pl.branch_similarity(adata, show=True) is None


def test_branch_tree_draws_on_given_ax(adata):
    fig, (ax0, ax1) = plt.subplots(1, 2)
    out = sb.pl.branch_tree(adata, ax=ax1, show=False)
    assert out is ax1
    assert ax1.collections and not ax0.collections
    assert len(plt.get_fignums()) == 1


def test_branch_tree_leaves_times_and_markers(adata):
    tree = _tree(adata)
    ax = sb.pl.branch_tree(adata, show=False)
    labels = _labels(ax.get_xticklabels())
    assert sorted(labels) == sorted(tree.classes)
    lo, hi = sorted(ax.get_ylim())
    assert lo <= 0.0 and hi >= 1.0
    marks = _markers(ax)
    assert len(marks) == tree.n_classes - 1
    internal = sorted(b.t_start for b in tree.branches if b.children)
    np.testing.assert_allclose(np.sort(marks[:, 1]), internal)
    # every branch point is annotated with its time
    texts = {t.get_text() for t in ax.texts}
    assert {f"{t:.2f}" for t in internal} <= texts


def test_branch_tree_lines_reach_zero_and_one(adata):
    ax = sb.pl.branch_tree(adata, show=False)
    (lines,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    heights = np.concatenate([seg[:, 1] for seg in lines.get_segments()])
    assert heights.min() == 0.0 and heights.max() == 1.0


def test_branch_tree_leaf_order_does_not_cross(adata):
    tree = _tree(adata)
    ax = sb.pl.branch_tree(adata, show=False)
    order = [tree.classes.index(s) for s in _labels(ax.get_xticklabels())]
    # the leaves of every subtree are contiguous
    for b in tree.branches:
        where = sorted(order.index(c) for c in b.classes)
        assert where == list(range(where[0], where[0] + len(where)))


@pytest.mark.parametrize("orientation", ["left", "right", "bottom"])
def test_branch_tree_orientations(adata, orientation):
    tree = _tree(adata)
    ax = sb.pl.branch_tree(adata, orientation=orientation, show=False)
    if orientation == "bottom":
        labels, lim = _labels(ax.get_xticklabels()), ax.get_ylim()
    else:
        labels, lim = _labels(ax.get_yticklabels()), ax.get_xlim()
        assert ax.get_xlim()[0] == (1.0 if orientation == "left" else 0.0)
    assert sorted(labels) == sorted(tree.classes)
    assert sorted(lim) == [0.0, 1.0]
    assert len(_markers(ax)) == tree.n_classes - 1


def test_branch_tree_bad_orientation(adata):
    with pytest.raises(ValueError, match="orientation"):
        sb.pl.branch_tree(adata, orientation="diagonal", show=False)


def test_branch_tree_accepts_branch_tree(adata):
    tree = _tree(adata)
    ax = sb.pl.branch_tree(tree, show=False)
    from_adata = sb.pl.branch_tree(adata, show=False)
    assert _labels(ax.get_xticklabels()) == _labels(from_adata.get_xticklabels())
    assert len(_markers(ax)) == tree.n_classes - 1


def test_branch_tree_uses_scanpy_colors(adata):
    adata = adata.copy()
    cats = list(adata.obs["cell_type"].astype("category").cat.categories)
    palette = ["#ff0000", "#00ff00", "#0000ff", "#aa00aa"][: len(cats)]
    adata.uns["cell_type_colors"] = np.array(palette, dtype=object)
    ax = sb.pl.branch_tree(adata, show=False)
    want = dict(zip(cats, palette, strict=True))
    for label in ax.get_xticklabels():
        assert matplotlib.colors.to_hex(label.get_color()) == want[label.get_text()]


def test_branch_tree_kwargs_reach_lines(adata):
    ax = sb.pl.branch_tree(adata, show=False, colors="red", linewidths=3)
    (lines,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert lines.get_linewidth()[0] == 3
    np.testing.assert_allclose(lines.get_color()[0], matplotlib.colors.to_rgba("red"))


def test_branch_tree_missing_key(adata):
    with pytest.raises(KeyError, match="other_key.*scbranch.tl.branch_hierarchy"):
        sb.pl.branch_tree(adata, key="other_key", show=False)


def test_branch_tree_rejects_other_types():
    with pytest.raises(TypeError, match="AnnData"):
        sb.pl.branch_tree(np.zeros(3), show=False)


@pytest.mark.filterwarnings("ignore:.*non-interactive:UserWarning")
def test_show_none_follows_autoshow(adata):
    import scanpy as sc

    before = sc.settings.autoshow
    try:
        sc.settings.autoshow = False
        assert isinstance(sb.pl.branch_tree(adata), Axes)
        assert isinstance(sb.pl.branch_similarity(adata), Axes)
        sc.settings.autoshow = True
        assert sb.pl.branch_tree(adata) is None
        assert sb.pl.branch_similarity(adata) is None
    finally:
        sc.settings.autoshow = before


# ---------------------------------------------------------------------- branch_similarity
def test_branch_similarity_return_types(adata):
    assert isinstance(sb.pl.branch_similarity(adata, return_fig=True), Figure)
    assert isinstance(sb.pl.branch_similarity(adata, show=False), Axes)


def test_branch_similarity_draws_on_given_ax(adata):
    fig, ax = plt.subplots()
    assert sb.pl.branch_similarity(adata, ax=ax, show=False) is ax
    assert len(plt.get_fignums()) == 1


def test_branch_similarity_curves_and_markers(adata):
    tree = _tree(adata)
    record = adata.uns[KEY]
    ax = sb.pl.branch_similarity(adata, show=False)
    n = tree.n_classes
    solid = [ln for ln in ax.lines if ln.get_linestyle() == "-" and len(ln.get_xdata()) > 2]
    dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert len(solid) == n and len(dashed) == n - 1
    # the within-type curves are the stored ones, untouched
    by_name = {ln.get_label(): ln for ln in solid}
    for c, name in enumerate(tree.classes):
        np.testing.assert_allclose(by_name[name].get_ydata(), record["intra"][c], rtol=1e-6)
        np.testing.assert_allclose(by_name[name].get_xdata(), record["times"], rtol=1e-6)
    marks = _markers(ax)
    internal = sorted(b.t_start for b in tree.branches if b.children)
    np.testing.assert_allclose(np.sort(marks[:, 0]), internal)
    assert sorted(ax.get_xlim()) == [0.0, 1.0]
    legend = ax.get_legend()
    assert set(tree.classes) <= {t.get_text() for t in legend.get_texts()}


def test_branch_similarity_first_merge_is_the_pair(adata):
    tree = _tree(adata)
    record = adata.uns[KEY]
    first = min((b for b in tree.branches if b.children), key=lambda b: b.t_start)
    i, j = (tree.branches[k].classes[0] for k in first.children)
    ax = sb.pl.branch_similarity(adata, show=False)
    dashed = [ln.get_ydata() for ln in ax.lines if ln.get_linestyle() == "--"]
    assert any(np.allclose(y, record["inter"][i, j], rtol=1e-6) for y in dashed)


def test_branch_similarity_subset(adata):
    tree = _tree(adata)
    first = min((b for b in tree.branches if b.children), key=lambda b: b.t_start)
    names = [tree.classes[c] for c in first.classes]
    ax = sb.pl.branch_similarity(adata, classes=names, legend=False, show=False)
    assert ax.get_legend() is None
    assert len(_markers(ax)) == 1
    assert len([ln for ln in ax.lines if ln.get_linestyle() == "--"]) == 1
    with pytest.raises(KeyError, match="nope"):
        sb.pl.branch_similarity(adata, classes=["nope"], show=False)


def test_branch_similarity_errors(adata):
    with pytest.raises(KeyError, match="other_key.*scbranch.tl.branch_hierarchy"):
        sb.pl.branch_similarity(adata, key="other_key", show=False)
    with pytest.raises(TypeError, match="AnnData"):
        sb.pl.branch_similarity(_tree(adata), show=False)
    with pytest.raises(ValueError, match="`classes` is empty"):
        sb.pl.branch_similarity(adata, classes=[], show=False)


def test_branch_tree_unknown_keywords_are_named_before_any_figure(adata):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    with pytest.raises(TypeError, match=r"\['title'\].*ax.set_title"):
        sb.pl.branch_tree(adata, title="hello", show=False)  # failed inside matplotlib
    assert plt.get_fignums() == before


def test_public_api():
    assert set(sb.pl.__all__) == {
        "branch_tree",
        "branch_similarity",
        "compare_hierarchies",
        "evaluation",
        "trajectories",
        "transmutation_genes",
    }


@pytest.fixture(scope="module")
def report():
    rng = np.random.default_rng(0)
    rows = []
    for method in ("branched", "flat"):
        for seed in range(3):
            for group in ("a", "b", "mean"):
                for metric in ("w2", "auroc", "gene_mean_spearman"):
                    space = "genes" if metric.startswith("gene") else "reference_pca"
                    rows.append(
                        {
                            "space": space,
                            "group": group,
                            "metric": metric,
                            "generated": rng.random(),
                            "control": 0.5,
                            "ratio": 1.0,
                            "better": "lower",
                            "n_cells": 10,
                            "method": method,
                            "seed": seed,
                        }
                    )
    return pd.DataFrame(rows)


def test_evaluation_plot(report):
    fig = sb.pl.evaluation(report, return_fig=True)
    assert isinstance(fig, Figure)
    panels = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title().split()[0] for a in panels] == ["w2", "auroc", "gene_mean_spearman"]
    labels = [t.get_text() for t in panels[0].get_yticklabels()]
    assert labels == ["a", "b", "mean"]
    legend = [t.get_text() for t in panels[-1].get_legend().get_texts()]
    assert legend == ["real vs real", "branched", "flat"]
    _, ax = plt.subplots()
    assert sb.pl.evaluation(report, metrics="w2", ax=ax, show=False) is ax
    axes = sb.pl.evaluation(report, metrics=["w2", "auroc"], groups=["a"], show=False)
    assert len(axes) == 2
    with pytest.raises(ValueError, match="`ax` takes one metric"):
        sb.pl.evaluation(report, ax=ax)
    with pytest.raises(ValueError, match="not in the report"):
        sb.pl.evaluation(report, metrics=["mmd"])
    # a group present only with other metrics (too few cells for distances) is said to be so
    few = report[~((report["group"] == "b") & (report["metric"] == "w2"))]
    with pytest.raises(ValueError, match=r"\['b'\] have no rows for.*have other metrics"):
        sb.pl.evaluation(few, metrics=["w2"], groups=["b"])
    with pytest.raises(ValueError, match=r"\['z'\] have no rows.*groups are"):
        sb.pl.evaluation(report, groups=["z"])
    with pytest.raises(ValueError, match="lacks column"):
        sb.pl.evaluation(report.drop(columns="control"))


def test_evaluation_plot_of_runs_that_agree_to_the_last_bit(report):
    # equal values whose float mean lies one rounding step below them (a label fidelity of
    # 0.99 in every run did this to the quality benchmark's figure)
    same = report[(report["method"] == "branched") & (report["metric"] == "auroc")].copy()
    same["generated"] = 0.99
    assert same.groupby("group")["generated"].mean().lt(0.99).all()
    fig = sb.pl.evaluation(same, metrics="auroc", return_fig=True)
    assert isinstance(fig, Figure)
    plt.close(fig)


def test_branch_similarity_legend_of_many_types_stays_on_the_figure():
    # 32 types in one legend column ran off a 4-inch figure; scanpy's rule: 3 columns past 30
    many = sb.datasets.simulate_tree(depth=5, n_per_class=6, dim=4, seed=0).to_anndata()
    sb.tl.branch_hierarchy(many, groupby="cell_type", use_rep="X_latent")
    fig = sb.pl.branch_similarity(many, return_fig=True)
    legend = fig.axes[0].get_legend()
    assert legend._ncols == 3
    fig.canvas.draw()
    box, page = legend.get_window_extent(), fig.bbox
    assert box.y0 >= page.y0 - 1 and box.y1 <= page.y1 + 1
    assert box.x0 >= page.x0 - 1 and box.x1 <= page.x1 + 1


# ---------------------------------------------------------------------- save= (scanpy's)
@pytest.mark.parametrize("name", sb.pl.__all__)
def test_every_plot_takes_scanpys_save(name):
    import inspect

    assert "save" in inspect.signature(getattr(sb.pl, name)).parameters


@pytest.fixture
def figdir(tmp_path):
    import scanpy as sc

    before = sc.settings.figdir  # a property of scanpy's settings: set and put back by hand
    sc.settings.figdir = tmp_path / "figures"
    yield
    sc.settings.figdir = before


def test_save_writes_where_scanpy_writes(adata, tmp_path, figdir):
    import scanpy as sc

    sb.pl.branch_tree(adata, save=True, show=False)
    assert (tmp_path / "figures" / f"branch_tree.{sc.settings.file_format_figs}").is_file()
    sb.pl.branch_similarity(adata, save="_sim.svg", show=False)
    svg = tmp_path / "figures" / "branch_similarity_sim.svg"
    assert svg.read_text().lstrip().startswith("<?xml")
    sb.pl.branch_tree(adata, save="_pbmc", show=False)  # no suffix: scanpy's format
    assert (tmp_path / "figures" / f"branch_tree_pbmc.{sc.settings.file_format_figs}").is_file()
    with pytest.raises(TypeError, match="save must be"):
        sb.pl.branch_tree(adata, save=3, show=False)
