"""Quality benchmark: branched vs flat diffusion vs baselines, judged with real-vs-real controls.

Protocol: ../shared/design/EVALUATION.md, implemented by ``scbranch.tl.evaluate``. For each
dataset, cells are split per class into train (50 %), held-out (30 %) and unseen (20 %; no
model and no fitted space ever sees them) parts, stratified and seeded; every method is fitted
on the train cells only; each generation seed draws ``n_cells`` per class and is evaluated
against the held-out cells, in a reference PCA fitted on the TRAIN cells only (so the held-out
halves, the generated cells and the unseen real cells are all out-of-sample for it), with the
real-vs-real control of the same call. Reported: the mean over evaluated classes, then mean and
standard deviation over every run (training seeds x generation seeds), with the sd between
training seeds and within them (between generation seeds) given apart.

Every method gets the default configuration of the package (README quickstart): the models'
latent is the train cells' out-of-fold PC scores (``sb.tl.pca_out_of_fold``, key
``X_pca_oof``), the models are set up with the counts (``counts_layer``) so generated cells are
decoded with the negative binomial (``generate(residual_noise="auto")``), and trained with the
default budget (about 100 epochs within 1,000-16,000 optimiser steps; ``--steps`` overrides it).

Methods (same training budget for the diffusion models: optimiser steps and batch size):
  conditioned          BranchedDiffusion, discovered tree, the default model: one network
                       conditioned on a branch embedding and per-branch adapters
  <arch>:calibrated    the same model's cells with each type's training spread per latent
                       dimension (``generate(calibrate_spread=True)``)
  branched             the same with architecture="branched": a trunk and one head per branch
                       (the default of scbranch 0.1)
  flat                 the same model with architecture="flat": one label-guided network with
                       about the branched model's parameter count
  <arch>:per_branch    (--architectures ...,branched:per_branch) the same architecture with
                       gaussian_skip="per_branch": the network corrects each branch's own
                       Gaussian instead of one global one
  <arch>:late, <arch>:unshared   later branch points / no sharing (benchmarks/sharing.py)
  <arch>:ema0, :balance<x>, :batch<n>   trained without the weight EMA / with class_balance x /
                       with n cells per optimiser step (benchmarks/budget_curve.py --rows)
  <arch>:budget<k>, :epochs<n>   k x train()'s default epochs / exactly n epochs
  scVI resampling      latents from the class's aggregated posterior, NB counts, log-normalised
  per-class Gaussian   Ledoit-Wolf Gaussian per class on the same out-of-fold scores, decoded
                       by the models' own space with the same negative binomial
  smoothed bootstrap   sb.baselines.SmoothedBootstrap (bandwidth 1) on the same scores: a
                       training cell plus its type's Gaussian noise, variance kept, decoded
                       the same way (a kernel density estimate)
Probes (references that say what the metrics can see, not methods):
  real cells, unseen   real cells of the third split, evaluated exactly like a generator: the
                       known answer. It must sit at the control, or no other row can be read
  unseen cells via the PCs   the same unseen cells' PC scores decoded like the models' cells
                       (negative binomial): the best a generator of exact PC scores can do
  class mean           every cell is its class's mean: a collapsed generator
  train cells          real training cells, resampled: memorisation. They are IN-sample for the
                       reference PCA (fitted on them), so they show how much a fitted space
                       inflates its own cells
  train cells' out-of-fold scores   the training cells as the models see them, decoded like
                       their cells: the target. A generator that learned its training cells
                       exactly lands here; the gap from this row to a model is what the model
                       did not learn (or learned too well) from its cells

Datasets:
  pbmc68k   scanpy's pbmc68k_reduced (700 cells, 765 genes, 10 types)
  pbmc3k    ../shared/data/pbmc3k_labelled.h5ad (2,638 cells; labels DERIVED from marker genes
            over clusters, not ground truth); 2,000 HVGs chosen on the train cells

Usage (from the repository root, in the project's venv):
  python benchmarks/quality.py                 # CPU settings, about 60 min on 2 cores
  python benchmarks/quality.py --gpu           # GPU settings (longer training, more seeds)
  python benchmarks/quality.py --probes-only   # the untrained rows only, a few minutes
  python benchmarks/quality.py --fast          # smoke test (a minute; numbers meaningless)
Writes docs/benchmarks/quality.md (tables) and, under --out, per-row CSV and figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
PBMC3K = ROOT.parent / "shared" / "data" / "pbmc3k_labelled.h5ad"

SETTINGS = {
    "cpu": {
        "steps": None,  # the package's default budget
        "batch_size": 64,
        "n_cells": 200,
        "seeds": [0, 1, 2],
        "train_seeds": [0, 1, 2],
        # None: the package's own (sb.model.default_scvi_epochs, 800 on up to 750 cells), so
        # scVI resampling is the baseline users get; pages before stop 66 trained 200
        "scvi_epochs": None,
        "accelerator": "cpu",
    },
    "gpu": {
        "steps": 8000,
        "batch_size": 64,
        "n_cells": 500,
        "seeds": [0, 1, 2, 3, 4],
        "train_seeds": [0, 1, 2],
        "scvi_epochs": None,
        "accelerator": "gpu",
    },
    "fast": {  # a smoke test: one generation seed (a variants page took 15 min with two)
        "steps": 20,
        "batch_size": 64,
        "n_cells": 40,
        "seeds": [0],
        "train_seeds": [0, 1],
        "scvi_epochs": 2,
        "accelerator": "cpu",
    },
}
LABELS = "cell_type"
#: the models' latent: out-of-fold PC scores of the train cells (the package's default)
LATENT = "X_pca_oof"
#: train / held-out / unseen shares of every class
SPLIT = (0.5, 0.3, 0.2)
#: the metrics of the per-class comparison and the figure
HEADLINE_METRICS = [
    "label_fidelity",
    "auroc",
    "w2",
    "mmd_median",
    "dispersion",
    "gene_mean_spearman",
    "de_lfc_spearman",
]
METRIC_ORDER = [
    "label_fidelity",
    "auroc",
    "w2",
    "mmd",
    "mmd_median",
    "dispersion",
    "train_distance",
    "gene_mean_spearman",
    "gene_var_spearman",
    "de_lfc_spearman",
    "de_marker_overlap",
    "zero_fraction_error",
]

logger = logging.getLogger("quality")


# ----------------------------------------------------------------------------- data
def _split(adata, fractions, seed: int):
    import scbranch as sb

    parts = sb.datasets.stratified_split(adata.obs[LABELS], fractions, seed)
    return [adata[p].copy() for p in parts]


def _model_pca(train, n_comps: int = 30):
    """The models' latent space: a PCA of the TRAIN cells only (held-out cells never seen)."""
    import scanpy as sc

    sc.pp.pca(train, n_comps=n_comps, random_state=0)


#: the fewest train cells :func:`fewer_train_cells` leaves a type (all of them when it has
#: fewer): pbmc68k_reduced's rarest evaluated-size types have 6 or 7 train cells
FEWEST_PER_TYPE = 6


def fewer_train_cells(train, n_train: int | None, seed: int):
    """``train`` cut to about ``n_train`` cells, every type in proportion to its share and at
    least :data:`FEWEST_PER_TYPE` (seeded; ``None``: unchanged). What a smaller dataset of the
    same types looks like, for questions of data size (the held-out and unseen parts stay).

    >>> import anndata as ad, numpy as np, pandas as pd
    >>> labels = pd.Categorical(["a"] * 90 + ["b"] * 10)
    >>> cells = ad.AnnData(np.zeros((100, 1)), obs=pd.DataFrame({LABELS: labels}))
    >>> fewer_train_cells(cells, 30, seed=0).obs[LABELS].value_counts().sort_index().tolist()
    [27, 6]
    """
    if n_train is None:
        return train
    if n_train >= train.n_obs:
        raise ValueError(f"n_train={n_train} is not fewer than the {train.n_obs} train cells.")
    rng = np.random.default_rng(seed)
    labels = train.obs[LABELS].astype(str).to_numpy()
    keep = []
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        n = max(min(FEWEST_PER_TYPE, where.size), round(where.size * n_train / train.n_obs))
        keep.append(rng.choice(where, size=n, replace=False))
    return train[np.sort(np.concatenate(keep))].copy()


