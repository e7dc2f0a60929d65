"""Out-of-fold latent: do PC scores that spread like new cells' move generators to the control?

A PCA gives the cells it was fitted on more spread than any new cell gets, and every PCA-space
generator learns those in-sample scores: in benchmarks/quality.py the training cells themselves,
decoded through the PCs, are told apart from new real cells at AUROC 0.71 (pbmc3k) and 0.79
(pbmc68k_reduced), and the models land there. ``sb.tl.pca_out_of_fold`` shrinks each component
of the in-sample scores to the spread a PCA of the other folds gives the cells ("rescale", the
default) or rotates those out-of-fold scores into the basis of the full PCA ("procrustes").

Rows (every one judged by ``tl.evaluate(gen, held, train=train)``, reference PCA on the train
cells; the held-out and unseen cells and every generated set are out-of-sample for it):

  probe: real cells, unseen            real cells nothing saw: must sit at the control
  probe: unseen cells via the PCs      the same cells projected on the model PCA and decoded:
                                       the best a generator of 30-PC profiles can reach
  probe: train cells via the PCs, <latent>   the training cells' scores in each latent, decoded
  per-class Gaussian, <latent>         fitted in each latent
  branched, <latent>                   the default model trained on each latent

Usage (from the repository root, in the project's venv):
  python benchmarks/out_of_fold.py           # about 40 min on 2 cores
  python benchmarks/out_of_fold.py --fast    # smoke test; numbers meaningless
Writes docs/benchmarks/out_of_fold.md.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time

import numpy as np
import pandas as pd
from quality import (
    LABELS,
    LOADERS,
    SPLIT,
    TrainCellsProbe,
    _fmt,
    _md,
    prepare_run,
    scores_of,
    seed_reports,
    write_lines,
)

SETTINGS = {
    "cpu": {
        "steps": 2000,
        "batch_size": 64,
        "n_cells": 200,
        "seeds": [0, 1, 2],
        "train_seeds": {"pbmc68k": [0, 1, 2], "pbmc3k": [0]},
    },
    "fast": {
        "steps": 20,
        "batch_size": 64,
        "n_cells": 40,
        "seeds": [0],
        "train_seeds": {"pbmc68k": [0], "pbmc3k": [0]},
    },
}
#: latent name -> obsm key in the train cells
LATENTS = {"in-sample": "X_pca", "rescaled": "X_pca_oof", "procrustes": "X_pca_rot"}
METRICS = [
    ("reference_pca", m) for m in ("auroc", "mmd_median", "dispersion", "label_fidelity")
] + [("genes", "de_lfc_spearman")]

logger = logging.getLogger("out_of_fold")


class LatentCellsProbe:
    """The training (or any) cells' coordinates in one latent, decoded through the model PCA."""

    def __init__(self, cells, z, decoder):
        from scbranch.model._decoding import decode

        probe = TrainCellsProbe(cells)
        probe.x = decode(decoder, np.asarray(z, dtype=np.float32))
        probe.var_names = decoder["var_names"]
        self._probe = probe

    def generate(self, n_cells, seed):
        return self._probe.generate(n_cells, seed)


def fit_rows(train, unseen, cfg, train_seeds) -> dict:
    """Row name -> list of (training seed, generator)."""

    import scbranch as sb
    from scbranch.model._decoding import fit_pca_decoder

    decoder = fit_pca_decoder(train, "X_pca", None)
    z_unseen = scores_of(unseen, decoder)
    rows = {
        "probe: real cells, unseen": [(0, TrainCellsProbe(unseen))],
        "probe: unseen cells via the PCs": [(0, LatentCellsProbe(unseen, z_unseen, decoder))],
    }
    for name, key in LATENTS.items():
        rows[f"probe: train cells via the PCs, {name}"] = [
            (0, LatentCellsProbe(train, train.obsm[key], decoder))
        ]
    for name in ("in-sample", "rescaled"):
        rows[f"per-class Gaussian, {name}"] = [
            (0, sb.baselines.PerClassGaussian(train, LABELS, obsm_key=LATENTS[name]))
        ]
    for name in ("in-sample", "rescaled"):
        rows[f"branched, {name}"] = [
            (seed, train_branched(train, LATENTS[name], cfg, seed)) for seed in train_seeds
        ]
    return rows


def train_branched(
    train, obsm_key: str, cfg: dict, seed: int, *, architecture: str = "branched", **setup
):
    """The default model (or ``architecture``) on ``train.obsm[obsm_key]`` (a copy of
    ``train``), trained for ``cfg['steps']`` optimiser steps with training seed ``seed``;
    ``setup`` goes to ``setup_anndata`` (e.g. ``counts_layer``)."""
    import scvi

    import scbranch as sb

    scvi.settings.seed = seed
    adata = train.copy()
    sb.BranchedDiffusion.setup_anndata(adata, labels_key=LABELS, obsm_key=obsm_key, **setup)
    model = sb.BranchedDiffusion(adata, architecture=architecture)
    steps_per_epoch = max(1, math.ceil(train.n_obs / cfg["batch_size"]))
    t0 = time.perf_counter()
    model.train(
        max_epochs=max(1, math.ceil(cfg["steps"] / steps_per_epoch)),
        batch_size=cfg["batch_size"],
        accelerator="cpu",
        enable_progress_bar=False,
    )
    elapsed = time.perf_counter() - t0
    logger.info("%s on %s, seed %d: %.0f s", architecture, obsm_key, seed, elapsed)
    return model


