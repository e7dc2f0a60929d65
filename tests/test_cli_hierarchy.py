"""``scbranch hierarchy``: the tree of an .h5ad file and its support, from the command line.

Known answers: on cells simulated around a known binary tree the command prints and stores
exactly the true clades, each recurring in every resample; a topology the user gives is kept
as given (support 1 by construction); ``scbranch fit`` on the written file trains on that tree.
"""

import hashlib

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scvi
from _cli import error_line

import scbranch as sb
from scbranch.cli import main
from scbranch.tl._compare import clades


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(scvi.settings, "logging_dir", tmp_path / "scvi_log")


@pytest.fixture
def simulated(tmp_path):
    sim = sb.datasets.simulate_tree(depth=2, n_per_class=60, dim=8, seed=0)
    path = tmp_path / "cells.h5ad"
    sim.to_anndata().write_h5ad(path)
    return sim, path


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_hierarchy_recovers_a_simulated_tree_with_full_support(simulated, tmp_path, capsys):
    sim, data = simulated
    before = _digest(data)
    out, table, plot = tmp_path / "tree.h5ad", tmp_path / "support.csv", tmp_path / "tree.png"
    argv = ["hierarchy", str(data), "--labels", "cell_type", "--rep", "X_latent"]
    rc = main([*argv, "--support", "5", "--out", str(out), "--table", str(table)] + ["-q"])
    assert rc == 0
    rc = main([*argv, "--plot", str(plot)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Hierarchy of 4 cell types: " in printed and plot.stat().st_size > 0
    assert _digest(data) == before  # the input file is never modified

    stored = ad.read_h5ad(out)
    tree, _ = sb.tl.read_hierarchy(stored)
    true_clades = {s for s in sim.true_splits if len(s) < len(sim.classes)}
    assert set(clades(tree)) == true_clades
    support = pd.read_csv(table)
    assert len(support) == len(sim.true_splits)  # every branch point, the root included
    assert np.allclose(support["support"], 1.0)  # a clean tree recurs in every resample
    assert (support["n_recur"] == 5).all()
    assert sb.tl.read_stability(stored)["support"].tolist() == support["support"].tolist()


def test_hierarchy_keeps_a_users_topology_and_fit_reuses_the_written_tree(simulated, tmp_path):
    _, data = simulated
    out = tmp_path / "given.h5ad"
    given = "((c0,c2),(c1,c3));"  # not the data's tree: kept, only the times are the data's
    argv = ["hierarchy", str(data), "--labels", "cell_type", "--rep", "X_latent", "-q"]
    rc = main([*argv, "--newick", given, "--support", "3", "--out", str(out)])
    assert rc == 0
    tree, record = sb.tl.read_hierarchy(ad.read_h5ad(out))
    assert set(clades(tree)) == {frozenset({"c0", "c2"}), frozenset({"c1", "c3"})}
    assert sb.tl.read_stability(ad.read_h5ad(out))["support"].eq(1.0).all()

    rc = main(
        ["fit", str(out), "--labels", "cell_type", "--rep", "X_latent", "--out", "model"]
        + ["--max-epochs", "1", "--width", "16", "--accelerator", "cpu", "-q"]
    )
    assert rc == 0
    model = sb.BranchedDiffusion.load("model")
    assert model.tree.to_newick() == tree.to_newick()


def test_hierarchy_without_support_writes_the_branch_times(simulated, tmp_path):
    _, data = simulated
    table = tmp_path / "points.csv"
    rc = main(
        ["hierarchy", str(data), "--labels", "cell_type", "--table", str(table), "-q"]
        + ["--rep", "X_latent"]
    )
    assert rc == 0
    points = pd.read_csv(table)
    assert list(points.columns) == ["branch", "classes", "t"]
    assert len(points) == 3 and points["t"].between(0, 1).all()
    assert points["classes"].str.count(",").max() == 3  # the root: all four types


def test_the_few_cells_warning_names_the_command_not_python(tmp_path, capsys):
    sim = sb.datasets.simulate_tree(depth=1, n_per_class=30, dim=4, seed=0)
    sim.to_anndata().write_h5ad(tmp_path / "few.h5ad")
    rc = main(["hierarchy", str(tmp_path / "few.h5ad"), "--labels", "cell_type", "-q"])
    assert rc == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "40 cells or fewer" in line]
    assert len(warned) == 1 and warned[0].startswith("scbranch: warning: ")
    assert "`scbranch hierarchy DATA.h5ad --labels KEY --support 50`" in warned[0]
    assert "sb.tl" not in warned[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--labels", "celltype"], "--labels 'celltype' is not a column of adata.obs"),
        (["--labels", "cell_type", "--rep", "X_pac"], "--rep 'X_pac' is not in adata.obsm"),
        (["--labels", "cell_type", "--support", "1"], "--support needs 2 or more resamples"),
        (["--labels", "cell_type", "--newick", "((c0,c1),cX);"], "['cX']"),
        (["--labels", "cell_type", "--out", "cells.h5ad", "--overwrite"], "would destroy it"),
        (["--labels", "cell_type", "--table", "a.csv", "--plot", "a.csv"], "the same file"),
        (["--labels", "cell_type", "--table", "exists.csv"], "pass --overwrite"),
        (["--labels", "cell_type", "--out", "."], "--out '.' is a directory"),
    ],
)
def test_hierarchy_bad_input_is_one_line(simulated, tmp_path, capsys, extra, message):
    _, data = simulated
    (tmp_path / "exists.csv").write_text("mine\n")
    rc = main(["hierarchy", str(data), *extra])
    assert rc == 2
    assert message in error_line(capsys)
    assert (tmp_path / "exists.csv").read_text() == "mine\n"  # not replaced
    assert not (tmp_path / "a.csv").exists()


