"""An scVI model as scbranch's latent space: latent means in; normalised expression and counts out.

The diffusion runs on scVI's latent means; generated latents go back through scVI's decoder
(``module.generative``) with a library size and a batch, and counts are drawn from its
likelihood. Everything here works on private AnnData copies: scvi-tools writes ``_scvi_*``
columns into whatever it is given, and the user's object must stay as it is.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from contextlib import contextmanager
from functools import partial

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from .._logging import quiet_training_warnings
from .._validation import check_counts, check_finite, check_genes, check_obs_key, to_dense
from ..io._rows import (
    RowMatrix,
    count_nonfinite,
    is_on_disk,
    iter_blocks,
    read_block,
    read_rows,
)
from ._counts import normalize_block
from ._expected_log1p import expected_log1p
from ._plain import read_plain, save_tensors, write_plain

logger = logging.getLogger(__name__)

#: scvi-tools model classes whose decoder scbranch drives
SUPPORTED_SCVI = ("SCVI", "LinearSCVI")
#: likelihoods that give counts
COUNT_LIKELIHOODS = ("nb", "zinb", "poisson")
#: sub-directory of a saved scbranch model holding the scVI model
SCVI_DIR = "scvi"
#: files of the scVI model in that directory: tensors, and its set-up as plain data
SCVI_WEIGHTS = "model.safetensors"
SCVI_CONFIG = ("config.json", "config.npz")
#: cells decoded per forward pass (memory: the decoder's output is cells x genes)
DECODE_CHUNK = 4096
#: cells of an atlas on disk that scVI's constructor sees (the rest stream during training)
INIT_CELLS = 10_000
#: scVI's default epochs: scvi-tools' heuristic (400 up to 20,000 cells, 8e6 / n_cells above:
#: a fixed number of cell passes), but at least MIN_CELL_PASSES / n_cells epochs (at most
#: SMALL_DATA_EPOCHS): 800 epochs up to 750 cells, scvi-tools' 400 from 1,500. The diffusion
#: learns scVI's latent and is judged by the cells scVI decodes from it. On fresh splits 800
#: epochs against 400 lowered the scVI space's AUROC by 0.040 on 351 cells (pbmc68k_reduced),
#: 0.011 on 357 and 0.025 on 702 (pbmc3k's types), and tied on 1,001 (600 and 800 epochs) and
#: on 1,318 (pbmc3k), where 400 epochs are 527,000 cell passes; the cells' dispersion rose by
#: 0.02-0.05 x the control below 750 cells (docs/evaluation.md, 'scVI trained longer').
SMALL_DATA_EPOCHS = 800
MIN_CELL_PASSES = 600_000


@contextmanager
def _quiet_scvi():
    """Silence scvi-tools' INFO chatter (set-up transfers, "file already downloaded")."""
    scvi_logger = logging.getLogger("scvi")
    level = scvi_logger.level
    scvi_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        scvi_logger.setLevel(level)


def default_scvi_epochs(n_cells: int) -> int:
    """Training epochs of scVI when none are given: scvi-tools' heuristic, longer on small data.

    scvi-tools trains 400 epochs up to 20,000 cells and ``8e6 / n`` above. scbranch keeps
    that, but trains at least ``600,000 / n`` epochs (at most 800): 800 on up to 750 cells,
    then fewer, and scvi-tools' 400 from 1,500 cells on. On 351-702 training cells 800 epochs
    gave better cells than 400; on 1,318 they tied (docs/evaluation.md, "scVI trained longer").

    Examples
    --------
    >>> [default_scvi_epochs(n) for n in (100, 702, 1_000, 1_500, 1_846, 20_000, 100_000, 10**8)]
    [800, 800, 600, 400, 400, 400, 80, 1]
    """
    from scvi.model._utils import get_max_epochs_heuristic

    if isinstance(n_cells, bool) or not isinstance(n_cells, int | np.integer) or n_cells < 1:
        raise ValueError(f"n_cells must be a positive integer (number of cells), got {n_cells!r}.")
    n = int(n_cells)
    small_data = min(SMALL_DATA_EPOCHS, round(MIN_CELL_PASSES / n))
    return int(max(get_max_epochs_heuristic(n), small_data))


