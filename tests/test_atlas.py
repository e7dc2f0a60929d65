"""The simulated atlas: fitted parameters, counts, the known tree and chunked writing."""

from __future__ import annotations

import itertools
import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

import scbranch as sb
from scbranch.datasets import AtlasParameters, _atlas, fit_atlas_parameters, simulate_atlas
from scbranch.module import parse_newick


def _known(n_types: int = 3, n_genes: int = 100, seed: int = 0) -> AtlasParameters:
    """Parameters with a wide range of means (0.01 to 100s of counts) and dispersions."""
    rng = np.random.default_rng(seed)
    profiles = rng.lognormal(0.0, 1.5, (n_types, n_genes))
    profiles /= profiles.sum(1, keepdims=True)
    genes = [f"g{j}" for j in range(n_genes)]
    return AtlasParameters(
        genes=genes,
        source_genes=genes,
        types=[f"T{k}" for k in range(n_types)],
        profiles=profiles,
        theta=rng.uniform(0.5, 5.0, n_genes),
        log_library_mean=np.log(rng.uniform(1000, 3000, n_types)),
        log_library_sd=np.full(n_types, 0.3),
        type_fractions=np.arange(1, n_types + 1) / np.arange(1, n_types + 1).sum(),
    )


def _draw_reference(params: AtlasParameters, n_per_type: int, seed: int = 1) -> ad.AnnData:
    """Cells drawn with numpy's own negative binomial (independent of the simulator)."""
    rng = np.random.default_rng(seed)
    blocks, labels = [], []
    for k, name in enumerate(params.types):
        library = np.exp(
            rng.normal(params.log_library_mean[k], params.log_library_sd[k], n_per_type)
        )
        mu = library[:, None] * params.profiles[k]
        theta = params.theta[None, :]
        blocks.append(rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float32))
        labels += [name] * n_per_type
    adata = ad.AnnData(
        X=sp.csr_matrix(np.vstack(blocks)),
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))]
        ),
        var=pd.DataFrame(index=params.genes),
    )
    adata.layers["counts"] = adata.X.copy()
    return adata


def _clades(newick: str) -> set[frozenset[str]]:
    """Leaf sets below every internal node but the root."""
    root = parse_newick(newick)
    return {frozenset(node.leaves()) for node in root.walk() if node.children and node is not root}


def test_nb_sampler_matches_the_negative_binomial():
    rng = np.random.default_rng(0)
    # small means (CDF inversion, with heavy tails) and large ones (gamma-Poisson)
    cases = [(0.02, 0.1), (0.5, 1.0), (3.0, 0.2), (10.0, 5.0), (15.0, 0.1), (40.0, 2.0)]
    cases += [(2.0, 1000.0)]
    means = np.array([m for m, _ in cases])
    theta = np.array([t for _, t in cases])
    n = 100_000
    ratio = np.broadcast_to((means / theta).astype(np.float32), (n, len(cases))).copy()
    X = _atlas._nb_csr(ratio, theta, rng)
    assert sp.isspmatrix_csr(X) and X.dtype == np.float32
    X = X.toarray()
    assert np.all(X == np.round(X))
    for j, (m, t) in enumerate(cases):
        x = X[:, j]
        dist = stats.nbinom(t, t / (t + m))
        np.testing.assert_allclose(x.mean(), m, rtol=5 * np.sqrt(dist.var() / n) / m)
        pmf = np.bincount(x.astype(np.int64), minlength=20)[:20] / n
        np.testing.assert_allclose(pmf, dist.pmf(np.arange(20)), atol=0.005)
        assert abs(x.var() / dist.var() - 1) < 0.25


def test_fit_recovers_known_negative_binomial_parameters():
    truth = _known()
    adata = _draw_reference(truth, n_per_type=2000)
    fit = fit_atlas_parameters(adata, n_genes=truth.n_genes)
    assert list(fit.types) == list(truth.types) and list(fit.genes) == list(truth.genes)
    expected = np.exp(truth.log_library_mean)[:, None] * truth.profiles
    well = expected > 1.0
    np.testing.assert_allclose(fit.profiles[well], truth.profiles[well], rtol=0.1)
    # dispersion: genes with some counts in every type
    expressed = expected.min(0) > 0.5
    assert expressed.sum() > 30
    ratio = fit.theta[expressed] / truth.theta[expressed]
    assert np.median(np.abs(np.log(ratio))) < 0.1 and np.all(np.abs(np.log(ratio)) < 0.5)
    np.testing.assert_allclose(fit.log_library_mean, truth.log_library_mean, atol=0.03)
    np.testing.assert_allclose(fit.log_library_sd, truth.log_library_sd, rtol=0.1)
    np.testing.assert_allclose(fit.type_fractions, [1 / 3] * 3)


