"""The rough edges a new user hits: each a clear error (or the expected behaviour), never noise."""

import os
import signal
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import scbranch as sb
from scbranch.cli import main

FAST = {"width": 32, "n_head_blocks": 1}


def _pbmc(n_genes: int = 60) -> ad.AnnData:
    adata = sb.datasets.pbmc68k()[:, :n_genes].copy()
    sc.pp.pca(adata, n_comps=5)
    return adata


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small .h5ad and a model fitted on it through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    adata = _pbmc()
    adata.write_h5ad(root / "pbmc.h5ad")
    rc = main(
        ["fit", str(root / "pbmc.h5ad"), "--labels", "cell_type", "--rep", "X_pca",
         "--out", str(root / "model"), "--max-epochs", "1", "--width", "32", "-q"]
    )  # fmt: skip
    assert rc == 0
    return root


def _fit_quietly(files, out, capfd, *options: str) -> tuple[int, str, str]:
    """``scbranch fit ... -q`` on the small file, one epoch: exit status, stdout, stderr."""
    capfd.readouterr()
    rc = main(
        ["fit", str(files / "pbmc.h5ad"), "--labels", "cell_type", *options,
         "--out", str(out), "--max-epochs", "1", "-q"]
    )  # fmt: skip
    return (rc, *capfd.readouterr())


def test_fit_and_generate_with_q_print_only_warnings_one_line_each(files, tmp_path, capfd):
    rc, out, err = _fit_quietly(files, tmp_path / "m", capfd, "--rep", "X_pca", "--width", "32")
    # -q: "only warnings and errors" (its help): no progress, no logs, no library chatter; this
    # small data's warning that two types are indistinguishable stays, one line
    assert rc == 0 and out == "", (out, err)
    lines = err.splitlines()
    assert lines and all(line.startswith("scbranch: warning: ") for line in lines), err
    assert any("indistinguishable" in line for line in lines)
    rc = main(["generate", str(tmp_path / "m"), "--n-cells", "3", "--out", "g.h5ad", "-q"])
    out, err = capfd.readouterr()
    assert rc == 0 and out == "" and err == "", (out, err)
    assert Path("g.h5ad").is_file()


def test_cli_warnings_name_flags_not_python_arguments(files, tmp_path, capfd):
    rc, _, err = _fit_quietly(files, tmp_path / "m", capfd, "--layer", "counts", "--width", "16")
    (line,) = [line for line in err.splitlines() if "raw counts" in line]
    assert rc == 0 and "`--target-sum 1e4`" in line and "`--layer`" in line, err
    assert "target_sum=" not in line and "`layer=`" not in line


def test_an_output_that_appears_while_cells_are_made_is_named_with_the_flag():
    from scbranch.cli import _in_flags
    from scbranch.io._writer import check_writable

    Path("taken.h5ad").write_text("")  # as if another job wrote it during generation
    with pytest.raises(FileExistsError) as err:
        check_writable("taken.h5ad", overwrite=False)
    message = _in_flags(str(err.value))
    assert "--overwrite" in message and "overwrite=True" not in message


def test_output_a_user_reads_has_no_noise(files, tmp_path, capfd):
    capfd.readouterr()
    main(
        ["fit", str(files / "pbmc.h5ad"), "--labels", "cell_type", "--rep", "X_pca",
         "--out", str(tmp_path / "m"), "--max-epochs", "2", "--width", "32"]
    )  # fmt: skip
    main(["generate", str(tmp_path / "m"), "--n-cells", "3", "--out", "g.h5ad"])
    out, err = capfd.readouterr()
    for noise in ("💡", "LeafSpec", "log_every_n_steps", "already downloaded", "Traceback"):
        assert noise not in out + err, noise
    assert "Saved model to" in out and "Wrote 30 generated cells" in out


def test_more_cells_than_memory_are_refused_with_the_figure(files, capfd):
    model = sb.BranchedDiffusion.load(files / "model")
    with pytest.raises(ValueError, match=r"needs about .* GiB.*Ask for fewer cells"):
        model.generate(n_cells=10**9, progress_bar=False)
    capfd.readouterr()
    rc = main(["generate", str(files / "model"), "--n-cells", str(10**9), "--out", "g.h5ad"])
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("scbranch: error")]
    assert rc == 2 and len(errors) == 1 and "GiB" in errors[0] and "Traceback" not in err
    assert not Path("g.h5ad").exists()


