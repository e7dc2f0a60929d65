"""``BranchedDiffusion``: the scvi-tools model class users train, save, load and sample from."""

from __future__ import annotations

import copy
import logging
import math
import os
import pickle
import time
import warnings
import zipfile
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, ObsmField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin
from scvi.utils import setup_anndata_dsp, track

from .._constants import OBS_KEYS, REGISTRY_KEYS, UNS_KEYS
from .._validation import (
    check_class_sizes,
    check_counts,
    check_finite,
    check_obs_key,
    check_rep_key,
    get_matrix,
    to_dense,
)
from ..module import VPSDE, BranchedDiffusionModule, BranchTree, global_standardizer
from ..module._discovery import subsample_per_class
from ..module._extension import (
    default_head_steps,
    extend_module,
    place_class,
    shared_heads,
    train_heads,
)
from ..module._networks import count_parameters
from ..module._sampling import SampleResult, default_spacing, resolve_solver
from ..tl._branch_hierarchy import discover_record
from ._counts import (
    class_pools,
    counts_from_expression,
    draw_from_pools,
    log_normalize,
    size_factors,
)
from ._data import ResamplingDataSplitter
from ._decoding import decode, fit_pca_decoder
from ._scvi import (
    SCVI_DIR,
    check_genes,
    counts_view,
    decode_latents,
    latent_means,
    load_scvi,
    scvi_info,
)
from ._training_plan import DiffusionTrainingPlan
from ._trajectories import TrajectoryMixin, resolve_seed

logger = logging.getLogger(__name__)


def _column_variance(x) -> np.ndarray:
    """Per-column variance of a dense or sparse matrix (no densification)."""
    if sp.issparse(x):
        mean = np.asarray(x.mean(0)).ravel()
        return np.maximum(np.asarray(x.multiply(x).mean(0)).ravel() - mean**2, 1e-12)
    return np.maximum(np.asarray(x, dtype=np.float64).var(0), 1e-12)


#: standardised cells kept per class for placing classes added later (add_classes)
REFERENCE_CELLS = 200


def _reference_sample(x, labels: np.ndarray, shift, scale: float, n_classes: int) -> dict:
    """Up to :data:`REFERENCE_CELLS` seeded, standardised cells of every class."""
    keep = subsample_per_class(labels, n_classes, REFERENCE_CELLS, seed=0)
    rows = to_dense(x[keep])
    return {
        "x": ((rows - shift) / scale).astype(np.float32),
        "labels": labels[keep].astype(np.int64),
    }


#: discovery options that placing a new class reuses: (name in the hierarchy's params, in
#: place_class)
_PLACEMENT_OPTIONS = (
    ("n_times", "n_times", int),
    ("smooth_sigma", "smooth_sigma", float),
    ("epsilon", "epsilon", float),
    ("min_branch_length", "min_branch_length", float),
    ("n_noise_draws", "n_draws", int),
    ("curves", "curves", str),
)


def _placement_options(record: dict | None) -> dict:
    """The options the model's tree was discovered with, as :func:`place_class` arguments.

    A new class must join by the same crossover rule as the old ones; options missing from the
    record (a tree given by hand, or recorded before the option existed) keep the defaults.
    """
    params = (record or {}).get("params", {}) or {}
    return {arg: cast(params[key]) for key, arg, cast in _PLACEMENT_OPTIONS if key in params}


def _check_same_genes(adata: AnnData, genes: np.ndarray, what: str) -> None:
    """Raise unless ``adata`` has exactly ``genes``, in order (missing genes named)."""
    columns = check_genes(adata, genes, what)
    if not np.array_equal(columns, np.arange(adata.n_vars)):
        raise ValueError(
            f"The genes of adata do not match {what}'s: adata has {adata.n_vars} genes, "
            f"{what} {len(genes)} (extra genes or another order). Pass "
            "`adata[:, genes].copy()` with the genes it was trained on."
        )


