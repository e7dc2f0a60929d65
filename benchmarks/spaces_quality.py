"""Spaces on the corrected instrument: the default model in PCA, scVI-latent and expression space.

The same default model (the branch-conditioned network) and budget in each of the package's
three spaces, judged by the quality
benchmark's protocol (``benchmarks/quality.py``: train / held-out / unseen split per class,
``tl.evaluate`` in a reference PCA fitted on the train cells only, 3 training x 3 generation
seeds) next to the known answer: unseen real cells, judged like a generator, must sit at the
control. (benchmarks/spaces.py measures counts per class; its AUROC is of the older instrument.)

Rows:
  conditioned          the default: out-of-fold PC scores (30), negative-binomial decoding
  conditioned:scvi     scVI's latent means (scVI trained on the train cells' counts with the
                       same seed, ``scvi_epochs``), decoded by scVI: counts from its likelihood
  conditioned:scvi:shrunk  the same, with the train cells' latents shrunk to the spread of
                       scVI's validation cells before the diffusion learns them (scVI's
                       encoder gives the cells it trained on 2-3 times new cells' within-type
                       variance, scvi_latent_spread.py; quality.shrink_to_validation)
  conditioned:expression   the 2,000 (pbmc3k) / 765 (pbmc68k) log-normalised genes, no
                       encoder; negative values set to 0
(``--rows branched,branched:scvi,branched:expression`` gives the same with one head per branch,
the spaces page of scbranch 0.1.)
  probe: real cells, unseen   the known answer
  probe: unseen cells through scVI   the unseen real cells encoded by an scVI model of the
                       train cells and decoded as the scVI row's cells are: what a generator
                       matching new cells' latents exactly would score (quality.py's decoded
                       unseen PC scores for the PCA space)
  probe: train cells through scVI   the train cells scVI trained on, their latents decoded
                       the same way: what the scVI row's diffusion would score if it learned
                       its training latents perfectly (all of them but the 10 % scVI held out
                       for validation, which the row learns too)
  probe: train cells through scVI, shrunk   the same latents shrunk as the :shrunk row's:
                       what that row would score if it learned them perfectly
  probe: per-class Gaussian, genes   each type's log-normalised genes drawn from a Gaussian
                       with the type's mean, its top-30 covariance and a per-gene remainder,
                       negative values set to 0: what continuous noise in gene space looks
                       like to the instrument (compare quality.md's per-class Gaussian in the
                       PC scores, decoded with the negative binomial)

Usage (from the repository root, in the project's venv; run nothing else beside it):
  python benchmarks/spaces_quality.py --reuse benchmark_out/quality  # the default rows of
                                       # a quality or variants run (same splits and seeds)
  python benchmarks/spaces_quality.py  # every row trained, about 50 min
  python benchmarks/spaces_quality.py --fast   # smoke test (numbers meaningless)
Writes docs/benchmarks/spaces_quality.md and, under --out, the per-row CSV (machinery:
variants.py).
"""

from __future__ import annotations

import logging
import sys
from functools import partial

import anndata as ad
import numpy as np
import pandas as pd
import variants
from quality import LABELS, class_subset, shrink_to_validation, validation_mask

ROWS = ("conditioned", "conditioned:scvi", "conditioned:scvi:shrunk", "conditioned:expression")
TITLE = "The three spaces on the corrected instrument"
INTRO = (
    "One model per space, the package's default network (branch-conditioned) and budget "
    "(default steps, batch 64): `conditioned` "
    "diffuses the out-of-fold PC scores and decodes with the negative binomial, "
    "`conditioned:scvi` scVI's latent means (scVI fitted on the train cells with the training "
    "seed) decoded by scVI, `conditioned:expression` the log-normalised genes themselves. "
    "Fit (s) includes scVI's training for the scVI row. `probe: unseen cells through scVI` "
    "is the scVI row with new cells' exact latents: the unseen real cells encoded by an scVI "
    "model of the train cells (seeded with the generation seed, so the scVI models of the "
    "row's training seeds) and decoded as that row's cells are; `probe: train cells through "
    "scVI` the same with the train cells scVI trained on, the latents the scVI row learns "
    "less the 10 % scVI held out for validation, and `..., shrunk` those latents with each "
    "type's spread "
    "shrunk, per component, to that of scVI's validation cells (out-of-sample for its "
    "encoder), which `conditioned:scvi:shrunk` learns."
)