def fit_scvi(
    adata: AnnData,
    *,
    counts_layer: str | None = "counts",
    batch_key: str | None = None,
    linear: bool = False,
    n_latent: int = 10,
    n_hidden: int = 128,
    n_layers: int = 1,
    gene_likelihood: str = "nb",
    max_epochs: int | None = None,
    seed: int = 0,
    **train_kwargs,
):
    """Train an scVI (or LinearSCVI) model on the raw counts of ``adata``, leaving it untouched.

    The model is set up on a private copy holding only the counts (and the batch column), so
    ``adata`` gets no ``_scvi_*`` columns; it reads the same ``counts_layer``, so it applies
    to ``adata`` afterwards (e.g. :meth:`~scbranch.BranchedDiffusion.from_scvi_model`).

    Parameters
    ----------
    adata
        Cells with raw counts in ``layers[counts_layer]`` (``.X`` when `None`).
    counts_layer
        Layer with raw counts (non-negative integers); log-normalised data raise an error.
    batch_key
        Column of ``adata.obs`` with batches, or `None`.
    linear
        Train :class:`scvi.model.LinearSCVI` (linear decoder, interpretable loadings) instead
        of :class:`scvi.model.SCVI`.
    n_latent, n_hidden, n_layers, gene_likelihood
        Options of the scvi-tools model (``gene_likelihood``: ``"nb"``, ``"zinb"`` or
        ``"poisson"``).
    max_epochs
        Training epochs. `None`: :func:`default_scvi_epochs` (scvi-tools' heuristic, but 800
        epochs on up to 750 cells and more than 400 below 1,500), because the scVI space's
        generated cells improve with scVI's training on small data (docs/evaluation.md).
    seed
        ``scvi.settings.seed`` (initialisation and minibatches).
    **train_kwargs
        Passed to the model's ``train`` (e.g. ``accelerator``, ``early_stopping``).

    Returns
    -------
    The trained scvi-tools model.

    Examples
    --------
    >>> import scbranch as sb
    >>> adata = sb.datasets.pbmc68k()
    >>> vae = sb.model.fit_scvi(adata, counts_layer="counts", max_epochs=5)  # doctest: +SKIP
    """
    import scvi

    if gene_likelihood not in COUNT_LIKELIHOODS:
        raise ValueError(
            f"gene_likelihood={gene_likelihood!r} gives no counts; use one of {COUNT_LIKELIHOODS}."
        )
    if counts_layer is not None and counts_layer not in adata.layers:
        raise KeyError(
            f"counts_layer={counts_layer!r} is not in adata.layers (available: "
            f"{list(adata.layers.keys())}); pass the layer with raw counts, or None for .X."
        )
    counts = adata.layers[counts_layer] if counts_layer is not None else adata.X
    where = f"adata.layers[{counts_layer!r}]" if counts_layer else "adata.X"
    on_disk = is_on_disk(counts)
    if on_disk:  # an atlas on disk: checked and trained a block of cells at a time
        bad = count_nonfinite(counts)
        if bad:
            raise ValueError(f"{where} contains {bad} NaN or infinite value(s).")
        check_counts(read_block(counts, 0, min(counts.shape[0], 10_000)), where)
    else:
        check_finite(counts, where)
        check_counts(counts, where)
    obs = pd.DataFrame(index=adata.obs_names.copy())
    if batch_key is not None:
        check_obs_key(adata, batch_key, "batch_key")
        obs[batch_key] = adata.obs[batch_key].astype(str).astype("category")
    rows = slice(None)
    if on_disk:
        # scVI's constructor reads every cell (its library-size prior, used only with
        # use_observed_lib_size=False): build it on a seeded sample, train on all cells
        n = counts.shape[0]
        rows = np.sort(np.random.default_rng(seed).choice(n, min(n, INIT_CELLS), replace=False))
        matrix = read_rows(counts, rows, dtype=np.float32)
    else:
        matrix = counts
    data = AnnData(X=sp.csr_matrix(matrix, dtype=np.float32), obs=obs.iloc[rows])
    data.var_names = adata.var_names.astype(str)
    if counts_layer is not None:
        data.layers[counts_layer] = data.X
    scvi.settings.seed = seed
    cls = scvi.model.LinearSCVI if linear else scvi.model.SCVI
    cls.setup_anndata(data, layer=counts_layer, batch_key=batch_key)
    vae = cls(
        data,
        n_latent=n_latent,
        n_hidden=n_hidden,
        n_layers=n_layers,
        gene_likelihood=gene_likelihood,
    )
    if max_epochs is None:
        max_epochs = default_scvi_epochs(counts.shape[0])
    logger.info("Training scVI for %d epochs on %d cells.", max_epochs, counts.shape[0])
    if on_disk:
        _train_streamed(vae, counts, obs, batch_key, seed, max_epochs, train_kwargs)
        return vae
    train_kwargs.setdefault("enable_progress_bar", False)
    n_batches = max(1, int(np.ceil(0.9 * data.n_obs / train_kwargs.get("batch_size", 128))))
    train_kwargs.setdefault("log_every_n_steps", min(50, n_batches))
    with quiet_training_warnings():
        vae.train(max_epochs=max_epochs, **train_kwargs)
    return vae


