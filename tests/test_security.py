"""Loading a model runs no code: plain data and tensors only; old pickles only when trusted."""

import shutil

import numpy as np
import pandas as pd
import pytest
from _legacy import malicious_pickle, save_legacy

import scbranch as sb
from scbranch.cli import main
from scbranch.model import UntrustedModelError

FAST = {"width": 32, "n_head_blocks": 1}


@pytest.fixture(scope="module")
def pca_model():
    adata = sb.datasets.pbmc68k()[:, :60].copy()
    import scanpy as sc

    sc.pp.pca(adata, n_comps=5)
    adata.layers["counts"] = adata.layers["counts"].copy()
    sb.BranchedDiffusion.setup_anndata(
        adata, labels_key="cell_type", obsm_key="X_pca", counts_layer="counts"
    )
    model = sb.BranchedDiffusion(adata, **FAST)
    model.train(max_epochs=1, enable_progress_bar=False)
    return model


@pytest.fixture(scope="module")
def scvi_model():
    adata = sb.datasets.pbmc68k()[:, :40].copy()
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 2, "b1", "b0"))
    vae = sb.model.fit_scvi(adata, counts_layer="counts", batch_key="batch", max_epochs=1)
    model = sb.BranchedDiffusion.from_scvi_model(vae, labels_key="cell_type", adata=adata, **FAST)
    model.train(max_epochs=1, enable_progress_bar=False)
    return model


def _cells(model, **kwargs):
    return model.generate(n_cells=4, seed=3, progress_bar=False, **kwargs)


def test_a_saved_model_holds_no_pickle_and_round_trips_bit_identically(pca_model, tmp_path):
    pca_model.save(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["model.json", "model.npz", "model.safetensors"]
    # every file with the mode open() gives (safetensors' own was 0600: a shared model
    # directory's weights were unreadable to colleagues who could read its JSON)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert len(set(modes.values())) == 1, modes
    with np.load(tmp_path / "m" / "model.npz", allow_pickle=False) as npz:
        assert all(npz[k].dtype != object for k in npz.files)
    loaded = sb.BranchedDiffusion.load(tmp_path / "m")
    a, b = _cells(pca_model, counts=True), _cells(loaded, counts=True)
    np.testing.assert_array_equal(a.obsm["X_pca"], b.obsm["X_pca"])
    np.testing.assert_array_equal(a.layers["counts"].toarray(), b.layers["counts"].toarray())
    assert loaded.history["train_loss"].equals(pca_model.history["train_loss"])


def test_a_pickle_planted_in_the_weights_never_runs(pca_model, tmp_path):
    pca_model.save(tmp_path / "m")
    marker = tmp_path / "marker"
    (tmp_path / "m" / "model.safetensors").write_bytes(malicious_pickle(marker))
    with pytest.raises(ValueError, match="corrupt"):
        sb.BranchedDiffusion.load(tmp_path / "m")
    assert main(["generate", str(tmp_path / "m"), "--n-cells", "2", "--out", "g.h5ad"]) == 2
    assert not marker.exists()


def test_a_pickle_in_place_of_an_old_model_needs_trust_and_never_runs_without(tmp_path, capsys):
    marker = tmp_path / "marker"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.pt").write_bytes(malicious_pickle(marker))
    with pytest.raises(UntrustedModelError, match="trust_pickle=True"):
        sb.BranchedDiffusion.load(tmp_path / "old")
    rc = main(["generate", str(tmp_path / "old"), "--n-cells", "2", "--out", "g.h5ad"])
    assert rc == 2 and "trust" in capsys.readouterr().err
    assert not marker.exists()


def test_the_registry_readers_inherited_from_scvi_tools_never_unpickle(pca_model, tmp_path, capsys):
    # scvi-tools' load_registry / view_setup_args torch.load model.pt: a planted one ran
    pca_model.save(tmp_path / "m")
    marker = tmp_path / "marker"
    (tmp_path / "m" / "model.pt").write_bytes(malicious_pickle(marker))
    registry = sb.BranchedDiffusion.load_registry(tmp_path / "m")
    assert registry["setup_args"]["labels_key"] == "cell_type"
    sb.BranchedDiffusion.view_setup_args(tmp_path / "m")
    assert "cell_type" in capsys.readouterr().out
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.pt").write_bytes(malicious_pickle(marker))
    for read in (sb.BranchedDiffusion.load_registry, sb.BranchedDiffusion.view_setup_args):
        with pytest.raises(UntrustedModelError, match="scbranch convert"):
            read(tmp_path / "old")
    with pytest.raises(FileNotFoundError, match="holds no 'model.json'"):
        sb.BranchedDiffusion.load_registry(tmp_path)  # not a model directory
    with pytest.raises(ValueError, match="convert_legacy"):
        sb.BranchedDiffusion.convert_legacy_save(tmp_path / "old", tmp_path / "new")
    assert not marker.exists() and not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda doc: doc["content"].pop("attributes"),
        lambda doc: doc.update(content=[1, 2]),
        lambda doc: doc["content"]["attributes"].update(module=5),
        lambda doc: doc["content"]["attributes"].update(generate="x"),
    ],
    ids=["no attributes", "a list", "module replaced", "method replaced"],
)
def test_a_damaged_model_record_is_refused_as_corrupt(pca_model, tmp_path, damage):
    import json

    pca_model.save(tmp_path / "m")
    path = tmp_path / "m" / "model.json"
    doc = json.loads(path.read_text())
    damage(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="corrupt"):
        sb.BranchedDiffusion.load(tmp_path / "m")