def _saved_genes(path: str) -> np.ndarray | None:
    """Genes recorded in a saved model file, or `None` when unreadable."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False).get("var_names")
    except Exception:  # noqa: BLE001 - a corrupt file is reported by the load itself
        return None
    return None if saved is None else np.asarray(saved).astype(str)


class BranchedDiffusion(TrajectoryMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """Hierarchically branched diffusion model of cell types :cite:p:`Tseng2024`.

    A score network with a shared trunk and one head per branch of a cell-type tree is trained
    on a latent representation (``obsm_key``, e.g. PCA) or on expression (``layer``/``.X``).
    Sampling follows the tree from t = 1 down, sharing the upper part of the reverse process
    between related types.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        Registry of a saved model (used by :meth:`load`; leave `None`).
    hierarchy
        The tree: `None` reuses ``adata.uns['scbranch_hierarchy']`` when it fits these data
        and the forward process, otherwise discovers one; a :class:`~scbranch.module.BranchTree`,
        a dict from :meth:`~scbranch.module.BranchTree.to_dict`, or a key of ``adata.uns``.
    architecture
        ``"branched"`` or ``"flat"`` (label-guided baseline with about the same parameter count).
    width
        Hidden width of the network.
    n_trunk_blocks
        Residual blocks shared by all branches.
    n_head_blocks
        Residual blocks of each branch head.
    beta0, beta1, t_min
        Forward process (VP-SDE), shared by discovery, training and sampling.
    min_cells_per_class
        Types with fewer training cells raise an error.
    discovery_kwargs
        Options of hierarchy discovery when one is discovered (see
        :func:`scbranch.tl.branch_hierarchy`).
    t_sampling
        Distribution of diffusion times during training, ``"uniform"`` or ``"logsnr"``.
    scvi_model
        A trained :class:`scvi.model.SCVI` or :class:`scvi.model.LinearSCVI` whose latent means
        are ``adata.obsm[obsm_key]``: generated latents are decoded by it into normalised
        expression and counts. :meth:`from_scvi_model` sets this up in one call.

    Examples
    --------
    >>> import scbranch as sb
    >>> adata = sb.datasets.pbmc68k()
    >>> sb.BranchedDiffusion.setup_anndata(adata, labels_key="cell_type", obsm_key="X_pca")
    >>> model = sb.BranchedDiffusion(adata)
    >>> model.train(max_epochs=5)  # doctest: +SKIP
    >>> gen = model.generate(n_cells=100, seed=0)  # doctest: +SKIP
    """

    _module_cls = BranchedDiffusionModule
    _training_plan_cls = DiffusionTrainingPlan
    _data_splitter_cls = ResamplingDataSplitter

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        hierarchy: BranchTree | Mapping | str | None = None,
        architecture: str = "branched",
        width: int = 256,
        n_trunk_blocks: int = 1,
        n_head_blocks: int = 3,
        beta0: float = 0.1,
        beta1: float = 20.0,
        t_min: float = 1e-3,
        min_cells_per_class: int = 3,
        discovery_kwargs: dict | None = None,
        t_sampling: str = "uniform",
        scvi_model=None,
    ):
        super().__init__(adata, registry)
        setup = self.registry_["setup_args"]
        self.obsm_key: str | None = setup.get("obsm_key")
        self.layer: str | None = setup.get("layer")
        data_key = REGISTRY_KEYS.REP_KEY if self.obsm_key else REGISTRY_KEYS.X_KEY
        n_input = (
            int(self.summary_stats[f"n_{REGISTRY_KEYS.REP_KEY}"])
            if self.obsm_key
            else int(self.summary_stats["n_vars"])
        )
        sde = VPSDE(beta0=beta0, beta1=beta1, t_min=t_min)
        classes = self.classes
        shift = scale = None
        self.decoder_ = None
        # count-level output: scVI (its model, genes, per-class library sizes) or, for the
        # expression and PCA spaces, per-class size factors of a counts layer
        self._scvi_model = None
        self.scvi_info_: dict | None = None
        self.library_sizes_: list | None = None
        self.size_factors_: list | None = None
        # a few standardised cells per class: where add_classes places new classes after load
        self.reference_samples_: dict | None = None
        self.extensions_: list[dict] = []
        if scvi_model is not None and (adata is None or self.obsm_key is None):
            raise ValueError(
                "scvi_model needs AnnData set up with `obsm_key` naming its latent means; "
                "`BranchedDiffusion.from_scvi_model(scvi_model, labels_key=...)` does both."
            )
        if adata is not None:
            x, labels = self._training_arrays(adata)
            if registry is None:  # a loaded model may know types added later (add_classes)
                check_class_sizes(labels, classes, min_cells_per_class, self.labels_key)
            if scvi_model is not None:
                self._attach_scvi(scvi_model, adata, x, labels)
            shift, scale = global_standardizer(x)
            variance = _column_variance(x)
            tree, record = self._resolve_hierarchy(
                hierarchy, adata, x, labels, sde, discovery_kwargs or {}
            )
            hierarchy = tree.to_dict()  # the resolved tree is what init_params_ saves
            self.hierarchy_record_ = record
            self.class_counts_ = np.bincount(labels, minlength=len(classes))
            self.reference_samples_ = _reference_sample(x, labels, shift, scale, len(classes))
            # decoders come from the saved attributes when loading (registry given), not
            # from whatever data are attached then
            fresh = registry is None and scvi_model is None
            if fresh and self.obsm_key is not None:
                self.decoder_ = fit_pca_decoder(adata, self.obsm_key, self.layer)
            if fresh and setup.get("counts_layer"):
                self._fit_size_factors(adata, setup["counts_layer"], labels)
        elif hierarchy is None:
            raise ValueError("A model built without AnnData needs `hierarchy`.")
        elif isinstance(hierarchy, BranchTree):
            hierarchy = hierarchy.to_dict()
        self.module = self._module_cls(
            n_input,
            hierarchy,
            architecture=architecture,
            width=width,
            n_trunk_blocks=n_trunk_blocks,
            n_head_blocks=n_head_blocks,
            beta0=beta0,
            beta1=beta1,
            t_min=t_min,
            data_key=data_key,
            t_sampling=t_sampling,
        )
        if shift is not None:
            self.module.set_standardization(shift, scale, variance / scale**2)
        if self.module.tree.classes != classes:
            raise ValueError(
                f"The hierarchy's classes {self.module.tree.classes} differ from the labels "
                f"{classes}; recompute the hierarchy on these data."
            )
        self._model_summary_string = self._summary()
        self.init_params_ = self._get_init_params(locals())
        # the scVI model is saved in its own directory, never pickled into model.pt
        self.init_params_["non_kwargs"]["scvi_model"] = None

    def _summary(self) -> str:
        return (
            f"BranchedDiffusion ({self.module.architecture}) on {self.space} "
            f"({self.module.n_input} dims), {len(self.classes)} classes, "
            f"{self.module.tree.n_branches} branches, "
            f"{count_parameters(self.module.net):,} parameters; tree "
            f"{self.module.tree.to_newick(3)}"
        )

    @property
    def space(self) -> str:
        """What the diffusion runs on, in words (e.g. ``"scVI latent obsm['X_scVI']"``)."""
        if self.scvi_info_ is not None:
            return f"{self.scvi_info_['class']} latent obsm[{self.obsm_key!r}]"
        if self.obsm_key is not None:
            return f"obsm[{self.obsm_key!r}]"
        return f"expression ({'layers[' + repr(self.layer) + ']' if self.layer else '.X'})"

    @property
    def scvi_model(self):
        """The scVI model that decodes this model's latents, or `None`."""
        return self._scvi_model

    def _attach_scvi(self, vae, adata: AnnData, latent: np.ndarray, labels: np.ndarray) -> None:
        info = scvi_info(vae)
        if latent.shape[1] != info["n_latent"]:
            raise ValueError(
                f"adata.obsm[{self.obsm_key!r}] has {latent.shape[1]} dimensions but the scVI "
                f"model's latent has {info['n_latent']}: it is not this model's latent."
            )
        view = counts_view(adata, info)
        # the diffusion must learn the latents the decoder expects: check a sample of cells
        rows = np.sort(np.random.default_rng(0).choice(adata.n_obs, min(256, adata.n_obs), False))
        expected = latent_means(vae, view[rows].copy())
        err = np.linalg.norm(np.asarray(latent)[rows] - expected) / max(
            np.linalg.norm(expected), 1e-12
        )
        if not err <= 1e-3:
            raise ValueError(
                f"adata.obsm[{self.obsm_key!r}] is not the scVI model's latent mean (relative "
                f"difference {err:.3g}). Store `scvi_model.get_latent_representation()` there, "
                "or use `BranchedDiffusion.from_scvi_model`."
            )
        library = np.asarray(view.X.sum(1)).ravel()
        self.library_sizes_ = class_pools(library, labels, len(self.classes))
        if info["batch_key"]:
            batches = view.obs[info["batch_key"]]
            info["default_batch"] = str(batches.value_counts().idxmax())
        else:
            info["default_batch"] = str(info["batches"][0])
        self.scvi_info_ = info
        self._scvi_model = vae

    def _fit_size_factors(self, adata: AnnData, counts_layer: str, labels: np.ndarray) -> None:
        if self.obsm_key is not None and self.decoder_ is None:
            warnings.warn(
                f"counts_layer={counts_layer!r} is ignored: obsm[{self.obsm_key!r}] has no map "
                "back to genes, so generated cells have no expression to turn into counts.",
                UserWarning,
                stacklevel=3,
            )
            return
        factors = self._size_factors_of(adata, counts_layer)
        self.size_factors_ = class_pools(factors, labels, len(self.classes))

    def _size_factors_of(self, adata: AnnData, counts_layer: str) -> np.ndarray:
        if counts_layer not in adata.layers:
            raise KeyError(
                f"The model generates counts from adata.layers[{counts_layer!r}], which adata "
                f"lacks (layers: {list(adata.layers.keys())})."
            )
        counts = adata.layers[counts_layer]
        expression = adata.layers[self.layer] if self.layer else adata.X
        if self.decoder_ is not None:
            columns = check_genes(adata, self.decoder_["var_names"], "the PCA decoder")
            counts, expression = counts[:, columns], expression[:, columns]
        where = f"adata.layers[{counts_layer!r}]"
        check_finite(counts, where)
        check_counts(counts, where)
        return size_factors(counts, expression)

    # ------------------------------------------------------------------ setup
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str,
        layer: str | None = None,
        obsm_key: str | None = None,
        counts_layer: str | None = None,
        **kwargs,
    ) -> None:
        """Register an AnnData object with the model.

        Parameters
        ----------
        %(param_adata)s
        labels_key
            Column of ``adata.obs`` with the cell types to generate.
        layer
            Layer of log-normalised expression to diffuse (or to decode a PCA into).
            If `None`, ``adata.X``.
        obsm_key
            Key of ``adata.obsm`` with the latent representation to diffuse (e.g. ``"X_pca"``).
            If `None`, diffuse expression (``layer`` or ``.X``).
        counts_layer
            Layer with the raw counts behind the log-normalised expression (expression and
            PCA spaces): each class's size factors are stored so that ``generate(counts=True)``
            can return counts. Not needed for scVI models (they sample counts themselves).
        **kwargs
            Used by :meth:`load` (``source_registry``).

        Examples
        --------
        >>> BranchedDiffusion.setup_anndata(  # doctest: +SKIP
        ...     adata, labels_key="cell_type", obsm_key="X_pca"
        ... )
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        check_obs_key(adata, labels_key)
        check_rep_key(adata, obsm_key=obsm_key, layer=layer)
        if counts_layer is not None and counts_layer not in adata.layers:
            raise KeyError(
                f"counts_layer={counts_layer!r} is not in adata.layers (available: "
                f"{list(adata.layers.keys())})."
            )
        if obsm_key is not None:
            check_finite(adata.obsm[obsm_key], f"adata.obsm[{obsm_key!r}]")
        else:
            where = f"adata.layers[{layer!r}]" if layer else "adata.X"
            check_finite(adata.layers[layer] if layer else adata.X, where)
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
        ]
        if obsm_key is not None:
            fields.append(ObsmField(REGISTRY_KEYS.REP_KEY, obsm_key))
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    @classmethod
    def from_scvi_model(
        cls,
        scvi_model,
        labels_key: str,
        *,
        adata: AnnData | None = None,
        obsm_key: str = "X_scVI",
        **model_kwargs,
    ) -> BranchedDiffusion:
        """A model diffusing the latent space of a trained scVI model, decoding through it.

        Like :meth:`scvi.model.SCANVI.from_scvi_model`: the diffusion trains on scVI's latent
        means and :meth:`generate` decodes generated latents into normalised expression
        (``layers['scale']``), counts sampled from scVI's likelihood (``layers['counts']``,
        library sizes drawn from the requested class) and log-normalised ``.X``.

        Parameters
        ----------
        scvi_model
            Trained :class:`scvi.model.SCVI` or :class:`scvi.model.LinearSCVI` (set up with
            at most a ``batch_key``), e.g. from :func:`scbranch.model.fit_scvi`.
        labels_key
            Column of ``adata.obs`` with the cell types.
        adata
            Cells to learn from: the scVI model's genes and counts layer, and ``labels_key``.
            Default: the AnnData the scVI model was set up with.
        obsm_key
            Where the latent means are stored in ``adata.obsm`` (the only key written; an
            existing entry is reused if it holds the same latents, otherwise an error).
        **model_kwargs
            Options of :class:`BranchedDiffusion` (``width``, ``hierarchy``, ...).

        Returns
        -------
        The model, ready to :meth:`train`.

        Examples
        --------
        >>> vae = sb.model.fit_scvi(adata, counts_layer="counts")  # doctest: +SKIP
        >>> model = sb.BranchedDiffusion.from_scvi_model(  # doctest: +SKIP
        ...     vae, labels_key="cell_type", adata=adata
        ... )
        """
        info = scvi_info(scvi_model)
        if adata is None:
            adata = scvi_model.adata
            if adata is None:
                raise ValueError("The scVI model holds no AnnData; pass `adata=`.")
        check_obs_key(adata, labels_key)
        latent = latent_means(scvi_model, counts_view(adata, info))
        if obsm_key in adata.obsm:
            stored = np.asarray(adata.obsm[obsm_key], dtype=np.float32)
            if stored.shape != latent.shape or not np.allclose(stored, latent, atol=1e-4):
                raise ValueError(
                    f"adata.obsm[{obsm_key!r}] exists and is not this scVI model's latent mean; "
                    "pass another `obsm_key=` (scbranch never overwrites it) or delete it."
                )
        else:
            adata.obsm[obsm_key] = latent
        cls.setup_anndata(adata, labels_key=labels_key, obsm_key=obsm_key)
        return cls(adata, scvi_model=scvi_model, **model_kwargs)

    # ------------------------------------------------------------------ registry helpers
    @property
    def classes(self) -> list[str]:
        """Cell types the model knows, in training order."""
        mapping = self.get_state_registry(REGISTRY_KEYS.LABELS_KEY).categorical_mapping
        return [str(c) for c in mapping]

    @property
    def labels_key(self) -> str:
        """Column of ``obs`` that holds the cell types."""
        return self.get_state_registry(REGISTRY_KEYS.LABELS_KEY).original_key

    @property
    def tree(self) -> BranchTree:
        """The branch tree of the model."""
        return self.module.tree

    def _training_arrays(self, adata: AnnData) -> tuple[np.ndarray, np.ndarray]:
        matrix = get_matrix(adata, obsm_key=self.obsm_key, layer=self.layer)
        codes = self.get_from_registry(adata, REGISTRY_KEYS.LABELS_KEY)
        return matrix, np.asarray(codes, dtype=np.int64).ravel()

    def get_from_registry(self, adata: AnnData, key: str) -> np.ndarray:
        """Data registered under ``key`` for ``adata``."""
        return self.get_anndata_manager(adata, required=True).get_from_registry(key)

    def _resolve_hierarchy(self, hierarchy, adata, x, labels, sde, discovery_kwargs):
        classes = self.classes
        if isinstance(hierarchy, BranchTree):
            return hierarchy, {}
        if isinstance(hierarchy, Mapping):
            tree_dict = hierarchy.get("tree", hierarchy)
            return BranchTree.from_dict(tree_dict), dict(hierarchy) if "tree" in hierarchy else {}
        key = hierarchy if isinstance(hierarchy, str) else UNS_KEYS.HIERARCHY
        if key in adata.uns:
            record = adata.uns[key]
            params = record.get("params", {})
            problems = []
            tree = BranchTree.from_dict(record["tree"])
            if tree.classes != classes:
                problems.append(f"its classes {tree.classes} differ from {classes}")
            if params.get("groupby") != self.labels_key:
                problems.append(f"it groups by {params.get('groupby')!r}, not {self.labels_key!r}")
            if (params.get("use_rep") or None) != self.obsm_key or (
                (params.get("layer") or None) != (None if self.obsm_key else self.layer)
            ):
                problems.append("it was computed on another representation")
            try:
                sde.check_same(params, what=f"hierarchy in adata.uns[{key!r}]")
            except (ValueError, KeyError) as err:
                problems.append(str(err))
            if not problems:
                logger.info("Using the hierarchy stored in adata.uns[%r].", key)
                return tree, dict(record)
            if isinstance(hierarchy, str):
                raise ValueError(
                    f"adata.uns[{key!r}] does not fit this model: {'; '.join(problems)}."
                )
            logger.info(
                "Not reusing adata.uns[%r] (%s); discovering the hierarchy.",
                key,
                "; ".join(problems),
            )
        elif isinstance(hierarchy, str):
            raise KeyError(f"hierarchy={hierarchy!r} is not a key of adata.uns.")
        tree, record = discover_record(
            x,
            labels,
            classes,
            sde,
            groupby=self.labels_key,
            use_rep=self.obsm_key,
            layer=None if self.obsm_key else self.layer,
            **discovery_kwargs,
        )
        logger.info("Discovered hierarchy: %s", tree.to_newick(3))
        return tree, record

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int = 64,
        lr: float = 1e-3,
        ema_decay: float = 0.999,
        class_balance: float = 0.5,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float = 1.0,
        validation_size: float | None = None,
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        **trainer_kwargs,
    ):
        """Train the score network with Lightning.

        Parameters
        ----------
        max_epochs
            Passes over the training cells. Default: enough for about 4,000 optimiser steps
            (at most 2,000 epochs).
        batch_size
            Cells per optimiser step (per device under DDP). Small batches matter: on pbmc68k,
            with the same 2,000 steps, batches of 256 gave cells 0.6-0.9x as spread as real cells,
            batches of 64 gave 0.86-1.06x.
        lr
            Peak learning rate of Adam (decays to 0 with a cosine schedule).
        ema_decay
            Decay of the weight EMA used for sampling (0 disables it).
        class_balance
            Oversample rare types: 0 trains on natural frequencies, 1 shows every type equally
            often (cells are repeated, none dropped); values in between interpolate. The default
            0.5 gives a type of n cells weight ~sqrt(n): on pbmc68k it brought the spread of a
            9-cell type from 1.6x to 1.2x that of its real cells without hurting common types.
        accelerator, devices
            Lightning device selection, e.g. ``accelerator="gpu", devices=-1,
            strategy="ddp_find_unused_parameters_true"`` for all GPUs (from a script). On a
            CUDA GPU the heads of a batch run as batched matmuls: an H200 took 26 ms per step
            at batch 64 and 34 ms at 4,096 (docs/benchmarks/gpu.md).
        train_size
            Fraction of cells to train on; the default uses every cell (a generator should see
            all of them; set < 1 with ``check_val_every_n_epoch`` to monitor validation loss).
        validation_size
            Fraction of cells for validation (default ``1 - train_size``).
        plan_kwargs
            Options of :class:`~scbranch.model.DiffusionTrainingPlan` (``weight_decay``, ...).
        datasplitter_kwargs
            Options of the scvi-tools data splitter.
        **trainer_kwargs
            Passed to the Lightning trainer (``gradient_clip_val`` defaults to 1.0).

        Examples
        --------
        >>> model.train(max_epochs=300)  # doctest: +SKIP
        >>> model.train(accelerator="gpu", devices=1)  # doctest: +SKIP
        """
        # Another scvi model set up on the same AnnData overwrites obs['_scvi_labels']; replay
        # our registration so we never train on wrong labels (CONVENTIONS.md §2.6 item 5).
        self._validate_anndata(self.adata)
        if max_epochs is None:
            steps_per_epoch = max(1, math.ceil(self.adata.n_obs * train_size / batch_size))
            max_epochs = int(min(2000, max(1, math.ceil(4000 / steps_per_epoch))))
        plan_kwargs = {"lr": lr, "ema_decay": ema_decay, **(plan_kwargs or {})}
        datasplitter_kwargs = {
            "data_and_attributes": [self.module.data_key, REGISTRY_KEYS.LABELS_KEY],
            "class_balance": class_balance,
            **(datasplitter_kwargs or {}),
        }
        trainer_kwargs.setdefault("gradient_clip_val", 1.0)
        return super().train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            train_size=train_size,
            validation_size=validation_size,
            batch_size=batch_size,
            plan_kwargs=plan_kwargs,
            datasplitter_kwargs=datasplitter_kwargs,
            **trainer_kwargs,
        )

    # ------------------------------------------------------------------ generation
    def _counts(
        self, n_cells: int | Mapping[str, int], labels: Sequence[str] | None
    ) -> dict[int, int]:
        if isinstance(n_cells, Mapping):
            if labels is not None:
                raise ValueError("Pass per-class counts as a dict OR `labels`, not both.")
            idx = self.tree.class_index(list(n_cells))
            counts = {int(i): int(n) for i, n in zip(idx, n_cells.values(), strict=True)}
        else:
            chosen = self.classes if labels is None else labels
            counts = {int(i): int(n_cells) for i in self.tree.class_index(list(chosen))}
        if any(n < 0 for n in counts.values()):
            raise ValueError("Cell counts must be non-negative.")
        if sum(counts.values()) == 0:
            raise ValueError("Nothing to generate: ask for at least one cell.")
        return counts

    @torch.inference_mode()
    def generate(
        self,
        n_cells: int | Mapping[str, int] = 100,
        *,
        labels: Sequence[str] | None = None,
        solver: str = "heun",
        n_steps: int = 25,
        share: bool = True,
        seed: int | None = None,
        spacing: str | None = None,
        residual_noise: bool = False,
        counts: bool | None = None,
        batch: str | None = None,
        batch_size: int | None = None,
        trajectory_times: Sequence[float] | None = None,
        progress_bar: bool = True,
    ) -> AnnData:
        """Generate cells of any of the model's cell types, as a NEW AnnData.

        Parameters
        ----------
        n_cells
            Cells per type (an int, for every type in ``labels``), or a dict
            ``{cell type: count}``.
        labels
            Types to generate when ``n_cells`` is an int (default: all).
        solver
            ``"heun"`` (probability-flow ODE, 2 calls per step; alias ``"ode"``), ``"dpm2m"``
            (probability-flow ODE, multistep, 1 call per step), ``"em"`` (reverse SDE,
            Euler-Maruyama; alias ``"sde"``; needs hundreds of steps) or ``"pc"`` (Euler-Maruyama
            predictor + Langevin corrector, 2 calls per step: the original paper's sampler).
        n_steps
            Steps from t = 1 to ``t_min``; the grid always contains every branch time.
        share
            Share the reverse path above branch points between types (fewer network calls;
            cells of different types then share noisy ancestors). `False` gives independent paths.
        seed
            Random seed; `None` draws one (it is recorded in ``uns['scbranch']['params']``).
        spacing
            Step allocation and spacing, ``"logsnr"`` or ``"t"``; `None` picks ``"t"`` for the
            stochastic solvers (``em``, ``pc``; as in Song et al.: the Langevin corrector
            over-disperses cells when log-SNR spacing crowds its steps near the data) and
            ``"logsnr"`` for the ODE solvers.
        residual_noise
            PCA-space models: add to the decoded expression the per-gene noise real cells have
            outside the PCs (probabilistic PCA), so cells vary like real cells in every
            direction rather than being denoised profiles. On pbmc3k this brought a random
            forest's real-vs-generated AUROC from 0.71 to near the real-vs-real control (see
            docs/evaluation.md). Values can then be negative. The latent is unchanged.
        counts
            Also return counts in ``layers['counts']``. scVI models always do (sampled from
            scVI's likelihood with library sizes drawn from the class). Expression and PCA
            models do with ``counts=True`` if set up with ``counts_layer``: the expression
            (negative values set to 0) is mapped back through a size factor drawn from the
            class, ``s * expm1(x)``, stochastically rounded (unbiased; exact for real cells).
        batch
            scVI models set up with a batch: the batch to decode into (default: the most common
            one in the training data).
        batch_size
            At most this many cells per forward pass (memory on large requests); the cells
            depend on it only through float rounding. `None`: 8,192 on CPU (faster than one
            large pass), no limit on GPU.
        trajectory_times
            Record every cell's state at these diffusion times (in ``[t_min, 1]``, or 0 for the
            final cell) and return the trajectories instead of the cells: one row per (cell,
            time), with ``obs['trajectory']`` (the cell), ``obs['checkpoint']``, ``obs['t']``,
            ``obs['branch']`` (the branch the state is on) and ``obs[labels_key]``;
            ``obsm['scbranch_state']`` holds the noisy state, the latent (``obsm[obsm_key]``)
            and ``.X`` the model's estimate of the clean cell from it (E[x_0 | x_t]; scVI
            models: log1p of scVI's normalised expression x 10,000). With ``share=True``
            types share their states above their branch point. The times join the step grid,
            so the final cells differ slightly from a run without recording.
        progress_bar
            Show a progress bar over the steps.

        Returns
        -------
        AnnData with ``obs[labels_key]`` (categorical, all training types in training order),
        ``obs['scbranch_generated']``, the latent in ``obsm[obsm_key]`` (latent models),
        expression in ``.X`` when the map to genes is known (expression models: clipped at 0;
        scVI models: the counts log-normalised to 10,000 per cell, with scVI's normalised
        expression in ``layers['scale']`` and library sizes in ``obs['scbranch_library_size']``),
        counts in ``layers['counts']`` (see ``counts``), and provenance in ``uns['scbranch']``.

        Examples
        --------
        >>> gen = model.generate(  # doctest: +SKIP
        ...     n_cells={"CD19+ B": 1000}, solver="heun", n_steps=30, seed=0
        ... )
        >>> tr = model.generate(100, trajectory_times=[1.0, 0.6, 0.3, 0.0])  # doctest: +SKIP
        """
        solver = resolve_solver(solver)
        spacing = default_spacing(solver) if spacing is None else spacing
        if residual_noise and self.decoder_ is None:
            space = f"obsm[{self.obsm_key!r}] without PCA loadings" if self.obsm_key else "genes"
            raise ValueError(
                "residual_noise applies to models that decode a PCA to genes; this model "
                f"(diffusing {space}) has no PCA decoder."
            )
        times = None
        if trajectory_times is not None:
            times = self._check_trajectory_times(trajectory_times, counts, residual_noise)
        counts, batch = self._check_decoding_options(counts, batch)
        requested = self._counts(n_cells, labels)
        seed = resolve_seed(seed)
        res = self._run_sampler(
            requested,
            solver=solver,
            n_steps=n_steps,
            share=share,
            seed=seed,
            spacing=spacing,
            batch_size=batch_size,
            progress_bar=progress_bar,
            record_times=[t for t in (times or []) if t > 0],
        )
        z = res.x.float().cpu().numpy()
        codes = res.labels.cpu().numpy()
        params = {
            # arrays, not a dict keyed by label: labels like "CD4+/CD25" are not valid h5 keys
            "labels": np.array([self.classes[c] for c in requested], dtype=object),
            "n_cells": np.array(list(requested.values()), dtype=np.int64),
            "solver": solver,
            "n_steps": n_steps,
            "share": share,
            "seed": seed,
            "spacing": spacing,
            "residual_noise": residual_noise,
            "counts": counts,
            "batch": batch or "",
            "n_network_calls": res.n_network_calls,
            "n_row_evaluations": res.n_row_evaluations,
        }
        if times is not None:
            return self._generation_trajectories(res, times, params)
        return self._as_anndata(z, codes, params)

    def _run_sampler(
        self, requested: dict[int, int], *, progress_bar: bool, **options
    ) -> SampleResult:
        """Sample per-class counts with the module (``options``: see ``sample_counts``)."""
        progress = None
        if progress_bar:

            def progress(it):
                return track(it, description="Sampling", style="tqdm")

        return self.module.sample_counts(requested, progress=progress, **options)

    def _check_decoding_options(
        self, counts: bool | None, batch: str | None
    ) -> tuple[bool, str | None]:
        """Validate ``counts`` and ``batch`` of :meth:`generate`; resolve both."""
        if self.scvi_info_ is not None:
            if counts is False:
                raise ValueError("scVI models always generate counts; drop `counts=False`.")
            batches = list(self.scvi_info_["batches"])
            if batch is not None and (not self.scvi_info_["batch_key"] or batch not in batches):
                raise ValueError(
                    f"Unknown batch {batch!r}; the scVI model's batches are {batches}."
                    if self.scvi_info_["batch_key"]
                    else "The scVI model was set up without batches; drop `batch=`."
                )
            if self.scvi_info_["batch_key"] and batch is None:
                batch = self.scvi_info_["default_batch"]
            return True, batch
        if batch is not None:
            raise ValueError("`batch` applies to models decoded by scVI (from_scvi_model) only.")
        if counts and self.size_factors_ is None:
            raise ValueError(
                "This model cannot generate counts: set the data up with "
                "`counts_layer=` (expression and PCA models) or build the model on an scVI "
                "model (`BranchedDiffusion.from_scvi_model`)."
            )
        return bool(counts), None

    def _decode(self, z: np.ndarray, codes: np.ndarray, params: dict) -> dict:
        """Expression, layers, obs columns and genes of generated latents, by space.

        Each random part has its own stream derived from the seed, so the latent (and the
        expression) are identical whatever else is asked for.
        """
        seed = int(params.get("seed", 0))
        out: dict = {"X": None, "var_names": None, "layers": {}, "obs": {}}
        if self.scvi_info_ is not None:
            if self._scvi_model is None:
                raise RuntimeError("The scVI model of this scbranch model is not loaded.")
            info = self.scvi_info_
            batch = params.get("batch") or info["default_batch"]  # "" without batches
            batch_code = list(info["batches"]).index(batch)
            library = draw_from_pools(self.library_sizes_, codes, np.random.default_rng([seed, 2]))
            scale, sampled = decode_latents(
                self._scvi_model, z, library, np.full(len(z), batch_code), seed
            )
            out.update(X=log_normalize(sampled), var_names=info["var_names"])
            out["layers"] = {"counts": sampled, "scale": scale}
            out["obs"]["scbranch_library_size"] = library
            if info["batch_key"]:
                out["obs"][info["batch_key"]] = pd.Categorical(
                    [batch] * len(z), categories=list(info["batches"])
                )
            return out
        out["X"], out["var_names"] = self._expression(
            z,
            residual_noise=bool(params.get("residual_noise", False)),
            rng=np.random.default_rng([seed, 1]),
        )
        if params.get("counts"):
            factors = draw_from_pools(self.size_factors_, codes, np.random.default_rng([seed, 2]))
            out["layers"]["counts"] = counts_from_expression(
                out["X"], factors, np.random.default_rng([seed, 3])
            )
            out["obs"]["scbranch_size_factor"] = factors
        return out

    def _expression(
        self, z: np.ndarray, *, residual_noise: bool = False, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Expression and genes of latent or expression states (not scVI), or ``(None, None)``.

        PCA models decode through the loadings (with ``residual_noise``, from ``rng``);
        expression models clip at 0 (log-normalised expression is never negative).
        """
        if self.obsm_key is not None and self.decoder_ is not None:
            x = decode(self.decoder_, z, residual_noise=residual_noise, rng=rng)
            return x, self.decoder_["var_names"]
        if self.obsm_key is None:
            return np.clip(z, 0.0, None), np.asarray(self.get_var_names()).astype(str)
        return None, None

    def _as_anndata(self, z: np.ndarray, codes: np.ndarray, params: dict) -> AnnData:
        decoded = self._decode(z, codes, params)
        obs = pd.DataFrame(
            {
                self.labels_key: pd.Categorical.from_codes(codes, categories=self.classes),
                OBS_KEYS.GENERATED: True,
                **decoded["obs"],
            },
            index=[f"gen{i}" for i in range(len(z))],
        )
        x = decoded["X"]
        var = None if x is None else pd.DataFrame(index=decoded["var_names"])
        obsm = {self.obsm_key: z} if self.obsm_key is not None else None
        adata = AnnData(X=x, obs=obs, var=var, obsm=obsm, layers=decoded["layers"] or None)
        adata.uns[UNS_KEYS.GENERATED] = self._uns_record(params, x is not None)
        return adata

    def _uns_record(self, params: dict, decoded: bool) -> dict:
        """``uns['scbranch']`` of an AnnData the model made: params, model summary, tree."""
        return {
            "params": params,
            "model": {
                "architecture": self.module.architecture,
                "labels_key": self.labels_key,
                "obsm_key": self.obsm_key or "",
                "layer": self.layer or "",
                "decoded": decoded and self.obsm_key is not None,
                "space": self.space,
                # classes added by add_classes, in order (arrays: h5ad-safe)
                **(
                    {
                        "extensions": {
                            key: np.asarray([e[key] for e in self.extensions_])
                            for key in ("label", "joins", "t", "n_cells", "n_steps")
                        }
                    }
                    if self.extensions_
                    else {}
                ),
                "summary": self._model_summary_string,
                **self.module.sde.to_dict(),
            },
            "hierarchy": self.tree.to_dict(),
        }

    # ------------------------------------------------------------------ extension
    def add_classes(
        self,
        adata: AnnData,
        labels: Sequence[str] | None = None,
        *,
        labels_key: str | None = None,
        max_epochs: int | None = None,
        batch_size: int = 64,
        lr: float = 1e-3,
        ema_decay: float = 0.999,
        min_cells: int = 10,
        fine_tune_shared: bool = False,
        seed: int = 0,
        progress_bar: bool = True,
    ) -> BranchedDiffusion:
        """Add new cell types without retraining and without changing the old ones.

        For each new type, in order (METHOD.md §10): its crossover times against the model's
        stored reference cells of every known type place it on the tree (it joins the type
        it becomes indistinguishable from first, at that time, by the crossover rule and the
        options the tree was discovered with, e.g. ``n_noise_draws``); the branch it joins is split
        there, keeping its head on both halves; a new head, warm-started from that branch's
        head, is trained on the new cells only, with t below the branch point; every other
        parameter stays frozen. Old types therefore use exactly the same parameters at every
        time: with the same seed and the same requested types, :meth:`generate` returns
        bit-identical cells before and after (with the default ``share=True``).

        Parameters
        ----------
        adata
            Cells of the new types, in the model's representation: ``obsm[obsm_key]`` in the
            same latent space (e.g. projected on the same PCA), the same genes for expression
            models, or the scVI model's genes and counts for scVI models. Cells of other types
            are ignored.
        labels
            New types to add (default: every type in ``adata`` the model does not know).
        labels_key
            Column of ``adata.obs`` with the types (default: the model's).
        max_epochs
            Passes over a new type's cells (default: about 1,000 optimiser steps).
        batch_size, lr, ema_decay
            Optimiser settings of the new head (as in :meth:`train`).
        min_cells
            Types with fewer cells raise an error.
        fine_tune_shared
            After the new head, also fine-tune, for as many steps again, the heads of the
            branches above the new branch point (shared with old types), on the new cells plus
            a replay of the stored reference cells of every type. Off by default: it gives up
            the zero-forgetting guarantee (the old types using those heads change) for a
            possibly better fit of the new type's upper path; ``benchmarks/extension.py``
            measures the trade-off.
        seed
            Seed of placement noise and training.
        progress_bar
            Show a progress bar over the steps.

        Returns
        -------
        The model itself (extended in place), for chaining.

        Examples
        --------
        >>> model.add_classes(adata_new, labels=["Megakaryocyte"], max_epochs=100)  # doctest: +SKIP
        >>> model.generate(n_cells={"Megakaryocyte": 200}, seed=0)  # doctest: +SKIP
        """
        if self.module.architecture != "branched":
            raise ValueError(
                "A flat model has no branches to extend: every weight is shared by all types. "
                "Retrain it on all types, or use architecture='branched'."
            )
        if self.reference_samples_ is None:
            raise ValueError(
                "This model has no reference cells to place new types against (saved by an "
                "older scbranch); build and train it again to extend it."
            )
        labels_key = labels_key or self.labels_key
        check_obs_key(adata, labels_key)
        present = [str(c) for c in pd.unique(adata.obs[labels_key].astype(str))]
        if labels is None:
            labels = [c for c in present if c not in self.classes]
            if not labels:
                raise ValueError(
                    f"adata.obs[{labels_key!r}] holds no type the model does not know already; "
                    "nothing to add."
                )
        labels = [str(c) for c in ([labels] if isinstance(labels, str) else labels)]
        known = [c for c in labels if c in self.classes]
        if known:
            raise ValueError(
                f"The model knows {known} already; add_classes adds new types only. Rename "
                "them, or retrain to change existing types."
            )
        missing = [c for c in labels if c not in present]
        if missing:
            raise KeyError(f"No cells labelled {missing} in adata.obs[{labels_key!r}].")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels lists a type twice: {labels}.")
        data = self._new_class_data(adata, labels_key, labels, min_cells)
        for name in labels:
            t0 = time.perf_counter()
            x, extra = data[name]
            z = (x - self.module.shift.cpu().numpy()) / float(self.module.scale)
            placement = place_class(
                self.reference_samples_["x"],
                self.reference_samples_["labels"],
                len(self.classes),
                z,
                self.module.sde,
                seed=seed,
                class_names=[*self.classes, name],
                **_placement_options(self.hierarchy_record_),
            )
            leaf, head = extend_module(self.module, name, placement)
            code = len(self.classes)
            device = self.module.shift.device
            progress = None
            if progress_bar:

                def progress(it, name=name):
                    return track(it, description=f"Training {name}", style="tqdm")

            n_steps = default_head_steps(len(z), batch_size, max_epochs)
            options = {"batch_size": batch_size, "lr": lr, "ema_decay": ema_decay, "seed": seed}
            z_t = torch.as_tensor(z, dtype=torch.float32, device=device)
            losses = train_heads(
                self.module,
                [head],
                z_t,
                torch.full((len(z),), code, device=device),
                (self.module.sde.t_min, placement.t),
                n_steps=n_steps,
                progress=progress,
                **options,
            )
            if fine_tune_shared:
                # the new class's whole path, with replay of every reference cell those heads
                # serve: old types on these branches change (no longer bit-identical)
                ref = self.reference_samples_
                replay = np.isin(ref["labels"], self.tree.branches[self.tree.root].classes)
                x_all = torch.cat([z_t, torch.as_tensor(ref["x"][replay], device=device)])
                y_all = torch.cat(
                    [
                        torch.full((len(z),), code, device=device),
                        torch.as_tensor(ref["labels"][replay], device=device),
                    ]
                )
                losses += train_heads(
                    self.module,
                    [head, *shared_heads(self.tree, code, placement.t)],
                    x_all,
                    y_all,
                    (self.module.sde.t_min, 1.0),
                    n_steps=n_steps,
                    progress=progress,
                    **options,
                )
            self._register_new_class(name, z, extra)
            record = {
                "label": name,
                "joins": self.classes[placement.sibling],
                "t": placement.t,
                "n_cells": len(z),
                "n_steps": len(losses),
                "final_loss": float(np.mean(losses[-50:])),
                "fine_tune_shared": bool(fine_tune_shared),
                "seconds": time.perf_counter() - t0,
            }
            self.extensions_.append(record)
            logger.info(
                "Added %r: joins %r at t=%.3f (%d cells, %d steps, %.1f s).",
                name,
                record["joins"],
                placement.t,
                len(z),
                len(losses),
                record["seconds"],
            )
        self.module.eval()
        return self

    def _new_class_data(
        self, adata: AnnData, labels_key: str, labels: list[str], min_cells: int
    ) -> dict:
        """Per new type: its cells in the model's data space, and its count pools."""
        names = adata.obs[labels_key].astype(str).to_numpy()
        sizes = {c: int((names == c).sum()) for c in labels}
        small = {c: n for c, n in sizes.items() if n < min_cells}
        if small:
            listing = ", ".join(f"{c!r} ({n} cells)" for c, n in small.items())
            raise ValueError(
                f"New type(s) {listing} have fewer than min_cells={min_cells} cells: too few to "
                "place on the tree and train a head. Collect more cells or lower `min_cells`."
            )
        keep = np.isin(names, labels)
        sub = adata[keep]
        sub_names = names[keep]
        extra: dict[str, np.ndarray] = {}
        x = self._representation(sub, "the new cells")
        if self.scvi_info_ is not None:
            extra["library"] = np.asarray(counts_view(sub, self.scvi_info_).X.sum(1)).ravel()
        counts_layer = self.registry_["setup_args"].get("counts_layer")
        if self.size_factors_ is not None and counts_layer:
            extra["size_factors"] = self._size_factors_of(sub, counts_layer)
        return {
            c: (x[sub_names == c], {k: v[sub_names == c] for k, v in extra.items()}) for c in labels
        }

    def _representation(self, adata: AnnData, what: str) -> np.ndarray:
        """Cells of ``adata`` in the model's data space (latent or genes), checked and finite.

        scVI models encode the counts with their scVI model; latent models read
        ``obsm[obsm_key]`` (which must have the model's dimension); expression models read
        the layer's columns of the model's genes (missing genes raise).
        """
        if self.scvi_info_ is not None:
            x = latent_means(self._scvi_model, counts_view(adata, self.scvi_info_))
        elif self.obsm_key is not None:
            check_rep_key(adata, obsm_key=self.obsm_key)
            x = np.asarray(get_matrix(adata, obsm_key=self.obsm_key), dtype=np.float64)
            if x.shape[1] != self.module.n_input:
                raise ValueError(
                    f"adata.obsm[{self.obsm_key!r}] has {x.shape[1]} dimensions, the model "
                    f"{self.module.n_input}: {what} must be in the model's latent space (e.g. "
                    "projected on the same PCA)."
                )
        else:  # the model's genes, in its order (extra genes are left out)
            columns = check_genes(adata, np.asarray(self.get_var_names()).astype(str), "the model")
            x = to_dense(get_matrix(adata, layer=self.layer)[:, columns])
        check_finite(x, f"the representation of {what}")
        return x

    def _register_new_class(self, name: str, z: np.ndarray, extra: dict) -> None:
        """Make a trained new class known everywhere generate/save/load look."""
        code = len(self.classes)
        # a private copy: the registry of the training AnnData (shared with its manager)
        # keeps describing those data
        self.registry_ = copy.deepcopy(self.registry_)
        labels_field = self.registry_["field_registries"][REGISTRY_KEYS.LABELS_KEY]
        state = labels_field["state_registry"]
        state["categorical_mapping"] = np.append(
            np.asarray(state["categorical_mapping"], dtype=object), name
        )
        labels_field.setdefault("summary_stats", {})["n_labels"] = code + 1
        self.summary_stats = AnnDataManager._get_summary_stats_from_registry(self.registry_)
        keep = np.random.default_rng(0).permutation(len(z))[:REFERENCE_CELLS]
        self.reference_samples_ = {
            "x": np.concatenate(
                [self.reference_samples_["x"], z[np.sort(keep)].astype(np.float32)]
            ),
            "labels": np.concatenate(
                [self.reference_samples_["labels"], np.full(len(keep), code, dtype=np.int64)]
            ),
        }
        self.class_counts_ = np.append(self.class_counts_, len(z))
        if self.library_sizes_ is not None:
            self.library_sizes_ = [
                *self.library_sizes_,
                *class_pools(extra["library"], np.zeros(len(z), int), 1),
            ]
        if self.size_factors_ is not None:
            self.size_factors_ = [
                *self.size_factors_,
                *class_pools(extra["size_factors"], np.zeros(len(z), int), 1),
            ]
        # what load() rebuilds the module from
        self.init_params_["non_kwargs"]["hierarchy"] = self.tree.to_dict()
        self.hierarchy_record_ = {**(self.hierarchy_record_ or {}), "tree": self.tree.to_dict()}
        self._model_summary_string = self._summary()

    # ------------------------------------------------------------------ persistence
    def save(
        self,
        dir_path: str,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **kwargs,
    ) -> None:
        """Save the model to ``dir_path`` (and its scVI model, if any, to ``dir_path/scvi``).

        Parameters
        ----------
        dir_path
            Directory to create.
        prefix
            Prefix of the saved file names.
        overwrite
            Replace an existing directory's model files; otherwise an existing directory
            raises an error.
        save_anndata
            Also save the registered AnnData.
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.save`.

        Examples
        --------
        >>> model.save("pbmc_model/")  # doctest: +SKIP
        """
        super().save(
            dir_path, prefix=prefix, overwrite=overwrite, save_anndata=save_anndata, **kwargs
        )
        if self._scvi_model is not None:
            # the scVI model keeps its own format (loadable by scvi-tools alone); no data
            self._scvi_model.save(
                os.path.join(str(dir_path), f"{prefix or ''}{SCVI_DIR}"),
                overwrite=True,
                save_anndata=False,
            )

    @classmethod
    def load(cls, dir_path: str, adata: AnnData | None = None, **kwargs) -> BranchedDiffusion:
        """Load a model saved with :meth:`save`.

        Parameters
        ----------
        dir_path
            Directory the model was saved to.
        adata
            Optional AnnData to attach (its genes/representation must match the model's).
        **kwargs
            Passed to :meth:`scvi.model.base.BaseModelClass.load` (``accelerator``, ``device``,
            ``prefix``).

        Returns
        -------
        The model.

        Examples
        --------
        >>> model = BranchedDiffusion.load("pbmc_model/")  # doctest: +SKIP
        """
        prefix = kwargs.get("prefix") or ""
        path = os.path.join(str(dir_path), f"{prefix}model.pt")
        if not os.path.isdir(str(dir_path)):
            raise FileNotFoundError(
                f"No model directory at {str(dir_path)!r}. Save one with `model.save(dir_path)`."
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{str(dir_path)!r} holds no '{prefix}model.pt': it is not (or not completely) a "
                "saved scbranch model."
            )
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message=".*no saved anndata.*", category=UserWarning
                )
                model = super().load(str(dir_path), adata=adata, **kwargs)
        except (
            EOFError,
            RuntimeError,
            KeyError,
            ValueError,
            TypeError,
            AttributeError,
            pickle.UnpicklingError,
            zipfile.BadZipFile,
        ) as err:
            # data with other genes fail deep inside scvi-tools: say so, not "corrupt"
            saved = _saved_genes(path) if adata is not None else None
            if saved is not None:
                _check_same_genes(adata, saved, "the saved model")
            raise ValueError(
                f"Could not load the model in {str(dir_path)!r}: {err}. The directory is corrupt, "
                "partial, or from an incompatible version; retrain and save it again."
            ) from err
        if getattr(model, "scvi_info_", None) is not None:
            scvi_kwargs = {k: kwargs[k] for k in ("accelerator", "device") if k in kwargs}
            model._scvi_model = load_scvi(
                os.path.join(str(dir_path), f"{prefix}{SCVI_DIR}"), model.scvi_info_, **scvi_kwargs
            )
        if adata is not None:  # scvi-tools only warns about genes in another order
            _check_same_genes(
                adata, np.asarray(model.get_var_names()).astype(str), "the saved model"
            )
        model._model_summary_string = model._summary()
        return model