def load_pbmc68k(seed: int, fractions=(0.5, 0.5), n_train: int | None = None):
    """pbmc68k split per type (train first); the models' PCA is fitted on the train part,
    after cutting it to ``n_train`` cells (:func:`fewer_train_cells`)."""
    import scbranch as sb

    adata = sb.datasets.pbmc68k()
    del adata.obsm["X_pca"], adata.varm["PCs"]
    parts = _split(adata, fractions, seed)
    parts[0] = fewer_train_cells(parts[0], n_train, seed)
    _model_pca(parts[0])
    return tuple(parts)


def select_genes(train, n_hvg: int | None, hvg_flavor: str):
    """HVGs of the raw counts in ``train`` (the train cells only), or with ``n_hvg=None`` every
    gene seen in >= 3 of them. ``"seurat_v3"`` ranks on the raw counts, other flavours on
    log-normalised counts."""
    import scanpy as sc

    probe = train.copy()
    sc.pp.filter_genes(probe, min_cells=3)
    if n_hvg is None:
        return probe.var_names
    if hvg_flavor != "seurat_v3":
        sc.pp.normalize_total(probe, target_sum=1e4)
        sc.pp.log1p(probe)
    sc.pp.highly_variable_genes(probe, n_top_genes=n_hvg, flavor=hvg_flavor)
    return probe.var_names[probe.var["highly_variable"]]


def load_pbmc3k(
    seed: int,
    n_hvg: int = 2000,
    hvg_flavor: str = "seurat",
    fractions=(0.7, 0.3),
    n_train: int | None = None,
):
    """pbmc3k split per type (train first); ``n_hvg`` HVGs chosen on the train cells only
    (after cutting them to ``n_train`` cells, :func:`fewer_train_cells`).

    ``hvg_flavor="seurat"`` (scanpy's default) ranks genes by dispersion on log-normalised
    counts; ``"seurat_v3"`` (what scvi-tools recommends for count models) on the raw counts.
    """
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    if not PBMC3K.exists():
        raise FileNotFoundError(f"{PBMC3K} not found (see ../shared/data/README.md).")
    adata = ad.read_h5ad(PBMC3K)
    adata.obs[LABELS] = adata.obs[LABELS].astype("category")
    parts = _split(adata, fractions, seed)
    parts[0] = fewer_train_cells(parts[0], n_train, seed)
    genes = select_genes(parts[0], n_hvg, hvg_flavor)
    out = []
    for part in parts:
        part = part[:, genes].copy()
        part.layers["counts"] = sp.csr_matrix(part.X, dtype=np.float32)
        # normalised over the evaluated genes, exactly as count-generating methods are
        sc.pp.normalize_total(part, target_sum=1e4)
        sc.pp.log1p(part)
        part.X = sp.csr_matrix(part.X, dtype=np.float32)
        out.append(part)
    _model_pca(out[0])
    return tuple(out)


# ----------------------------------------------------------------------------- methods
#: the datasets of the quality benchmark and every benchmark on its splits, by name
LOADERS = {"pbmc68k": load_pbmc68k, "pbmc3k": load_pbmc3k}


def _labels(adata) -> np.ndarray:
    return adata.obs[LABELS].astype(str).to_numpy()


class ClassMeanProbe:
    """Every generated cell is its class's mean in PC space (decoded): a collapse probe."""

    def __init__(self, train):
        import scbranch as sb

        self.gauss = sb.baselines.PerClassGaussian(train, LABELS)
        for c in self.gauss.classes:
            self.gauss.covariances_[c] = np.zeros_like(self.gauss.covariances_[c])

    def generate(self, n_cells, seed):
        return self.gauss.generate(n_cells=n_cells, seed=seed)


class TrainCellsProbe:
    """Real cells drawn per class (at most all of them), as is or through the PCA.

    With the training cells: memorisation (and the reference PCA's in-sample inflation, since
    it is fitted on them). With the unseen cells: the known answer, real cells nothing saw.
    With ``replace=True``, ``n_cells`` drawn with replacement: the cells' empirical
    distribution (a bootstrap), as a generator that learned exactly these cells samples it.
    """

    def __init__(self, cells, decoder=None, replace: bool = False):
        import anndata as ad

        from scbranch.model._decoding import decode

        if decoder is None:
            self.x = cells.X
        else:
            self.x = decode(decoder, np.asarray(cells.obsm["X_pca"], dtype=np.float32))
        self.labels = _labels(cells)
        self.var_names = cells.var_names if decoder is None else decoder["var_names"]
        self.replace = replace
        self._ad = ad

    def generate(self, n_cells, seed):
        rng = np.random.default_rng(seed)
        classes = list(pd.unique(self.labels))
        if self.replace:
            draw = [rng.choice(np.flatnonzero(self.labels == c), n_cells) for c in classes]
        else:  # exact duplicates would be a giveaway no real sample has
            draw = [rng.permutation(np.flatnonzero(self.labels == c))[:n_cells] for c in classes]
        idx = np.concatenate(draw)
        obs = pd.DataFrame(
            {LABELS: pd.Categorical(self.labels[idx], categories=classes)},
            index=[f"probe{i}" for i in range(len(idx))],
        )
        return self._ad.AnnData(X=self.x[idx], obs=obs, var=pd.DataFrame(index=self.var_names))


def scores_of(cells, decoder) -> np.ndarray:
    """Cells' PC scores on a model's PCA (out-of-sample for cells it was not fitted on)."""
    from scbranch._validation import to_dense

    expr = to_dense(cells[:, decoder["var_names"]].X)
    return (expr - decoder["mean"]) @ decoder["loadings"].T


def decode_in_space(model, z, labels, noise, seed: int):
    """Latents ``z`` of cells labelled ``labels`` decoded by ``model``'s space exactly as its
    generated cells are (``residual_noise=noise``; class library sizes for the counts)."""
    import anndata as ad

    from scbranch.model._spaces import auto_noise

    codes = np.array([model.classes.index(c) for c in labels])
    space = model.space
    noise = auto_noise(space, noise, trajectories=False)
    options = space.resolve_options(counts=False, batch=None, residual_noise=noise)
    out = space.decode(np.asarray(z, dtype=np.float32), codes, options, seed)
    classes = list(pd.unique(labels))
    obs = pd.DataFrame(
        {LABELS: pd.Categorical(labels, categories=classes)},
        index=[f"cell{i}" for i in range(len(labels))],
    )
    return ad.AnnData(X=np.asarray(out.X), obs=obs, var=pd.DataFrame(index=out.var_names))


def class_subset(labels: np.ndarray, n_cells: int, seed: int) -> np.ndarray:
    """Rows of a seeded random subset of at most ``n_cells`` cells of every class, classes in
    order of appearance: the real cells a probe passes on as its generated ones."""
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:n_cells] for c in pd.unique(labels)]
    )


def pooled_within_variance(z: np.ndarray, labels) -> np.ndarray:
    """Per component: the within-type variance pooled over the types (sum of squared
    deviations from each type's mean over cells minus types; a one-cell type adds nothing).

    Examples
    --------
    >>> z = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 1.0], [12.0, 3.0]])
    >>> pooled_within_variance(z, np.array(["a", "a", "b", "b"])).tolist()  # b's centre far
    [2.0, 1.0]
    """
    from scbranch.module._gaussian_skip import class_statistics, within_class_variance

    types, codes = np.unique(np.asarray(labels), return_inverse=True)
    stats = class_statistics([(0, len(z), z)], codes, len(types), 0.0, 1.0, full=False)
    return within_class_variance(stats)  # the package's pooled variance (its Gaussian skip)