def _train_streamed(vae, counts, obs, batch_key, seed, max_epochs, train_kwargs) -> None:
    """Train scVI on counts left on disk, with scbranch's block loader (model/_streaming.py)."""
    from scvi import REGISTRY_KEYS as SCVI_KEYS

    from ._streaming import BlockDataModule

    n = counts.shape[0]
    if batch_key is not None:
        mapping = vae.adata_manager.get_state_registry(SCVI_KEYS.BATCH_KEY).categorical_mapping
        codes = pd.Categorical(obs[batch_key], categories=list(mapping)).codes
    else:
        codes = np.zeros(n, dtype=np.int64)
    fields = {
        SCVI_KEYS.BATCH_KEY: codes.astype(np.int64)[:, None],
        SCVI_KEYS.LABELS_KEY: np.zeros((n, 1), dtype=np.int64),
    }
    loader_kwargs = {
        k: train_kwargs.pop(k) for k in ("block_rows", "blocks_per_buffer") if k in train_kwargs
    }
    train_size = train_kwargs.pop("train_size", None) or 0.9
    # a whole batch per step (the block loader drops incomplete ones): small data, small batch
    batch_size = min(int(train_kwargs.pop("batch_size", 128)), max(1, int(n * train_size)))
    datamodule = BlockDataModule(
        counts,
        fields,
        data_key=SCVI_KEYS.X_KEY,
        batch_size=batch_size,
        train_size=train_size,
        validation_size=train_kwargs.pop("validation_size", None),
        seed=seed,
        **loader_kwargs,
    )
    train_kwargs.setdefault("enable_progress_bar", False)
    steps = max(1, datamodule.n_train // datamodule.batch_size)
    train_kwargs.setdefault("log_every_n_steps", min(50, steps))
    with quiet_training_warnings():
        vae.train(max_epochs=max_epochs, datamodule=datamodule, **train_kwargs)


def scvi_info(vae) -> dict:
    """What scbranch records about an scVI model; refuses set-ups it cannot decode.

    Returns an h5ad/pickle-safe dict: class name, counts layer, batch key and categories,
    genes, latent size and likelihood.
    """
    name = type(vae).__name__
    if name not in SUPPORTED_SCVI:
        raise TypeError(
            f"scvi_model must be a trained scvi.model.SCVI or scvi.model.LinearSCVI, got {name}."
        )
    if not getattr(vae, "is_trained", False):
        raise ValueError("The scVI model is not trained yet; call `scvi_model.train()` first.")
    setup = vae.registry_["setup_args"]
    covariates = [
        f"{key}={setup[key]!r}"
        for key in ("categorical_covariate_keys", "continuous_covariate_keys", "size_factor_key")
        if setup.get(key)
    ]
    if covariates:
        raise ValueError(
            "scbranch decodes scVI models set up with at most a batch; this one was set up with "
            f"{', '.join(covariates)}, whose values for generated cells are undefined. Set scVI "
            "up again with `batch_key=` only (or fold the covariates into the batch) and retrain."
        )
    if vae.module.gene_likelihood not in COUNT_LIKELIHOODS:
        raise ValueError(
            f"The scVI model's gene_likelihood is {vae.module.gene_likelihood!r}, which gives no "
            f"counts; train it with one of {COUNT_LIKELIHOODS}."
        )
    if getattr(vae.module, "dispersion", "gene") == "gene-label":
        raise ValueError(
            "The scVI model uses dispersion='gene-label' (per scVI label), which generated cells "
            "do not have; train it with dispersion='gene' or 'gene-batch'."
        )
    fields = vae.registry_["field_registries"]
    batches = [str(c) for c in fields["batch"]["state_registry"]["categorical_mapping"]]
    labels = fields.get("labels", {}).get("state_registry", {}).get("categorical_mapping", [""])
    return {
        "class": name,
        "layer": setup.get("layer") or "",
        "batch_key": setup.get("batch_key") or "",
        "batches": np.asarray(batches, dtype=object),
        "labels_key": setup.get("labels_key") or "",
        "first_label": str(labels[0]),
        "var_names": np.asarray(fields["X"]["state_registry"]["column_names"]).astype(str),
        "n_latent": int(vae.module.n_latent),
        "gene_likelihood": str(vae.module.gene_likelihood),
    }


def weights_fingerprint(vae) -> str:
    """SHA-256 of the scVI model's weights (names, shapes, dtypes and values).

    A diffusion learns the latents of the scVI model as it was when the space was fitted;
    retraining that model afterwards (or a saved model's ``scvi/`` replaced by another one)
    would decode the learned latents with another decoder, silently.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.module.state_dict().items()):
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(values.shape)}:{values.dtype};".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_weights_unchanged(vae, info: dict, where: str = "") -> None:
    """Refuse an scVI model whose weights are not those ``info`` recorded (when it did)."""
    recorded = info.get("weights_sha256")
    if recorded and weights_fingerprint(vae) != recorded:
        raise ValueError(
            f"The scVI model{where} is not the one the diffusion was trained on: its weights "
            "changed (was it trained further?), so the learned latents would decode through "
            "another decoder. Build the model again with `BranchedDiffusion.from_scvi_model` "
            "and train it, or train a copy of the scVI model instead of the one in use."
        )


def _counts_matrix(adata: AnnData, info: dict):
    """``(counts, gene columns, where)``: the matrix the scVI model reads, possibly on disk."""
    columns = check_genes(adata, info["var_names"])
    layer = info["layer"] or None
    if layer is not None and layer not in adata.layers:
        raise KeyError(
            f"The scVI model reads counts from layers[{layer!r}], which adata lacks (layers: "
            f"{list(adata.layers.keys())}). Store the raw counts there."
        )
    where = f"adata.layers[{layer!r}]" if layer else "adata.X"
    return (adata.layers[layer] if layer else adata.X), columns, where


def normalized_counts(adata: AnnData, info: dict, target_sum: float) -> RowMatrix:
    """``log1p(CP<target_sum>)`` of the counts scVI reads, in its genes, read block by block.

    What ``sb.tl.branch_hierarchy(layer=..., target_sum=...)`` discovers on when ``adata``
    holds exactly the scVI model's genes; on disk it stays on disk. The counts were checked
    when the cells were encoded.
    """
    counts, columns, _ = _counts_matrix(adata, info)
    if np.array_equal(columns, np.arange(counts.shape[1])):
        return RowMatrix(counts, transform=partial(normalize_block, target_sum=target_sum))
    return RowMatrix(  # adata holds more genes than scVI: its genes, selected per block
        counts,
        transform=lambda block: normalize_block(block[:, columns], target_sum),
        n_features=len(columns),
    )


def _batch_values(adata: AnnData, info: dict) -> pd.Categorical | None:
    """The cells' batches in the scVI model's categories (checked), or `None` without batches."""
    if not info["batch_key"]:
        return None
    key = info["batch_key"]
    check_obs_key(adata, key, "the scVI model's batch_key")
    values = adata.obs[key].astype(str)
    unknown = sorted(set(values) - set(info["batches"]))
    if unknown:
        raise ValueError(
            f"adata.obs[{key!r}] has batches the scVI model was not trained on: {unknown[:5]}. "
            "Drop those cells, or train the scVI model (and the diffusion on it) with them."
        )
    return pd.Categorical(values, categories=list(info["batches"]))


def counts_on_disk(adata: AnnData, info: dict) -> bool:
    """Whether the counts the scVI model reads from ``adata`` are on disk (an atlas)."""
    return is_on_disk(_counts_matrix(adata, info)[0])


def scvi_counts_fix(info: dict) -> str:
    """What to do when cells given to an scVI-space model hold no counts where scVI reads them."""
    where = f"adata.layers[{info['layer']!r}]" if info["layer"] else "adata.X"
    return (
        f"The scVI model reads raw counts from {where}, as it was trained: pass cells that "
        "hold their raw counts there (keep a copy before normalising: "
        "`adata.layers['counts'] = adata.X.copy()`)."
    )


def counts_view(adata: AnnData, info: dict) -> AnnData:
    """A private AnnData with the counts (and batch) of ``adata`` in the scVI model's layout."""
    counts, columns, where = _counts_matrix(adata, info)
    layer = info["layer"] or None
    counts = sp.csr_matrix(counts, dtype=np.float32)[:, columns]
    check_finite(counts, where)
    check_counts(counts, where + " (the scVI model's counts)", fix=scvi_counts_fix(info))
    obs = pd.DataFrame(index=adata.obs_names.copy())
    batches = _batch_values(adata, info)
    if batches is not None:
        obs[info["batch_key"]] = batches
    if info["labels_key"]:
        obs[info["labels_key"]] = info["first_label"]  # unused by the decoder (no gene-label)
    view = AnnData(X=counts, obs=obs, var=pd.DataFrame(index=info["var_names"]))
    if layer is not None:
        view.layers[layer] = view.X
    return view


def _blocks_of_counts(adata: AnnData, info: dict, rows: np.ndarray | None = None):
    """Yield ``(start, stop, counts block in the model's genes, batch codes)`` from disk."""
    counts, columns, where = _counts_matrix(adata, info)
    batches = _batch_values(adata, info)
    codes = np.zeros(adata.n_obs, np.int64) if batches is None else batches.codes.astype(np.int64)
    identity = np.array_equal(columns, np.arange(counts.shape[1]))
    if rows is not None:
        block = read_rows(counts, rows, dtype=np.float32)
        yield 0, len(rows), block if identity else block[:, columns], codes[rows]
        return
    for start, stop, block in iter_blocks(counts, DECODE_CHUNK, dtype=np.float32):
        yield start, stop, block if identity else block[:, columns], codes[start:stop]


def latent_of(vae, adata: AnnData, info: dict, rows: np.ndarray | None = None) -> np.ndarray:
    """Latent means of scVI for ``adata``'s cells (``rows`` of them); on disk, block by block.

    On disk, each block goes through the encoder (``module.inference``) and its posterior mean
    ``qz.loc`` is kept, as ``get_latent_representation`` computes it, without loading the
    matrix.
    """
    if not counts_on_disk(adata, info):
        view = counts_view(adata, info)
        return latent_means(vae, view if rows is None else view[rows].copy())
    module = vae.module
    if getattr(module, "latent_distribution", "normal") != "normal":
        raise ValueError(
            "Encoding cells on disk supports scVI's normal latent distribution only; load the "
            "cells into memory (`adata.to_memory()`) for latent_distribution='ln'."
        )
    device = next(module.parameters()).device
    n = adata.n_obs if rows is None else len(rows)
    out = np.empty((n, int(module.n_latent)), dtype=np.float32)
    module.eval()
    with torch.inference_mode():
        for start, stop, block, codes in _blocks_of_counts(adata, info, rows):
            check_counts(block, "the scVI model's counts", fix=scvi_counts_fix(info))
            x = torch.as_tensor(to_dense(block), dtype=torch.float32, device=device)
            batch = torch.as_tensor(codes, device=device)[:, None]
            qz = module.inference(x=x, batch_index=batch)["qz"]
            out[start:stop] = qz.loc.float().cpu().numpy()
    return out


def library_sizes_of(adata: AnnData, info: dict) -> np.ndarray:
    """Total counts (in the scVI model's genes) of every cell of ``adata``."""
    if not counts_on_disk(adata, info):
        return np.asarray(counts_view(adata, info).X.sum(1)).ravel()
    out = np.empty(adata.n_obs)
    for start, stop, block, _ in _blocks_of_counts(adata, info):
        out[start:stop] = np.asarray(block.sum(1)).ravel()
    return out


def default_batch(adata: AnnData, info: dict) -> str:
    """The most common batch of ``adata`` (scVI models with batches), else the only one."""
    batches = _batch_values(adata, info)
    if batches is None:
        return str(info["batches"][0])
    return str(pd.Series(batches).value_counts().idxmax())


def latent_means(vae, view: AnnData, batch_size: int = 1024) -> np.ndarray:
    """Posterior means of scVI, ``E[z | x]`` of the cells of ``view`` (float32)."""
    with _quiet_scvi(), warnings.catch_warnings():
        # scvi-tools registers the view and warns about its categories of < 3 cells, which
        # matters for training, not for encoding a few cells (a transmutation of 2 cells)
        warnings.filterwarnings("ignore", message=".*fewer than 3 cells.*", category=UserWarning)
        z = vae.get_latent_representation(view, batch_size=batch_size)
    return np.asarray(z, dtype=np.float32)


def decode_latents(
    vae,
    z: np.ndarray,
    library: np.ndarray,
    batch_index: np.ndarray,
    seed: int,
) -> tuple[np.ndarray, sp.csr_matrix]:
    """Normalised expression and sampled counts of latents ``z`` through scVI's decoder.

    Parameters
    ----------
    vae
        Trained scvi-tools model.
    z
        Latents (n, n_latent).
    library
        Library size (total counts) of each cell (n,).
    batch_index
        Batch code of each cell (n,).
    seed
        Seed of the count sampling (torch's RNG is forked: global state is left alone).

    Returns
    -------
    ``(scale, counts)``: ``px.scale`` (rows sum to 1; float32, dense) and counts drawn from the
    likelihood (CSR float32 with integer values).
    """
    likelihoods = _likelihoods(vae, z, library, batch_index)
    scales = [px.scale.float().cpu().numpy() for px in likelihoods]
    counts = [sp.csr_matrix(part) for part in _draws(vae, likelihoods, seed)]
    return np.concatenate(scales), sp.vstack(counts, format="csr", dtype=np.float32)


def decoder_scale(vae, z: np.ndarray, library: np.ndarray, batch_index: np.ndarray) -> np.ndarray:
    """The normalised expression ``px.scale`` of latents ``z`` through scVI (rows sum to 1).

    No counts are drawn: what ``counts=False`` keeps besides the expected counts.
    """
    likelihoods = _likelihoods(vae, z, library, batch_index)
    return np.concatenate([px.scale.float().cpu().numpy() for px in likelihoods])


def _likelihoods(vae, z, library, batch_index) -> list:
    """The likelihood ``px`` of each chunk of latents (scVI decoder's forward pass, once)."""
    module = vae.module
    device = next(module.parameters()).device
    likelihoods = []
    with torch.inference_mode():
        for start in range(0, len(z), DECODE_CHUNK):
            part = slice(start, start + DECODE_CHUNK)
            out = module.generative(
                z=torch.as_tensor(z[part], dtype=torch.float32, device=device),
                library=torch.log(torch.as_tensor(library[part], device=device).float())[:, None],
                batch_index=torch.as_tensor(batch_index[part], device=device).long()[:, None],
            )
            likelihoods.append(out["px"])
    return likelihoods


def _draws(vae, likelihoods: list, seed: int) -> list[np.ndarray]:
    """One draw of counts from each chunk's likelihood, in order (dense float32 on the CPU).

    Torch's RNG of the scVI model's device is seeded with ``seed`` and forked: the global
    state is left alone (that device's and the CPU's; ``torch.manual_seed`` would reseed
    every GPU). The draws are torch's on that device, so the same seed gives other counts on
    a GPU than on the CPU (the latents and ``layers['scale']`` are the same).
    """
    device = next(vae.module.parameters()).device
    on_accelerator = device.type in ("cuda", "mps")
    forked = [device.index or 0] if on_accelerator else []
    kind = device.type if on_accelerator else "cuda"
    with torch.inference_mode(), torch.random.fork_rng(devices=forked, device_type=kind):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        elif device.type == "mps":
            torch.mps.manual_seed(seed)
        return [px.sample().float().cpu().numpy() for px in likelihoods]


def expected_log_counts(
    vae, z: np.ndarray, library: np.ndarray, batch_index: np.ndarray
) -> np.ndarray:
    """Each latent's expected log-normalised counts, exactly: ``E[log1p(X * 1e4 / total)]``.

    For every gene, the expectation over the count distribution of scVI's likelihood (NB, ZINB
    or Poisson) of the count CP10k-normalised and log1p-transformed, as real cells are. This is
    the denoised profile in the units of real log-normalised cells (the mean of logs);
    ``log1p`` of the decoder's normalised expression is the log of the mean, which lies above
    it for genes a cell rarely expresses. The sum over the probability mass function
    (:func:`~scbranch.model._expected_log1p.expected_log1p`) leaves no Monte-Carlo noise. Real
    cells are normalised by their own total; here every gene is normalised by the total a draw
    has in expectation (the library size for NB and Poisson; less the zero-inflation's share
    for ZINB), which a draw's own total matches up to its spread: the mean of 1,000 draws, each
    by its own total, sits within its standard error (tests/test_counts.py,
    ``benchmarks/expected_counts.py``).

    Parameters
    ----------
    vae
        Trained scvi-tools model.
    z
        Latents (n, n_latent).
    library
        Library size (total counts) of each cell (n,), as scVI's decoder takes it.
    batch_index
        Batch code of each cell (n,).

    Returns
    -------
    Dense float32 (n, n_genes).

    Examples
    --------
    >>> library, batch = np.full(len(z), 2000.0), np.zeros(len(z), dtype=int)  # doctest: +SKIP
    >>> x = expected_log_counts(vae, z, library, batch)  # doctest: +SKIP
    """
    likelihoods = _likelihoods(vae, z, library, batch_index)
    return np.concatenate([_expected_log1p_of(px) for px in likelihoods])


def _expected_log1p_of(px) -> np.ndarray:
    """``E[log1p(X * 1e4 / E[total])]`` under one chunk's likelihood ``px`` (scvi-tools')."""
    import scvi.distributions as dist

    def numpy(t):
        return t.float().cpu().numpy()  # float32; expected_log1p sums in float64 by blocks

    zero = theta = None
    if isinstance(px, dist.NegativeBinomial):  # and ZeroInflatedNegativeBinomial
        mu, theta = numpy(px.mu), numpy(px.theta)
        if isinstance(px, dist.ZeroInflatedNegativeBinomial):
            zero = numpy(px.zi_probs)
    elif isinstance(px, dist.Poisson):
        mu = numpy(px.rate)
    else:
        raise TypeError(
            f"scVI's likelihood {type(px).__name__} is not a count distribution scbranch can "
            f"take the expectation of; use gene_likelihood in {COUNT_LIKELIHOODS}."
        )
    mean = mu if zero is None else (1.0 - zero) * mu
    total = mean.sum(1, dtype=np.float64, keepdims=True)
    c = 1e4 / np.maximum(total, 1.0)  # as log_normalize: totals of at least 1
    return expected_log1p(mu, c, theta, zero, dtype=np.float32)


def _placeholder_anndata(info: dict) -> AnnData:
    """Two cells per batch with the model's genes: lets scvi-tools load a model without data.

    (Two, not one: LinearSCVI's library-size prior squeezes a one-cell batch to a scalar.)
    """
    categories = list(info["batches"])
    batches = categories * 2
    obs = pd.DataFrame(index=[f"placeholder{i}" for i in range(len(batches))])
    if info["batch_key"]:
        obs[info["batch_key"]] = pd.Categorical(batches, categories=categories)
    if info["labels_key"]:
        obs[info["labels_key"]] = info["first_label"]
    # dense ones: scvi-tools takes an all-zero sparse X for "minified" data and refuses it
    x = np.ones((len(batches), len(info["var_names"])), dtype=np.float32)
    adata = AnnData(X=x, obs=obs, var=pd.DataFrame(index=info["var_names"]))
    if info["layer"]:
        adata.layers[info["layer"]] = x.copy()
    return adata


def save_scvi_weights(vae, directory) -> None:
    """Save an scVI model as tensors (safetensors) and its set-up as plain data (no pickle).

    scvi-tools' own ``vae.save`` pickles its attributes; scbranch keeps only what rebuilds the
    model: the class, its init parameters, its registry and the module's weights.
    """
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in vae.module.state_dict().items()}
    save_tensors(state, directory / SCVI_WEIGHTS)
    config = {
        "class": type(vae).__name__,
        "init_params": vae.init_params_,
        "registry": vae.registry_,
    }
    write_plain(config, directory / SCVI_CONFIG[0], directory / SCVI_CONFIG[1], kind="scvi-model")


