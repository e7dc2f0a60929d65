"""Where the diffusion runs, and how cells get in and out: one ``Space`` per representation.

:class:`~scbranch.BranchedDiffusion` holds one :class:`Space` and never asks which kind it is.
A space is fitted on the set-up data, encodes cells into the diffused coordinates, decodes
generated coordinates into ``.X``, layers and ``obs`` columns, says whether it can make counts,
and saves its state as plain data and arrays. Spaces are found by name in :data:`SPACES`
(as moscot finds its solvers); a new representation is one new class::

    @register_space
    class MySpace(Space):
        name = "mine"
        ...

    model = BranchedDiffusion(adata, space="mine")

Shipped spaces:

* :class:`PcaSpace` (``"pca"``): a latent in ``obsm[obsm_key]``; when it is a PCA of the
  expression (scanpy's ``varm['PCs']`` reproduces it) generated cells are decoded to genes,
  optionally with the per-gene residual noise and, with a ``counts_layer``, to counts.
* :class:`ScviSpace` (``"scvi"``): an scVI model's latent means, decoded by scVI to normalised
  expression and counts sampled from its likelihood.
* :class:`ExpressionSpace` (``"expression"``): log-normalised genes themselves.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .._constants import REGISTRY_KEYS
from .._keys import Key
from .._validation import (
    check_counts,
    check_finite,
    check_genes,
    check_obs_key,
    check_rep_key,
    get_matrix,
    to_dense,
)
from ..io._rows import RowMatrix, is_on_disk, read_block, read_rows, row_sums
from ._counts import (
    class_pools,
    class_ratios,
    counts_from_expression,
    draw_from_pools,
    fit_negative_binomial,
    log_normalize,
    normalize_block,
    sample_negative_binomial,
    size_factors,
)
from ._decoding import decode, fit_pca_decoder, out_of_fold_source
from ._scvi import (
    SCVI_DIR,
    decode_latents,
    default_batch,
    latent_of,
    library_sizes_of,
    load_scvi_weights,
    save_scvi_weights,
    scvi_info,
)

logger = logging.getLogger(__name__)

#: library size of the normalised expression decoded from scVI latents along trajectories
SCVI_NORMALIZED_TOTAL = 1e4
#: set-up cells (a seeded subsample beyond this) the negative binomial decoder is fitted on
NB_FIT_CELLS = 5000


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


#: Largest mean count a negative binomial draw gets (a numerical bound for generated
#: outliers, far above any real gene: a whole 10x cell holds 1e3-1e5 counts)
MAX_MEAN_COUNT = 1e9


@dataclass
class Decoded:
    """What generated coordinates become in an AnnData.

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
        return get_matrix(adata, obsm_key=self.obsm_key, layer=self.layer)

    @property
    def hierarchy_rep(self) -> tuple[str | None, str | None]:
        """``(use_rep, layer)`` a hierarchy must have been discovered on to fit this space."""
        return self.obsm_key, None if self.obsm_key else self.layer

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
        """Deterministic expression of clean estimates (trajectories): no noise, no counts."""
        return None

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


def space_name(space: str | None, setup: Mapping, scvi_model) -> str:
    """The registered space a model uses: ``space`` if given, else inferred from the set-up."""
    if space is None:
        if scvi_model is not None:
            return ScviSpace.name
        return PcaSpace.name if setup.get("obsm_key") else ExpressionSpace.name
    if space not in SPACES:
        raise ValueError(f"Unknown space {space!r}; registered spaces are {sorted(SPACES)}.")
    return space