def shrink_to_validation(z: np.ndarray, labels, validation: np.ndarray) -> np.ndarray:
    """Latents with the in-sample cells' spread shrunk to the out-of-sample cells'.

    Per component, the cells not in ``validation`` (the ones an encoder was trained on) get
    their deviation from their type's centre scaled by sqrt(v_val / v_in), the pooled
    within-type variances of the ``validation`` cells and of the others (never widened: at
    most 1); the ``validation`` cells keep theirs. scVI's encoder gives the cells it trained on
    2-3 times the within-type variance new cells get (docs/benchmarks/scvi_latent_spread.md):
    the ``:shrunk`` rows ask whether undoing that helps, as out-of-fold scores did for PCA.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> lab = np.repeat(["a", "b"], 2000)
    >>> z = rng.normal(size=(4000, 2)) * [1.0, 3.0] + (lab == "b")[:, None] * 10
    >>> validation = np.arange(4000) % 10 == 0
    >>> z[validation] = 10 * (lab[validation] == "b")[:, None] + rng.normal(size=(400, 2))
    >>> out = shrink_to_validation(z, lab, validation)
    >>> np.round(pooled_within_variance(out[~validation], lab[~validation]), 1).tolist()
    [1.0, 1.0]
    """
    labels = np.asarray(labels)
    ratio = pooled_within_variance(z[validation], labels[validation]) / pooled_within_variance(
        z[~validation], labels[~validation]
    )
    factor = np.sqrt(np.minimum(ratio, 1.0))
    out = np.array(z, dtype=np.float64)
    for c in np.unique(labels):
        rows = (labels == c) & ~validation
        centre = z[labels == c].mean(0)
        out[rows] = centre + (z[rows] - centre) * factor
    return out


class DecodedProbe:
    """Real cells' coordinates ``z`` decoded by a model's space with one noise model."""

    def __init__(self, model, cells, z, noise="auto"):
        self.model, self.noise = model, noise
        self.z = np.asarray(z, dtype=np.float32)
        self.labels = _labels(cells)

    def generate(self, n_cells, seed):
        idx = class_subset(self.labels, n_cells, seed)
        return decode_in_space(self.model, self.z[idx], self.labels[idx], self.noise, seed)


class SpaceDecodedGaussian:
    """The per-class Gaussian in the models' latent, decoded by the models' own space (with
    the default noise model, or ``residual_noise=noise``): the diffusion models' decoder, a
    simpler latent generator. With ``bandwidth``, the smoothed bootstrap instead
    (``sb.baselines.SmoothedBootstrap``: a training cell plus its type's Gaussian noise)."""

    def __init__(self, train, model, noise="auto", bandwidth: float | None = None):
        import scbranch as sb

        if bandwidth is None:
            self.gauss = sb.baselines.PerClassGaussian(train, LABELS, obsm_key=LATENT)
        else:
            self.gauss = sb.baselines.SmoothedBootstrap(
                train, LABELS, obsm_key=LATENT, bandwidth=bandwidth
            )
        self.model, self.noise = model, noise

    def generate(self, n_cells, seed):
        gen = self.gauss.generate(n_cells=n_cells, seed=seed)
        z = gen.obsm[self.gauss.obsm_key]
        return decode_in_space(self.model, z, _labels(gen), self.noise, seed)


def within_type_scale(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per component, 1 / the pooled within-type standard deviation of ``z``: ``z * scale``
    has unit within-type variance in every component (the package's pooled within-type
    variance, what small types' Gaussians are shrunk towards)."""
    return 1.0 / np.sqrt(pooled_within_variance(z, labels))


class PreconditionedModel:
    """The default model trained on out-of-fold scores whose components are scaled to unit
    pooled within-type variance (narrow trailing components no longer narrow for the network),
    on the tree discovered on the unscaled scores; generated latents are scaled back and
    decoded by the default space exactly as its cells are. Attributes the benchmark reads
    (``trainer``, ``tree``, ``module``) are the inner model's."""

    def __init__(self, train, options, training, accelerator):
        import scbranch as sb

        self.space = sb.BranchedDiffusion(default_setup(train))  # tree and decoder, untrained
        z = np.asarray(train.obsm[LATENT], dtype=np.float64)
        self.factor = within_type_scale(z, _labels(train))
        adata = train.copy()
        adata.obsm["X_white"] = (z * self.factor).astype(np.float32)
        sb.BranchedDiffusion.setup_anndata(adata, labels_key=LABELS, obsm_key="X_white")
        self.model = sb.BranchedDiffusion(adata, hierarchy=self.space.tree, **options)
        self.model.train(**training, accelerator=accelerator, enable_progress_bar=False)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, n_cells, seed, **options):
        gen = self.model.generate(n_cells=n_cells, seed=seed, progress_bar=False, **options)
        z = np.asarray(gen.obsm["X_white"], dtype=np.float64) / self.factor
        return decode_in_space(self.space, z, _labels(gen), "auto", seed)


class _Generator:
    """A fitted method and the generate() options of one table row; rows with an
    ``anchor_time`` generate from ``anchors`` (``model.generate_anchored``)."""

    def __init__(self, method, anchors=None, **options):
        self.method, self.anchors, self.options = method, anchors, options

    def generate(self, n_cells, seed):
        import scbranch as sb

        if isinstance(self.method, sb.BranchedDiffusion):
            self.options.setdefault("progress_bar", False)
        if "anchor_time" in self.options:
            return self.method.generate_anchored(
                self.anchors, n_cells=n_cells, seed=seed, **self.options
            )
        return self.method.generate(n_cells=n_cells, seed=seed, **self.options)


#: rows with a training seed of their own; the other rows are fitted once (no randomness worth
#: a seed, or real cells)
TRAINED = ("branched", "flat", "conditioned", "scVI resampling")


def default_setup(train, obsm_key: str = LATENT):
    """A copy of ``train`` set up as the package's default configuration: the out-of-fold PC
    scores (computed on ``train`` itself if missing) and the counts."""
    import scbranch as sb

    if obsm_key == LATENT and LATENT not in train.obsm:
        sb.tl.pca_out_of_fold(train, groupby=LABELS, key_added=LATENT)
    adata = train.copy()
    sb.BranchedDiffusion.setup_anndata(
        adata, labels_key=LABELS, obsm_key=obsm_key, counts_layer="counts"
    )
    return adata


#: tree variant "unshared": every type alone below this time (alpha < 0.02 with the default
#: process, so nothing is shared where the types differ); the types join one by one above it
UNSHARED_FROM = 0.90


def expression_newick(train) -> str:
    """The topology an expression model of ``train`` discovers (on its log-normalised ``.X``),
    as Newick: a latent model given it keeps the topology and takes its branch times from its
    own latent (docs/spaces.md, the scVI section). ``train`` is not modified."""
    import anndata as ad

    import scbranch as sb

    cells = ad.AnnData(X=train.X, obs=train.obs[[LABELS]].copy())
    sb.tl.branch_hierarchy(cells, groupby=LABELS, key_added="expression_tree")
    return cells.uns["expression_tree"]["newick"]


def unshared_tree(classes):
    """A tree on ``classes`` whose branch points all lie at t >= :data:`UNSHARED_FROM`: each
    type follows its own function wherever the types differ, as a model without sharing would."""
    import scbranch as sb

    merges = [
        (tuple(range(k + 1)), (k + 1,), UNSHARED_FROM + 0.01 * k) for k in range(len(classes) - 1)
    ]
    return sb.module.BranchTree.from_merges(list(classes), merges)


#: space variants of a row name (the default space is the out-of-fold PC scores)
SPACE_VARIANTS = ("scvi", "expression")
#: sampler variants of a row name: generate() options; the model is the row's without them
#: (trained once per training seed when several rows share it). A number after the name sets
#: the steps: ``sde100`` is the reverse SDE with 100 steps. ``denoised`` decodes to the mean
#: profile, with no noise model (``residual_noise=False``; scVI models ``counts=False``: the
#: expected log-normalised counts); ``calibrated`` gives each type's
#: cells its training cells' spread (``calibrate_spread=True``). ``anchored`` generates from the
#: train cells (``model.generate_anchored``); its number is the anchor time in hundredths
#: (``anchored20``: ``anchor_time=0.2``).
SAMPLER_VARIANTS = {
    "sde": {"solver": "em"},
    "ei": {"solver": "ei"},  # the reverse SDE's exponential integrator, log-SNR steps
    "ode": {"solver": "heun"},
    "ddim": {"solver": "ddim"},  # first-order ODE: flow matching's Euler step
    # scVI models: the expected log-normalised counts (PCA and expression models: unchanged)
    "denoised": {"residual_noise": False, "counts": False},
    "calibrated": {"calibrate_spread": True},  # each type at its training cells' spread
    "anchored": {},
}


def _sampler_variant(part: str) -> dict | None:
    """``generate()`` options of one part of a row name, or None if it is no sampler variant."""
    name = part.rstrip("0123456789")
    if name not in SAMPLER_VARIANTS:
        return None
    number = part[len(name) :]
    if name == "anchored":
        from scbranch.module._solvers import DEFAULT_ANCHOR_TIME

        return {"anchor_time": int(number) / 100 if number else DEFAULT_ANCHOR_TIME}
    return {**SAMPLER_VARIANTS[name], **({"n_steps": int(number)} if number else {})}


def model_spec(spec: str) -> str:
    """A row name without its sampler variants: the model the row generates with."""
    return ":".join(p for p in spec.split(":") if _sampler_variant(p) is None)


def generate_options(spec: str) -> dict:
    """``generate()`` options of a row name's sampler variants (``sde``: the reverse SDE,
    Euler-Maruyama, at the default 25 steps; ``ode``: the probability-flow ODE, Heun;
    ``ddim``: the ODE's first-order step on the interpolant's grid; ``sde100``: the SDE with 100
    steps)."""
    options = {}
    for part in spec.split(":")[1:]:
        options.update(_sampler_variant(part) or {})
    return options


#: training variants of a row name: ``model.train()`` options (the model is built the same way)
TRAIN_VARIANTS = {
    "ema": ("ema_decay", float),  # ema0: no weight EMA
    "balance": ("class_balance", float),  # balance0: natural frequencies, balance1: equal
    "batch": ("batch_size", int),  # batch256: 256 cells per optimiser step
    "budget": ("budget_factor", float),  # budget2: twice train()'s default epochs
    # epochs100: exactly 100 passes (train()'s default before its 1,000-step floor)
    "epochs": ("max_epochs", int),
}


def _train_variant(part: str) -> dict | None:
    """``train()`` options of one part of a row name, or None if it is no training variant."""
    for prefix, (option, kind) in TRAIN_VARIANTS.items():
        value = part[len(prefix) :]
        if part.startswith(prefix) and value and value.replace(".", "", 1).isdigit():
            return {option: kind(value)}
    return None


def train_options(spec: str) -> dict:
    """``model.train()`` options of a row name's training variants (``ema0``, ``balance1``,
    ``batch256``, ``budget2``, ``epochs100``, see :data:`TRAIN_VARIANTS`)."""
    options = {}
    for part in model_spec(spec).split(":")[1:]:
        options.update(_train_variant(part) or {})
    return options


def train_kwargs(spec: str, n_cells: int, cfg: dict) -> dict:
    """``model.train()`` arguments of a row on ``n_cells`` cells: the batch size, the row's
    training variants and the budget: ``cfg['steps']`` optimiser steps, or with `None` the
    package's default, times k for a ``budget<k>`` row."""
    from scbranch.module._recipe import default_max_epochs

    training = {"batch_size": cfg["batch_size"], **train_options(spec)}
    factor = training.pop("budget_factor", None)
    steps_per_epoch = max(1, math.ceil(n_cells / training["batch_size"]))
    if cfg["steps"] is not None:  # the configuration's budget (a smoke run's 20 steps too)
        steps = cfg["steps"] * (1.0 if factor is None else factor)
        training["max_epochs"] = max(1, math.ceil(steps / steps_per_epoch))
    elif factor is not None:  # a multiple of the default budget, whatever the data size
        default = default_max_epochs(n_cells, training["batch_size"])
        training["max_epochs"] = max(1, round(factor * default))
    return training


def scvi_epochs_of(value: str) -> int | None:
    """``--scvi-epochs``: a positive number of epochs, or ``None`` for the package's default.

    >>> scvi_epochs_of("800"), scvi_epochs_of("default")
    (800, None)
    """
    if value == "default":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"--scvi-epochs takes a positive number or 'default', got {value!r}")
    return int(value)


