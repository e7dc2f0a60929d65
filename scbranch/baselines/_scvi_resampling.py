"""scVI resampling: latents drawn from a class's aggregated posterior, decoded to counts."""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from .._validation import check_finite
from ._base import Baseline

logger = logging.getLogger(__name__)


def _check_counts(m, where: str) -> None:
    values = m.data if sp.issparse(m) else np.asarray(m).ravel()
    if values.size and (values.min() < 0 or not np.all(values == np.round(values))):
        raise ValueError(
            f"{where} must hold raw counts (non-negative integers) for scVI; it holds other "
            "values (log-normalised?). Pass the layer with counts, e.g. `counts_layer='counts'`."
        )


class ScviResampling(Baseline):
    """Generate a type by decoding latents of its real training cells, as scVI users do.

    An :class:`scvi.model.SCVI` is trained on the training counts. To generate ``n`` cells of
    type ``c``: draw ``n`` training cells of type ``c`` (with replacement), draw one latent from
    each cell's posterior ``q(z | x)`` (their mixture is the class's aggregated posterior),
    decode it with the cell's observed library size and sample counts from the
    negative-binomial likelihood. ``.X`` holds the counts log-normalised (CP10k + log1p), like
    real cells, and ``layers['counts']`` the counts.

    Parameters
    ----------
    adata
        Training cells with counts in ``layers[counts_layer]`` (or ``.X`` when `None`).
    labels_key
        Column of ``adata.obs`` with the cell types.
    counts_layer
        Layer with raw counts.
    n_latent, n_hidden, n_layers, gene_likelihood
        Options of :class:`scvi.model.SCVI`.
    max_epochs
        Training epochs (`None`: scvi-tools' heuristic).
    seed
        Seed of scvi-tools (initialisation and minibatches).
    **train_kwargs
        Passed to :meth:`scvi.model.SCVI.train` (e.g. ``accelerator``).

    Examples
    --------
    >>> import scbranch as sb
    >>> adata = sb.datasets.pbmc68k()
    >>> base = sb.baselines.ScviResampling(adata, "cell_type", max_epochs=5)  # doctest: +SKIP
    >>> base.generate(n_cells=100, seed=0)  # doctest: +SKIP
    """

    name = "scVI resampling"

    def __init__(
        self,
        adata: AnnData,
        labels_key: str,
        counts_layer: str | None = "counts",
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        gene_likelihood: str = "nb",
        max_epochs: int | None = None,
        seed: int = 0,
        min_cells_per_class: int = 3,
        **train_kwargs,
    ):
        import scvi

        super().__init__(adata, labels_key, min_cells_per_class)
        if counts_layer is not None and counts_layer not in adata.layers:
            raise KeyError(
                f"counts_layer={counts_layer!r} is not in adata.layers (available: "
                f"{list(adata.layers.keys())}); pass the layer with raw counts or None for .X."
            )
        counts = adata.layers[counts_layer] if counts_layer is not None else adata.X
        check_finite(counts, f"adata.layers[{counts_layer!r}]" if counts_layer else "adata.X")
        _check_counts(counts, f"adata.layers[{counts_layer!r}]" if counts_layer else "adata.X")
        # a private copy: scvi-tools' setup writes into .uns/.obs, the user's object stays as is
        data = AnnData(
            X=sp.csr_matrix(counts, dtype=np.float32), obs=adata.obs[[labels_key]].copy()
        )
        data.var_names = adata.var_names.copy()
        scvi.settings.seed = seed
        scvi.model.SCVI.setup_anndata(data)
        self.model_ = scvi.model.SCVI(
            data,
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            gene_likelihood=gene_likelihood,
        )
        train_kwargs.setdefault("enable_progress_bar", False)
        self.model_.train(max_epochs=max_epochs, **train_kwargs)
        qz_mean, qz_var = self.model_.get_latent_representation(return_dist=True)
        self.qz_mean_ = np.asarray(qz_mean, dtype=np.float32)
        self.qz_std_ = np.sqrt(np.asarray(qz_var, dtype=np.float32))
        self.library_ = np.asarray(data.X.sum(1), dtype=np.float32).ravel()
        self.var_names_ = np.asarray(adata.var_names).astype(str)

    def _sample(self, counts, rng, seed):
        import torch

        source = np.concatenate(
            [
                rng.choice(np.flatnonzero(self.labels_ == c), size=n, replace=True)
                for c, n in counts.items()
            ]
        )
        z = self.qz_mean_[source] + self.qz_std_[source] * rng.standard_normal(
            (len(source), self.qz_mean_.shape[1]), dtype=np.float32
        )
        module = self.model_.module
        device = next(module.parameters()).device
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = module.generative(
                z=torch.as_tensor(z, device=device),
                library=torch.log(torch.as_tensor(self.library_[source], device=device))[:, None],
                batch_index=torch.zeros((len(source), 1), dtype=torch.long, device=device),
            )
            sampled = out["px"].sample().cpu().numpy()
        sampled = sp.csr_matrix(sampled.astype(np.float32))
        totals = np.asarray(sampled.sum(1)).ravel()
        scale = 1e4 / np.maximum(totals, 1.0)
        x = sp.diags(scale.astype(np.float32)) @ sampled
        x.data = np.log1p(x.data)
        return {
            "X": sp.csr_matrix(x, dtype=np.float32),
            "var_names": self.var_names_,
            "obsm": {"X_scVI": z},
            "layers": {"counts": sampled},
        }
