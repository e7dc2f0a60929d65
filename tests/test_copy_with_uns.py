"""``sb.io.copy_with_uns``: a file or store copied as it is on disk, with new ``uns`` entries.

Known answers: everything but the named entries reads back identical to the source, the
source's bytes never change, an entry of the same name is replaced, and a copy that fails
leaves neither a partial file nor a changed destination.
"""

import hashlib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scbranch as sb


def _cells() -> ad.AnnData:
    rng = np.random.default_rng(0)
    adata = ad.AnnData(sp.random(40, 12, density=0.3, format="csr", dtype=np.float32, rng=rng))
    adata.obs["cell_type"] = pd.Categorical(["a", "b"] * 20)
    adata.obsm["X_pca"] = rng.normal(size=(40, 3))
    adata.uns["kept"] = {"n": 3, "names": np.array(["x", "y"])}
    adata.uns["replaced"] = "old"
    return adata


def _digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_the_copy_holds_the_source_and_the_new_entries(tmp_path, suffix):
    source, dest = tmp_path / f"cells{suffix}", tmp_path / f"copy{suffix}"
    cells = _cells()
    cells.write_h5ad(source) if suffix == ".h5ad" else cells.write_zarr(source)
    before = _digest(source)
    record = {"tree": {"parent": np.array([-1, 0, 0])}, "newick": "(a,b);"}
    assert sb.io.copy_with_uns(source, dest, {"scbranch_hierarchy": record, "replaced": "new"})
    assert _digest(source) == before
    copy = ad.read_h5ad(dest) if suffix == ".h5ad" else ad.read_zarr(dest)
    assert (copy.X != cells.X).nnz == 0
    pd.testing.assert_frame_equal(copy.obs, cells.obs)
    np.testing.assert_array_equal(copy.obsm["X_pca"], cells.obsm["X_pca"])
    assert copy.uns["kept"]["n"] == 3 and list(copy.uns["kept"]["names"]) == ["x", "y"]
    assert copy.uns["replaced"] == "new"
    assert copy.uns["scbranch_hierarchy"]["newick"] == "(a,b);"
    np.testing.assert_array_equal(copy.uns["scbranch_hierarchy"]["tree"]["parent"], [-1, 0, 0])
    # what a backed reader sees (zarr: through the consolidated metadata)
    assert "scbranch_hierarchy" in sb.io.read_backed(dest).uns


def test_a_source_without_uns_gains_one(tmp_path):
    source = tmp_path / "bare.h5ad"
    ad.AnnData(np.ones((3, 2), dtype=np.float32)).write_h5ad(source)
    sb.io.copy_with_uns(source, tmp_path / "copy.h5ad", {"note": "hi"})
    assert ad.read_h5ad(tmp_path / "copy.h5ad").uns["note"] == "hi"


def test_refusals_name_the_fix_and_leave_files_alone(tmp_path):
    source = tmp_path / "cells.h5ad"
    _cells().write_h5ad(source)
    (tmp_path / "taken.h5ad").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sb.io.copy_with_uns(source, tmp_path / "taken.h5ad", {"x": 1})
    assert (tmp_path / "taken.h5ad").read_text() == "mine"
    with pytest.raises(ValueError, match="name it with .h5ad"):
        sb.io.copy_with_uns(source, tmp_path / "copy.zarr", {"x": 1})
    with pytest.raises(ValueError, match="the source itself"):
        sb.io.copy_with_uns(source, source, {"x": 1}, overwrite=True)
    with pytest.raises(FileNotFoundError, match="No such"):
        sb.io.copy_with_uns(tmp_path / "missing.h5ad", tmp_path / "copy.h5ad", {"x": 1})

    # a value anndata cannot write fails after the copy began: no partial file is left, and
    # the destination it was to replace is untouched
    with pytest.raises(Exception, match="object"):
        sb.io.copy_with_uns(source, tmp_path / "taken.h5ad", {"x": object()}, overwrite=True)
    assert (tmp_path / "taken.h5ad").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad", "taken.h5ad"]

    sb.io.copy_with_uns(source, tmp_path / "taken.h5ad", {"x": 1}, overwrite=True)
    assert ad.read_h5ad(tmp_path / "taken.h5ad").uns["x"] == 1


def test_a_new_folder_is_made_and_keys_a_file_cannot_hold_are_refused(tmp_path):
    # a folder that did not exist failed naming the hidden temporary copy; an int key failed
    # inside anndata and a key with "/" came back nested
    _cells().write_h5ad(tmp_path / "a.h5ad")
    out = tmp_path / "new" / "b.h5ad"
    sb.io.copy_with_uns(tmp_path / "a.h5ad", out, {"entry": {"t": 1}})
    assert ad.read_h5ad(out).uns["entry"]["t"] == 1
    for bad in ({"entry": {1: 2}}, {"a/b": 1}):
        with pytest.raises(ValueError, match="keys written to a file must be strings"):
            sb.io.copy_with_uns(tmp_path / "a.h5ad", tmp_path / "c.h5ad", bad)
    assert not (tmp_path / "c.h5ad").exists()