# ---------------------------------------------------------------------------- counts
class _SizeFactorCounts:
    """Counts from log-normalised expression through size factors observed in each class.

    ``counts_layer`` names the layer of raw counts behind the expression, or is `None` when
    the model normalises raw counts itself (``target_sum``): the factors are then the cells'
    totals over ``target_sum``.
    """

    def __init__(self, counts_layer: str | None, pools: list, nb: dict | None = None):
        self.counts_layer = counts_layer
        self.pools = list(pools)
        #: per-gene negative binomial around the decoded mean (``fit_negative_binomial``)
        self.nb = nb

    @staticmethod
    def factors_of(adata: AnnData, counts_layer: str, layer: str | None, genes) -> np.ndarray:
        """Per-cell factor of ``layers[counts_layer]`` against the expression (checked)."""
        if counts_layer not in adata.layers:
            raise KeyError(
                f"The model generates counts from adata.layers[{counts_layer!r}], which adata "
                f"lacks (layers: {list(adata.layers.keys())})."
            )
        counts = adata.layers[counts_layer]
        expression = adata.layers[layer] if layer else adata.X
        columns = check_genes(adata, genes, "the model")
        if not np.array_equal(columns, np.arange(adata.n_vars)):
            counts, expression = counts[:, columns], expression[:, columns]
        where = f"adata.layers[{counts_layer!r}]"
        check_finite(counts, where)
        check_counts(counts, where)
        return size_factors(counts, expression)

    def decode(self, x: np.ndarray, codes: np.ndarray, seed: int, out: Decoded) -> None:
        factors = draw_from_pools(self.pools, codes, np.random.default_rng([seed, 2]))
        out.layers[Key.layers.COUNTS] = counts_from_expression(
            x, factors, np.random.default_rng([seed, 3])
        )
        out.obs[Key.obs.SIZE_FACTOR] = factors

    def decode_negative_binomial(
        self, x: np.ndarray, codes: np.ndarray, seed: int, out: Decoded, keep_counts: bool
    ) -> None:
        """Counts drawn around the decoded profiles ``x``; ``out.X`` their log-normalisation.

        The cell's size factor comes from its class (as for ``counts=True``), the mean is the
        gene's scaled decoded mean times its class's ratio for the gene (what the class holds
        outside the latent, ``class_ratios``) and the noise the gene's fitted negative
        binomial, so the cells carry the counting noise and the variation the latent leaves
        out, as scVI's cells do. ``.X`` is ``log1p(counts / total * target_sum)``, like the
        set-up data (:class:`PcaSpace` then sets its PC scores back to the generated ones).
        """
        nb = self.nb
        factors = draw_from_pools(self.pools, codes, np.random.default_rng([seed, 2]))
        # A generated outlier far outside the data made Poisson rates numpy cannot draw ("lam
        # value too large", a model trained for 8,000 steps on pbmc68k_reduced); no real gene
        # comes near this many counts, so real-looking cells are untouched. expm1 stays finite
        # below 700 (a gene with scale 0 must give 0, not inf * 0); the products may overflow to
        # inf, which the bound takes back.
        with np.errstate(over="ignore"):
            mu = factors[:, None] * np.expm1(np.clip(x, 0.0, 700.0, dtype=np.float64))
            mu = mu * nb["scale"]
            if "class_ratio" in nb:  # models saved before the class ratios: the global mean
                mu = mu * nb["class_ratio"][codes]
            mu = np.minimum(mu, MAX_MEAN_COUNT)
        counts = sample_negative_binomial(
            mu, nb["inverse_dispersion"], np.random.default_rng([seed, 4])
        )
        totals = np.maximum(counts.sum(1, keepdims=True), 1.0)
        out.X = np.log1p(counts * (nb["target_sum"] / totals)).astype(np.float32)
        if keep_counts:
            out.layers[Key.layers.COUNTS] = sp.csr_matrix(counts)
        out.obs[Key.obs.SIZE_FACTOR] = factors

    def state(self) -> dict:
        """Plain values and arrays (the counts part of a gene space's state)."""
        state = {"counts_layer": self.counts_layer or "", "size_factors": self.pools}
        if self.nb is not None:
            state["negative_binomial"] = self.nb
        return state


