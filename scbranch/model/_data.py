"""Training data loading: scvi-tools' DataSplitter with optional class-balanced resampling."""

from __future__ import annotations

import numpy as np
import torch
from scvi.dataloaders import AnnDataLoader, DataSplitter

from .._constants import REGISTRY_KEYS
from ..io._rows import check_store_present


def balanced_indices(labels: np.ndarray, class_balance: float, seed: int | list[int]) -> np.ndarray:
    """Positions into ``labels`` resampled so that class ``c`` appears ~ ``n_c**(1 - b)`` times.

    ``b = class_balance``: 0 keeps natural frequencies, 1 shows every class equally often. The
    epoch keeps its size; every cell of a class is repeated ``floor(r)`` times and a seeded
    random subset once more. A class shown fewer times than it has cells (``r < 1``) is a
    random subset of them, so the loaders draw a new resample every epoch (seeded by epoch):
    over the epochs every cell is trained on.

    Examples
    --------
    >>> idx = balanced_indices(np.array([0] * 90 + [1] * 10), 1.0, seed=0)
    >>> np.bincount(np.array([0] * 90 + [1] * 10)[idx]).tolist()
    [50, 50]
    """
    if not 0.0 <= class_balance <= 1.0:
        raise ValueError(f"class_balance must lie in [0, 1], got {class_balance}.")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    target = counts ** (1.0 - class_balance)
    target = target / target.sum() * len(labels)
    out = []
    for c, n, want in zip(classes, counts, target, strict=True):
        members = np.flatnonzero(labels == c)
        reps, extra = divmod(int(round(want)), n)
        out.append(np.tile(members, reps))
        out.append(rng.choice(members, extra, replace=False))
    return np.concatenate(out)


def check_training_data(model) -> None:
    """Raise unless ``model`` holds the AnnData it was set up on; replay its registry on it.

    Another scvi-tools model set up on the same AnnData rewrites ``obs['_scvi_labels']``, so
    the registry is validated (and replayed) before every training run.
    """
    if model.adata is None:
        raise ValueError(
            "This model holds no AnnData to train on (loaded without it): load it with "
            "`BranchedDiffusion.load(dir_path, adata)`, or save it with `save_anndata=True`."
        )
    for matrix in (model.adata.X, *model.adata.layers.values()):
        check_store_present(matrix)  # before Lightning starts: a removed store reads as zeros
    known = model.adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY)
    # as text: model.classes are the registry's categories as str (integer cluster ids too)
    present = {str(c) for c in known["categorical_mapping"]}
    missing = [c for c in model.classes if c not in present]
    if missing:  # add_classes' types: training on the old cells alone would move their weights
        raise ValueError(
            f"The model's AnnData holds no cells of {missing}, added with add_classes: train() "
            "would move the weights they use without showing them. To train every type "
            "together, save the model and load it with cells of every type: "
            "`model.save(d); model = BranchedDiffusion.load(d, adata=all_cells)`."
        )
    model._validate_anndata(model.adata)


class ResamplingDataSplitter(DataSplitter):
    """:class:`scvi.dataloaders.DataSplitter` whose training loader can balance classes.

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData.
    class_balance
        0 (natural class frequencies) to 1 (every class equally often); see
        :func:`balanced_indices`.
    resample_seed
        Seed of the resampling; epoch ``k`` draws with ``[resample_seed, k]`` (the trainer
        reloads the training loader every epoch, ``reload_dataloaders_every_n_epochs=1``).
    **kwargs
        Passed to :class:`~scvi.dataloaders.DataSplitter`.
    """

    def __init__(
        self, adata_manager, *, class_balance: float = 0.0, resample_seed: int = 0, **kwargs
    ):
        super().__init__(adata_manager, **kwargs)
        self.class_balance = float(class_balance)
        self.resample_seed = resample_seed

    def train_dataloader(self):  # noqa: D102
        if self.class_balance == 0.0:
            return super().train_dataloader()
        labels = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel()[
            self.train_idx
        ]
        # a fresh resample per epoch: one drawn once would leave the same cells of every
        # large type out of training for good (123 of pbmc68k_reduced's 700 at 0.5)
        epoch = int(self.trainer.current_epoch) if self.trainer is not None else 0
        seed = [int(self.resample_seed), epoch]
        indices = self.train_idx[balanced_indices(labels, self.class_balance, seed)]
        return AnnDataLoader(
            self.adata_manager,
            indices=indices,
            shuffle=True,
            drop_last=self.drop_last,
            load_sparse_tensor=self.load_sparse_tensor,
            pin_memory=self.pin_memory,
            **self.data_loader_kwargs,
        )

    def val_dataloader(self):  # noqa: D102
        loader = super().val_dataloader()
        if loader is not None:
            # a loader draws a seed from its generator at every pass; from torch's global one,
            # which the training noise comes from, validating would change the training
            loader.generator = torch.Generator()
        return loader
