"""The variant rows of sharing.py and spaces_quality.py (quality.py ``model_options``, variants.py).

``unshared`` must give every type its own branch function wherever the types differ (below
t = 0.90); a misspelt variant must not silently
train the default model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
quality = pytest.importorskip("quality")


def test_unshared_tree_gives_every_type_its_own_function_below_the_threshold():
    classes = ["A", "B", "C", "D"]
    tree = quality.unshared_tree(classes)
    for c in range(len(classes)):
        for t in (0.0, 0.5, 0.89):
            branch = tree.branches[int(tree.lookup(np.array([c]), t)[0])]
            assert branch.classes == (c,)
    # above the last join all types share one function (the root)
    root = tree.branches[int(tree.lookup(np.array([0]), 0.99)[0])]
    assert set(root.classes) == set(range(len(classes)))
    assert min(b.t_start for b in tree.branches if b.children) == quality.UNSHARED_FROM


def test_model_options_reads_every_variant_and_refuses_unknown_ones():
    assert quality.model_options("conditioned") == {"architecture": "conditioned"}
    assert quality.model_options("branched:per_branch")["gaussian_skip"] == "per_branch"
    assert quality.model_options("branched:late")["discovery_kwargs"] == {"epsilon": 0.0}
    both = quality.model_options("conditioned:late:expected")["discovery_kwargs"]
    assert both == {"epsilon": 0.0, "curves": "expected"}
    options = quality.model_options("branched:unshared", ["A", "B"])
    assert options["hierarchy"].n_classes == 2
    with pytest.raises(ValueError, match="Unknown variant"):
        quality.model_options("branched:unshraed")
    assert quality.model_options("branched:scvi")["space"] == "scvi"
    assert quality.model_options("branched:width512")["width"] == 512
    with pytest.raises(ValueError, match="Unknown variant"):
        quality.model_options("branched:widthX")
    assert quality.model_options("conditioned:pcs20")["n_pcs"] == 20
    assert quality.model_options("conditioned:logsnr")["t_sampling"] == "logsnr"
    assert quality.model_options("conditioned:white") == {
        "architecture": "conditioned",
        "precondition": True,
    }
    with pytest.raises(ValueError, match="Unknown variant"):
        quality.model_options("conditioned:pcs")
    assert quality.model_options("conditioned:exprtree")["expression_tree"] is True
    assert quality.model_options("conditioned:scvi:latenttree")["latent_tree"] is True
    # the latent's own tree is the default of every other space: refused before any training
    cells = ad.AnnData(
        np.zeros((4, 2), np.float32), obs=pd.DataFrame({"cell_type": pd.Categorical(list("aabb"))})
    )
    with pytest.raises(ValueError, match="latenttree applies to scvi rows only"):
        quality.train_model(cells, quality.SETTINGS["fast"], 0, "conditioned:latenttree")
    assert quality.model_options("conditioned:scvi:scviepochs50")["scvi_epochs"] == 50
    with pytest.raises(ValueError, match="scviepochs applies to scvi rows only"):
        quality.train_model(cells, quality.SETTINGS["fast"], 0, "conditioned:scviepochs50")
    with pytest.raises(ValueError, match="shrunk applies to scvi rows only"):
        quality.train_model(cells, quality.SETTINGS["fast"], 0, "conditioned:shrunk")
    with pytest.raises(ValueError, match="shrunk rows take the default tree"):
        row = "conditioned:scvi:latenttree:shrunk"
        quality.train_model(cells, quality.SETTINGS["fast"], 0, row)
    assert quality.model_options("branched:expression:per_branch") == {
        "architecture": "branched",
        "space": "expression",
        "gaussian_skip": "per_branch",
    }


def test_sampler_variants_set_the_solver_and_steps_and_leave_the_model_alone():
    assert quality.generate_options("branched:sde") == {"solver": "em"}
    assert quality.generate_options("branched:sde100") == {"solver": "em", "n_steps": 100}
    assert quality.generate_options("flat:ode50") == {"solver": "heun", "n_steps": 50}
    assert quality.generate_options("conditioned:ei50") == {"solver": "ei", "n_steps": 50}
    assert quality.model_spec("conditioned:scvi:ei50") == "conditioned:scvi"
    assert quality.model_spec("branched:per_branch:sde100") == "branched:per_branch"
    assert quality.model_spec("branched:width512") == "branched:width512"
    denoised = {"residual_noise": False, "counts": False}
    assert quality.generate_options("branched:denoised") == denoised
    assert quality.model_spec("branched:denoised") == "branched"
    assert quality.generate_options("conditioned:calibrated") == {"calibrate_spread": True}
    assert quality.model_spec("conditioned:calibrated:ei50") == "conditioned"


def test_training_variants_set_train_options_and_leave_the_model_alone():
    spec = "flat:per_branch:ema0:balance1:batch256:sde"
    assert quality.train_options(spec) == {
        "ema_decay": 0.0,
        "class_balance": 1.0,
        "batch_size": 256,
    }
    assert quality.train_options("branched:balance0.25")["class_balance"] == 0.25
    assert quality.model_options(spec) == {"architecture": "flat", "gaussian_skip": "per_branch"}
    assert quality.train_options("branched:per_branch") == {}
    with pytest.raises(ValueError, match="Unknown variant"):
        quality.model_options("branched:batch")  # no number: not a training variant
    # budget<k>: k x train()'s default epochs (351 cells at batch 64: 167, the 1,000-step
    # floor; 1,318 cells: 100), epochs<n>: exactly n, else cfg's steps
    cfg = {"batch_size": 64, "steps": None}
    assert quality.train_kwargs("conditioned:budget2", 351, cfg)["max_epochs"] == 334
    assert quality.train_kwargs("conditioned:budget0.5", 1318, cfg)["max_epochs"] == 50
    assert quality.train_kwargs("conditioned:epochs100", 351, cfg)["max_epochs"] == 100
    assert quality.model_options("conditioned:epochs100") == {"architecture": "conditioned"}
    assert "max_epochs" not in quality.train_kwargs("conditioned", 351, cfg)
    assert quality.train_kwargs("conditioned", 351, {**cfg, "steps": 600})["max_epochs"] == 100
    # a smoke run's budget (20 steps) scales too: budget_real --fast trained 2x the default
    # budget (334 epochs here) and ran past the smoke runner's 15 minutes
    fast = {**cfg, "steps": 20}
    assert quality.train_kwargs("conditioned:budget2", 351, fast)["max_epochs"] == 7  # 40 steps
    assert quality.train_kwargs("conditioned:budget0.5", 351, fast)["max_epochs"] == 2
    assert quality.model_options("conditioned:budget2") == {"architecture": "conditioned"}


def test_reused_rows_take_the_default_and_the_probe_and_refuse_a_run_without_them(tmp_path):
    import pandas as pd

    variants = pytest.importorskip("variants")
    default = variants.DEFAULT  # the package's default model, the row every variant is read against
    methods = [default, f"{default}:unshared", variants.UNSEEN]
    pd.DataFrame({"method": methods, "generated": [0.6, 0.7, 0.5]}).to_csv(
        tmp_path / "rows_pbmc68k.csv", index=False
    )
    pd.DataFrame(
        {"method": methods[:2], "fit_s": [1.0, 2.0], "network_calls": [25, 25], "solver": "em"}
    ).to_csv(tmp_path / "timing_pbmc68k.csv", index=False)
    rows, timing = variants.reused_rows(tmp_path, "pbmc68k", [default])
    assert sorted(rows["method"]) == sorted([variants.DEFAULT, variants.UNSEEN])
    assert list(timing["method"]) == [variants.DEFAULT]
    rows, timing = variants.reused_rows(tmp_path, "pbmc68k", [f"{default}:unshared"])
    assert len(rows) == 3 and len(timing) == 2  # asked for, with the default and the probe
    with pytest.raises(FileNotFoundError):
        variants.reused_rows(tmp_path, "pbmc3k", [default])
    pd.DataFrame({"method": ["flat"], "generated": [0.6]}).to_csv(
        tmp_path / "rows_pbmc3k.csv", index=False
    )
    pd.DataFrame({"method": ["flat"], "fit_s": [1.0], "network_calls": [51]}).to_csv(
        tmp_path / "timing_pbmc3k.csv", index=False
    )
    with pytest.raises(ValueError, match="no rows of"):
        variants.reused_rows(tmp_path, "pbmc3k", [default])


def test_rows_generated_with_another_solver_than_their_name_means_are_not_reused(tmp_path):
    import pandas as pd

    variants = pytest.importorskip("variants")
    methods = ["branched", "branched:ode", "branched:sde", "flat", variants.UNSEEN]
    pd.DataFrame({"method": methods, "generated": 0.6}).to_csv(
        tmp_path / "rows_pbmc3k.csv", index=False
    )
    # a run from before the timing named the solver: every model row used the ODE then
    calls = [51, 51, 25, 51, 0]
    pd.DataFrame({"method": methods, "fit_s": 1.0, "network_calls": calls}).to_csv(
        tmp_path / "timing_pbmc3k.csv", index=False
    )
    rows, _ = variants.reused_rows(tmp_path, "pbmc3k", methods)
    # the default model and flat now sample with the SDE; ':sde' rows were recorded as ODE
    assert sorted(rows["method"]) == sorted(["branched:ode", variants.UNSEEN])
    # recorded solvers are believed
    solvers = ["em", "heun", "em", "em", ""]
    pd.DataFrame(
        {"method": methods, "fit_s": 1.0, "network_calls": calls, "solver": solvers}
    ).to_csv(tmp_path / "timing_pbmc3k.csv", index=False)
    rows, _ = variants.reused_rows(tmp_path, "pbmc3k", methods)
    assert sorted(rows["method"]) == sorted(methods)


def test_gene_space_gaussian_recovers_a_known_gaussian_and_never_goes_negative():
    import anndata as ad
    import pandas as pd

    spaces_quality = pytest.importorskip("spaces_quality")
    rng = np.random.default_rng(0)
    n, genes = 4000, 6
    basis = np.linalg.qr(rng.normal(size=(genes, genes)))[0][:, :2]  # two true components
    means = {"a": np.full(genes, 5.0), "b": np.linspace(4.0, 6.0, genes)}
    blocks = [
        m + rng.normal(size=(n, 2)) * [2.0, 1.0] @ basis.T + rng.normal(size=(n, genes)) * 0.1
        for m in means.values()
    ]
    cells = ad.AnnData(np.vstack(blocks))
    cells.obs[spaces_quality.LABELS] = pd.Categorical(np.repeat(list(means), n))
    gen = spaces_quality.GeneSpaceGaussian(cells, rank=2).generate(n, seed=1)
    assert gen.n_obs == 2 * n and (gen.X >= 0).all()
    for label, mean in means.items():
        drawn = gen.X[(gen.obs[spaces_quality.LABELS] == label).to_numpy()]
        np.testing.assert_allclose(drawn.mean(0), mean, atol=0.1)
        true_cov = basis @ np.diag([4.0, 1.0]) @ basis.T + 0.01 * np.eye(genes)
        np.testing.assert_allclose(np.cov(drawn.T), true_cov, atol=0.25)


def test_scvi_probe_decodes_each_unseen_cells_own_latent_not_its_labels_type():
    # two types with disjoint marker genes; two unseen cells of type b are labelled a: the
    # probe (the unseen cells through scVI) must give them b's markers, as a generator of
    # type a would not
    spaces_quality = pytest.importorskip("spaces_quality")
    rng = np.random.default_rng(0)

    def cells(kinds, labels):
        return _two_type_cells(rng, kinds, labels, spaces_quality.LABELS)

    kinds = list("a" * 40 + "b" * 40)
    train = cells(kinds, kinds)
    unseen = cells(list("aaaabb"), list("aaaaab"))  # the 5th cell is a b labelled a
    probe = spaces_quality.ScviDecodedProbe(
        train, unseen, {"scvi_epochs": 50, "accelerator": "cpu"}
    )
    gen = probe.generate(10, seed=0)
    labels = gen.obs[spaces_quality.LABELS].astype(str).to_numpy()
    assert sorted(labels) == sorted("aaaaab") and list(gen.var_names) == list(train.var_names)
    x = gen.X.toarray()  # sparse, as the scVI space's generated cells
    b_markers = x[:, 10:].mean(1) - x[:, :10].mean(1)
    # within type a: four cells with a's markers, one with b's (its own latent, not a's)
    a_rows = np.sort(b_markers[labels == "a"])
    assert (a_rows[:4] < 0).all() and a_rows[4] > 0
    assert (b_markers[labels == "b"] > 0).all()


def _two_type_cells(rng, kinds, labels, labels_key):
    """Counts of two types with disjoint marker genes (a: genes 0-9, b: 10-19)."""
    import scipy.sparse as sp

    rate = {
        "a": np.r_[np.full(10, 20.0), np.full(10, 0.2)],
        "b": np.r_[np.full(10, 0.2), np.full(10, 20.0)],
    }
    counts = rng.poisson([rate[k] for k in kinds]).astype(np.float32)
    out = ad.AnnData(
        np.log1p(counts / counts.sum(1, keepdims=True) * 1e4),
        obs=pd.DataFrame({labels_key: pd.Categorical(labels)}),
        var=pd.DataFrame(index=[f"g{i}" for i in range(20)]),
    )
    out.layers["counts"] = sp.csr_matrix(counts)
    out.obs_names = [f"c{i}" for i in range(len(kinds))]
    return out


def test_scvi_train_probe_decodes_the_cells_scvi_trained_on_each_its_own_latent():
    # eight b cells labelled a among the train cells: the train-cells probe must return every
    # cell scVI trained on (none of its validation cells) with its own markers, so exactly the
    # mislabelled ones outside the validation split come out as a's with b's markers
    spaces_quality = pytest.importorskip("spaces_quality")
    rng = np.random.default_rng(1)
    kinds = list("a" * 40 + "b" * 48)
    labels = list("a" * 40 + "a" * 8 + "b" * 40)
    train = _two_type_cells(rng, kinds, labels, spaces_quality.LABELS)
    cfg = {"scvi_epochs": 50, "accelerator": "cpu"}
    probe = spaces_quality.ScviDecodedProbe(train, train[:4], cfg, source="train")
    gen = probe.generate(1000, seed=0)
    model, _ = probe._fit(0)
    validation = quality.validation_mask(model.scvi_model, train.n_obs)
    assert 0 < validation.sum() < 12 and gen.n_obs == (~validation).sum()  # 10 %: 8 cells
    out_labels = gen.obs[spaces_quality.LABELS].astype(str).to_numpy()
    x = gen.X.toarray()
    b_markers = x[:, 10:].mean(1) - x[:, :10].mean(1)
    mislabelled_in_sample = int((~validation[40:48]).sum())
    assert 0 < mislabelled_in_sample
    assert int(((out_labels == "a") & (b_markers > 0)).sum()) == mislabelled_in_sample
    assert (b_markers[out_labels == "b"] > 0).all()


def test_shrunk_scvi_model_learns_the_shrunk_latents_the_package_would_refuse():
    import scbranch as sb

    rng = np.random.default_rng(2)
    kinds = list("a" * 40 + "b" * 40)
    train = _two_type_cells(rng, kinds, kinds, quality.LABELS)
    vae = sb.model.fit_scvi(train, max_epochs=50, seed=0, accelerator="cpu")
    cells = train.copy()
    model = quality.model_on_shrunk_latent(vae, cells, {"width": 16})
    z = np.asarray(cells.obsm["X_scVI"])
    validation = quality.validation_mask(vae, cells.n_obs)
    expected = quality.shrink_to_validation(z, np.array(kinds), validation)
    learned = np.asarray(model.adata.obsm[model.space.obsm_key])
    np.testing.assert_allclose(learned, expected, rtol=1e-5, atol=1e-6)
    in_sample = quality.pooled_within_variance(z[~validation], np.array(kinds)[~validation])
    shrunk = quality.pooled_within_variance(learned[~validation], np.array(kinds)[~validation])
    assert (shrunk <= in_sample * (1 + 1e-6)).all() and (shrunk < in_sample).any()
    assert model.scvi_model is vae and model.tree.classes == ["a", "b"]
    with pytest.raises(ValueError, match="not the scVI model's latent mean"):
        sb.BranchedDiffusion(cells, scvi_model=vae)  # the check the experiment switches off


def test_sampler_variants_change_the_generate_options_not_the_model():
    assert quality.model_spec("branched:sde") == "branched"
    assert quality.model_spec("flat:unshared:ode") == "flat:unshared"
    assert quality.generate_options("branched:sde") == {"solver": "em"}
    assert quality.generate_options("branched:ode") == {"solver": "heun"}
    assert quality.generate_options("branched:unshared") == {}
    assert quality.model_options("branched:sde") == quality.model_options("branched")


def test_anchored_rows_are_sampler_variants_of_the_default_model():
    assert quality.model_spec("branched:anchored20") == "branched"
    assert quality.generate_options("branched:anchored20") == {"anchor_time": 0.2}
    assert quality.generate_options("branched:anchored") == {"anchor_time": 0.25}
    options = quality.generate_options("branched:anchored50:denoised")
    assert options == {"anchor_time": 0.5, "residual_noise": False, "counts": False}
    assert quality.model_options("branched:anchored30") == {"architecture": "branched"}


def test_within_type_scale_gives_every_component_unit_within_type_variance():
    rng = np.random.default_rng(0)
    labels = np.repeat(["A", "B", "C"], [50, 80, 30])
    means = {"A": 0.0, "B": 5.0, "C": -3.0}
    sd = np.array([4.0, 1.0, 0.1])
    z = np.array([means[c] for c in labels])[:, None] + sd * rng.normal(size=(len(labels), 3))
    scaled = z * quality.within_type_scale(z, labels)
    pooled = sum(((scaled[labels == c] - scaled[labels == c].mean(0)) ** 2).sum(0) for c in "ABC")
    np.testing.assert_allclose(pooled / (len(labels) - 3), 1.0)
    # the types' separation is kept (scaling, not whitening across types)
    assert abs(scaled[labels == "B", 2].mean() - scaled[labels == "A", 2].mean()) > 10


def test_scviepochs_rows_train_scvi_for_their_own_epochs(monkeypatch):
    import scbranch as sb

    class Asked(Exception):
        pass

    def fit_scvi(adata, **kwargs):
        raise Asked(kwargs["max_epochs"])

    monkeypatch.setattr(sb.model, "fit_scvi", fit_scvi)
    cells = ad.AnnData(
        np.ones((4, 2), np.float32), obs=pd.DataFrame({"cell_type": pd.Categorical(list("aabb"))})
    )
    cfg = {**quality.SETTINGS["fast"], "scvi_epochs": 7}
    for row, epochs in (("conditioned:scvi", 7), ("conditioned:scvi:scviepochs50", 50)):
        with pytest.raises(Asked) as asked:
            quality.train_model(cells, cfg, 0, row)
        assert asked.value.args == (epochs,)