class _GeneSpace(Space):
    """Shared by the spaces that decode to log-normalised genes (PCA and expression)."""

    def __init__(self, *, counts: _SizeFactorCounts | None = None, **kwargs):
        super().__init__(**kwargs)
        self.counts = counts

    def _fit_counts(self, adata, setup, labels, n_classes) -> np.ndarray | None:
        """Size factors per class for counts; returns every set-up cell's factor."""
        factors = None
        if setup.get("target_sum"):
            factors = self._normalized_factors(adata)
            self.counts = _SizeFactorCounts(None, class_pools(factors, labels, n_classes))
        elif setup.get("counts_layer"):
            factors = _SizeFactorCounts.factors_of(
                adata, setup["counts_layer"], self.layer, self.var_names
            )
            self.counts = _SizeFactorCounts(
                setup["counts_layer"], class_pools(factors, labels, n_classes)
            )
        return factors

    def resolve_options(self, *, counts, batch, residual_noise) -> dict:  # noqa: D102
        if batch is not None:
            raise ValueError("`batch` applies to models decoded by scVI (from_scvi_model) only.")
        noise = check_noise(residual_noise)
        if counts and self.counts is None:
            return super().resolve_options(counts=True, batch=None, residual_noise=False)
        if noise == "nb" and (self.counts is None or self.counts.nb is None):
            raise ValueError(
                "residual_noise='nb' draws counts around the decoded mean and needs the raw "
                "counts at set-up: call `setup_anndata(..., counts_layer='counts')` (the layer "
                "with the counts behind the expression the PCA was computed on) and build the "
                "model again."
            )
        return {"counts": bool(counts), "batch": None, "residual_noise": noise}

    def layers_made(self, options) -> list[str]:  # noqa: D102
        return [Key.layers.COUNTS] if options.get("counts") else []

    def bytes_per_cell(self, options) -> int:  # noqa: D102
        genes = 0 if self.var_names is None else len(self.var_names)
        # float32 expression and its copies; counts: float64 values, floor, draws, sum
        return genes * (12 + (36 if options.get("counts") else 0))

    def _with_counts(self, x, codes, options, seed) -> Decoded:
        out = Decoded(X=x, var_names=self.var_names)
        if options.get("counts"):
            self.counts.decode(x, codes, seed, out)
        return out

    def _normalized_factors(self, adata) -> np.ndarray:
        """Size factors of raw counts the model normalises itself (target_sum models)."""
        raise NotImplementedError

    def class_data(self, adata, what):  # noqa: D102
        extras = {}
        if self.counts is not None and self.counts.counts_layer is None:
            extras["size_factors"] = self._normalized_factors(adata)
        elif self.counts is not None:
            extras["size_factors"] = _SizeFactorCounts.factors_of(
                adata, self.counts.counts_layer, self.layer, self.var_names
            )
        return self.encode(adata, what), extras

    def add_class(self, extras) -> None:  # noqa: D102
        if self.counts is not None:
            new = class_pools(extras["size_factors"], np.zeros(len(extras["size_factors"]), int), 1)
            self.counts.pools = [*self.counts.pools, *new]

    @property
    def default_noise(self) -> bool | str:
        """``"nb"`` when a negative binomial was fitted at set-up, else no noise.

        The negative binomial is fitted for a PCA decoded to genes set up with
        ``counts_layer``. New real cells decoded from their PC scores that way score like real
        cells (pbmc3k AUROC 0.50 vs 0.61 without, control 0.50); trained models on out-of-fold
        scores move toward them (0.58 vs 0.67; docs/benchmarks/noise_models.md).
        """
        has_nb = self.counts is not None and self.counts.nb is not None
        return "nb" if has_nb else False

    def state(self) -> dict:  # noqa: D102
        counts = self.counts.state() if self.counts is not None else {}
        return {**super().state(), **counts}

    @staticmethod
    def _counts_from_state(state: Mapping) -> _SizeFactorCounts | None:
        if "size_factors" not in state:
            return None
        nb = state.get("negative_binomial")
        if nb is not None:
            nb = {
                "scale": np.asarray(nb["scale"], dtype=np.float32),
                "inverse_dispersion": np.asarray(nb["inverse_dispersion"], dtype=np.float32),
                "target_sum": float(nb["target_sum"]),
            }
            if "class_ratio" in state["negative_binomial"]:
                nb["class_ratio"] = np.asarray(
                    state["negative_binomial"]["class_ratio"], dtype=np.float32
                )
        return _SizeFactorCounts(state.get("counts_layer") or None, list(state["size_factors"]), nb)


