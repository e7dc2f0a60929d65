"""tl._interpret: transmutation success, identity retention, gene ranking, on known answers.

The trajectory AnnData are built here in the format of ``model.transmute`` (one row per cell
and checkpoint, rows trajectory-major), so the answers are known by construction.
"""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

import scbranch as sb
from scbranch.tl._interpret import (
    RETENTION_COLUMNS,
    RETENTION_OBS_KEY,
    SUCCESS_COLUMNS,
    identity_retention,
    rank_transmutation_genes,
    read_interpretation,
    transmutation_success,
)

# names with "/" and "+" as in real data: they must survive h5ad
CLASSES = ["CD4+/CD25 T Reg", "CD14+ Monocyte", "Dendritic"]
SRC, TGT = CLASSES[0], CLASSES[1]
PHASE_CATEGORIES = ["source", "up", "branch point", "down", "endpoint"]
DIM = 10
N_GENES = 20
T_STAR = 0.6


def _centre(label: str, dim: int = DIM) -> np.ndarray:
    c = np.zeros(dim)
    c[CLASSES.index(label)] = 8.0
    return c


def _loadings(dim: int = DIM, n_genes: int = N_GENES) -> np.ndarray:
    return np.random.default_rng(123).normal(size=(dim, n_genes)) / np.sqrt(dim)


def _decode(z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Genes: a fixed linear map of the latent, plus a little noise."""
    x = z @ _loadings(z.shape[1]) + 3.0
    return (x + rng.normal(0, 0.1, size=x.shape)).astype(np.float32)


def make_reference(n_per_class: int = 60, seed: int = 1, umap_rotation: float = 0.7) -> ad.AnnData:
    """Real cells: Gaussian clusters in X_pca, genes decoded from it, a rotated 2-d 'UMAP'."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(CLASSES, n_per_class)
    z = np.vstack([_centre(c) + rng.normal(size=DIM) for c in labels])
    c, s = np.cos(umap_rotation), np.sin(umap_rotation)
    umap = 3.0 * z[:, :2] @ np.array([[c, -s], [s, c]])
    adata = ad.AnnData(
        X=_decode(z, rng),
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical(labels, categories=CLASSES)},
            index=[f"r{seed}_{i}" for i in range(len(labels))],
        ),
        var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]),
    )
    adata.obsm["X_pca"] = z
    adata.obsm["X_umap"] = umap
    return adata


def _uns(kind: str, obsm_key: str, k: int) -> dict:
    return {
        "params": {"kind": kind, "mode": "ode", "n_checkpoints": k, "seed": 0},
        "model": {
            "labels_key": "cell_type",
            "obsm_key": obsm_key,
            "space": f"obsm[{obsm_key!r}]" if obsm_key else "genes",
        },
        "hierarchy": {"classes": np.asarray(CLASSES, dtype=object)},
    }


