"""Generation in blocks, to disk (``generate(out=...)``) and over several devices.

The same seed gives the same cells in memory, in an ``.h5ad`` file and in a zarr store, on one
device or two; a request that fits in one block is the single sampler run it always was; an
existing output is refused without ``overwrite``; an interrupted run leaves no file behind; and
what is written arrives in blocks, so memory does not grow with the number of cells.
"""

from __future__ import annotations

import os
import shutil
import signal
import tracemalloc

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _counts import count_data

import scbranch as sb
from scbranch.cli import main
from scbranch.io import ChunkedWriter
from scbranch.model._blocks import (
    block_origins,
    block_seed,
    default_block_rows,
    plan_blocks,
)
from scbranch.model._output import check_memory, generated_anndata, requested_nodes

LABELS = "cell_type"
FAST = {"width": 32, "n_head_blocks": 1}
FEW = {"n_steps": 6, "progress_bar": False}


def _count_data(n_per_class: int = 30, n_genes: int = 30, seed: int = 0) -> ad.AnnData:
    return count_data(n_per_class, n_genes, seed, labels=LABELS)


def _train(model) -> None:
    model.train(max_epochs=1, batch_size=32, accelerator="cpu", enable_progress_bar=False)


@pytest.fixture(scope="module")
def pca_model():
    adata = _count_data()
    sb.BranchedDiffusion.setup_anndata(
        adata, labels_key=LABELS, obsm_key="X_pca", counts_layer="counts"
    )
    model = sb.BranchedDiffusion(adata, **FAST)
    _train(model)
    model.tree.name_node("everything", model.classes)  # a node request spans blocks too
    return model


@pytest.fixture(scope="module")
def expression_model():
    adata = _count_data(n_genes=16)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key=LABELS, counts_layer="counts")
    model = sb.BranchedDiffusion(adata, **FAST)
    _train(model)
    return model


@pytest.fixture(scope="module")
def scvi_space_model():
    import scvi

    scvi.settings.seed = 0
    adata = _count_data(n_per_class=20, n_genes=20)
    vae = sb.model.fit_scvi(adata, counts_layer="counts", max_epochs=1, n_latent=4)
    model = sb.BranchedDiffusion.from_scvi_model(vae, labels_key=LABELS, adata=adata, **FAST)
    _train(model)
    return model


def _read(path) -> ad.AnnData:
    return ad.read_zarr(path) if str(path).endswith(".zarr") else ad.read_h5ad(path)


def _same_matrix(a, b, what: str) -> None:
    assert sp.issparse(a) == sp.issparse(b), f"{what}: sparse {sp.issparse(a)} vs {sp.issparse(b)}"
    if sp.issparse(a):
        assert a.format == b.format == "csr", what
        a, b = a.toarray(), b.toarray()
    assert a.dtype == b.dtype, f"{what}: {a.dtype} vs {b.dtype}"
    np.testing.assert_array_equal(a, b, err_msg=what)


def _assert_same_cells(a: ad.AnnData, b: ad.AnnData) -> None:
    assert a.shape == b.shape
    assert list(a.var_names) == list(b.var_names)
    if a.X is None or b.X is None:
        assert a.X is None and b.X is None
    else:
        _same_matrix(a.X, b.X, "X")
    assert sorted(a.layers) == sorted(b.layers)
    for key in a.layers:
        _same_matrix(a.layers[key], b.layers[key], f"layers[{key!r}]")
    assert sorted(a.obsm) == sorted(b.obsm)
    for key in a.obsm:
        _same_matrix(np.asarray(a.obsm[key]), np.asarray(b.obsm[key]), f"obsm[{key!r}]")
    pd.testing.assert_frame_equal(a.obs, b.obs, check_index_type=False)
    pa, pb = a.uns["scbranch"]["params"], b.uns["scbranch"]["params"]
    for key in ("seed", "block_rows", "n_blocks", "n_network_calls"):
        assert pa[key] == pb[key], key