def scvi_epochs_text(epochs: int | None) -> str:
    """How a page names scVI's training."""
    if epochs is None:
        return "the package's default epochs (`sb.model.default_scvi_epochs`)"
    return f"{epochs} epochs"


def model_options(spec: str, classes=None) -> dict:
    """Model keyword arguments of a row name: ``"<architecture>[:<variant>...]"``.

    Variants: ``per_branch`` (``gaussian_skip="per_branch"``), ``flow`` (``objective="flow"``:
    flow matching), ``late`` (discovery with
    ``epsilon=0``: later branch points, less sharing), ``expected`` (discovery with
    ``curves="expected"``: the noiseless similarity curves), ``unshared`` (the tree of
    :func:`unshared_tree` on ``classes``: no sharing where the types differ), ``exprtree``
    (the topology the train cells' log-normalised expression gives, :func:`expression_newick`,
    with branch times from the model's own space), ``latenttree`` (scVI rows: the tree
    discovered in scVI's latent, topology and times, which ``from_scvi_model`` used before it
    took the expression's topology), ``shrunk`` (scVI rows: the diffusion learns the train cells'
    latents shrunk to the spread of scVI's validation cells, :func:`shrink_to_validation`),
    ``scviepochs<N>`` (scVI rows: scVI trained N epochs instead of ``cfg['scvi_epochs']``),
    ``width<N>``
    (the network's width, e.g. ``width512``), ``white`` (the diffusion runs on the scores with
    every component scaled to unit within-type variance, on the default's tree, and its latents
    are scaled back and decoded by the default space: a preconditioning experiment),
    ``logsnr`` / ``interpolant`` (training times drawn uniform in log-SNR / in the linear
    interpolant's time instead of uniform in t), ``pcs<k>`` (the out-of-fold scores of a k-component
    PCA of the train cells instead of 30; the baselines keep 30) and the spaces
    ``scvi`` (scVI's latent, decoded by scVI) and ``expression`` (the log-normalised genes);
    without a space variant the model diffuses the out-of-fold PC scores. The space comes
    back under the key ``"space"``, for :func:`train_model`. Sampler variants
    (:data:`SAMPLER_VARIANTS`) do not change the model: :func:`generate_options`; training
    variants (:data:`TRAIN_VARIANTS`) change how it is trained: :func:`train_options`.
    """
    architecture, *variants = model_spec(spec).split(":")
    options = {"architecture": architecture}
    for variant in variants:
        if _train_variant(variant) is not None:
            continue  # a train() option: train_options
        if variant == "per_branch":
            options["gaussian_skip"] = variant
        elif variant == "flow":
            options["objective"] = variant
        elif variant == "late":
            options["discovery_kwargs"] = {**options.get("discovery_kwargs", {}), "epsilon": 0.0}
        elif variant == "expected":
            options["discovery_kwargs"] = {
                **options.get("discovery_kwargs", {}),
                "curves": "expected",
            }
        elif variant == "unshared":
            options["hierarchy"] = unshared_tree(classes)
        elif variant == "exprtree":  # needs the train cells: train_model gives the Newick
            options["expression_tree"] = True
        elif variant == "latenttree":  # needs the scVI latent: train_model discovers it
            options["latent_tree"] = True
        elif variant == "shrunk":  # needs scVI's validation cells: train_model shrinks
            options["shrink_latent"] = True
        elif variant.startswith("scviepochs") and variant[10:].isdigit():
            options["scvi_epochs"] = int(variant[10:])
        elif variant in SPACE_VARIANTS:
            options["space"] = variant
        elif variant.startswith("width") and variant[5:].isdigit():
            options["width"] = int(variant[5:])
        elif variant.startswith("pcs") and variant[3:].isdigit():
            options["n_pcs"] = int(variant[3:])
        elif variant == "white":
            options["precondition"] = True
        elif variant in ("logsnr", "interpolant"):  # training times' distribution
            options["t_sampling"] = variant
        else:
            raise ValueError(f"Unknown variant {variant!r} in {spec!r}.")
    return options


