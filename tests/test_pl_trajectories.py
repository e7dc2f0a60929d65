import matplotlib

matplotlib.use("Agg")

import anndata as ad  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.collections import LineCollection, PathCollection  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from test_interpret_metrics import (  # noqa: E402
    CLASSES,
    SRC,
    T_STAR,
    TGT,
    make_generated_trajectories,
    make_planted,
    make_reference,
    make_transmuted,
)

import scbranch as sb  # noqa: E402
from scbranch.pl._trajectories import trajectories, transmutation_genes  # noqa: E402
from scbranch.tl._interpret import rank_transmutation_genes  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def reference():
    return make_reference(n_per_class=40, seed=3)


def _segments(ax: Axes) -> list[np.ndarray]:
    (lines,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    return [np.asarray(s) for s in lines.get_segments()]


def _markers(ax: Axes, label: str) -> np.ndarray:
    (points,) = [
        c for c in ax.collections if isinstance(c, PathCollection) and c.get_label() == label
    ]
    return np.asarray(points.get_offsets())


def _umap_centre(reference, label):
    return reference.obsm["X_umap"][(reference.obs["cell_type"] == label).to_numpy()].mean(0)


def _dense(m) -> np.ndarray:
    return m.toarray() if sp.issparse(m) else np.array(m, copy=True)


def _snapshot(adata: ad.AnnData) -> dict:
    return {
        "obs": adata.obs.copy(),
        "obsm": {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        "X": _dense(adata.X),
        "uns": {
            k: dict(v) if isinstance(v, dict) else np.array(v, copy=True)
            for k, v in adata.uns.items()
        },
        "var": adata.var.copy(),
    }


def _assert_unchanged(adata: ad.AnnData, snap: dict) -> None:
    pd.testing.assert_frame_equal(adata.obs, snap["obs"])
    pd.testing.assert_frame_equal(adata.var, snap["var"])
    assert set(adata.obsm) == set(snap["obsm"])
    for k, v in snap["obsm"].items():
        np.testing.assert_array_equal(adata.obsm[k], v)
    np.testing.assert_array_equal(_dense(adata.X), snap["X"])
    assert set(adata.uns) == set(snap["uns"])
    for k, v in snap["uns"].items():
        if isinstance(v, dict):
            assert adata.uns[k].keys() == v.keys()
        else:
            np.testing.assert_array_equal(np.asarray(adata.uns[k]), v)


# ------------------------------------------------------------------ trajectories
def test_trajectories_scanpy_return_rules(reference):
    tm = make_transmuted(n_cells=10)
    fig = trajectories(tm, reference, return_fig=True)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    ax = trajectories(tm, reference, show=False)
    assert isinstance(ax, Axes)
    fig, (ax0, ax1) = plt.subplots(1, 2)
    n_figs = len(plt.get_fignums())
    out = trajectories(tm, reference, ax=ax1, show=False)
    assert out is ax1 and ax1.collections and not ax0.collections
    assert len(plt.get_fignums()) == n_figs


@pytest.mark.filterwarnings("ignore:.*non-interactive:UserWarning")
def test_trajectories_show_true_returns_none(reference):
    assert trajectories(make_transmuted(n_cells=5), reference, show=True) is None


def test_trajectories_in_the_model_space_are_the_states(reference):
    """basis='pca' for a model on X_pca: lines run through the states, in checkpoint order."""
    tm = make_transmuted(n_cells=6, k=4)
    shuffled = tm[np.random.default_rng(0).permutation(tm.n_obs)].copy()
    ax = trajectories(shuffled, reference, basis="pca", show=False)
    segments = _segments(ax)
    assert len(segments) == 6 and all(len(s) == 7 for s in segments)
    states = tm.obsm["X_pca"][:, :2].reshape(6, 7, 2)  # rows are trajectory-major
    by_start = {tuple(np.round(s[0], 8)): s for s in segments}
    for expected in states:
        np.testing.assert_allclose(by_start[tuple(np.round(expected[0], 8))], expected)
    ends = _markers(ax, "endpoint")
    np.testing.assert_allclose(
        ends[np.argsort(ends[:, 0])], states[np.argsort(states[:, -1, 0]), -1]
    )
    starts = _markers(ax, "source cell")
    np.testing.assert_allclose(
        starts[np.argsort(starts[:, 0])], states[np.argsort(states[:, 0, 0]), 0]
    )


@pytest.mark.parametrize("kind", ["keep", "stay"])
@pytest.mark.parametrize("obsm_key", ["X_pca", ""])  # latent model; expression model (genes)
def test_trajectories_placed_by_neighbours(reference, kind, obsm_key):
    tm = make_transmuted(n_cells=15, kind=kind, obsm_key=obsm_key)
    ax = trajectories(tm, reference, basis="umap", show=False)
    ends, starts = _markers(ax, "endpoint"), _markers(ax, "source cell")
    assert len(ends) == len(starts) == 15
    arrival = TGT if kind == "keep" else SRC
    other = SRC if kind == "keep" else TGT
    d_arrival = np.linalg.norm(ends - _umap_centre(reference, arrival), axis=1)
    d_other = np.linalg.norm(ends - _umap_centre(reference, other), axis=1)
    assert (d_arrival < d_other).all()
    d_src = np.linalg.norm(starts - _umap_centre(reference, SRC), axis=1)
    d_tgt = np.linalg.norm(starts - _umap_centre(reference, TGT), axis=1)
    assert (d_src < d_tgt).all()


def test_trajectories_of_generate(reference):
    gen = make_generated_trajectories(n_cells=8)
    ax = trajectories(gen, reference, show=False)
    segments = _segments(ax)
    assert len(segments) == 8 and all(len(s) == 4 for s in segments)
    ends = _markers(ax, "end")
    d_tgt = np.linalg.norm(ends - _umap_centre(reference, TGT), axis=1)
    d_src = np.linalg.norm(ends - _umap_centre(reference, SRC), axis=1)
    assert (d_tgt < d_src).all()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "start" in labels and "end" in labels


def test_trajectories_subsample_is_seeded(reference):
    tm = make_transmuted(n_cells=30)
    a = _markers(trajectories(tm, reference, max_trajectories=5, seed=1, show=False), "endpoint")
    b = _markers(trajectories(tm, reference, max_trajectories=5, seed=1, show=False), "endpoint")
    c = _markers(trajectories(tm, reference, max_trajectories=5, seed=2, show=False), "endpoint")
    assert len(a) == 5
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (
        len(_markers(trajectories(tm, reference, max_trajectories=None, show=False), "endpoint"))
        == 30
    )


def test_trajectories_use_scanpy_colours_and_leave_reference_alone(reference):
    ref = reference.copy()
    ref.uns["cell_type_colors"] = np.array(["#ff0000", "#00ff00", "#0000ff"], dtype=object)
    ref.obs["n_counts"] = np.arange(ref.n_obs, dtype=float)
    before = _snapshot(ref)
    ax = trajectories(make_transmuted(n_cells=10, obsm_key=""), ref, show=False)
    points = ax.collections[0]
    colours = [to_hex(c) for c in points.get_facecolors()]
    labels = ref.obs["cell_type"].astype(str).to_numpy()
    assert {colours[i] for i in np.flatnonzero(labels == CLASSES[0])} == {"#ff0000"}
    assert {colours[i] for i in np.flatnonzero(labels == CLASSES[2])} == {"#0000ff"}
    fig = trajectories(make_transmuted(n_cells=5), ref, color="n_counts", return_fig=True)
    assert len(fig.axes) == 2  # the colorbar
    trajectories(make_transmuted(n_cells=5), ref, basis="pca", use_rep="X", show=False)
    _assert_unchanged(ref, before)


def test_trajectories_on_pbmc_land_where_the_real_cells_are():
    """Real monocytes 'transmuted' into real dendritic cells, placed in pbmc68k's UMAP."""
    pbmc = sb.datasets.pbmc68k()
    before = _snapshot(pbmc)
    mono = np.flatnonzero((pbmc.obs["cell_type"] == "CD14+ Monocyte").to_numpy())[:40]
    dc = np.flatnonzero((pbmc.obs["cell_type"] == "Dendritic").to_numpy())[:40]
    cats = list(pbmc.obs["cell_type"].cat.categories)
    n = len(mono)
    ids = [f"m{i}" for i in range(n)]
    tm = ad.AnnData(
        X=sp.vstack([pbmc.X[mono], pbmc.X[dc]]).toarray(),
        obs=pd.DataFrame(
            {
                "trajectory": pd.Categorical(ids * 2),
                "checkpoint": np.repeat([0, 2], n).astype(np.int64),
                "t": np.full(2 * n, 0.001),
                "phase": pd.Categorical(
                    np.repeat(["source", "endpoint"], n),
                    categories=["source", "up", "branch point", "down", "endpoint"],
                ),
                "source_label": pd.Categorical(["CD14+ Monocyte"] * (2 * n), categories=cats),
                "target_label": pd.Categorical(["Dendritic"] * (2 * n), categories=cats),
            },
            index=[f"{i}-{k}" for k in (0, 2) for i in ids],
        ),
        var=pbmc.var[[]],
    )
    tm.obsm["X_pca"] = np.vstack([pbmc.obsm["X_pca"][mono], pbmc.obsm["X_pca"][dc]])
    tm.uns["scbranch"] = {"model": {"labels_key": "cell_type", "obsm_key": "X_pca"}}
    umap = pbmc.obsm["X_umap"]
    # each state IS a real cell of the reference: it lands exactly on that cell
    for use_rep in (None, "X"):
        ax = trajectories(tm, pbmc, use_rep=use_rep, show=False)
        for label, cells in (("source cell", mono), ("endpoint", dc)):
            np.testing.assert_allclose(_markers(ax, label), umap[cells], atol=1e-4)
    # states a little off the real cells go among their neighbours, not onto one cell
    tm.obsm["X_pca"] = tm.obsm["X_pca"] + 0.05
    ax = trajectories(tm, pbmc, show=False)
    typical = np.median(np.linalg.norm(umap - umap[::-1], axis=1))
    miss = np.linalg.norm(_markers(ax, "source cell") - umap[mono], axis=1)
    assert 0 < np.median(miss) < 0.15 * typical
    _assert_unchanged(pbmc, before)


def test_trajectories_bad_inputs(reference):
    tm = make_transmuted(n_cells=5)
    with pytest.raises(KeyError, match="reference.obsm has no 'X_tsne'"):
        trajectories(tm, reference, basis="tsne")
    with pytest.raises(KeyError, match="color='leiden' is not a column of reference.obs"):
        trajectories(tm, reference, color="leiden")
    with pytest.raises(KeyError, match="use_rep='X_scvi' is not in transmuted.obsm"):
        trajectories(tm, reference, use_rep="X_scvi")
    with pytest.raises(ValueError, match="max_trajectories"):
        trajectories(tm, reference, max_trajectories=0)
    with pytest.raises(ValueError, match="n_neighbors must be at least 1, got 0"):
        trajectories(tm, reference, n_neighbors=0)
    with pytest.raises(ValueError, match="lacks"):
        trajectories(reference, reference)


# -------------------------------------------------------------- transmutation_genes
def _image(ax: Axes) -> np.ndarray:
    (image,) = ax.get_images()
    return np.asarray(image.get_array())


def test_transmutation_genes_from_the_ranking():
    tm = make_planted(k=5)
    rank_transmutation_genes(tm)
    ax = transmutation_genes(tm, n_genes=3, show=False)
    genes = [t.get_text() for t in ax.get_yticklabels()]
    assert len(genes) == 6 and genes[0] == "UP"
    assert {"EARLY", "LATE_DOWN"} <= set(genes[3:])
    image = _image(ax)
    assert image.shape == (6, 9)
    np.testing.assert_allclose(image[:, 0], 0.0, atol=1e-6)  # the source itself
    assert image[0, -1] == pytest.approx(3.0, abs=0.2)  # UP: +3 at the endpoint
    assert image[0, 4] == pytest.approx(0.0, abs=0.2)  # ... not yet at the branch point
    early = genes.index("EARLY")
    assert image[early, 4] == pytest.approx(-2.0, abs=0.2)  # EARLY is there by the branch point
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks[0] == "0.001" and ticks[4] == f"{T_STAR:.2g}" and ticks[-1] == "0.001"
    (branch,) = [line for line in ax.get_lines() if line.get_label() == "branch point"]
    assert branch.get_xdata()[0] == 4
    assert len(ax.figure.axes) == 2  # the colorbar


def test_transmutation_genes_given_genes_and_return_rules(tmp_path):
    tm = make_planted(k=5)
    fig = transmutation_genes(tm, genes=["EARLY", "UP"], return_fig=True)
    assert isinstance(fig, Figure)
    image = _image(fig.axes[0])
    assert image.shape == (2, 9) and image[0, 4] == pytest.approx(-2.0, abs=0.2)
    _, (ax0, ax1) = plt.subplots(1, 2)
    assert transmutation_genes(tm, genes="UP", ax=ax1, show=False) is ax1
    assert ax1.get_images() and not ax0.get_images()
    # after a round trip through h5ad
    rank_transmutation_genes(tm)
    tm.write_h5ad(tmp_path / "tm.h5ad")
    back = ad.read_h5ad(tmp_path / "tm.h5ad")
    ax = transmutation_genes(back, n_genes=2, show=False)
    assert [t.get_text() for t in ax.get_yticklabels()][0] == "UP"


def test_transmutation_genes_bad_inputs():
    tm = make_planted(k=5)
    with pytest.raises(KeyError, match="run `sb.tl.rank_transmutation_genes"):
        transmutation_genes(tm)
    with pytest.raises(KeyError, match="NOPE"):
        transmutation_genes(tm, genes=["UP", "NOPE"])
    other = make_transmuted(n_cells=40, k=5, target=CLASSES[2], prefix="b")
    other = ad.AnnData(X=tm.X.copy(), obs=other.obs, var=tm.var.copy(), uns=tm.uns)
    both = ad.concat([tm, other], merge="same", uns_merge="first")
    with pytest.raises(ValueError, match="several target types"):
        transmutation_genes(both, genes=["UP"])
    ax = transmutation_genes(both, genes=["UP"], group=CLASSES[2], show=False)
    assert ax.get_title() == f"to {CLASSES[2]}"
    with pytest.raises(ValueError, match="not a target type"):
        transmutation_genes(both, genes=["UP"], group=SRC)
    with pytest.raises(ValueError, match="no genes"):
        transmutation_genes(make_transmuted(genes=False), genes=["g0"])