def test_fit_selects_variable_genes_and_makes_up_the_rest():
    truth = _known(n_genes=100)
    adata = _draw_reference(truth, n_per_type=200)
    # the 20 genes with the most different type means are kept
    fewer = fit_atlas_parameters(adata, n_genes=20)
    means = np.log1p(truth.profiles * 1e4).var(0)
    overlap = set(fewer.genes) & {f"g{j}" for j in np.argsort(-means)[:20]}
    assert fewer.n_genes == 20 and len(overlap) >= 15
    more = fit_atlas_parameters(adata, n_genes=250, seed=3)
    made_up = more.genes[100:]
    assert more.n_genes == 250 and len(set(more.genes)) == 250
    assert all(
        g.startswith(s + "-sim") for g, s in zip(made_up, more.source_genes[100:], strict=True)
    )
    # every real gene is copied once before any is copied again
    assert pd.Series(more.source_genes[100:200]).is_unique
    np.testing.assert_allclose(more.profiles.sum(1), 1.0)
    np.testing.assert_array_equal(
        more.theta[100:], more.theta[[int(s[1:]) for s in more.source_genes[100:]]]
    )
    # made-up genes add counts as their sources do: the library grows with the genes
    assert np.all(more.log_library_mean > fewer.log_library_mean)


def test_parameters_save_and_load(tmp_path):
    params = _known()
    params.save(tmp_path / "p.npz")
    back = AtlasParameters.load(tmp_path / "p.npz")
    for name in ("genes", "types", "profiles", "theta", "log_library_sd"):
        np.testing.assert_array_equal(getattr(back, name), getattr(params, name))
    with pytest.raises(ValueError, match="rows summing to 1"):
        AtlasParameters(**{**vars(params), "profiles": params.profiles * 2})


@pytest.fixture(scope="module")
def known_atlas(tmp_path_factory):
    truth = _known()
    path = tmp_path_factory.mktemp("atlas") / "known.h5ad"
    simulate_atlas(path, 6000, n_types=3, parameters=truth, seed=4, progress_bar=False)
    return truth, path


def test_simulated_means_match_the_parameters(known_atlas):
    truth, path = known_atlas
    atlas = ad.read_h5ad(path)
    sim = atlas.uns["simulation"]
    assert "SIMULATED" in sim["note"] and sim["n_cells"] == 6000
    X = atlas.X.toarray()
    for k, leaf in enumerate(sim["leaves"]):
        cells = X[(atlas.obs["cell_type"] == leaf).to_numpy()]
        mean_lib = np.exp(sim["log_library_mean"][k] + sim["log_library_sd"][k] ** 2 / 2)
        expected = mean_lib * sim["profiles"][k].astype(np.float64)
        var_lib = mean_lib**2 * (np.exp(sim["log_library_sd"][k] ** 2) - 1)
        p = sim["profiles"][k]
        # variance of a count: NB around a log-normal library
        var = expected + (expected**2 + var_lib * p**2) / truth.theta + var_lib * p**2
        z = (cells.mean(0) - expected) / np.sqrt(var / len(cells))
        assert np.abs(z).max() < 5, (leaf, np.abs(z).max())
        well = expected > 1
        np.testing.assert_allclose(cells.mean(0)[well], expected[well], rtol=0.15)
    # the cells' library sizes follow their type's log-normal
    logs = np.log(atlas.obs["n_counts"].to_numpy())
    level1 = atlas.obs["level1"].cat.codes.to_numpy()
    np.testing.assert_allclose(
        [logs[level1 == k].mean() for k in range(3)], truth.log_library_mean, atol=0.05
    )


def test_fit_on_simulated_cells_recovers_the_dispersion(known_atlas):
    truth, path = known_atlas
    atlas = ad.read_h5ad(path)
    fit = fit_atlas_parameters(atlas, counts_layer=None, n_genes=truth.n_genes)
    expected = np.exp(truth.log_library_mean)[:, None] * truth.profiles
    expressed = expected.min(0) > 0.5
    ratio = fit.theta[expressed] / truth.theta[expressed]
    assert np.median(np.abs(np.log(ratio))) < 0.1 and np.all(np.abs(np.log(ratio)) < 0.5)
    np.testing.assert_allclose(atlas.var["theta"], truth.theta)


