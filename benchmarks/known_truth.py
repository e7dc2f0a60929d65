"""A known truth at pbmc68k_reduced's size: how close can a generator fitted on so few cells get?

On pbmc68k_reduced every generator lands at AUROC 0.61-0.62 against a control of 0.43
(docs/benchmarks/quality.md), while the probe that decodes the training cells' own out-of-fold
scores reaches 0.50, and its ``train_distance`` of about 0.63 says how: it returns the cells it
learned from. Whether a generator that does NOT copy can reach the control at this size cannot be
read from real data, whose distribution is unknown. Here it is known.

Truth: the per-class Gaussian (Ledoit-Wolf) of ALL 700 pbmc68k_reduced cells' PC scores, decoded
with the negative binomial around each class's mean (the package's default decoder), with counts.
It is sampled without end. A synthetic dataset of ``scale`` x the real class sizes is drawn from
it, split 50/30/20 % like quality.py, and the default pipeline runs on the synthetic train cells
alone (the models' PCA and out-of-fold scores, set up with counts). Then:

  probe: truth cells, unseen     cells of the truth nothing saw: must sit at the control
  probe: train cells' out-of-fold scores, decoded
                                 the memoriser: the best AUROC, and train_distance below 1
  per-class Gaussian             fitted on the train cells: the truth's own family, so what is
                                 left between it and the control is estimation error alone
  branched                       the default model, default budget

judged by ``tl.evaluate(gen, held, train=train)`` on the four types quality.py evaluates on
pbmc68k_reduced (CD14+ Monocyte, CD19+ B, CD4+/CD25 T Reg, Dendritic). At scale 1 the types have
pbmc68k_reduced's numbers of cells, so the must-show "AUROC within control + 0.08" is checked
against what a correctly specified model fitted on that many cells reaches.

Usage (from the repository root, in the project's venv):
  python benchmarks/known_truth.py          # about 14 min on 2 cores
  python benchmarks/known_truth.py --scales 16 --steps 16000 \
      --markdown docs/benchmarks/known_truth_budget.md   # a larger budget, 25 min
  python benchmarks/known_truth.py --components 3 \
      --markdown docs/benchmarks/known_truth_mixture.md   # types no Gaussian fits, 14 min
  python benchmarks/known_truth.py --fast   # smoke test; numbers meaningless
Writes docs/benchmarks/known_truth.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np
import pandas as pd
from quality import (
    LABELS,
    LATENT,
    SPLIT,
    DecodedProbe,
    SpaceDecodedGaussian,
    TrainCellsProbe,
    _fmt,
    _labels,
    _md,
    _model_pca,
    _split,
    default_setup,
    prepare_run,
    seed_reports,
    train_model,
    write_lines,
)

SETTINGS = {
    "cpu": {
        "scales": [1, 4, 16],
        "seeds": [0, 1, 2],
        "n_cells": 200,
        "steps": None,
        "batch_size": 64,
        "accelerator": "cpu",
        "train_seed": 0,
    },
    "fast": {
        "scales": [1],
        "seeds": [0],
        "n_cells": 40,
        "steps": 20,
        "batch_size": 64,
        "accelerator": "cpu",
        "train_seed": 0,
    },
}
#: the types quality.py can judge with distances on pbmc68k_reduced (>= 10 cells per half)
TYPES = ["CD14+ Monocyte", "CD19+ B", "CD4+/CD25 T Reg", "Dendritic"]
METRICS = ("auroc", "mmd_median", "dispersion", "train_distance")
#: a mixture truth: one component per this many cells of a type (at most ``--components``)
CELLS_PER_COMPONENT = 40
#: added to the mixture components' covariance diagonals (PC scores' variances are ~1-50)
MIXTURE_REG = 0.1

logger = logging.getLogger("known_truth")


class Truth:
    """Per-class Gaussian of every pbmc68k_reduced cell's PC scores, decoded with counts.

    ``components > 1``: a Gaussian mixture per type instead (up to ``components``, one per
    ``CELLS_PER_COMPONENT`` cells of the type), a truth whose types have a shape no single
    Gaussian has.
    """

    def __init__(self, components: int = 1):
        import scbranch as sb

        adata = sb.datasets.pbmc68k()
        del adata.obsm["X_pca"], adata.varm["PCs"]
        _model_pca(adata)
        setup = default_setup(adata)
        self.sizes = adata.obs[LABELS].value_counts()
        self.space = sb.BranchedDiffusion(setup)  # untrained: its decoder only
        self.gauss = SpaceDecodedGaussian(setup, self.space).gauss
        self.mixtures = {}
        if components > 1:
            from sklearn.mixture import GaussianMixture

            z, labels = np.asarray(setup.obsm[LATENT]), _labels(setup)
            for c in self.sizes.index:
                k = int(np.clip((labels == c).sum() // CELLS_PER_COMPONENT, 1, components))
                self.mixtures[c] = GaussianMixture(k, reg_covar=MIXTURE_REG, random_state=0).fit(
                    z[labels == c]
                )

    def latents(self, request: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """PC scores and labels of ``request`` cells per type."""
        if not self.mixtures:
            gen = self.gauss.generate(n_cells=request, seed=seed)
            return np.asarray(gen.obsm[self.gauss.obsm_key]), _labels(gen)
        z, labels = [], []
        for i, (c, n) in enumerate(request.items()):
            self.mixtures[c].random_state = seed * 1000 + i
            z.append(self.mixtures[c].sample(n)[0])
            labels += [c] * n
        return np.concatenate(z), np.asarray(labels)

    def sample(self, scale: int, seed: int):
        """``scale`` x the real class sizes of truth cells: ``.X`` log-normalised, counts."""
        import anndata as ad
        import scanpy as sc
        import scipy.sparse as sp

        request = {c: int(n) * scale for c, n in self.sizes.items()}
        z, labels = self.latents(request, seed)
        space = self.space.space
        codes = np.array([self.space.classes.index(c) for c in labels])
        options = space.resolve_options(counts=True, batch=None, residual_noise="nb")
        out = space.decode(np.asarray(z, np.float32), codes, options, seed)
        # .X as real data has it: the counts' log-normalisation (the decoder's own .X sets
        # the PC scores back to the generated ones, which no real dataset does)
        counts = sp.csr_matrix(out.layers["counts"], dtype=np.float32)
        cells = ad.AnnData(
            X=counts.copy(),
            obs=pd.DataFrame(
                {LABELS: pd.Categorical(labels, categories=list(self.sizes.index))},
                index=[f"truth{i}" for i in range(len(labels))],
            ),
            var=pd.DataFrame(index=out.var_names),
        )
        cells.layers["counts"] = counts
        sc.pp.normalize_total(cells, target_sum=1e4)
        sc.pp.log1p(cells)
        return cells


def rows_of(train, unseen, cfg, model: bool = True) -> dict:
    """Row name -> generator, every one fitted on the synthetic train cells only (``model``:
    with the trained branched model)."""
    import scbranch as sb

    space = sb.BranchedDiffusion(default_setup(train))  # untrained: its decoder only
    rows = {
        "probe: truth cells, unseen": TrainCellsProbe(unseen),
        "probe: train cells' out-of-fold scores, decoded": DecodedProbe(
            space, train, train.obsm[LATENT]
        ),
        "per-class Gaussian": SpaceDecodedGaussian(default_setup(train), space),
    }
    if model:
        name = "branched" if cfg["steps"] is None else f"branched, {cfg['steps']} steps"
        rows[name] = train_model(train, cfg, cfg["train_seed"])
    return rows


def judge(row: str, scale: int, method, train, held, cfg) -> list[dict]:
    """Metrics (mean over TYPES) of ``method`` for every generation seed."""
    out = []
    for seed, report in seed_reports(method, held, train, cfg, groups=TYPES, metrics=list(METRICS)):
        report = report[(report["space"] == "reference_pca") & (report["group"] == "mean")]
        for rec in report.itertuples():
            out.append(
                {
                    "row": row,
                    "scale": scale,
                    "seed": seed,
                    "metric": rec.metric,
                    "value": rec.generated,
                    "control": rec.control,
                }
            )
    return out


def run(cfg) -> tuple[pd.DataFrame, dict]:
    truth = Truth(cfg["components"])
    records, sizes = [], {}
    for scale in cfg["scales"]:
        t0 = time.perf_counter()
        train, held, unseen = _split(truth.sample(scale, seed=scale), SPLIT, seed=0)
        _model_pca(train)
        sizes[scale] = train.obs[LABELS].value_counts()[TYPES].to_dict()
        for row, method in rows_of(train, unseen, cfg).items():
            records += judge(row, scale, method, train, held, cfg)
        logger.info("scale %d: %.0f s", scale, time.perf_counter() - t0)
    return pd.DataFrame(records), sizes


def sizes_line(sizes: dict) -> str:
    """The report's line of train cells per type at every scale."""
    per_scale = (f"x{s}: " + ", ".join(f"{t} {n}" for t, n in v.items()) for s, v in sizes.items())
    return "Train cells per type: " + "; ".join(per_scale) + "."