# ---------------------------------------------------------------------------- the block plan
@pytest.mark.parametrize("block_rows", [1, 4, 7, 50, 1000])
def test_block_plan_spreads_every_class_and_respects_the_block_size(block_rows):
    requested = {2: 23, 0: 5, 3: 1, 1: 11}
    plan = plan_blocks(requested, block_rows)
    total = sum(requested.values())
    assert len(plan) == -(-total // block_rows)
    assert max(sum(b.values()) for b in plan) <= block_rows
    sizes = [sum(b.values()) for b in plan]
    assert max(sizes) - min(sizes) <= 1
    for c, n in requested.items():
        assert sum(b.get(c, 0) for b in plan) == n
        shares = [b.get(c, 0) for b in plan]
        assert max(shares) - min(shares) <= 1  # spread evenly
    for b in plan:
        assert list(b) == [c for c in requested if c in b]  # request order inside a block
    if len(plan) == 1:
        assert plan == [requested]


def test_block_origins_follow_the_request_order_across_blocks():
    origins = {0: [("c0", 3), ("node", 4)], 1: [("node", 5)]}
    requested = {0: 7, 1: 5}
    plan = plan_blocks(requested, 5)
    pieces = block_origins(origins, plan)
    codes = [np.repeat(list(b), list(b.values())) for b in plan]
    names = np.concatenate([requested_nodes(c, p) for c, p in zip(codes, pieces, strict=True)])
    codes = np.concatenate(codes)
    whole = requested_nodes(np.repeat([0, 1], [7, 5]), origins)
    for c in (0, 1):  # each class's cells answer its requests in the same order
        assert list(names[codes == c]) == list(whole[np.repeat([0, 1], [7, 5]) == c])
    assert block_seed(3, 0) == 3 and len({block_seed(3, k) for k in range(5)}) == 5


def test_default_block_rows_depend_on_the_model_only(pca_model):
    rows = default_block_rows(pca_model.space)
    assert sb.model._blocks.MIN_BLOCK_ROWS <= rows <= sb.model._blocks.MAX_BLOCK_ROWS
    with_counts = pca_model.generate(n_cells=3, seed=1, counts=True, **FEW)
    without = pca_model.generate(n_cells=3, seed=1, **FEW)
    assert with_counts.uns["scbranch"]["params"]["block_rows"] == rows
    np.testing.assert_array_equal(with_counts.obsm["X_pca"], without.obsm["X_pca"])


# ---------------------------------------------------------------------------- identity
@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
@pytest.mark.parametrize("kind", ["pca", "expression", "scvi"])
def test_disk_and_memory_give_the_same_cells(kind, suffix, request, tmp_path):
    model = request.getfixturevalue(f"{kind}_model" if kind != "scvi" else "scvi_space_model")
    n_cells = {"everything": 9, "c1": 4} if kind == "pca" else 5
    kwargs = {"seed": 11, "block_size": 6, "counts": True, **FEW}
    memory = model.generate(n_cells, **kwargs)
    params = memory.uns["scbranch"]["params"]
    assert params["n_blocks"] > 2 and params["block_rows"] == 6
    assert list(memory.obs_names) == [f"gen{i}" for i in range(memory.n_obs)]
    assert sp.issparse(memory.layers["counts"])
    if kind == "scvi":
        assert sp.issparse(memory.X)  # log-normalised counts
    path = model.generate(n_cells, out=tmp_path / f"cells{suffix}", **kwargs)
    assert path == tmp_path / f"cells{suffix}"
    _assert_same_cells(memory, _read(path))
    if kind == "pca":
        assert memory.obs["scbranch_requested_node"].value_counts()["everything"] == 9


def test_a_request_that_fits_in_one_block_is_the_single_sampler_run(pca_model):
    gen = pca_model.generate(n_cells=5, seed=4, counts=True, **FEW)
    assert gen.uns["scbranch"]["params"]["n_blocks"] == 1
    requested = {c: 5 for c in range(len(pca_model.classes))}
    res = pca_model.module.sample_cells(requested, n_steps=6, seed=4)
    direct = generated_anndata(
        pca_model,
        res.x.float().cpu().numpy(),
        res.labels.cpu().numpy(),
        # the default noise of a PCA model set up with counts: "nb"
        {"seed": 4, "counts": True, "residual_noise": "nb", "batch": None},
    )
    np.testing.assert_array_equal(gen.obsm["X_pca"], direct.obsm["X_pca"])
    np.testing.assert_array_equal(gen.X, direct.X)
    np.testing.assert_array_equal(gen.layers["counts"].toarray(), direct.layers["counts"].toarray())
    # any block size that holds the request gives these cells
    bigger = pca_model.generate(n_cells=5, seed=4, counts=True, block_size=20, **FEW)
    np.testing.assert_array_equal(gen.X, bigger.X)
    np.testing.assert_array_equal(gen.layers["counts"].toarray(), bigger.layers["counts"].toarray())


def test_two_devices_give_the_cells_of_one(pca_model):
    kwargs = {"seed": 5, "block_size": 5, "counts": True, **FEW}
    one = pca_model.generate(7, **kwargs)
    two = pca_model.generate(7, devices=["cpu", "cpu"], **kwargs)
    assert one.uns["scbranch"]["params"]["n_blocks"] == 6
    _assert_same_cells(one, two)
    with pytest.raises(ValueError, match="empty"):
        pca_model.generate(7, devices=[], **kwargs)


def test_trajectories_are_one_block_and_can_be_written(pca_model, tmp_path):
    kwargs = {"seed": 2, "trajectory_times": [1.0, 0.5, 0.0], **FEW}
    memory = pca_model.generate(3, **kwargs)
    path = pca_model.generate(3, out=tmp_path / "tr.h5ad", **kwargs)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(memory.obsm["scbranch_state"], back.obsm["scbranch_state"])
    np.testing.assert_array_equal(memory.X, back.X)
    with pytest.raises(ValueError, match="one block"):
        pca_model.generate(3, out=tmp_path / "big.h5ad", block_size=5, **kwargs)
    with pytest.raises(ValueError, match="devices"):
        pca_model.generate(3, devices=["cpu"], **kwargs)
    assert not (tmp_path / "big.h5ad").exists()


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_an_existing_output_is_refused_without_overwrite(pca_model, tmp_path, suffix, monkeypatch):
    path = tmp_path / f"cells{suffix}"
    pca_model.generate(3, seed=0, out=path, **FEW)
    before = _read(path)

    def never(*args, **kwargs):
        raise AssertionError("sampling started")

    with monkeypatch.context() as m:
        m.setattr(type(pca_model.module), "sample_cells", never)
        with pytest.raises(FileExistsError, match="already exists"):
            pca_model.generate(3, seed=1, out=path, **FEW)
    np.testing.assert_array_equal(_read(path).obsm["X_pca"], before.obsm["X_pca"])
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        pca_model.generate(3, seed=1, out=folder, overwrite=True, **FEW)
    folder.rmdir()
    # a folder named like a store but holding the user's files is not a store to replace
    notes = tmp_path / "notes.zarr"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(IsADirectoryError, match="not a zarr store"):
        pca_model.generate(3, seed=1, out=notes, overwrite=True, **FEW)
    assert (notes / "notes.txt").read_text() == "mine"
    shutil.rmtree(notes)
    pca_model.generate(4, seed=1, out=path, overwrite=True, **FEW)
    after = _read(path)
    assert after.n_obs == 16 and after.uns["scbranch"]["params"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def _interrupt_on_append(monkeypatch, n: int, swallow: bool = False) -> list[int]:
    """Make ChunkedWriter.append raise Ctrl-C on its n-th call (or send SIGINT and swallow it)."""
    rows: list[int] = []
    append = ChunkedWriter.append

    def interrupted(self, X=None, *, obs, **kwargs):
        rows.append(len(obs))
        if len(rows) == n:
            if not swallow:
                raise KeyboardInterrupt
            try:  # what h5py may do with a Ctrl-C during a write
                os.kill(os.getpid(), signal.SIGINT)
            except KeyboardInterrupt:
                pass
        return append(self, X, obs=obs, **kwargs)

    monkeypatch.setattr(ChunkedWriter, "append", interrupted)
    return rows


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_an_interrupted_generation_leaves_no_file(pca_model, tmp_path, monkeypatch, suffix):
    path = tmp_path / f"cells{suffix}"
    with monkeypatch.context() as m:
        rows = _interrupt_on_append(m, 2)
        with pytest.raises(KeyboardInterrupt):
            pca_model.generate(6, seed=0, block_size=5, counts=True, out=path, **FEW)
    assert len(rows) == 2 and not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary left behind
    # an existing file survives an interrupted overwrite
    pca_model.generate(2, seed=0, out=path, **FEW)
    before = _read(path)
    with monkeypatch.context() as m:
        _interrupt_on_append(m, 2)
        with pytest.raises(KeyboardInterrupt):
            pca_model.generate(6, seed=1, block_size=5, out=path, overwrite=True, **FEW)
    _assert_same_cells(before, _read(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_swallowed_ctrl_c_still_stops_the_file(pca_model, tmp_path, monkeypatch, default_sigint):
    path = tmp_path / "cells.h5ad"
    with monkeypatch.context() as m:
        rows = _interrupt_on_append(m, 1, swallow=True)
        with pytest.raises(KeyboardInterrupt):
            pca_model.generate(6, seed=0, block_size=5, out=path, **FEW)
    assert len(rows) > 1  # the run went on, as after a library swallowed the Ctrl-C
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------------------- memory
def test_blocks_are_written_as_they_come(pca_model, tmp_path, monkeypatch):
    rows = _interrupt_on_append(monkeypatch, -1)  # records rows, never interrupts
    pca_model.generate(25, seed=0, block_size=16, counts=True, out=tmp_path / "c.h5ad", **FEW)
    assert sum(rows) == 100 and len(rows) == 7 and max(rows) <= 16


def test_memory_to_disk_does_not_grow_with_the_number_of_cells(tmp_path):
    adata = _count_data(n_per_class=20, n_genes=400)
    sb.BranchedDiffusion.setup_anndata(
        adata, labels_key=LABELS, obsm_key="X_pca", counts_layer="counts"
    )
    model = sb.BranchedDiffusion(adata, **FAST)
    _train(model)

    def peak(n_cells: int, out) -> int:
        tracemalloc.start()
        try:
            model.generate(n_cells, seed=0, block_size=256, counts=True, out=out, **FEW)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = 200, 1200  # cells per type (x 4 types)
    extra_cells = 4 * (large - small)
    to_disk = peak(large, tmp_path / "l.h5ad") - peak(small, tmp_path / "s.h5ad")
    in_memory = peak(large, None) - peak(small, None)
    # in memory every cell keeps its 400 genes (dense X and counts: > 1.6 kB); written to disk
    # only its obs row stays (~0.1-0.2 kB)
    assert in_memory > 1600 * extra_cells
    assert to_disk < 500 * extra_cells, (to_disk / extra_cells, in_memory / extra_cells)


def test_memory_check_counts_one_block_when_writing(pca_model):
    space, options = pca_model.space, {"counts": True, "residual_noise": False, "batch": None}
    with pytest.raises(ValueError, match=r"needs about .* GiB.*Ask for fewer cells.*out="):
        check_memory(space, 10**7, options, available=2**30)
    check_memory(space, 10**6, options, available=2**30, block_rows=4096)
    with pytest.raises(ValueError, match=r"Writing .* cells to disk needs about .* GiB"):
        check_memory(space, 10**9, options, available=2**30, block_rows=4096)


# ---------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def saved_model(pca_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model"
    pca_model.save(path)
    return path


@pytest.mark.parametrize("suffix", [".zarr", ".h5ad"])
def test_cli_writes_blocks_to_h5ad_and_zarr(saved_model, pca_model, tmp_path, suffix, capsys):
    out = tmp_path / "sub" / f"gen{suffix}"
    argv = ["generate", str(saved_model), "--n-cells", "6", "--out", str(out), "--seed", "3"]
    argv += ["--n-steps", "6", "--block-size", "7", "--counts", "-q"]
    assert main(argv) == 0
    gen = _read(out)
    assert gen.uns["scbranch"]["params"]["n_blocks"] == 4
    loaded = sb.BranchedDiffusion.load(saved_model)
    expected = loaded.generate(6, seed=3, block_size=7, counts=True, **FEW)
    _assert_same_cells(expected, gen)
    capsys.readouterr()
    assert main(argv) == 2  # exists
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert main([*argv, "--overwrite", "--seed", "4"]) == 0
    assert _read(out).uns["scbranch"]["params"]["seed"] == 4
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_layers_keeps_only_the_layers_asked_for_and_names_unknown_ones(
    scvi_space_model, pca_model, tmp_path
):
    full = scvi_space_model.generate(6, seed=2, progress_bar=False)
    path = scvi_space_model.generate(
        6, seed=2, progress_bar=False, layers=["counts"], out=tmp_path / "c.h5ad"
    )
    only = ad.read_h5ad(path)
    assert set(full.layers) == {"counts", "scale"} and list(only.layers) == ["counts"]
    _same_matrix(only.layers["counts"], full.layers["counts"], "counts")  # the same cells
    # a PCA model makes counts (with counts=True), never scVI's normalised expression
    with pytest.raises(ValueError, match=r"no layer \['scale'\].*makes \['counts'\]"):
        pca_model.generate(6, seed=2, counts=True, layers=["scale"], progress_bar=False)


def test_cli_layers_option_names_unknown_layers_in_one_line(saved_model, tmp_path, capsys):
    out = tmp_path / "gen.h5ad"
    argv = ["generate", str(saved_model), "--n-cells", "3", "--out", str(out), "--counts", "-q"]
    assert main([*argv, "--n-steps", "6", "--layers", "counts"]) == 0
    assert list(_read(out).layers) == ["counts"]
    capsys.readouterr()
    assert main([*argv, "--overwrite", "--layers", "scale"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no layer ['scale']" in err[0]


@pytest.mark.parametrize("sparse", [False, True])
def test_blocks_kept_in_memory_are_stacked_once_and_released(sparse):
    # generate() without out= held every block and their concatenation at once (twice the
    # cells); the stack copies block by block, releasing each: the same matrix, blocks emptied
    from scbranch.model._blocks import concat_blocks

    rng = np.random.default_rng(0)
    blocks, dense = [], []
    for k, n in enumerate((5, 1, 7)):
        x = rng.poisson(0.5, size=(n, 6)).astype(np.float32)
        dense.append(x)
        matrix = sp.csr_matrix(x) if sparse else x
        blocks.append(
            ad.AnnData(
                X=matrix, obs=pd.DataFrame(index=[f"b{k}c{i}" for i in range(n)]),
                layers={"counts": matrix.copy()}, obsm={"z": x[:, :2].astype(np.float64)},
            )
        )  # fmt: skip
    whole = concat_blocks(blocks)
    expected = np.concatenate(dense)
    got = whole.X.toarray() if sparse else whole.X
    np.testing.assert_array_equal(got, expected)
    assert sp.issparse(whole.layers["counts"]) == sparse and whole.X.dtype == np.float32
    np.testing.assert_array_equal(whole.obsm["z"], expected[:, :2])
    assert list(whole.obs_names[:2]) == ["b0c0", "b0c1"] and whole.n_obs == 13
    assert all(b.X is None and not b.layers and not b.obsm for b in blocks)
