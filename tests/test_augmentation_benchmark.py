"""The rare-type augmentation benchmark's protocol (benchmarks/augmentation.py), on known answers.

The split must cut only the rare types, keep the cells it puts aside apart from train and test,
and choose genes on the reduced train cells; the classifier path must score new real cells of a
rare type as help and wrong cells as no help.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
augmentation = pytest.importorskip("augmentation")

SIZES = {"big1": 300, "big2": 300, "rare1": 24, "rare2": 20}


def _counts(seed: int = 0) -> AnnData:
    rng = np.random.default_rng(seed)
    n_genes = 60
    labels = np.repeat(list(SIZES), list(SIZES.values()))
    means = {c: rng.gamma(2.0, 2.0, n_genes) for c in SIZES}
    x = np.stack([rng.poisson(means[c]) for c in labels]).astype(np.float32)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(x))]
    )
    return AnnData(
        X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])
    )


def test_rare_types_are_those_below_five_percent():
    assert augmentation.rare_types(_counts().obs["cell_type"]) == ["rare1", "rare2"]


def test_split_cuts_only_rare_types_and_keeps_parts_apart():
    adata = _counts()
    rare = augmentation.rare_types(adata.obs["cell_type"])
    train, test, pool = augmentation.split(adata, rare, seed=1, n_rare=5, n_hvg=None)
    sizes = train.obs["cell_type"].value_counts()
    assert sizes["rare1"] == 5 and sizes["rare2"] == 5
    assert sizes["big1"] == 210  # 70 % of 300: abundant types are untouched
    names = [set(p.obs_names) for p in (train, test, pool)]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert set(pool.obs["cell_type"]) == set(rare)
    assert sum(len(n) for n in names) == adata.n_obs
    # log-normalised over the chosen genes, counts kept, PCA of the train cells only
    x = train.X.toarray()
    np.testing.assert_allclose(np.expm1(x).sum(1), 1e4, rtol=1e-3)
    assert "X_pca" in train.obsm and "X_pca" not in test.obsm


def test_new_real_cells_help_and_mislabelled_cells_do_not():
    adata = _counts(seed=3)
    rare = augmentation.rare_types(adata.obs["cell_type"])
    gains, harms = [], []
    for seed in range(3):
        train, test, pool = augmentation.split(adata, rare, seed=seed, n_rare=2, n_hvg=None)
        x, y = augmentation._dense(train.X), train.obs["cell_type"].astype(str).to_numpy()
        x_test = augmentation._dense(test.X)
        y_test = test.obs["cell_type"].astype(str).to_numpy()

        def f1(added, x=x, y=y, x_test=x_test, y_test=y_test):
            x_add, y_add = added
            pred = augmentation.classify(np.vstack([x, x_add]), np.concatenate([y, y_add]), x_test)
            return augmentation.scores(y_test, pred, rare)["rare_macro_f1"]

        base = f1((x[:0], y[:0]))
        gains.append(f1(augmentation.unseen_real(pool, rare, 20, seed)) - base)
        harms.append(f1(augmentation.mislabelled(train, rare, 20, seed)) - base)
    # measured: gains 0.46-0.56 per split; wrong cells -0.15 to +0.17, -0.04 on average
    assert np.mean(gains) > 0.3
    assert np.mean(harms) < 0.1 and np.mean(gains) - np.mean(harms) > 0.3


def _reduced(data_seed: int):
    """Rare types, the reduced train cells and the rare cells put aside of one split."""
    adata = _counts(seed=data_seed)
    rare = augmentation.rare_types(adata.obs["cell_type"])
    train, _, pool = augmentation.split(adata, rare, seed=0, n_rare=5, n_hvg=None)
    return rare, train, pool


def test_decoded_unseen_cells_are_the_unseen_cells_through_the_models_space():
    # the ceiling probe: the same cells as unseen_real, in the train genes, decoded by the
    # space (new counts, so not the real profiles), each still closest to its own type's mean
    rare, train, pool = _reduced(data_seed=4)
    x_real, y_real = augmentation.unseen_real(pool, rare, 10, seed=0)
    x_dec, y_dec = augmentation.decoded_unseen(train, pool, rare, 10, seed=0)
    assert x_dec.shape == (len(y_real), train.n_vars)
    np.testing.assert_array_equal(y_dec, y_real)
    assert not np.allclose(x_dec, x_real)
    labels = pool.obs["cell_type"].astype(str).to_numpy()
    means = {c: augmentation._dense(pool.X[labels == c]).mean(0) for c in rare}
    for c in rare:
        cells = x_dec[y_dec == c].mean(0)
        nearest = min(rare, key=lambda k: np.linalg.norm(cells - means[k]))
        assert nearest == c


def test_denoised_ceiling_and_baselines_drop_only_the_noise_model():
    # decoded to the mean profile, each cell lies nearer its real profile than the same
    # scores decoded with the counts' noise
    rare, train, pool = _reduced(data_seed=5)
    x_real, _ = augmentation.unseen_real(pool, rare, 10, seed=0)
    x_nb, _ = augmentation.decoded_unseen(train, pool, rare, 10, seed=0)
    x_mean, _ = augmentation.decoded_unseen(train, pool, rare, 10, seed=0, noise=False)
    assert (
        np.linalg.norm(x_mean - x_real, axis=1).mean()
        < np.linalg.norm(x_nb - x_real, axis=1).mean()
    )
    # a baseline's denoised row is the same fitted baseline without its noise model; the
    # noisy row it was made from is left as it was
    quality = pytest.importorskip("quality")
    import scbranch as sb

    setup = quality.default_setup(train)
    gauss = quality.SpaceDecodedGaussian(setup, sb.BranchedDiffusion(setup))
    quiet = augmentation.denoised(gauss)
    assert gauss.noise == "auto" and quiet.noise is False and quiet.gauss is gauss.gauss
    n_cells = {c: 50 for c in rare}
    noisy = gauss.generate(n_cells, seed=1)
    mean = quiet.generate(n_cells, seed=1)  # the same latents, decoded without the draw
    assert mean.shape == noisy.shape
    # the counts' noise spreads the genes: without it the cells spread less (measured: the
    # summed variance 0.65 of the noisy cells')
    assert mean.X.var(0).sum() < 0.8 * noisy.X.var(0).sum()


def test_against_baselines_pairs_each_generator_with_each_baseline_by_split():
    rows = pd.DataFrame(
        [
            {"split": s, "method": m, "rare_macro_f1": f}
            for s, fs in enumerate([(0.5, 0.6, 0.4), (0.7, 0.6, 0.6), (0.3, 0.5, 0.4)])
            for m, f in zip(
                ["real only", "model", "per-class Gaussian" + augmentation.DENOISED],
                fs,
                strict=True,
            )
        ]
    )
    table = augmentation.against_baselines(rows)
    assert list(table.index) == ["model"]  # real only is no generator
    # differences 0.2, 0.0, 0.1: mean 0.1, sd 0.1, one split level
    assert (
        table.loc["model", "minus per-class Gaussian, denoised"] == "+0.100 ± 0.100 (2 up, 0 down)"
    )
    assert augmentation.against_baselines(rows[rows["method"] != "model"]) is None


def test_against_tree_pairs_each_row_with_its_latent_tree_and_counts_differing_trees():
    # split 0: the same tree, the same F1; splits 1 and 2: other trees, +0.2 and -0.1
    rows = pd.DataFrame(
        [
            {"split": s, "method": m, "rare_macro_f1": f, "tree": t}
            for s, (f_new, f_old, t_old) in enumerate(
                [(0.5, 0.5, "(A,B);"), (0.7, 0.5, "((A,B),C);"), (0.3, 0.4, "((A,C),B);")]
            )
            for m, f, t in [
                ("real only", 0.2, ""),
                (
                    "conditioned:scvi",
                    f_new,
                    "(A,B);" if s == 0 else "((A,B),C);" if s == 2 else "(A,(B,C));",
                ),
                ("conditioned:scvi" + augmentation.TREE_VARIANT, f_old, t_old),
            ]
        ]
    )
    table = augmentation.against_tree(rows)
    assert list(table.index) == ["conditioned:scvi"]
    row = table.loc["conditioned:scvi"]
    # differences 0.0, +0.2, -0.1: mean 0.033, sd 0.153
    assert row["minus the same row with the latent's tree"] == "+0.033 ± 0.153 (1 up, 1 down)"
    assert row["splits whose trees differ"] == "2 / 3"
    assert row["mean difference where they differ"] == "+0.050"
    assert augmentation.against_tree(rows[~rows["method"].str.contains("latenttree")]) is None
    # a second pair (the same models without their noise model) is a second row of one table
    denoised = rows[rows["method"].str.startswith("conditioned")].assign(
        method=lambda r: r["method"] + ":denoised"  # conditioned:scvi:latenttree:denoised
    )
    both = augmentation.against_tree(pd.concat([rows, denoised]))
    assert sorted(both.index) == ["conditioned:scvi", "conditioned:scvi:denoised"]
    assert both.notna().all().all() and both.shape[1] == table.shape[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--splits", "1"], "--splits must be at least 2"), (["--first-split", "-1"], "at least 0")],
)
def test_split_options_are_checked_before_any_work(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        augmentation.main([*argv, "--out", str(tmp_path / "out")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was written