def make_transmuted(
    n_cells: int = 40,
    k: int = 4,
    *,
    kind: str = "keep",
    source: str = SRC,
    target: str = TGT,
    obsm_key: str = "X_pca",
    genes: bool = True,
    seed: int = 0,
    prefix: str = "cell",
) -> ad.AnnData:
    """Transmutation trajectories in the contract's format, with a known answer.

    Sources are cells of ``source`` (centre + offset). Endpoints: ``"keep"`` the target centre
    plus the SAME offset, ``"redraw"`` the target centre plus a fresh offset, ``"stay"`` the
    source centre plus the same offset. States in between are linear interpolations through
    a branch point half-way between the centres.
    """
    rng = np.random.default_rng(seed)
    offsets = rng.normal(size=(n_cells, DIM))
    src = _centre(source) + offsets
    end = {
        "keep": _centre(target) + offsets,
        "redraw": _centre(target) + rng.normal(size=(n_cells, DIM)),
        "stay": _centre(source) + offsets,
    }[kind]
    bp = (_centre(source) + _centre(target)) / 2 + 0.5 * offsets
    n_ckpt = 2 * k - 1
    frac_up = np.linspace(0, 1, k)
    states, obs = [], []
    for i in range(n_cells):
        for c in range(n_ckpt):
            if c < k:
                f = frac_up[c]
                z = (1 - f) * src[i] + f * bp[i]
                t = 0.001 + f * (T_STAR - 0.001)
            else:
                f = frac_up[c - k + 1]
                z = (1 - f) * bp[i] + f * end[i]
                t = T_STAR - f * (T_STAR - 0.001)
            phase = (
                "source"
                if c == 0
                else "endpoint"
                if c == n_ckpt - 1
                else "branch point"
                if c == k - 1
                else "up"
                if c < k - 1
                else "down"
            )
            states.append(z)
            obs.append(
                {
                    "trajectory": f"{prefix}{i}",
                    "checkpoint": c,
                    "t": t,
                    "phase": phase,
                    "branch": 1,
                    "source_label": source,
                    "target_label": target,
                    "source_cell": f"{prefix}{i}",
                }
            )
    obs = pd.DataFrame(obs)
    obs.index = [f"{r.trajectory}-{r.checkpoint}" for r in obs.itertuples()]
    obs["trajectory"] = pd.Categorical(obs["trajectory"].astype(str))
    obs["checkpoint"] = obs["checkpoint"].astype(np.int64)
    obs["t"] = obs["t"].astype(np.float64)
    obs["branch"] = obs["branch"].astype(np.int64)
    obs["phase"] = pd.Categorical(obs["phase"], categories=PHASE_CATEGORIES)
    for key in ("source_label", "target_label"):
        obs[key] = pd.Categorical(obs[key], categories=CLASSES)
    z = np.vstack(states)
    if genes:
        adata = ad.AnnData(
            X=_decode(z, rng),
            obs=obs,
            var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]),
        )
    else:
        adata = ad.AnnData(obs=obs)
    if obsm_key:
        adata.obsm[obsm_key] = z
    adata.obsm["scbranch_state"] = (
        z + rng.normal(0, 0.3, size=z.shape) * obs["t"].to_numpy()[:, None]
    )
    adata.uns["scbranch"] = _uns("transmutation", obsm_key, k)
    return adata


def make_generated_trajectories(n_cells: int = 10, label: str = TGT, seed: int = 0) -> ad.AnnData:
    """The variant of ``model.generate(..., trajectory_times=[1, .6, .3, 0])``: no phases."""
    rng = np.random.default_rng(seed)
    times = [1.0, 0.6, 0.3, 0.0]
    final = _centre(label) + rng.normal(size=(n_cells, DIM))
    z = np.vstack([(1 - tt) * final[i] for i in range(n_cells) for tt in times])
    obs = pd.DataFrame(
        {
            "trajectory": pd.Categorical([f"gen{i}" for i in range(n_cells) for _ in times]),
            "checkpoint": np.tile(np.arange(len(times)), n_cells).astype(np.int64),
            "t": np.tile(times, n_cells),
            "branch": np.ones(n_cells * len(times), dtype=np.int64),
            "target_label": pd.Categorical([label] * (n_cells * len(times)), categories=CLASSES),
            "cell_type": pd.Categorical([label] * (n_cells * len(times)), categories=CLASSES),
        }
    )
    obs.index = [f"gen{i}-{c}" for i in range(n_cells) for c in range(len(times))]
    adata = ad.AnnData(
        X=_decode(z, rng), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)])
    )
    adata.obsm["X_pca"] = z
    adata.obsm["scbranch_state"] = z
    adata.uns["scbranch"] = _uns("generation", "X_pca", len(times))
    return adata


def _roundtrip(adata: ad.AnnData, tmp_path) -> ad.AnnData:
    path = tmp_path / "tm.h5ad"
    adata.write_h5ad(path)
    return ad.read_h5ad(path)


@pytest.fixture(scope="module")
def train():
    return make_reference(seed=1)


@pytest.fixture(scope="module")
def heldout():
    return make_reference(n_per_class=30, seed=2)