def evaluate_rows(name: str, rows: dict, train, held, cfg: dict) -> pd.DataFrame:
    """Every (training seed, generator) of every row, for each generation seed, judged by
    ``tl.evaluate(gen, held, train=train)``: one record per row, seed and metric of METRICS."""
    records = []
    for row, generators in rows.items():
        for train_seed, method in generators:
            for seed, report in seed_reports(method, held, train, cfg):
                m = report[report["group"] == "mean"].set_index(["space", "metric"])
                for key in METRICS:
                    if key in m.index:
                        records.append(
                            {
                                "row": row,
                                "train_seed": train_seed,
                                "seed": seed,
                                "metric": key[1],
                                "value": m.loc[key, "generated"],
                                "control": m.loc[key, "control"],
                            }
                        )
        logger.info("%s / %s done", name, row)
    return pd.DataFrame(records)


def run_dataset(name, loader, cfg) -> tuple[pd.DataFrame, dict]:
    import scbranch as sb

    train, held, unseen = loader(seed=0, fractions=SPLIT)
    sb.tl.pca_out_of_fold(train, groupby=LABELS, key_added=LATENTS["rescaled"])
    sb.tl.pca_out_of_fold(
        train, groupby=LABELS, method="procrustes", key_added=LATENTS["procrustes"]
    )
    inflation = train.uns["scbranch_out_of_fold"][LATENTS["rescaled"]]["inflation"]
    rows = fit_rows(train, unseen, cfg, cfg["train_seeds"][name])
    df = evaluate_rows(name, rows, train, held, cfg)
    meta = {
        "n_train": train.n_obs,
        "n_held": held.n_obs,
        "n_genes": train.n_vars,
        "inflation_mean": float(np.mean(inflation)),
        "inflation_first5": float(np.mean(inflation[:5])),
        "inflation_last10": float(np.mean(inflation[-10:])),
    }
    return df, meta


def table(df: pd.DataFrame) -> pd.DataFrame:
    order = list(dict.fromkeys(df["row"]))
    cells = {}
    for (row, metric), g in df.groupby(["row", "metric"], sort=False):
        cells.setdefault(row, {})[metric] = _fmt(g["value"].mean(), g["value"].std(ddof=0))
    ctrl = df.groupby("metric")["control"]
    cells["real vs real (control)"] = {
        m: _fmt(ctrl.get_group(m).mean(), ctrl.get_group(m).std(ddof=0)) for m in ctrl.groups
    }
    out = pd.DataFrame(cells).T.loc[order + ["real vs real (control)"]]
    return out[[m for _, m in METRICS if m in out.columns]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--datasets", default="pbmc68k,pbmc3k")
    parser.add_argument("--out", default="benchmark_out/out_of_fold")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    cfg_name = "fast" if args.fast else "cpu"
    cfg = SETTINGS[cfg_name]
    markdown = prepare_run(args, "out_of_fold")
    loaders = LOADERS
    t_all = time.perf_counter()
    lines = [
        "# Out-of-fold latent (generated by `benchmarks/out_of_fold.py`; do not edit by hand)",
        "",
        f"Settings `{cfg_name}`: {cfg['steps']} optimiser steps (batch {cfg['batch_size']}), "
        f"{cfg['n_cells']} generated cells per class and generation seed {cfg['seeds']}, "
        f"training seeds {cfg['train_seeds']}; split seed 0, train / held-out / unseen "
        "50/30/20 %. Every row: `tl.evaluate(gen, held, train=train)` (reference PCA on the "
        "train cells), mean over classes, then mean ± sd over runs. Latents: `in-sample` is "
        "`sc.pp.pca` of the train cells; `rescaled` and `procrustes` are "
        "`sb.tl.pca_out_of_fold(train, groupby='cell_type', method=...)` (5 folds).",
        "",
        "Read every row against the control and against `probe: unseen cells via the PCs` (new "
        "real cells decoded through the same 30 PCs: the best a generator of 30-PC profiles can "
        "do); `probe: real cells, unseen` must sit at the control.",
    ]
    for name in args.datasets.split(","):
        df, meta = run_dataset(name, loaders[name], cfg)
        df.to_csv(f"rows_{name}.csv", index=False)
        lines += [
            "",
            f"## {name}",
            "",
            f"{meta['n_train']} train / {meta['n_held']} held-out cells, {meta['n_genes']} genes. "
            f"In-sample scores spread {meta['inflation_mean']:.2f}x the out-of-fold spread on "
            f"average ({meta['inflation_first5']:.2f}x on the first 5 components, "
            f"{meta['inflation_last10']:.2f}x on the last 10).",
            "",
            _md(table(df)),
        ]
    lines += ["", f"Total wall time {(time.perf_counter() - t_all) / 60:.1f} min.", ""]
    print(write_lines(markdown, lines))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