def table(df: pd.DataFrame) -> pd.DataFrame:
    """Rows (scale, row) x metrics, mean +- sd over generation seeds, with each control."""
    out = {}
    for scale, d in df.groupby("scale", sort=False):
        for row, g in d.groupby("row", sort=False):
            out[(scale, row)] = {
                m: _fmt(v.mean(), v.std(ddof=0)) for m, v in g.groupby("metric")["value"]
            }
        ctrl = d.groupby("metric")["control"].mean()
        out[(scale, "real vs real (control)")] = {m: f"{v:.3f}" for m, v in ctrl.items()}
    frame = pd.DataFrame(out).T[list(METRICS)]
    frame.index = [f"x{s}: {r}" for s, r in frame.index]
    return frame


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--scales", default=None, help="e.g. 16 (default 1,4,16)")
    parser.add_argument(
        "--steps", default=None, help="the model's training budget (default: the package's)"
    )
    parser.add_argument(
        "--components", type=int, default=1, help="> 1: a Gaussian mixture per type as the truth"
    )
    parser.add_argument("--out", default="benchmark_out/known_truth")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    cfg_name = "fast" if args.fast else "cpu"
    cfg = dict(SETTINGS[cfg_name])
    if args.scales:
        cfg["scales"] = [int(s) for s in args.scales.split(",")]
    if args.steps:
        cfg["steps"] = int(args.steps)
    cfg["components"] = args.components
    markdown = prepare_run(args, "known_truth")
    t_all = time.perf_counter()
    df, sizes = run(cfg)
    df.to_csv("rows.csv", index=False)
    budget = "the default" if cfg["steps"] is None else f"{cfg['steps']} steps"
    truth_name = (
        "the per-class Gaussian"
        if cfg["components"] == 1
        else f"a Gaussian mixture per type (up to {cfg['components']} components, one per "
        f"{CELLS_PER_COMPONENT} cells; no single Gaussian is the truth's family)"
    )
    lines = [
        "# A known truth at pbmc68k_reduced's size (generated by `benchmarks/known_truth.py`; "
        "do not edit by hand)",
        "",
        f"Settings `{cfg_name}`: truth = {truth_name} of all 700 pbmc68k_reduced "
        "cells' PC scores, decoded with the negative binomial (counts); synthetic datasets of "
        f"scale x the real class sizes (scales {cfg['scales']}), split 50/30/20 % (seed 0); "
        f"every row fitted on the synthetic train cells only; training seed "
        f"{cfg['train_seed']}, generation seeds {cfg['seeds']}, {cfg['n_cells']} cells per "
        f"type; the model's budget: {budget}. Judged by "
        f"`tl.evaluate(gen, held, train=train, groups=TYPES)` on {TYPES}; "
        "mean over the types, then mean ± sd over generation seeds. `probe: truth cells, "
        "unseen` must sit at the control; the per-class Gaussian is the truth's own family.",
        "",
        sizes_line(sizes),
        "",
        _md(table(df)),
        "",
        f"Total wall time {(time.perf_counter() - t_all) / 60:.1f} min.",
        "",
    ]
    print(write_lines(markdown, lines))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.exit(main())
