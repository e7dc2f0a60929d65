"""The Space interface: the model never asks which space it runs in; a new one is one class."""

import ast
from pathlib import Path

import numpy as np
import pytest

import scbranch as sb
from scbranch.model import SPACES, Decoded, Space, register_space

FAST = {"width": 32, "n_head_blocks": 1}


@register_space
class ToyIdentitySpace(Space):
    """A toy latent decoded as itself: each dimension is a "gene"."""

    name = "toy-identity"

    def __init__(self, *, n_dims: int, **kwargs):
        super().__init__(**kwargs)
        self.n_dims = int(n_dims)

    @classmethod
    def fit(cls, adata, setup, labels, n_classes, **kwargs):
        return cls(obsm_key=setup["obsm_key"], n_dims=adata.obsm[setup["obsm_key"]].shape[1])

    @property
    def n_input(self):
        return self.n_dims

    @property
    def var_names(self):
        return np.array([f"dim{i}" for i in range(self.n_dims)])

    def encode(self, adata, what="the cells"):
        return np.asarray(adata.obsm[self.obsm_key], dtype=np.float64)

    def decode(self, z, codes, options, seed):
        return Decoded(X=np.asarray(z, dtype=np.float32), var_names=self.var_names)

    def decode_estimates(self, z):
        return np.asarray(z, dtype=np.float32)

    def state(self):
        return {**super().state(), "n_dims": self.n_dims}

    @classmethod
    def from_state(cls, state, directory=None, prefix=""):
        return cls(obsm_key=state["obsm_key"], n_dims=state["n_dims"])


@pytest.fixture(scope="module")
def toy_model():
    adata = sb.datasets.simulate_tree(depth=2, n_per_class=40, dim=6, seed=0).to_anndata()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    model = sb.BranchedDiffusion(adata, space="toy-identity", **FAST)
    model.train(max_epochs=2, enable_progress_bar=False)
    return model, adata


def test_a_new_space_trains_generates_and_interprets(toy_model):
    model, adata = toy_model
    assert isinstance(model.space, ToyIdentitySpace) and "toy-identity" in SPACES
    gen = model.generate(n_cells=5, seed=0, progress_bar=False)
    assert gen.shape == (20, 6) and list(gen.var_names) == [f"dim{i}" for i in range(6)]
    np.testing.assert_array_equal(gen.X, gen.obsm["X_latent"])
    tm = model.transmute(adata[adata.obs["cell_type"] == "c0"][:3].copy(), "c1", n_steps=6)
    assert tm.n_obs == 3 * 9 and tm.n_vars == 6
    assert gen.uns["scbranch"]["model"]["space"] == "obsm['X_latent']"


def test_a_new_space_saves_and_loads(toy_model, tmp_path):
    model, _ = toy_model
    model.save(tmp_path / "toy")
    loaded = sb.BranchedDiffusion.load(tmp_path / "toy")
    assert isinstance(loaded.space, ToyIdentitySpace)
    a = model.generate(n_cells=4, seed=1, progress_bar=False)
    b = loaded.generate(n_cells=4, seed=1, progress_bar=False)
    np.testing.assert_array_equal(a.X, b.X)


def test_an_unregistered_space_is_refused(tmp_path):
    adata = sb.datasets.simulate_tree(depth=1, n_per_class=20, dim=4).to_anndata()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_latent")
    with pytest.raises(ValueError, match="Unknown space 'nowhere'"):
        sb.BranchedDiffusion(adata, space="nowhere", **FAST)
    with pytest.raises(TypeError, match="Space subclass"):
        register_space(dict)


def test_the_model_class_does_not_know_the_kinds_of_space():
    path = Path(sb.model._model.__file__)
    source = path.read_text()
    assert len(source.splitlines()) < 800
    tree = ast.parse(source)
    # from_scvi_model is the scVI space's own constructor (as scvi-tools' from_scvi_model)
    body = [
        n
        for n in ast.walk(tree)
        if not (isinstance(n, ast.FunctionDef) and n.name == "from_scvi_model")
    ]
    inside = {id(x) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)
              and n.name == "from_scvi_model" for x in ast.walk(n)}  # fmt: skip
    names = {n.id for n in body if isinstance(n, ast.Name) and id(n) not in inside}
    attributes = {n.attr for n in body if isinstance(n, ast.Attribute) and id(n) not in inside}
    kinds = {"PcaSpace", "ScviSpace", "ExpressionSpace"}
    assert not names & kinds
    # no reading of what only one space has
    assert not attributes & {"decoder", "vae", "info", "library_sizes", "counts", "genes"}