# ------------------------------------------------------------------ success
def test_success_is_one_when_endpoints_reach_the_target(train, heldout):
    tm = make_transmuted(kind="keep")
    table = transmutation_success(tm, train, heldout=heldout)
    assert list(table.columns) == SUCCESS_COLUMNS
    assert len(table) == 1
    row = table.iloc[0]
    assert (row.source_label, row.target_label) == (SRC, TGT)
    assert row.n_cells == 40
    assert row.success == 1.0 and row.stayed == 0.0
    assert row.control == 1.0 and row.ratio == 1.0
    assert row.n_control == 30  # held-out target cells
    params = tm.uns["scbranch_transmutation_success"]["params"]
    assert params["use_rep"] == "X_pca" and params["control"] == "heldout"


def test_success_is_zero_when_endpoints_stay(train):
    tm = make_transmuted(kind="stay")
    row = transmutation_success(tm, train).iloc[0]
    assert row.success == 0.0 and row.stayed == 1.0
    # out-of-fold control on train: the target's 60 real cells, well separated
    assert row.control == 1.0 and row.n_control == 60 and row.ratio == 0.0
    assert tm.uns["scbranch_transmutation_success"]["params"]["control"] == "out_of_fold"


def test_success_one_row_per_pair_and_logreg(train):
    a = make_transmuted(n_cells=20, kind="keep", source=SRC, target=TGT, prefix="a")
    b = make_transmuted(n_cells=15, kind="stay", source=CLASSES[2], target=TGT, prefix="b")
    tm = ad.concat([a, b], merge="same", uns_merge="first")
    table = transmutation_success(tm, train, classifier="logreg", key_added=None)
    assert "scbranch_transmutation_success" not in tm.uns
    by_source = table.set_index("source_label")
    assert by_source.loc[SRC, "success"] == 1.0 and by_source.loc[SRC, "n_cells"] == 20
    assert by_source.loc[CLASSES[2], "success"] == 0.0
    assert by_source.loc[CLASSES[2], "stayed"] == 1.0


def test_success_control_uses_heldout(train, heldout):
    """Held-out target cells placed in another cluster: the control must see it."""
    moved = heldout.copy()
    is_target = (moved.obs["cell_type"] == TGT).to_numpy()
    moved.obsm["X_pca"][is_target] += _centre(CLASSES[2]) - _centre(TGT)
    row = transmutation_success(make_transmuted(), train, heldout=moved).iloc[0]
    assert row.success == 1.0 and row.control == 0.0 and np.isnan(row.ratio)


def test_success_falls_back_to_common_genes(train):
    """An expression model: no obsm; train has the genes in another order plus extra ones."""
    tm = make_transmuted(kind="keep", obsm_key="")
    genes = list(train.var_names[::-1])
    extra = ad.AnnData(
        X=np.zeros((train.n_obs, 1), dtype=np.float32),
        obs=train.obs[[]],
        var=pd.DataFrame(index=["extra"]),
    )
    shuffled = ad.concat([train[:, genes], extra], axis=1, merge="first")
    shuffled.obs = train.obs.copy()
    table = transmutation_success(tm, shuffled)
    assert table.iloc[0].success == 1.0
    params = tm.uns["scbranch_transmutation_success"]["params"]
    assert params["use_rep"] == "X" and params["n_genes"] == N_GENES
    # the same on genes when asked explicitly although X_pca is there
    tm2 = make_transmuted(kind="stay")
    assert transmutation_success(tm2, train, use_rep="X").iloc[0].success == 0.0