@register_space
class PcaSpace(_GeneSpace):
    """A latent in ``obsm[obsm_key]``, decoded to genes when it is a PCA of the expression.

    scanpy's ``sc.pp.pca`` stores the loadings but not the centring mean; the decoder recovers
    it (``fit_pca_decoder``) and is kept only if it reproduces
    the stored coordinates. Without a decoder, generated cells carry the latent only.

    Parameters
    ----------
    obsm_key
        ``obsm`` key of the latent.
    layer
        The expression the PCA was computed on (`None`: ``.X``).
    n_dims
        Dimension of the latent.
    decoder
        The PCA map (loadings, mean, genes, residual sd), or `None`.
    counts
        Size factors per class for counts, or `None`.

    Examples
    --------
    The space of a model set up with ``obsm_key`` (built by the model, not by hand):

    >>> sb.BranchedDiffusion.setup_anndata(  # doctest: +SKIP
    ...     adata, labels_key="cell_type", obsm_key="X_pca"
    ... )
    >>> sb.BranchedDiffusion(adata).space  # doctest: +SKIP
    PcaSpace(obsm['X_pca'])
    """

    name = "pca"

    def __init__(
        self,
        *,
        n_dims: int,
        decoder: dict | None = None,
        scores_of: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.n_dims = int(n_dims)
        self.decoder = decoder
        #: the in-sample PCA key when ``obsm_key`` holds its out-of-fold scores
        #: (``tl.pca_out_of_fold``), else `None`
        self.scores_of = scores_of

    @classmethod
    def fit(cls, adata, setup, labels, n_classes, **kwargs):  # noqa: D102
        obsm_key = setup["obsm_key"]
        n_dims = np.asarray(adata.obsm[obsm_key]).shape[1]
        space = cls(
            obsm_key=obsm_key,
            layer=setup.get("layer"),
            n_dims=n_dims,
            scores_of=out_of_fold_source(adata, obsm_key),
        )
        space.decoder = fit_pca_decoder(adata, obsm_key, space.layer)
        if setup.get("counts_layer") and space.decoder is None:
            warnings.warn(
                f"counts_layer={setup['counts_layer']!r} is ignored: obsm[{obsm_key!r}] has no "
                "map back to genes, so generated cells have no expression to turn into counts.",
                UserWarning,
                stacklevel=4,
            )
        elif setup.get("counts_layer"):
            factors = space._fit_counts(adata, setup, labels, n_classes)
            space.counts.nb = space._fit_negative_binomial(
                adata, setup["counts_layer"], factors, labels, n_classes
            )
        return space

    def _fit_negative_binomial(
        self,
        adata,
        counts_layer: str,
        factors: np.ndarray,
        labels: np.ndarray | None,
        n_classes: int,
    ) -> dict:
        """Per-gene negative binomial of counts around the decoded PCA (``residual_noise="nb"``).

        Fitted on at most :data:`NB_FIT_CELLS` set-up cells (seeded), with a ratio per class
        and gene for what the class holds outside the PCs (none with ``labels=None``).
        """
        n = adata.n_obs
        rows = np.sort(np.random.default_rng(0).choice(n, min(NB_FIT_CELLS, n), replace=False))
        columns = check_genes(adata, self.var_names, "the model")

        def rows_of(m):
            m = read_rows(m, rows) if is_on_disk(m) else m[rows]
            return to_dense(m[:, columns])

        z = np.asarray(get_matrix(adata, obsm_key=self.obsm_key)[rows], dtype=np.float32)
        return fit_negative_binomial(
            rows_of(adata.layers[counts_layer]),
            factors[rows],
            decode(self.decoder, z),
            rows_of(get_matrix(adata, layer=self.layer)),
            codes=None if labels is None else np.asarray(labels)[rows],
            n_classes=n_classes,
        )

    def class_data(self, adata, what):  # noqa: D102
        z, extras = super().class_data(adata, what)
        nb = None if self.counts is None else self.counts.nb
        if nb is not None and "class_ratio" in nb:
            # a new type's ratio per gene (fit_negative_binomial's class_ratio), from its
            # cells' observed counts and the counts their decoded means give
            columns = check_genes(adata, self.var_names, "the model")
            counts = get_matrix(adata, layer=self.counts.counts_layer)
            counts = read_block(counts, 0, counts.shape[0]) if is_on_disk(counts) else counts
            factors = extras["size_factors"].astype(np.float64)
            expected = np.expm1(np.clip(decode(self.decoder, z).astype(np.float64), 0.0, None))
            extras["observed_counts"] = sp.csr_matrix(counts[:, columns], dtype=np.float32)
            extras["decoded_counts"] = (factors[:, None] * expected * nb["scale"]).astype(
                np.float32
            )
        return z, extras

    def add_class(self, extras) -> None:  # noqa: D102
        super().add_class(extras)
        if "observed_counts" in extras:
            nb = self.counts.nb
            observed, decoded = extras["observed_counts"], extras["decoded_counts"]
            ratio = class_ratios(observed, decoded, np.zeros(observed.shape[0], int), 1)
            # a new dict: the known classes' rows stay as they are, bit for bit
            self.counts.nb = {
                **nb,
                "class_ratio": np.concatenate([nb["class_ratio"], ratio.astype(np.float32)]),
            }

    @property
    def n_input(self) -> int:  # noqa: D102
        return self.n_dims

    @property
    def var_names(self) -> np.ndarray | None:  # noqa: D102
        return None if self.decoder is None else self.decoder["var_names"]

    def encode(self, adata, what="the cells") -> np.ndarray:  # noqa: D102
        key = self.obsm_key
        if key not in adata.obsm and self.scores_of is not None and self.scores_of in adata.obsm:
            # New cells projected on the PCA (sc.tl.ingest, tl.embed_like(basis="pca")) have
            # out-of-sample scores already: what the learned out-of-fold scores stand for.
            logger.info("%s: obsm[%r] is missing; using obsm[%r].", what, key, self.scores_of)
            key = self.scores_of
        check_rep_key(adata, obsm_key=key)
        x = np.asarray(get_matrix(adata, obsm_key=key), dtype=np.float64)
        if x.shape[1] != self.n_dims:
            raise ValueError(
                f"adata.obsm[{self.obsm_key!r}] has {x.shape[1]} dimensions, the model "
                f"{self.n_dims}: {what} must be in the model's latent space (e.g. projected on "
                "the same PCA)."
            )
        check_finite(x, f"the representation of {what}")
        return x

    def resolve_options(self, *, counts, batch, residual_noise) -> dict:  # noqa: D102
        if residual_noise and self.decoder is None:
            raise ValueError(
                "residual_noise applies to models that decode a PCA to genes; this model "
                f"(diffusing obsm[{self.obsm_key!r}] without PCA loadings) has no PCA decoder."
            )
        return super().resolve_options(counts=counts, batch=batch, residual_noise=residual_noise)

    def decode(self, z, codes, options, seed) -> Decoded:  # noqa: D102
        if self.decoder is None:
            return Decoded()
        noise = options.get("residual_noise", False)
        x = decode(
            self.decoder, z, residual_noise=noise is True, rng=np.random.default_rng([seed, 1])
        )
        if noise == "nb":
            out = Decoded(var_names=self.var_names)
            self.counts.decode_negative_binomial(x, codes, seed, out, bool(options.get("counts")))
            # The generated scores already hold the within-PC spread real cells have, noise
            # included: noise added there again made new real cells' own scores, decoded this
            # way, easy to tell from real cells (pbmc3k AUROC 0.71, dispersion 1.16). Keep the
            # drawn cells' part outside the PCs and put their scores back to the generated ones
            # (the same probe: AUROC 0.51, dispersion 0.97; control 0.50, 1.01).
            loadings, mean = self.decoder["loadings"], self.decoder["mean"]
            drift = (out.X - mean) @ loadings.T - z
            out.X = (out.X - drift @ loadings).astype(np.float32)
            return out
        return self._with_counts(x, codes, options, seed)

    def decode_estimates(self, z) -> np.ndarray | None:  # noqa: D102
        return None if self.decoder is None else decode(self.decoder, z)

    def state(self) -> dict:  # noqa: D102
        return {
            **super().state(),
            "n_dims": self.n_dims,
            "decoder": self.decoder,
            "scores_of": self.scores_of or "",
        }

    @classmethod
    def from_state(cls, state, directory=None, prefix=""):  # noqa: D102
        return cls(
            obsm_key=state["obsm_key"],
            layer=state.get("layer"),
            n_dims=state["n_dims"],
            decoder=state.get("decoder"),
            scores_of=state.get("scores_of") or None,  # models saved before it: None
            counts=cls._counts_from_state(state),
        )


#: above this many genes an expression model logs where its cells stand (measured on 765 and
#: 2,000 PBMC genes in docs/spaces.md, "How the spaces compare")
EXPRESSION_ADVICE_GENES = 300


@register_space
class ExpressionSpace(_GeneSpace):
    """Log-normalised genes (``layer`` or ``.X``), diffused as they are; no encoder.

    Parameters
    ----------
    layer
        Layer of log-normalised expression (`None`: ``.X``).
    genes
        The model's genes, in order.
    counts
        Size factors per class for counts, or `None`.

    Examples
    --------
    >>> sb.BranchedDiffusion.setup_anndata(  # doctest: +SKIP
    ...     adata, labels_key="cell_type", layer="lognorm"
    ... )
    >>> sb.BranchedDiffusion(adata).space  # doctest: +SKIP
    ExpressionSpace(expression (layers['lognorm']))
    """

    name = "expression"

    def __init__(self, *, genes: np.ndarray, target_sum: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.genes = np.asarray(genes).astype(str)
        self.target_sum = None if not target_sum else float(target_sum)

    @classmethod
    def fit(cls, adata, setup, labels, n_classes, **kwargs):  # noqa: D102
        space = cls(
            layer=setup.get("layer"),
            genes=np.asarray(adata.var_names).astype(str),
            target_sum=setup.get("target_sum"),
        )
        space._fit_counts(adata, setup, labels, n_classes)
        if len(space.genes) > EXPRESSION_ADVICE_GENES:
            logger.warning(
                "Diffusing %d genes directly: on whole transcriptomes generated cells are told "
                "apart from real ones far more easily than in the default PCA space (measured "
                "in docs/spaces.md, 'How the spaces compare'). For many genes, set up "
                "out-of-fold PC scores (`sb.tl.pca_out_of_fold`, obsm_key='X_pca_oof') with "
                "counts_layer, or an scVI latent (`from_scvi_model`).",
                len(space.genes),
            )
        return space

    def normalize(self, block):
        """``log1p(counts / total * target_sum)`` of a block of raw counts (target_sum models)."""
        return normalize_block(block, self.target_sum)

    def training_matrix(self, adata: AnnData):
        """The set-up cells' expression: read in blocks when on disk or normalised on the way."""
        m = get_matrix(adata, layer=self.layer)
        if self.target_sum is not None or is_on_disk(m):
            return RowMatrix(m, transform=self.normalize if self.target_sum else None)
        return m

    def _normalized_factors(self, adata) -> np.ndarray:
        columns = check_genes(adata, self.genes, "the model")
        m = get_matrix(adata, layer=self.layer)
        if not np.array_equal(columns, np.arange(adata.n_vars)):
            m = read_block(m, 0, m.shape[0]) if is_on_disk(m) else m
            m = m[:, columns]
        return np.maximum(row_sums(m), 1.0) / self.target_sum

    @property
    def hierarchy_rep(self) -> tuple[str | None, str | None]:  # noqa: D102
        if self.target_sum is None:
            return super().hierarchy_rep
        # a hierarchy learned on the raw counts is not one of the normalised expression
        return None, f"log1p(CP{self.target_sum:g}) of {self.layer or 'X'}"

    @property
    def n_input(self) -> int:  # noqa: D102
        return len(self.genes)

    @property
    def var_names(self) -> np.ndarray:  # noqa: D102
        return self.genes

    @property
    def output_key(self) -> None:  # noqa: D102
        return None

    def encode(self, adata, what="the cells") -> np.ndarray:  # noqa: D102
        # the model's genes, in its order (extra genes are left out)
        columns = check_genes(adata, self.genes, "the model")
        m = get_matrix(adata, layer=self.layer)
        if is_on_disk(m):
            m = read_block(m, 0, m.shape[0])
        m = m[:, columns]
        check_finite(m, f"the representation of {what}")
        if self.target_sum is not None:
            check_counts(m, f"the counts of {what}")
            m = self.normalize(m)
        return to_dense(m)

    def resolve_options(self, *, counts, batch, residual_noise) -> dict:  # noqa: D102
        if residual_noise:
            raise ValueError(
                "residual_noise applies to models that decode a PCA to genes; this model "
                "(diffusing genes) has no PCA decoder."
            )
        return super().resolve_options(counts=counts, batch=batch, residual_noise=False)

    def decode(self, z, codes, options, seed) -> Decoded:  # noqa: D102
        # log-normalised expression is never negative
        return self._with_counts(np.clip(z, 0.0, None), codes, options, seed)

    def decode_estimates(self, z) -> np.ndarray:  # noqa: D102
        return np.clip(z, 0.0, None)

    def describe(self) -> str:  # noqa: D102
        where = f"layers[{self.layer!r}]" if self.layer else ".X"
        if self.target_sum is not None:
            return f"expression (log1p(CP{self.target_sum:g}) of the counts in {where})"
        return f"expression ({where})"

    def state(self) -> dict:  # noqa: D102
        return {**super().state(), "genes": self.genes, "target_sum": self.target_sum or 0.0}

    @classmethod
    def from_state(cls, state, directory=None, prefix=""):  # noqa: D102
        return cls(
            layer=state.get("layer"),
            genes=state["genes"],
            target_sum=state.get("target_sum") or None,
            counts=cls._counts_from_state(state),
        )


@register_space
class ScviSpace(Space):
    """The latent means of a trained scVI (or LinearSCVI) model, decoded through it.

    Generated latents go through scVI's decoder with a library size drawn from the requested
    type and a batch; counts are sampled from its likelihood.

    Parameters
    ----------
    obsm_key
        ``obsm`` key holding the latent means.
    vae
        The scvi-tools model.
    info
        What the model records about its scVI model (genes, batches, likelihood, ...).
    library_sizes
        Observed library sizes per class.

    Examples
    --------
    >>> model = sb.BranchedDiffusion.from_scvi_model(vae, labels_key="cell_type")  # doctest: +SKIP
    >>> model.space  # doctest: +SKIP
    ScviSpace(SCVI latent obsm['X_scVI'])
    """

    name = "scvi"
    #: sub-directory of a saved model with the scVI model's weights and set-up
    DIRECTORY = SCVI_DIR

    def __init__(self, *, vae, info: dict, library_sizes: list, **kwargs):
        super().__init__(**kwargs)
        self.vae = vae
        self.info = info
        self.library_sizes = list(library_sizes)

    @classmethod
    def fit(cls, adata, setup, labels, n_classes, *, scvi_model=None, **kwargs):  # noqa: D102
        obsm_key = setup.get("obsm_key")
        if scvi_model is None or obsm_key is None:
            raise ValueError(
                "The scVI space needs AnnData set up with `obsm_key` naming the latent means of "
                "`scvi_model=`; `BranchedDiffusion.from_scvi_model(scvi_model, labels_key=...)` "
                "does both."
            )
        info = scvi_info(scvi_model)
        latent = np.asarray(get_matrix(adata, obsm_key=obsm_key))
        if latent.shape[1] != info["n_latent"]:
            raise ValueError(
                f"adata.obsm[{obsm_key!r}] has {latent.shape[1]} dimensions but the scVI "
                f"model's latent has {info['n_latent']}: it is not this model's latent."
            )
        # the diffusion must learn the latents the decoder expects: check a sample of cells
        rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, min(256, adata.n_obs), False))
        expected = latent_of(scvi_model, adata, info, rows)
        err = np.linalg.norm(latent[rows] - expected) / max(np.linalg.norm(expected), 1e-12)
        if not err <= 1e-3:
            raise ValueError(
                f"adata.obsm[{obsm_key!r}] is not the scVI model's latent mean (relative "
                f"difference {err:.3g}). Store `scvi_model.get_latent_representation()` there, "
                "or use `BranchedDiffusion.from_scvi_model`."
            )
        library = library_sizes_of(adata, info)
        info["default_batch"] = default_batch(adata, info)
        return cls(
            obsm_key=obsm_key,
            vae=scvi_model,
            info=info,
            library_sizes=class_pools(library, labels, n_classes),
        )

    @staticmethod
    def store_latent(vae, adata: AnnData | None, obsm_key: str, labels_key: str) -> AnnData:
        """Write ``vae``'s latent means of ``adata`` to ``obsm[obsm_key]`` (or check them).

        An existing entry is reused only if it holds the same latents: scbranch never
        overwrites it. ``adata`` defaults to the AnnData the scVI model was set up with.
        """
        info = scvi_info(vae)
        if adata is None:
            adata = vae.adata
            if adata is None:
                raise ValueError("The scVI model holds no AnnData; pass `adata=`.")
        check_obs_key(adata, labels_key)
        latent = latent_of(vae, adata, info)
        if obsm_key in adata.obsm:
            stored = np.asarray(adata.obsm[obsm_key], dtype=np.float32)
            if stored.shape != latent.shape or not np.allclose(stored, latent, atol=1e-4):
                raise ValueError(
                    f"adata.obsm[{obsm_key!r}] exists and is not this scVI model's latent mean; "
                    "pass another `obsm_key=` (scbranch never overwrites it) or delete it."
                )
        else:
            adata.obsm[obsm_key] = latent
        return adata

    @property
    def n_input(self) -> int:  # noqa: D102
        return int(self.info["n_latent"])

    @property
    def var_names(self) -> np.ndarray:  # noqa: D102
        return np.asarray(self.info["var_names"]).astype(str)

    def encode(self, adata, what="the cells") -> np.ndarray:  # noqa: D102
        x = latent_of(self.vae, adata, self.info)
        check_finite(x, f"the representation of {what}")
        return x

    def class_data(self, adata, what):  # noqa: D102
        return self.encode(adata, what), {"library": library_sizes_of(adata, self.info)}

    def add_class(self, extras) -> None:  # noqa: D102
        new = class_pools(extras["library"], np.zeros(len(extras["library"]), int), 1)
        self.library_sizes = [*self.library_sizes, *new]

    def resolve_options(self, *, counts, batch, residual_noise) -> dict:  # noqa: D102
        if residual_noise:
            raise ValueError(
                "residual_noise applies to models that decode a PCA to genes; this model "
                f"(diffusing {self.describe()}) has no PCA decoder."
            )
        if counts is False:
            raise ValueError("scVI models always generate counts; drop `counts=False`.")
        batches = list(self.info["batches"])
        if batch is not None and (not self.info["batch_key"] or batch not in batches):
            raise ValueError(
                f"Unknown batch {batch!r}; the scVI model's batches are {batches}."
                if self.info["batch_key"]
                else "The scVI model was set up without batches; drop `batch=`."
            )
        if self.info["batch_key"] and batch is None:
            batch = self.info["default_batch"]
        return {"counts": True, "batch": batch, "residual_noise": False}

    def decode(self, z, codes, options, seed) -> Decoded:  # noqa: D102
        info = self.info
        batch = options.get("batch") or info["default_batch"]  # "" without batches
        batch_code = list(info["batches"]).index(batch)
        library = draw_from_pools(self.library_sizes, codes, np.random.default_rng([seed, 2]))
        scale, sampled = decode_latents(self.vae, z, library, np.full(len(z), batch_code), seed)
        out = Decoded(
            X=log_normalize(sampled),
            var_names=self.var_names,
            layers={Key.layers.COUNTS: sampled, Key.layers.SCALE: scale},
            obs={Key.obs.LIBRARY_SIZE: library},
        )
        if info["batch_key"]:
            out.obs[info["batch_key"]] = pd.Categorical(
                [batch] * len(z), categories=list(info["batches"])
            )
        return out

    def layers_made(self, options) -> list[str]:  # noqa: D102
        return [Key.layers.COUNTS, Key.layers.SCALE]

    def bytes_per_cell(self, options) -> int:  # noqa: D102
        # scVI's normalised expression (float32, gathered from chunks) and the sparse counts
        return len(self.var_names) * 16

    def decode_estimates(self, z) -> np.ndarray:  # noqa: D102
        batch_code = list(self.info["batches"]).index(self.info["default_batch"])
        scale, _ = decode_latents(
            self.vae,
            z,
            np.full(len(z), SCVI_NORMALIZED_TOTAL),
            np.full(len(z), batch_code),
            seed=0,
        )
        return np.log1p(scale * SCVI_NORMALIZED_TOTAL)

    def describe(self) -> str:  # noqa: D102
        return f"{self.info['class']} latent obsm[{self.obsm_key!r}]"

    def state(self) -> dict:  # noqa: D102
        return {**super().state(), "info": self.info, "library_sizes": self.library_sizes}

    def save_files(self, directory: Path, prefix: str = "") -> None:  # noqa: D102
        save_scvi_weights(self.vae, Path(directory) / f"{prefix}{self.DIRECTORY}")

    @property
    def nested_model(self):  # noqa: D102
        return self.vae

    def to_device(self, device) -> None:  # noqa: D102
        self.vae.to_device(device)

    @classmethod
    def from_state(cls, state, directory=None, prefix=""):  # noqa: D102
        if directory is None:
            raise ValueError("An scVI space is loaded from a model directory.")
        info = dict(state["info"])
        vae = load_scvi_weights(Path(directory) / f"{prefix}{cls.DIRECTORY}", info)
        return cls(
            obsm_key=state["obsm_key"],
            vae=vae,
            info=info,
            library_sizes=list(state["library_sizes"]),
        )