def seed_reports(method, held, train, cfg, **evaluate_kwargs):
    """``(seed, tl.evaluate report)`` of ``cfg['n_cells']`` cells per class generated by
    ``method`` with every generation seed in ``cfg['seeds']``, judged against ``held`` with
    ``train`` (the loop every benchmark of generators runs)."""
    import scbranch as sb

    for seed in cfg["seeds"]:
        kwargs = {"progress_bar": False} if isinstance(method, sb.BranchedDiffusion) else {}
        gen = method.generate(n_cells=cfg["n_cells"], seed=seed, **kwargs)
        yield seed, sb.tl.evaluate(gen, held, LABELS, train=train, seed=seed, **evaluate_kwargs)


def train_model(train, cfg, seed: int, architecture: str = "branched", obsm_key: str = LATENT):
    """One diffusion model in the default configuration, trained with training seed ``seed``
    for ``cfg['steps']`` optimiser steps (``None``: the package's default budget).
    ``architecture`` may name a variant, see :func:`model_options`; the scVI space trains its
    scVI model (``cfg['scvi_epochs']``) with the same seed, on the train cells only."""
    import scvi

    import scbranch as sb

    scvi.settings.seed = seed  # initialisation and minibatches
    classes = train.obs[LABELS].cat.categories
    options = model_options(architecture, classes)
    space = options.pop("space", None)
    n_pcs = options.pop("n_pcs", None)
    latent_tree = options.pop("latent_tree", False)
    shrink = options.pop("shrink_latent", False)
    scvi_epochs = options.pop("scvi_epochs", None)
    asked_of_scvi = (("latenttree", latent_tree), ("shrunk", shrink), ("scviepochs", scvi_epochs))
    for variant, asked in asked_of_scvi:
        if asked and space != "scvi":
            raise ValueError(f"{architecture!r}: {variant} applies to scvi rows only.")
    if latent_tree and shrink:
        raise ValueError(f"{architecture!r}: shrunk rows take the default tree.")
    if options.pop("expression_tree", False):
        options["hierarchy"] = expression_newick(train)
    if options.pop("precondition", False):
        training = train_kwargs(architecture, train.n_obs, cfg)
        return PreconditionedModel(train, options, training, cfg["accelerator"])
    if n_pcs is not None:  # the model's own latent: out-of-fold scores of a k-component PCA
        train = train.copy()
        train.obsm.pop(LATENT, None)
        _model_pca(train, n_comps=n_pcs)
    if space == "scvi":
        vae = sb.model.fit_scvi(
            train,
            counts_layer="counts",
            max_epochs=cfg["scvi_epochs"] if scvi_epochs is None else scvi_epochs,
            seed=seed,
            accelerator=cfg["accelerator"],
            enable_progress_bar=False,
        )
        cells = train.copy()
        if latent_tree:  # the tree of the latent itself, named so that it is used as it is
            # the latent exactly as from_scvi_model stores it (same encoder batches)
            sb.model.ScviSpace.store_latent(vae, cells, "X_scVI", LABELS)
            sb.tl.branch_hierarchy(cells, groupby=LABELS, use_rep="X_scVI", key_added="latent")
            options["hierarchy"] = "latent"
        # after any encoding (scVI's data loader draws from the global generator): the
        # diffusion starts from the same state as the others
        scvi.settings.seed = seed
        if shrink:
            model = model_on_shrunk_latent(vae, cells, options)
        else:
            model = sb.BranchedDiffusion.from_scvi_model(
                vae, labels_key=LABELS, adata=cells, **options
            )
    else:
        adata = default_setup(train, None if space == "expression" else obsm_key)
        model = sb.BranchedDiffusion(adata, **options)
    training = train_kwargs(architecture, train.n_obs, cfg)
    model.train(**training, accelerator=cfg["accelerator"], enable_progress_bar=False)
    logger.info("%s (training seed %d)", model, seed)
    return model


def validation_mask(vae, n_cells: int) -> np.ndarray:
    """The cells scVI held out of its own training (scvi-tools' validation split); ``vae``
    trained by ``sb.model.fit_scvi`` on ``n_cells`` cells, in their order."""
    mask = np.zeros(n_cells, dtype=bool)
    mask[np.asarray(vae.validation_indices, dtype=int)] = True
    return mask


def model_on_shrunk_latent(vae, cells, options: dict):
    """A scVI-space model built as ``from_scvi_model`` builds it (tree, standardisation,
    per-branch Gaussians, library sizes), on the latents of :func:`shrink_to_validation`.

    The scVI space refuses latents that are not its encoder's (so that a user cannot pair a
    latent with the wrong decoder); for this experiment that check is the one thing switched
    off, by having the space read the shrunk latents where it reads the encoder's.
    """
    from unittest import mock

    import scbranch as sb
    import scbranch.model._spaces._scvi_latent as scvi_space

    sb.model.ScviSpace.store_latent(vae, cells, "X_scVI", LABELS)
    labels = cells.obs[LABELS].astype(str).to_numpy()
    validation = validation_mask(vae, cells.n_obs)
    shrunk = shrink_to_validation(np.asarray(cells.obsm["X_scVI"]), labels, validation)
    shrunk = shrunk.astype(np.float32)
    cells.obsm["X_scVI_shrunk"] = shrunk

    def latent_of(vae, adata, info, rows=None):
        return shrunk if rows is None else shrunk[rows]

    sb.BranchedDiffusion.setup_anndata(cells, labels_key=LABELS, obsm_key="X_scVI_shrunk")
    with mock.patch.object(scvi_space, "latent_of", latent_of):
        return sb.BranchedDiffusion(cells, scvi_model=vae, **options)


def describe_tree(tree) -> str:
    """How many branch points a tree has, and the range of their times."""
    times = sorted({b.t_start for b in tree.branches if b.children})
    return f"{len(times)} branch points, t = {times[0]:.2f}-{times[-1]:.2f}"


def fit_methods(train, unseen, cfg, train_seed: int) -> tuple[dict, dict]:
    """Fit the methods of one training seed; returns row name -> generator, and -> cost.

    The diffusion models and scVI get ``train_seed``; the deterministic rows (Gaussian, probes)
    are fitted only with the first training seed.
    """
    import scbranch as sb

    rows, info = {}, {}

    def timed(name, make, parameters=lambda m: 0):
        t0 = time.perf_counter()
        method = make()
        info[name] = {"fit_s": time.perf_counter() - t0, "parameters": parameters(method)}
        return method

    def n_params(model):
        return sum(p.numel() for p in model.module.parameters())

    models = {}  # model spec -> (model, its first row): rows differing in the sampler share it
    for arch in cfg["architectures"]:
        spec = model_spec(arch)
        if spec in models:
            model, first = models[spec]
            info[arch] = dict(info[first])
        else:
            model = timed(
                arch, lambda spec=spec: train_model(train, cfg, train_seed, spec), n_params
            )
            info[arch]["steps"] = int(model.trainer.global_step)
            info[arch]["tree"] = describe_tree(model.tree)
            info[arch]["newick"] = model.tree.to_newick()
            models[spec] = (model, arch)
        rows[arch] = _Generator(model, anchors=train, **generate_options(arch))
    if not cfg.get("baselines", True):  # the diffusion models only
        return rows, info
    if not cfg.get("probes_only"):  # probes_only: the fixed rows without scVI resampling
        rows["scVI resampling"] = _Generator(
            timed(
                "scVI resampling",
                lambda: sb.baselines.ScviResampling(
                    train,
                    LABELS,
                    max_epochs=cfg["scvi_epochs"],
                    seed=train_seed,
                    accelerator=cfg["accelerator"],
                ),
                lambda m: sum(p.numel() for p in m.model_.module.parameters()),
            )
        )
    if train_seed != cfg["train_seeds"][0]:
        return rows, info
    return _fixed_rows(train, unseen, rows, info, timed)