def test_success_on_pbmc_endpoints_equal_to_real_cells_match_the_control():
    """Endpoints that ARE the held-out real target cells: success == control exactly."""
    pbmc = sb.datasets.pbmc68k()
    rng = np.random.default_rng(0)
    held = np.zeros(pbmc.n_obs, dtype=bool)
    held[rng.permutation(pbmc.n_obs)[: pbmc.n_obs // 2]] = True
    train, heldout = pbmc[~held].copy(), pbmc[held].copy()
    target = heldout[heldout.obs["cell_type"] == "Dendritic"]
    source = heldout[heldout.obs["cell_type"] == "CD4+/CD25 T Reg"]
    n = min(target.n_obs, source.n_obs)
    cats = list(pbmc.obs["cell_type"].cat.categories)
    tm = ad.AnnData(
        X=np.vstack([source.X[:n].toarray(), target.X[:n].toarray()]),
        obs=pd.DataFrame(
            {
                "trajectory": pd.Categorical(list(source.obs_names[:n]) * 2),
                "checkpoint": np.repeat([0, 2], n).astype(np.int64),
                "t": np.full(2 * n, 0.001),
                "phase": pd.Categorical(
                    np.repeat(["source", "endpoint"], n), categories=PHASE_CATEGORIES
                ),
                "branch": np.ones(2 * n, dtype=np.int64),
                "source_label": pd.Categorical(["CD4+/CD25 T Reg"] * (2 * n), categories=cats),
                "target_label": pd.Categorical(["Dendritic"] * (2 * n), categories=cats),
            },
            index=[f"{c}-{k}" for k in (0, 2) for c in source.obs_names[:n]],
        ),
        var=pbmc.var[[]],
    )
    tm.obsm["X_pca"] = np.vstack([source.obsm["X_pca"][:n], target.obsm["X_pca"][:n]])
    tm.uns["scbranch"] = {"model": {"labels_key": "cell_type", "obsm_key": "X_pca"}}
    # only the first n target cells are used: hold out exactly those
    keep = ~heldout.obs_names.isin(target.obs_names[n:])
    for use_rep in (None, "X"):
        row = transmutation_success(tm, train, heldout=heldout[keep], use_rep=use_rep).iloc[0]
        assert row.n_cells == n == row.n_control
        assert row.success == row.control and row.ratio == 1.0
        assert row.success > 0.5  # real Dendritic cells, recognised as often as real ones


def test_success_record_survives_h5ad(train, tmp_path):
    tm = make_transmuted()
    table = transmutation_success(tm, train)
    back = _roundtrip(tm, tmp_path)
    pd.testing.assert_frame_equal(
        read_interpretation(back, "scbranch_transmutation_success"), table, check_dtype=False
    )
    assert back.uns["scbranch_transmutation_success"]["params"]["classifier"] == "knn"


def test_success_bad_inputs(train):
    tm = make_transmuted()
    no_end = tm[tm.obs["phase"] != "endpoint"].copy()
    with pytest.raises(ValueError, match="no rows with obs\\['phase'\\] == 'endpoint'"):
        transmutation_success(no_end, train)
    with pytest.raises(ValueError, match="not transmutation trajectories"):
        transmutation_success(make_generated_trajectories(), train)
    with pytest.raises(KeyError, match="labels_key='celltype' is not a column of train.obs"):
        transmutation_success(tm, train, labels_key="celltype")
    with pytest.raises(KeyError, match="use_rep='X_umap' is not in transmuted.obsm"):
        transmutation_success(tm, train, use_rep="X_umap")
    no_target = train[train.obs["cell_type"] != TGT].copy()
    with pytest.raises(
        ValueError, match="Target type\\(s\\) \\['CD14\\+ Monocyte'\\] have no cells"
    ):
        transmutation_success(tm, no_target)
    with pytest.raises(ValueError, match="in heldout.obs"):
        transmutation_success(tm, train, heldout=no_target)
    with pytest.raises(ValueError, match="classifier must be"):
        transmutation_success(tm, train, classifier="forest")
    # neither a shared obsm nor genes
    bare = make_transmuted(genes=False)
    no_pca = train.copy()
    del no_pca.obsm["X_pca"]
    with pytest.raises(ValueError, match="No representation shared"):
        transmutation_success(bare, no_pca)
    assert "scbranch_transmutation_success" not in bare.uns


# --------------------------------------------------------- identity retention
def test_identity_retained_when_offsets_are_kept():
    tm = make_transmuted(n_cells=60, kind="keep")
    table = identity_retention(tm)
    assert list(table.columns) == RETENTION_COLUMNS
    row = table.iloc[0]
    assert row.n_cells == 60
    assert row["median"] == pytest.approx(1.0) and row["mean"] == pytest.approx(1.0)
    assert row.rank_retention == pytest.approx(1.0)
    assert abs(row.control) < 0.1 and row.control_sd > 0
    per_row = tm.obs[RETENTION_OBS_KEY]
    assert per_row.notna().all() and np.allclose(per_row, 1.0)


def test_identity_lost_when_endpoints_are_redrawn():
    tm = make_transmuted(n_cells=60, kind="redraw")
    row = identity_retention(tm, n_shuffles=50).iloc[0]
    assert abs(row["median"]) < 0.2 and abs(row["mean"]) < 0.15
    assert abs(row.control) < 0.1
    assert abs(row.rank_retention) < 0.35
    # same value on every row of a trajectory
    per = tm.obs.groupby("trajectory", observed=True)[RETENTION_OBS_KEY].nunique()
    assert (per == 1).all()


def test_identity_retention_on_genes_and_per_pair():
    a = make_transmuted(n_cells=30, kind="keep", prefix="a")
    b = make_transmuted(n_cells=30, kind="redraw", source=CLASSES[2], prefix="b", seed=5)
    tm = ad.concat([a, b], merge="same", uns_merge="first")
    table = identity_retention(tm, use_rep="X").set_index("source_label")
    # genes are a linear map of the latent plus noise: retention stays high, not exactly 1
    assert 0.8 < table.loc[SRC, "median"] < 1.0
    assert abs(table.loc[CLASSES[2], "median"]) < 0.3
    assert tm.uns["scbranch_identity_retention"]["params"]["use_rep"] == "X"


def test_identity_retention_expression_model_uses_genes():
    tm = make_transmuted(kind="keep", obsm_key="")
    identity_retention(tm)
    assert tm.uns["scbranch_identity_retention"]["params"]["use_rep"] == "X"


def test_identity_retention_survives_h5ad(tmp_path):
    tm = make_transmuted()
    table = identity_retention(tm, n_shuffles=10)
    back = _roundtrip(tm, tmp_path)
    pd.testing.assert_frame_equal(
        read_interpretation(back, "scbranch_identity_retention"), table, check_dtype=False
    )
    np.testing.assert_allclose(back.obs[RETENTION_OBS_KEY], tm.obs[RETENTION_OBS_KEY])
    # another key_added keeps the first run's column: obs and uns under the same key
    first = tm.obs[RETENTION_OBS_KEY].copy()
    identity_retention(tm, n_shuffles=10, use_rep="X", key_added="retention_x")
    assert tm.uns["retention_x"]["params"]["obs_key"] == "retention_x" and "retention_x" in tm.obs
    pd.testing.assert_series_equal(tm.obs[RETENTION_OBS_KEY], first)
    # key_added=None stores nothing: the table only
    untouched = make_transmuted()
    before = (set(untouched.obs.columns), set(untouched.uns))
    alone = identity_retention(untouched, n_shuffles=10, key_added=None)
    pd.testing.assert_frame_equal(alone, table)
    assert (set(untouched.obs.columns), set(untouched.uns)) == before


def test_identity_retention_bad_inputs():
    tm = make_transmuted()
    with pytest.raises(KeyError, match="use_rep='X_scvi' is not in transmuted.obsm"):
        identity_retention(tm, use_rep="X_scvi")
    with pytest.raises(ValueError, match="no rows with obs\\['phase'\\] == 'source'"):
        identity_retention(tm[tm.obs["phase"] != "source"].copy())
    with pytest.raises(ValueError, match="not transmutation trajectories"):
        identity_retention(make_generated_trajectories())
    with pytest.raises(ValueError, match="use_rep='X' needs genes"):
        identity_retention(make_transmuted(genes=False), use_rep="X")
    with pytest.raises(ValueError, match="n_shuffles"):
        identity_retention(tm, n_shuffles=0)


# ------------------------------------------------------------------- genes
def make_planted(n_cells: int = 40, k: int = 5, seed: int = 0) -> ad.AnnData:
    """Genes with known behaviour along the trajectories.

    UP rises by 3 late (only near the endpoint), EARLY falls by 2 on the way up and is there
    by the branch point, LATE_DOWN falls by 1 at the endpoint only, MID rises by 2 along the
    way down and passes half of it at the middle checkpoint of the way down; the rest is noise.
    """
    tm = make_transmuted(n_cells=n_cells, k=k, seed=seed)
    rng = np.random.default_rng(seed + 1)
    c = tm.obs["checkpoint"].to_numpy()
    m = k - 1  # the branch point
    up_frac = np.clip(c / m, 0, 1)
    down_frac = np.clip((c - m) / (k - 1), 0, 1)
    names = ["UP", "EARLY", "LATE_DOWN", "MID"] + [f"noise{i}" for i in range(16)]
    x = rng.normal(2.0, 0.3, size=(tm.n_obs, len(names)))
    # each cell's own baseline for the planted genes, kept along its trajectory
    base = np.repeat(rng.normal(1.0, 0.3, size=(n_cells, 4)), 2 * k - 1, axis=0)
    noise = rng.normal(0, 0.1, size=(tm.n_obs, 4))
    x[:, 0] = base[:, 0] + 3.0 * down_frac**3 + noise[:, 0]
    x[:, 1] = base[:, 1] + 1.0 - 2.0 * up_frac + noise[:, 1]
    x[:, 2] = base[:, 2] + 1.0 - 1.0 * (c == 2 * k - 2) + noise[:, 2]
    # down fractions 0, .25, .5, .75, 1 -> 0, .76, 1.23, 1.64, 2: half (1.0) first at .5
    x[:, 3] = base[:, 3] + 2.0 * down_frac**0.7 + noise[:, 3]
    out = ad.AnnData(
        X=x.astype(np.float32), obs=tm.obs.copy(), var=pd.DataFrame(index=names), uns=tm.uns
    )
    out.obsm["X_pca"] = tm.obsm["X_pca"]
    return out


def test_planted_genes_are_ranked_and_timed():
    tm = make_planted()
    rank_transmutation_genes(tm, method="t-test_paired")
    key = "scbranch_transmutation_genes"
    df = sc.get.rank_genes_groups_df(tm, group=TGT, key=key)
    assert list(df.columns) == ["names", "scores", "logfoldchanges", "pvals", "pvals_adj"]
    assert len(df) == tm.n_vars
    assert df["names"].iloc[0] == "UP" and df["logfoldchanges"].iloc[0] > 0
    assert (np.diff(df["scores"].to_numpy()) <= 0).all()  # sorted, up-regulated first
    assert set(df["names"].iloc[-2:]) == {"EARLY", "LATE_DOWN"}
    assert df.set_index("names").loc["EARLY", "logfoldchanges"] < 0
    assert df["pvals_adj"].iloc[0] < 1e-10 and (df["pvals_adj"] >= df["pvals"] - 1e-15).all()
    # logfoldchanges as scanpy computes them from log1p data
    src, end = tm[tm.obs["phase"] == "source"].X, tm[tm.obs["phase"] == "endpoint"].X
    expected = np.log2((np.expm1(end[:, 0].mean()) + 1e-9) / (np.expm1(src[:, 0].mean()) + 1e-9))
    assert df["logfoldchanges"].iloc[0] == pytest.approx(expected, rel=1e-5)

    record = tm.uns[key]
    assert record["params"]["groupby"] == "scbranch_transmutation_group"
    assert record["params"]["method"] == "t-test_paired"
    names = np.asarray(record["names"][TGT])
    onset_t = pd.Series(np.asarray(record["onset_t"][TGT]), index=names)
    onset_c = pd.Series(np.asarray(record["onset_checkpoint"][TGT]), index=names)
    assert onset_t["EARLY"] == pytest.approx(T_STAR)  # already there at the branch point
    assert onset_c["EARLY"] == 4
    assert onset_t["EARLY"] >= onset_t.max() - 1e-12
    assert onset_t["UP"] < onset_t["EARLY"] and onset_c["UP"] == 8  # only at the endpoint
    assert onset_t["LATE_DOWN"] == pytest.approx(0.001)
    assert onset_c["MID"] == 6  # half-way down: t = T_STAR - (T_STAR - 0.001) / 2
    assert onset_t["MID"] == pytest.approx(T_STAR - (T_STAR - 0.001) / 2)


def test_mean_change_ranks_large_changes_above_tiny_consistent_ones():
    """Decoded genes have no noise: a tiny constant shift must not outrank a marker."""
    tm = make_planted()
    rng = np.random.default_rng(1)
    src = (tm.obs["phase"] == "source").to_numpy()
    end = (tm.obs["phase"] == "endpoint").to_numpy()
    x = tm.X.copy()
    x[:, 4] = 1.0  # noise0 -> TINY: +0.05 in every cell, almost no spread
    x[end, 4] += 0.05 + rng.normal(0, 1e-4, end.sum())
    x[:, 5] = 1.0  # noise1 -> BIG: +4 on average, varying a lot between cells
    x[end, 5] += 4.0 + rng.normal(0, 3.0, end.sum())
    tm.X = x
    tm.var_names = ["UP", "EARLY", "LATE_DOWN", "MID", "TINY", "BIG", *tm.var_names[6:]]
    key = "scbranch_transmutation_genes"
    rank_transmutation_genes(tm)
    by_change = sc.get.rank_genes_groups_df(tm, group=TGT, key=key).set_index("names")
    assert tm.uns[key]["params"]["method"] == "mean_change"
    assert by_change.index[0] == "BIG"
    assert by_change.loc["BIG", "scores"] == pytest.approx((x[end, 5] - x[src, 5]).mean(), 1e-5)
    assert list(by_change.index).index("TINY") > list(by_change.index).index("UP")
    rank_transmutation_genes(tm, method="t-test_paired")
    by_t = sc.get.rank_genes_groups_df(tm, group=TGT, key=key)
    assert by_t["names"].iloc[0] == "TINY"  # why the t statistic is not the default
    with pytest.raises(ValueError, match="method must be one of"):
        rank_transmutation_genes(tm, method="wilcoxon")


def test_ranking_one_group_per_target_and_n_genes():
    a = make_planted(n_cells=20)
    b = make_transmuted(n_cells=20, k=5, target=CLASSES[2], prefix="b")
    b = ad.AnnData(X=a.X.copy(), obs=b.obs, var=a.var.copy(), uns=a.uns)
    tm = ad.concat([a, b], merge="same", uns_merge="first")
    rank_transmutation_genes(tm, n_genes=5, key_added="genes")
    assert tm.uns["genes"]["names"].dtype.names == (TGT, CLASSES[2])
    assert len(tm.uns["genes"]["names"]) == 5
    assert len(tm.uns["genes"]["onset_t"]) == 5
    ax = sc.pl.rank_genes_groups(tm, key="genes", show=False, n_genes=3)
    assert ax is not None
    import matplotlib.pyplot as plt

    plt.close("all")


def test_scanpy_plots_of_the_ranking_compare_endpoints_with_sources(tmp_path):
    # scanpy draws one row per category of params["groupby"]: the rows must be each target's
    # endpoints and the sources (the ranking's reference), not every checkpoint pooled by
    # target, which also failed on training types that are no target (KeyError in scanpy)
    import matplotlib.pyplot as plt

    a = make_planted(n_cells=20)
    b = make_transmuted(n_cells=20, k=5, target=CLASSES[2], prefix="b")
    b = ad.AnnData(X=a.X.copy(), obs=b.obs, var=a.var.copy(), uns=a.uns)
    b.X[b.obs["phase"] == "endpoint", 0] -= 5.0  # UP falls towards the second target
    tm = ad.concat([a, b], merge="same", uns_merge="first")
    key = "scbranch_transmutation_genes"
    rank_transmutation_genes(tm)
    col = tm.obs["scbranch_transmutation_group"]
    assert list(col.cat.categories) == [TGT, CLASSES[2], "source"]
    phase = tm.obs["phase"].astype(str)
    ends = phase == "endpoint"
    np.testing.assert_array_equal(col[ends], tm.obs["target_label"][ends])
    assert (col[phase == "source"] == "source").all()
    assert col[~phase.isin(["source", "endpoint"])].isna().all()
    assert tm.uns[key]["params"]["groupby"] == "scbranch_transmutation_group"
    assert tm.uns[key]["params"]["reference"] == "source"

    dp = sc.pl.rank_genes_groups_dotplot(tm, key=key, n_genes=2, show=False, return_fig=True)
    x = pd.DataFrame(tm.X, columns=tm.var_names)
    for group in (TGT, CLASSES[2], "source"):
        expected = x.loc[(col == group).to_numpy(), "UP"].mean()
        assert dp.dot_color_df.loc[group, "UP"] == pytest.approx(expected, rel=1e-5)
    assert dp.dot_color_df.loc[TGT, "UP"] > dp.dot_color_df.loc["source", "UP"] + 2
    assert dp.dot_color_df.loc[CLASSES[2], "UP"] < dp.dot_color_df.loc["source", "UP"] - 2
    sc.pl.rank_genes_groups_matrixplot(tm, key=key, n_genes=2, show=False, dendrogram=False)
    sc.pl.rank_genes_groups_stacked_violin(tm, key=key, n_genes=2, show=False, dendrogram=False)
    axs = sc.pl.rank_genes_groups_violin(tm, key=key, n_genes=2, show=False)
    assert len(axs) == 2 and axs[-1].get_title() == f"{CLASSES[2]} vs. source"
    grouped = tm[col.notna()].copy()
    sc.pl.rank_genes_groups_heatmap(grouped, key=key, n_genes=2, show=False, dendrogram=False)
    back = _roundtrip(tm, tmp_path)
    sc.pl.rank_genes_groups_dotplot(back, key=key, n_genes=2, show=False, dendrogram=False)
    plt.close("all")


def test_ranking_survives_h5ad_and_scanpy_reads_it(tmp_path):
    tm = make_planted()
    rank_transmutation_genes(tm)
    key = "scbranch_transmutation_genes"
    before = sc.get.rank_genes_groups_df(tm, group=TGT, key=key)
    back = _roundtrip(tm, tmp_path)
    after = sc.get.rank_genes_groups_df(back, group=TGT, key=key)
    pd.testing.assert_frame_equal(before, after, check_dtype=False)
    np.testing.assert_array_equal(
        np.asarray(back.uns[key]["onset_t"][TGT]), np.asarray(tm.uns[key]["onset_t"][TGT])
    )
    assert back.uns[key]["params"]["layer"] is None


def test_ranking_sparse_matches_dense():
    tm = make_planted()
    sparse = tm.copy()
    sparse.X = sp.csr_matrix(sparse.X)
    rank_transmutation_genes(tm)
    rank_transmutation_genes(sparse)
    key = "scbranch_transmutation_genes"
    for field in ("names", "scores", "onset_t"):
        np.testing.assert_array_equal(
            np.asarray(tm.uns[key][field][TGT]), np.asarray(sparse.uns[key][field][TGT])
        )


def test_ranking_bad_inputs():
    with pytest.raises(ValueError, match="no genes"):
        rank_transmutation_genes(make_transmuted(genes=False))
    with pytest.raises(ValueError, match="not transmutation trajectories"):
        rank_transmutation_genes(make_generated_trajectories())
    tm = make_transmuted()
    with pytest.raises(ValueError, match="no rows with obs\\['phase'\\] == 'endpoint'"):
        rank_transmutation_genes(tm[tm.obs["phase"] != "endpoint"].copy())
    with pytest.raises(ValueError, match="n_genes"):
        rank_transmutation_genes(tm, n_genes=0)


def test_nan_or_inf_in_the_states_is_refused(train):
    tm = make_transmuted()
    tm.obsm["X_pca"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        transmutation_success(tm, train)
    with pytest.raises(ValueError, match="NaN or infinite"):
        identity_retention(tm)
    planted = make_planted()
    planted.X[3, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        rank_transmutation_genes(planted)
