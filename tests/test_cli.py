"""The ``scbranch`` command line: fit -> generate, one-line errors, help, demo wiring."""

import os
import subprocess
import sys
import types
from pathlib import Path

import anndata as ad
import pytest
import scvi
import torch
from _cli import error_line

import scbranch
from scbranch.cli import main

CLASSES = ["c0", "c1", "c2", "c3"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(scvi.settings, "logging_dir", tmp_path / "scvi_log")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny h5ad and a model fitted on it by ``scbranch fit`` (trained once per module)."""
    root = tmp_path_factory.mktemp("cli")
    old_cwd, old_logdir = os.getcwd(), scvi.settings.logging_dir
    os.chdir(root)
    scvi.settings.logging_dir = root / "scvi_log"
    try:
        adata = scbranch.datasets.simulate_tree(depth=2, n_per_class=40, dim=8, seed=0).to_anndata()
        data = root / "cells.h5ad"
        adata.write_h5ad(data)
        model_dir = root / "model"
        rc = main(
            [
                "fit",
                str(data),
                "--labels",
                "cell_type",
                "--rep",
                "X_latent",
                "--out",
                str(model_dir),
                "--max-epochs",
                "2",
                "--width",
                "32",
                "--accelerator",
                "cpu",
                "--seed",
                "0",
            ]
        )
    finally:
        os.chdir(old_cwd)
        scvi.settings.logging_dir = old_logdir
    return {"rc": rc, "data": data, "model_dir": model_dir}


def _fake_module(run_demo):
    module = types.ModuleType("scbranch._demo")
    module.run_demo = run_demo
    return module


def test_fit_saves_model_and_prints_tree(fitted):
    assert fitted["rc"] == 0
    assert (fitted["model_dir"] / "model.safetensors").is_file()
    # the input file is not modified
    assert "_scvi_manager_uuid" not in ad.read_h5ad(fitted["data"]).uns


def test_fit_output_names_tree_and_dir(tmp_path, capsys):
    adata = scbranch.datasets.simulate_tree(depth=1, n_per_class=20, dim=4, seed=1).to_anndata()
    adata.write_h5ad(tmp_path / "d.h5ad")
    rc = main(
        [
            "fit",
            "d.h5ad",
            "--labels",
            "cell_type",
            "--rep",
            "X_latent",
            "--out",
            "m",
            "--max-epochs",
            "1",
            "--width",
            "16",
            "--accelerator",
            "cpu",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "c0" in out and "c1" in out and ";" in out  # Newick of the tree
    assert "Saved model to m" in out


@pytest.mark.parametrize(
    ("option", "architecture", "objective"),
    [
        ([], "conditioned", "eps"),
        (["--architecture", "branched"], "branched", "eps"),
        (["--objective", "flow"], "conditioned", "flow"),
    ],
    ids=["default", "branched", "flow"],
)
def test_fit_architecture_and_objective(tmp_path, option, architecture, objective):
    adata = scbranch.datasets.simulate_tree(depth=1, n_per_class=20, dim=4, seed=1).to_anndata()
    adata.write_h5ad(tmp_path / "d.h5ad")
    args = ["fit", "d.h5ad", "--labels", "cell_type", "--rep", "X_latent", "--out", "m"]
    rc = main([*args, "--max-epochs", "1", *option, "--quiet"])
    assert rc == 0
    loaded = scbranch.BranchedDiffusion.load(tmp_path / "m")
    assert loaded.module.architecture == architecture
    assert loaded.module.objective == objective
    assert loaded.module.t_sampling == ("interpolant" if objective == "flow" else "uniform")


def test_fit_with_a_validation_share_reports_and_keeps_the_held_out_error(tmp_path, capsys):
    adata = scbranch.datasets.simulate_tree(depth=1, n_per_class=40, dim=4, seed=1).to_anndata()
    adata.write_h5ad(tmp_path / "d.h5ad")
    args = ["fit", "d.h5ad", "--labels", "cell_type", "--rep", "X_latent", "--out", "m"]
    assert main([*args, "--max-epochs", "3", "--validation-size", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "Validation loss (held-out cells' denoising error): first" in out
    assert "last" in out and "after epoch 3" in out
    loaded = scbranch.BranchedDiffusion.load(tmp_path / "m")
    assert len(loaded.history["validation_loss"]) == 3
    # early stopping needs held-out cells: refused before any data is read
    rc = main([*args, "--overwrite", "--early-stopping"])
    assert rc == 2
    assert "--early-stopping watches the error on held-out cells: add --validation-size" in (
        error_line(capsys)
    )
    with pytest.raises(SystemExit):
        main([*args, "--overwrite", "--validation-size", "1.5"])
    assert "expected a fraction in (0, 1), got '1.5'" in capsys.readouterr().err


@pytest.mark.parametrize("given", [None, 32])
def test_fit_trains_with_the_models_batch_size_unless_told(tmp_path, monkeypatch, given):
    """The command line trains as model.train() does (batch 64: larger batches under-disperse
    the cells at the same steps), not with a batch size of its own."""
    import inspect

    adata = scbranch.datasets.simulate_tree(depth=1, n_per_class=20, dim=4, seed=1).to_anndata()
    adata.write_h5ad(tmp_path / "d.h5ad")
    seen = {}
    original = scbranch.BranchedDiffusion.train
    default = inspect.signature(original).parameters["batch_size"].default

    def spy(self, *args, **kwargs):
        seen["batch_size"] = kwargs.get("batch_size", default)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(scbranch.BranchedDiffusion, "train", spy)
    args = ["fit", "d.h5ad", "--labels", "cell_type", "--rep", "X_latent", "--out", "m"]
    told = [] if given is None else ["--batch-size", str(given)]
    assert main([*args, "--max-epochs", "1", "--quiet", *told]) == 0
    assert seen["batch_size"] == (64 if given is None else given)


def test_generate_round_trip(fitted, tmp_path, capsys):
    out = tmp_path / "gen.h5ad"
    rc = main(
        ["generate", str(fitted["model_dir"]), "--n-cells", "5", "--out", str(out), "--seed", "0"]
    )
    assert rc == 0
    gen = ad.read_h5ad(out)
    assert gen.n_obs == 20
    assert list(gen.obs["cell_type"].cat.categories) == CLASSES
    assert gen.obs["cell_type"].value_counts().to_dict() == dict.fromkeys(CLASSES, 5)
    assert gen.obsm["X_latent"].shape == (20, 8)
    assert gen.uns["scbranch"]["params"]["seed"] == 0
    assert not gen.uns["scbranch"]["params"]["calibrate_spread"]  # the default
    assert str(out) in capsys.readouterr().out

    # Same seed, same cells; a second write needs --overwrite.
    rc = main(
        ["generate", str(fitted["model_dir"]), "--n-cells", "5", "--out", str(out), "--seed", "0"]
    )
    assert rc == 2
    line = error_line(capsys)
    assert "--overwrite" in line and str(out) in line
    before = gen.obsm["X_latent"].copy()
    rc = main(
        [
            "generate",
            str(fitted["model_dir"]),
            "--n-cells",
            "5",
            "--out",
            str(out),
            "--seed",
            "0",
            "--overwrite",
            "-q",
        ]
    )
    assert rc == 0
    assert (ad.read_h5ad(out).obsm["X_latent"] == before).all()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temporary file left


def test_generate_selected_labels_and_options(fitted, tmp_path):
    out = tmp_path / "sub" / "two.h5ad"
    rc = main(
        [
            "generate",
            str(fitted["model_dir"]),
            "--n-cells",
            "3",
            "--labels",
            "c1, c3",
            "--label",
            "c0",
            "--solver",
            "dpm2m",
            "--n-steps",
            "10",
            "--no-share",
            "--calibrate-spread",
            "--out",
            str(out),
            "-q",
        ]
    )
    assert rc == 0
    gen = ad.read_h5ad(out)
    assert gen.obs["cell_type"].value_counts().to_dict() == {"c0": 3, "c1": 3, "c2": 0, "c3": 3}
    params = gen.uns["scbranch"]["params"]
    assert params["solver"] == "dpm2m" and params["n_steps"] == 10 and not params["share"]
    assert params["calibrate_spread"]
    # the solver aliases generate(solver=) takes, on the command line too
    alias = tmp_path / "alias.h5ad"
    argv = ["generate", str(fitted["model_dir"]), "--n-cells", "2", "--solver", "ode"]
    assert main([*argv, "--out", str(alias), "-q"]) == 0
    assert ad.read_h5ad(alias).uns["scbranch"]["params"]["solver"] == "heun"


def test_generate_unknown_label(fitted, tmp_path, capsys):
    out = tmp_path / "x.h5ad"
    rc = main(
        [
            "generate",
            str(fitted["model_dir"]),
            "--n-cells",
            "2",
            "--labels",
            "c0,Neuron",
            "--out",
            str(out),
        ]
    )
    assert rc == 2
    assert "Neuron" in error_line(capsys)
    assert not out.exists()


def test_generate_noise_needs_a_pca_decoder(fitted, tmp_path, capsys):
    # the fixture's latent has no PCA loadings: --noise nb cannot apply, and says why
    out = tmp_path / "x.h5ad"
    argv = ["generate", str(fitted["model_dir"]), "--n-cells", "2", "--out", str(out)]
    rc = main([*argv, "--noise", "nb"])
    assert rc == 2
    assert "decode a PCA" in error_line(capsys)
    assert not out.exists()
    with pytest.raises(SystemExit):
        main([*argv, "--noise", "poisson"])


def test_fit_wrong_labels_key(fitted, capsys):
    rc = main(
        ["fit", str(fitted["data"]), "--labels", "celltype", "--rep", "X_latent", "--out", "m2"]
    )
    assert rc == 2
    line = error_line(capsys)
    assert "'celltype'" in line and "cell_type" in line  # names the key and the choices
    assert not Path("m2").exists()


def test_fit_wrong_rep_and_missing_file(fitted, capsys):
    assert (
        main(["fit", str(fitted["data"]), "--labels", "cell_type", "--rep", "X_pca", "--out", "m3"])
        == 2
    )
    assert "X_pca" in error_line(capsys)
    assert main(["fit", "nope.h5ad", "--labels", "cell_type", "--out", "m4"]) == 2
    assert "nope.h5ad" in error_line(capsys)
    Path("bad.h5ad").write_text("not hdf5")
    assert main(["fit", "bad.h5ad", "--labels", "cell_type", "--out", "m5"]) == 2
    assert "bad.h5ad" in error_line(capsys)


def test_fit_refuses_non_empty_out(fitted, capsys):
    Path("busy").mkdir()
    Path("busy/keep.txt").write_text("x")
    rc = main(["fit", str(fitted["data"]), "--labels", "cell_type", "--out", "busy"])
    assert rc == 2
    assert "--overwrite" in error_line(capsys)


def test_generate_missing_model_dir(tmp_path, capsys):
    rc = main(["generate", str(tmp_path / "no_model"), "--n-cells", "5", "--out", "g.h5ad"])
    assert rc == 2
    assert "no_model" in error_line(capsys)
    Path("empty_model").mkdir()
    assert main(["generate", "empty_model", "--n-cells", "5", "--out", "g.h5ad"]) == 2
    assert "model.json" in error_line(capsys)
    assert not Path("g.h5ad").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no GPU exists")
def test_gpu_without_cuda_fails_early(fitted, capsys):
    rc = main(
        ["fit", str(fitted["data"]), "--labels", "cell_type", "--out", "m6", "--accelerator", "gpu"]
    )
    assert rc == 2
    assert "--accelerator gpu" in error_line(capsys)


def test_device_arguments():
    from scbranch.cli import build_parser
    from scbranch.cli._checks import _is_multi_device

    parse = build_parser().parse_args
    assert parse(["fit", "d", "--labels", "k", "--out", "m"]).devices == "auto"
    assert parse(["fit", "d", "--labels", "k", "--out", "m", "--devices", "2"]).devices == 2
    assert parse(["fit", "d", "--labels", "k", "--out", "m", "--devices", "0,1"]).devices == [0, 1]
    assert parse(["generate", "m", "--n-cells", "1", "--out", "g", "--device", "1"]).device == 1
    assert [_is_multi_device(d) for d in ["auto", 1, 2, -1, [0], [0, 1]]] == [
        False,
        False,
        True,
        True,
        False,
        True,
    ]


def test_traceback_flag_reraises(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["generate", "no_model", "--n-cells", "5", "--out", "g.h5ad", "--traceback"])


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "m", "--n-cells", "0", "--out", "g.h5ad"],
        ["generate", "m", "--n-cells", "5", "--out", "g.h5ad", "--solver", "euler"],
        ["generate", "m", "--out", "g.h5ad"],
        ["fit", "d.h5ad", "--labels", "x", "--rep", "X_pca", "--scvi", "--out", "m"],
        ["fit", "d.h5ad", "--labels", "x", "--out", "m", "--accelerator", "tpu"],
        ["fit", "d.h5ad", "--labels", "x", "--out", "m", "--devices", "two"],
        ["generate", "m", "--n-cells", "5", "--out", "g.h5ad", "--device", "-1"],
        [],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "scbranch" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["demo"], ["hierarchy"], ["fit"], ["generate"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text
    if command == ["generate"]:
        for option in [
            "--n-cells",
            "--labels",
            "--label",
            "--solver",
            "--n-steps",
            "--seed",
            "--no-share",
            "--out",
            "--overwrite",
            "dpm2m",
        ]:
            assert option in text
    if command == []:
        assert "hierarchy" in text  # every subcommand is listed
    if command == ["hierarchy"]:
        for option in ["--labels", "--rep", "--layer", "--newick", "--support", "--table"]:
            assert option in text
    if command == ["fit"]:
        for option in [
            "--labels",
            "--rep",
            "--layer",
            "--out",
            "--max-epochs",
            "--batch-size",
            "--accelerator",
            "--devices",
            "--seed",
            "--width",
            "--overwrite",
        ]:
            assert option in text


def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "scbranch.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "generate" in proc.stdout and "fit" in proc.stdout and "demo" in proc.stdout
    # python -m scbranch too, as scanpy users type it
    proc = subprocess.run(
        [sys.executable, "-m", "scbranch", "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.startswith("scbranch "), proc.stderr


def test_demo_wiring(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_run_demo(
        out, *, fast=False, seed=0, max_epochs=None, overwrite=False, progress_bar=True
    ):
        calls.append(
            {
                "out": out,
                "fast": fast,
                "seed": seed,
                "max_epochs": max_epochs,
                "overwrite": overwrite,
                "progress_bar": progress_bar,
            }
        )
        return {"generated": str(Path(out) / "generated.h5ad"), "w2": 1.5, "table": object()}

    monkeypatch.setitem(sys.modules, "scbranch._demo", _fake_module(fake_run_demo))
    assert main(["demo", "--out", "d", "--fast", "--seed", "3", "--max-epochs", "7"]) == 0
    assert calls == [
        {
            "out": "d",
            "fast": True,
            "seed": 3,
            "max_epochs": 7,
            "overwrite": False,
            "progress_bar": True,
        }
    ]
    out = capsys.readouterr().out
    assert "generated.h5ad" in out and "w2: 1.5" in out and "table" not in out

    assert main(["demo", "--out", "d", "--overwrite"]) == 0
    assert calls[-1] == {
        "out": "d",
        "fast": False,
        "seed": 0,
        "max_epochs": None,
        "overwrite": True,
        "progress_bar": True,
    }
    assert main(["demo", "--out", "d", "-q"]) == 0
    assert calls[-1]["progress_bar"] is False  # -q: no bars either


def test_demo_user_error_is_one_line(monkeypatch, capsys):
    def fake_run_demo(out, **kwargs):
        raise FileExistsError(f"{out!r} is not empty; pass --overwrite.")

    monkeypatch.setitem(sys.modules, "scbranch._demo", _fake_module(fake_run_demo))
    assert main(["demo", "--out", "d"]) == 2
    assert "--overwrite" in error_line(capsys)


def test_fit_scvi_and_generate_counts(tmp_path, capsys):
    import numpy as np

    adata = scbranch.datasets.pbmc68k()
    top = np.argsort(-np.asarray(adata.layers["counts"].sum(0)).ravel())[:100]
    adata = adata[:, np.sort(top)].copy()
    data = tmp_path / "pbmc.h5ad"
    adata.write_h5ad(data)
    common = ["--labels", "cell_type", "--max-epochs", "1", "--width", "32", "-q"]
    rc = main(
        [
            "fit",
            str(data),
            "--scvi",
            "--counts-layer",
            "counts",
            "--scvi-epochs",
            "2",
            "--out",
            str(tmp_path / "m"),
            *common,
        ]
    )
    assert rc == 0 and (tmp_path / "m" / "scvi" / "model.safetensors").is_file()
    out = tmp_path / "gen.h5ad"
    assert main(["generate", str(tmp_path / "m"), "--n-cells", "3", "--out", str(out), "-q"]) == 0
    gen = ad.read_h5ad(out)
    counts = gen.layers["counts"]
    assert counts.data.min() >= 0 and np.all(counts.data == np.round(counts.data))
    # log-normalised .X where counts are needed: one clear line, exit 2
    rc = main(["fit", str(data), "--scvi", "--out", str(tmp_path / "bad"), *common])
    assert rc == 2 and "must hold raw counts" in error_line(capsys)
    rc = main(
        [
            "fit",
            str(data),
            "--rep",
            "X_pca",
            "--batch-key",
            "b",
            "--out",
            str(tmp_path / "bad2"),
            *common,
        ]
    )
    assert rc == 2 and "--batch-key applies to --scvi" in error_line(capsys)
    argv = ["fit", str(data), "--rep", "X_pca", "--scvi-epochs", "3", "--out"]
    assert main([*argv, str(tmp_path / "bad3"), *common]) == 2
    assert "--scvi-epochs applies to --scvi" in error_line(capsys)


def test_fit_out_of_fold_learns_new_cells_spread_and_generates_nb(tmp_path, capsys):
    adata = scbranch.datasets.pbmc68k()
    data = tmp_path / "pbmc.h5ad"
    adata.write_h5ad(data)
    common = ["--labels", "cell_type", "--max-epochs", "1", "--width", "16", "-q"]
    fit = ["fit", str(data), "--rep", "X_pca", "--counts-layer", "counts", *common]
    assert main([*fit, "--out-of-fold", "--out", str(tmp_path / "m")]) == 0
    model = scbranch.BranchedDiffusion.load(tmp_path / "m")
    assert model.space.obsm_key == "X_pca_oof"
    assert "X_pca_oof" not in ad.read_h5ad(data).obsm  # the input file is not changed
    out = tmp_path / "gen.h5ad"
    assert main(["generate", str(tmp_path / "m"), "--n-cells", "3", "--out", str(out), "-q"]) == 0
    # --noise defaults to auto: negative binomial decoding for a PCA model fitted with counts
    assert ad.read_h5ad(out).uns["scbranch"]["params"]["residual_noise"] == "nb"
    # a latent that is not a PCA, or no --rep: one clear line, exit 2
    no_rep = ["fit", str(data), "--out-of-fold", "--out", str(tmp_path / "bad"), *common]
    assert main(no_rep) == 2 and "--rep" in error_line(capsys)
    adata.obsm["X_other"] = adata.obsm["X_pca"][:, :5].copy()
    adata.write_h5ad(data)
    bad = [*fit[:3], "X_other", *fit[4:], "--out-of-fold", "--out", str(tmp_path / "bad2")]
    assert main(bad) == 2 and "--out-of-fold" in error_line(capsys)


def test_fit_a_pca_of_a_layer_decodes_into_it(tmp_path, capsys):
    adata = scbranch.datasets.pbmc68k()
    adata.layers["lognorm"] = adata.X.copy()  # the PCA was computed on it
    adata.X = adata.layers["counts"].copy()
    data = tmp_path / "pbmc.h5ad"
    adata.write_h5ad(data)
    common = [str(data), "--labels", "cell_type", "--max-epochs", "1", "--width", "16", "-q"]
    fit = ["fit", *common, "--rep", "X_pca", "--layer", "lognorm", "--out", str(tmp_path / "m")]
    assert main(fit) == 0
    out = tmp_path / "gen.h5ad"
    assert main(["generate", str(tmp_path / "m"), "--n-cells", "3", "--out", str(out), "-q"]) == 0
    gen = ad.read_h5ad(out)
    assert list(gen.var_names) == list(adata.var_names)  # decoded into the layer's genes
    scvi = ["fit", *common, "--scvi", "--layer", "lognorm", "--out", str(tmp_path / "bad")]
    assert main(scvi) == 2 and "--counts-layer" in error_line(capsys)


def test_generate_anchored_from_a_file(fitted, tmp_path, capsys):
    out = tmp_path / "anchored.h5ad"
    argv = ["generate", str(fitted["model_dir"]), "--anchors", str(fitted["data"])]
    rc = main([*argv, "--n-cells", "4", "--label", "c2", "--out", str(out), "--seed", "1"])
    assert rc == 0
    gen = ad.read_h5ad(out)
    assert gen.obs["cell_type"].value_counts().to_dict() == {"c0": 0, "c1": 0, "c2": 4, "c3": 0}
    real = ad.read_h5ad(fitted["data"])
    anchors = gen.obs["scbranch_anchor"].to_numpy()
    assert set(real.obs.loc[anchors, "cell_type"]) == {"c2"}
    params = gen.uns["scbranch"]["params"]
    assert params["kind"] == "anchored" and params["anchor_time"] == 0.25 and params["seed"] == 1
    assert str(out) in capsys.readouterr().out
    # an existing file needs --overwrite; every type of the file without --labels
    assert main([*argv, "--n-cells", "2", "--out", str(out)]) == 2
    assert "--overwrite" in error_line(capsys)
    rc = main([*argv, "--n-cells", "2", "--out", str(out), "--overwrite", "--anchor-time", "0.5"])
    assert rc == 0
    gen = ad.read_h5ad(out)
    assert gen.n_obs == 8 and gen.uns["scbranch"]["params"]["anchor_time"] == 0.5
    # the file the anchors come from is never the output, --overwrite or not (it was replaced)
    data = fitted["data"]
    before = data.read_bytes()
    same = str(data.parent / "." / data.name)
    assert main([*argv, "--n-cells", "2", "--out", same, "--overwrite"]) == 2
    assert "--anchors reads" in error_line(capsys)
    assert data.read_bytes() == before
    # nor the file the model was fitted on, though the model is loaded without it
    plain = ["generate", str(fitted["model_dir"]), "--n-cells", "2", "--overwrite"]
    assert main([*plain, "--out", same]) == 2
    assert "was trained from" in error_line(capsys)
    assert data.read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--no-share"], "--no-share"),
        (["--solver", "heun"], "--solver"),
        (["--calibrate-spread"], "--calibrate-spread"),
        (["--label", "Neuron"], "Neuron"),
    ],
)
def test_generate_anchored_bad_options(fitted, tmp_path, capsys, extra, message):
    out = tmp_path / "x.h5ad"
    argv = ["generate", str(fitted["model_dir"]), "--anchors", str(fitted["data"])]
    assert main([*argv, "--n-cells", "2", "--out", str(out), *extra]) == 2
    assert message in error_line(capsys)
    assert not out.exists()


def test_generate_anchored_bad_anchor_time_and_file(fitted, tmp_path, capsys):
    argv = ["generate", str(fitted["model_dir"]), "--n-cells", "2", "--out", "x.h5ad"]
    with pytest.raises(SystemExit):
        main([*argv, "--anchors", str(fitted["data"]), "--anchor-time", "0"])
    assert main([*argv, "--anchors", str(tmp_path / "none.h5ad")]) == 2
    assert "none.h5ad" in error_line(capsys)
    # an option of anchored generation without --anchors is refused, not ignored
    assert main([*argv, "--anchor-time", "0.3"]) == 2
    assert "add --anchors" in error_line(capsys)


def _generate_two(fitted, out) -> list[str]:
    """``scbranch generate`` of two cells per type from the fitted model into ``out``."""
    return ["generate", str(fitted["model_dir"]), "--n-cells", "2", "--out", str(out)]


def test_a_type_name_split_at_its_comma_points_to_label(fitted, tmp_path, capsys):
    argv = _generate_two(fitted, tmp_path / "g.h5ad")
    assert main([*argv, "--labels", "c2, naive"]) == 2
    line = error_line(capsys)
    assert "['naive']" in line and "--label" in line and "splits at commas" in line
    assert not (tmp_path / "g.h5ad").exists()
    assert main([*argv, "--labels", "c2,c3"]) == 0


def test_a_device_index_without_a_gpu_is_refused(fitted, tmp_path, capsys):
    # --device 3 on a machine without a GPU was ignored (rc 0, cells made on the CPU)
    argv = _generate_two(fitted, tmp_path / "g.h5ad")
    assert main([*argv, "--accelerator", "cpu", "--device", "1"]) == 2
    assert "drop --device" in error_line(capsys)
    import torch

    if not torch.cuda.is_available():
        assert main([*argv, "--device", "3"]) == 2
        assert "no CUDA GPU" in error_line(capsys)
    assert not (tmp_path / "g.h5ad").exists()
