"""Decoder noise models: what should a PCA-space cell carry beyond its 30-PC profile?

A PCA-space generator makes PC scores; decoded to genes they are denoised profiles, and a
classifier tells even NEW REAL cells decoded through the same PCs from real cells (AUROC 0.61
on pbmc3k in benchmarks/out_of_fold.py). ``generate(residual_noise=...)`` decides what is added:
nothing, per-gene Gaussian noise of the PCA residual (``True``), or counts drawn from a per-gene
negative binomial around the decoded mean with a library size of the class and ``.X`` their
log-normalisation with its PC scores set back to the generated ones (``"nb"``, fitted on the
train cells' counts at set-up).

Rows (every one judged by ``tl.evaluate(gen, held, train=train)``, reference PCA on the train
cells; held-out, unseen and generated cells are all out-of-sample for it):

  probe: real cells, unseen             real cells nothing saw: must sit at the control
  probe: unseen cells via the PCs, <noise>   the same cells' PC scores decoded with each noise
                                        model: the known answer for the decoder alone (the
                                        best a generator of exact PC scores can reach)
  branched, <latent>, <noise>           the default model on the in-sample PCA and on the
                                        out-of-fold rescaled scores (sb.tl.pca_out_of_fold)

Usage (from the repository root, in the project's venv):
  python benchmarks/noise_models.py          # about 40 min on 2 cores
  python benchmarks/noise_models.py --probes-only   # the decoder's known answer, minutes
  python benchmarks/noise_models.py --fast   # smoke test; numbers meaningless
Writes docs/benchmarks/noise_models.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import pandas as pd
from out_of_fold import evaluate_rows, table, train_branched
from quality import (
    LABELS,
    LOADERS,
    SPLIT,
    DecodedProbe,
    TrainCellsProbe,
    _md,
    prepare_run,
    scores_of,
    write_lines,
)

SETTINGS = {
    "cpu": {
        "steps": 2000,
        "batch_size": 64,
        "n_cells": 200,
        "seeds": [0, 1, 2],
        "train_seeds": [0, 1, 2],
    },
    "fast": {"steps": 20, "batch_size": 64, "n_cells": 40, "seeds": [0], "train_seeds": [0]},
}
#: noise name -> generate(residual_noise=...)
NOISES = {"none": False, "gaussian": True, "nb": "nb"}
#: latent name -> obsm key of the train cells
LATENTS = {"in-sample": "X_pca", "rescaled": "X_pca_oof"}

logger = logging.getLogger("noise_models")


class _Noisy:
    """A trained model generating with one noise model."""

    def __init__(self, model, noise):
        self.model, self.noise = model, noise

    def generate(self, n_cells, seed):
        return self.model.generate(
            n_cells=n_cells, seed=seed, residual_noise=self.noise, progress_bar=False
        )


def fit_rows(train, unseen, cfg) -> dict:
    """Row name -> list of (training seed, generator)."""
    import scbranch as sb

    # an untrained model's space decodes the probes (fitted on the train cells' counts)
    adata = train.copy()
    sb.BranchedDiffusion.setup_anndata(
        adata, labels_key=LABELS, obsm_key="X_pca", counts_layer="counts"
    )
    decoding = sb.BranchedDiffusion(adata)
    decoder = decoding.space.decoder
    z_unseen = scores_of(unseen, decoder)
    rows = {"probe: real cells, unseen": [(0, TrainCellsProbe(unseen))]}
    for noise, option in NOISES.items():
        rows[f"probe: unseen cells via the PCs, {noise}"] = [
            (0, DecodedProbe(decoding, unseen, z_unseen, option))
        ]
    if cfg.get("probes_only"):
        return rows
    for latent, key in LATENTS.items():
        models = [
            (seed, train_branched(train, key, cfg, seed, counts_layer="counts"))
            for seed in cfg["train_seeds"]
        ]
        for noise in ("none", "nb"):
            rows[f"branched, {latent}, {noise}"] = [
                (seed, _Noisy(model, NOISES[noise])) for seed, model in models
            ]
    return rows


def run_dataset(name, loader, cfg) -> tuple[pd.DataFrame, dict]:
    import scbranch as sb

    train, held, unseen = loader(seed=0, fractions=SPLIT)
    sb.tl.pca_out_of_fold(train, groupby=LABELS, key_added=LATENTS["rescaled"])
    df = evaluate_rows(name, fit_rows(train, unseen, cfg), train, held, cfg)
    return df, {"n_train": train.n_obs, "n_held": held.n_obs, "n_genes": train.n_vars}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--datasets", default="pbmc68k,pbmc3k")
    parser.add_argument("--out", default="benchmark_out/noise_models")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--probes-only",
        action="store_true",
        help="only the decoded probes (no model is trained): the decoder's known answer",
    )
    args = parser.parse_args(argv)
    cfg_name = "fast" if args.fast else "cpu"
    cfg = {**SETTINGS[cfg_name], "probes_only": args.probes_only}
    markdown = prepare_run(args, "noise_models")
    loaders = LOADERS
    t_all = time.perf_counter()
    lines = [
        "# Decoder noise models (generated by `benchmarks/noise_models.py`; do not edit by hand)",
        "",
        f"Settings `{cfg_name}`: {cfg['steps']} optimiser steps (batch {cfg['batch_size']}), "
        f"{cfg['n_cells']} generated cells per class and generation seed {cfg['seeds']}, "
        + ("(probes only, no model trained); " if args.probes_only else "")
        + f"training seeds {cfg['train_seeds']}; split seed 0, train / held-out / unseen "
        "50/30/20 %. Every row: `tl.evaluate(gen, held, train=train)` (reference PCA on the "
        "train cells), mean over classes, then mean ± sd over runs. Noise: `none` = the decoded "
        "profile, `gaussian` = `residual_noise=True`, `nb` = `residual_noise='nb'` (negative "
        "binomial counts around the decoded mean, `.X` their log-normalisation with its PC scores "
        "set back to the generated ones). Latents: "
        "`in-sample` is `sc.pp.pca` of the train cells, `rescaled` is "
        "`sb.tl.pca_out_of_fold(train, groupby='cell_type')`.",
        "",
        "Read every row against the control and the probes: `probe: real cells, unseen` must "
        "sit at the control, and `probe: unseen cells via the PCs, <noise>` is the best a "
        "generator of exact PC scores can reach with that noise model.",
    ]
    for name in args.datasets.split(","):
        df, meta = run_dataset(name, loaders[name], cfg)
        df.to_csv(f"rows_{name}.csv", index=False)
        lines += [
            "",
            f"## {name}",
            "",
            f"{meta['n_train']} train / {meta['n_held']} held-out cells, {meta['n_genes']} genes.",
            "",
            _md(table(df)),
        ]
    lines += ["", f"Total wall time {(time.perf_counter() - t_all) / 60:.1f} min.", ""]
    print(write_lines(markdown, lines))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
