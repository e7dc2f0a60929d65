"""Golden cases: outputs of the model for fixed seeds, as fingerprints (run as a script).

``tests/test_golden.py`` runs this file in a fresh Python process and compares what it prints
with ``tests/golden/hashes.json``; ``python tests/golden/cases.py --record`` rewrites that file
(only when a behaviour change is meant; the commit says why).

Why a separate process: the float results of torch on CPU depend, in the last bit, on how the
OpenMP runtime was first initialised in the process (``torch.get_num_threads()`` before
``torch.set_num_threads(1)`` gives other roundings than the reverse), so pinned bits inside a
pytest session would depend on which tests ran first. Here threads are set before torch does
anything else.
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)  # first, before any other torch call (see the module docstring)

import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared test data

import anndata as ad  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from _counts import count_data  # noqa: E402

import scbranch as sb  # noqa: E402

HASHES = Path(__file__).parent / "hashes.json"
FAST = {"width": 32, "n_head_blocks": 1}
#: one head per branch (the default of scbranch 0.1), named so the pins do not depend on the default
BRANCHED = {"architecture": "branched", **FAST}
#: the probability-flow ODE, named so the pins do not depend on generate()'s default solver
ODE = "heun"
LABELS = "cell_type"

_out: dict[str, dict] = {}


def _dense(m) -> np.ndarray:
    if isinstance(m, str):  # a tree's Newick string, pinned like an array
        return np.frombuffer(m.encode(), dtype=np.uint8).astype(np.float32)
    m = m.toarray() if sp.issparse(m) else np.asarray(m)
    return np.ascontiguousarray(m, dtype=np.float32)


def fingerprint(m) -> dict:
    """SHA-256 of the float32 bytes, with shape, sum and first values (for the message)."""
    x = _dense(m)
    return {
        "sha256": hashlib.sha256(x.tobytes()).hexdigest(),
        "shape": list(x.shape),
        "sum": float(x.astype(np.float64).sum()),
        "head": [float(v) for v in x.ravel()[:4]],
    }


def _check(name: str, m) -> None:
    got = fingerprint(m)
    if name in _out and _out[name]["sha256"] != got["sha256"]:
        raise AssertionError(f"{name} differs between two computations in the same run")
    _out[name] = got


def _count_data(n_per_class: int = 40, n_genes: int = 40, seed: int = 0) -> ad.AnnData:
    """Negative-binomial counts of 4 types on a known tree, log-normalised, with a PCA."""
    return count_data(n_per_class, n_genes, seed, labels=LABELS)


def _train(model) -> None:
    model.train(max_epochs=3, batch_size=32, accelerator="cpu", enable_progress_bar=False)


def pca_model():
    import scvi

    scvi.settings.seed = 0
    adata = _count_data()
    sb.BranchedDiffusion.setup_anndata(
        adata, labels_key=LABELS, obsm_key="X_pca", counts_layer="counts"
    )
    model = sb.BranchedDiffusion(adata, **BRANCHED)
    _train(model)
    return model, adata


def case_pca_space_generation_with_counts(pca_model):
    model, _ = pca_model
    _check("pca.tree", model.tree.to_newick(6))
    gen = model.generate(solver=ODE, n_cells=9, seed=3, counts=True, progress_bar=False)
    _check("pca.latent", gen.obsm["X_pca"])
    _check("pca.X", gen.X)
    _check("pca.counts", gen.layers["counts"])
    _check("pca.size_factor", gen.obs["scbranch_size_factor"].to_numpy())
    noisy = model.generate(
        n_cells=5, seed=4, residual_noise=True, solver="dpm2m", n_steps=12, progress_bar=False
    )
    _check("pca.residual_dpm2m.X", noisy.X)
    sde = model.generate(
        n_cells=5, seed=5, solver="pc", n_steps=20, share=False, progress_bar=False
    )
    _check("pca.pc_unshared.latent", sde.obsm["X_pca"])
    em = model.generate(n_cells=9, seed=3, solver="em", progress_bar=False)
    _check("pca.em.latent", em.obsm["X_pca"])


def case_pca_space_interpretation(pca_model):
    model, adata = pca_model
    cells = adata[adata.obs[LABELS] == "c0"][:6].copy()
    ode = model.transmute(cells, "c1", mode="ode", n_checkpoints=3, n_steps=10, progress_bar=False)
    _check("pca.transmute_ode.state", ode.obsm["scbranch_state"])
    _check("pca.transmute_ode.X", ode.X)
    assert ode.obs["phase"].astype(str).tolist()[:5] == [
        "source", "up", "branch point", "down", "endpoint",
    ]  # fmt: skip
    sde = model.transmute(
        cells, "c3", mode="sde", n_checkpoints=3, n_steps=10, seed=2, progress_bar=False
    )
    _check("pca.transmute_sde.latent", sde.obsm["X_pca"])
    hy = model.hybrids("c0", "c2", n_cells=4, seed=6, n_steps=10, progress_bar=False)
    _check("pca.hybrids.latent", hy.obsm["X_pca"])
    _check("pca.hybrids.branch_state", hy.obsm["scbranch_branch_state"])
    tr = model.generate(
        solver=ODE,
        n_cells=3,
        seed=7,
        n_steps=10,
        trajectory_times=[1.0, 0.5, 0.0],
        progress_bar=False,
    )
    _check("pca.trajectories.X", tr.X)
    _check("pca.trajectories.state", tr.obsm["scbranch_state"])


def case_pca_space_save_load_and_extension(pca_model, tmp_path: Path):
    model, adata = pca_model
    model.save(tmp_path / "m")
    loaded = sb.BranchedDiffusion.load(tmp_path / "m")
    again = loaded.generate(solver=ODE, n_cells=9, seed=3, counts=True, progress_bar=False)
    _check("pca.counts", again.layers["counts"])  # the same pin as before saving
    # extension: a fifth type placed on the tree and trained alone
    new = _count_data(seed=1)
    new = new[new.obs[LABELS] == "c2"].copy()
    new.obs[LABELS] = pd.Categorical(["c9"] * new.n_obs)
    # the new cells in the model's latent space: the training PCA applied to their genes
    loadings = np.asarray(adata.varm["PCs"])
    mean = np.asarray(adata.X.mean(0)).ravel()
    new.obsm["X_pca"] = (_dense(new.X) - mean) @ loadings
    loaded.add_classes(new, labels=["c9"], max_epochs=2, seed=0, progress_bar=False)
    # the old types after extension (unchanged: zero forgetting) and the new one (its head's
    # training recipe is pinned here)
    old = loaded.generate(
        solver=ODE, n_cells=5, labels=["c0", "c1", "c2", "c3"], seed=8, progress_bar=False
    )
    _check("pca.extended.old_types", old.obsm["X_pca"])
    new = loaded.generate(solver=ODE, n_cells={"c9": 5}, seed=8, progress_bar=False)
    _check("pca.extended.new_type", new.obsm["X_pca"])
    _check("pca.extended.tree", loaded.tree.to_newick(6))


def expression_model():
    import scvi

    scvi.settings.seed = 0
    adata = _count_data(n_genes=24)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key=LABELS, counts_layer="counts")
    model = sb.BranchedDiffusion(adata, **BRANCHED)
    _train(model)
    return model, adata


def case_expression_space(expression_model, tmp_path: Path):
    model, adata = expression_model
    gen = model.generate(solver=ODE, n_cells=7, seed=1, counts=True, progress_bar=False)
    _check("expression.X", gen.X)
    _check("expression.counts", gen.layers["counts"])
    cells = adata[adata.obs[LABELS] == "c3"][:4].copy()
    tm = model.transmute(cells, "c2", n_checkpoints=2, n_steps=8, progress_bar=False)
    _check("expression.transmute.X", tm.X)
    model.save(tmp_path / "e")
    loaded = sb.BranchedDiffusion.load(tmp_path / "e", adata=adata)
    _check("expression.X", loaded.generate(solver=ODE, n_cells=7, seed=1, progress_bar=False).X)


def scvi_space_model():
    import scvi

    scvi.settings.seed = 0
    adata = _count_data(n_genes=30)
    vae = sb.model.fit_scvi(adata, counts_layer="counts", max_epochs=2, n_latent=4)
    model = sb.BranchedDiffusion.from_scvi_model(vae, labels_key=LABELS, adata=adata, **BRANCHED)
    _train(model)
    return model, adata


def case_scvi_space(scvi_space_model, tmp_path: Path):
    model, adata = scvi_space_model
    gen = model.generate(solver=ODE, n_cells=6, seed=2, progress_bar=False)
    _check("scvi.latent", gen.obsm["X_scVI"])
    _check("scvi.counts", gen.layers["counts"])
    _check("scvi.scale", gen.layers["scale"])
    _check("scvi.library", gen.obs["scbranch_library_size"].to_numpy())
    cells = adata[adata.obs[LABELS] == "c1"][:4].copy()
    tm = model.transmute(cells, "c0", n_checkpoints=2, n_steps=8, progress_bar=False)
    _check("scvi.transmute.X", tm.X)
    model.save(tmp_path / "s")
    loaded = sb.BranchedDiffusion.load(tmp_path / "s")
    _check(
        "scvi.counts",
        loaded.generate(solver=ODE, n_cells=6, seed=2, progress_bar=False).layers["counts"],
    )


def _small_pca_model(architecture: str):
    """A trained PCA-space model of the given architecture on 20 cells per type."""
    import scvi

    scvi.settings.seed = 0
    adata = _count_data(n_per_class=20)
    sb.BranchedDiffusion.setup_anndata(adata, labels_key=LABELS, obsm_key="X_pca")
    model = sb.BranchedDiffusion(adata, architecture=architecture, **FAST)
    _train(model)
    return model, adata


def case_flat_model():
    model, _ = _small_pca_model("flat")
    gen = model.generate(solver=ODE, n_cells=5, seed=0, n_steps=10, progress_bar=False)
    _check("flat.X", gen.X)


def case_conditioned_model(tmp_path: Path):
    """The branch-conditioned network: generation, save/load, extension keeping old bits."""
    model, adata = _small_pca_model("conditioned")
    gen = model.generate(solver=ODE, n_cells=5, seed=0, n_steps=10, progress_bar=False)
    _check("conditioned.latent", gen.obsm["X_pca"])
    model.save(tmp_path / "c")
    loaded = sb.BranchedDiffusion.load(tmp_path / "c")
    again = loaded.generate(solver=ODE, n_cells=5, seed=0, n_steps=10, progress_bar=False)
    _check("conditioned.latent", again.obsm["X_pca"])
    new = _count_data(n_per_class=20, seed=1)
    new = new[new.obs[LABELS] == "c1"].copy()
    new.obs[LABELS] = pd.Categorical(["c9"] * new.n_obs)
    loadings = np.asarray(adata.varm["PCs"])
    mean = np.asarray(adata.X.mean(0)).ravel()
    new.obsm["X_pca"] = (_dense(new.X) - mean) @ loadings
    loaded.add_classes(new, labels=["c9"], max_epochs=2, seed=0, progress_bar=False)
    old = loaded.generate(
        solver=ODE,
        n_cells=5,
        labels=["c0", "c1", "c2", "c3"],
        seed=0,
        n_steps=10,
        progress_bar=False,
    )
    _check("conditioned.latent", old.obsm["X_pca"])  # zero forgetting: the same pin
    added = loaded.generate(solver=ODE, n_cells={"c9": 5}, seed=8, n_steps=10, progress_bar=False)
    _check("conditioned.extended.new_type", added.obsm["X_pca"])


def run_all() -> dict[str, dict]:
    """Every case, in a fixed order; returns name -> fingerprint."""
    import scvi

    logging_quiet()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        scvi.settings.logging_dir = tmp_path
        import os

        os.chdir(tmp_path)  # lightning_logs land here
        pca = pca_model()
        case_pca_space_generation_with_counts(pca)
        case_pca_space_interpretation(pca)
        case_pca_space_save_load_and_extension(pca, tmp_path)
        case_expression_space(expression_model(), tmp_path)
        case_scvi_space(scvi_space_model(), tmp_path)
        case_flat_model()
        case_conditioned_model(tmp_path)
    return dict(_out)


def logging_quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("scbranch", "scvi", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    result = run_all()
    if "--record" in sys.argv:
        HASHES.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(result)} fingerprints in {HASHES}", file=sys.stderr)
    print(json.dumps(result))