def load_scvi_weights(directory, info: dict, *, device: str | None = None):
    """Rebuild the scVI model saved by :func:`save_scvi_weights` (no data, no unpickling)."""
    from pathlib import Path

    import scvi
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    weights = directory / SCVI_WEIGHTS
    if not weights.is_file():
        raise ValueError(
            f"The scbranch model was built on an scVI model, but {str(directory)!r} holds no "
            f"{SCVI_WEIGHTS!r}: the model directory is partial. Save the model again with "
            "`model.save(dir_path)`."
        )
    config = read_plain(directory / SCVI_CONFIG[0], directory / SCVI_CONFIG[1], kind="scvi-model")
    if config["class"] not in SUPPORTED_SCVI:
        raise ValueError(f"Unsupported scVI model class {config['class']!r} in {str(directory)!r}.")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{str(weights)!r} is not a tensor file scbranch wrote ({err}); it may be corrupt or "
            "replaced by something else. Save the model again."
        ) from err
    cls = getattr(scvi.model, config["class"])
    registry = config["registry"]
    placeholder = _placeholder_anndata(info)
    init = config["init_params"]
    kwargs = {k: v for group in init.get("kwargs", {}).values() for k, v in group.items()}
    with _quiet_scvi(), warnings.catch_warnings():
        # the placeholder's two cells per batch are not data (see _placeholder_anndata)
        warnings.filterwarnings("ignore", message=".*fewer than 3 cells.*", category=UserWarning)
        cls.setup_anndata(placeholder, source_registry=registry, **registry["setup_args"])
        vae = cls(placeholder, **init["non_kwargs"], **kwargs)
    vae.module.load_state_dict(state)
    vae.is_trained_ = True
    if device is not None:
        vae.to_device(device)
    vae.module.eval()
    return vae


def load_scvi(path: str, info: dict, **load_kwargs):
    """Load an scVI model saved by scvi-tools itself (a PICKLE: only for trusted legacy models).

    scbranch < 0.2 saved its scVI model this way; :func:`load_scvi_weights` reads the format
    that replaced it without unpickling.
    """
    import scvi

    if not os.path.isfile(os.path.join(path, "model.pt")):
        raise ValueError(
            f"The scbranch model was built on an scVI model, but {path!r} holds none: the model "
            "directory is partial. Save the model again with `model.save(dir_path)`."
        )
    cls = getattr(scvi.model, info["class"])
    with _quiet_scvi(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fewer than 3 cells.*", category=UserWarning)
        vae = cls.load(path, adata=_placeholder_anndata(info), **load_kwargs)
    vae.module.eval()
    return vae
