"""The space interface: what the model asks of a representation, and the registry of spaces."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from ..._constants import REGISTRY_KEYS
from ..._validation import (
    get_matrix,
)


def check_noise(residual_noise) -> bool | str:
    """``residual_noise`` of a generate call as ``False``, ``True`` (Gaussian) or ``"nb"``.

    Examples
    --------
    >>> check_noise("gaussian"), check_noise("nb"), check_noise(None)
    (True, 'nb', False)
    """
    if residual_noise is None or isinstance(residual_noise, bool | np.bool_):
        return bool(residual_noise)
    if residual_noise in ("gaussian", "nb"):
        return True if residual_noise == "gaussian" else "nb"
    raise ValueError(
        f"residual_noise must be False, True (or 'gaussian': Gaussian noise per gene), 'nb' "
        f"(negative binomial counts around the decoded mean) or 'auto' (generate's default), "
        f"got {residual_noise!r}."
    )


def auto_noise(space: Space, residual_noise, trajectories: bool) -> bool | str:
    """``residual_noise`` of a generate call with ``"auto"`` replaced by the space's default.

    Trajectories record clean estimates, so ``"auto"`` means no noise for them.

    Examples
    --------
    >>> auto_noise(Space(), "auto", trajectories=False), auto_noise(Space(), "nb", False)
    (False, 'nb')
    """
    if isinstance(residual_noise, str) and residual_noise == "auto":
        return False if trajectories else space.default_noise
    return residual_noise


@dataclass
class Decoded:
    """What generated coordinates become in an AnnData.

    Parameters
    ----------
    X
        Decoded expression (cells x genes, dense or sparse), or `None` when the space has no
        map to genes.
    var_names
        Names of the genes of ``X`` and of the layers, or `None`.
    layers
        Further per-cell matrices by layer name (e.g. ``"counts"``).
    obs
        Per-cell ``obs`` columns by name (e.g. size factors or library sizes).

    Examples
    --------
    >>> out = Decoded(X=np.zeros((2, 3)), var_names=np.array(["a", "b", "c"]))
    >>> out.X.shape, out.layers
    ((2, 3), {})
    """

    X: np.ndarray | sp.spmatrix | None = None
    var_names: np.ndarray | None = None
    layers: dict = field(default_factory=dict)
    obs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TopologySource:
    """Where a model learns its tree's topology when its branch times come from another matrix.

    Parameters
    ----------
    matrix
        The (dense, sparse or streamed) matrix the topology is discovered on.
    use_rep, layer, target_sum
        The arguments of ``sb.tl.branch_hierarchy`` that discover a tree on ``matrix``: a
        hierarchy stored with them gives its topology to the model.
    mismatch
        Why a hierarchy stored with those arguments was not computed on ``matrix`` (the
        genes differ), or `None` when it was.

    Examples
    --------
    >>> source = TopologySource(np.eye(2), None, "counts", 1e4)
    >>> source.rep
    (None, 'counts', 10000.0)
    """

    matrix: object
    use_rep: str | None
    layer: str | None
    target_sum: float | None
    mismatch: str | None = None

    @property
    def rep(self) -> tuple[str | None, str | None, float | None]:
        """``(use_rep, layer, target_sum)``, as ``Space.hierarchy_rep`` gives them."""
        return self.use_rep, self.layer, self.target_sum


class Space:
    """Base class: the few operations the model needs from a representation.

    Subclasses set :attr:`name` and implement :meth:`fit`, :attr:`n_input`, :meth:`encode`,
    :meth:`decode`, :meth:`state` and :meth:`from_state`; the rest has defaults for a space
    with no genes and no counts.

    Parameters
    ----------
    obsm_key
        ``adata.obsm`` key of the representation (latent spaces), or `None`.
    layer
        Layer of log-normalised expression (expression spaces; for PCA spaces the expression
        the PCA was computed on), or `None` for ``.X``.

    Examples
    --------
    A new space is one subclass (``tests/test_spaces.py`` has a complete one):

    >>> from scbranch.model import PcaSpace, register_space
    >>> @register_space
    ... class MyLatent(PcaSpace):
    ...     name = "doctest-my-latent"
    >>> model = sb.BranchedDiffusion(adata, space="doctest-my-latent")  # doctest: +SKIP
    """

    #: name in :data:`SPACES` and in saved models
    name: ClassVar[str] = ""

    def __init__(self, *, obsm_key: str | None = None, layer: str | None = None):
        self.obsm_key = obsm_key
        self.layer = layer

    # ------------------------------------------------------------------ set-up
    @classmethod
    def fit(
        cls, adata: AnnData, setup: Mapping, labels: np.ndarray, n_classes: int, **kwargs
    ) -> Space:
        """The space of the set-up data (``setup``: the registry's ``setup_args``)."""
        raise NotImplementedError

    @property
    def n_input(self) -> int:
        """Dimension of the diffused coordinates."""
        raise NotImplementedError

    @property
    def data_key(self) -> str:
        """Registry key of the diffused data in the training batches."""
        return REGISTRY_KEYS.REP_KEY if self.obsm_key else REGISTRY_KEYS.X_KEY

    def training_matrix(self, adata: AnnData):
        """The (dense or sparse) matrix of the set-up cells the diffusion learns."""
        # a latent's layer is what it decodes into, not what is diffused
        if self.obsm_key is not None:
            return get_matrix(adata, obsm_key=self.obsm_key)
        return get_matrix(adata, layer=self.layer)

    @property
    def hierarchy_rep(self) -> tuple[str | None, str | None, float | None]:
        """``(use_rep, layer, target_sum)`` of the hierarchy this space's model can reuse.

        The arguments of ``sb.tl.branch_hierarchy`` that learn a tree on the matrix this space
        diffuses.
        """
        return self.obsm_key, None if self.obsm_key else self.layer, None

    def topology_source(self, adata: AnnData) -> TopologySource | None:
        """Where the default tree's topology is learned, when not on ``hierarchy_rep``.

        `None` (the default): topology and branch times both come from the diffused matrix.
        """
        return None

    # ------------------------------------------------------------------ cells in
    def encode(self, adata: AnnData, what: str = "the cells") -> np.ndarray:
        """Cells of ``adata`` in the diffused coordinates, checked and finite."""
        raise NotImplementedError

    def class_data(self, adata: AnnData, what: str) -> tuple[np.ndarray, dict]:
        """Cells of a new type and the per-cell values the space keeps per type.

        Used by :meth:`~scbranch.BranchedDiffusion.add_classes` (library sizes, size factors).
        """
        return self.encode(adata, what), {}

    def add_class(self, extras: Mapping[str, np.ndarray]) -> None:
        """Keep what :meth:`~scbranch.model.Space.class_data` returned for a type that was added."""

    # ------------------------------------------------------------------ cells out
    @property
    def output_key(self) -> str | None:
        """``obsm`` key generated coordinates are written to (`None`: genes only)."""
        return self.obsm_key

    @property
    def var_names(self) -> np.ndarray | None:
        """Genes of decoded cells (`None`: the space has no map to genes)."""
        return None

    @property
    def default_noise(self) -> bool | str:
        """What ``generate(residual_noise="auto")`` means for this space (here: no noise)."""
        return False

    def resolve_options(
        self, *, counts: bool | None, batch: str | None, residual_noise: bool
    ) -> dict:
        """Checked ``counts``, ``batch`` and ``residual_noise`` of a generate call."""
        if residual_noise:
            raise ValueError(
                "residual_noise applies to models that decode a PCA to genes; this model "
                f"(diffusing {self.describe()}) has no PCA decoder."
            )
        if batch is not None:
            raise ValueError("`batch` applies to models decoded by scVI (from_scvi_model) only.")
        if counts:
            raise ValueError(
                "This model cannot generate counts: set the data up with `counts_layer=` "
                "(expression and PCA models) or build the model on an scVI model "
                "(`BranchedDiffusion.from_scvi_model`)."
            )
        return {"counts": False, "batch": None, "residual_noise": False}

    def layers_made(self, options: Mapping) -> list[str]:
        """Names of the layers :meth:`~scbranch.model.Space.decode` makes with ``options``.

        ``options`` are resolved options.
        """
        return []

    def decode(self, z: np.ndarray, codes: np.ndarray, options: Mapping, seed: int) -> Decoded:
        """Generated coordinates ``z`` of classes ``codes`` as expression, layers and obs.

        Each random part draws from its own stream derived from ``seed``, so the coordinates
        and the expression are identical whatever else is asked for.
        """
        return Decoded()

    def decode_estimates(self, z: np.ndarray) -> np.ndarray | None:
        """Deterministic expression of clean estimates (trajectories): no noise, no counts.

        Spaces with batches (scVI) also take ``batch=``, the batch to decode into; it is
        passed only when the user asked for one (``resolve_options`` resolved it).
        """
        return None

    def estimate_obs(self) -> dict:
        """``obs`` columns, the same for every row, that ``decode_estimates`` decodes with.

        Each value is a scalar or a one-element categorical (repeated for every row); spaces
        with batches take ``batch=`` as ``decode_estimates`` does.
        """
        return {}

    def bytes_per_cell(self, options: Mapping) -> int:
        """Peak memory decoding needs per generated cell, in bytes (an estimate)."""
        return 0

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict:
        """Plain values and numpy arrays to rebuild the space from (with ``from_state``)."""
        return {"obsm_key": self.obsm_key, "layer": self.layer}

    @classmethod
    def from_state(cls, state: Mapping, directory: Path | None = None, prefix: str = "") -> Space:
        """The space saved by ``state`` (and by ``save_files`` in ``directory``).

        See :meth:`~scbranch.model.Space.state` and :meth:`~scbranch.model.Space.save_files`.
        """
        return cls(obsm_key=state.get("obsm_key"), layer=state.get("layer"))

    def save_files(self, directory: Path, prefix: str = "") -> None:
        """Write files the state does not hold (a nested model's weights), as plain data."""

    def check_unchanged(self) -> None:
        """Raise if what the space decodes with changed since it was fitted (default: nothing).

        The scVI space's decoder is the user's scVI model, which could be trained further.
        """

    def attach(self, adata: AnnData, labels_key: str) -> None:
        """Add what this space reads to cells attached to a loaded model (default: nothing).

        ``load(dir, adata)`` calls it after checking the genes, before validating ``adata``
        against the model's set-up.
        """

    @property
    def nested_model(self):
        """A model the space decodes through (the scVI model), or `None`."""
        return None

    def to_device(self, device) -> None:
        """Move a nested model to ``device`` (the diffusion module moves with the model)."""

    def describe(self) -> str:
        """One line saying what the diffusion runs on."""
        return f"obsm[{self.obsm_key!r}]" if self.obsm_key else self.name

    def record(self, decoded: bool) -> dict:
        """The space's part of ``uns['scbranch']['model']`` of a generated AnnData."""
        return {
            "obsm_key": self.obsm_key or "",
            "layer": self.layer or "",
            "decoded": bool(decoded and self.obsm_key is not None),
            "space": self.describe(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


#: every space, by name
SPACES: dict[str, type[Space]] = {}


def register_space(cls: type[Space]) -> type[Space]:
    """Class decorator: make a :class:`~scbranch.model.Space` subclass available by its ``name``.

    Examples
    --------
    >>> from scbranch.model import SPACES, PcaSpace
    >>> @register_space
    ... class Identity(PcaSpace):
    ...     name = "doctest-identity"
    >>> "doctest-identity" in SPACES
    True
    """
    if not (isinstance(cls, type) and issubclass(cls, Space)) or not cls.name:
        raise TypeError("register_space takes a Space subclass with a `name`.")
    SPACES[cls.name] = cls
    return cls
