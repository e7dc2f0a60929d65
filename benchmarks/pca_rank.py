"""PCA rank: does a generator in more principal components get past the 30-PC floor?

A 30-PC model decodes to denoised profiles, and new REAL cells decoded through the same 30 PCs
are told apart from real cells (AUROC 0.61 on pbmc3k, benchmarks/noise_models.py). More
components lower that floor, and a PCA of all components is the full-rank rotation of the
expression (lever 4 of issue 19: diffusion in a rotation with per-component scaling), but the
diffusion has more dimensions to learn and the in-sample inflation of the trailing components
grows. Each latent here is the out-of-fold rescaled one (``sb.tl.pca_out_of_fold``), which
spreads like new cells'; the model standardises with one global scale and its analytic
Gaussian term carries every component's own variance.

Rows, for each number of components k (every one judged by ``tl.evaluate(gen, held,
train=train)``, reference PCA on the train cells, independent of k):

  probe: real cells, unseen              real cells nothing saw: must sit at the control
  probe: unseen cells via k PCs          the same cells projected on k PCs and decoded: the
                                         best a generator of exact k-PC scores can reach
  probe: train cells via k PCs, rescaled the train cells' rescaled scores, decoded
  branched, k PCs                        the default model on the rescaled k-PC scores

Usage (from the repository root, in the project's venv):
  python benchmarks/pca_rank.py                 # about 30 min on 2 cores
  python benchmarks/pca_rank.py --fast          # smoke test; numbers meaningless
Writes docs/benchmarks/pca_rank.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import pandas as pd
from out_of_fold import LatentCellsProbe, evaluate_rows, table, train_branched
from quality import (
    LABELS,
    LOADERS,
    SPLIT,
    TrainCellsProbe,
    _md,
    cpu_threads,
    prepare_run,
    scores_of,
    write_lines,
)

SETTINGS = {
    "cpu": {
        "ranks": [30, 100, 300],
        "steps": 2000,
        "batch_size": 64,
        "n_cells": 200,
        "seeds": [0, 1, 2],
        "train_seed": 0,
        "n_folds": 5,
    },
    "fast": {
        "ranks": [10, 20],
        "steps": 20,
        "batch_size": 64,
        "n_cells": 40,
        "seeds": [0],
        "train_seed": 0,
        "n_folds": 5,
    },
}

logger = logging.getLogger("pca_rank")


def with_rank(train, k: int, n_folds: int):
    """A copy of ``train`` with a k-component PCA (``obsm['X_pca']``, ``varm['PCs']``) and its
    out-of-fold rescaled scores (``obsm['X_pca_oof']``)."""
    import scanpy as sc

    import scbranch as sb

    cells = train.copy()
    sc.pp.pca(cells, n_comps=k, random_state=0)
    sb.tl.pca_out_of_fold(cells, groupby=LABELS, n_folds=n_folds)
    return cells


def fit_rows(train, unseen, cfg) -> tuple[dict, list]:
    """Row name -> [(training seed, generator)], and the ranks' costs."""
    from scbranch.model._decoding import fit_pca_decoder

    rows = {"probe: real cells, unseen": [(0, TrainCellsProbe(unseen))]}
    # every fold's PCA needs at least k cells: larger ranks are left out (and said so)
    largest = int(train.n_obs * (cfg["n_folds"] - 1) / cfg["n_folds"]) - 1
    costs = []
    for k in cfg["ranks"]:
        if k > min(largest, train.n_vars - 1):
            logger.warning("%d components: more than the folds' PCA can give; left out", k)
            continue
        cells = with_rank(train, k, cfg["n_folds"])
        decoder = fit_pca_decoder(cells, "X_pca", None)
        z_unseen = scores_of(unseen, decoder)
        rows[f"probe: unseen cells via {k} PCs"] = [
            (0, LatentCellsProbe(unseen, z_unseen, decoder))
        ]
        rows[f"probe: train cells via {k} PCs, rescaled"] = [
            (0, LatentCellsProbe(cells, cells.obsm["X_pca_oof"], decoder))
        ]
        t0 = time.perf_counter()
        model = train_branched(cells, "X_pca_oof", cfg, cfg["train_seed"])
        costs.append({"components": k, "fit_s": round(time.perf_counter() - t0)})
        rows[f"branched, {k} PCs"] = [(cfg["train_seed"], model)]
    return rows, costs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--datasets", default="pbmc3k,pbmc68k")
    parser.add_argument("--ranks", default=None, help="numbers of components, e.g. 30,100,300")
    parser.add_argument("--out", default="benchmark_out/pca_rank")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    cfg_name = "fast" if args.fast else "cpu"
    cfg = dict(SETTINGS[cfg_name])
    if args.ranks:
        cfg["ranks"] = [int(k) for k in args.ranks.split(",")]
    markdown = prepare_run(args, "pca_rank")
    loaders = LOADERS
    t_all = time.perf_counter()
    lines = [
        "# PCA rank (generated by `benchmarks/pca_rank.py`; do not edit by hand)",
        "",
        f"Settings `{cfg_name}`: components {cfg['ranks']}, {cfg['steps']} optimiser steps "
        f"(batch {cfg['batch_size']}), training seed {cfg['train_seed']}, {cfg['n_cells']} "
        f"generated cells per class and generation seed {cfg['seeds']}; every model on the "
        f"out-of-fold rescaled scores of its PCA ({cfg['n_folds']} folds), decoded without "
        "noise; split seed 0, train / held-out / unseen 50/30/20 %. Every row: "
        "`tl.evaluate(gen, held, train=train)` (reference PCA on the train cells, the same "
        "for every k), mean over classes, then mean ± sd over generation seeds.",
        "",
        "Read every row against the control and the probes: `probe: real cells, unseen` must "
        "sit at the control; `probe: unseen cells via k PCs` is the best a generator of exact "
        "k-PC scores can reach.",
    ]
    for name in args.datasets.split(","):
        train, held, unseen = loaders[name](seed=0, fractions=SPLIT)
        rows, costs = fit_rows(train, unseen, cfg)
        df = evaluate_rows(name, rows, train, held, cfg)
        df.to_csv(f"rows_{name}.csv", index=False)
        lines += [
            "",
            f"## {name}",
            "",
            f"{train.n_obs} train / {held.n_obs} held-out cells, {train.n_vars} genes.",
            "",
            _md(table(df)),
            "",
            f"Fit time of the models (set-up and training, seconds, {cpu_threads()}):",
            "",
            _md(pd.DataFrame(costs), index=False),
        ]
    lines += ["", f"Total wall time {(time.perf_counter() - t_all) / 60:.1f} min.", ""]
    print(write_lines(markdown, lines))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