def _fixed_rows(train, unseen, rows: dict, info: dict, timed) -> tuple[dict, dict]:
    """The rows without a training seed: the per-class Gaussian and the probes."""
    import scbranch as sb

    # an untrained model: its space (PCA map, counts' noise model) is all the rows below use
    space = sb.BranchedDiffusion(default_setup(train))
    rows["per-class Gaussian"] = timed(
        "per-class Gaussian", lambda: SpaceDecodedGaussian(default_setup(train), space)
    )
    rows["smoothed bootstrap"] = timed(
        "smoothed bootstrap",
        lambda: SpaceDecodedGaussian(default_setup(train), space, bandwidth=BOOTSTRAP_BANDWIDTH),
    )
    rows["probe: real cells, unseen"] = timed(
        "probe: real cells, unseen", lambda: TrainCellsProbe(unseen)
    )
    rows["probe: unseen cells via the PCs"] = timed(
        "probe: unseen cells via the PCs",
        lambda: DecodedProbe(space, unseen, scores_of(unseen, space.space.decoder)),
    )
    rows["probe: class mean"] = timed("probe: class mean", lambda: ClassMeanProbe(train))
    rows["probe: train cells"] = timed("probe: train cells", lambda: TrainCellsProbe(train))
    # the target of every model: the training cells as the models see them (out-of-fold
    # scores), decoded like their cells; a generator that learned them exactly lands here
    rows["probe: train cells' out-of-fold scores"] = timed(
        "probe: train cells' out-of-fold scores",
        lambda: DecodedProbe(space, train, train.obsm[LATENT]),
    )
    return rows, info


#: the smoothed bootstrap's bandwidth (in units of its type's covariance): at 1 its cells sit
#: about as far from the training cells as new real cells do (docs/benchmarks/anchored.md)
BOOTSTRAP_BANDWIDTH = 1.0


# ----------------------------------------------------------------------------- run
def run_dataset(name: str, train, held, unseen, cfg) -> tuple[pd.DataFrame, pd.DataFrame]:
    import scbranch as sb

    logger.info(
        "%s: %d train / %d held-out / %d unseen cells, %d genes",
        name,
        train.n_obs,
        held.n_obs,
        unseen.n_obs,
        train.n_vars,
    )
    rows, timing = [], []
    for train_seed in cfg["train_seeds"]:
        methods, info = fit_methods(train, unseen, cfg, train_seed)
        for method_name, method in methods.items():
            for seed in cfg["seeds"]:
                t0 = time.perf_counter()
                gen = method.generate(cfg["n_cells"], seed)
                gen_s = time.perf_counter() - t0
                report = sb.tl.evaluate(gen, held, LABELS, train=train, seed=seed)
                rows.append(
                    report.assign(
                        dataset=name, method=method_name, train_seed=train_seed, seed=seed
                    )
                )
                params = gen.uns.get("scbranch", {}).get("params", {})
                timing.append(
                    {
                        "dataset": name,
                        "method": method_name,
                        "train_seed": train_seed,
                        "seed": seed,
                        "generate_s": gen_s,
                        "cells": gen.n_obs,
                        "solver": params.get("solver", ""),
                        "network_calls": params.get("n_network_calls", 0),
                        "row_evaluations": params.get("n_row_evaluations", 0),
                        **info[method_name],
                    }
                )
            logger.info("%s / %s (training seed %d) done", name, method_name, train_seed)
    return pd.concat(rows, ignore_index=True), pd.DataFrame(timing)


def _md(df: pd.DataFrame, index: bool = True) -> str:
    """A DataFrame as a GitHub markdown table (no tabulate dependency)."""
    df = df.reset_index() if index else df
    cells = [[str(c) for c in df.columns]] + [
        [f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in df.to_numpy()
    ]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("---" for _ in df.columns) + "|")
    return "\n".join(lines)


