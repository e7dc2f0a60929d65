"""sb.tl.embed_like: new cells placed in a real embedding (known answers and bad input)."""

import matplotlib

matplotlib.use("Agg")

import anndata as ad  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scanpy as sc  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from test_interpret_metrics import make_reference  # noqa: E402

import scbranch as sb  # noqa: E402


@pytest.fixture(scope="module")
def pbmc():
    return sb.datasets.pbmc68k()


def _snapshot(adata):
    return (
        adata.X.copy(),
        {k: np.array(v, copy=True) for k, v in adata.obsm.items()},
        sorted(adata.uns.keys()),
        adata.obs.copy(),
    )


def _assert_unchanged(adata, snap):
    x, obsm, uns, obs = snap
    assert (adata.X != x).nnz == 0 if hasattr(x, "nnz") else np.array_equal(adata.X, x)
    assert sorted(adata.obsm.keys()) == sorted(obsm)
    for k, v in obsm.items():
        np.testing.assert_array_equal(adata.obsm[k], v)
    assert sorted(adata.uns.keys()) == uns
    assert adata.obs.equals(obs)


def test_gene_projection_reproduces_the_reference_pca(pbmc):
    # known answer: the reference's own cells, given as genes only, land on their X_pca
    new = pbmc[:80].copy()
    del new.obsm["X_pca"]
    sb.tl.embed_like(new, pbmc, basis="pca")
    np.testing.assert_allclose(new.obsm["X_pca"], pbmc.obsm["X_pca"][:80], atol=1e-3)
    sb.tl.embed_like(new, pbmc, basis="umap")  # a second placement keeps the first's record
    assert set(new.uns["scbranch_embed_like"]) == {"X_pca", "X_umap"}
    assert new.uns["scbranch_embed_like"]["X_pca"]["params"]["coordinates_from"] == (
        "genes projected on the PCA"
    )
    # one type alone keeps its place (ingest would centre it on its own mean)
    mono = pbmc[pbmc.obs["cell_type"] == "CD14+ Monocyte"].copy()
    truth = mono.obsm["X_pca"].copy()
    del mono.obsm["X_pca"]
    sb.tl.embed_like(mono, pbmc, basis="pca")
    np.testing.assert_allclose(mono.obsm["X_pca"], truth, atol=1e-3)
    # a graph on fewer PCs than X_pca holds: basis="pca" still gives every component
    ref = pbmc.copy()
    ref.uns["neighbors"] = {"params": {"use_rep": "X_pca", "n_pcs": 10}}  # as sc.pp.neighbors
    del new.obsm["X_pca"]
    sb.tl.embed_like(new, ref, basis="pca")
    assert new.obsm["X_pca"].shape == (80, pbmc.obsm["X_pca"].shape[1])
    np.testing.assert_allclose(new.obsm["X_pca"], pbmc.obsm["X_pca"][:80], atol=1e-3)


def test_gene_projection_follows_how_sc_pp_pca_was_run(pbmc):
    # known answer as above, for a PCA of a layer (.X holding counts) and of a boolean mask:
    # the first was centred with .X (off by up to 18 PC units), the second crashed
    ref = pbmc.copy()
    ref.layers["lognorm"] = ref.X.copy()
    ref.X = ref.layers["counts"].copy()
    sc.pp.pca(ref, n_comps=20, layer="lognorm")
    masked = pbmc.copy()
    mask = np.zeros(masked.n_vars, bool)
    mask[:300] = True
    sc.pp.pca(masked, n_comps=20, mask_var=mask)
    for reference in (ref, masked):
        new = pbmc[:60].copy()  # log-normalised genes, as generated cells hold
        del new.obsm["X_pca"]
        sb.tl.embed_like(new, reference, basis="pca")
        np.testing.assert_allclose(new.obsm["X_pca"], reference.obsm["X_pca"][:60], atol=1e-3)


def test_cells_land_among_their_own_type_and_near_their_true_place():
    # the reference's 'UMAP' is a known map of X_pca; new cells come from the same clusters
    reference = make_reference(n_per_class=60, seed=1)
    new = make_reference(n_per_class=20, seed=2)
    truth = new.obsm.pop("X_umap")
    snap = _snapshot(reference)
    sb.tl.embed_like(new, reference)
    _assert_unchanged(reference, snap)
    placed = new.obsm["X_umap"]
    clf = KNeighborsClassifier(15).fit(reference.obsm["X_umap"], reference.obs["cell_type"])
    assert (clf.predict(placed) == new.obs["cell_type"]).mean() > 0.95
    spread = np.linalg.norm(truth - truth.mean(0), axis=1).mean()
    assert np.median(np.linalg.norm(placed - truth, axis=1)) < 0.35 * spread
    params = new.uns["scbranch_embed_like"]["X_umap"]["params"]
    assert params["placement"] == "nearest reference cells" and params["use_rep"] == "X_pca"


def test_real_pbmc_cells_are_placed_as_well_as_their_pca_allows(pbmc):
    rng = np.random.default_rng(0)
    order = rng.permutation(pbmc.n_obs)
    reference, new = pbmc[order[100:]].copy(), pbmc[order[:100]].copy()
    sc.pp.neighbors(reference, use_rep="X_pca", n_neighbors=15, random_state=0)
    sc.tl.umap(reference, random_state=0)
    del new.obsm["X_umap"]
    sb.tl.embed_like(new, reference)
    labels = new.obs["cell_type"].to_numpy()
    in_umap = KNeighborsClassifier(15).fit(reference.obsm["X_umap"], reference.obs["cell_type"])
    in_pca = KNeighborsClassifier(15).fit(reference.obsm["X_pca"], reference.obs["cell_type"])
    accuracy = (in_umap.predict(new.obsm["X_umap"]) == labels).mean()
    control = (in_pca.predict(new.obsm["X_pca"]) == labels).mean()
    assert accuracy >= control - 0.05
    # cells that ARE reference cells land exactly on them (not on their neighbourhood's mean)
    again = reference[:30].copy()
    del again.obsm["X_umap"]
    sb.tl.embed_like(again, reference)
    np.testing.assert_array_equal(again.obsm["X_umap"], reference.obsm["X_umap"][:30])