def test_tree_levels_names_and_frequencies():
    params = _known(n_types=4, n_genes=50)
    tree = _atlas._build_tree(params, 30, 1.0, 0.5, 0.1, 0.002, np.random.default_rng(0))
    assert len(tree.leaves) == 30 and len(set(tree.leaves)) == 30
    # 30 leaves over 4 types: 8, 8 (the two most frequent types: T3, T2), 7, 7
    per_type = np.bincount(tree.level1, minlength=4)
    np.testing.assert_array_equal(per_type, [7, 7, 8, 8])
    assert tree.leaves[0] == "T0.1.1" and tree.level2[0] == "T0.1"
    # 7 leaves -> 3 children (3, 2, 2), 8 leaves -> 3 children (3, 3, 2)
    sizes = [sum(1 for _ in group) for _, group in itertools.groupby(tree.level2)]
    assert sizes == [3, 2, 2] * 2 + [3, 3, 2] * 2
    np.testing.assert_allclose(tree.fractions.sum(), 1.0)
    assert tree.fractions.min() >= 0.002 * (1 - 1e-9) and (tree.fractions < 0.01).any()
    np.testing.assert_allclose(tree.profiles.sum(1), 1.0)
    clades = _clades(tree.newick)
    assert frozenset(tree.leaves[:3]) in clades  # T0.1's leaves
    assert frozenset(tree.leaves[:7]) in clades  # T0's leaves
    assert parse_newick(tree.newick).leaves() == tree.leaves


def test_siblings_are_closer_than_cousins_in_the_true_profiles():
    params = _known(n_types=3, n_genes=400)
    tree = _atlas._build_tree(params, 27, 1.0, 0.5, 0.1, 0.001, np.random.default_rng(1))
    logp = np.log(tree.profiles)
    level2 = np.asarray(tree.level2)
    d = {"siblings": [], "cousins": [], "distant": []}
    for a, b in itertools.combinations(range(len(tree.leaves)), 2):
        dist = np.sum((logp[a] - logp[b]) ** 2)
        if level2[a] == level2[b]:
            d["siblings"].append(dist)
        elif tree.level1[a] == tree.level1[b]:
            d["cousins"].append(dist)
        else:
            d["distant"].append(dist)
    assert max(d["siblings"]) < min(d["cousins"])
    assert np.mean(d["cousins"]) < np.mean(d["distant"])


def test_branch_hierarchy_recovers_the_true_tree(tmp_path):
    import scanpy as sc

    params = _known(n_types=3, n_genes=200, seed=2)
    path = simulate_atlas(
        tmp_path / "tree.h5ad", 1800, n_types=12, parameters=params, level2_lfc_sd=2.0,
        level3_lfc_sd=1.0, perturbed_fraction=0.3, min_type_fraction=0.05, seed=0,
        progress_bar=False,
    )  # fmt: skip
    atlas = ad.read_h5ad(path)
    sc.pp.normalize_total(atlas, target_sum=1e4)
    sc.pp.log1p(atlas)
    sc.pp.pca(atlas, n_comps=20, random_state=0)
    sb.tl.branch_hierarchy(atlas, groupby="cell_type", use_rep="X_pca")
    found = _clades(atlas.uns["scbranch_hierarchy"]["newick"])
    true = _clades(atlas.uns["simulation"]["newick"])
    assert len(true) == 3 + 6  # three level-1 and six level-2 clades of two leaves
    assert true <= found, true - found


def test_file_content_does_not_depend_on_chunks_or_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(_atlas, "_BLOCK", 256)
    params = _known(n_genes=40)
    kw = {"n_types": 6, "parameters": params, "seed": 7, "progress_bar": False}
    a = simulate_atlas(tmp_path / "a.h5ad", 1000, chunk_size=1000, **kw)
    b = simulate_atlas(tmp_path / "b.h5ad", 1000, chunk_size=300, n_jobs=2, **kw)
    c = simulate_atlas(tmp_path / "c.h5ad", 1000, chunk_size=97, **kw | {"seed": 8})
    A, B, C = (ad.read_h5ad(p, backed="r") for p in (a, b, c))
    for atlas in (A, B):
        block = atlas.X[:500]
        assert sp.issparse(block) and np.all(block.data == np.round(block.data))
        assert block.data.min() > 0
    np.testing.assert_array_equal(A.X[:].toarray(), B.X[:].toarray())
    pd.testing.assert_frame_equal(A.obs, B.obs)
    assert not np.array_equal(A.X[:].toarray(), C.X[:].toarray())
    assert A.obs_names[0] == "cell0" and A.obs_names.is_unique
    np.testing.assert_array_equal(A.obs["n_counts"], np.asarray(A.X[:].sum(1)).ravel())
    assert list(A.obs["cell_type"].cat.categories) == list(A.uns["simulation"]["leaves"])