def _fmt(mean: float, sd: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    digits = 3 if abs(mean) < 10 else 2
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _directions(rows: pd.DataFrame) -> pd.Series:
    return rows.drop_duplicates("metric").set_index("metric")["better"]


def _runs(mean_rows: pd.DataFrame, values: str) -> pd.DataFrame:
    """Per (method, training seed, generation seed) run: metric -> value."""
    return mean_rows.pivot_table(
        index=["method", "train_seed", "seed"], columns="metric", values=values, sort=False
    )


def summary_table(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Methods (and the control) x metrics: mean over classes, then mean ± sd over all runs.

    Also the ratio to the control (1 is ideal) and the cases where a method beats the control
    of a one-sided ("lower") metric by more than the combined seed sd (an artefact, unless the
    "method" is itself real cells).
    """
    mean_rows = rows[rows["group"] == "mean"]
    metrics = [m for m in METRIC_ORDER if m in set(mean_rows["metric"])]
    per_run, control = _runs(mean_rows, "generated"), _runs(mean_rows, "control")
    methods = list(pd.unique(mean_rows["method"]))
    # the control is the same for every method and training seed (same real cells, same
    # evaluation seed); counts-only metrics exist just for methods with counts (NaN-skipping)
    ctrl = control.groupby(level="seed").mean()
    for m in methods:
        for _, mine in control.loc[m].groupby(level="train_seed"):
            mine = mine.droplevel("train_seed").reindex(ctrl.index)
            ok = np.isfinite(mine.to_numpy())
            assert np.allclose(mine.to_numpy()[ok], ctrl.to_numpy()[ok]), f"control differs: {m}"
    better = _directions(rows)
    table, ratio, flags = {}, {}, []
    for method in methods:
        vals = per_run.loc[method]
        table[method] = {m: _fmt(vals[m].mean(), vals[m].std(ddof=1)) for m in metrics}
        ratio[method] = {m: f"{vals[m].mean() / ctrl[m].mean():.2f}" for m in metrics}
        for m in metrics:
            gap = vals[m].mean() - ctrl[m].mean()
            spread = float(np.hypot(vals[m].std(ddof=1), ctrl[m].std(ddof=1)))
            if better[m] == "lower" and -gap > spread:
                flags.append(
                    f"{method}: {m} {vals[m].mean():.3f} vs control "
                    f"{ctrl[m].mean():.3f} (combined seed sd {spread:.3f})"
                )
    table["real vs real (control)"] = {
        m: _fmt(ctrl[m].mean(), ctrl[m].std(ddof=1)) for m in metrics
    }
    return pd.DataFrame(table).T[metrics], pd.DataFrame(ratio).T[metrics], flags


#: the baselines a default model must beat (issue 19), and the metrics it must beat them on
BASELINES = ("scVI resampling", "per-class Gaussian", "smoothed bootstrap")
BEAT_METRICS = ("auroc", "mmd", "mmd_median")
#: the known answer of every comparison: real cells no model saw, a perfect generator
KNOWN_ANSWER = "probe: real cells, unseen"


def baseline_margins(rows: pd.DataFrame, candidates) -> pd.DataFrame:
    """Does each candidate beat each baseline by more than their combined seed sd?

    Per (candidate, baseline, metric of :data:`BEAT_METRICS`): both means over runs, the
    margin (baseline minus candidate; the metrics are one-sided, lower is better), the
    combined seed sd (``hypot`` of the two sds over runs) and whether the margin exceeds it.
    The unseen-real probe is always a candidate: the known answer says whether a perfect
    generator could pass the test at all with this many cells and seeds; where it cannot, no
    method can, and a tie is the best possible reading.
    """
    mean_rows = rows[rows["group"] == "mean"]
    per_run = _runs(mean_rows, "generated")
    present = set(per_run.index.get_level_values("method"))
    out = []
    for candidate in [*candidates, KNOWN_ANSWER]:
        for baseline in BASELINES:
            if not {candidate, baseline} <= present:
                continue
            a, b = per_run.loc[candidate], per_run.loc[baseline]
            for metric in BEAT_METRICS:
                if metric not in per_run:
                    continue
                margin = b[metric].mean() - a[metric].mean()
                spread = float(np.hypot(a[metric].std(ddof=1), b[metric].std(ddof=1)))
                out.append(
                    {
                        "candidate": candidate,
                        "baseline": baseline,
                        "metric": metric,
                        "candidate mean": a[metric].mean(),
                        "baseline mean": b[metric].mean(),
                        "margin": margin,
                        "combined sd": spread,
                        "beaten": bool(margin > spread),
                    }
                )
    return pd.DataFrame(out)


def seed_spread(rows: pd.DataFrame, metrics=("auroc", "mmd_median", "dispersion")) -> pd.DataFrame:
    """For the methods trained with several seeds: sd between training seeds and within them.

    Between: the sd of the per-training-seed means (over generation seeds). Within: the mean
    over training seeds of the sd between generation seeds.
    """
    trained = rows["method"].str.split(":").str[0].isin(TRAINED)  # variants too
    mean_rows = rows[(rows["group"] == "mean") & trained]
    per_run = _runs(mean_rows, "generated")
    out = {}
    for method in pd.unique(mean_rows["method"]):
        vals = per_run.loc[method]
        if vals.index.get_level_values("train_seed").nunique() < 2:
            continue
        by_train = vals.groupby(level="train_seed")
        for m in metrics:
            if m in vals:
                out[(method, m)] = {
                    "mean": vals[m].mean(),
                    "sd, training seeds": by_train[m].mean().std(ddof=1),
                    "sd, generation seeds": by_train[m].std(ddof=1).mean(),
                }
    table = pd.DataFrame(out).T
    if len(table):
        table.index.names = ["method", "metric"]
    return table


def per_class_comparison(rows: pd.DataFrame, a: str = "branched", b: str = "flat") -> pd.DataFrame:
    """Per class and metric: mean over seeds of methods a and b, and which is better.

    Better: lower, or (for "closer to control" metrics) nearer the control; a winner needs a
    margin larger than the two methods' combined seed sd, otherwise "tie".
    """
    cls = rows[(rows["group"] != "mean") & rows["method"].isin([a, b])]
    # over every run: training seeds x generation seeds
    stats = cls.groupby(["group", "metric", "method"])["generated"].agg(["mean", "std"])
    control = cls.groupby(["group", "metric"])["control"].mean()
    better = _directions(rows)
    out = []
    for (group, metric), ctrl in control.items():
        if metric not in HEADLINE_METRICS:
            continue
        sa, sb_ = stats.loc[(group, metric, a)], stats.loc[(group, metric, b)]
        if better[metric] == "lower":
            err_a, err_b = sa["mean"], sb_["mean"]
        else:
            err_a, err_b = abs(sa["mean"] - ctrl), abs(sb_["mean"] - ctrl)
        noise = float(np.hypot(sa["std"], sb_["std"]))
        winner = a if err_b - err_a > noise else (b if err_a - err_b > noise else "tie")
        out.append(
            {
                "class": group,
                "metric": metric,
                a: sa["mean"],
                b: sb_["mean"],
                "control": ctrl,
                "winner": winner,
            }
        )
    return pd.DataFrame(out)


#: solver names in the pages
SOLVER_NAMES = {
    "em": "the reverse SDE (Euler-Maruyama)",
    "heun": "the probability-flow ODE (Heun)",
    "dpm2m": "the probability-flow ODE (DPM-Solver++(2M))",
    "pc": "the reverse SDE with a Langevin corrector",
}


def sampler_note(results: dict) -> str:
    """Which solver the diffusion rows of a run generated with (recorded in the timing CSV;
    runs from before it was recorded used the ODE, ``generate()``'s default then)."""
    used = set()
    for res in results.values():
        timing = res["timing"]
        model = timing[timing["network_calls"] > 0]
        if "solver" in model.columns:
            used |= set(model["solver"].dropna())
        elif len(model):
            return (
                "The diffusion models generate with the probability-flow ODE (Heun, 25 steps), "
                "`generate()`'s default when this page was made; the default is now the "
                "reverse SDE ([sampler study](sampler_quality.md))."
            )
    if not used:
        return ""
    names = ", ".join(SOLVER_NAMES.get(s, s) for s in sorted(used))
    return f"The diffusion models generate with {names}, 25 steps."


def write_markdown(path: Path, results: dict, cfg_name: str, cfg: dict, wall_s: float) -> str:
    budget = (
        "the default training budget (about 100 epochs within 1,000-16,000 optimiser steps)"
        if cfg["steps"] is None
        else f"{cfg['steps']} optimiser steps"
    )
    if cfg.get("probes_only"):
        budget = "no model trained (`--probes-only`: the untrained rows of the full run)"
    lines = [
        "# Quality benchmark (generated by `benchmarks/quality.py`; do not edit by hand)",
        "",
        f"Settings `{cfg_name}`: {budget} (batch {cfg['batch_size']}) for "
        f"the diffusion models, {cfg['n_cells']} generated cells per class and seed, "
        f"training seeds {cfg['train_seeds']} (diffusion models and scVI) x generation seeds "
        f"{cfg['seeds']}, scVI trained {scvi_epochs_text(cfg['scvi_epochs'])}, "
        f"{cfg['accelerator']}. "
        f"Total wall time {wall_s / 60:.1f} min. Split per class: train / held-out / unseen "
        f"{' / '.join(f'{f:.0%}' for f in SPLIT)}. " + environment_text(),
        "",
        "Configuration: the package's default. The models (and the per-class Gaussian) "
        "work on the train cells' out-of-fold PC scores (`sb.tl.pca_out_of_fold`), set up "
        "with the counts, so their cells are decoded with the negative binomial around each "
        "class's own mean per gene (`generate(residual_noise='auto')`; class ratios, "
        "[class_ratios](class_ratios.md)). " + sampler_note(results) + " The package's "
        "default model is `conditioned` (one network conditioned on the branch); `branched` "
        "has one head per branch, `flat` no tree.",
        "",
        "Reference space: a 30-PC PCA fitted on the TRAIN cells only; the held-out halves, the "
        "generated cells and the unseen real cells are all out-of-sample for it. Read every "
        "row against the probe `real cells, unseen` (real cells no model or fitted space saw, "
        "evaluated exactly like a generator): it must sit at the control.",
        "",
        "Values: mean over evaluated classes (`tl.evaluate` rows `group == 'mean'`), then "
        "mean ± sd over runs (training x generation seeds). Better: lower for auroc, mmd, "
        "mmd_median and "
        "zero_fraction_error (the control is a floor); closer to the control for w2, "
        "dispersion, label_fidelity and the Spearman correlations (a perfect generator matches "
        "the control, and overshooting it means too-typical cells: see the class-mean probe). "
        "`train_distance` (median distance to the nearest train cell, against held-out "
        "cells') is the one metric that tells copies of the training cells from new cells: "
        "below the control's 1, cells sit nearer the training cells than new real cells do "
        "(the `train cells` probe is 0). "
        "The control row compares two disjoint halves of real held-out cells, in the same "
        "calls. Probes are references, not methods.",
        "",
    ]
    for name, res in results.items():
        table, ratio, flags = summary_table(res["rows"])
        timing = (
            res["timing"]
            .reindex(columns=[*res["timing"].columns.drop("steps", errors="ignore"), "steps"])
            .groupby("method", sort=False)
            .agg(
                fit_s=("fit_s", "first"),
                parameters=("parameters", "first"),
                steps=("steps", "first"),
                generate_s=("generate_s", "mean"),
                cells=("cells", "first"),
                network_calls=("network_calls", "first"),
            )
        )
        evaluated = sorted(set(res["rows"].query("metric == 'w2' and group != 'mean'")["group"]))
        lines += [
            f"## {name}",
            "",
            f"{res['n_train']} train / {res['n_held']} held-out / {res.get('n_unseen', 0)} "
            f"unseen cells, {res['n_genes']} genes. Classes with distances (>= 10 held-out "
            "cells per half): "
            f"{', '.join(evaluated)}; label fidelity covers all classes.",
            "",
            _md(table),
            "",
        ]
        lines += ["Ratio to the control (1 is ideal):", "", _md(ratio), ""]
        spread = seed_spread(res["rows"])
        if len(spread):
            lines += [
                "Seed spread of the trained methods (sd between training seeds, and between "
                "generation seeds of one trained model):",
                "",
                _md(spread),
                "",
            ]
        lines += [
            "Rated better than the control of a one-sided metric by more than the combined "
            "seed sd of both: " + ("; ".join(flags) if flags else "none") + ".",
            "",
        ]
        timing["ms_per_1000_cells"] = 1e3 * timing["generate_s"] / timing["cells"] * 1000
        lines += [
            "Cost (fit per training seed; generation per seed, all classes):",
            "",
            _md(timing[["fit_s", "steps", "parameters", "network_calls", "ms_per_1000_cells"]]),
            "",
        ]
        margins = baseline_margins(res["rows"], cfg["architectures"][:1])  # the default model
        if len(margins):
            lines += [
                "Against the baselines (one-sided metrics; beaten: the baseline's mean minus "
                "the candidate's exceeds their combined seed sd). The known answer "
                f"`{KNOWN_ANSWER}` says whether a perfect generator could pass this test "
                "here at all:",
                "",
                _md(margins, index=False),
                "",
            ]
        present = set(res["rows"]["method"])
        for a, b in [("branched", "flat"), ("conditioned", "flat"), ("branched", "conditioned")]:
            if not {a, b} <= present:
                continue
            comp = per_class_comparison(res["rows"], a, b)
            if not len(comp):
                continue
            wins = comp.groupby("metric")["winner"].value_counts().unstack(fill_value=0)
            lines += [
                f"{a.capitalize()} vs {b} per class (winner: lower, or nearer the control, by "
                "more than the two methods' combined seed sd):",
                "",
                _md(wins),
                "",
                _md(comp, index=False),
                "",
            ]
    return write_lines(path, lines, environment_line=False)  # each run's, from environment.json


def write_lines(path: Path, lines: list[str], environment_line: bool = True) -> str:
    """Write a generated markdown report (creating its folder) and return its text.

    ``environment_line``: end the page with the :func:`environment` of the process writing it,
    which for a script without ``--report-only`` is the run's own (pages that rebuild from an
    earlier run's CSVs name each run's instead, from ``environment.json``, and pass False).
    """
    if environment_line:
        lines = [*lines, "", f"Written in: {environment()}."]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def cpu_threads() -> str:
    """The compute a page's times were measured on: torch's CPU threads (``--threads``)."""
    import torch

    return f"{torch.get_num_threads()} CPU threads"


#: what a page's numbers were drawn with: a rerun in another environment is a new draw of
#: every row that samples (docs/evaluation.md, "What a rerun reproduces")
ENVIRONMENT_PACKAGES = (
    "scbranch", "numpy", "scipy", "scikit-learn", "torch", "scvi-tools", "anndata", "scanpy"
)  # fmt: skip


def environment() -> str:
    """The commit, package versions and BLAS threads of this process, as one line of text."""
    import subprocess

    from threadpoolctl import threadpool_info

    from scbranch._versions import package_versions

    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):  # not a git checkout, or no git
        commit = "unknown"
    pools = [i for i in threadpool_info() if i["user_api"] == "blas"]
    blas = sorted({f"{i['internal_api']} {i['num_threads']}" for i in pools})
    return (
        f"commit {commit}; "
        + ", ".join(f"{p} {v}" for p, v in package_versions(ENVIRONMENT_PACKAGES).items())
        + f"; BLAS threads: {', '.join(blas) or 'none found'}"
    )


def record_environment(
    run: str, path: Path = Path("environment.json"), add: bool = True, forget=None
) -> None:
    """Record this process's :func:`environment` under ``run`` in ``path`` (in the run's --out).

    ``add``: keep the other runs recorded there (split_seeds' ``--add`` runs make one page),
    less those for which ``forget(run)`` is true (runs whose rows this one replaced).
    """
    known = json.loads(path.read_text()) if add and path.exists() else {}
    known = {r: env for r, env in known.items() if forget is None or not forget(r)}
    known[run] = environment()
    path.write_text(json.dumps(known, indent=1))


def environment_text(path: Path = Path("environment.json"), keep=None) -> str:
    """A page's sentence on what its rows were drawn with (:func:`record_environment`).

    ``keep(run)``: only the runs whose rows the page shows (default: every run recorded).
    """
    runs = json.loads(path.read_text()) if path.exists() else {}
    runs = {r: env for r, env in runs.items() if keep is None or keep(r)}
    if not runs:
        return "Environment: not recorded (the run predates `environment.json`)."
    return "Environment: " + "; ".join(f"{run}: {env}" for run, env in runs.items()) + "."


def page_path(markdown: str | None, name: str, fast: bool = False) -> Path:
    """Where a script writes its page: ``markdown``, else ``docs/benchmarks/<name>.md``.

    A ``--fast`` run's page goes to ``benchmark_out/`` instead (its numbers mean nothing, and
    it must not replace the committed page); both are found from the repository, not from the
    working directory.
    """
    if markdown:
        return Path(markdown).resolve()
    folder = ROOT / "benchmark_out" if fast else ROOT / "docs" / "benchmarks"
    return folder / f"{name}.md"


def prepare_run(args, name: str) -> Path:
    """Threads, logging, seeds and output folder shared by the benchmark scripts.

    Creates ``args.out`` and makes it the working directory (lightning_logs land there, not in
    the repository); returns where the markdown report goes: ``args.markdown``, else
    ``docs/benchmarks/<name>.md`` (under ``args.out`` in fast mode, whose numbers mean nothing).
    """
    import scvi
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("scbranch").setLevel(logging.WARNING)
    scvi.settings.seed = 0
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.markdown:
        markdown = Path(args.markdown).resolve()
    else:
        markdown = out / f"{name}.md" if args.fast else ROOT / "docs" / "benchmarks" / f"{name}.md"
    os.chdir(out)
    return markdown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--gpu", action="store_true", help="GPU settings")
    mode.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--datasets", default="pbmc68k,pbmc3k")
    parser.add_argument("--out", default="benchmark_out/quality", help="CSV and figures")
    parser.add_argument(
        "--markdown", default=None, help="default: docs/benchmarks/quality.md (--fast: under --out)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--architectures",
        default="conditioned,branched,flat",
        help="diffusion models to compare (conditioned, branched, flat, and variants)",
    )
    parser.add_argument(
        "--probes-only",
        action="store_true",
        help="only the untrained rows (per-class Gaussian, probes), one seed of fitting; "
        "writes docs/benchmarks/quality_probes.md",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the markdown from the CSVs of a previous run in --out",
    )
    args = parser.parse_args(argv)
    cfg_name = "gpu" if args.gpu else "fast" if args.fast else "cpu"
    cfg = {**SETTINGS[cfg_name], "architectures": tuple(args.architectures.split(","))}
    name = "quality"
    if args.probes_only:
        cfg.update(architectures=(), probes_only=True, train_seeds=cfg["train_seeds"][:1])
        name = "quality_probes"
        if args.out == parser.get_default("out"):
            args.out = "benchmark_out/quality_probes"

    import matplotlib

    matplotlib.use("Agg")
    import scbranch as sb

    markdown = prepare_run(args, name)
    loaders = LOADERS
    results = {}
    t_all = time.perf_counter()
    if args.report_only:
        meta = json.loads(Path("meta.json").read_text())
        for name in args.datasets.split(","):
            results[name] = {
                "rows": pd.read_csv(f"rows_{name}.csv"),
                "timing": pd.read_csv(f"timing_{name}.csv"),
                **meta[name],
            }
        print(write_markdown(markdown, results, cfg_name, cfg, meta["wall_s"]))
        return 0
    for name in args.datasets.split(","):
        train, held, unseen = loaders[name](seed=0, fractions=SPLIT)
        rows, timing = run_dataset(name, train, held, unseen, cfg)
        rows.to_csv(f"rows_{name}.csv", index=False)
        timing.to_csv(f"timing_{name}.csv", index=False)
        methods = rows[~rows["method"].str.startswith("probe")]
        fig = sb.pl.evaluation(
            methods,
            metrics=HEADLINE_METRICS,
            ncols=3,
            return_fig=True,
        )
        fig.savefig(f"quality_{name}.png", dpi=110)
        results[name] = {
            "rows": rows,
            "timing": timing,
            "n_train": train.n_obs,
            "n_held": held.n_obs,
            "n_unseen": unseen.n_obs,
            "n_genes": train.n_vars,
        }
    meta = {
        name: {k: int(v) for k, v in r.items() if k.startswith("n_")} for name, r in results.items()
    }
    meta["wall_s"] = time.perf_counter() - t_all
    Path("meta.json").write_text(json.dumps(meta))
    record_environment(",".join(results), add=False)
    text = write_markdown(markdown, results, cfg_name, cfg, meta["wall_s"])
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