def test_generated_cells_are_embedded_and_plotted(pbmc):
    adata = pbmc.copy()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_pca")
    model = sb.BranchedDiffusion(adata, width=32, n_head_blocks=1)
    model.train(max_epochs=2, batch_size=128, accelerator="cpu", enable_progress_bar=False)
    gen = model.generate(n_cells=5, seed=0, progress_bar=False)
    out = sb.tl.embed_like(gen, pbmc, copy=True)
    assert "X_umap" not in gen.obsm and out.obsm["X_umap"].shape == (gen.n_obs, 2)
    assert np.isfinite(out.obsm["X_umap"]).all()
    assert out.uns["scbranch_embed_like"]["X_umap"]["params"]["coordinates_from"] == (
        "obsm['X_pca']"
    )
    sc.pl.umap(out, color="cell_type", show=False)
    plt.close("all")
    out.write_h5ad("embedded.h5ad")  # params are h5ad-safe


def test_cells_in_another_pca_than_the_references_are_refused(pbmc, tmp_path):
    # a model trained on the full data's PCA, cells placed in the UMAP of half the cells with a
    # PCA of their own: the same scores mean other cells there (the loadings of PC1 differ by
    # 0.007 on the top genes; a refit on the same cells by 2e-7)
    adata = pbmc.copy()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_pca")
    model = sb.BranchedDiffusion(adata, width=32, n_head_blocks=1)
    model.train(max_steps=5, batch_size=128, accelerator="cpu", enable_progress_bar=False)
    gen = model.generate(n_cells=5, seed=0, progress_bar=False)
    gen.write_h5ad(tmp_path / "gen.h5ad")
    gen = ad.read_h5ad(tmp_path / "gen.h5ad")  # the record survives a file
    half = pbmc[::2].copy()
    sc.pp.pca(half, n_comps=pbmc.obsm["X_pca"].shape[1])
    with pytest.raises(ValueError, match=r"another PCA.*del adata.obsm\['X_pca'\]"):
        sb.tl.embed_like(gen, half)
    assert "X_umap" not in gen.obsm
    refit = pbmc.copy()
    sc.pp.pca(refit, n_comps=pbmc.obsm["X_pca"].shape[1])
    sb.tl.embed_like(gen, refit)  # the same cells' PCA, refitted: the same space
    placed = gen.obsm["X_umap"].copy()
    sb.tl.embed_like(gen, pbmc)
    np.testing.assert_allclose(gen.obsm["X_umap"], placed, atol=1e-4)
    del gen.obsm["X_pca"]  # the fix the error names: project the genes on half's PCA
    sb.tl.embed_like(gen, half)
    assert gen.uns["scbranch_embed_like"]["X_umap"]["params"]["coordinates_from"] == (
        "genes projected on the PCA"
    )


def test_embed_like_bad_input(pbmc):
    new = pbmc[:10].copy()
    with pytest.raises(KeyError, match="reference.obsm has no 'X_tsne'.*sc.tl.tsne"):
        sb.tl.embed_like(new, pbmc, basis="tsne")
    # writing the placement over the coordinates it was placed from (a generated latent)
    with pytest.raises(ValueError, match="key_added='X_pca' is the representation"):
        sb.tl.embed_like(pbmc[:5].copy(), pbmc, basis="umap", key_added="X_pca")
    with pytest.raises(KeyError, match="use_rep='X_nope' is not in reference.obsm"):
        sb.tl.embed_like(new, pbmc, use_rep="X_nope")
    other = pbmc.copy()
    other.obsm["X_scVI"] = np.zeros((other.n_obs, 4))
    with pytest.raises(KeyError, match="adata lacks.*X_scVI"):
        sb.tl.embed_like(new, other, use_rep="X_scVI")
    genes_only = pbmc[:10, :700].copy()
    del genes_only.obsm["X_pca"]
    with pytest.raises(ValueError, match="lacks 65 of the 765 genes"):
        sb.tl.embed_like(genes_only, pbmc)
    no_pcs = pbmc.copy()
    del no_pcs.varm["PCs"]
    without_pca = pbmc[:10].copy()
    del without_pca.obsm["X_pca"]
    with pytest.raises(ValueError, match="no 'PCs'.*sc.pp.pca"):
        sb.tl.embed_like(without_pca, no_pcs)
    narrow = pbmc[:10].copy()
    narrow.obsm["X_pca"] = narrow.obsm["X_pca"][:, :5]
    with pytest.raises(ValueError, match="5 dimensions.*30"):
        sb.tl.embed_like(narrow, pbmc)
    nan = pbmc[:10].copy()
    nan.obsm["X_pca"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        sb.tl.embed_like(nan, pbmc)
    with pytest.raises(ValueError, match="n_neighbors"):
        sb.tl.embed_like(new, pbmc, n_neighbors=0)
    with pytest.raises(ValueError, match="no cells"):
        sb.tl.embed_like(pbmc[:0].copy(), pbmc)
    with pytest.raises(TypeError, match="reference"):
        sb.tl.embed_like(new, pbmc.obsm["X_pca"])
    with pytest.raises(ValueError, match="same order"):
        sb.tl.embed_like(new[:, ::-1].copy(), pbmc, use_rep="X")
