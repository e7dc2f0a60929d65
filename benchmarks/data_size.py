"""Cells per type against quality: how far a generator can get from the cells it learns from.

On pbmc68k_reduced every generator (branched, flat and conditioned diffusion, the per-class
Gaussian) lands at AUROC 0.61-0.64 while the control is 0.43 and real cells nothing saw score
0.50 (docs/benchmarks/quality.md); its evaluated types have 34-120 training cells. Here the
training cells of pbmc3k (the quality benchmark's split, seed 0) are cut to at most ``n`` cells
per type, and each generator is fitted on the cut cells alone (its own PCA and out-of-fold
scores, set up with counts: the package's default configuration), then judged exactly as in
quality.py: ``tl.evaluate(gen, held, train=train)`` against the same held-out cells, in a
reference PCA fitted on ALL the train cells (the same instrument for every ``n``).

Rows, for every ``n``:
  per-class Gaussian          Ledoit-Wolf Gaussian per type on the cut cells' out-of-fold
                              scores, decoded with the negative binomial
  conditioned                 the default model (branch-conditioned network) on the cut cells,
                              default budget (1,000 optimiser steps at least)
  probe: the cut cells        the cut cells' out-of-fold scores decoded the same way: the
                              target, what a generator that learned exactly these cells reaches
Known answer (once): real cells nothing saw (the unseen split), which must sit at the control.
Values are per type (types with >= 10 held-out cells per half), mean +- sd over generation
seeds, so a type's curve is read where the cut applies to it (types with fewer cells than
``n`` keep all theirs).

Usage (from the repository root, in the project's venv):
  python benchmarks/data_size.py          # about 10 min on 2 cores
  python benchmarks/data_size.py --fast   # smoke test; numbers meaningless
Writes docs/benchmarks/data_size.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import pandas as pd
from quality import (
    LABELS,
    LATENT,
    SPLIT,
    DecodedProbe,
    SpaceDecodedGaussian,
    TrainCellsProbe,
    _fmt,
    _md,
    _model_pca,
    default_setup,
    load_pbmc3k,
    prepare_run,
    seed_reports,
    train_model,
    write_lines,
)
from variants import DEFAULT  # the package's default network, as every page names it

SETTINGS = {
    "cpu": {
        "caps": [25, 50, 100, 200, None],
        "seeds": [0, 1, 2],
        "n_cells": 200,
        "steps": None,
        "batch_size": 64,
        "accelerator": "cpu",
        "train_seed": 0,
    },
    "fast": {
        "caps": [25, None],
        "seeds": [0],
        "n_cells": 40,
        "steps": 20,
        "batch_size": 64,
        "accelerator": "cpu",
        "train_seed": 0,
    },
}
METRICS = ("auroc", "mmd_median", "dispersion")

logger = logging.getLogger("data_size")


def cut(train, cap: int | None, seed: int = 0):
    """At most ``cap`` cells of every type (seeded), with a PCA and out-of-fold scores of
    their own: what a user with only these cells would have."""
    from scbranch.module._discovery import subsample_per_class

    keep = subsample_per_class(
        train.obs[LABELS].cat.codes.to_numpy(), len(train.obs[LABELS].cat.categories),
        cap if cap is not None else train.n_obs, seed,
    )  # fmt: skip
    part = train[keep].copy()
    for key in ("X_pca", LATENT):
        part.obsm.pop(key, None)
    part.uns.pop("pca", None)
    part.varm.pop("PCs", None)
    _model_pca(part)
    return part


def rows_of(part, cfg) -> dict:
    """Row name -> generator, all fitted on ``part``."""
    import scbranch as sb

    space = sb.BranchedDiffusion(default_setup(part))  # untrained: its decoder only
    return {
        "per-class Gaussian": SpaceDecodedGaussian(default_setup(part), space),
        DEFAULT: train_model(part, cfg, cfg["train_seed"], architecture=DEFAULT),
        "probe: the cut cells": DecodedProbe(space, part, part.obsm[LATENT]),
    }


def judge(row: str, cap, method, train, held, cfg) -> list[dict]:
    """Per-type metrics of ``method`` for every generation seed."""
    out = []
    for seed, report in seed_reports(method, held, train, cfg):
        report = report[(report["space"] == "reference_pca") & report["metric"].isin(METRICS)]
        for rec in report.itertuples():
            out.append(
                {
                    "row": row,
                    "cap": "all" if cap is None else cap,
                    "seed": seed,
                    "group": rec.group,
                    "metric": rec.metric,
                    "value": rec.generated,
                    "control": rec.control,
                }
            )
    return out


def run(cfg) -> tuple[pd.DataFrame, dict]:
    train, held, unseen = load_pbmc3k(seed=0, fractions=SPLIT)
    records = judge("probe: real cells, unseen", None, TrainCellsProbe(unseen), train, held, cfg)
    sizes = {}
    for cap in cfg["caps"]:
        part = cut(train, cap)
        sizes["all" if cap is None else cap] = part.obs[LABELS].value_counts().to_dict()
        t0 = time.perf_counter()
        for row, method in rows_of(part, cfg).items():
            records += judge(row, cap, method, train, held, cfg)
        logger.info("at most %s cells per type: %.0f s", cap, time.perf_counter() - t0)
    return pd.DataFrame(records), sizes


def table(df: pd.DataFrame, metric: str, sizes: dict) -> pd.DataFrame:
    """Rows x types (train cells in the column name at each cap), mean +- sd over seeds."""
    d = df[df["metric"] == metric]
    types = [g for g in dict.fromkeys(d["group"]) if g != "mean"] + ["mean"]
    out = {}
    for (row, cap), g in d.groupby(["row", "cap"], sort=False):
        name = row if row.startswith("probe: real") else f"{row}, n <= {cap}"
        cells = {}
        for t in types:
            v = g.loc[g["group"] == t, "value"]
            n = "" if t == "mean" or row.startswith("probe: real") else f" ({sizes[cap][t]})"
            cells[t] = _fmt(v.mean(), v.std(ddof=0)) + n
        out[name] = cells
    ctrl = d.groupby("group")["control"]
    out["real vs real (control)"] = {t: f"{ctrl.get_group(t).mean():.3f}" for t in types}
    return pd.DataFrame(out).T[types]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke-test settings")
    parser.add_argument("--out", default="benchmark_out/data_size")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    cfg_name = "fast" if args.fast else "cpu"
    cfg = SETTINGS[cfg_name]
    markdown = prepare_run(args, "data_size")
    t_all = time.perf_counter()
    df, sizes = run(cfg)
    df.to_csv("rows.csv", index=False)
    lines = [
        "# Cells per type against quality (generated by `benchmarks/data_size.py`; do not edit "
        "by hand)",
        "",
        f"Settings `{cfg_name}`: pbmc3k, split seed 0 (train / held-out / unseen 50/30/20 %); "
        f"train cells cut to at most n per type (in brackets: the type's cells after the cut); "
        f"each row fitted on the cut cells only (own PCA, out-of-fold scores, counts); training "
        f"seed {cfg['train_seed']}, generation seeds {cfg['seeds']}, {cfg['n_cells']} cells "
        "per type. Judged by `tl.evaluate(gen, held, train=train)` with the reference PCA of ALL "
        "train cells; per type, mean ± sd over generation seeds. Read every row against the "
        "control and `probe: real cells, unseen`, which must sit at the control.",
    ]
    for metric in METRICS:
        lines += ["", f"## {metric}", "", _md(table(df, metric, sizes))]
    lines += ["", f"Total wall time {(time.perf_counter() - t_all) / 60:.1f} min.", ""]
    print(write_lines(markdown, lines))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.exit(main())