def test_the_nested_scvi_model_is_read_as_plain_data(scvi_model, tmp_path):
    scvi_model.save(tmp_path / "s")
    scvi_files = sorted(p.name for p in (tmp_path / "s" / "scvi").iterdir())
    assert scvi_files == ["config.json", "config.npz", "model.safetensors"]
    modes = {p.stat().st_mode & 0o777 for p in (tmp_path / "s").rglob("*") if p.is_file()}
    assert len(modes) == 1, modes
    loaded = sb.BranchedDiffusion.load(tmp_path / "s")
    np.testing.assert_array_equal(
        _cells(scvi_model).layers["counts"].toarray(), _cells(loaded).layers["counts"].toarray()
    )
    marker = tmp_path / "marker"
    # scvi-tools' own file name is never read, so a pickle there cannot run ...
    (tmp_path / "s" / "scvi" / "model.pt").write_bytes(malicious_pickle(marker))
    sb.BranchedDiffusion.load(tmp_path / "s")
    assert not marker.exists()
    # ... and one in the weights scbranch reads is refused, not run
    (tmp_path / "s" / "scvi" / "model.safetensors").write_bytes(malicious_pickle(marker))
    with pytest.raises(ValueError, match="not a tensor file"):
        sb.BranchedDiffusion.load(tmp_path / "s")
    assert not marker.exists()


@pytest.mark.parametrize("which", ["pca", "scvi"])
def test_old_models_load_only_when_trusted_and_convert_once(
    which, pca_model, scvi_model, tmp_path, capsys
):
    model = pca_model if which == "pca" else scvi_model
    save_legacy(model, tmp_path / "old")
    with pytest.raises(UntrustedModelError, match="scbranch < 0.2"):
        sb.BranchedDiffusion.load(tmp_path / "old")
    trusted = sb.BranchedDiffusion.load(tmp_path / "old", trust_pickle=True)
    # the legacy format never held the negative binomial of residual_noise="nb" (the current
    # PCA default with counts), so both decode the way legacy models did
    kwargs = {} if which == "scvi" else {"counts": True, "residual_noise": False}
    expected = _cells(model, **kwargs)
    got = _cells(trusted, **kwargs)
    np.testing.assert_array_equal(
        expected.layers["counts"].toarray(), got.layers["counts"].toarray()
    )
    # the CLI converts only with the explicit flag
    assert main(["convert", str(tmp_path / "old"), "--out", str(tmp_path / "new")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    rc = main(["convert", str(tmp_path / "old"), "--out", str(tmp_path / "new"), "--trust-pickle"])
    assert rc == 0
    converted = sb.BranchedDiffusion.load(tmp_path / "new")  # no flag needed any more
    again = _cells(converted, **kwargs)
    np.testing.assert_array_equal(
        expected.obsm[model.space.output_key], again.obsm[model.space.output_key]
    )
    assert not list((tmp_path / "new").rglob("*.pt"))
    # an already converted model: nothing to convert (no claim that it would be unpickled)
    assert main(["convert", str(tmp_path / "new"), "--out", str(tmp_path / "x")]) == 2
    assert "already in today's format" in capsys.readouterr().err
    # --overwrite replaces the model's files only: never the old model or other files in --out
    (tmp_path / "readme.txt").write_text("mine")
    argv = ["convert", str(tmp_path / "old"), "--trust-pickle", "--overwrite", "--out"]
    assert main([*argv, str(tmp_path)]) == 2  # the directory holding the old model
    assert "holds" in capsys.readouterr().err
    (tmp_path / "new" / "notes.txt").write_text("mine too")
    assert main([*argv, str(tmp_path / "new")]) == 0
    assert (tmp_path / "readme.txt").read_text() == "mine"
    assert (tmp_path / "new" / "notes.txt").read_text() == "mine too"
    assert (tmp_path / "old" / "model.pt").is_file()
    shutil.rmtree(tmp_path / "old")


def test_variable_width_strings_from_a_zarr_store_save_as_plain_strings():
    # anndata reads string arrays of a .zarr store's uns as numpy 2's StringDType ("T"), and
    # fit on a store holding a hierarchy failed to save it ("Cannot save arrays of dtype")
    from scbranch.model._plain import pack, unpack

    names = np.array(["B cells", "NK"], dtype=np.dtypes.StringDType())
    value, arrays = pack({"classes": names})
    back = unpack(value, arrays)["classes"]
    assert back.dtype.kind == "U" and back.tolist() == ["B cells", "NK"]
