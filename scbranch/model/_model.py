"""``BranchedDiffusion``: the scvi-tools model class users train, save, load and sample from.

The class holds the user API (set-up, training, generation, interpretation, extension,
persistence) and delegates the rest: the representation to its :class:`~scbranch.model.Space`
(``_spaces.py``), the AnnData it returns to ``_output.py``, transmutation, hybrids and
trajectories to ``_interpretation.py``, anchored generation to ``_anchored.py``, saving and
loading to ``_persistence.py``, the numerics to :class:`~scbranch.module.BranchedDiffusionModule`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, ObsmField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin
from scvi.utils import setup_anndata_dsp

from .._constants import REGISTRY_KEYS
from .._logging import quiet_training_warnings
from .._utils import resolve_seed
from .._validation import check_class_sizes, check_setup_data
from ..io._rows import row_blocks
from ..module import VPSDE, BranchedDiffusionModule, BranchTree
from ..module._discovery import DiscoveryOptions
from ..module._discovery import standardization as data_standardization
from ..module._networks import count_parameters
from ..module._recipe import TrainingRecipe
from ..module._sampling import steps_for
from ..module._solvers import DEFAULT_SOLVER, default_spacing, resolve_solver
from ..tl._branch_hierarchy import resolve_hierarchy
from . import _anchored, _diagnostics, _extension, _interpretation, _persistence
from ._blocks import check_block_size, check_output, default_block_rows, generate_blocks
from ._calibration import class_variances, forget_calibrations, type_calibrations
from ._data import ResamplingDataSplitter, check_training_data
from ._extension import reference_sample
from ._output import check_memory, keep_layers, requested_cells, warn_if_untrained
from ._spaces import SPACES, ScviSpace, Space, auto_noise, space_name
from ._streaming import model_datamodule, use_block_loader
from ._training_plan import DiffusionTrainingPlan, keep_new_history, split_sizes, trainer_defaults

if TYPE_CHECKING:
    from scvi.model import SCVI

logger = logging.getLogger(__name__)


class BranchedDiffusion(UnsupervisedTrainingMixin, BaseModelClass):
    """Hierarchically branched diffusion model of cell types :cite:p:`Tseng2024`.

    A score network with one function per branch of a cell-type tree is trained on a
    representation of the cells: a latent (``obsm_key``, e.g. PCA), an scVI model's latent
    (:meth:`from_scvi_model`) or expression (``layer``/``.X``), each a
    :class:`~scbranch.model.Space`. Sampling follows the tree from t = 1 down, sharing the upper
    part of the reverse process between related types.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        Registry of a saved model (used by :meth:`load`; leave `None`).
    hierarchy
        The tree: `None` reuses ``adata.uns['scbranch_hierarchy']`` when it fits these data
        and the forward process, else discovers one; a :class:`~scbranch.module.BranchTree`
        or its ``to_dict()`` (used as is), a key of ``adata.uns``, or any hierarchy
        :func:`scbranch.tl.branch_hierarchy` takes (Newick, nested groups, ``obs`` columns).
    architecture
        ``"conditioned"`` (the default: one network conditioned on a branch embedding and
        adapter; its size does not grow with the number of types), ``"branched"`` (a trunk
        and one head per branch: the same quality at 10x the parameters and 4-5x the training
        time, ``docs/method.md``) or ``"flat"`` (label-guided baseline without the tree).
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
        Options of hierarchy discovery when one is discovered (the names of
        :class:`~scbranch.module.DiscoveryOptions`, as in :func:`scbranch.tl.branch_hierarchy`).
    t_sampling
        Distribution of diffusion times during training, ``"uniform"``, ``"logsnr"`` or
        ``"interpolant"``; `None`: ``"interpolant"`` for ``objective="flow"``, else ``"uniform"``.
    space
        Name of a registered :class:`~scbranch.model.Space` (``"pca"``, ``"scvi"``,
        ``"expression"``, or one of your own), or `None` to infer it from the set-up: an scVI
        model makes ``"scvi"``, ``obsm_key`` makes ``"pca"``, otherwise ``"expression"``.
    scvi_model
        A trained :class:`scvi.model.SCVI` or :class:`scvi.model.LinearSCVI` whose latent means
        are ``adata.obsm[obsm_key]``: generated latents are decoded by it into normalised
        expression and counts. :meth:`from_scvi_model` sets this up in one call.
    gaussian_skip
        The Gaussian the network corrects: ``"global"`` (one) or ``"per_branch"`` (docs/method.md).
    objective
        ``"eps"`` (noise prediction) or ``"flow"`` (flow matching's velocity of the linear
        interpolant, on the same process; docs/benchmarks/flow_matching.md).

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
        architecture: str = "conditioned",
        width: int = 256,
        n_trunk_blocks: int = 1,
        n_head_blocks: int = 3,
        beta0: float = VPSDE.beta0,
        beta1: float = VPSDE.beta1,
        t_min: float = VPSDE.t_min,
        min_cells_per_class: int = 3,
        discovery_kwargs: dict | None = None,
        t_sampling: str | None = None,
        space: str | Space | None = None,
        scvi_model: SCVI | None = None,
        gaussian_skip: str = "global",
        objective: str = "eps",
    ):
        super().__init__(adata, registry)
        sde = VPSDE(beta0=beta0, beta1=beta1, t_min=t_min)
        # a few standardised cells per class: where add_classes places new classes after load
        self.reference_samples_: dict | None = None
        self.extensions_: list[dict] = []
        self.hierarchy_record_: dict = {}
        # per type and dimension: the spread generated cells are calibrated to (_calibration.py)
        self.class_variances_: np.ndarray | None = None
        self._spread_calibrations: dict = {}  # sampler -> type -> factors, measured lazily
        standardization = None
        if adata is not None:
            classes = self.classes
            labels = np.asarray(self.get_from_registry(adata, REGISTRY_KEYS.LABELS_KEY))
            labels = labels.astype(np.int64).ravel()
            check_class_sizes(labels, classes, min_cells_per_class, self.labels_key)
            setup = self.registry_["setup_args"]
            if scvi_model is not None and space not in (None, "scvi"):
                raise ValueError("scvi_model= goes with the scVI space; drop `space=`.")
            name = space_name(space, setup, scvi_model)
            self.space = SPACES[name].fit(adata, setup, labels, len(classes), scvi_model=scvi_model)
            x = self.space.training_matrix(adata)
            standardization = data_standardization(x)  # one pass over the cells when on disk
            shift, scale = standardization[:2]
            options = DiscoveryOptions.from_kwargs(discovery_kwargs)
            use_rep, layer, target_sum = self.space.hierarchy_rep
            tree, self.hierarchy_record_ = resolve_hierarchy(
                hierarchy, adata, x, labels, classes, sde, options, groupby=self.labels_key,
                use_rep=use_rep, layer=layer, target_sum=target_sum,
                topology=self.space.topology_source(adata),
            )  # fmt: skip
            hierarchy = tree.to_dict()  # the resolved tree is what init_params_ saves
            self.class_counts_ = np.bincount(labels, minlength=len(classes))
            self.reference_samples_ = reference_sample(x, labels, shift, scale, len(classes))
        elif not isinstance(space, Space) or hierarchy is None:
            raise ValueError(
                "A model built without AnnData needs its `hierarchy` and a fitted `space` (as "
                "`BranchedDiffusion.load` gives them)."
            )
        else:
            self.space = space
            hierarchy = hierarchy.to_dict() if isinstance(hierarchy, BranchTree) else hierarchy
        self.module = self._module_cls(
            self.space.n_input, hierarchy, architecture=architecture, width=width,
            n_trunk_blocks=n_trunk_blocks, n_head_blocks=n_head_blocks, beta0=beta0, beta1=beta1,
            t_min=t_min, data_key=self.space.data_key, t_sampling=t_sampling,
            gaussian_skip=gaussian_skip, objective=objective,
        )  # fmt: skip
        if standardization is not None:
            self.module.set_standardization(*standardization)
            # one pass over the cells for the per-branch Gaussians and the training variances
            stats = self.module.class_statistics(row_blocks(x), labels, shift, scale)
            self.module.set_gaussian_skip(stats)
            self.class_variances_ = class_variances(stats, scale)
        if self.module.tree.classes != self.classes:
            raise ValueError(
                f"The hierarchy's classes {self.module.tree.classes} differ from the labels "
                f"{self.classes}; recompute the hierarchy on these data."
            )
        self._model_summary_string = self._summary()
        space = self.space.name  # saved by name; its state is saved by `save`
        self.init_params_ = self._get_init_params(locals())
        # a nested scVI model is saved in its own directory, never in the init parameters
        self.init_params_["non_kwargs"]["scvi_model"] = None

    def refresh_summary(self) -> None:
        """Recompute the model summary (after the tree or the classes changed).

        Examples
        --------
        >>> model.refresh_summary()  # doctest: +SKIP
        """
        self._model_summary_string = self._summary()

    def _summary(self) -> str:
        return (
            f"BranchedDiffusion ({self.module.architecture}, {self.module.objective} objective) on "
            f"{self.space.describe()} ({self.module.n_input} dims), {len(self.classes)} classes, "
            f"{self.module.tree.n_branches} branches, "
            f"{count_parameters(self.module.net):,} parameters; tree "
            f"{self.module.tree.to_newick(3)}"
        )

    @property
    def summary_string(self) -> str:
        """One paragraph describing the model (also in ``uns['scbranch']['model']``).

        Examples
        --------
        >>> print(model.summary_string)  # doctest: +SKIP
        """
        return self._model_summary_string

    @property
    def scvi_model(self) -> SCVI | None:
        """The scVI model that decodes this model's latents, or `None`.

        Examples
        --------
        >>> model.scvi_model is None  # a PCA or expression model  # doctest: +SKIP
        True
        """
        return self.space.nested_model

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
        target_sum: float | None = None,
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
        target_sum
            Expression models whose ``layer``/``.X`` holds RAW COUNTS: diffuse
            ``log1p(counts / total * target_sum)`` (scanpy's ``normalize_total`` + ``log1p``),
            computed a block of cells at a time, so an atlas opened with
            :func:`scbranch.io.read_backed` trains without loading or rewriting its matrix.
            Counts come for free (each type's size factors are its cells' totals over
            ``target_sum``). `None`: the matrix already holds log-normalised expression.
        **kwargs
            Used by :meth:`load` (``source_registry``).

        Examples
        --------
        >>> BranchedDiffusion.setup_anndata(  # doctest: +SKIP
        ...     adata, labels_key="cell_type", obsm_key="X_pca"
        ... )
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        check_setup_data(
            adata,
            labels_key=labels_key,
            obsm_key=obsm_key,
            layer=layer,
            counts_layer=counts_layer,
            target_sum=target_sum,
        )
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
        scvi_model: SCVI,
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
            Where the latent means are stored in ``adata.obsm`` (with scvi-tools' registration
            keys, docs/api.md; an existing entry must hold the same latents). Keep the scVI
            model as it is: one trained further is refused (its decoder no longer fits).
        **model_kwargs
            Options of :class:`BranchedDiffusion` (``width``, ``hierarchy``, ...). The default
            tree takes its topology from the expression (scVI's counts, log1p(CP10k)) and its
            branch times from the latent (``docs/spaces.md``).

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
        adata = ScviSpace.store_latent(scvi_model, adata, obsm_key, labels_key)
        cls.setup_anndata(adata, labels_key=labels_key, obsm_key=obsm_key)
        return cls(adata, scvi_model=scvi_model, **model_kwargs)

    # ------------------------------------------------------------------ registry helpers
    @property
    def classes(self) -> list[str]:
        """Cell types the model knows, in training order.

        Examples
        --------
        >>> model.classes[:2]  # doctest: +SKIP
        ['CD14+ Monocyte', 'CD19+ B']
        """
        mapping = self.get_state_registry(REGISTRY_KEYS.LABELS_KEY).categorical_mapping
        return [str(c) for c in mapping]

    @property
    def labels_key(self) -> str:
        """Column of ``obs`` that holds the cell types.

        Examples
        --------
        >>> model.labels_key  # doctest: +SKIP
        'cell_type'
        """
        return self.get_state_registry(REGISTRY_KEYS.LABELS_KEY).original_key

    @property
    def tree(self) -> BranchTree:
        """The branch tree of the model (:class:`~scbranch.module.BranchTree`).

        Examples
        --------
        >>> model.tree.to_newick(2)  # doctest: +SKIP
        "(('CD14+ Monocyte':0.63,Dendritic:0.63):0.07,...);"
        """
        return self.module.tree

    def get_from_registry(self, adata: AnnData, key: str) -> np.ndarray:
        """Data registered under ``key`` for ``adata``.

        Parameters
        ----------
        adata
            An AnnData set up for this model (:meth:`setup_anndata`, or the training data).
        key
            A registry key: ``"labels"`` (the integer code of each cell's type), ``"X"`` (the
            expression or layer), ``"rep"`` (the latent of ``obsm_key``).

        Returns
        -------
        The registered array, one row per cell.

        Examples
        --------
        >>> labels = model.get_from_registry(adata, "labels")  # doctest: +SKIP
        """
        return self.get_anndata_manager(adata, required=True).get_from_registry(key)

    def encode(self, adata: AnnData, what: str = "the cells") -> np.ndarray:
        """Cells of ``adata`` in the model's data space (its :class:`~scbranch.model.Space`).

        Parameters
        ----------
        adata
            Cells in the model's representation: ``obsm[obsm_key]`` in the same latent space,
            the model's genes (expression models), counts of the scVI model's genes (scVI).
        what
            How to name the cells in error messages.

        Returns
        -------
        Array (cells x dimensions), not standardised.

        Examples
        --------
        >>> z = model.encode(heldout)  # doctest: +SKIP
        """
        return self.space.encode(adata, what)

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int = 64,
        lr: float = TrainingRecipe.lr,
        ema_decay: float = TrainingRecipe.ema_decay,
        class_balance: float = 0.5,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float = 1.0,
        validation_size: float | None = None,
        loader: str = "auto",
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train the score network with Lightning.

        Parameters
        ----------
        max_epochs
            Passes over the training cells. Default: about 100, kept within 1,000-16,000
            optimiser steps (docs/benchmarks/budget_curve.md; the floor: docs/evaluation.md).
        batch_size
            Cells per optimiser step (per device under DDP). Small batches matter: larger ones
            gave under-dispersed cells at the same number of steps (see docs/method.md).
        lr
            Peak learning rate of Adam (decays to 0 with a cosine schedule).
        ema_decay
            Decay of the weight EMA used for sampling (0 disables it).
        class_balance
            Oversample rare types: 0 trains on natural frequencies, 1 shows every type equally
            often, 0.5 weighs n cells ~sqrt(n); resampled every epoch, so all cells are seen.
        accelerator, devices
            Lightning device selection, e.g. ``accelerator="gpu", devices=-1,
            strategy="ddp_find_unused_parameters_true"`` for all GPUs (from a script). On a
            CUDA GPU the heads of a batch run as batched matmuls (docs/benchmarks/gpu.md).
        train_size
            Fraction of cells to train on; the default uses every cell (a generator should see
            all of them). Set < 1 with ``check_val_every_n_epoch=k`` to follow
            ``model.history["validation_loss"]``: the EMA weights' denoising error on the held-out
            cells at fixed times and draws (``get_denoising_error``'s); ``early_stopping=True``
            watches it and keeps the weights of its lowest point.
        validation_size
            Fraction of cells for validation (default ``1 - train_size``); given alone, the
            model trains on the other ``1 - validation_size``.
        loader
            How training batches are read. ``"blocks"``: blocks of contiguous cells into a
            shuffled buffer (an atlas on disk streams at disk speed, the matrix is never
            loaded), with each step's noise drawn for the whole multi-device batch, so training
            on N devices matches training on one with N times the batch (docs/scale.md).
            ``"scvi"``: scvi-tools' loader (scattered rows; in-memory data). ``"auto"``:
            ``"blocks"`` when the expression is on disk or normalised on the way in
            (``target_sum``) or when training on several devices, else ``"scvi"``.
        plan_kwargs
            Options of :class:`~scbranch.model.DiffusionTrainingPlan` (``weight_decay``, ...).
        datasplitter_kwargs
            Options of the scvi-tools data splitter.
        **trainer_kwargs
            Passed to the Lightning trainer (``gradient_clip_val`` defaults to 1.0).

        Returns
        -------
        Nothing: trained in place (``model.is_trained``, ``model.history``). As for scvi-tools
        models, ``scvi.settings.seed = 0`` before building the model (the CLI's ``--seed``)
        makes building and training it reproducible.

        Examples
        --------
        >>> model.train(max_epochs=300)  # doctest: +SKIP
        >>> model.train(accelerator="gpu", devices=1)  # doctest: +SKIP
        """
        check_training_data(self)  # and replays our obs['_scvi_labels'] (another model's?)
        forget_calibrations(self)  # measured on the network as it was
        train_size, validation_size = split_sizes(train_size, validation_size)
        max_epochs, restore = trainer_defaults(
            trainer_kwargs, max_epochs, self.adata.n_obs, batch_size, train_size, validation_size
        )
        plan_kwargs = {"lr": lr, "ema_decay": ema_decay, **restore, **(plan_kwargs or {})}
        loader_kwargs = dict(datasplitter_kwargs or {})  # block_rows, blocks_per_buffer
        datasplitter_kwargs = {
            "data_and_attributes": [self.module.data_key, REGISTRY_KEYS.LABELS_KEY],
            "class_balance": class_balance,
            **(datasplitter_kwargs or {}),
        }
        if use_block_loader(self, loader, devices, trainer_kwargs):
            data = {
                "datamodule": model_datamodule(
                    self, devices, accelerator, batch_size=batch_size, train_size=train_size,
                    validation_size=validation_size, class_balance=class_balance,
                    trainer_kwargs=trainer_kwargs, **loader_kwargs,
                )
            }  # fmt: skip
        else:  # scvi-tools' own splitter and loader, class-balanced afresh every epoch
            trainer_kwargs.setdefault("reload_dataloaders_every_n_epochs", int(class_balance > 0))
            data = dict(train_size=train_size, batch_size=batch_size)
            data.update(validation_size=validation_size, datasplitter_kwargs=datasplitter_kwargs)
        with quiet_training_warnings(), keep_new_history(self):
            return super().train(
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                plan_kwargs=plan_kwargs,
                **data,
                **trainer_kwargs,
            )

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(
        self,
        n_cells: int | Mapping[str, int] = 100,
        *,
        labels: Sequence[str] | None = None,
        solver: str = DEFAULT_SOLVER,
        n_steps: int | None = None,
        share: bool = True,
        seed: int | None = None,
        spacing: str | None = None,
        residual_noise: bool | str = "auto",
        counts: bool | None = None,
        batch: str | None = None,
        batch_size: int | None = None,
        calibrate_spread: bool = False,
        trajectory_times: Sequence[float] | None = None,
        node_weights: str = "size",
        progress_bar: bool = True,
        out: str | os.PathLike | None = None,
        overwrite: bool = False,
        block_size: int | None = None,
        devices: Sequence[str | torch.device] | None = None,
        layers: Sequence[str] | None = None,
    ) -> AnnData | Path:
        """Generate cells of any of the model's cell types, as a NEW AnnData or to disk.

        Cells are made in blocks of at most ``block_size`` cells (each sampled and decoded
        with its own seed derived from ``seed``): a request is fully determined by the model,
        ``n_cells``, ``seed`` and the block size, whether it is kept in memory, written to
        ``out`` or spread over ``devices``. A request that fits in one block is one sampler
        run with ``seed`` itself.

        Parameters
        ----------
        n_cells
            Cells per type (an int, for every type in ``labels``), or a dict
            ``{cell type or node: count}`` (or a Series, e.g. ``value_counts()``). A named node
            of the tree (a group of a given hierarchy, or one named with ``tree.name_node``)
            stands for the mixture of the types below it: its cells are spread over them
            (``node_weights``), each records its type in ``obs[labels_key]`` and the node in
            ``obs['scbranch_requested_node']``.
        labels
            Types to generate when ``n_cells`` is an int (default: all), each named once.
        solver
            A solver of :data:`~scbranch.module.SOLVERS`: ``"em"`` (reverse SDE, Euler-Maruyama,
            1 call per step; alias ``"sde"``; the default: closest to real cells), ``"ei"``
            (the reverse SDE's exponential integrator in log-SNR, 1 call per step), ``"heun"``
            (probability-flow ODE, deterministic, 2 calls per step; alias ``"ode"``),
            ``"dpm2m"`` (probability-flow ODE, multistep, 1 call per step) or ``"pc"`` (EM
            + Langevin corrector, 2 calls per step: the paper's sampler).
        n_steps
            Steps from t = 1 to ``t_min``; the grid always contains every branch time.
            `None`: 25, or, for trees with more branch points than 25 steps can hold, one
            step per segment plus 12 (recorded in ``uns['scbranch']['params']``).
        share
            Share the reverse path above branch points between types (fewer network calls;
            cells of different types share noisy ancestors, and depend on what else is asked
            for). `False`: independent paths, the same whatever else is asked for.
        seed
            Random seed; `None` draws one (it is recorded in ``uns['scbranch']['params']``).
        spacing
            Step spacing, ``"logsnr"``, ``"t"`` or ``"interpolant"``; `None`: ``"t"`` for ``"em"``
            and ``"pc"`` (Song et al.), ``"interpolant"`` for ``"ddim"``, else ``"logsnr"``.
        residual_noise
            PCA-space models: what decoded cells carry beyond their PCA profile (the latent is
            unchanged). `False`: the denoised profile (can dip below 0). `True`/``"gaussian"``:
            per-gene Gaussian noise of real cells' size outside the PCs (values can be
            negative). ``"nb"``: counts from a per-gene negative binomial around the decoded
            mean times the class's ratio per gene (what it holds outside the PCs), library sizes
            of the class (needs ``counts_layer``; ``layers['counts']`` with ``counts=True``),
            ``.X`` their log-normalisation with its PC scores set back to the generated ones
            (counting noise and what the PCs leave out, none added to the scores). ``"auto"``:
            ``"nb"`` for PCA models set up with ``counts_layer``, else `False` (also with
            ``trajectory_times``; docs/benchmarks/noise_models.md). To add cells to a
            classifier's training set, `False` (docs/evaluation.md, useful cells).
        counts
            Also return counts in ``layers['counts']``. scVI models do unless `False` (sampled
            from scVI's likelihood with library sizes drawn from the class); with `False`,
            ``.X`` is the expected log-normalised counts (exact). Expression and PCA
            models do with ``counts=True`` if set up with ``counts_layer``: the expression
            (negative values set to 0; expression models cap and rescale it, docs/spaces.md)
            goes back through a class's size factor, ``s * expm1(x)``, stochastically rounded.
        batch
            scVI models set up with a batch: the batch to decode into (default: the most common
            one in the training data).
        batch_size
            At most this many cells per forward pass (memory on large requests); the cells
            depend on it only through float rounding. `None`: 8,192 on CPU (faster than one
            large pass), no limit on GPU.
        calibrate_spread
            Give each type's cells, per dimension of the diffused representation, the spread of
            its training cells around the centre of the model's cells (measured once per type
            and sampler on 500 cells): a network trained on a type's few dozen cells makes its
            cells wider (docs/evaluation.md, "Spread calibration"). Not for trajectories.
        trajectory_times
            Return trajectories instead of cells: every cell's state at these times (in
            ``[t_min, 1]``, or 0 for the final cell), one row per (cell, time) with the columns
            of :meth:`transmute` (noisy state in ``obsm['scbranch_state']``; the clean estimate
            E[x_0 | x_t] in ``obsm[obsm_key]`` and ``.X``). The times join the step grid, so
            the final cells differ slightly from a run without recording.
        node_weights
            How a node's cells are spread over its types: ``"size"`` (in proportion to their
            training cells) or ``"uniform"``.
        progress_bar
            Show one progress bar over the steps of all blocks.
        out
            Write the cells to this ``.h5ad`` file or ``.zarr`` store (by its suffix) instead
            of returning them: each block is written as soon as it is decoded (counts sparse,
            ``.X`` dense in the PCA and expression spaces), so memory holds one block plus
            every cell's ``obs`` row, whatever the number of cells. The file appears under
            its name only when complete; an error or Ctrl-C leaves no file (and no temporary
            one) behind, and an existing file as it was. Trajectories (``trajectory_times``)
            are written in one block.
        overwrite
            Replace an existing ``out`` (only once the new one is complete); without it an
            existing ``out`` raises :class:`FileExistsError` before any work.
        block_size
            Cells per block. `None`: what fits in about 256 MB while decoding with counts,
            from the model's dimension and genes (1,024 to 65,536 cells; recorded in
            ``uns['scbranch']['params']['block_rows']``). The cells depend on it: pass the
            same value to reproduce a run made with another one.
        devices
            Spread the blocks over these devices (e.g. ``["cuda:0", "cuda:1"]``): each gets
            a copy of the network and a thread, and blocks come back in order, so the cells
            are those of a single-device run (up to float rounding between device types;
            identical on devices of one type). Decoding runs on the model's device. `None`:
            the model's device. Not for trajectories.
        layers
            Layers to keep, e.g. ``["counts"]`` (default: every layer the model makes). scVI
            models also make ``layers['scale']``, dense normalised expression: at 2,000 genes
            8 kB per cell, most of a large file written to ``out``.

        Returns
        -------
        With ``out``: the path written. Otherwise an AnnData with ``obs[labels_key]``
        (categorical, all training types in training order), ``obs['scbranch_generated']``,
        the latent in ``obsm[obsm_key]`` (latent models), expression in ``.X`` when the map to
        genes is known (expression models: clipped at 0; PCA models with ``"nb"`` noise,
        dense: the counts log-normalised with their PC scores set to the generated ones, so
        values can dip below 0; for scanpy's statistics, ``counts=True`` and normalize_total +
        log1p of ``layers['counts']`` give plain log-normalised counts; scVI models: the counts
        log-normalised to 10,000 per cell, sparse, with scVI's normalised expression in
        ``layers['scale']`` and the totals the counts are drawn around in
        ``obs['scbranch_library_size']``), counts in ``layers['counts']`` (sparse CSR; see
        ``counts``), and provenance (parameters, tree, package versions) in
        ``uns['scbranch']`` (with ``block_rows`` and ``n_blocks``). The file written to
        ``out`` holds exactly this AnnData (cells ``gen0``, ``gen1``, ... in block order, in
        every call: ``ad.concat([gen_a, gen_b], index_unique="-")`` keeps two calls' apart).

        Examples
        --------
        >>> gen = model.generate(  # doctest: +SKIP
        ...     n_cells={"CD19+ B": 1000}, solver="heun", n_steps=30, seed=0
        ... )
        >>> tr = model.generate(100, trajectory_times=[1.0, 0.6, 0.3, 0.0])  # doctest: +SKIP
        >>> model.generate(100_000, counts=True, seed=0, out="cells.zarr")  # doctest: +SKIP
        PosixPath('cells.zarr')
        >>> model.generate(10**6, out="cells.h5ad", devices=["cuda:0", "cuda:1"])  # doctest: +SKIP
        PosixPath('cells.h5ad')
        """
        warn_if_untrained(self, "Generating")
        solver = resolve_solver(solver)
        spacing = default_spacing(solver) if spacing is None else spacing
        residual_noise = auto_noise(self.space, residual_noise, trajectory_times is not None)
        options = self.space.resolve_options(
            counts=counts, batch=batch, residual_noise=residual_noise
        )
        options = keep_layers(self.space, options, layers)
        times = None
        if trajectory_times is not None:
            times = _interpretation.check_trajectory_times(
                self, trajectory_times, counts, residual_noise,
                calibrate_spread=calibrate_spread, devices=devices,
            )  # fmt: skip
        block_rows = check_block_size(block_size) or default_block_rows(self.space)
        if out is not None:  # before any work
            out = check_output(out, overwrite, reading=[self])
        if devices is not None:
            devices = [torch.device(d) for d in devices]
            if not devices:
                raise ValueError("`devices` is empty; pass None for the model's device.")
        seed = resolve_seed(seed)
        requested, origins = requested_cells(
            self.tree, n_cells, labels, class_counts=self.class_counts_,
            node_weights=node_weights, rng=np.random.default_rng([seed, 4]),
        )  # fmt: skip
        n_total = sum(requested.values())
        n_steps = steps_for(
            self.tree, self.module.sde, requested,
            share=share and self.module.follows_tree, n_steps=n_steps,
            record_times=times,
        )  # fmt: skip
        settings = {
            "solver": solver, "n_steps": n_steps, "share": share, "seed": seed, "spacing": spacing
        }  # fmt: skip
        if times is None:
            sampler = {"solver": solver, "n_steps": n_steps, "spacing": spacing}
            calibrations = type_calibrations(self, requested, sampler) if calibrate_spread else None
            settings["calibrate_spread"] = calibrations is not None
            # to disk only one block must fit (and every cell's obs row)
            check_memory(
                self.space, n_total, options, block_rows=None if out is None else block_rows
            )
            return generate_blocks(
                self, requested, origins,
                options=options, seed=seed, block_rows=block_rows, settings=settings,
                sample_options={
                    "solver": solver, "n_steps": n_steps, "share": share, "spacing": spacing,
                    "batch_size": batch_size,
                },
                out=out, overwrite=overwrite, devices=devices, progress_bar=progress_bar,
                calibrations=calibrations,
            )  # fmt: skip
        # trajectories: one sampler run (their rows are (cell, time) pairs, not blocks of cells)
        return _interpretation.run_trajectories(
            self, requested, times, options, settings,
            batch_size=batch_size, block_rows=block_rows, out=out, overwrite=overwrite,
            progress_bar=progress_bar, origins=origins,
        )  # fmt: skip

    # interpretation, extension, diagnostics: the functions are the methods (docs there)
    transmute = _interpretation.transmute
    generate_anchored = _anchored.generate_anchored
    hybrids = _interpretation.hybrids
    add_classes = _extension.add_classes
    get_denoising_error = _diagnostics.get_denoising_error

    # ------------------------------------------------------------------ persistence
    save = _persistence.save
    load = classmethod(_persistence.load)
    load_registry = staticmethod(_persistence.load_registry)  # scvi-tools': from a pickle
    view_setup_args = staticmethod(_persistence.view_setup_args)  # (as this one)
    convert_legacy_save = classmethod(_persistence.convert_legacy_save)  # for scvi's pickles

    def to_device(self, device: str | int | torch.device) -> None:
        """Move the model (and a nested scVI model) to ``device``.

        Parameters
        ----------
        device
            A torch device or its name (``"cpu"``, ``"cuda:0"``) or a GPU index.

        Examples
        --------
        >>> model.to_device("cpu")  # doctest: +SKIP
        """
        super().to_device(device)
        self.space.to_device(device)