def test_zarr_output_matches_h5ad(tmp_path):
    kw = {"n_types": 3, "parameters": _known(n_genes=30), "seed": 2, "progress_bar": False}
    h5 = ad.read_h5ad(simulate_atlas(tmp_path / "x.h5ad", 300, **kw))
    zr = ad.read_zarr(simulate_atlas(tmp_path / "x.zarr", 300, **kw))
    np.testing.assert_array_equal(h5.X.toarray(), zr.X.toarray())
    pd.testing.assert_frame_equal(h5.obs, zr.obs)
    assert zr.uns["simulation"]["newick"] == h5.uns["simulation"]["newick"]


def test_existing_path_is_refused_before_any_work(tmp_path, monkeypatch):
    path = tmp_path / "there.h5ad"
    path.write_text("keep me")

    def fail(*args, **kwargs):
        raise AssertionError("fitted parameters before checking the path")

    monkeypatch.setattr(_atlas, "fit_atlas_parameters", fail)
    monkeypatch.setattr(_atlas, "_default_parameters", fail)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        simulate_atlas(path, 100)
    assert path.read_text() == "keep me"


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_failure_mid_write_leaves_nothing_behind(tmp_path, monkeypatch, suffix):
    monkeypatch.setattr(_atlas, "_BLOCK", 100)
    path = tmp_path / f"atlas{suffix}"
    path.write_text("the old file")
    original = _atlas._make_block

    def make(b, *args):
        if b == 2:
            raise RuntimeError("disk full")
        return original(b, *args)

    monkeypatch.setattr(_atlas, "_make_block", make)
    with pytest.raises(RuntimeError, match="disk full"):
        simulate_atlas(
            path, 500, n_types=3, parameters=_known(n_genes=20), chunk_size=100,
            overwrite=True, progress_bar=False,
        )  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == [path.name]
    assert path.read_text() == "the old file"


def test_default_atlas_has_all_types_at_ten_thousand_cells(tmp_path):
    path = simulate_atlas(tmp_path / "d.h5ad", 10_000, n_genes=50, progress_bar=False)
    atlas = ad.read_h5ad(path, backed="r")
    counts = atlas.obs["cell_type"].value_counts()
    assert len(atlas.obs["cell_type"].cat.categories) == 60 and (counts > 0).all()
    assert atlas.obs["level1"].nunique() == 10 and atlas.obs["level2"].nunique() == 20
    share = counts / counts.sum()
    assert share.min() >= 0.001 and (share < 0.01).sum() >= 5 and share.max() > 0.05
    sim = atlas.uns["simulation"]
    assert "SIMULATED" in sim["note"] and "pbmc68k" in sim["reference"]
    assert atlas.var["made_up"].sum() == 0 and atlas.shape == (10_000, 50)
    b_cells = frozenset(f"CD19+ B.1.{i}" for i in (1, 2, 3))
    assert b_cells in _clades(sim["newick"]) and b_cells <= set(counts.index)


def test_bad_input_gets_clear_errors(tmp_path):
    params = _known()
    adata = _draw_reference(params, 20)
    with pytest.raises(ValueError, match="n_types >= 3"):
        simulate_atlas(tmp_path / "a.h5ad", 100, n_types=2, parameters=params)
    with pytest.raises(ValueError, match="at least n_types"):
        simulate_atlas(tmp_path / "a.h5ad", 10, n_types=20, parameters=params)
    with pytest.raises(ValueError, match="not both"):
        simulate_atlas(tmp_path / "a.h5ad", 100, reference=adata, parameters=params)
    with pytest.raises(ValueError, match="leave n_genes out"):
        simulate_atlas(tmp_path / "a.h5ad", 100, n_genes=7, parameters=params)
    with pytest.raises(KeyError, match="counts_layer=None"):
        simulate_atlas(tmp_path / "a.h5ad", 100, reference=adata, counts_layer="raw")
    with pytest.raises(KeyError, match="not a column of adata.obs"):
        fit_atlas_parameters(adata, labels_key="celltype")
    lognorm = adata.copy()
    lognorm.layers["counts"] = lognorm.layers["counts"] * 0.5
    with pytest.raises(ValueError, match="raw counts"):
        fit_atlas_parameters(lognorm)
    with pytest.raises(ValueError, match="fewer than 3 cells"):
        fit_atlas_parameters(adata[:42].copy())
    assert not any(tmp_path.iterdir())