class GeneSpaceGaussian:
    """One Gaussian per type in log-normalised gene space: mean, top-``rank`` covariance
    (from the type's centred cells) and a per-gene variance for the rest; negative draws set
    to 0, as the expression space decodes.

    Examples
    --------
    >>> cells = ad.AnnData(np.abs(np.random.default_rng(0).normal(size=(40, 5))))
    >>> cells.obs[LABELS] = pd.Categorical(["a", "b"] * 20)
    >>> GeneSpaceGaussian(cells, rank=2).generate(3, seed=0).shape
    (6, 5)
    """

    def __init__(self, train, rank: int = 30):
        import scipy.sparse as sp

        x = train.X.toarray() if sp.issparse(train.X) else np.asarray(train.X)
        labels = train.obs[LABELS]
        self.var_names, self.classes = train.var_names, labels.cat.categories
        self.moments = {}
        for c in self.classes:
            cells = x[(labels == c).to_numpy()].astype(np.float64)
            mean = cells.mean(0)
            _, s, vt = np.linalg.svd(cells - mean, full_matrices=False)
            k = min(rank, len(s))
            scales = s[:k] / np.sqrt(max(len(cells) - 1, 1))  # sd along each component
            rest = (cells - mean) - (cells - mean) @ vt[:k].T @ vt[:k]
            self.moments[c] = (mean, scales, vt[:k], rest.std(0, ddof=1 if len(cells) > 1 else 0))

    def generate(self, n_cells: int, seed: int):
        """``n_cells`` of every type, labelled in ``obs[LABELS]``."""
        rng = np.random.default_rng(seed)
        blocks = []
        for c in self.classes:
            mean, scales, basis, rest = self.moments[c]
            top = (rng.standard_normal((n_cells, len(scales))) * scales) @ basis
            blocks.append(mean + top + rng.standard_normal((n_cells, len(mean))) * rest)
        out = ad.AnnData(np.clip(np.vstack(blocks), 0.0, None).astype(np.float32))
        out.var_names = self.var_names
        out.obs[LABELS] = pd.Categorical(np.repeat(self.classes, n_cells), categories=self.classes)
        return out


class ScviDecodedProbe:
    """Real cells' own latents through scVI: encoded by an scVI model of the train cells (the
    ``:scvi`` row's, same epochs, its seed the generation seed) to their latent means and
    decoded as that row's generated cells are (class library sizes, counts drawn from scVI's
    likelihood, log-normalised).

    ``source="unseen"``: the unseen real cells, what a generator that matched new cells'
    latents exactly would score (latents that decode better than real cells' own could score
    better), as quality.py's decoded unseen PC scores are for the PCA space. ``"train"``: the
    train cells scVI trained on, the latents the ``:scvi`` row's diffusion learns less the
    10 % scVI held out for validation: what it would score if it learned them perfectly.
    ``"train_shrunk"``: the same latents shrunk to the spread of scVI's validation cells
    (``quality.shrink_to_validation``, what the ``:shrunk`` row learns).
    """

    #: (id of the train cells, seed) -> (the train cells, untrained diffusion model, train
    #: cells' latents): the probes of one run share scVI's fits (the cells are kept so that
    #: their id is not reused)
    _fits: dict = {}

    def __init__(self, train, unseen, cfg, source: str = "unseen"):
        if source not in ("unseen", "train", "train_shrunk"):
            raise ValueError(f"Unknown source {source!r}.")
        self.train, self.unseen, self.cfg, self.source = train, unseen, cfg, source

    def _fit(self, seed: int):
        """The scVI space of the train cells with scVI seeded by ``seed``, and their latents."""
        key = (id(self.train), seed)
        if key not in self._fits:
            import scvi

            import scbranch as sb

            scvi.settings.seed = seed
            vae = sb.model.fit_scvi(
                self.train,
                counts_layer="counts",
                max_epochs=self.cfg["scvi_epochs"],
                seed=seed,
                accelerator=self.cfg["accelerator"],
                enable_progress_bar=False,
            )
            # an untrained diffusion model: its scVI space (encoder, decoder, library sizes)
            # is all the probe uses
            model = sb.BranchedDiffusion.from_scvi_model(
                vae, labels_key=LABELS, adata=self.train.copy()
            )
            z = model.encode(self.train, "the train cells")
            self._fits[key] = (self.train, model, z)
        return self._fits[key][1:]

    def generate(self, n_cells: int, seed: int):
        """Up to ``n_cells`` cells of every type (a seeded subset), through scVI."""
        model, z_train = self._fit(seed)
        if self.source == "unseen":
            labels = self.unseen.obs[LABELS].astype(str).to_numpy()
            idx = class_subset(labels, n_cells, seed)
            z = model.encode(self.unseen[idx], "the unseen cells")
        else:
            labels = self.train.obs[LABELS].astype(str).to_numpy()
            validation = validation_mask(model.scvi_model, self.train.n_obs)
            if self.source == "train_shrunk":
                z_train = shrink_to_validation(z_train, labels, validation)
            labels, z_train = labels[~validation], z_train[~validation]
            idx = class_subset(labels, n_cells, seed)
            z = z_train[idx]
        codes = np.array([model.classes.index(c) for c in labels[idx]])
        space = model.space
        options = space.resolve_options(counts=None, batch=None, residual_noise=False)
        out = space.decode(np.asarray(z, dtype=np.float32), codes, options, seed)
        gen = ad.AnnData(out.X, var=pd.DataFrame(index=out.var_names))  # sparse, as generated
        gen.obs_names = [f"cell{i}" for i in range(len(idx))]
        gen.obs[LABELS] = pd.Categorical(labels[idx], categories=pd.unique(labels))
        return gen


#: probes judged next to the model rows (row name -> made from the train cells, the unseen
#: cells and the settings)
PROBES = {
    "probe: per-class Gaussian, genes": lambda train, unseen, cfg: GeneSpaceGaussian(train),
    "probe: unseen cells through scVI": ScviDecodedProbe,
    "probe: train cells through scVI": partial(ScviDecodedProbe, source="train"),
    "probe: train cells through scVI, shrunk": partial(ScviDecodedProbe, source="train_shrunk"),
}


def main(argv=None) -> int:
    return variants.main(
        argv,
        script="spaces_quality.py",
        title=TITLE,
        intro=INTRO,
        rows=ROWS,
        probes=PROBES,
    )


if __name__ == "__main__":
    logging.getLogger("variants").setLevel(logging.INFO)
    sys.exit(main())