def test_an_unexpected_error_is_one_line_with_a_hint(files, monkeypatch, capfd):
    def boom(self, *args, **kwargs):
        raise RuntimeError("something deep inside torch")

    monkeypatch.setattr(sb.BranchedDiffusion, "generate", boom)
    capfd.readouterr()
    rc = main(["generate", str(files / "model"), "--n-cells", "3", "--out", "g.h5ad"])
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("scbranch: error")]
    # exit status 1: not the input's fault (2 is for bad input, as argparse's usage errors)
    assert rc == 1 and len(errors) == 1 and "Traceback" not in err
    assert "RuntimeError: something deep inside torch" in errors[0] and "--traceback" in errors[0]
    with pytest.raises(RuntimeError):
        main(["generate", str(files / "model"), "--n-cells", "3", "--out", "g.h5ad", "--traceback"])


def test_fit_out_that_cannot_be_created_is_found_before_training(files, monkeypatch, capfd):
    def never(self, *args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(sb.BranchedDiffusion, "train", never)
    Path("a_file").write_text("x")
    capfd.readouterr()
    rc = main(
        ["fit", str(files / "pbmc.h5ad"), "--labels", "cell_type", "--rep", "X_pca",
         "--out", "a_file/model"]
    )  # fmt: skip
    assert rc == 2 and "is a file" in capfd.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_fit_out_in_a_read_only_directory(files, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(sb.BranchedDiffusion, "train", lambda *a, **k: 1 / 0)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    rc = main(
        ["fit", str(files / "pbmc.h5ad"), "--labels", "cell_type", "--rep", "X_pca",
         "--out", str(locked / "model")]
    )  # fmt: skip
    assert rc == 2 and "not writable" in capfd.readouterr().err


def test_an_anndata_with_no_cells_says_so():
    empty = _pbmc()[:0].copy()
    with pytest.raises(ValueError, match="holds 0 cells"):
        sb.BranchedDiffusion.setup_anndata(empty, labels_key="cell_type", obsm_key="X_pca")
    with pytest.raises(ValueError, match="holds 0 cells"):
        sb.tl.branch_hierarchy(empty, groupby="cell_type", use_rep="X_pca")


def test_a_file_backed_anndata_sets_up_in_every_space_and_target_sum_needs_counts(tmp_path):
    adata = _pbmc()
    adata.write_h5ad(tmp_path / "lognorm.h5ad")
    adata.X = adata.layers["counts"].copy()  # an atlas keeps its counts in .X
    del adata.layers["counts"]
    adata.write_h5ad(tmp_path / "counts.h5ad")
    backed = ad.read_h5ad(tmp_path / "counts.h5ad", backed="r")
    with pytest.raises(ValueError, match="target_sum normalises raw counts for expression"):
        sb.BranchedDiffusion.setup_anndata(
            backed, labels_key="cell_type", obsm_key="X_pca", target_sum=1e4
        )
    sb.BranchedDiffusion.setup_anndata(backed, labels_key="cell_type", target_sum=1e4)
    sb.BranchedDiffusion.setup_anndata(backed, labels_key="cell_type", obsm_key="X_pca")
    # log-normalised data are not counts: target_sum refuses them, checked on disk
    lognorm = ad.read_h5ad(tmp_path / "lognorm.h5ad", backed="r")
    with pytest.raises(ValueError, match="raw counts.*non-integer") as info:
        sb.BranchedDiffusion.setup_anndata(lognorm, labels_key="cell_type", target_sum=1e4)
    # the fix in this call's terms: name the counts with layer= (counts_layer does not apply)
    assert "name them with `layer=`" in str(info.value) and "counts_layer" not in str(info.value)
    sb.BranchedDiffusion.setup_anndata(lognorm, labels_key="cell_type")


def test_negative_values_in_log_normalised_expression_are_flagged():
    adata = _pbmc()
    sc.pp.scale(adata)
    with pytest.warns(UserWarning, match="negative values.*not log-normalised"):
        sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type")


def test_raw_counts_diffused_as_expression_are_flagged_with_target_sum():
    adata = _pbmc()
    counts = adata.copy()
    counts.X = counts.layers["counts"].copy()
    with pytest.warns(UserWarning, match="looks like raw counts.*target_sum=1e4"):
        sb.BranchedDiffusion.setup_anndata(counts, labels_key="cell_type")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # log-normalised .X and target_sum: quiet
        sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type")
        sb.BranchedDiffusion.setup_anndata(counts, labels_key="cell_type", target_sum=1e4)


@pytest.mark.parametrize("axis", ["var", "obs"])
def test_duplicate_names_are_refused_with_the_fix(axis):
    adata = _pbmc()
    names = list(getattr(adata, f"{axis}_names"))
    names[1] = names[0]
    setattr(adata, f"{axis}_names", names)
    with pytest.raises(ValueError, match=rf"{axis}_names are not unique.*{axis}_names_make_unique"):
        sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_pca")


@pytest.mark.parametrize("swallowed", [False, True])
def test_ctrl_c_during_the_final_write_leaves_nothing(
    files, monkeypatch, capfd, swallowed, default_sigint
):
    def interrupted_write(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            if not swallowed:  # h5py may swallow it inside its C code
                raise

    monkeypatch.setattr(ad.AnnData, "write_h5ad", interrupted_write)
    capfd.readouterr()
    rc = main(["generate", str(files / "model"), "--n-cells", "3", "--out", "g.h5ad"])
    assert rc == 130 and "interrupted" in capfd.readouterr().err
    assert not Path("g.h5ad").exists()
    assert not [p for p in Path(".").iterdir() if p.name.startswith(".g.h5ad")]


def test_loading_a_model_prints_nothing(files, capfd):
    import logging

    seen = []
    spy = logging.Handler(level=logging.DEBUG)
    spy.emit = lambda record: seen.append(record.getMessage())
    scvi_logger = logging.getLogger("scvi")
    scvi_logger.addHandler(spy)
    capfd.readouterr()
    try:
        model = sb.BranchedDiffusion.load(files / "model", adata=_pbmc())
    finally:
        scvi_logger.removeHandler(spy)
    out, err = capfd.readouterr()
    assert model.adata is not None
    assert not [m for m in seen if "already downloaded" in m], seen
    assert "already downloaded" not in out + err and "Traceback" not in out + err


def test_generated_obs_names_are_unique_and_labels_known(files):
    model = sb.BranchedDiffusion.load(files / "model")
    gen = model.generate(n_cells={"CD19+ B": 4}, seed=0, progress_bar=False)
    assert gen.obs_names.is_unique
    assert isinstance(gen.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert np.isfinite(gen.obsm["X_pca"]).all()


def test_non_finite_weights_are_refused_at_load_and_at_generate(files, tmp_path):
    # damaged bytes load (safetensors has no checksum) and gave all-NaN cells without a word
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(files / "model", tmp_path / "m")
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    weights[name][0] = float("nan")
    save_file(weights, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match="NaN or inf values. The directory is corrupt"):
        sb.BranchedDiffusion.load(tmp_path / "m")
    model = sb.BranchedDiffusion.load(files / "model")
    with torch.no_grad():  # a training that diverged
        next(model.module.parameters()).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="non-finite values.*diverged"):
        model.generate(n_cells=2, seed=0, progress_bar=False)


def test_cli_errors_name_flags_and_what_is_missing(files, tmp_path, capfd):
    data = str(files / "pbmc.h5ad")
    rc = main(["fit", data, "--labels", "cell_type", "--rep", "X_nope", "--out", "m", "-q"])
    err = capfd.readouterr().err
    assert rc == 2 and "--rep 'X_nope'" in err and "obsm_key" not in err, err
    argv = ["generate", str(files / "model"), "--n-cells", "2", "--out", str(tmp_path / "g.h5ad")]
    rc = main([*argv, "--noise", "nb", "-q"])
    err = capfd.readouterr().err
    assert rc == 2 and "--noise nb" in err and "--counts-layer counts" in err, err
    assert "residual_noise" not in err and "setup_anndata" not in err
    # convert asked to trust a pickle in a path that does not exist
    for missing in (str(tmp_path / "nope"), data):
        assert main(["convert", missing, "--out", str(tmp_path / "new")]) == 2
        err = capfd.readouterr().err
        assert "trust" not in err and ("does not exist" in err or "a file" in err), err
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), "--out", str(tmp_path / "new")]) == 2
    assert "holds no model.pt" in capfd.readouterr().err