def test_fit_takes_a_users_topology_from_newick(simulated, tmp_path):
    _, data = simulated
    given = "((c0,c3),(c1,c2));"  # not the data's tree
    rc = main(
        ["fit", str(data), "--labels", "cell_type", "--rep", "X_latent", "--newick", given]
        + ["--out", "model", "--max-epochs", "1", "--width", "16", "--accelerator", "cpu", "-q"]
    )
    assert rc == 0
    tree = sb.BranchedDiffusion.load("model").tree
    assert set(clades(tree)) == {frozenset({"c0", "c3"}), frozenset({"c1", "c2"})}


def test_hierarchy_of_cells_left_on_disk_is_the_same_tree(simulated, tmp_path, capsys):
    _, data = simulated
    argv = ["hierarchy", str(data), "--labels", "cell_type", "--rep", "X_latent"]
    assert main([*argv, "--table", "memory.csv", "-q"]) == 0
    assert main([*argv, "--backed", "--table", "disk.csv", "-q"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv("memory.csv"), pd.read_csv("disk.csv"))
    assert main([*argv, "--backed", "--out", "tree.zarr"]) == 2  # a copy keeps the format
    assert "name it with .h5ad" in error_line(capsys)
    assert not (tmp_path / "tree.zarr").exists()


def test_hierarchy_of_cells_left_on_disk_writes_a_copy_with_the_tree(simulated, tmp_path):
    # an atlas's expression is copied as it is on disk, never read; only uns gains the tree
    sim, data = simulated
    before = _digest(data)
    argv = ["hierarchy", str(data), "--labels", "cell_type", "--rep", "X_latent", "-q"]
    assert main([*argv, "--backed", "--support", "3", "--out", "tree.h5ad"]) == 0
    assert _digest(data) == before
    cells, copy = ad.read_h5ad(data), ad.read_h5ad("tree.h5ad")
    np.testing.assert_array_equal(copy.X, cells.X)
    pd.testing.assert_frame_equal(copy.obs, cells.obs)
    np.testing.assert_array_equal(copy.obsm["X_latent"], cells.obsm["X_latent"])
    assert set(copy.uns) == set(cells.uns) | {"scbranch_hierarchy"}
    tree, _ = sb.tl.read_hierarchy(copy)
    assert set(clades(tree)) == {s for s in sim.true_splits if len(s) < 4}
    assert sb.tl.read_stability(copy)["n_recur"].eq(3).all()

    # cells read into memory may be written as a store
    assert main([*argv, "--out", "memory.zarr"]) == 0
    assert sb.tl.read_hierarchy(ad.read_zarr("memory.zarr"))[0].to_newick() == tree.to_newick()

    # a .zarr store: the same, as a store, and fit trains on the tree it finds there
    cells.write_zarr("cells.zarr")
    argv[1] = "cells.zarr"
    assert main([*argv, "--out", "tree.zarr"]) == 0
    stored = sb.io.read_backed("tree.zarr")  # through the store's consolidated metadata
    assert sb.tl.read_hierarchy(stored)[0].to_newick() == tree.to_newick()
    assert "scbranch_hierarchy" not in sb.io.read_backed("cells.zarr").uns
    rc = main(
        ["fit", "tree.zarr", "--labels", "cell_type", "--rep", "X_latent", "--out", "model"]
        + ["--max-epochs", "1", "--width", "16", "--accelerator", "cpu", "-q"]
    )
    assert rc == 0
    assert sb.BranchedDiffusion.load("model").tree.to_newick() == tree.to_newick()


def test_hierarchy_with_noiseless_curves_is_deterministic(simulated, tmp_path):
    sim, data = simulated
    argv = ["hierarchy", str(data), "--labels", "cell_type", "--rep", "X_latent", "-q"]
    for seed in ("0", "1"):
        rc = main([*argv, "--curves", "expected", "--seed", seed, "--out", f"t{seed}.h5ad"])
        assert rc == 0
    trees = [sb.tl.read_hierarchy(ad.read_h5ad(f"t{seed}.h5ad")) for seed in ("0", "1")]
    assert trees[0][1]["params"]["curves"] == "expected"
    assert trees[0][0].to_newick() == trees[1][0].to_newick()  # no noise: the seed is moot
    assert set(clades(trees[0][0])) == {s for s in sim.true_splits if len(s) < 4}
    # its support comes from resamples that draw noise (a noiseless tree's wrong clades would
    # otherwise recur in most of them)
    assert main([*argv, "--curves", "expected", "--support", "3", "--out", "s.h5ad"]) == 0
    stored = ad.read_h5ad("s.h5ad").uns["scbranch_hierarchy"]
    assert stored["params"]["curves"] == "expected"
    assert stored["stability"]["params"]["curves"] == "sampled"


def test_bad_values_in_the_file_and_a_bad_newick_for_fit_are_one_line(simulated, tmp_path, capsys):
    _, data = simulated
    cells = ad.read_h5ad(data)
    cells.obsm["X_latent"][3, 2] = np.nan
    cells.write_h5ad(tmp_path / "nan.h5ad")
    cells = ad.read_h5ad(data)
    cells.obs.loc[cells.obs_names[:2], "cell_type"] = np.nan
    cells.write_h5ad(tmp_path / "unlabelled.h5ad")
    cases = [
        (["hierarchy", "nan.h5ad", "--rep", "X_latent"], "NaN or infinite"),
        (["hierarchy", "unlabelled.h5ad", "--rep", "X_latent"], "2 missing value(s)"),
        (["hierarchy", str(data), "--target-sum", "nan"], "--target-sum must be a positive"),
        (["fit", str(data), "--rep", "X_latent", "--newick", "((c0,c1),cX);", "--out", "m"], "cX"),
    ]
    for argv, message in cases:
        assert main([*argv, "--labels", "cell_type"]) == 2
        assert message in error_line(capsys)
    assert not (tmp_path / "m").exists()


def test_q_still_prints_the_tree_and_its_support(simulated, capsys):
    # -q printed nothing: without --out the tree is all the command gives
    _, data = simulated
    argv = ["hierarchy", str(data), "--labels", "cell_type", "--rep", "X_latent", "-q"]
    assert main([*argv, "--support", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hierarchy of 4 cell types: (") and "Support over 2 resamples" in out


def test_outputs_are_checked_before_the_work_and_new_folders_made(simulated, tmp_path, capsys):
    _, data = simulated
    argv = ["hierarchy", str(data), "--labels", "cell_type", "--rep", "X_latent", "-q"]
    # an unknown image format failed after discovery and every resample, with --table written
    rc = main([*argv, "--table", "t.csv", "--plot", "tree.xyz", "--support", "2"])
    assert rc == 2 and "--plot" in error_line(capsys) and not (tmp_path / "t.csv").exists()
    # a folder that does not exist yet is made, as generate --out does (h5py failed in it)
    assert main([*argv, "--out", "new/tree.h5ad", "--table", "other/t.csv"]) == 0
    assert (tmp_path / "new" / "tree.h5ad").is_file() and (tmp_path / "other" / "t.csv").is_file()
    # a folder given as the data is a folder, not "No such .h5ad file"
    assert main(["hierarchy", str(tmp_path), "--labels", "cell_type", "-q"]) == 2
    assert "is a directory" in error_line(capsys)


def test_an_unknown_option_shows_the_commands_usage(simulated, capsys):
    _, data = simulated
    with pytest.raises(SystemExit) as code:
        main(["hierarchy", str(data), "--labels", "cell_type", "--bogus"])
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.startswith("usage: scbranch hierarchy")
    assert "unrecognized arguments: --bogus" in err
